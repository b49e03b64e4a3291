//! Intake's gRPC `RequestService`: decode, call the domain, answer.

use std::sync::Arc;

use prodsys_core::{ProfileSet, Violation};
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_server::batch::GroupCommit;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{self, Proposal, Stored, Submission};
use crate::error::{IntakeError, Result};
use crate::store::{self, Answer};

/// The group commit of SubmitRequests: concurrent calls share one
/// transaction (one outbox insert, one NOTIFY, one WAL flush) instead of
/// paying for one each; each is answered once its row is durable.
pub type Committer = GroupCommit<Submission, Answer>;

#[derive(Clone)]
pub struct RequestApi {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    pub committer: Committer,
    pub checker: pb::checker_service_client::CheckerServiceClient<prodsys_auth::Channel>,
    /// Limits per VO (`intake.vo_limits`).
    pub settings: Arc<prodsys_config::IntakeSettings>,
}

impl RequestApi {
    async fn submit(
        &self,
        request: pb::SubmitRequestRequest,
        caller: &prodsys_auth::Caller,
    ) -> Result<pb::SubmitRequestResponse> {
        if !request.chain.is_empty() {
            return Err(IntakeError::Invalid(vec![Violation::new(
                "chain",
                "a chain is checked whole by ValidateRequest and submitted step by step, each step naming the production before it (prodctl submit does both)",
            )]));
        }
        let parameters = domain::check_proposal(
            &self.profiles,
            &Proposal {
                profile: &request.profile,
                vo: &request.vo,
                parameters_json: &request.parameters_json,
                backend: &request.backend,
                submitter: &request.submitter,
                priority: request.priority,
                idempotency_key: &request.idempotency_key,
                forward: &request.forward,
            },
        )
        .map_err(IntakeError::Invalid)?;
        self.check_template_known(&request.profile, &parameters)
            .await?;
        self.check_vo_limits(&request.profile, &request.vo, &parameters)
            .await?;
        let backend = domain::backend_or_default(&request.backend).to_string();
        let submission = Submission {
            idempotency_key: request.idempotency_key,
            profile: request.profile,
            vo: request.vo,
            parameters,
            backend,
            // With tokens, the token says who submits, not the request.
            submitter: caller.submitter(&request.submitter),
            owner: caller.owner(),
            extend: request.extend,
            reuse_existing: request.reuse_existing,
            priority: request.priority,
            forward: request.forward,
            forward_replace: request.forward_replace,
        };
        let Stored {
            request_id,
            replayed,
        } =
            self.committer.submit(submission).await.map_err(|_| {
                IntakeError::Unexpected(anyhow::anyhow!("intake is shutting down"))
            })??;
        Ok(pb::SubmitRequestResponse {
            request_id: request_id.to_string(),
            replayed,
        })
    }

    /// Refuses a request its VO has no room for under `intake.vo_limits`;
    /// nothing is read when no limit holds for the VO.
    async fn check_vo_limits(
        &self,
        profile: &str,
        vo: &str,
        parameters: &serde_json::Value,
    ) -> Result<()> {
        let Some(limits) = self.settings.limits_of(vo) else {
            return Ok(());
        };
        let jobs = self
            .profiles
            .get(profile)
            .map_or(0, |p| domain::planned_jobs(p, parameters));
        let splits: Vec<(String, String, String)> = self
            .profiles
            .iter()
            .filter_map(|p| {
                p.split()
                    .map(|s| (p.name().to_string(), s.total.clone(), s.per_job.clone()))
            })
            .collect();
        let load = store::vo_load(&self.db, vo, &splits).await?;
        let over = domain::over_limits(vo, limits, load, jobs);
        if over.is_empty() {
            Ok(())
        } else {
            tracing::info!(
                vo,
                jobs,
                load.jobs,
                load.productions,
                "refused over the VO's limits"
            );
            Err(IntakeError::Invalid(over))
        }
    }

    /// A container template that is not shipped may be one an earlier
    /// request derived: the checker, which records them, is asked, so an
    /// unknown one is refused now rather than stored and rejected later.
    async fn check_template_known(
        &self,
        profile: &str,
        parameters: &serde_json::Value,
    ) -> Result<()> {
        let Some(containers) = self.profiles.get(profile).and_then(|p| p.containers()) else {
            return Ok(());
        };
        let Some(name) = parameters
            .get("container_template")
            .and_then(serde_json::Value::as_str)
        else {
            return Ok(());
        };
        if containers.templates.contains_key(name) {
            return Ok(());
        }
        let found = self
            .checker
            .clone()
            .list_templates(pb::ListTemplatesRequest {
                profile: profile.to_string(),
                name: name.to_string(),
            })
            .await
            .map_err(|status| {
                IntakeError::Transient(anyhow::anyhow!(
                    "the checker cannot be reached to look up template {name:?}: {}",
                    status.message()
                ))
            })?
            .into_inner();
        if found.templates.is_empty() {
            let shipped: Vec<&str> = containers.templates.keys().map(String::as_str).collect();
            return Err(IntakeError::Invalid(vec![Violation::new(
                "parameters.container_template",
                format!(
                    "unknown template {name:?}; shipped templates: {} (or a template derived earlier)",
                    shipped.join(", ")
                ),
            )]));
        }
        Ok(())
    }

