//! The status service's HTTP face, served on its gRPC port (which also takes
//! HTTP/1.1): a dashboard of productions that updates live as events arrive
//! (server-sent events), the same read model as JSON, Prometheus metrics
//! (with files forwarded / catalogued per destination), and a finished
//! production's record as the catalog answers it (JSON, Markdown, RO-Crate).
//! Each production has a page (`/productions/{id}`): its jobs with their
//! attempts, WMS status and log tails as the dispatcher's `JobService`
//! answers them (proxied here), its files and record (from `/api/v1`), and
//! a cancel button. Failures are RFC 9457 problem documents.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use prodsys_core::ProductionState;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_proto::status_service_server::StatusService;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tonic::Request;

use crate::api::StatusApi;
use crate::follow::Change;
// Faults of a query or path are problem documents naming the parameter.
use crate::rest::{Path, Problem, Query};
use crate::store;

const DASHBOARD: &str = include_str!("dashboard.html");
const TEMPLATES: &str = include_str!("templates.html");
const PRODUCTION: &str = include_str!("production.html");

pub(crate) fn router(api: StatusApi) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/productions", get(list))
        .route("/api/productions/{production_id}", get(one))
        .route("/api/productions/{production_id}/record", get(record))
        .route("/productions/{production_id}", get(production_page))
        .route("/api/productions/{production_id}/jobs", get(jobs))
        .route(
            "/api/productions/{production_id}/jobs/{job_index}/log",
            get(job_log),
        )
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .route("/templates", get(templates_page))
        .route("/api/templates", get(templates))
        .route("/api/periods", get(periods))
        .merge(crate::rest::router())
        .with_state(api)
}

/// In the development mode, a page says so at its top.
const DEV_MODE_BANNER: &str = "<div id=\"dev-mode\" role=\"alert\" style=\"background:#fff3cd;color:#7a4b00;border:1px solid #e0b84a;padding:.4rem .6rem;margin-bottom:.6rem;font-size:.9rem\"><strong>Development mode:</strong> no tokens are checked; anyone who reaches this port may submit, see and cancel anything. It is allowed only on loopback addresses.</div>";

fn page(html: &'static str) -> Html<String> {
    let banner = if prodsys_auth::caller().is_dev() {
        DEV_MODE_BANNER
    } else {
        ""
    };
    Html(html.replacen("<!--DEV-MODE-->", banner, 1))
}

async fn dashboard() -> Html<String> {
    page(DASHBOARD)
}

/// A production as the dashboard and JSON clients see it.
#[derive(Debug, Serialize)]
struct ProductionView {
    production_id: String,
    request_id: String,
    profile: String,
    vo: String,
    backend: String,
    state: String,
    job_total: u64,
    counts: prodsys_core::JobCounts,
    held_reason: String,
    updated_unix_ms: i64,
    /// Per destination it asked for: files forwarded / catalogued so far.
    forwarding: Vec<ForwardingView>,
    /// Ended, and its outputs are everywhere it asked.
    finished: bool,
    /// The observation period and pointing it simulates; empty without one.
    period: String,
    pointing: String,
    /// A chained production's input files used so far, and what it says of
    /// its inputs when a parent did not complete.
    inputs_used: u64,
    inputs_note: String,
    /// Its jobs per WMS installation they were placed on.
    installations: Vec<InstallationView>,
}

#[derive(Debug, Serialize)]
struct InstallationView {
    installation: String,
    counts: prodsys_core::JobCounts,
}

#[derive(Debug, Serialize)]
struct ForwardingView {
    destination: String,
    forwarded: u64,
    total: u64,
    failing: u64,
}

