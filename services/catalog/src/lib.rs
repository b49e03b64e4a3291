//! Catalog: every file a production wrote, with its LFN, size, adler32,
//! storage URL and metadata, registered from `job.output` events (an LFN is
//! registered once, however often the event arrives), and a record per
//! finished production. Metadata values are stored as the types the profiles
//! declare for their keys (numbers as JSON numbers), so they compare as
//! numbers. `FindFiles`/`StreamFiles` answer typed conditions, an LFN prefix,
//! a production and a dataset; `FindExisting(Many)` tells the checker what is
//! held of an identity, which keys files lack or differ in, and the last run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProductionState;
use prodsys_core::ProfileSet;
use prodsys_core::Violation;
use prodsys_core::events::{JOB_OUTPUT, PRODUCTION_COMPLETED};
use prodsys_core::profile::{MetadataType, float_value};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "catalog";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_files_and_production_records.sql",
    "0002_running_totals_per_production.sql",
    "0020_numeric_metadata_as_numbers.sql",
];

/// Consumers of the catalog's queue: registrations commute (running totals,
/// files by unique LFN), so two batches may be written at once.
const CONSUMERS: usize = 2;

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let profiles = ProfileSet::load_dir(&settings.profiles_dir)
        .context("loading production profiles (for the types of metadata keys)")?;
    let types = Arc::new(KeyTypes(profiles.metadata_types().map_err(|e| {
        anyhow::anyhow!("profiles in {}: {e}", settings.profiles_dir.display())
    })?));
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[JOB_OUTPUT, PRODUCTION_COMPLETED],
        &[],
        &shutdown,
    )
    .await?;
    // A job.output carries many files (a CTA job writes one per NSB level,
    // a bulk registration hundreds): a quarter of the usual prefetch and batch
    // keeps a batch's files, decoded and encoded, to a few megabytes.
    let mut consuming = settings.clone();
    consuming.amqp.prefetch = (settings.amqp.prefetch / 4).max(1);
    consuming.amqp.batch_size = (settings.amqp.batch_size / 4).max(1);
    foundation.consume_concurrently(
        &consuming,
        Registrar {
            db: foundation.db.clone(),
            types: types.clone(),
        },
        CONSUMERS,
        &shutdown,
    );
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::catalog_service_server::CatalogServiceServer::new(CatalogApi {
            db: foundation.db.clone(),
            types,
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.catalog.port,
            routes,
            reporter,
            &["prodsys.v1.CatalogService"],
            &shutdown,
        )
        .await
}

struct Registrar {
    db: Db,
    types: Arc<KeyTypes>,
}

enum Record {
    Output(pb::JobOutput),
    Completed(pb::ProductionCompleted),
}

