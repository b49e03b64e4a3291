-- Reuse of existing productions.
ALTER TABLE requests ADD COLUMN reuse_existing boolean NOT NULL DEFAULT false;
