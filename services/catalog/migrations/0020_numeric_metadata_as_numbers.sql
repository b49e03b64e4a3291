-- Numeric metadata as numbers.
-- Files registered before metadata had types carry every value as a
-- string: the numeric keys of the shipped profiles become numbers,
-- so they compare as numbers (registration types them from now on).
UPDATE files SET metadata = (
    SELECT jsonb_object_agg(key,
               CASE WHEN key = ANY (ARRAY['phiP', 'thetaP', 'nsb', 'energy_min', 'energy_max',
                                          'spectral_index', 'viewcone', 'core_scatter',
                                          'run_number', 'energy_min_gev', 'energy_max_gev'])
                         AND jsonb_typeof(value) = 'string'
                         AND value #>> '{}' ~ '^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$'
                    THEN to_jsonb((value #>> '{}')::numeric)
                    ELSE value END)
    FROM jsonb_each(metadata))
WHERE metadata <> '{}'
  AND EXISTS (SELECT FROM jsonb_each(metadata) e
              WHERE jsonb_typeof(e.value) = 'string'
                AND e.key = ANY (ARRAY['phiP', 'thetaP', 'nsb', 'energy_min', 'energy_max',
                                       'spectral_index', 'viewcone', 'core_scatter',
                                       'run_number', 'energy_min_gev', 'energy_max_gev']));
