//! Every SQL statement of the catalog.

use anyhow::Context;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Cached, Db};
use prodsys_proto as pb;

use crate::domain::{self, ExistingColumns, FileQuery, KeyTypes};

/// Registers `files` (with the attempt that wrote them), their metadata
/// typed as the profiles declare; returns how many were new.
pub async fn register_files(
    tx: &Transaction<'_>,
    types: &KeyTypes,
    files: &[(u32, pb::OutputFile)],
) -> anyhow::Result<u64> {
    if files.is_empty() {
        return Ok(0);
    }
    let lfns: Vec<&str> = files.iter().map(|(_, f)| f.lfn.as_str()).collect();
    let productions: Vec<&str> = files
        .iter()
        .map(|(_, f)| f.production_id.as_str())
        .collect();
    let jobs: Vec<i64> = files.iter().map(|(_, f)| f.job_index as i64).collect();
    let attempts: Vec<i32> = files.iter().map(|(a, _)| *a as i32).collect();
    let sizes: Vec<i64> = files.iter().map(|(_, f)| f.size as i64).collect();
    let sums: Vec<&str> = files.iter().map(|(_, f)| f.adler32.as_str()).collect();
    let urls: Vec<&str> = files.iter().map(|(_, f)| f.url.as_str()).collect();
    // As JSON text, cast by the server: one string per file instead of a
    // tree of values (a batch holds tens of thousands of files).
    let metadata: Vec<String> = files
        .iter()
        .map(|(_, f)| serde_json::to_string(&types.lenient(&f.metadata)))
        .collect::<Result<_, _>>()?;
    let stmt = tx
        .prepare_cached(
            "WITH added AS (
                 INSERT INTO files (lfn, production_id, job_index, attempt, size, adler32, url, metadata)
                 SELECT lfn, production_id, job_index, attempt, size, adler32, url, metadata::jsonb
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::bigint[],
                             $6::text[], $7::text[], $8::text[])
                      AS f(lfn, production_id, job_index, attempt, size, adler32, url, metadata)
                 ON CONFLICT (lfn) DO NOTHING
                 RETURNING production_id, size),
             -- In production order: concurrent batches lock totals rows alike.
             counted AS (
                 INSERT INTO totals (production_id, file_count, total_bytes)
                 SELECT production_id, count(*), sum(size) FROM added GROUP BY production_id
                 ORDER BY production_id
                 ON CONFLICT (production_id) DO UPDATE SET
                     file_count = totals.file_count + EXCLUDED.file_count,
                     total_bytes = totals.total_bytes + EXCLUDED.total_bytes)
             SELECT count(*) FROM added",
        )
        .await?;
    let added: i64 = tx
        .query_one(
            &stmt,
            &[
                &lfns,
                &productions,
                &jobs,
                &attempts,
                &sizes,
                &sums,
                &urls,
                &metadata,
            ],
        )
        .await
        .context("registering files")?
        .get(0);
    tracing::debug!(files = files.len(), added, "files registered");
    Ok(added as u64)
}

/// Writes the record of a finished production (once) with its running totals.
pub async fn record_completed(
    tx: &Transaction<'_>,
    production_id: &str,
    state: &str,
) -> anyhow::Result<()> {
    tx.execute_cached(
        "INSERT INTO productions (production_id, state, file_count, total_bytes)
         SELECT $1, $2, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0)
         FROM (SELECT) AS one LEFT JOIN totals t ON t.production_id = $1
         ON CONFLICT (production_id) DO NOTHING",
        &[&production_id, &state],
    )
    .await?;
    Ok(())
}

/// Up to `page_size` files of `query` after LFN `after`, in LFN order, and
/// whether more follow.
pub async fn files_page(
    db: &Db,
    query: &FileQuery,
    after: &str,
    page_size: u32,
) -> anyhow::Result<(Vec<pb::OutputFile>, bool)> {
    let limit = i64::from(page_size) + 1;
    let client = db.client().await?;
    let select = "SELECT lfn, size, adler32, url, metadata, production_id, job_index FROM files
                  WHERE ($1 = '' OR production_id = $1) AND metadata @> $2
                    AND lfn >= $3 AND starts_with(lfn, $3) AND lfn > $4";
    let rows = match &query.path {
        // Two statements: a path of `true` would lead the planner to a
        // scan of the whole index.
        Some(path) => {
            client
                .query_cached(
                    &format!("{select} AND metadata @@ $6::text::jsonpath ORDER BY lfn LIMIT $5"),
                    &[
                        &query.production_id,
                        &query.equal,
                        &query.lfn_prefix,
                        &after,
                        &limit,
                        path,
                    ],
                )
                .await
        }
        None => {
            client
                .query_cached(
                    &format!("{select} ORDER BY lfn LIMIT $5"),
                    &[
                        &query.production_id,
                        &query.equal,
                        &query.lfn_prefix,
                        &after,
                        &limit,
                    ],
                )
                .await
        }
    }?;
    let more = rows.len() as i64 > i64::from(page_size);
    let files = rows
        .iter()
        .take(page_size as usize)
        .map(|row| pb::OutputFile {
            lfn: row.get(0),
            size: row.get::<_, i64>(1) as u64,
            adler32: row.get(2),
            url: row.get(3),
            metadata: domain::as_text(row.get(4)),
            production_id: row.get(5),
            job_index: row.get::<_, i64>(6) as u64,
        })
        .collect();
    Ok((files, more))
}

