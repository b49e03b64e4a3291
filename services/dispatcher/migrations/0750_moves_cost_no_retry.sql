-- Moves cost no retry.
-- Attempts a job was given that never started where they were placed: a
-- reservation an installation that failed never got (released), or an
-- attempt given up, still queued, on an installation that failed too long
-- (abandoned). They are attempts (each has its own tag), but not the job's
-- failures: the profile's retry limit counts `attempt - attempts_moved`.
ALTER TABLE jobs ADD COLUMN attempts_moved integer NOT NULL DEFAULT 0;
