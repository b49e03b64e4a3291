//! Intake: the front door. It checks a request against its profile (so a
//! scientist hears about a bad field at once), stores it under a request ID,
//! answers a repeated idempotency key with the first request, and announces
//! `request.received`. It follows `request.accepted` / `request.rejected` so
//! `GetRequest` tells where a request stands.

pub mod ingest;

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::events::{
    PRODUCTION_CANCEL, REQUEST_ACCEPTED, REQUEST_RECEIVED, REQUEST_REJECTED, REQUEST_REUSED,
};
use prodsys_core::{ProfileSet, Violation};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event, outbox_event};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "intake";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_requests.sql",
    "0002_extension_requests.sql",
    "0003_requests_from_events.sql",
    "0004_reuse_of_existing_productions.sql",
    "0005_dispatch_priority.sql",
    "0006_room_for_the_verdict.sql",
];

/// Starts intake: schema, broker, relay, consumer and gRPC server.
pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let profiles = Arc::new(
        ProfileSet::load_dir(&settings.profiles_dir).context("loading production profiles")?,
    );
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[REQUEST_ACCEPTED, REQUEST_REJECTED, REQUEST_REUSED],
        &["#"],
        &shutdown,
    )
    .await?;
    foundation.consume(
        settings,
        IntakeConsumer {
            db: foundation.db.clone(),
            profiles: profiles.clone(),
            ingest_exchange: foundation.names.ingest(),
        },
        &shutdown,
    );
    let checker = tonic::transport::Endpoint::from_shared(settings.intake.checker_url.clone())
        .context("intake.checker_url")?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let api = RequestApi {
        db: foundation.db.clone(),
        committer: GroupCommit::start(foundation.db.clone(), &shutdown),
        profiles,
        checker: pb::checker_service_client::CheckerServiceClient::new(checker),
    };
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::request_service_server::RequestServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.intake.port,
            routes,
            reporter,
            &["prodsys.v1.RequestService"],
            &shutdown,
        )
        .await
}

#[derive(Clone)]
struct RequestApi {
    db: Db,
    profiles: Arc<ProfileSet>,
    committer: GroupCommit,
    checker: pb::checker_service_client::CheckerServiceClient<tonic::transport::Channel>,
}

const MAX_NAME: usize = 128;

/// Dispatch priorities a request may ask for.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

pub(crate) fn check_priority(priority: i32, violations: &mut Vec<Violation>) {
    if !PRIORITY_RANGE.contains(&priority) {
        violations.push(Violation::new(
            "priority",
            format!(
                "{priority} is outside {}..{}",
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            ),
        ));
    }
}

pub(crate) fn check_name(field: &str, value: &str, violations: &mut Vec<Violation>) {
    if value.len() > MAX_NAME {
        violations.push(Violation::new(
            field,
            format!("is longer than {MAX_NAME} characters"),
        ));
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
    {
        violations.push(Violation::new(
            field,
            "may hold only letters, digits and - _ . : / @",
        ));
    }
}

impl RequestApi {
    async fn submit(
        &self,
        request: pb::SubmitRequestRequest,
    ) -> Result<pb::SubmitRequestResponse, ServiceError> {
        let checked =
            self.profiles
                .validate_request(&request.profile, &request.vo, &request.parameters_json);
        let mut violations = Vec::new();
        check_name("backend", &request.backend, &mut violations);
        check_name("submitter", &request.submitter, &mut violations);
        check_priority(request.priority, &mut violations);
        if request.idempotency_key.len() > MAX_NAME {
            violations.push(Violation::new(
                "idempotency_key",
                format!("is longer than {MAX_NAME} characters"),
            ));
        }
        let parameters = match checked {
            Ok((_, parameters)) if violations.is_empty() => parameters,
            Ok(_) => return Err(ServiceError::Validation(violations)),
            Err(mut found) => {
                found.extend(violations);
                return Err(ServiceError::Validation(found));
            }
        };
        let backend = if request.backend.is_empty() {
            "local".to_string()
        } else {
            request.backend.clone()
        };
        self.committer
            .submit(Submission {
                request,
                parameters,
                backend,
            })
            .await
    }

    async fn get(&self, request_id: &str) -> Result<pb::Request, ServiceError> {
        let id = Uuid::parse_str(request_id).map_err(|e| {
            ServiceError::Validation(vec![Violation::new(
                "request_id",
                format!("is not a UUID: {e}"),
            )])
        })?;
        let client = self.db.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT profile, vo, parameters, backend, state, production_id, violations,
                        existing_production_id, created_at
                 FROM requests WHERE request_id = $1",
                &[&id],
            )
            .await
            .context("reading the request")?
            .ok_or_else(|| ServiceError::NotFound(format!("no request {request_id}")))?;
        let state = match row.get::<_, &str>(4) {
            "ACCEPTED" => pb::RequestState::Accepted,
            "REJECTED" => pb::RequestState::Rejected,
            _ => pb::RequestState::Received,
        };
        let violations: Vec<Violation> = serde_json::from_value(row.get(6)).unwrap_or_default();
        let created: chrono::DateTime<chrono::Utc> = row.get(8);
        Ok(pb::Request {
            request_id: request_id.to_string(),
            state: state as i32,
            profile: row.get(0),
            vo: row.get(1),
            parameters_json: row.get::<_, serde_json::Value>(2).to_string(),
            backend: row.get(3),
            production_id: row.get::<_, Option<String>>(5).unwrap_or_default(),
            violations: violations.into_iter().map(Into::into).collect(),
            existing_production_id: row.get::<_, Option<String>>(7).unwrap_or_default(),
            created_unix_ms: created.timestamp_millis(),
        })
    }
}

