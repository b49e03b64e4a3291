-- Dispatch priority.
ALTER TABLE requests ADD COLUMN priority integer NOT NULL DEFAULT 0;
