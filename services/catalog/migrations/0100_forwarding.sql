-- Forwarding outputs to their destinations.
-- One row per production whose outputs go somewhere (from request.accepted):
-- the destinations it asked for, whether its progress changed since it was
-- last announced, and when forwarding finished (announced once).
CREATE TABLE forwarding (
    production_id  text PRIMARY KEY,
    destinations   text[] NOT NULL,
    progress_dirty boolean NOT NULL DEFAULT true,
    finished_at    timestamptz
);
CREATE INDEX forwarding_open ON forwarding (production_id)
    WHERE finished_at IS NULL AND progress_dirty;
-- One file's copy on one destination. `verified` only once the destination
-- answered the catalogued adler32 for what landed; `copying` is claimed by a
-- catalog process until `next_try_at` (renewed while it copies), after which
-- another takes it over; `failed` waits until `next_try_at` (backoff).
CREATE TABLE replicas (
    lfn           text NOT NULL REFERENCES files (lfn),
    destination   text NOT NULL,
    production_id text NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'copying', 'verified', 'failed')),
    url           text NOT NULL DEFAULT '',
    reason        text NOT NULL DEFAULT '',
    attempts      integer NOT NULL DEFAULT 0,
    next_try_at   timestamptz NOT NULL DEFAULT now(),
    claimed_by    uuid,
    verified_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (lfn, destination)
);
CREATE INDEX replicas_due ON replicas (next_try_at) WHERE state <> 'verified';
CREATE INDEX replicas_per_production ON replicas (production_id, destination, state);