impl From<pb::Production> for ProductionView {
    fn from(p: pb::Production) -> Self {
        let c = p.counts.unwrap_or_default();
        let state = ProductionState::from_proto(p.state)
            .map_or("UNSPECIFIED", ProductionState::as_str)
            .to_string();
        Self {
            production_id: p.production_id,
            request_id: p.request_id,
            profile: p.profile,
            vo: p.vo,
            backend: p.backend,
            state,
            job_total: p.job_total,
            counts: c.into(),
            held_reason: p.held_reason,
            updated_unix_ms: p.updated_unix_ms,
            forwarding: p
                .forwarding
                .into_iter()
                .map(|d| ForwardingView {
                    destination: d.destination,
                    forwarded: d.forwarded,
                    total: d.total,
                    failing: d.failing,
                })
                .collect(),
            finished: p.finished,
            period: p.period,
            pointing: p.pointing,
            inputs_used: p.inputs_used,
            inputs_note: p.inputs_note,
            installations: p
                .installations
                .into_iter()
                .map(|i| InstallationView {
                    installation: i.installation,
                    counts: i.counts.unwrap_or_default().into(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ListView {
    productions: Vec<ProductionView>,
    next_page_token: String,
}

/// Filters of `GET /api/productions`, as `ListProductions` has them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListQuery {
    vo: String,
    profile: String,
    /// A state name (`RUNNING`, `COMPLETED`, …).
    state: String,
    page_size: u32,
    page_token: String,
    /// Only this request's productions.
    request_id: String,
}

/// A failure as an RFC 9457 problem document, as `/api/v1` answers them
/// (the gRPC code, and the field violations where there are any); input a
/// service refused stays a 400 on these routes, as it always was.
fn problem(status: tonic::Status) -> Response {
    let refused = status.code() == tonic::Code::InvalidArgument;
    let problem = Problem::from(status);
    if refused {
        problem.with_status(StatusCode::BAD_REQUEST).into_response()
    } else {
        problem.into_response()
    }
}

async fn list(State(api): State<StatusApi>, Query(q): Query<ListQuery>) -> Response {
    let state = if q.state.is_empty() {
        pb::ProductionState::Unspecified
    } else {
        match q.state.to_ascii_uppercase().parse::<ProductionState>() {
            Ok(state) => state.to_proto(),
            Err(error) => return Problem::field("state", error.to_string()).into_response(),
        }
    };
    let request = pb::ListProductionsRequest {
        vo: q.vo,
        state: state as i32,
        profile: q.profile,
        page_size: q.page_size,
        page_token: q.page_token,
        request_id: q.request_id,
    };
    match api.list_productions(Request::new(request)).await {
        Ok(r) => {
            let r = r.into_inner();
            Json(ListView {
                productions: r.productions.into_iter().map(Into::into).collect(),
                next_page_token: r.next_page_token,
            })
            .into_response()
        }
        Err(status) => problem(status),
    }
}

async fn one(State(api): State<StatusApi>, Path(production_id): Path<String>) -> Response {
    match api.snapshot(&production_id).await {
        Ok(p) => Json(ProductionView::from(p)).into_response(),
        Err(error) => problem(error.into()),
    }
}

/// Server-sent events: one `production` event with the new snapshot each
/// time a production changes; `resync` when changes were missed (the
/// client reloads the list).
async fn events(
    State(api): State<StatusApi>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut changes = api.snapshots.every();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let caller = prodsys_auth::caller();
    tokio::spawn(async move {
        loop {
            let event = match changes.recv().await {
                Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    Event::default().event("resync").data("")
                }
                // Another VO's production is not sent.
                Ok(Change::Production(p)) if !caller.may_see(&p.vo) => continue,
                Ok(Change::Production(p)) => match Event::default()
                    .event("production")
                    .json_data(ProductionView::from(Arc::unwrap_or_clone(p)))
                {
                    Ok(event) => event,
                    Err(_) => continue,
                },
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// OpenMetrics exposition of the read model's gauges, then the process's
/// own figures (consumer, relay, backlog: `prodsys_telemetry::metrics`).
async fn metrics(State(api): State<StatusApi>) -> Response {
    match render_metrics(&api).await {
        Ok(mut text) => {
            let _ = api.snapshots.encode_figures(&mut text);
            let process = prodsys_telemetry::metrics::metrics();
            let _ = process.encode_families(&mut text);
            let _ = prodsys_telemetry::metrics::finish(&mut text);
            (
                [(
                    header::CONTENT_TYPE,
                    prodsys_telemetry::metrics::CONTENT_TYPE,
                )],
                text,
            )
                .into_response()
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("# metrics unavailable: {error:#}\n"),
        )
            .into_response(),
    }
}

async fn render_metrics(api: &StatusApi) -> anyhow::Result<String> {
    Ok(crate::gauges::encode(store::figures(&api.db).await?))
}

async fn templates_page() -> Html<String> {
    page(TEMPLATES)
}

/// A container template as the dashboard shows it: parameters and their
/// override schemas as JSON values rather than strings.
#[derive(Debug, Serialize)]
struct TemplateView {
    name: String,
    profile: String,
    description: String,
    image: String,
    digest: String,
    runtime: String,
    entrypoint: Vec<String>,
    parameters: serde_json::Value,
    overridable: serde_json::Value,
    derived_from: String,
    version: String,
    /// 0 for a shipped template.
    recorded_unix_ms: i64,
}

impl From<pb::TemplateInfo> for TemplateView {
    fn from(t: pb::TemplateInfo) -> Self {
        let json = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        Self {
            parameters: json(&t.parameters_json),
            overridable: json(&t.overridable_json),
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

/// Filters of `GET /api/templates`, as `ListTemplates` has them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TemplatesQuery {
    profile: String,
    name: String,
}

/// 503 with why, as a problem document: a service this page asks (the
/// checker, the catalog, the dispatcher) did not answer.
fn unreachable(peer: &str, status: &tonic::Status) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        status.code(),
        format!("the {peer} cannot be reached: {}", status.message()),
    )
    .into_response()
}

/// The container templates, shipped and derived, as the checker (which
/// records derivations) answers `ListTemplates`.
async fn templates(State(api): State<StatusApi>, Query(q): Query<TemplatesQuery>) -> Response {
    let mut checker = api.checker.clone();
    let request = pb::ListTemplatesRequest {
        profile: q.profile,
        name: q.name,
    };
    match checker.list_templates(request).await {
        Ok(answer) => Json(serde_json::json!({
            "templates": answer
                .into_inner()
                .templates
                .into_iter()
                .map(TemplateView::from)
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(status) if status.code() == tonic::Code::InvalidArgument => problem(status),
        Err(status) => unreachable("checker", &status),
    }
}

/// `GET /api/productions/{id}/record?format=json|markdown|ro-crate`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RecordQuery {
    format: String,
}

/// A finished production's record, as the catalog renders it: JSON (the
/// default), Markdown for people, or the RO-Crate it catalogues.
async fn record(
    State(api): State<StatusApi>,
    Path(production_id): Path<String>,
    Query(q): Query<RecordQuery>,
) -> Response {
    let (format, content_type) = match q.format.to_ascii_lowercase().as_str() {
        "" | "json" => (pb::RecordFormat::Json, "application/json"),
        "markdown" | "md" => (pb::RecordFormat::Markdown, "text/markdown; charset=utf-8"),
        "ro-crate" | "rocrate" => (pb::RecordFormat::RoCrate, "application/ld+json"),
        other => {
            return Problem::field(
                "format",
                format!("{other:?} is not a format: choose json, markdown or ro-crate"),
            )
            .into_response();
        }
    };
    let mut catalog = api.catalog.clone();
    let request = pb::GetProductionRecordRequest {
        production_id,
        format: format as i32,
    };
    match catalog.get_production_record(request).await {
        Ok(answer) => (
            [(header::CONTENT_TYPE, content_type)],
            answer.into_inner().rendered,
        )
            .into_response(),
        Err(status) if status.code() == tonic::Code::NotFound => problem(status),
        Err(status) => unreachable("catalog", &status),
    }
}

/// An observation period as `GET /api/periods` shows it.
#[derive(Debug, Serialize)]
struct PeriodView {
    name: String,
    profile: String,
    description: String,
    site: String,
    array_layout: String,
    nsb_levels: Vec<u32>,
    atmosphere: String,
    valid_from: String,
    valid_until: String,
    pointings: Vec<serde_json::Value>,
}

impl From<pb::PeriodInfo> for PeriodView {
    fn from(p: pb::PeriodInfo) -> Self {
        Self {
            pointings: p
                .pointings
                .into_iter()
                .map(|q| {
                    serde_json::json!({
                        "zenith_deg": q.zenith_deg, "azimuth_deg": q.azimuth_deg, "label": q.label,
                    })
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

/// The observation periods, as the checker (which decides by them) answers
/// `ListPeriods`; filters `profile` and `name` as for templates.
async fn periods(State(api): State<StatusApi>, Query(q): Query<TemplatesQuery>) -> Response {
    let mut checker = api.checker.clone();
    let request = pb::ListPeriodsRequest {
        profile: q.profile,
        name: q.name,
    };
    match checker.list_periods(request).await {
        Ok(answer) => Json(serde_json::json!({
            "periods": answer
                .into_inner()
                .periods
                .into_iter()
                .map(PeriodView::from)
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(status) if status.code() == tonic::Code::InvalidArgument => problem(status),
        Err(status) => unreachable("checker", &status),
    }
}

/// A production's own page: its state and counts, jobs (paged) with their
/// attempts, WMS status and logs, files and replicas, record, parent and
/// child productions, and a cancel button. The page reads the routes below
/// and `/api/v1` (files, record, cancel).
async fn production_page() -> Html<&'static str> {
    Html(PRODUCTION)
}

/// `GET /api/productions/{id}/jobs?page_size=&page_token=`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JobsQuery {
    page_size: u32,
    page_token: String,
}

/// A job as the production page shows it.
#[derive(Debug, Serialize)]
struct JobView {
    job_index: u64,
    state: String,
    attempt: u32,
    attempts_submitted: u32,
    installation: String,
    /// `local`, `slurm`, `dirac`; empty while it waits to be placed.
    wms: String,
    backend_job_id: String,
    /// DIRAC's Status, Slurm's job state, the local executor's word.
    wms_status: String,
    /// DIRAC's MinorStatus.
    wms_minor_status: String,
    exit_code: Option<i32>,
    run_number: u64,
    updated_unix_ms: i64,
}

impl From<pb::Job> for JobView {
    fn from(j: pb::Job) -> Self {
        let state = prodsys_core::JobState::from_proto(j.state)
            .map_or("UNSPECIFIED", prodsys_core::JobState::as_str)
            .to_string();
        let wms = match pb::WmsKind::try_from(j.wms).unwrap_or(pb::WmsKind::Unspecified) {
            pb::WmsKind::Local => "local",
            pb::WmsKind::Slurm => "slurm",
            pb::WmsKind::Dirac => "dirac",
            pb::WmsKind::Unspecified => "",
        };
        Self {
            job_index: j.job_index,
            state,
            attempt: j.attempt,
            attempts_submitted: j.attempts_submitted,
            installation: j.installation,
            wms: wms.to_string(),
            backend_job_id: j.backend_job_id,
            wms_status: j.wms_status,
            wms_minor_status: j.wms_minor_status,
            exit_code: j.exit_code,
            run_number: j.run_number,
            updated_unix_ms: j.updated_unix_ms,
        }
    }
}

/// A page of a production's jobs, as the dispatcher answers `ListJobs`.
async fn jobs(
    State(api): State<StatusApi>,
    Path(production_id): Path<String>,
    Query(q): Query<JobsQuery>,
) -> Response {
    let mut dispatcher = api.dispatcher.clone();
    let request = pb::ListJobsRequest {
        production_id,
        page_size: q.page_size,
        page_token: q.page_token,
    };
    match dispatcher.list_jobs(request).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            Json(serde_json::json!({
                "jobs": answer.jobs.into_iter().map(JobView::from).collect::<Vec<_>>(),
                "next_page_token": answer.next_page_token,
            }))
            .into_response()
        }
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound
            ) =>
        {
            problem(status)
        }
        Err(status) => unreachable("dispatcher", &status),
    }
}

/// `GET /api/productions/{id}/jobs/{index}/log?max_bytes=`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LogQuery {
    max_bytes: u32,
}

/// The tail of a job's current attempt's logs, as the dispatcher answers
/// `GetJobLog` (`available: false` and why, where its executor keeps none).
async fn job_log(
    State(api): State<StatusApi>,
    Path((production_id, job_index)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Ok(job_index) = job_index.parse::<u64>() else {
        return Problem::field("job_index", format!("{job_index:?} is not a job index"))
            .into_response();
    };
    let mut dispatcher = api.dispatcher.clone();
    let request = pb::GetJobLogRequest {
        production_id,
        job_index,
        max_bytes: q.max_bytes,
    };
    match dispatcher.get_job_log(request).await {
        Ok(answer) => {
            let log = answer.into_inner();
            Json(serde_json::json!({
                "attempt": log.attempt,
                "available": log.available,
                "unavailable_reason": log.unavailable_reason,
                "stdout_tail": log.stdout_tail,
                "stdout_truncated": log.stdout_truncated,
                "stderr_tail": log.stderr_tail,
                "stderr_truncated": log.stderr_truncated,
            }))
            .into_response()
        }
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound
            ) =>
        {
            problem(status)
        }
        Err(status) => unreachable("dispatcher", &status),
    }
}