    async fn get(&self, request_id: &str) -> Result<pb::Request> {
        let id = Uuid::parse_str(request_id).map_err(|e| {
            IntakeError::Invalid(vec![Violation::new(
                "request_id",
                format!("is not a UUID: {e}"),
            )])
        })?;
        // Another VO's request is as unknown as one that does not exist.
        let row = store::request(&self.db, id)
            .await?
            .filter(|row| prodsys_auth::caller().may_see(&row.vo))
            .ok_or_else(|| IntakeError::NotFound(format!("no request {request_id}")))?;
        let period = self
            .profiles
            .get(&row.profile)
            .and_then(|p| p.period_spec())
            .and_then(|spec| row.parameters.get(&spec.parameter))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let state = match row.state.as_str() {
            "ACCEPTED" => pb::RequestState::Accepted,
            "REJECTED" => pb::RequestState::Rejected,
            _ => pb::RequestState::Received,
        };
        Ok(pb::Request {
            request_id: request_id.to_string(),
            state: state as i32,
            profile: row.profile,
            vo: row.vo,
            parameters_json: row.parameters.to_string(),
            backend: row.backend,
            production_id: row.production_id.unwrap_or_default(),
            violations: row.violations.into_iter().map(Into::into).collect(),
            existing_production_id: row.existing_production_id.unwrap_or_default(),
            created_unix_ms: row.created.timestamp_millis(),
            period,
            productions: row
                .productions
                .into_iter()
                .map(|p| pb::PointingProduction {
                    pointing: p.pointing,
                    zenith_deg: p.zenith_deg,
                    azimuth_deg: p.azimuth_deg,
                    production_id: p.production_id,
                    fingerprint: p.fingerprint,
                    existing_production_id: p.existing_production_id,
                    violations: p.violations.into_iter().map(Into::into).collect(),
                })
                .collect(),
        })
    }

    async fn cancel(&self, r: pb::CancelProductionRequest) -> Result<pb::CancelProductionResponse> {
        if !prodsys_core::is_production_id(&r.production_id) {
            return Err(IntakeError::Invalid(vec![Violation::new(
                "production_id",
                format!(
                    "{:?} is not a production ID (like CTA-000042)",
                    r.production_id
                ),
            )]));
        }
        let caller = prodsys_auth::caller();
        if caller.is_restricted() {
            // Only a production the caller's VOs can see, and then only its
            // own unless the caller manages the VO's productions.
            let (vo, owner) = store::production_owner(&self.db, &r.production_id)
                .await?
                .filter(|(vo, _)| caller.may_see(vo))
                .ok_or_else(|| {
                    IntakeError::NotFound(format!("no production {}", r.production_id))
                })?;
            if !caller.may_cancel(&vo, owner.as_deref()) {
                return Err(IntakeError::Denied(format!(
                    "production {} was requested by someone else; only its owner or a production manager of {vo} may cancel it",
                    r.production_id
                )));
            }
        }
        store::request_cancel(&self.db, &r.production_id, r.reason).await?;
        tracing::info!(production_id = %r.production_id, "cancellation requested");
        Ok(pb::CancelProductionResponse { accepted: true })
    }
}

/// What the checker answered, as intake's own answer: a checker that cannot be
/// reached is named as such, so the caller knows which service to wait for.
fn from_checker(status: Status) -> Status {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => Status::unavailable(format!(
            "the checker cannot be reached: {}",
            status.message()
        )),
        _ => status,
    }
}

#[tonic::async_trait]
impl pb::request_service_server::RequestService for RequestApi {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn submit_request(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::SubmitRequestResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let caller = prodsys_auth::caller();
        caller.may_act_for("vo", &request.get_ref().vo)?;
        Ok(Response::new(
            self.submit(request.into_inner(), &caller).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn validate_request(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        prodsys_auth::caller().may_act_for("vo", &request.get_ref().vo)?;
        let mut checker = self.checker.clone();
        checker
            .evaluate(request.into_inner())
            .await
            .map_err(from_checker)
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        // The checker records derived templates: it answers for both kinds.
        let mut checker = self.checker.clone();
        checker
            .list_templates(request.into_inner())
            .await
            .map_err(from_checker)
    }

    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn cancel_production(
        &self,
        request: Request<pb::CancelProductionRequest>,
    ) -> Result<Response<pb::CancelProductionResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    async fn list_periods(
        &self,
        request: Request<pb::ListPeriodsRequest>,
    ) -> Result<Response<pb::ListPeriodsResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.get_ref();
        Ok(Response::new(pb::convert::list_periods(
            &self.profiles,
            &r.profile,
            &r.name,
        )))
    }

    async fn list_profiles(
        &self,
        request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
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
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(
            self.get(&request.get_ref().request_id).await?,
        ))
    }
}
