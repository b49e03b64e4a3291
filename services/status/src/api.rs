//! The status service's gRPC `StatusService`: a production's snapshot, a
//! page of productions, and a stream of snapshots as a production changes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prodsys_core::{ProductionState, Violation};
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use tonic::{Request, Response, Status};

use crate::domain::{self, Production};
use crate::error::{Result, StatusError};
use crate::follow::Snapshots;
use crate::forwarding;
use crate::installations;
use crate::store::{self, ListFilter};

#[derive(Clone)]
pub struct StatusApi {
    pub db: Db,
    /// The shared readers of changed productions, for the streams that follow them.
    pub snapshots: Snapshots,
    /// The checker, which answers `ListTemplates` for the dashboard.
    pub checker: pb::checker_service_client::CheckerServiceClient<prodsys_auth::Channel>,
    /// The catalog, which answers `GetProductionRecord` for the HTTP port.
    pub catalog: pb::catalog_service_client::CatalogServiceClient<prodsys_auth::Channel>,
    /// Intake, which answers submit, validate, cancel and profiles for the
    /// HTTP/JSON API (`rest`).
    pub intake: pb::request_service_client::RequestServiceClient<prodsys_auth::Channel>,
    /// The dispatcher, which answers `ListJobs` and `GetJobLog` for the
    /// dashboard's production pages.
    pub dispatcher: pb::job_service_client::JobServiceClient<prodsys_auth::Channel>,
}

/// How long a watch waits for a finished production's counts to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// A production as the API shows it.
pub fn production(p: Production) -> pb::Production {
    let state = p
        .state
        .map_or(pb::ProductionState::Unspecified, ProductionState::to_proto);
    pb::Production {
        production_id: p.production_id,
        request_id: p.request_id.map(|u| u.to_string()).unwrap_or_default(),
        profile: p.profile,
        vo: p.vo,
        state: state as i32,
        job_total: p.job_total,
        counts: Some(p.counts.into()),
        backend: p.backend,
        updated_unix_ms: p.updated_unix_ms,
        estimate: p.estimate.and_then(|bytes| {
            <pb::ResourceEstimate as prost::Message>::decode(bytes.as_slice()).ok()
        }),
        held_reason: p.held_reason,
        // Filled by `forwarding::attach`.
        forwarding: Vec::new(),
        finished: false,
        period: p.period,
        pointing: p.pointing,
        inputs_used: p.inputs_used,
        inputs_note: p.inputs_note,
        // Filled by `installations::attach`.
        installations: Vec::new(),
    }
}

impl StatusApi {
    /// The production as the read model has it now.
    pub async fn current(&self, production_id: &str) -> Result<Production> {
        if production_id.is_empty() {
            return Err(StatusError::Invalid(vec![Violation::new(
                "production_id",
                "is required",
            )]));
        }
        // Another VO's production is as unknown as one that does not exist.
        store::production(&self.db, production_id)
            .await?
            .filter(|p| prodsys_auth::caller().may_see(&p.vo))
            .ok_or_else(|| StatusError::NotFound(format!("no production {production_id}")))
    }

    /// The production's snapshot as the API shows it, with its forwarding.
    pub async fn snapshot(&self, production_id: &str) -> Result<pb::Production> {
        completed(&self.db, self.current(production_id).await?).await
    }
}

/// A production's snapshot as the service sees it (every VO's): for the
/// shared readers, whose followers checked that they may see it.
pub async fn snapshot(db: &Db, production_id: &str) -> Result<pb::Production> {
    let found = store::production(db, production_id)
        .await?
        .ok_or_else(|| StatusError::NotFound(format!("no production {production_id}")))?;
    completed(db, found).await
}

/// The read model's production with its forwarding and installations.
async fn completed(db: &Db, found: Production) -> Result<pb::Production> {
    let mut snapshot = production(found);
    let client = db.client().await?;
    forwarding::attach(&client, std::slice::from_mut(&mut snapshot)).await?;
    installations::attach(&client, std::slice::from_mut(&mut snapshot)).await?;
    Ok(snapshot)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Production, Status>> + Send>>;

#[tonic::async_trait]
impl pb::status_service_server::StatusService for StatusApi {
    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn get_production(
        &self,
        request: Request<pb::GetProductionRequest>,
    ) -> Result<Response<pb::Production>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(
            self.snapshot(&request.get_ref().production_id).await?,
        ))
    }

    async fn list_productions(
        &self,
        request: Request<pb::ListProductionsRequest>,
    ) -> Result<Response<pb::ListProductionsResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.into_inner();
        let request_id = match r.request_id.as_str() {
            "" => None,
            id => Some(uuid::Uuid::parse_str(id).map_err(|e| {
                StatusError::Invalid(vec![Violation::new(
                    "request_id",
                    format!("is not a UUID: {e}"),
                )])
            })?),
        };
        let filter = ListFilter {
            vo: &r.vo,
            state: ProductionState::from_proto(r.state),
            profile: &r.profile,
            after: &r.page_token,
            page_size: domain::page_size(r.page_size),
            request_id,
            visible_vos: prodsys_auth::caller().visible_vos(),
        };
        // One connection for the page and its forwarding progress.
        let client = self.db.client().await.map_err(StatusError::from)?;
        let (page, more) = store::list_productions(&client, &filter)
            .await
            .map_err(StatusError::from)?;
        let mut productions: Vec<pb::Production> = page.into_iter().map(production).collect();
        forwarding::attach(&client, &mut productions)
            .await
            .map_err(StatusError::from)?;
        installations::attach(&client, &mut productions)
            .await
            .map_err(StatusError::from)?;
        let next_page_token = if more {
            productions
                .last()
                .map(|p| p.production_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProductionsResponse {
            productions,
            next_page_token,
        }))
    }

    type WatchProductionStream = WatchStream;

    async fn watch_production(
        &self,
        request: Request<pb::GetProductionRequest>,
    ) -> Result<Response<Self::WatchProductionStream>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let production_id = request.into_inner().production_id;
        // Follow before the first snapshot so no change falls between them.
        // The first is read as the caller (another VO's production is not
        // found); the rest come from the production's one shared reader.
        let mut follower = self.snapshots.follow(&production_id);
        let first = self.snapshot(&production_id).await?;
        follower.read_from_now();
        let stream = async_stream(move |tx| async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut ended_at: Option<std::time::Instant> = None;
            loop {
                // Ended, and its outputs where it asked.
                if last.finished {
                    let ended = *ended_at.get_or_insert_with(std::time::Instant::now);
                    let counts = last
                        .counts
                        .map(prodsys_core::JobCounts::from)
                        .unwrap_or_default();
                    if domain::is_settled(&counts) || ended.elapsed() >= SETTLE_WAIT {
                        return;
                    }
                }
                match tokio::time::timeout(Duration::from_secs(5), follower.next()).await {
                    // Its reader is gone: the service is stopping.
                    Ok(Err(_)) => return,
                    // Look at the settling again.
                    Err(_) => {}
                    Ok(Ok(Ok(snapshot))) if *snapshot != last => {
                        last = Arc::unwrap_or_clone(snapshot);
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(Ok(Ok(_))) => {}
                    Ok(Ok(Err(status))) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Production, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // The stream keeps seeing as its caller.
    prodsys_auth::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
