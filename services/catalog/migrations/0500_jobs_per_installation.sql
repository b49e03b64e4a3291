-- Jobs per installation.
-- Where a finished production's jobs ran: per WMS installation their
-- last attempt was placed on, the jobs in each final state, as
-- production.completed tells them (a production naming a group of
-- installations or `any` has several).
CREATE TABLE record_installations (
    production_id text NOT NULL,
    installation  text NOT NULL,
    state         text NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (production_id, installation, state)
);
