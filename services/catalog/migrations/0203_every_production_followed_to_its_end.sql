-- Every production followed to its end, with or without destinations.
-- A production that asked for no destination was finished when it ended,
-- so a client watching it could read its files before the last job.output
-- was catalogued. Its end now makes a forwarding row with no destinations
-- and the catalog announces production.forwarded (to none) once every DONE
-- job's outputs are taken. Productions that ended before this have theirs
-- closed here, announced only if outputs were still awaited.
INSERT INTO forwarding (production_id, destinations, progress_dirty, finished_at)
SELECT p.production_id, '{}', awaited, CASE WHEN awaited THEN NULL ELSE now() END
FROM (SELECT p.production_id,
             COALESCE(p.jobs_done > (SELECT count(*) FROM job_outputs j
                                     WHERE j.production_id = p.production_id), false) AS awaited
      FROM productions p) AS p
ON CONFLICT (production_id) DO NOTHING;
