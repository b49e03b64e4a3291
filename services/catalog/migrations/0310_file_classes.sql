-- Files by class: what the files of one simulation share, kept once.
-- The files of a production differ in little but their run: a CTA
-- production's hundred files are two classes (one per NSB level), each
-- with one set of metadata. Queries and the existence check read classes
-- (one row for a hundred files, in memory even with ten million files)
-- instead of files spread over a table larger than memory, where each
-- file of a first page was a heap page of its own (59 ms cold) and the
-- existence check compared every file of a pointing. A file keeps its own
-- per-file values (`own`: the profiles' run keys) beside its class, and
-- the covering index of a class's files in LFN order answers a page
-- without reading the table. `metadata` stays on each file as it was
-- registered: the class's metadata and `own` together are exactly it.
-- file_count, total_bytes, max_run, first_lfns (the three first in LFN
-- order), min_lfn and max_lfn are kept by registration.
CREATE TABLE file_classes (
    class_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    production_id text NOT NULL,
    metadata      jsonb NOT NULL,
    file_count    bigint NOT NULL DEFAULT 0,
    total_bytes   bigint NOT NULL DEFAULT 0,
    max_run       bigint,
    first_lfns    text[] NOT NULL DEFAULT '{}',
    min_lfn       text,
    max_lfn       text
) WITH (fillfactor = 80);
CREATE UNIQUE INDEX file_classes_identity ON file_classes (production_id, md5(metadata::text));

ALTER TABLE files ADD COLUMN class_id bigint, ADD COLUMN own jsonb NOT NULL DEFAULT '{}';

-- Files registered before classes: their run key is the shipped profiles'.
INSERT INTO file_classes (production_id, metadata, file_count, total_bytes, max_run,
                          first_lfns, min_lfn, max_lfn)
SELECT production_id, metadata - 'run_number', count(*), sum(size),
       max(CASE WHEN jsonb_typeof(metadata -> 'run_number') = 'number'
                THEN (metadata ->> 'run_number')::numeric END)::bigint,
       (array_agg(lfn ORDER BY lfn))[1:3], min(lfn), max(lfn)
FROM files
GROUP BY production_id, metadata - 'run_number';
UPDATE files f
SET class_id = c.class_id,
    own = CASE WHEN f.metadata ? 'run_number'
               THEN jsonb_build_object('run_number', f.metadata -> 'run_number')
               ELSE '{}' END
FROM file_classes c
WHERE c.production_id = f.production_id AND c.metadata = f.metadata - 'run_number';
ALTER TABLE files ALTER COLUMN class_id SET NOT NULL;

-- A class's files in LFN order with everything a page gives of them.
CREATE INDEX files_class ON files (class_id, lfn) INCLUDE (size, adler32, url, job_index, own);

-- Classes as queries find them: by production, by their metadata (any
-- containment), by a CTA simulation's identity (the existence check), and
-- in LFN order (first pages): all of them, by particle, and by particle
-- and NSB level.
CREATE INDEX file_classes_production ON file_classes (production_id, min_lfn);
CREATE INDEX file_classes_lfn ON file_classes (min_lfn);
CREATE INDEX file_classes_metadata ON file_classes USING gin (metadata jsonb_path_ops);
CREATE INDEX file_classes_cta_identity ON file_classes ((metadata -> 'MCCampaign'), (metadata -> 'array_layout'),
                                                       (metadata -> 'particle'), (metadata -> 'site'),
                                                       (metadata -> 'thetaP'), (metadata -> 'phiP'));
CREATE INDEX file_classes_particle_lfn ON file_classes ((metadata -> 'particle'), min_lfn);
CREATE INDEX file_classes_particle_nsb_lfn ON file_classes ((metadata -> 'particle'), (metadata -> 'nsb'), min_lfn);

-- The indexes of files' metadata that classes now answer for: each file
-- written paid for four of them.
DROP INDEX files_metadata;
DROP INDEX files_particle_lfn;
DROP INDEX files_cta_identity;
DROP INDEX files_particle_nsb_lfn;
