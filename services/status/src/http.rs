//! The status service's HTTP face, served on its gRPC port (which also takes
//! HTTP/1.1): a dashboard of productions that updates live as events arrive
//! (server-sent events), the same read model as JSON, and Prometheus metrics.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use prodsys_core::ProductionState;
use prodsys_db::Cached;
use prodsys_proto as pb;
use prodsys_proto::status_service_server::StatusService;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tonic::Request;

use crate::StatusApi;

const DASHBOARD: &str = include_str!("dashboard.html");

pub(crate) fn router(api: StatusApi) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/productions", get(list))
        .route("/api/productions/{production_id}", get(one))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .with_state(api)
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
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
    counts: CountsView,
    held_reason: String,
    updated_unix_ms: i64,
}

#[derive(Debug, Serialize)]
struct CountsView {
    created: u64,
    submitted: u64,
    queued: u64,
    running: u64,
    done: u64,
    failed: u64,
    cancelled: u64,
    exhausted: u64,
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
            counts: CountsView {
                created: c.created,
                submitted: c.submitted,
                queued: c.queued,
                running: c.running,
                done: c.done,
                failed: c.failed,
                cancelled: c.cancelled,
                exhausted: c.exhausted,
            },
            held_reason: p.held_reason,
            updated_unix_ms: p.updated_unix_ms,
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
}

fn problem(status: tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(serde_json::json!({ "error": status.message() }))).into_response()
}

async fn list(State(api): State<StatusApi>, Query(q): Query<ListQuery>) -> Response {
    let state = if q.state.is_empty() {
        pb::ProductionState::Unspecified
    } else {
        match q.state.to_ascii_uppercase().parse::<ProductionState>() {
            Ok(state) => state.to_proto(),
            Err(error) => {
                return problem(tonic::Status::invalid_argument(format!("state: {error}")));
            }
        }
    };
    let request = pb::ListProductionsRequest {
        vo: q.vo,
        state: state as i32,
        profile: q.profile,
        page_size: q.page_size,
        page_token: q.page_token,
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
    let mut changes = api.changes.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        loop {
            let event = match changes.recv().await {
                Ok(id) if id.is_empty() => Event::default().event("resync").data(""),
                Ok(id) => match api.snapshot(&id).await {
                    Ok(p) => match Event::default()
                        .event("production")
                        .json_data(ProductionView::from(p))
                    {
                        Ok(event) => event,
                        Err(_) => continue,
                    },
                    Err(_) => continue,
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Event::default().event("resync").data("")
                }
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

/// Prometheus text exposition of the read model.
async fn metrics(State(api): State<StatusApi>) -> Response {
    match render_metrics(&api).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("# metrics unavailable: {error:#}\n"),
        )
            .into_response(),
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every production's job counts: final ones where a production ended, else projected.
const COUNTED: &str = "(SELECT state, n FROM final_counts
     UNION ALL
     SELECT state, n FROM job_counts j
     WHERE NOT EXISTS (SELECT 1 FROM final_counts f WHERE f.production_id = j.production_id)) AS c";

async fn render_metrics(api: &StatusApi) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let client = api.db.client().await?;
    let mut out = String::new();
    out.push_str("# HELP prodsys_productions Productions in the status read model, by state.\n");
    out.push_str("# TYPE prodsys_productions gauge\n");
    for row in client
        .query_cached(
            "SELECT state, count(*) FROM productions GROUP BY state ORDER BY state",
            &[],
        )
        .await?
    {
        let _ = writeln!(
            out,
            "prodsys_productions{{state=\"{}\"}} {}",
            label(row.get(0)),
            row.get::<_, i64>(1)
        );
    }
    out.push_str("# HELP prodsys_jobs Jobs of all productions, by state (CREATED: not yet mentioned by any event).\n");
    out.push_str("# TYPE prodsys_jobs gauge\n");
    let row = client
        .query_one_cached(
            &format!(
                "SELECT COALESCE(sum(job_total), 0)::bigint - (SELECT COALESCE(sum(n), 0)::bigint FROM {COUNTED})
                 FROM productions"
            ),
            &[],
        )
        .await?;
    let unmentioned: i64 = row.get(0);
    let mut created_seen = 0;
    let mut lines = Vec::new();
    for row in client
        .query_cached(
            &format!("SELECT state, sum(n)::bigint FROM {COUNTED} GROUP BY state ORDER BY state"),
            &[],
        )
        .await?
    {
        let state: &str = row.get(0);
        let n: i64 = row.get(1);
        if state == "CREATED" {
            created_seen = n;
            continue;
        }
        lines.push(format!("prodsys_jobs{{state=\"{}\"}} {n}", label(state)));
    }
    let _ = writeln!(
        out,
        "prodsys_jobs{{state=\"CREATED\"}} {}",
        created_seen + unmentioned.max(0)
    );
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    out.push_str(
        "# HELP prodsys_installation_up 1 when the WMS installation answers, 0 while it fails.\n",
    );
    out.push_str("# TYPE prodsys_installation_up gauge\n");
    for row in client
        .query_cached("SELECT name, healthy FROM installations ORDER BY name", &[])
        .await?
    {
        let _ = writeln!(
            out,
            "prodsys_installation_up{{installation=\"{}\"}} {}",
            label(row.get(0)),
            u8::from(row.get::<_, bool>(1))
        );
    }
    Ok(out)
}
