-- Deployment tag.
-- Production IDs repeat across deployments; backend job names must not,
-- or one deployment would adopt another's jobs on a shared cluster.
CREATE TABLE deployment (tag text NOT NULL);
INSERT INTO deployment SELECT 'p' || substr(md5(random()::text || clock_timestamp()::text), 1, 8);
