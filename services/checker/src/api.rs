//! The checker's gRPC `CheckerService`: `ListTemplates` lists the templates
//! shipped and derived, `ListPeriods` the observation periods; `Evaluate` answers what a request's
//! verdict would be, without storing anything (intake's `ValidateRequest`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use prodsys_db::Db;
use prodsys_proto as pb;
use tonic::{Request, Response, Status};

use prodsys_core::container::ResolvedTemplate;

use crate::catalog::Catalog;
use crate::domain::{self, Candidate, Lookups, Rules, Validation};
use crate::error::CheckerError;
use crate::store;
use crate::visibility;

#[derive(Clone)]
pub struct CheckerApi {
    pub db: Db,
    pub rules: Arc<Rules>,
    pub catalog: Catalog,
    /// Tokens on: a verdict names only productions of the request's VO
    /// (see [`crate::visibility`]).
    pub isolate_vos: bool,
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
        parameters_json: v.parameters_json,
        period: v.period,
        pointing: v.pointing,
        pointings: v.pointings.into_iter().map(validation).collect(),
    }
}

impl CheckerApi {
    /// Shipped templates from the templates directory, then the recorded derivations.
    async fn templates(
        &self,
        profile: &str,
        name: &str,
    ) -> Result<pb::ListTemplatesResponse, CheckerError> {
        let mut templates = Vec::new();
        // A derivation's overridable parameters are its root's.
        let mut overridable: HashMap<(String, String), String> = HashMap::new();
        for p in self.rules.profiles.iter() {
            let Some(containers) = p.containers() else {
                continue;
            };
            for t in containers.templates.values() {
                let schemas = serde_json::to_string(&t.overridable).map_err(anyhow::Error::from)?;
                overridable.insert((p.name().to_string(), t.name.clone()), schemas.clone());
                if (profile.is_empty() || p.name() == profile)
                    && (name.is_empty() || t.name == name)
                {
                    templates.push(info(p.name(), &t.description, &t.resolved(), schemas, 0));
                }
            }
        }
        for (profile, t, recorded) in store::derived_templates(&self.db, profile, name).await? {
            let schemas = overridable
                .get(&(profile.clone(), t.from.clone()))
                .cloned()
                .unwrap_or_else(|| "{}".into());
            let description = format!("derived from {}", t.from);
            templates.push(info(&profile, &description, &t, schemas, recorded));
        }
        Ok(pb::ListTemplatesResponse { templates })
    }

    /// Adds to `validation` why the chain after `r` cannot run.
    fn check_chain(&self, r: &pb::SubmitRequestRequest, validation: &mut Validation) {
        let head = self.rules.profiles.get(&r.profile);
        let parameters = serde_json::from_str(&r.parameters_json);
        let (Some(head), Ok(parameters)) = (head, parameters) else {
            // The request itself is refused already.
            return;
        };
        let steps: Vec<(&str, &str)> = r
            .chain
            .iter()
            .map(|s| (s.profile.as_str(), s.parameters_json.as_str()))
            .collect();
        let found =
            domain::chain_violations(&self.rules.profiles, &r.vo, head, &parameters, &steps);
        if !found.is_empty() {
            validation.violations.extend(found);
            validation.acceptable = false;
        }
    }

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
            forward: &r.forward,
            forward_replace: r.forward_replace,
        };
        // A request naming an observation period is one candidate per pointing.
        let expanded = self.rules.expand(&candidate);
        let names = domain::template_names(
            expanded
                .shares
                .iter()
                .map(|s| s.parameters_json.as_str())
                .chain([r.parameters_json.as_str()]),
        );
        let recorded = store::recorded_templates(&self.db, &names).await?;
        let (candidates, prepared): (Vec<Candidate<'_>>, Vec<_>) = self
            .rules
            .prepare_shares(&candidate, &expanded, &recorded)
            .into_iter()
            .unzip();
        let catalog = self.catalog.ask(&prepared).await?;
        let mut client = self.db.client().await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        let known = store::neighbourhood(&tx, &Lookups::of(&prepared)).await?;
        let mut validations: Vec<Validation> = candidates
            .iter()
            .zip(prepared)
            .zip(catalog)
            .map(|((c, p), answer)| {
                self.rules
                    .evaluate(p, c, &known, answer.as_ref())
                    .validation
            })
            .collect();
        if self.isolate_vos {
            let prefixes = self.rules.id_prefixes();
            let named: BTreeSet<String> = validations
                .iter()
                .flat_map(|v| visibility::named(v, &prefixes))
                .collect();
            let named_ids: Vec<String> = named.iter().cloned().collect();
            let vos = store::production_vos(&tx, &named_ids).await?;
            let hidden = visibility::hidden_from(&r.vo, &named, &vos);
            for validation in &mut validations {
                visibility::hide(validation, &hidden);
            }
        }
        if !expanded.has_period() {
            let mut validation = validations.pop().unwrap_or_default();
            if !r.chain.is_empty() {
                self.check_chain(r, &mut validation);
            }
            return Ok(validation);
        }
        if expanded.shares.is_empty() {
            let mut refused = validations.pop().unwrap_or_default();
            refused.period = expanded.period;
            return Ok(refused);
        }
        let pointings = expanded.shares.iter().map(|s| s.pointing).zip(validations);
        Ok(domain::combine(&expanded.period, pointings.collect()))
    }
}

#[tonic::async_trait]
impl pb::checker_service_server::CheckerService for CheckerApi {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn evaluate(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let verdict = self.verdict(request.get_ref()).await?;
        Ok(Response::new(validation(verdict)))
    }

    async fn list_periods(
        &self,
        request: Request<pb::ListPeriodsRequest>,
    ) -> Result<Response<pb::ListPeriodsResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.get_ref();
        Ok(Response::new(pb::convert::list_periods(
            &self.rules.profiles,
            &r.profile,
            &r.name,
        )))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        let r = request.get_ref();
        Ok(Response::new(self.templates(&r.profile, &r.name).await?))
    }
}

fn info(
    profile: &str,
    description: &str,
    t: &ResolvedTemplate,
    overridable_json: String,
    recorded_unix_ms: i64,
) -> pb::TemplateInfo {
    pb::TemplateInfo {
        name: t.name.clone(),
        profile: profile.to_string(),
        description: description.to_string(),
        image: t.image.clone(),
        digest: t.digest.clone(),
        runtime: t.runtime.clone(),
        entrypoint: t.entrypoint.clone(),
        parameters_json: serde_json::Value::Object(t.parameters.clone()).to_string(),
        overridable_json,
        derived_from: t.from.clone(),
        version: t.version.clone(),
        recorded_unix_ms,
    }
}
