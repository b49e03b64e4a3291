-- Parent and child productions.
-- A chained production names the production it takes its inputs from in
-- its parameters (`input_production`, or whichever parameter its profile's
-- `inputs.production` names). When its request.accepted is kept, every
-- parameter value that is the ID of a production the catalog knows is a
-- link from that parent; the record lists both ends.
CREATE TABLE production_links (
    parent_id text NOT NULL,
    child_id  text NOT NULL,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX production_links_child ON production_links (child_id, parent_id);
INSERT INTO production_links (parent_id, child_id)
SELECT DISTINCT e.value, c.production_id
FROM accepted_requests c
CROSS JOIN LATERAL jsonb_each_text(c.parameters) AS e
JOIN accepted_requests p ON p.production_id = e.value
WHERE p.production_id <> c.production_id;
