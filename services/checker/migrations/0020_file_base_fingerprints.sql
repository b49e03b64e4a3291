-- File-base fingerprints.
-- Productions whose files may share an identity though their base
-- fingerprints differ (NSB 1+5 and NSB 1+19); '' where the profile
-- has no per-file key, and for productions accepted before.
ALTER TABLE productions ADD COLUMN file_base text NOT NULL DEFAULT '';
CREATE INDEX productions_file_base ON productions (file_base);
