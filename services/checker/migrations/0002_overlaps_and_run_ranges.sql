-- Overlaps and run ranges.
ALTER TABLE productions
    ADD COLUMN base_fingerprint text NOT NULL DEFAULT '',
    ADD COLUMN last_run bigint NOT NULL DEFAULT 0;
CREATE INDEX productions_base ON productions (base_fingerprint);
