-- Federated placement.
-- The installation a job's attempt was placed on, set when it is reserved
-- (a production naming one installation: that one; naming a group or
-- `any`: the one placement chose). A job waiting to run has none, unless it
-- is a retry that may not move. Jobs reserved before this have none: theirs
-- is their production's backend.
ALTER TABLE jobs ADD COLUMN installation text;
CREATE INDEX jobs_in_flight_by_installation ON jobs (installation)
WHERE state IN ('SUBMITTED', 'QUEUED', 'RUNNING');
-- The health each installation's scheduler last announced: placement gives
-- a failing installation nothing.
CREATE TABLE installation_health (
    installation text PRIMARY KEY,
    healthy      boolean NOT NULL,
    reason       text NOT NULL DEFAULT '',
    since        timestamptz NOT NULL DEFAULT now()
);
-- Retries that may not move wait on their installation: found by it.
CREATE INDEX jobs_ready_placed ON jobs (installation)
WHERE state = 'CREATED' AND installation IS NOT NULL;
-- Attempts given up on an installation that failed too long (placed
-- elsewhere since): cancelled there once it answers again, so none runs twice.
CREATE TABLE abandoned_attempts (
    installation   text NOT NULL,
    backend_job_id text NOT NULL,
    abandoned_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (installation, backend_job_id)
);
