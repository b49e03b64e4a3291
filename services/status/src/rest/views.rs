//! The bodies of the HTTP/JSON API: what it reads (each refusing unknown
//! fields) and what it answers, with their JSON Schemas for the OpenAPI
//! document. Parameters, schemas and records are JSON objects here, not the
//! strings of JSON the gRPC messages carry.

use std::collections::BTreeMap;

use prodsys_core::ProductionState;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::problem::FieldViolation;

/// A JSON object held as text in a gRPC message; `{}` when empty.
pub fn object(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn violations(list: Vec<pb::FieldViolation>) -> Vec<FieldViolation> {
    list.into_iter()
        .map(|v| FieldViolation::new(v.field, v.description))
        .collect()
}

/// A production request, as `SubmitRequest` and `ValidateRequest` take it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "profile": "cta-irf-mc",
    "vo": "vo.cta.in2p3.fr",
    "submitter": "esap",
    "parameters": {
        "site": "LaPalma", "array_layout": "Prod6-Hyperarray", "particle": "gamma",
        "zenith_deg": 20, "pointing": "North", "nsb_levels": [1, 5],
        "energy_min_tev": 0.003, "energy_max_tev": 330, "spectral_index": -2.0,
        "viewcone_deg": 0, "core_scatter_m": 1500, "n_showers": 4000,
        "showers_per_job": 1000, "campaign": "PROD6",
        "software": {"corsika": "7.7550", "sim_telarray": "2024-02-05"}
    }
}))]
pub struct SubmitBody {
    /// Profile name, e.g. `cta-irf-mc` (see `GET /api/v1/profiles`).
    pub profile: String,
    /// Virtual organisation, e.g. `vo.cta.in2p3.fr`.
    pub vo: String,
    /// Production parameters, validated against the profile's schema.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// WMS installation to run on; empty for the default (`local`).
    #[serde(default)]
    pub backend: String,
    /// Client-chosen key: the same key returns the same request.
    #[serde(default)]
    pub idempotency_key: String,
    #[serde(default)]
    pub submitter: String,
    /// Accept the request as an extension of an overlapping production.
    #[serde(default)]
    pub extend: bool,
    /// When the same simulation exists, answer with that production.
    #[serde(default)]
    pub reuse_existing: bool,
    /// -1000..1000; higher goes first among productions waiting for one
    /// installation.
    #[serde(default)]
    pub priority: i32,
    /// Forwarding destinations besides the profile's defaults.
    #[serde(default)]
    pub forward: Vec<String>,
    /// `forward` replaces the profile's default destinations.
    #[serde(default)]
    pub forward_replace: bool,
}

