-- Extension requests.
ALTER TABLE requests ADD COLUMN extend boolean NOT NULL DEFAULT false;
