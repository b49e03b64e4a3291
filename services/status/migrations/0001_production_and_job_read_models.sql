-- Production and job read models.
CREATE TABLE productions (
    production_id text PRIMARY KEY,
    request_id    uuid,
    profile       text NOT NULL DEFAULT '',
    vo            text NOT NULL DEFAULT '',
    backend       text NOT NULL DEFAULT '',
    state         text NOT NULL,
    state_rank    integer NOT NULL,
    job_total     bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX productions_vo_state ON productions (vo, state);
CREATE TABLE jobs (
    production_id text NOT NULL,
    job_index     bigint NOT NULL,
    attempt       integer NOT NULL,
    state         text NOT NULL,
    state_rank    integer NOT NULL,
    raw_status    text NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (production_id, job_index)
);
