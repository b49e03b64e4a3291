-- Running totals per production.
-- Kept with every registration, so a production's record reads one
-- row however many files it has, and is right whichever of several
-- consumers commits last.
CREATE TABLE totals (
    production_id text PRIMARY KEY,
    file_count    bigint NOT NULL,
    total_bytes   bigint NOT NULL
);
INSERT INTO totals SELECT production_id, count(*), sum(size) FROM files GROUP BY 1;
