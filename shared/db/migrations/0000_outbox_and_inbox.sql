-- Outbox and inbox: the tables every service has.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    event_type text NOT NULL,
    subject    text NOT NULL,
    payload    bytea NOT NULL,
    -- Where to: NULL is the events exchange; a reply names its queue.
    reply_to   text,
    content_type text NOT NULL DEFAULT 'application/protobuf',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE inbox (
    event_id    uuid PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
