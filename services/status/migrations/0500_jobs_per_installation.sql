-- Jobs per installation.
-- The WMS installation each job's latest attempt was placed on ('' while
-- it waits to be placed, or for jobs recorded before this), and per
-- production, installation and state the jobs there: a federated
-- production's snapshot reads a handful of counters however large it is.
ALTER TABLE jobs ADD COLUMN installation text NOT NULL DEFAULT '',
                 ADD COLUMN prev_installation text;
CREATE TABLE installation_job_counts (
    production_id text NOT NULL,
    installation  text NOT NULL,
    state         text NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (production_id, installation, state)
);
