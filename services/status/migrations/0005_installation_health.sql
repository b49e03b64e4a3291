-- Installation health.
CREATE TABLE installations (
    name     text PRIMARY KEY,
    healthy  boolean NOT NULL,
    reason   text NOT NULL,
    since_ms bigint NOT NULL
);
