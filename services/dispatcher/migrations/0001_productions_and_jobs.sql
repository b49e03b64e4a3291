-- Productions and jobs.
CREATE TABLE productions (
    production_id     text PRIMARY KEY,
    request_id        uuid NOT NULL,
    profile           text NOT NULL,
    vo                text NOT NULL,
    parameters        jsonb NOT NULL,
    fingerprint       text NOT NULL,
    backend           text NOT NULL,
    run_number_offset bigint NOT NULL,
    state             text NOT NULL,
    job_total         bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE jobs (
    production_id  text NOT NULL REFERENCES productions,
    job_index      bigint NOT NULL,
    run_number     bigint NOT NULL,
    seed           bigint NOT NULL,
    units          bigint NOT NULL,
    state          text NOT NULL DEFAULT 'CREATED',
    attempt        integer NOT NULL DEFAULT 1,
    backend_job_id text,
    raw_status     text,
    exit_code      integer,
    workdir        text,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (production_id, job_index)
);
CREATE INDEX jobs_ready ON jobs (production_id, job_index) WHERE state = 'CREATED';
CREATE INDEX jobs_in_flight ON jobs (backend_job_id) WHERE state IN ('SUBMITTED', 'QUEUED', 'RUNNING');
