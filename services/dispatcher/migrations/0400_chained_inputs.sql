-- Chained productions: productions whose jobs take other productions'
-- output files as input, created as those files arrive.
-- A chained production stays open (`inputs_complete` false) until every
-- parent ended and delivered every output; `inputs_note` says what it
-- processed when a parent did not complete.
ALTER TABLE productions ADD COLUMN inputs_complete boolean NOT NULL DEFAULT true,
                        ADD COLUMN inputs_note text NOT NULL DEFAULT '';
-- Output files of finished jobs (from `job.output`) of productions a chained
-- profile may take input from, so a production chained after them finds
-- the files delivered before it was recorded.
CREATE TABLE delivered_files (
    production_id text NOT NULL,
    lfn           text NOT NULL,
    url           text NOT NULL,
    metadata      jsonb NOT NULL,
    seq           bigserial,
    PRIMARY KEY (production_id, lfn)
);
-- The jobs whose `job.output` was taken: a parent has delivered everything
-- once as many are here as it has DONE jobs.
CREATE TABLE delivered_jobs (
    production_id text NOT NULL,
    job_index     bigint NOT NULL,
    PRIMARY KEY (production_id, job_index)
);
-- Which productions a chained one takes its inputs from, with the metadata
-- conditions a file must meet.
CREATE TABLE chain_links (
    child      text NOT NULL REFERENCES productions,
    parent     text NOT NULL,
    conditions jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (child, parent)
);
CREATE INDEX chain_links_by_parent ON chain_links (parent);
-- Each input file of a chained production, once: the key (child, lfn) is
-- what makes a file used exactly once under redelivery and crashes.
-- `job_index` is the job that took it (NULL while it waits for one).
CREATE TABLE chain_inputs (
    child     text NOT NULL,
    lfn       text NOT NULL,
    parent    text NOT NULL,
    url       text NOT NULL,
    metadata  jsonb NOT NULL,
    seq       bigserial,
    job_index bigint,
    PRIMARY KEY (child, lfn)
);
CREATE INDEX chain_inputs_waiting ON chain_inputs (child, seq) WHERE job_index IS NULL;
CREATE INDEX chain_inputs_by_job ON chain_inputs (child, job_index) WHERE job_index IS NOT NULL;
CREATE INDEX productions_waiting_for_input ON productions (production_id)
    WHERE NOT inputs_complete AND state = 'RUNNING';
