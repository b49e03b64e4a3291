-- Productions by installation and state.
-- The scheduler's every tick asks for one installation's RUNNING (or
-- CANCELLING) productions; without it that is a scan of all of them.
CREATE INDEX productions_backend_state ON productions (backend, state, created_at);
