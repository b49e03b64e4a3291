-- A replica is claimed (`claimed_by` set) only while it is `copying`: a
-- claim sets both and recording the copy clears the claim. Stated here so
-- that the claim's check (`claimed_by` is this process) is the state's too.
-- The claims in flight are found by their claimer (renewed every third of
-- their time to live) from an index of those rows alone, not by reading
-- every replica.
ALTER TABLE replicas ADD CONSTRAINT replicas_claimed_only_while_copying
    CHECK (claimed_by IS NULL OR state = 'copying');
CREATE INDEX replicas_claimed ON replicas (claimed_by) WHERE claimed_by IS NOT NULL;