#[tonic::async_trait]
impl pb::request_service_server::RequestService for RequestApi {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn submit_request(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::SubmitRequestResponse>, Status> {
        Ok(Response::new(self.submit(request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn validate_request(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        let mut checker = self.checker.clone();
        checker
            .evaluate(request.into_inner())
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => Status::unavailable(format!(
                    "the checker cannot be reached: {}",
                    status.message()
                )),
                _ => status,
            })
    }

    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn cancel_production(
        &self,
        request: Request<pb::CancelProductionRequest>,
    ) -> Result<Response<pb::CancelProductionResponse>, Status> {
        let r = request.into_inner();
        let valid = r
            .production_id
            .split_once('-')
            .is_some_and(|(prefix, number)| {
                !prefix.is_empty()
                    && prefix.chars().all(|c| c.is_ascii_uppercase())
                    && number.len() >= 6
                    && number.chars().all(|c| c.is_ascii_digit())
            });
        if !valid {
            return Err(ServiceError::Validation(vec![Violation::new(
                "production_id",
                format!(
                    "{:?} is not a production ID (like CTA-000042)",
                    r.production_id
                ),
            )])
            .into());
        }
        let event = pb::ProductionCancel {
            production_id: r.production_id.clone(),
            reason: r.reason,
        };
        let mut client = self.db.client().await.map_err(ServiceError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        prodsys_db::enqueue(
            &tx,
            &self.db.outbox_channel(),
            &[outbox_event(PRODUCTION_CANCEL, &r.production_id, &event)],
        )
        .await
        .map_err(ServiceError::from)?;
        tx.commit()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        tracing::info!(production_id = %r.production_id, "cancellation requested");
        Ok(Response::new(pb::CancelProductionResponse {
            accepted: true,
        }))
    }

    async fn list_profiles(
        &self,
        _request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let profiles = self
            .profiles
            .iter()
            .map(|p| pb::ProfileInfo {
                name: p.name().to_string(),
                description: p.description().to_string(),
                vos: p.vos().to_vec(),
                id_prefix: p.id_prefix().to_string(),
                parameters_schema_json: p.parameters_schema().to_string(),
                identity: p.identity().to_vec(),
            })
            .collect();
        Ok(Response::new(pb::ListProfilesResponse { profiles }))
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::Request>, Status> {
        Ok(Response::new(
            self.get(&request.get_ref().request_id).await?,
        ))
    }
}

/// A checked SubmitRequest waiting for the next group commit.
struct Submission {
    request: pb::SubmitRequestRequest,
    parameters: serde_json::Value,
    backend: String,
}

type Answer = Result<pb::SubmitRequestResponse, ServiceError>;

/// Group commit of SubmitRequests: concurrent calls share one transaction
/// (one outbox insert, one NOTIFY, one WAL flush) instead of paying for one
/// each. A call waits only for the commit already in progress; each is
/// answered once its row is durable, exactly as with a transaction of its own.
#[derive(Clone)]
struct GroupCommit {
    queue: mpsc::Sender<(Submission, oneshot::Sender<Answer>)>,
}

/// Most submissions in one transaction.
const GROUP_MAX: usize = 256;
/// Writers: while one commits, the next gathers and writes its group.
const GROUP_WRITERS: usize = 2;

impl GroupCommit {
    fn start(db: Db, shutdown: &CancellationToken) -> Self {
        let (queue, receiver) = mpsc::channel(GROUP_MAX * GROUP_WRITERS);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..GROUP_WRITERS {
            let db = db.clone();
            let receiver = receiver.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let group = {
                        let mut receiver = receiver.lock().await;
                        let first = tokio::select! {
                            first = receiver.recv() => first,
                            () = shutdown.cancelled() => None,
                        };
                        let Some(first) = first else { return };
                        let mut group = vec![first];
                        while group.len() < GROUP_MAX {
                            match receiver.try_recv() {
                                Ok(next) => group.push(next),
                                Err(_) => break,
                            }
                        }
                        group
                    };
                    write_group(&db, group).await;
                }
            });
        }
        Self { queue }
    }

    async fn submit(&self, submission: Submission) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((submission, reply))
            .await
            .map_err(|_| anyhow::anyhow!("intake is shutting down"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("intake is shutting down"))?
    }
}

/// Stores a group in one transaction and answers each caller after the commit.
async fn write_group(db: &Db, group: Vec<(Submission, oneshot::Sender<Answer>)>) {
    let (submissions, replies): (Vec<Submission>, Vec<oneshot::Sender<Answer>>) =
        group.into_iter().unzip();
    match store_group(db, &submissions).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                requests = submissions.len(),
                "storing submitted requests failed"
            );
            for reply in replies {
                let _ = reply.send(Err(ServiceError::Unexpected(anyhow::anyhow!(
                    "storing the request failed: {error:#}"
                ))));
            }
        }
    }
}

