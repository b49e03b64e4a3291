//! Checker: decides whether a received request becomes a production, before
//! a single CPU hour is spent. It validates the parameters against the
//! profile (requests also come from event publishers), computes the physics
//! fingerprint, refuses an exact duplicate by naming the production that has
//! that identity, reports overlaps (same identity but other statistics or an
//! intersecting range) and accepts them only as explicit extensions with new
//! run numbers, and assigns a human-readable production ID from a per-VO
//! sequence that never reuses a number. `Evaluate` answers the same question
//! without storing anything (intake's `ValidateRequest`).

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::events::{REQUEST_ACCEPTED, REQUEST_RECEIVED, REQUEST_REJECTED, REQUEST_REUSED};
use prodsys_core::{Profile, ProfileSet, Violation};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration, OutboxEvent};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event, outbox_event};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "checker";

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "productions and ID sequences",
        sql: r#"
            CREATE TABLE productions (
                production_id     text PRIMARY KEY,
                fingerprint       text NOT NULL UNIQUE,
                request_id        uuid NOT NULL UNIQUE,
                profile           text NOT NULL,
                vo                text NOT NULL,
                parameters        jsonb NOT NULL,
                backend           text NOT NULL,
                run_number_offset bigint NOT NULL,
                created_at        timestamptz NOT NULL DEFAULT now()
            );
            CREATE TABLE id_sequences (
                vo   text PRIMARY KEY,
                last bigint NOT NULL
            );
        "#,
    },
    Migration {
        version: 2,
        name: "overlaps and run ranges",
        sql: r#"
            ALTER TABLE productions
                ADD COLUMN base_fingerprint text NOT NULL DEFAULT '',
                ADD COLUMN last_run bigint NOT NULL DEFAULT 0;
            CREATE INDEX productions_base ON productions (base_fingerprint);
        "#,
    },
];

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
        &[REQUEST_RECEIVED],
        &[],
        &shutdown,
    )
    .await?;
    let catalog = tonic::transport::Endpoint::from_shared(settings.checker.catalog_url.clone())
        .context("checker.catalog_url")?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect_lazy();
    let checker = Checker {
        db: foundation.db.clone(),
        profiles,
        installations: settings.dispatcher.installations().into_keys().collect(),
        catalog: pb::catalog_service_client::CatalogServiceClient::new(catalog),
    };
    foundation.consume(settings, checker.clone(), &shutdown);
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::checker_service_server::CheckerServiceServer::new(checker)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.checker.port,
            routes,
            reporter,
            &["prodsys.v1.CheckerService"],
            &shutdown,
        )
        .await
}

#[derive(Clone)]
struct Checker {
    db: Db,
    profiles: Arc<ProfileSet>,
    /// The WMS installations a request may choose.
    installations: Vec<String>,
    catalog: pb::catalog_service_client::CatalogServiceClient<tonic::transport::Channel>,
}

/// A production ID: the profile's prefix and a six-digit (or longer) number.
pub fn production_id(prefix: &str, number: i64) -> String {
    format!("{prefix}-{number:06}")
}

/// What a request asks for, from gRPC or from an event.
struct Candidate<'a> {
    profile: &'a str,
    backend: &'a str,
    vo: &'a str,
    parameters_json: &'a str,
    extend: bool,
    reuse_existing: bool,
}

/// The checker's answer, before anything is written.
struct Evaluation<'p> {
    validation: pb::Validation,
    accepted: Option<Accepted<'p>>,
}

struct Accepted<'p> {
    profile: &'p Profile,
    parameters: serde_json::Value,
    base_fingerprint: String,
    run_number_offset: i64,
    last_run: i64,
}

