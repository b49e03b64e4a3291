-- Batched production upserts; room for in-place job updates.
-- NULL job_total: not known yet (a batch that only says ACCEPTED must not
-- overwrite the total a production.dispatched set). Free space in each
-- page lets a job's row be rewritten in place (HOT), its key unchanged.
ALTER TABLE productions ALTER COLUMN job_total DROP NOT NULL,
                        ALTER COLUMN job_total DROP DEFAULT;
ALTER TABLE jobs SET (fillfactor = 70);
