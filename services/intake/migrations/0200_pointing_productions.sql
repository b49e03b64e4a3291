-- A request that names an observation period becomes one production per
-- pointing: its verdict keeps what became of each (production, existing
-- production, or why not), as a JSON array; empty for other requests.
ALTER TABLE requests ADD COLUMN productions jsonb NOT NULL DEFAULT '[]';