async fn store_group(db: &Db, submissions: &[Submission]) -> anyhow::Result<Vec<Answer>> {
    let mut client = db.client().await?;
    let tx = client.transaction().await.context("begin")?;
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(submissions.len());
    let mut events = Vec::new();
    // Requests without an idempotency key cannot meet an earlier one: all of
    // them go in with one statement. Those with a key, one by one below.
    let mut keyless = KeylessRequests::default();
    for Submission {
        request,
        parameters,
        backend,
    } in submissions
    {
        if !request.idempotency_key.is_empty() {
            answers.push(None);
            continue;
        }
        let new = NewRequest::from_grpc(request, parameters, backend);
        let request_id = new.request_id;
        events.push(received_event(&new));
        keyless.push(&new);
        tracing::info!(%request_id, profile = %request.profile, vo = %request.vo, "request received");
        answers.push(Some(Ok(pb::SubmitRequestResponse {
            request_id: request_id.to_string(),
            replayed: false,
        })));
    }
    keyless.insert(&tx).await?;
    for (
        Submission {
            request,
            parameters,
            backend,
        },
        answer,
    ) in submissions.iter().zip(answers.iter_mut())
    {
        if answer.is_some() {
            continue;
        }
        let new = NewRequest::from_grpc(request, parameters, backend);
        let key = new.idempotency_key;
        // A key used earlier in this group is found too: the transaction sees its own rows.
        if !store_request(&tx, &new).await? {
            let row = tx
                .query_one_cached(
                    "SELECT request_id, profile, parameters FROM requests WHERE idempotency_key = $1",
                    &[&key],
                )
                .await
                .context("reading the earlier request")?;
            let (earlier_profile, earlier_parameters): (String, serde_json::Value) =
                (row.get(1), row.get(2));
            *answer = Some(
                if earlier_profile != request.profile || earlier_parameters != *parameters {
                    Err(ServiceError::Conflict(format!(
                        "idempotency key {:?} was used for a different request ({})",
                        request.idempotency_key,
                        row.get::<_, Uuid>(0)
                    )))
                } else {
                    Ok(pb::SubmitRequestResponse {
                        request_id: row.get::<_, Uuid>(0).to_string(),
                        replayed: true,
                    })
                },
            );
            continue;
        }
        events.push(received_event(&new));
        tracing::info!(request_id = %new.request_id, profile = %request.profile, vo = %request.vo, "request received");
        *answer = Some(Ok(pb::SubmitRequestResponse {
            request_id: new.request_id.to_string(),
            replayed: false,
        }));
    }
    prodsys_db::enqueue(&tx, &db.outbox_channel(), &events).await?;
    tx.commit().await.context("commit")?;
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every submission answered"))
        .collect())
}

