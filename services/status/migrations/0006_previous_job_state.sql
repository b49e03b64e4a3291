-- Previous job state.
-- Set by the same UPDATE that changes a job's state, so the statement
-- can return what it replaced and move the counters itself.
ALTER TABLE jobs ADD COLUMN prev_state text;
