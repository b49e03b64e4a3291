-- Group members.
-- A production naming a group of installations (or `any`): the
-- installations its jobs may run on, as production.dispatched tells them.
-- It is held only while every one of them is failing.
CREATE TABLE production_members (
    production_id text NOT NULL,
    installation  text NOT NULL,
    PRIMARY KEY (production_id, installation)
);
