-- Resource estimates.
ALTER TABLE productions ADD COLUMN estimate bytea;
