-- How many input files a chained production's jobs took, kept as they are
-- taken: counting them at each step grew with the production (a chain fed
-- 100,000 files counted up to 100,000 index entries each time it made jobs).
ALTER TABLE productions ADD COLUMN inputs_used bigint NOT NULL DEFAULT 0;
UPDATE productions p SET inputs_used = c.used
FROM (SELECT child, count(*) AS used FROM chain_inputs
      WHERE job_index IS NOT NULL GROUP BY child) AS c
WHERE c.child = p.production_id;
