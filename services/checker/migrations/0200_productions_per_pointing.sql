-- Several productions per request.
-- A request that names an observation period becomes one production per
-- pointing, each with its own fingerprint (still unique): the request ID
-- is no longer unique among productions, only indexed.
ALTER TABLE productions DROP CONSTRAINT productions_request_id_key;
CREATE INDEX productions_request ON productions (request_id);