impl Checker {
    /// Everything the checker knows about `candidate`, read inside `tx`.
    async fn evaluate(
        &self,
        tx: &Transaction<'_>,
        candidate: &Candidate<'_>,
    ) -> anyhow::Result<Evaluation<'_>> {
        let mut validation = pb::Validation::default();
        if !self.installations.iter().any(|i| i == candidate.backend) {
            validation.violations.push(
                Violation::new(
                    "backend",
                    format!(
                        "unknown WMS installation {:?}; this deployment has {}",
                        candidate.backend,
                        self.installations.join(", ")
                    ),
                )
                .into(),
            );
        }
        let (profile, parameters) = match self.profiles.validate_request(
            candidate.profile,
            candidate.vo,
            candidate.parameters_json,
        ) {
            Ok(checked) => checked,
            Err(violations) => {
                validation.violations = violations.into_iter().map(Into::into).collect();
                return Ok(Evaluation {
                    validation,
                    accepted: None,
                });
            }
        };
        let fingerprint = profile.fingerprint(&parameters);
        let base_fingerprint = profile.base_fingerprint(&parameters);
        validation.fingerprint = fingerprint.clone();
        let mut violations: Vec<Violation> =
            validation.violations.drain(..).map(Into::into).collect();
        if let Some(row) = tx
            .query_opt_cached(
                "SELECT production_id FROM productions WHERE fingerprint = $1",
                &[&fingerprint],
            )
            .await?
        {
            let existing: String = row.get(0);
            // Asked for, the existing production is the answer rather than a refusal.
            if !candidate.reuse_existing {
                violations.push(Violation::new(
                    "parameters",
                    format!("the same simulation already exists as production {existing}"),
                ));
            }
            validation.existing_production_id = existing;
        }
        let relatives = tx
            .query_cached(
                "SELECT production_id, parameters, last_run FROM productions
                 WHERE base_fingerprint = $1 AND fingerprint <> $2 ORDER BY production_id",
                &[&base_fingerprint, &fingerprint],
            )
            .await?;
        let mut run_number_offset = 0i64;
        for row in &relatives {
            run_number_offset = run_number_offset.max(row.get(2));
            let theirs: serde_json::Value = row.get(1);
            if let Some(description) = profile.overlap(&parameters, &theirs) {
                validation.overlaps.push(pb::Overlap {
                    production_id: row.get(0),
                    description,
                });
            }
        }
        if validation.existing_production_id.is_empty() {
            let known: Vec<String> = relatives.iter().map(|r| r.get(0)).collect();
            if let Some(v) = self
                .existing_outputs(profile, &parameters, &known, candidate.extend)
                .await?
            {
                violations.push(v);
            }
        }
        if !validation.overlaps.is_empty() && !candidate.extend {
            let names: Vec<String> = validation
                .overlaps
                .iter()
                .map(|o| format!("{} ({})", o.production_id, o.description))
                .collect();
            violations.push(Violation::new(
                "extend",
                format!(
                    "overlaps {}; submit with extend to add new runs to the same simulation",
                    names.join(", ")
                ),
            ));
        }
        let plan = profile.plan(&parameters, &fingerprint, run_number_offset as u64);
        if let Some(plan) = &plan {
            validation.plan = Some(pb::JobPlan {
                jobs: plan.job_count,
                units_per_job: plan.per_job,
                total_units: plan.total_units,
                first_run: plan.run_number_offset + 1,
                last_run: plan.run_number_offset + plan.job_count,
            });
            validation.estimate = Some(profile.resource_estimate(plan));
        } else {
            violations.push(Violation::new("parameters", "give no job plan"));
        }
        validation.violations = violations.into_iter().map(Into::into).collect();
        validation.acceptable = validation.violations.is_empty();
        let accepted = match (validation.acceptable, plan) {
            (true, Some(plan)) => Some(Accepted {
                profile,
                parameters,
                base_fingerprint,
                run_number_offset,
                last_run: (plan.run_number_offset + plan.job_count) as i64,
            }),
            _ => None,
        };
        Ok(Evaluation {
            validation,
            accepted,
        })
    }

    /// Outputs of this simulation the catalog holds that no production of
    /// this identity known here wrote: data made before prodsys or elsewhere.
    async fn existing_outputs(
        &self,
        profile: &Profile,
        parameters: &serde_json::Value,
        known: &[String],
        extend: bool,
    ) -> anyhow::Result<Option<Violation>> {
        let metadata = profile.catalog_identity(parameters);
        if metadata.is_empty() || extend {
            return Ok(None);
        }
        let found = self
            .catalog
            .clone()
            .find_existing(pb::FindExistingRequest {
                metadata: metadata.into_iter().collect(),
            })
            .await
            .context("asking the catalog for existing outputs")?
            .into_inner();
        let foreign: Vec<&str> = found
            .production_ids
            .iter()
            .filter(|p| !known.contains(p))
            .map(|p| {
                if p.is_empty() {
                    "registered from elsewhere"
                } else {
                    p.as_str()
                }
            })
            .collect();
        if found.file_count == 0 || foreign.is_empty() {
            return Ok(None);
        }
        Ok(Some(Violation::new(
            "parameters",
            format!(
                "outputs of this simulation already exist in the catalog: {} file(s), {} bytes ({}), e.g. {}; submit with extend to produce more",
                found.file_count,
                found.total_bytes,
                foreign.join(", "),
                found.example_lfns.join(", ")
            ),
        )))
    }

    /// Decides one request inside `tx`; returns the event announcing the verdict.
    async fn decide(
        &self,
        tx: &Transaction<'_>,
        request: &pb::RequestReceived,
    ) -> anyhow::Result<OutboxEvent> {
        let request_id =
            Uuid::parse_str(&request.request_id).context("request_id is not a UUID")?;
        let candidate = Candidate {
            profile: &request.profile,
            backend: &request.backend,
            vo: &request.vo,
            parameters_json: &request.parameters_json,
            extend: request.extend,
            reuse_existing: request.reuse_existing,
        };
        let Evaluation {
            validation,
            accepted,
        } = self.evaluate(tx, &candidate).await?;
        if validation.acceptable && !validation.existing_production_id.is_empty() {
            let existing = validation.existing_production_id;
            tracing::info!(request_id = %request.request_id, %existing, "request answered with the existing production");
            let event = pb::RequestAccepted {
                request_id: request.request_id.clone(),
                production_id: existing.clone(),
                profile: request.profile.clone(),
                vo: request.vo.clone(),
                fingerprint: validation.fingerprint,
                parameters_json: request.parameters_json.clone(),
                backend: request.backend.clone(),
                run_number_offset: 0,
                correlation_id: request.correlation_id.clone(),
            };
            return Ok(outbox_event(REQUEST_REUSED, &existing, &event));
        }
        let Some(accepted) = accepted else {
            tracing::info!(request_id = %request.request_id, violations = validation.violations.len(),
                existing = %validation.existing_production_id, "request rejected");
            let event = pb::RequestRejected {
                request_id: request.request_id.clone(),
                violations: validation.violations,
                existing_production_id: validation.existing_production_id,
                correlation_id: request.correlation_id.clone(),
            };
            return Ok(outbox_event(REQUEST_REJECTED, &request.request_id, &event));
        };
        let number: i64 = tx
            .query_one_cached(
                "INSERT INTO id_sequences (vo, last) VALUES ($1, 1)
                 ON CONFLICT (vo) DO UPDATE SET last = id_sequences.last + 1
                 RETURNING last",
                &[&request.vo],
            )
            .await?
            .get(0);
        let production_id = production_id(accepted.profile.id_prefix(), number);
        tx.execute_cached(
            "INSERT INTO productions
                 (production_id, fingerprint, request_id, profile, vo, parameters, backend,
                  run_number_offset, base_fingerprint, last_run)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &production_id,
                &validation.fingerprint,
                &request_id,
                &request.profile,
                &request.vo,
                &accepted.parameters,
                &request.backend,
                &accepted.run_number_offset,
                &accepted.base_fingerprint,
                &accepted.last_run,
            ],
        )
        .await
        .context("storing the production")?;
        tracing::info!(request_id = %request.request_id, %production_id,
            extends = validation.overlaps.len(), "request accepted");
        let event = pb::RequestAccepted {
            request_id: request.request_id.clone(),
            production_id: production_id.clone(),
            profile: request.profile.clone(),
            vo: request.vo.clone(),
            fingerprint: validation.fingerprint,
            parameters_json: accepted.parameters.to_string(),
            backend: request.backend.clone(),
            run_number_offset: accepted.run_number_offset as u64,
            correlation_id: request.correlation_id.clone(),
        };
        Ok(outbox_event(REQUEST_ACCEPTED, &production_id, &event))
    }
}

