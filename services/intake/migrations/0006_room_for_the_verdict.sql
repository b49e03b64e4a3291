-- Room for the verdict in the request's page.
-- A verdict rewrites the request's row once; with room left in its
-- page the new version stays there (a HOT update) and no index changes.
ALTER TABLE requests SET (fillfactor = 80);
