-- With tokens on, a request records who made it (the token's issuer and
-- subject): its productions may be cancelled by that owner or by the VO's
-- production managers. NULL for requests from before, from events, or made
-- in the development mode.
ALTER TABLE requests ADD COLUMN owner text;
-- A cancel looks the production's request up by production ID: its own, or
-- one of a period's pointings.
CREATE INDEX requests_production_id ON requests (production_id) WHERE production_id IS NOT NULL;
CREATE INDEX requests_pointing_productions ON requests USING gin (productions jsonb_path_ops);
