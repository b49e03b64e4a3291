-- No index of unfinished jobs.
-- A job waiting to run is in `jobs_ready` and one in flight in
-- `jobs_in_flight_by_production`: whether a production has unfinished jobs
-- asks those two, and a job row is written into one index fewer (every
-- CREATED job was in both `jobs_ready` and `jobs_unfinished`). No release
-- stores a job as FAILED any more (a failed attempt becomes CREATED for its
-- retry, or EXHAUSTED, in the same statement); a row an early release left
-- FAILED was waiting for its retry, and is made ready for it.
UPDATE jobs SET state = 'CREATED', updated_at = now() WHERE state = 'FAILED';
DROP INDEX IF EXISTS jobs_unfinished;
