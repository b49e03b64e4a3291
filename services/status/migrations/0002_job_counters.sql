-- Job counters.
CREATE TABLE job_counts (
    production_id text NOT NULL,
    state         text NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (production_id, state)
);
INSERT INTO job_counts SELECT production_id, state, count(*) FROM jobs GROUP BY 1, 2;
