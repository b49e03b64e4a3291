-- A production is finished once the catalog announces production.forwarded,
-- which it now does for productions without destinations too (once every
-- output is catalogued). Productions that ended before that announcement
-- existed, without destinations, were finished when they ended: they stay so.
INSERT INTO forwarded (production_id)
SELECT production_id FROM productions p
WHERE state IN ('COMPLETED', 'PARTIALLY_COMPLETED', 'FAILED', 'CANCELLED', 'REJECTED')
  AND NOT EXISTS (SELECT FROM forward_plans f WHERE f.production_id = p.production_id)
ON CONFLICT DO NOTHING;