/// What the catalog holds for each identity, in the order asked: one
/// statement for all of them.
pub async fn existing(
    db: &Db,
    columns: &ExistingColumns,
) -> anyhow::Result<Vec<pb::FindExistingResponse>> {
    let client = db.client().await?;
    let [required, path, keys, if_present, ranges, run] = columns;
    let rows = client
        .query_cached(
            "SELECT q.n, s.*,
                    (SELECT COALESCE(array_agg(lfn), '{}') FROM
                        (SELECT lfn FROM files WHERE metadata @> q.required AND metadata @@ q.path
                         ORDER BY lfn LIMIT 3) AS e)
             FROM (SELECT n, required::jsonb AS required, path::jsonpath AS path, keys::jsonb AS keys,
                          if_present::jsonb AS if_present, ranges::jsonb AS ranges, run_key
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                        WITH ORDINALITY AS u (required, path, keys, if_present, ranges, run_key, n)) AS q
             CROSS JOIN LATERAL (
                 SELECT count(*) FILTER (WHERE m),
                        COALESCE(sum(size) FILTER (WHERE m), 0)::bigint,
                        COALESCE(array_agg(DISTINCT production_id) FILTER (WHERE m), '{}'),
                        COALESCE(array_agg(DISTINCT missing) FILTER (WHERE m AND missing <> ''), '{}'),
                        COALESCE(max(run) FILTER (WHERE m), 0)::bigint,
                        COALESCE(array_agg(DISTINCT production_id) FILTER (WHERE NOT m), '{}'),
                        COALESCE(array_agg(DISTINCT differ) FILTER (WHERE NOT m AND differ <> ''), '{}')
                 FROM (SELECT production_id, size, m,
                              CASE WHEN m AND jsonb_typeof(metadata -> q.run_key) = 'number'
                                   THEN (metadata ->> q.run_key)::numeric END AS run,
                              CASE WHEN m THEN array_to_string(ARRAY(
                                  SELECT k FROM jsonb_array_elements_text(q.keys) AS k
                                  WHERE NOT metadata ? k), ',') END AS missing,
                              CASE WHEN NOT m THEN array_to_string(ARRAY(
                                  SELECT e.key FROM jsonb_each(q.if_present) AS e
                                  WHERE metadata -> e.key <> e.value
                                  UNION ALL
                                  SELECT r ->> 'label' FROM jsonb_array_elements(q.ranges) AS r
                                  WHERE jsonb_typeof(metadata -> (r ->> 'min_key')) = 'number'
                                    AND jsonb_typeof(metadata -> (r ->> 'max_key')) = 'number'
                                    AND NOT ((metadata ->> (r ->> 'min_key'))::numeric < (r ->> 'max')::numeric
                                         AND (r ->> 'min')::numeric < (metadata ->> (r ->> 'max_key'))::numeric)
                                  ), ',') END AS differ
                       FROM (SELECT production_id, size, metadata,
                                    COALESCE(metadata @@ q.path, false) AS m
                             FROM files WHERE metadata @> q.required) AS f) AS f) AS s
             ORDER BY q.n",
            &[required, path, keys, if_present, ranges, run],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| pb::FindExistingResponse {
            file_count: row.get::<_, i64>(1) as u64,
            total_bytes: row.get::<_, i64>(2) as u64,
            production_ids: row.get(3),
            missing_keys: domain::merge_key_lists(row.get(4)),
            last_run: row.get::<_, i64>(5).max(0) as u64,
            differing_production_ids: row.get(6),
            differing_keys: domain::merge_key_lists(row.get(7)),
            example_lfns: row.get(8),
        })
        .collect())
}

/// A finished production's record.
pub struct ProductionRecord {
    pub state: String,
    pub file_count: i64,
    pub total_bytes: i64,
    pub completed: chrono::DateTime<chrono::Utc>,
}

/// The record of `production_id`, if it finished.
pub async fn production_record(
    db: &Db,
    production_id: &str,
) -> anyhow::Result<Option<ProductionRecord>> {
    let client = db.client().await?;
    let row = client
        .query_opt_cached(
            // The running totals, not the snapshot taken at completion: a
            // file registered after (a late batch, RegisterFiles) counts.
            "SELECT p.state, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0), p.completed_at
             FROM productions p LEFT JOIN totals t USING (production_id)
             WHERE p.production_id = $1",
            &[&production_id],
        )
        .await?;
    Ok(row.map(|row| ProductionRecord {
        state: row.get(0),
        file_count: row.get(1),
        total_bytes: row.get(2),
        completed: row.get(3),
    }))
}
