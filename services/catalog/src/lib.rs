//! Catalog: every file a production wrote, with its LFN, size, adler32,
//! storage URL and metadata, registered from `job.output` events (an LFN is
//! registered once, however often the event arrives), and a record per
//! finished production. `FindFiles` answers by production and metadata.

use std::collections::HashMap;

use anyhow::Context;
use prodsys_core::ProductionState;
use prodsys_core::Violation;
use prodsys_core::events::{JOB_OUTPUT, PRODUCTION_COMPLETED};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "catalog";

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "files and production records",
        sql: r#"
        CREATE TABLE files (
            lfn           text PRIMARY KEY,
            production_id text NOT NULL,
            job_index     bigint NOT NULL,
            attempt       integer NOT NULL,
            size          bigint NOT NULL,
            adler32       text NOT NULL,
            url           text NOT NULL,
            metadata      jsonb NOT NULL DEFAULT '{}',
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX files_production ON files (production_id, lfn);
        CREATE INDEX files_metadata ON files USING gin (metadata jsonb_path_ops);
        CREATE TABLE productions (
            production_id text PRIMARY KEY,
            state         text NOT NULL,
            file_count    bigint NOT NULL,
            total_bytes   bigint NOT NULL,
            completed_at  timestamptz NOT NULL DEFAULT now()
        );
    "#,
    },
    Migration {
        version: 2,
        name: "running totals per production",
        // Kept with every registration, so a production's record reads one
        // row however many files it has, and is right whichever of several
        // consumers commits last.
        sql: "CREATE TABLE totals (
                  production_id text PRIMARY KEY,
                  file_count    bigint NOT NULL,
                  total_bytes   bigint NOT NULL
              );
              INSERT INTO totals SELECT production_id, count(*), sum(size) FROM files GROUP BY 1;",
    },
];

/// Consumers of the catalog's queue: registrations commute (running totals,
/// files by unique LFN), so two batches may be written at once.
const CONSUMERS: usize = 2;

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
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
        },
        CONSUMERS,
        &shutdown,
    );
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::catalog_service_server::CatalogServiceServer::new(CatalogApi {
            db: foundation.db.clone(),
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
        register_files(&tx, &files).await?;
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
        .map(|(_, f)| serde_json::to_string(&f.metadata))
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

impl CatalogApi {
    /// What the catalog holds for each identity, in the order asked: one
    /// statement for all of them.
    async fn existing(
        &self,
        queries: &[pb::FindExistingRequest],
    ) -> Result<Vec<pb::FindExistingResponse>, Status> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let filters = queries
            .iter()
            .map(|q| serde_json::to_string(&q.metadata))
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let client = self.db.client().await.map_err(ServiceError::from)?;
        let rows = client
            .query_cached(
                "SELECT q.n, s.* FROM unnest($1::text[]) WITH ORDINALITY AS q (filter, n)
                 CROSS JOIN LATERAL (
                     SELECT count(*), COALESCE(sum(size), 0)::bigint,
                            COALESCE(array_agg(DISTINCT production_id), '{}'),
                            (SELECT COALESCE(array_agg(lfn), '{}') FROM
                                (SELECT lfn FROM files WHERE metadata @> q.filter::jsonb
                                 ORDER BY lfn LIMIT 3) AS e)
                     FROM files WHERE metadata @> q.filter::jsonb) AS s
                 ORDER BY q.n",
                &[&filters],
            )
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        Ok(rows
            .iter()
            .map(|row| pb::FindExistingResponse {
                file_count: row.get::<_, i64>(1) as u64,
                total_bytes: row.get::<_, i64>(2) as u64,
                production_ids: row.get(3),
                example_lfns: row.get(4),
            })
            .collect())
    }
}

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for CatalogApi {
    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn find_files(
        &self,
        request: Request<pb::FindFilesRequest>,
    ) -> Result<Response<pb::FindFilesResponse>, Status> {
        let r = request.into_inner();
        if r.production_id.is_empty() && r.metadata.is_empty() {
            return Err(ServiceError::Validation(vec![Violation::new(
                "production_id",
                "give a production ID or at least one metadata pair",
            )])
            .into());
        }
        let page_size = match r.page_size {
            0 => 1000,
            n => n.min(10_000),
        } as i64;
        let filter =
            serde_json::to_value(&r.metadata).map_err(|e| ServiceError::Unexpected(e.into()))?;
        let client = self.db.client().await.map_err(ServiceError::from)?;
        let rows = client
            .query_cached(
                "SELECT lfn, size, adler32, url, metadata, production_id, job_index FROM files
                 WHERE ($1 = '' OR production_id = $1) AND metadata @> $2 AND lfn > $3
                 ORDER BY lfn LIMIT $4",
                &[&r.production_id, &filter, &r.page_token, &(page_size + 1)],
            )
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let more = rows.len() as i64 > page_size;
        let files: Vec<pb::OutputFile> = rows
            .iter()
            .take(page_size as usize)
            .map(|row| pb::OutputFile {
                lfn: row.get(0),
                size: row.get::<_, i64>(1) as u64,
                adler32: row.get(2),
                url: row.get(3),
                metadata: serde_json::from_value::<HashMap<String, String>>(row.get(4))
                    .unwrap_or_default(),
                production_id: row.get(5),
                job_index: row.get::<_, i64>(6) as u64,
            })
            .collect();
        let next_page_token = if more {
            files.last().map(|f| f.lfn.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::FindFilesResponse {
            files,
            next_page_token,
        }))
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
        let violations: Vec<Violation> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| check_file(i, f))
            .collect();
        if !violations.is_empty() {
            return Err(ServiceError::Validation(violations).into());
        }
        let mut client = self.db.client().await.map_err(ServiceError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let with_attempt: Vec<(u32, pb::OutputFile)> = files.into_iter().map(|f| (0, f)).collect();
        let registered = register_files(&tx, &with_attempt)
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
