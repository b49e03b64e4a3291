-- Requests.
CREATE TABLE requests (
    request_id             uuid PRIMARY KEY,
    idempotency_key        text UNIQUE,
    profile                text NOT NULL,
    vo                     text NOT NULL,
    parameters             jsonb NOT NULL,
    backend                text NOT NULL,
    submitter              text NOT NULL,
    state                  text NOT NULL DEFAULT 'RECEIVED',
    production_id          text,
    violations             jsonb NOT NULL DEFAULT '[]',
    existing_production_id text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