/// Requests without an idempotency key, column by column for one insert.
#[derive(Default)]
struct KeylessRequests<'a> {
    ids: Vec<Uuid>,
    profiles: Vec<&'a str>,
    vos: Vec<&'a str>,
    parameters: Vec<&'a serde_json::Value>,
    backends: Vec<&'a str>,
    submitters: Vec<&'a str>,
    extend: Vec<bool>,
    reuse_existing: Vec<bool>,
    priorities: Vec<i32>,
}

impl<'a> KeylessRequests<'a> {
    fn push(&mut self, r: &NewRequest<'a>) {
        self.ids.push(r.request_id);
        self.profiles.push(r.profile);
        self.vos.push(r.vo);
        self.parameters.push(r.parameters);
        self.backends.push(r.backend);
        self.submitters.push(r.submitter);
        self.extend.push(r.extend);
        self.reuse_existing.push(r.reuse_existing);
        self.priorities.push(r.priority);
    }

    async fn insert(&self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO requests (request_id, profile, vo, parameters, backend, submitter,
                                   extend, reuse_existing, priority, state)
             SELECT *, 'RECEIVED' FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[],
                                              $5::text[], $6::text[], $7::bool[], $8::bool[],
                                              $9::int4[])",
            &[
                &self.ids,
                &self.profiles,
                &self.vos,
                &self.parameters,
                &self.backends,
                &self.submitters,
                &self.extend,
                &self.reuse_existing,
                &self.priorities,
            ],
        )
        .await
        .context("storing the requests")?;
        Ok(())
    }
}

/// A request to store, from gRPC or from an event.
struct NewRequest<'a> {
    request_id: Uuid,
    idempotency_key: Option<&'a str>,
    profile: &'a str,
    vo: &'a str,
    parameters: &'a serde_json::Value,
    backend: &'a str,
    submitter: &'a str,
    extend: bool,
    reuse_existing: bool,
    priority: i32,
    correlation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    /// Refused at the door: stored as REJECTED with these reasons.
    violations: &'a [Violation],
}

impl<'a> NewRequest<'a> {
    /// A checked SubmitRequest, with a new request ID.
    fn from_grpc(
        request: &'a pb::SubmitRequestRequest,
        parameters: &'a serde_json::Value,
        backend: &'a str,
    ) -> Self {
        Self {
            request_id: Uuid::now_v7(),
            idempotency_key: (!request.idempotency_key.is_empty())
                .then_some(request.idempotency_key.as_str()),
            profile: &request.profile,
            vo: &request.vo,
            parameters,
            backend,
            submitter: &request.submitter,
            extend: request.extend,
            reuse_existing: request.reuse_existing,
            priority: request.priority,
            correlation_id: None,
            reply_to: None,
            violations: &[],
        }
    }
}

/// Stores `r` unless its idempotency key is known; false when it was.
async fn store_request(tx: &Transaction<'_>, r: &NewRequest<'_>) -> anyhow::Result<bool> {
    let state = if r.violations.is_empty() {
        "RECEIVED"
    } else {
        "REJECTED"
    };
    let inserted = tx
        .query_opt_cached(
            "INSERT INTO requests (request_id, idempotency_key, profile, vo, parameters, backend, submitter,
                                   extend, correlation_id, reply_to, state, violations, reuse_existing,
                                   priority)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING request_id",
            &[
                &r.request_id,
                &r.idempotency_key,
                &r.profile,
                &r.vo,
                r.parameters,
                &r.backend,
                &r.submitter,
                &r.extend,
                &r.correlation_id,
                &r.reply_to,
                &state,
                &serde_json::to_value(r.violations)?,
                &r.reuse_existing,
                &r.priority,
            ],
        )
        .await
        .context("storing the request")?;
    Ok(inserted.is_some())
}

/// The event announcing a stored request.
fn received_event(r: &NewRequest<'_>) -> prodsys_db::OutboxEvent {
    let event = pb::RequestReceived {
        request_id: r.request_id.to_string(),
        profile: r.profile.to_string(),
        vo: r.vo.to_string(),
        parameters_json: r.parameters.to_string(),
        backend: r.backend.to_string(),
        submitter: r.submitter.to_string(),
        correlation_id: r.correlation_id.unwrap_or_default().to_string(),
        extend: r.extend,
        reuse_existing: r.reuse_existing,
        priority: r.priority,
    };
    outbox_event(REQUEST_RECEIVED, &r.request_id.to_string(), &event)
}