impl From<SubmitBody> for pb::SubmitRequestRequest {
    fn from(b: SubmitBody) -> Self {
        Self {
            profile: b.profile,
            vo: b.vo,
            parameters_json: Value::Object(b.parameters).to_string(),
            backend: b.backend,
            idempotency_key: b.idempotency_key,
            submitter: b.submitter,
            extend: b.extend,
            reuse_existing: b.reuse_existing,
            priority: b.priority,
            forward: b.forward,
            forward_replace: b.forward_replace,
            // A whole chain is checked with ValidateRequest over gRPC.
            chain: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    pub request_id: String,
    /// The idempotency key had been seen: this is the earlier request.
    pub replayed: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Overlap {
    pub production_id: String,
    pub description: String,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct JobPlan {
    pub jobs: u64,
    pub units_per_job: u64,
    pub total_units: u64,
    pub first_run: u64,
    pub last_run: u64,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ResourceEstimate {
    pub cpu_seconds_per_job: f64,
    pub cpu_hours_total: f64,
    pub memory_mb: u64,
    pub disk_mb_per_job: f64,
    pub disk_gb_total: f64,
}

impl From<Option<pb::ResourceEstimate>> for ResourceEstimate {
    fn from(e: Option<pb::ResourceEstimate>) -> Self {
        let e = e.unwrap_or_default();
        Self {
            cpu_seconds_per_job: e.cpu_seconds_per_job,
            cpu_hours_total: e.cpu_hours_total,
            memory_mb: e.memory_mb,
            disk_mb_per_job: e.disk_mb_per_job,
            disk_gb_total: e.disk_gb_total,
        }
    }
}

/// What the checker would decide now (nothing is stored).
#[derive(Debug, Serialize, ToSchema)]
pub struct Validation {
    /// The request would be accepted as it stands.
    pub acceptable: bool,
    pub violations: Vec<FieldViolation>,
    /// SHA-256 of the canonical identity parameters.
    pub fingerprint: String,
    /// The production this request duplicates exactly; empty when none.
    pub existing_production_id: String,
    pub overlaps: Vec<Overlap>,
    pub plan: JobPlan,
    pub estimate: ResourceEstimate,
    /// The existence check in words.
    pub explanations: Vec<String>,
    /// The parameters as they would be produced.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    pub period: String,
    pub pointing: String,
    /// For a request naming a period: the verdict on each pointing.
    #[schema(no_recursion)]
    pub pointings: Vec<Validation>,
}

impl From<pb::Validation> for Validation {
    fn from(v: pb::Validation) -> Self {
        let plan = v.plan.unwrap_or_default();
        Self {
            acceptable: v.acceptable,
            violations: violations(v.violations),
            fingerprint: v.fingerprint,
            existing_production_id: v.existing_production_id,
            overlaps: v
                .overlaps
                .into_iter()
                .map(|o| Overlap {
                    production_id: o.production_id,
                    description: o.description,
                })
                .collect(),
            plan: JobPlan {
                jobs: plan.jobs,
                units_per_job: plan.units_per_job,
                total_units: plan.total_units,
                first_run: plan.first_run,
                last_run: plan.last_run,
            },
            estimate: v.estimate.into(),
            explanations: v.explanations,
            parameters: object(&v.parameters_json),
            period: v.period,
            pointing: v.pointing,
            pointings: v.pointings.into_iter().map(Into::into).collect(),
        }
    }
}

/// One pointing of a period's request, once decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct PointingProduction {
    pub pointing: String,
    pub zenith_deg: f64,
    pub azimuth_deg: f64,
    /// Its new production; empty when none was made.
    pub production_id: String,
    pub fingerprint: String,
    pub existing_production_id: String,
    /// Why it was not produced.
    pub violations: Vec<FieldViolation>,
}

/// A request: received, accepted (with its production) or rejected.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestView {
    pub request_id: String,
    /// `RECEIVED`, `ACCEPTED` or `REJECTED`.
    pub state: String,
    pub profile: String,
    pub vo: String,
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    pub backend: String,
    /// Set once accepted.
    pub production_id: String,
    /// Set once rejected.
    pub violations: Vec<FieldViolation>,
    /// Set when rejected as a duplicate of this production.
    pub existing_production_id: String,
    pub created_unix_ms: i64,
    pub period: String,
    pub productions: Vec<PointingProduction>,
}

impl From<pb::Request> for RequestView {
    fn from(r: pb::Request) -> Self {
        let state = pb::RequestState::try_from(r.state)
            .unwrap_or(pb::RequestState::Unspecified)
            .as_str_name()
            .trim_start_matches("REQUEST_STATE_")
            .to_string();
        Self {
            request_id: r.request_id,
            state,
            profile: r.profile,
            vo: r.vo,
            parameters: object(&r.parameters_json),
            backend: r.backend,
            production_id: r.production_id,
            violations: violations(r.violations),
            existing_production_id: r.existing_production_id,
            created_unix_ms: r.created_unix_ms,
            period: r.period,
            productions: r
                .productions
                .into_iter()
                .map(|p| PointingProduction {
                    pointing: p.pointing,
                    zenith_deg: p.zenith_deg,
                    azimuth_deg: p.azimuth_deg,
                    production_id: p.production_id,
                    fingerprint: p.fingerprint,
                    existing_production_id: p.existing_production_id,
                    violations: violations(p.violations),
                })
                .collect(),
        }
    }
}

/// Jobs in each state; they sum to the production's job total.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCounts {
    pub created: u64,
    pub submitted: u64,
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub exhausted: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationProgress {
    pub destination: String,
    /// Files verified on the destination.
    pub forwarded: u64,
    /// Files of the production catalogued so far.
    pub total: u64,
    /// Files whose last copy failed.
    pub failing: u64,
}

/// A production as the status read model has it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductionView {
    pub production_id: String,
    pub request_id: String,
    pub profile: String,
    pub vo: String,
    /// `RUNNING`, `COMPLETED`, `CANCELLED`, … (`UNSPECIFIED` when unknown).
    pub state: String,
    pub job_total: u64,
    pub counts: JobCounts,
    /// The WMS installation.
    pub backend: String,
    pub updated_unix_ms: i64,
    pub estimate: ResourceEstimate,
    /// Why its jobs are not moving, when its installation is failing.
    pub held_reason: String,
    pub forwarding: Vec<DestinationProgress>,
    /// Ended, catalogued and on every destination: nothing more will happen.
    pub finished: bool,
    pub period: String,
    pub pointing: String,
}

impl From<pb::Production> for ProductionView {
    fn from(p: pb::Production) -> Self {
        let c: prodsys_core::JobCounts = p.counts.unwrap_or_default().into();
        let state = ProductionState::from_proto(p.state)
            .map_or("UNSPECIFIED", ProductionState::as_str)
            .to_string();
        Self {
            production_id: p.production_id,
            request_id: p.request_id,
            profile: p.profile,
            vo: p.vo,
            state,
            job_total: p.job_total,
            counts: JobCounts {
                created: c.created,
                submitted: c.submitted,
                queued: c.queued,
                running: c.running,
                done: c.done,
                failed: c.failed,
                cancelled: c.cancelled,
                exhausted: c.exhausted,
            },
            backend: p.backend,
            updated_unix_ms: p.updated_unix_ms,
            estimate: p.estimate.into(),
            held_reason: p.held_reason,
            forwarding: p
                .forwarding
                .into_iter()
                .map(|d| DestinationProgress {
                    destination: d.destination,
                    forwarded: d.forwarded,
                    total: d.total,
                    failing: d.failing,
                })
                .collect(),
            finished: p.finished,
            period: p.period,
            pointing: p.pointing,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductionPage {
    pub productions: Vec<ProductionView>,
    /// Pass as `page_token` for the next page; empty on the last.
    pub next_page_token: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CancelBody {
    /// Why, for the record.
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    /// The cancellation is on its way; follow the production to CANCELLED.
    pub accepted: bool,
}

/// How a condition compares a file's metadata value (as the key's declared
/// type: numbers as numbers).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum Operator {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "in")]
    In,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

impl From<Operator> for pb::ConditionOperator {
    fn from(o: Operator) -> Self {
        match o {
            Operator::Eq => Self::Eq,
            Operator::Ne => Self::Ne,
            Operator::In => Self::In,
            Operator::Lt => Self::Lt,
            Operator::Le => Self::Le,
            Operator::Gt => Self::Gt,
            Operator::Ge => Self::Ge,
        }
    }
}

/// One condition on a metadata value; a key no profile declares, or a value
/// not of the key's type, is refused (422).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    pub operator: Operator,
    /// The value as text; several for `in`.
    pub values: Vec<String>,
}

/// A `FindFiles` query: every condition must hold.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
#[schema(example = json!({
    "conditions": [
        {"key": "nsb", "operator": "in", "values": ["1", "5"]},
        {"key": "run_number", "operator": ">=", "values": ["2"]}
    ],
    "page_size": 100
}))]
pub struct FilesQuery {
    /// Only this production's files.
    pub production_id: String,
    /// Only files of this dataset.
    pub dataset: String,
    /// Only files whose LFN starts with this.
    pub lfn_prefix: String,
    /// Pairs the metadata must hold (as `=` conditions).
    pub metadata: BTreeMap<String, String>,
    pub conditions: Vec<Condition>,
    /// Files per page (the catalog's default when 0).
    pub page_size: u32,
    /// The `next_page_token` of the page before.
    pub page_token: String,
}

impl From<FilesQuery> for pb::FindFilesRequest {
    fn from(q: FilesQuery) -> Self {
        Self {
            metadata_by_class: false,
            production_id: q.production_id,
            metadata: q.metadata.into_iter().collect(),
            page_size: q.page_size,
            page_token: q.page_token,
            conditions: q
                .conditions
                .into_iter()
                .map(|c| pb::MetadataCondition {
                    key: c.key,
                    operator: pb::ConditionOperator::from(c.operator) as i32,
                    values: c.values,
                })
                .collect(),
            lfn_prefix: q.lfn_prefix,
            dataset: q.dataset,
        }
    }
}

/// A file's copy on one forwarding destination.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replica {
    pub destination: String,
    /// `PENDING`, `COPYING`, `VERIFIED`, `FAILED`, …
    pub state: String,
    pub url: String,
    pub reason: String,
    pub attempts: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    pub lfn: String,
    pub size: u64,
    /// adler32, 8 lowercase hex digits.
    pub adler32: String,
    pub url: String,
    pub metadata: BTreeMap<String, String>,
    pub production_id: String,
    pub job_index: u64,
    pub replicas: Vec<Replica>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FilePage {
    pub files: Vec<FileView>,
    /// Pass as `page_token` for the next page; empty on the last.
    pub next_page_token: String,
}

impl From<pb::FindFilesResponse> for FilePage {
    fn from(r: pb::FindFilesResponse) -> Self {
        let mut replicas = r.replicas.into_iter();
        Self {
            files: r
                .files
                .into_iter()
                .map(|f| FileView {
                    replicas: replicas
                        .next()
                        .map(|list| {
                            list.replicas
                                .into_iter()
                                .map(|x| Replica {
                                    state: pb::ReplicaState::try_from(x.state)
                                        .unwrap_or(pb::ReplicaState::Unspecified)
                                        .as_str_name()
                                        .trim_start_matches("REPLICA_STATE_")
                                        .to_string(),
                                    destination: x.destination,
                                    url: x.url,
                                    reason: x.reason,
                                    attempts: x.attempts,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    lfn: f.lfn,
                    size: f.size,
                    adler32: f.adler32,
                    url: f.url,
                    metadata: f.metadata.into_iter().collect(),
                    production_id: f.production_id,
                    job_index: f.job_index,
                })
                .collect(),
            next_page_token: r.next_page_token,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Virtual organisations allowed; empty means any.
    pub vos: Vec<String>,
    pub id_prefix: String,
    /// The JSON Schema of the parameters.
    #[schema(value_type = Object)]
    pub parameters_schema: Map<String, Value>,
    /// The parameters that define "the same simulation".
    pub identity: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Profiles {
    pub profiles: Vec<Profile>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Template {
    pub name: String,
    pub profile: String,
    pub description: String,
    /// Pinned by digest.
    pub image: String,
    pub digest: String,
    /// podman, docker or apptainer.
    pub runtime: String,
    pub entrypoint: Vec<String>,
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Parameter → the JSON Schema an override must satisfy.
    #[schema(value_type = Object)]
    pub overridable: Map<String, Value>,
    pub derived_from: String,
    pub version: String,
    /// 0 for a shipped template.
    pub recorded_unix_ms: i64,
}

impl From<pb::TemplateInfo> for Template {
    fn from(t: pb::TemplateInfo) -> Self {
        Self {
            parameters: object(&t.parameters_json),
            overridable: object(&t.overridable_json),
            name: t.name,
            profile: t.profile,
            description: t.description,
            image: t.image,
            digest: t.digest,
            runtime: t.runtime,
            entrypoint: t.entrypoint,
            derived_from: t.derived_from,
            version: t.version,
            recorded_unix_ms: t.recorded_unix_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Templates {
    pub templates: Vec<Template>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Pointing {
    pub zenith_deg: f64,
    pub azimuth_deg: f64,
    pub label: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Period {
    pub name: String,
    pub profile: String,
    pub description: String,
    pub site: String,
    pub array_layout: String,
    /// 1 = dark, 5 = half moon, 19 = full moon.
    pub nsb_levels: Vec<u32>,
    pub atmosphere: String,
    /// `YYYY-MM-DD`.
    pub valid_from: String,
    pub valid_until: String,
    pub pointings: Vec<Pointing>,
}

impl From<pb::PeriodInfo> for Period {
    fn from(p: pb::PeriodInfo) -> Self {
        Self {
            pointings: p
                .pointings
                .into_iter()
                .map(|q| Pointing {
                    zenith_deg: q.zenith_deg,
                    azimuth_deg: q.azimuth_deg,
                    label: q.label,
                })
                .collect(),
            name: p.name,
            profile: p.profile,
            description: p.description,
            site: p.site,
            array_layout: p.array_layout,
            nsb_levels: p.nsb_levels,
            atmosphere: p.atmosphere,
            valid_from: p.valid_from,
            valid_until: p.valid_until,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Periods {
    pub periods: Vec<Period>,
}
