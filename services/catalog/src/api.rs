//! The catalog's gRPC `CatalogService`: decode, call the domain, answer.

use std::sync::Arc;

use prodsys_core::{ProductionState, Violation};
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use tonic::{Request, Response, Status};

use crate::domain::{self, Condition, FileFilter, FileQuery, Identity, KeyTypes, Operator, Range};
use crate::error::{CatalogError, Result};
use crate::store;

#[derive(Clone)]
pub struct CatalogApi {
    pub db: Db,
    pub types: Arc<KeyTypes>,
    /// The keys of each index of metadata values and the LFN
    /// (`store::ordered_keys`).
    pub ordered_keys: Arc<Vec<Vec<String>>>,
}

fn operator(operator: i32) -> Option<Operator> {
    match pb::ConditionOperator::try_from(operator).unwrap_or(pb::ConditionOperator::Unspecified) {
        pb::ConditionOperator::Unspecified => None,
        pb::ConditionOperator::Eq => Some(Operator::Eq),
        pb::ConditionOperator::In => Some(Operator::In),
        pb::ConditionOperator::Ne => Some(Operator::Ne),
        pb::ConditionOperator::Lt => Some(Operator::Lt),
        pb::ConditionOperator::Le => Some(Operator::Le),
        pb::ConditionOperator::Gt => Some(Operator::Gt),
        pb::ConditionOperator::Ge => Some(Operator::Ge),
    }
}

fn identity(q: &pb::FindExistingRequest) -> Identity<'_> {
    Identity {
        metadata: &q.metadata,
        if_present: &q.if_present,
        ranges: q
            .ranges
            .iter()
            .map(|r| Range {
                min_key: &r.min_key,
                max_key: &r.max_key,
                min: r.min,
                max: r.max,
            })
            .collect(),
        run_key: &q.run_key,
    }
}

impl CatalogApi {
    /// A FindFiles request as a query, or every reason it cannot be answered.
    fn file_query(&self, r: &pb::FindFilesRequest) -> Result<FileQuery> {
        let filter = FileFilter {
            production_id: &r.production_id,
            dataset: &r.dataset,
            lfn_prefix: &r.lfn_prefix,
            metadata: &r.metadata,
            conditions: r
                .conditions
                .iter()
                .map(|c| Condition {
                    key: &c.key,
                    operator: operator(c.operator),
                    values: &c.values,
                })
                .collect(),
        };
        domain::file_query(&self.types, &filter, &self.ordered_keys).map_err(CatalogError::Invalid)
    }

    /// One page of `query`'s files after LFN `after`.
    async fn page(
        &self,
        query: &FileQuery,
        after: &str,
        page_size: u32,
        by_class: bool,
    ) -> Result<pb::FindFilesResponse> {
        let (mut files, more) =
            store::files_page(&self.db, query, after, page_size, by_class).await?;
        let token = next_page_token(&files, more);
        // The page is cut after the query (the token still follows the
        // last file read): a page may be short, never another VO's.
        if let Some(vos) = prodsys_auth::caller().visible_vos() {
            visible_only(&self.db, &vos, &mut files).await?;
        }
        Ok(response(files, token))
    }

