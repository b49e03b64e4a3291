-- Incremental planning.
-- Productions recorded before this were planned whole.
ALTER TABLE productions ADD COLUMN planned_jobs bigint NOT NULL DEFAULT 0,
                        ADD COLUMN accepted_at timestamptz NOT NULL DEFAULT now();
UPDATE productions SET planned_jobs = job_total, accepted_at = created_at;
CREATE INDEX productions_planning ON productions (priority DESC, created_at)
    WHERE planned_jobs < job_total AND state = 'RUNNING';
