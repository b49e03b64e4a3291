//! The checker's gRPC `CheckerService`: `Evaluate` answers what a request's
//! verdict would be, without storing anything (intake's `ValidateRequest`).

use std::sync::Arc;

use prodsys_db::Db;
use prodsys_proto as pb;
use tonic::{Request, Response, Status};

use crate::catalog::Catalog;
use crate::domain::{Candidate, Lookups, Rules, Validation};
use crate::error::CheckerError;
use crate::store;

#[derive(Clone)]
pub struct CheckerApi {
    pub db: Db,
    pub rules: Arc<Rules>,
    pub catalog: Catalog,
}

/// A verdict as the API shows it.
pub fn validation(v: Validation) -> pb::Validation {
    pb::Validation {
        acceptable: v.acceptable,
        violations: v.violations.into_iter().map(Into::into).collect(),
        fingerprint: v.fingerprint,
        existing_production_id: v.existing_production_id,
        overlaps: v
            .overlaps
            .into_iter()
            .map(|o| pb::Overlap {
                production_id: o.production_id,
                description: o.description,
            })
            .collect(),
        plan: v.plan.map(|p| pb::JobPlan {
            jobs: p.jobs,
            units_per_job: p.units_per_job,
            total_units: p.total_units,
            first_run: p.first_run,
            last_run: p.last_run,
        }),
        estimate: v.estimate.map(Into::into),
        explanations: v.explanations,
    }
}

impl CheckerApi {
    /// The verdict `r` would get now, nothing stored.
    async fn verdict(&self, r: &pb::SubmitRequestRequest) -> Result<Validation, CheckerError> {
        let candidate = Candidate {
            request_id: "",
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
        let prepared = self.rules.prepare(&candidate);
        let catalog = self
            .catalog
            .ask(std::slice::from_ref(&prepared))
            .await?
            .pop()
            .flatten();
        let mut client = self.db.client().await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        let known = store::neighbourhood(&tx, &Lookups::of([&prepared])).await?;
        let evaluation = self
            .rules
            .evaluate(prepared, &candidate, &known, catalog.as_ref());
        Ok(evaluation.validation)
    }
}

#[tonic::async_trait]
impl pb::checker_service_server::CheckerService for CheckerApi {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn evaluate(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        let verdict = self.verdict(request.get_ref()).await?;
        Ok(Response::new(validation(verdict)))
    }
}
