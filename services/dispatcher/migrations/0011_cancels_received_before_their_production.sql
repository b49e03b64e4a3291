-- Cancels received before their production.
-- requested_at: when intake was asked (the event's UUIDv7 time). A
-- cancel applies only to a production accepted before it was asked
-- for, never to one that later gets the same ID (a mistyped ID).
CREATE TABLE pending_cancels (
    production_id text PRIMARY KEY,
    reason        text NOT NULL,
    requested_at  timestamptz NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
