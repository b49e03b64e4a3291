-- Production records.
-- What the catalog learns of a production for its record, from the events
-- it consumes: the request as accepted (request.accepted, with when it was
-- submitted and accepted, from the UUIDv7s of the request and the event),
-- the plan and its resource estimate (production.dispatched), and the end
-- with its job accounting (production.completed, on `productions`).
-- `record_lfn`: the record's own file, once written and registered (it is
-- a file of the production that the running totals do not count).
CREATE TABLE accepted_requests (
    production_id  text PRIMARY KEY,
    request_id     text NOT NULL,
    submitter      text NOT NULL,
    vo             text NOT NULL,
    profile        text NOT NULL,
    profile_sha256 text NOT NULL,
    fingerprint    text NOT NULL,
    parameters     jsonb NOT NULL,
    backend        text NOT NULL,
    destinations   text[] NOT NULL,
    submitted_at   timestamptz,
    accepted_at    timestamptz
);
CREATE TABLE dispatches (
    production_id       text PRIMARY KEY,
    job_total           bigint NOT NULL,
    backend             text NOT NULL,
    cpu_seconds_per_job double precision,
    cpu_hours_total     double precision,
    memory_mb           bigint,
    disk_mb_per_job     double precision,
    disk_gb_total       double precision
);
ALTER TABLE productions ADD COLUMN counts jsonb,
                        ADD COLUMN attempts bigint,
                        ADD COLUMN retries bigint,
                        ADD COLUMN cpu_seconds double precision,
                        ADD COLUMN cpu_measured_attempts bigint,
                        ADD COLUMN first_job_started_at timestamptz,
                        ADD COLUMN last_job_ended_at timestamptz,
                        ADD COLUMN first_run bigint,
                        ADD COLUMN last_run bigint,
                        ADD COLUMN record_lfn text;
-- Productions that ended before records were kept have no record file ('').
UPDATE productions SET record_lfn = '';
-- The recorder's sweep reads only the records not written yet.
CREATE INDEX productions_unrecorded ON productions (production_id) WHERE record_lfn IS NULL;
