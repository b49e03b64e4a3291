-- Unfinished jobs index.
CREATE INDEX jobs_unfinished ON jobs (production_id)
WHERE state IN ('CREATED', 'SUBMITTED', 'QUEUED', 'RUNNING', 'FAILED');
