-- A chained production (its jobs take other productions' outputs): how
-- many input files its jobs took so far, and what it says of its inputs
-- when a parent did not complete (empty otherwise, and for every other
-- production).
ALTER TABLE productions
    ADD COLUMN inputs_used bigint NOT NULL DEFAULT 0,
    ADD COLUMN inputs_note text NOT NULL DEFAULT '';
