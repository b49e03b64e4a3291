-- Outputs awaited before a production's forwarding can finish.
-- production.completed may be handled before the last job.output of its
-- production (another consumer's batch, a redelivery, another dispatcher's
-- outbox): the jobs whose output the catalog has taken are kept one row per
-- job, and the record keeps how many jobs ended DONE (each sends exactly
-- one job.output). Forwarding finishes only once the two agree, whatever
-- order the events came in. NULL: a record from before this was kept.
CREATE TABLE job_outputs (
    production_id text NOT NULL,
    job_index     bigint NOT NULL,
    PRIMARY KEY (production_id, job_index)
);
ALTER TABLE productions ADD COLUMN jobs_done bigint;
-- Productions forwarding while this was added: the jobs their files came from.
INSERT INTO job_outputs (production_id, job_index)
SELECT DISTINCT f.production_id, f.job_index
FROM forwarding fw JOIN files f USING (production_id)
WHERE fw.finished_at IS NULL;
