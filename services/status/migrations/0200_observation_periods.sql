-- A production of a request that named an observation period: the period
-- and the pointing it simulates (its request has one production per
-- pointing). Empty for every other production.
ALTER TABLE productions
    ADD COLUMN period text NOT NULL DEFAULT '',
    ADD COLUMN pointing text NOT NULL DEFAULT '';
-- The productions of one request, listed together.
CREATE INDEX productions_by_request ON productions (request_id, production_id);
