-- ID sequences by prefix.
-- A production ID is its profile's id_prefix and a number, but the numbers
-- came from one sequence per VO: two VOs of one profile could be given the
-- same ID. Each prefix now has its own sequence. It starts past every number
-- its IDs already carry (every ID issued is in productions) and past the
-- counter of every VO that has used the prefix (each of its numbers came from
-- one of those), so no ID is ever issued twice.
CREATE TABLE id_prefix_sequences (
    id_prefix text PRIMARY KEY,
    last      bigint NOT NULL
);
INSERT INTO id_prefix_sequences (id_prefix, last)
SELECT p.id_prefix, greatest(max(p.number), coalesce(max(s.last), 0))
FROM (SELECT substring(production_id FROM '^(.*)-[0-9]+$') AS id_prefix,
             substring(production_id FROM '-([0-9]+)$')::bigint AS number,
             vo
      FROM productions
      WHERE production_id ~ '^.+-[0-9]+$') p
LEFT JOIN id_sequences s ON s.vo = p.vo
GROUP BY p.id_prefix;
-- The VO counters are no longer read nor written.
DROP TABLE id_sequences;