/// A JSON answer to the queue an event publisher named in `reply_to`.
fn reply(
    reply_to: &str,
    request_id: Uuid,
    correlation_id: &str,
    outcome: &str,
    production_id: &str,
    existing_production_id: &str,
    violations: &[Violation],
) -> anyhow::Result<prodsys_db::OutboxEvent> {
    let body = serde_json::json!({
        "request_id": request_id.to_string(),
        "correlation_id": correlation_id,
        "outcome": outcome,
        "production_id": production_id,
        "existing_production_id": existing_production_id,
        "violations": violations,
    });
    Ok(prodsys_db::OutboxEvent {
        event_id: Uuid::now_v7(),
        event_type: format!("request.{outcome}"),
        subject: request_id.to_string(),
        payload: serde_json::to_vec(&body)?,
        reply_to: Some(reply_to.to_string()),
        content_type: "application/json".into(),
    })
}

/// The checker's verdicts in one batch, column by column for one update.
#[derive(Default)]
struct Verdicts<'a> {
    request_ids: Vec<Uuid>,
    outcomes: Vec<&'static str>,
    production_ids: Vec<&'a str>,
    existing: Vec<&'a str>,
    violations: Vec<Vec<Violation>>,
}

impl<'a> Verdicts<'a> {
    fn push(
        &mut self,
        request_id: &str,
        outcome: &'static str,
        production_id: &'a str,
        existing: &'a str,
        violations: Vec<Violation>,
    ) -> anyhow::Result<()> {
        let request_id = Uuid::parse_str(request_id).context("request_id")?;
        // One verdict per request: a second one in the same batch would be
        // ignored by the database anyway (the request is no longer RECEIVED).
        if self.request_ids.contains(&request_id) {
            return Ok(());
        }
        self.request_ids.push(request_id);
        self.outcomes.push(outcome);
        self.production_ids.push(production_id);
        self.existing.push(existing);
        self.violations.push(violations);
        Ok(())
    }

    /// Records every verdict on a request still waiting for one, with one
    /// statement; returns the answers owed to publishers that named a
    /// `reply_to` queue.
    async fn record(self, tx: &Transaction<'_>) -> anyhow::Result<Vec<prodsys_db::OutboxEvent>> {
        if self.request_ids.is_empty() {
            return Ok(Vec::new());
        }
        let states: Vec<&str> = self
            .outcomes
            .iter()
            .map(|o| {
                if *o == "accepted" {
                    "ACCEPTED"
                } else {
                    "REJECTED"
                }
            })
            .collect();
        let violations = self
            .violations
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        let rows = tx
            .query_cached(
                "UPDATE requests r SET state = v.state, production_id = NULLIF(v.production_id, ''),
                        violations = v.violations, existing_production_id = NULLIF(v.existing, ''),
                        updated_at = now()
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[])
                      AS v (request_id, state, production_id, violations, existing)
                 WHERE r.request_id = v.request_id AND r.state = 'RECEIVED'
                 RETURNING r.request_id, r.reply_to, r.correlation_id",
                &[
                    &self.request_ids,
                    &states,
                    &self.production_ids,
                    &violations,
                    &self.existing,
                ],
            )
            .await
            .context("recording verdicts")?;
        let mut replies = Vec::new();
        for row in rows {
            let (request_id, reply_to, correlation): (Uuid, Option<String>, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            let Some(queue) = reply_to else {
                continue;
            };
            let i = self
                .request_ids
                .iter()
                .position(|id| *id == request_id)
                .expect("a row for a verdict asked for");
            replies.push(reply(
                &queue,
                request_id,
                &correlation.unwrap_or_default(),
                self.outcomes[i],
                self.production_ids[i],
                self.existing[i],
                &self.violations[i],
            )?);
        }
        Ok(replies)
    }
}

/// Consumes the checker's verdicts and the requests other systems publish.
struct IntakeConsumer {
    db: Db,
    profiles: Arc<ProfileSet>,
    ingest_exchange: String,
}

