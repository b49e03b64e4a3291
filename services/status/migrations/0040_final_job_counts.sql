-- Final job counts.
-- The counts a production.completed carries: they cover jobs no
-- transition ever mentioned (a million cancelled before they started).
CREATE TABLE final_counts (
    production_id text NOT NULL,
    state         text NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (production_id, state)
);
