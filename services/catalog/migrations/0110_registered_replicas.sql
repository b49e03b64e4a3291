-- A replica on a `rucio` destination ends `registered` (copied to its
-- storage, verified there, and registered on the Rucio server) where a copy
-- destination's ends `verified`; neither is due any more.
ALTER TABLE replicas DROP CONSTRAINT replicas_state_check;
ALTER TABLE replicas ADD CONSTRAINT replicas_state_check
    CHECK (state IN ('pending', 'copying', 'verified', 'registered', 'failed'));
DROP INDEX replicas_due;
CREATE INDEX replicas_due ON replicas (next_try_at) WHERE state NOT IN ('verified', 'registered');
