-- Forwarding progress of each production's outputs.
-- The destinations a production asked for (request.accepted), its files
-- forwarded / total per destination as the catalog last announced them
-- (forwarding.progress; an older announcement never overrides a newer one),
-- and whether the catalog announced it forwarded everywhere
-- (production.forwarded). Keyed by production alone, so the events may
-- arrive in any order.
CREATE TABLE forward_plans (
    production_id text PRIMARY KEY,
    destinations  text[] NOT NULL
);
CREATE TABLE forwarding (
    production_id text NOT NULL,
    destination   text NOT NULL,
    forwarded     bigint NOT NULL,
    total         bigint NOT NULL,
    failing       bigint NOT NULL,
    held_reason   text NOT NULL,
    at_ms         bigint NOT NULL,
    PRIMARY KEY (production_id, destination)
);
CREATE TABLE forwarded (
    production_id text PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now()
);
