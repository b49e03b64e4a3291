-- Admission limits per VO: a request counts against its VO from its
-- submission until its production ends (production.completed, whatever the
-- final state); refused requests and answers with an existing production
-- never count.
ALTER TABLE requests ADD COLUMN ended_at timestamptz;
CREATE INDEX requests_unfinished_by_vo ON requests (vo)
    WHERE ended_at IS NULL AND state IN ('RECEIVED', 'ACCEPTED');
CREATE INDEX requests_by_production ON requests (production_id)
    WHERE production_id IS NOT NULL AND ended_at IS NULL;
