-- Files and production records.
CREATE TABLE files (
    lfn           text PRIMARY KEY,
    production_id text NOT NULL,
    job_index     bigint NOT NULL,
    attempt       integer NOT NULL,
    size          bigint NOT NULL,
    adler32       text NOT NULL,
    url           text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_production ON files (production_id, lfn);
CREATE INDEX files_metadata ON files USING gin (metadata jsonb_path_ops);
CREATE TABLE productions (
    production_id text PRIMARY KEY,
    state         text NOT NULL,
    file_count    bigint NOT NULL,
    total_bytes   bigint NOT NULL,
    completed_at  timestamptz NOT NULL DEFAULT now()
);