enum Work {
    Accepted(Uuid, pb::RequestAccepted),
    Reused(Uuid, pb::RequestAccepted),
    Rejected(Uuid, pb::RequestRejected),
    Submit(Box<ingest::Submission>),
}

impl IntakeConsumer {
    fn classify(&self, incoming: &Incoming) -> Result<Work, String> {
        if incoming.exchange == self.ingest_exchange {
            return ingest::parse(incoming, &self.profiles).map(|s| Work::Submit(Box::new(s)));
        }
        match incoming.routing_key.as_str() {
            REQUEST_ACCEPTED => decode_event(incoming).map(|(id, m)| Work::Accepted(id, m)),
            REQUEST_REUSED => decode_event(incoming).map(|(id, m)| Work::Reused(id, m)),
            REQUEST_REJECTED => decode_event(incoming).map(|(id, m)| Work::Rejected(id, m)),
            other => Err(format!("intake does not handle {other:?}")),
        }
    }

    async fn submit(
        &self,
        tx: &Transaction<'_>,
        s: &ingest::Submission,
    ) -> anyhow::Result<Vec<prodsys_db::OutboxEvent>> {
        let key = s.idempotency_key();
        let backend = if s.data.backend.is_empty() {
            "local"
        } else {
            s.data.backend.as_str()
        };
        let request = NewRequest {
            request_id: Uuid::now_v7(),
            idempotency_key: Some(&key),
            profile: &s.data.profile,
            vo: &s.data.vo,
            parameters: &s.data.parameters,
            backend,
            submitter: &s.data.submitter,
            extend: s.data.extend,
            reuse_existing: s.data.reuse_existing,
            priority: s.data.priority,
            correlation_id: Some(&s.event_id),
            reply_to: s.reply_to.as_deref(),
            violations: &s.violations,
        };
        if !store_request(tx, &request).await? {
            tracing::info!(key, "event already received");
            return Ok(Vec::new());
        }
        tracing::info!(request_id = %request.request_id, source = %s.source, event_id = %s.event_id,
            violations = s.violations.len(), "request received from an event");
        if s.violations.is_empty() {
            return Ok(vec![received_event(&request)]);
        }
        let rejected = pb::RequestRejected {
            request_id: request.request_id.to_string(),
            violations: s.violations.iter().cloned().map(Into::into).collect(),
            existing_production_id: String::new(),
            correlation_id: s.event_id.clone(),
        };
        let mut events = vec![outbox_event(
            REQUEST_REJECTED,
            &request.request_id.to_string(),
            &rejected,
        )];
        if let Some(queue) = &s.reply_to {
            events.push(reply(
                queue,
                request.request_id,
                &s.event_id,
                "rejected",
                "",
                "",
                &s.violations,
            )?);
        }
        Ok(events)
    }
}

impl BatchHandler for IntakeConsumer {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut work = Vec::new();
        for incoming in batch {
            match self.classify(incoming) {
                Ok(w) => {
                    work.push(w);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let event_ids: Vec<Uuid> = work
            .iter()
            .filter_map(|w| match w {
                Work::Accepted(id, _) | Work::Reused(id, _) | Work::Rejected(id, _) => Some(*id),
                Work::Submit(_) => None,
            })
            .collect();
        // Taken once: the same event twice in one batch takes effect once.
        let mut fresh = prodsys_db::claim(&tx, &event_ids).await?;
        let mut events = Vec::new();
        let mut verdicts = Verdicts::default();
        for w in &work {
            match w {
                Work::Accepted(id, m) if fresh.remove(id) => {
                    verdicts.push(&m.request_id, "accepted", &m.production_id, "", Vec::new())?;
                }
                // Answered with the production that already is this simulation.
                Work::Reused(id, m) if fresh.remove(id) => {
                    verdicts.push(
                        &m.request_id,
                        "accepted",
                        &m.production_id,
                        &m.production_id,
                        Vec::new(),
                    )?;
                }
                Work::Rejected(id, m) if fresh.remove(id) => {
                    verdicts.push(
                        &m.request_id,
                        "rejected",
                        "",
                        &m.existing_production_id,
                        m.violations.iter().cloned().map(Into::into).collect(),
                    )?;
                }
                // Events from outside are deduplicated by their own source and id.
                Work::Submit(s) => events.extend(self.submit(&tx, s).await?),
                _ => {}
            }
        }
        events.extend(verdicts.record(&tx).await?);
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}
