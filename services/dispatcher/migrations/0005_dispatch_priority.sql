-- Dispatch priority.
ALTER TABLE productions ADD COLUMN priority integer NOT NULL DEFAULT 0;
DROP INDEX productions_backend_state;
CREATE INDEX productions_waiting ON productions (backend, state, priority DESC, created_at);
