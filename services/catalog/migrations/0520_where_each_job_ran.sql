-- Where each job ran.
-- Beside the jobs per installation and state, which jobs (by index) had
-- their last attempt on each installation, as ranges in job order
-- (`[{"first": 0, "last": 2}, ...]`), as production.completed tells them;
-- `jobs_truncated` when it left ranges out.
CREATE TABLE record_job_ranges (
    production_id  text NOT NULL,
    installation   text NOT NULL,
    jobs           jsonb NOT NULL,
    jobs_truncated boolean NOT NULL,
    PRIMARY KEY (production_id, installation)
);