    /// What the catalog holds for each identity, in the order asked.
    async fn existing(
        &self,
        queries: &[pb::FindExistingRequest],
    ) -> Result<Vec<pb::FindExistingResponse>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let identities: Vec<Identity<'_>> = queries.iter().map(identity).collect();
        let typed =
            domain::typed_identities(&self.types, &identities).map_err(CatalogError::Invalid)?;
        let required: Vec<serde_json::Value> = typed
            .iter()
            .map(|t| serde_json::Value::Object(t.required.clone()))
            .collect();
        let candidates = store::existing_candidates(&self.db, &required).await?;
        Ok(typed
            .iter()
            .zip(&candidates)
            .map(|(identity, classes)| {
                let e = domain::existence(identity, classes);
                pb::FindExistingResponse {
                    file_count: e.file_count,
                    total_bytes: e.total_bytes,
                    production_ids: e.production_ids,
                    missing_keys: e.missing_keys,
                    last_run: e.last_run,
                    differing_production_ids: e.differing_production_ids,
                    differing_keys: e.differing_keys,
                    example_lfns: e.example_lfns,
                }
            })
            .collect())
    }

    async fn register(&self, files: Vec<pb::OutputFile>) -> Result<u64> {
        let mut violations: Vec<Violation> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| domain::check_file(i, &f.lfn, &f.adler32, &f.url))
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
            return Err(CatalogError::Invalid(violations));
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let with_attempt: Vec<(u32, pb::OutputFile)> = files.into_iter().map(|f| (0, f)).collect();
        let registered = store::register_files(&tx, &self.types, &with_attempt).await?;
        let forwarding: Vec<&str> = registered.forwarding.iter().map(String::as_str).collect();
        store::forwarding_changed(&tx, &forwarding).await?;
        tx.commit().await?;
        Ok(registered.added)
    }

    async fn record(
        &self,
        request: pb::GetProductionRecordRequest,
    ) -> Result<pb::ProductionRecord> {
        let production_id = request.production_id;
        let client = self.db.client().await?;
        let record = store::production_record(&client, &production_id)
            .await?
            // Another VO's record is as unknown as one not written.
            .filter(|record| prodsys_auth::caller().may_see(&record.vo))
            .ok_or_else(|| {
                CatalogError::NotFound(format!(
                    "no finished production {production_id} in the catalog"
                ))
            })?;
        let format = pb::RecordFormat::try_from(request.format).unwrap_or_default();
        Ok(record_proto(&record, format))
    }
}

/// Keeps of `files` (and their `replicas`) those of productions of `vos`.
async fn visible_only(db: &Db, vos: &[String], found: &mut store::Files) -> Result<()> {
    if found.files.is_empty() {
        return Ok(());
    }
    let mut productions: Vec<&str> = found
        .files
        .iter()
        .map(|f| f.production_id.as_str())
        .collect();
    productions.sort_unstable();
    productions.dedup();
    let visible = store::productions_of_vos(db, &productions, vos).await?;
    found.files.retain(|f| visible.contains(&f.production_id));
    found.classes.retain(|c| visible.contains(&c.production_id));
    let kept: std::collections::HashSet<&str> =
        found.files.iter().map(|f| f.lfn.as_str()).collect();
    found.replicas.retain(|r| kept.contains(r.lfn.as_str()));
    Ok(())
}

/// A record as the API answers it, rendered as `format` asks.
fn record_proto(record: &domain::record::Record, format: pb::RecordFormat) -> pb::ProductionRecord {
    let state = record
        .state
        .parse::<ProductionState>()
        .map_or(pb::ProductionState::Unspecified, ProductionState::to_proto);
    let rendered = match format {
        pb::RecordFormat::Unspecified => String::new(),
        pb::RecordFormat::Json => domain::record::to_json(record),
        pb::RecordFormat::Markdown => domain::record::to_markdown(record),
        pb::RecordFormat::RoCrate => domain::record::to_ro_crate(record),
    };
    pb::ProductionRecord {
        production_id: record.production_id.clone(),
        state: state as i32,
        file_count: record.file_count,
        total_bytes: record.total_bytes,
        completed_unix_ms: record.completed_unix_ms,
        request_id: record.request_id.clone(),
        submitter: record.submitter.clone(),
        vo: record.vo.clone(),
        profile: record.profile.clone(),
        profile_sha256: record.profile_sha256.clone(),
        fingerprint: record.fingerprint.clone(),
        parameters_json: if record.parameters.is_null() {
            String::new()
        } else {
            record.parameters.to_string()
        },
        software: record.software.clone().into_iter().collect(),
        installation: record.installation.clone(),
        first_run: record.first_run,
        last_run: record.last_run,
        job_total: record.job_total,
        counts: Some(record.counts.into()),
        attempts: record.attempts,
        retries: record.retries,
        cpu_seconds_used: record.cpu_seconds_used,
        cpu_measured_attempts: record.cpu_measured_attempts,
        estimate: record.estimate.map(|e| pb::ResourceEstimate {
            cpu_seconds_per_job: e.cpu_seconds_per_job,
            cpu_hours_total: e.cpu_hours_total,
            memory_mb: e.memory_mb,
            disk_mb_per_job: e.disk_mb_per_job,
            disk_gb_total: e.disk_gb_total,
        }),
        submitted_unix_ms: record.submitted_unix_ms,
        accepted_unix_ms: record.accepted_unix_ms,
        first_job_started_unix_ms: record.first_job_started_unix_ms,
        last_job_ended_unix_ms: record.last_job_ended_unix_ms,
        datasets: record
            .datasets
            .iter()
            .map(|d| pb::RecordDataset {
                name: d.name.clone(),
                file_count: d.file_count,
                total_bytes: d.total_bytes,
            })
            .collect(),
        replicas: record
            .replicas
            .iter()
            .map(|r| pb::DestinationProgress {
                destination: r.destination.clone(),
                forwarded: r.forwarded,
                total: r.total,
                failing: r.failing,
                held_reason: String::new(),
            })
            .collect(),
        parent_production_ids: record.parent_production_ids.clone(),
        child_production_ids: record.child_production_ids.clone(),
        record_lfn: record.record_lfn.clone(),
        rendered,
        installations: crate::installations::to_proto(&record.installations),
    }
}

type FileStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::FindFilesResponse, Status>> + Send>,
>;

/// Where the next page begins: after the last file read, when more follow
/// (taken before a caller's view is cut from the page).
fn next_page_token(files: &store::Files, more: bool) -> String {
    match (more, files.files.last()) {
        (true, Some(f)) => f.lfn.clone(),
        _ => String::new(),
    }
}

/// A page of files as the API answers it.
fn response(files: store::Files, next_page_token: String) -> pb::FindFilesResponse {
    pb::FindFilesResponse {
        files: files.files,
        next_page_token,
        replicas: files.replicas,
        classes: files.classes,
    }
}

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for CatalogApi {
    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn find_files(
        &self,
        request: Request<pb::FindFilesRequest>,
    ) -> Result<Response<pb::FindFilesResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.into_inner();
        let query = self.file_query(&r)?;
        let page_size = domain::page_size(r.page_size, 1000);
        Ok(Response::new(
            self.page(&query, &r.page_token, page_size, r.metadata_by_class)
                .await?,
        ))
    }

    type StreamFilesStream = FileStream;

    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn stream_files(
        &self,
        request: Request<pb::FindFilesRequest>,
    ) -> Result<Response<Self::StreamFilesStream>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.into_inner();
        let query = self.file_query(&r)?;
        let page_size = domain::page_size(r.page_size, 5000);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let db = self.db.clone();
        let visible_vos = prodsys_auth::caller().visible_vos();
        tokio::spawn(async move {
            let sent = store::stream_files(
                &db,
                &query,
                &r.page_token,
                page_size,
                r.metadata_by_class,
                |mut files, more| {
                    let token = next_page_token(&files, more);
                    let tx = tx.clone();
                    let db = db.clone();
                    let visible_vos = visible_vos.clone();
                    // A client that went away ends the stream.
                    async move {
                        if let Some(vos) = visible_vos
                            && let Err(error) = visible_only(&db, &vos, &mut files).await
                        {
                            let _ = tx.send(Err(Status::from(error))).await;
                            return false;
                        }
                        tx.send(Ok(response(files, token))).await.is_ok()
                    }
                },
            )
            .await;
            if let Err(error) = sent {
                let _ = tx.send(Err(Status::from(CatalogError::from(error)))).await;
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
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.into_inner();
        if r.metadata.is_empty() {
            return Err(CatalogError::Invalid(vec![Violation::new(
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
        prodsys_server::input::checked(request.get_ref())?;
        let queries = request.into_inner().queries;
        let violations = domain::check_existing_many(
            queries.iter().map(|q| q.metadata.is_empty()),
            queries.len(),
        );
        if !violations.is_empty() {
            return Err(CatalogError::Invalid(violations).into());
        }
        let results = self.existing(&queries).await?;
        Ok(Response::new(pb::FindExistingManyResponse { results }))
    }

    async fn register_files(
        &self,
        request: Request<pb::RegisterFilesRequest>,
    ) -> Result<Response<pb::RegisterFilesResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let registered = self.register(request.into_inner().files).await?;
        Ok(Response::new(pb::RegisterFilesResponse { registered }))
    }

    async fn get_production_record(
        &self,
        request: Request<pb::GetProductionRecordRequest>,
    ) -> Result<Response<pb::ProductionRecord>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(self.record(request.into_inner()).await?))
    }
}
