-- Productions and ID sequences.
CREATE TABLE productions (
    production_id     text PRIMARY KEY,
    fingerprint       text NOT NULL UNIQUE,
    request_id        uuid NOT NULL UNIQUE,
    profile           text NOT NULL,
    vo                text NOT NULL,
    parameters        jsonb NOT NULL,
    backend           text NOT NULL,
    run_number_offset bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE id_sequences (
    vo   text PRIMARY KEY,
    last bigint NOT NULL
);
