-- Jobs in flight by production.
-- Productions of equal priority take turns by their jobs in flight, counted
-- each round: through their in-flight jobs only, however many wait.
CREATE INDEX jobs_in_flight_by_production ON jobs (production_id)
WHERE state IN ('SUBMITTED', 'QUEUED', 'RUNNING');