impl BatchHandler for Registrar {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut records = Vec::new();
        for incoming in batch {
            let decoded = match incoming.routing_key.as_str() {
                JOB_OUTPUT => decode_event(incoming).map(|(id, m)| (id, Record::Output(m))),
                PRODUCTION_COMPLETED => {
                    decode_event(incoming).map(|(id, m)| (id, Record::Completed(m)))
                }
                other => Err(format!("catalog does not handle {other:?}")),
            };
            match decoded {
                Ok(r) => {
                    records.push(r);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<Uuid> = records.iter().map(|(id, _)| *id).collect();
        let mut fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut files = Vec::new();
        let mut completed = Vec::new();
        for (id, record) in records {
            // Taken once: the same event twice in one batch takes effect once.
            if !fresh.remove(&id) {
                continue;
            }
            match record {
                Record::Output(output) => {
                    files.extend(output.files.into_iter().map(|f| (output.attempt, f)))
                }
                Record::Completed(c) => completed.push(c),
            }
        }
        register_files(&tx, &self.types, &files).await?;
        for c in completed {
            let state =
                ProductionState::from_proto(c.state).map_or("UNKNOWN", ProductionState::as_str);
            tx.execute_cached(
                "INSERT INTO productions (production_id, state, file_count, total_bytes)
                 SELECT $1, $2, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0)
                 FROM (SELECT) AS one LEFT JOIN totals t ON t.production_id = $1
                 ON CONFLICT (production_id) DO NOTHING",
                &[&c.production_id, &state],
            )
            .await?;
            tracing::info!(production_id = %c.production_id, %state, "production record written");
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// Registers `files` (with the attempt that wrote them); returns how many were new.
async fn register_files(
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

struct CatalogApi {
    db: Db,
    types: Arc<KeyTypes>,
}

/// Why a file from elsewhere cannot be registered, by field.
fn check_file(index: usize, f: &pb::OutputFile) -> Vec<Violation> {
    let field = |name: &str| format!("files[{index}].{name}");
    let mut violations = Vec::new();
    if !f.lfn.starts_with('/') || f.lfn.len() > 1024 {
        violations.push(Violation::new(
            field("lfn"),
            "must be an absolute path of at most 1024 characters",
        ));
    }
    if f.adler32.len() != 8
        || !f
            .adler32
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        violations.push(Violation::new(
            field("adler32"),
            "must be 8 lowercase hex digits",
        ));
    }
    if f.url.is_empty() {
        violations.push(Violation::new(field("url"), "is required"));
    }
    violations
}

/// Most identities one FindExistingMany call may ask about.
const MAX_EXISTING_QUERIES: usize = 1000;

/// The type of every metadata key the profiles declare.
struct KeyTypes(BTreeMap<String, MetadataType>);

impl KeyTypes {
    /// `value` of `key` as its declared type; `Ok(None)` for a key no
    /// profile declares.
    fn typed(&self, key: &str, value: &str) -> Result<Option<Value>, String> {
        match self.0.get(key) {
            Some(t) => t.parse(value).map(Some),
            None => Ok(None),
        }
    }

    /// Metadata as stored: declared keys typed, a value that is not of its
    /// key's type (or a key no profile declares) kept as a string.
    fn lenient(&self, metadata: &HashMap<String, String>) -> Map<String, Value> {
        metadata
            .iter()
            .map(|(k, v)| {
                let value = self
                    .typed(k, v)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Value::String(v.clone()));
                (k.clone(), value)
            })
            .collect()
    }

    /// Metadata typed strictly: a violation per value not of its key's type.
    fn strict(
        &self,
        field: &str,
        metadata: &HashMap<String, String>,
        violations: &mut Vec<Violation>,
    ) -> Map<String, Value> {
        let mut typed = Map::new();
        for (k, v) in metadata {
            match self.typed(k, v) {
                Ok(value) => {
                    typed.insert(k.clone(), value.unwrap_or_else(|| Value::String(v.clone())));
                }
                Err(e) => violations.push(Violation::new(
                    format!("{field}.{k}"),
                    format!("{e}; {k} is a {} key", self.0[k].as_str()),
                )),
            }
        }
        typed
    }

    /// A query's value: the key must be declared and the value of its type.
    fn condition_value(&self, field: &str, key: &str, value: &str) -> Result<Value, Violation> {
        match self.0.get(key) {
            None => Err(Violation::new(
                field,
                format!(
                    "no profile declares metadata key {key:?}; known keys: {}",
                    self.0.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
            Some(t) => t
                .parse(value)
                .map_err(|e| Violation::new(field, format!("{e}; {key} is a {} key", t.as_str()))),
        }
    }
}

/// A SQL/JSON path literal for `key`'s value: `$."key"`.
fn path_key(key: &str) -> String {
    format!("$.{}", Value::String(key.to_string()))
}

/// A file query as SQL parameters: containment for equalities (the GIN
/// index), a SQL/JSON path predicate for everything else.
struct FileQuery {
    production_id: String,
    equal: Value,
    path: Option<String>,
    lfn_prefix: String,
}

/// Most files in one page (and one streamed message).
const MAX_PAGE: u32 = 10_000;

impl CatalogApi {
    /// Checks a FindFiles request and turns it into a query, or every
    /// reason it cannot be answered, by field.
    fn file_query(&self, r: &pb::FindFilesRequest) -> Result<FileQuery, ServiceError> {
        let mut violations = Vec::new();
        let mut equal = Map::new();
        let mut path = Vec::new();
        for (key, value) in &r.metadata {
            match self
                .types
                .condition_value(&format!("metadata.{key}"), key, value)
            {
                Ok(v) => {
                    equal.insert(key.clone(), v);
                }
                Err(v) => violations.push(v),
            }
        }
        if !r.dataset.is_empty() {
            match self.types.condition_value("dataset", "dataset", &r.dataset) {
                Ok(v) => {
                    equal.insert("dataset".into(), v);
                }
                Err(v) => violations.push(v),
            }
        }
        for (i, c) in r.conditions.iter().enumerate() {
            let field = |name: &str| format!("conditions[{i}].{name}");
            let operator = pb::ConditionOperator::try_from(c.operator)
                .unwrap_or(pb::ConditionOperator::Unspecified);
            let symbol = match operator {
                pb::ConditionOperator::Unspecified => {
                    violations.push(Violation::new(
                        field("operator"),
                        "give one of =, !=, in, <, <=, >, >=",
                    ));
                    continue;
                }
                pb::ConditionOperator::Eq | pb::ConditionOperator::In => "==",
                pb::ConditionOperator::Ne => "!=",
                pb::ConditionOperator::Lt => "<",
                pb::ConditionOperator::Le => "<=",
                pb::ConditionOperator::Gt => ">",
                pb::ConditionOperator::Ge => ">=",
            };
            let several = operator == pb::ConditionOperator::In;
            if c.values.is_empty() || (!several && c.values.len() != 1) {
                violations.push(Violation::new(
                    field("values"),
                    if several {
                        "give at least one value".to_string()
                    } else {
                        format!("give exactly one value, not {}", c.values.len())
                    },
                ));
                continue;
            }
            let mut terms = Vec::new();
            for (j, text) in c.values.iter().enumerate() {
                let which = if several {
                    format!("conditions[{i}].values[{j}]")
                } else {
                    field("values")
                };
                let which = if self.types.0.contains_key(&c.key) {
                    which
                } else {
                    field("key")
                };
                match self.types.condition_value(&which, &c.key, text) {
                    Ok(v) => terms.push(format!("{} {symbol} {v}", path_key(&c.key))),
                    Err(v) => {
                        violations.push(v);
                        break;
                    }
                }
            }
            if terms.len() == c.values.len() {
                path.push(format!("({})", terms.join(" || ")));
            }
        }
        if r.production_id.is_empty()
            && r.lfn_prefix.is_empty()
            && equal.is_empty()
            && path.is_empty()
            && violations.is_empty()
        {
            violations.push(Violation::new(
                "production_id",
                "give a production ID, a dataset, an LFN prefix or at least one metadata condition",
            ));
        }
        if !violations.is_empty() {
            return Err(ServiceError::Validation(violations));
        }
        Ok(FileQuery {
            production_id: r.production_id.clone(),
            equal: Value::Object(equal),
            path: (!path.is_empty()).then(|| path.join(" && ")),
            lfn_prefix: r.lfn_prefix.clone(),
        })
    }

    /// One page of `query`'s files after LFN `after`.
    async fn page(
        &self,
        query: &FileQuery,
        after: &str,
        page_size: u32,
    ) -> Result<pb::FindFilesResponse, ServiceError> {
        let limit = i64::from(page_size) + 1;
        let client = self.db.client().await?;
        let select = "SELECT lfn, size, adler32, url, metadata, production_id, job_index FROM files
                      WHERE ($1 = '' OR production_id = $1) AND metadata @> $2
                        AND lfn >= $3 AND starts_with(lfn, $3) AND lfn > $4";
        let rows = match &query.path {
            // Two statements: a path of `true` would lead the planner to a
            // scan of the whole index.
            Some(path) => {
                client
                    .query_cached(
                        &format!(
                            "{select} AND metadata @@ $6::text::jsonpath ORDER BY lfn LIMIT $5"
                        ),
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
        }
        .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let more = rows.len() as i64 > i64::from(page_size);
        let files: Vec<pb::OutputFile> = rows
            .iter()
            .take(page_size as usize)
            .map(|row| pb::OutputFile {
                lfn: row.get(0),
                size: row.get::<_, i64>(1) as u64,
                adler32: row.get(2),
                url: row.get(3),
                metadata: as_text(row.get(4)),
                production_id: row.get(5),
                job_index: row.get::<_, i64>(6) as u64,
            })
            .collect();
        let next_page_token = if more {
            files.last().map(|f| f.lfn.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::FindFilesResponse {
            files,
            next_page_token,
        })
    }

    /// What the catalog holds for each identity, in the order asked: one
    /// statement for all of them.
    async fn existing(
        &self,
        queries: &[pb::FindExistingRequest],
    ) -> Result<Vec<pb::FindExistingResponse>, Status> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let mut violations = Vec::new();
        let mut columns: [Vec<String>; 6] = Default::default();
        for (i, q) in queries.iter().enumerate() {
            let required = self.types.strict(
                &format!("queries[{i}].metadata"),
                &q.metadata,
                &mut violations,
            );
            let if_present = self.types.strict(
                &format!("queries[{i}].if_present"),
                &q.if_present,
                &mut violations,
            );
            let mut path = Vec::new();
            let mut keys: Vec<&str> = Vec::new();
            for (key, value) in &if_present {
                let k = path_key(key);
                path.push(format!("(!(exists({k})) || {k} == {value})"));
                keys.push(key);
            }
            let mut ranges = Vec::new();
            for (j, r) in q.ranges.iter().enumerate() {
                if !(r.min.is_finite() && r.max.is_finite()) {
                    violations.push(Violation::new(
                        format!("queries[{i}].ranges[{j}]"),
                        "min and max must be numbers",
                    ));
                    continue;
                }
                let (lo, hi) = (path_key(&r.min_key), path_key(&r.max_key));
                let (min, max) = (float_value(r.min), float_value(r.max));
                path.push(format!(
                    "(!(exists({lo})) || !(exists({hi})) || ({lo} < {max} && {hi} > {min}))"
                ));
                keys.extend([r.min_key.as_str(), r.max_key.as_str()]);
                ranges.push(serde_json::json!({
                    "min_key": r.min_key, "max_key": r.max_key, "min": min, "max": max,
                    "label": format!("{}..{}", r.min_key, r.max_key),
                }));
            }
            if path.is_empty() {
                path.push("true".into());
            }
            let [c_required, c_path, c_keys, c_if_present, c_ranges, c_run] = &mut columns;
            c_required.push(Value::Object(required).to_string());
            c_path.push(path.join(" && "));
            c_keys.push(serde_json::to_string(&keys).unwrap_or_default());
            c_if_present.push(Value::Object(if_present).to_string());
            c_ranges.push(Value::Array(ranges).to_string());
            c_run.push(q.run_key.clone());
        }
        if !violations.is_empty() {
            return Err(ServiceError::Validation(violations).into());
        }
        let client = self.db.client().await.map_err(ServiceError::from)?;
        let [required, path, keys, if_present, ranges, run] = &columns;
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
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let split = |lists: Vec<String>| -> Vec<String> {
            let set: BTreeSet<String> = lists
                .iter()
                .flat_map(|l| l.split(','))
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect();
            set.into_iter().collect()
        };
        Ok(rows
            .iter()
            .map(|row| pb::FindExistingResponse {
                file_count: row.get::<_, i64>(1) as u64,
                total_bytes: row.get::<_, i64>(2) as u64,
                production_ids: row.get(3),
                missing_keys: split(row.get(4)),
                last_run: row.get::<_, i64>(5).max(0) as u64,
                differing_production_ids: row.get(6),
                differing_keys: split(row.get(7)),
                example_lfns: row.get(8),
            })
            .collect())
    }
}

/// Stored metadata as the API shows it: every value as text.
fn as_text(metadata: Value) -> HashMap<String, String> {
    match metadata {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => HashMap::new(),
    }
}

type FileStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::FindFilesResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for CatalogApi {
    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn find_files(
        &self,
        request: Request<pb::FindFilesRequest>,
    ) -> Result<Response<pb::FindFilesResponse>, Status> {
        let r = request.into_inner();
        let query = self.file_query(&r)?;
        let page_size = match r.page_size {
            0 => 1000,
            n => n.min(MAX_PAGE),
        };
        Ok(Response::new(
            self.page(&query, &r.page_token, page_size).await?,
        ))
    }

    type StreamFilesStream = FileStream;

    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn stream_files(
        &self,
        request: Request<pb::FindFilesRequest>,
    ) -> Result<Response<Self::StreamFilesStream>, Status> {
        let r = request.into_inner();
        let query = self.file_query(&r)?;
        let page_size = match r.page_size {
            0 => 5000,
            n => n.min(MAX_PAGE),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let api = CatalogApi {
            db: self.db.clone(),
            types: self.types.clone(),
        };
        tokio::spawn(async move {
            let mut after = r.page_token;
            loop {
                let page = api
                    .page(&query, &after, page_size)
                    .await
                    .map_err(Status::from);
                let last = match &page {
                    Ok(p) if !p.next_page_token.is_empty() => Some(p.next_page_token.clone()),
                    _ => None,
                };
                // A client that went away ends the stream.
                if tx.send(page).await.is_err() {
                    return;
                }
                match last {
                    Some(lfn) => after = lfn,
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn find_existing(
        &self,
        request: Request<pb::FindExistingRequest>,
    ) -> Result<Response<pb::FindExistingResponse>, Status> {
        let r = request.into_inner();
        if r.metadata.is_empty() {
            return Err(ServiceError::Validation(vec![Violation::new(
                "metadata",
                "give at least one pair",
            )])
            .into());
        }
        let mut found = self.existing(&[r]).await?;
        Ok(Response::new(found.pop().unwrap_or_default()))
    }

    async fn find_existing_many(
        &self,
        request: Request<pb::FindExistingManyRequest>,
    ) -> Result<Response<pb::FindExistingManyResponse>, Status> {
        let queries = request.into_inner().queries;
        let mut violations: Vec<Violation> = queries
            .iter()
            .enumerate()
            .filter(|(_, q)| q.metadata.is_empty())
            .map(|(i, _)| {
                Violation::new(format!("queries[{i}].metadata"), "give at least one pair")
            })
            .collect();
        if queries.len() > MAX_EXISTING_QUERIES {
            violations.push(Violation::new(
                "queries",
                format!(
                    "{} queries; at most {MAX_EXISTING_QUERIES} in one call",
                    queries.len()
                ),
            ));
        }
        if !violations.is_empty() {
            return Err(ServiceError::Validation(violations).into());
        }
        let results = self.existing(&queries).await?;
        Ok(Response::new(pb::FindExistingManyResponse { results }))
    }

    async fn register_files(
        &self,
        request: Request<pb::RegisterFilesRequest>,
    ) -> Result<Response<pb::RegisterFilesResponse>, Status> {
        let files = request.into_inner().files;
        let mut violations: Vec<Violation> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| check_file(i, f))
            .collect();
        // The same keys, typed the same way, as the files of productions.
        for (i, f) in files.iter().enumerate() {
            self.types.strict(
                &format!("files[{i}].metadata"),
                &f.metadata,
                &mut violations,
            );
        }
        if !violations.is_empty() {
            return Err(ServiceError::Validation(violations).into());
        }
        let mut client = self.db.client().await.map_err(ServiceError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let with_attempt: Vec<(u32, pb::OutputFile)> = files.into_iter().map(|f| (0, f)).collect();
        let registered = register_files(&tx, &self.types, &with_attempt)
            .await
            .map_err(ServiceError::from)?;
        tx.commit()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        Ok(Response::new(pb::RegisterFilesResponse { registered }))
    }

    async fn get_production_record(
        &self,
        request: Request<pb::GetProductionRecordRequest>,
    ) -> Result<Response<pb::ProductionRecord>, Status> {
        let production_id = request.into_inner().production_id;
        let client = self.db.client().await.map_err(ServiceError::from)?;
        let row = client
            .query_opt_cached(
                // The running totals, not the snapshot taken at completion: a
                // file registered after (a late batch, RegisterFiles) counts.
                "SELECT p.state, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0), p.completed_at
                 FROM productions p LEFT JOIN totals t USING (production_id)
                 WHERE p.production_id = $1",
                &[&production_id],
            )
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?
            .ok_or_else(|| ServiceError::NotFound(format!("no finished production {production_id} in the catalog")))?;
        let state = row
            .get::<_, &str>(0)
            .parse::<ProductionState>()
            .map_or(pb::ProductionState::Unspecified, ProductionState::to_proto);
        let completed: chrono::DateTime<chrono::Utc> = row.get(3);
        Ok(Response::new(pb::ProductionRecord {
            production_id,
            state: state as i32,
            file_count: row.get::<_, i64>(1) as u64,
            total_bytes: row.get::<_, i64>(2) as u64,
            completed_unix_ms: completed.timestamp_millis(),
        }))
    }
}
