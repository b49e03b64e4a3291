-- Forwarding destinations a request asks for.
-- Besides (or, with forward_replace, instead of) its profile's defaults;
-- the checker resolves and checks them.
ALTER TABLE requests
    ADD COLUMN forward text[] NOT NULL DEFAULT '{}',
    ADD COLUMN forward_replace boolean NOT NULL DEFAULT false;
