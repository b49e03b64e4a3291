-- Job accounting.
-- What a production's record tells of its jobs: attempts submitted (a
-- retry is one beyond the first), the CPU time the WMS reported for ended
-- attempts (summed; `cpu_measured` counts the attempts it reported it for,
-- so "unknown" stays distinguishable from zero), when the job first ran
-- and when it ended. Jobs recorded before this count nothing.
ALTER TABLE jobs ADD COLUMN attempts_submitted integer NOT NULL DEFAULT 0,
                 ADD COLUMN cpu_ms bigint NOT NULL DEFAULT 0,
                 ADD COLUMN cpu_measured integer NOT NULL DEFAULT 0,
                 ADD COLUMN started_at timestamptz,
                 ADD COLUMN ended_at timestamptz;