impl BatchHandler for Checker {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut requests = Vec::new();
        for incoming in batch {
            match decode_event::<pb::RequestReceived>(incoming) {
                Ok(decoded) => {
                    requests.push(decoded);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        // Decisions see each other's productions; one checker at a time decides,
        // so identical requests racing through replicas cannot both pass.
        tx.execute_cached(
            "SELECT pg_advisory_xact_lock(hashtext('prodsys.checker.decide'))",
            &[],
        )
        .await?;
        let ids: Vec<Uuid> = requests.iter().map(|(id, _)| *id).collect();
        let fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut events = Vec::new();
        for (id, request) in &requests {
            if fresh.contains(id) {
                events.push(self.decide(&tx, request).await?);
            }
        }
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

#[tonic::async_trait]
impl pb::checker_service_server::CheckerService for Checker {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn evaluate(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        let r = request.into_inner();
        let candidate = Candidate {
            profile: &r.profile,
            backend: if r.backend.is_empty() {
                "local"
            } else {
                &r.backend
            },
            vo: &r.vo,
            parameters_json: &r.parameters_json,
            extend: r.extend,
            reuse_existing: r.reuse_existing,
        };
        let mut client = self.db.client().await.map_err(ServiceError::from)?;
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let evaluation = self
            .evaluate(&tx, &candidate)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(evaluation.validation))
    }
}
