//! The HTTP/JSON API under `/api/v1`, for science platforms (ESAP) and plain
//! HTTP clients: submit, validate and follow requests, list and cancel
//! productions, query files, read records, profiles, templates and periods.
//! Each operation is one gRPC call to the service that owns it (intake, the
//! status read model, the catalog, the checker); its OpenAPI 3.1 document,
//! generated from these handlers and types, is served at `/openapi.json`.
//! Every failure is a problem document (RFC 9457) with the field violations
//! the gRPC API gives.

mod problem;
mod views;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{any, get, post};
use prodsys_core::ProductionState;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_proto::status_service_server::StatusService;
use serde_json::{Map, Value};
use utoipa::{IntoParams, OpenApi};

use crate::api::StatusApi;
pub use problem::{FieldViolation, Path, Problem, Query};
use problem::{JsonBody, PathId, QueryParams};
use views::*;

type Answer<T> = Result<T, Problem>;

pub(crate) fn router() -> Router<StatusApi> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/api/v1/requests", post(submit))
        .route("/api/v1/requests/validate", post(validate))
        .route("/api/v1/requests/{request_id}", get(request))
        .route("/api/v1/productions", get(productions))
        .route("/api/v1/productions/{production_id}", get(production))
        .route("/api/v1/productions/{production_id}/cancel", post(cancel))
        .route("/api/v1/productions/{production_id}/record", get(record))
        .route("/api/v1/files", get(files_by_query))
        .route("/api/v1/files/search", post(files))
        .route("/api/v1/profiles", get(profiles))
        .route("/api/v1/templates", get(templates))
        .route("/api/v1/periods", get(periods))
        .route("/api/v1/{*rest}", any(no_such_operation))
        .method_not_allowed_fallback(method_not_allowed)
}

/// A method an operation's path does not take: a problem too (axum adds
/// the `Allow` header).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        tonic::Code::Unimplemented,
        format!("{method} is not an operation of {}", uri.path()),
    )
}

/// Any other path under `/api/v1`: a problem, as every answer here.
async fn no_such_operation(uri: axum::http::Uri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        tonic::Code::NotFound,
        format!("no operation at {}; see /openapi.json", uri.path()),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prodsys HTTP/JSON API",
        description = "Submit and follow production requests, list and cancel productions, \
            query the file catalog and read production records. Every failure is an RFC 9457 \
            problem document (application/problem+json) with the field violations the gRPC API \
            gives."
    ),
    paths(
        submit, validate, request, productions, production, cancel, record, files,
        files_by_query, profiles, templates, periods
    ),
    components(schemas(Problem, FieldViolation)),
    tags(
        (name = "requests", description = "Production requests (intake)"),
        (name = "productions", description = "Productions (status read model, catalog records)"),
        (name = "files", description = "The file catalog"),
        (name = "configuration", description = "Profiles, container templates, observation periods"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document of `/api/v1`.
async fn openapi() -> Response {
    Json(document()).into_response()
}

/// The generated document, with its response links' fields named as
/// OpenAPI names them (`operationId`, `requestBody`: utoipa 5 writes its
/// Rust field names there).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let operations = doc
        .get_mut("paths")
        .and_then(Value::as_object_mut)
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|methods| methods.values_mut());
    for operation in operations {
        let links = operation
            .get_mut("responses")
            .and_then(Value::as_object_mut)
            .into_iter()
            .flat_map(|responses| responses.values_mut())
            .filter_map(|response| response.get_mut("links").and_then(Value::as_object_mut))
            .flat_map(|links| links.values_mut())
            .filter_map(Value::as_object_mut);
        for link in links {
            for (from, to) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(value) = link.remove(from) {
                    link.insert(to.into(), value);
                }
            }
        }
    }
    doc
}

/// Submits a production request; the checker decides it asynchronously
/// (follow it at `/api/v1/requests/{request_id}`).
#[utoipa::path(
    post, path = "/api/v1/requests", tag = "requests",
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Stored; decided asynchronously", body = Submitted,
            headers(("Location" = String, description = "The request's URL")),
            links(("GetRequest" = (
                operation_id = "request",
                parameters(("request_id" = "$response.body#/request_id"))
            )))),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn submit(State(api): State<StatusApi>, JsonBody(body): JsonBody<SubmitBody>) -> Response {
    let mut intake = api.intake.clone();
    match intake
        .submit_request(pb::SubmitRequestRequest::from(body))
        .await
    {
        Ok(answer) => {
            let answer = answer.into_inner();
            let location = format!("/api/v1/requests/{}", answer.request_id);
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(Submitted {
                    request_id: answer.request_id,
                    replayed: answer.replayed,
                }),
            )
                .into_response()
        }
        Err(status) => Problem::from(status).into_response(),
    }
}

/// A dry run: what the checker would decide now (violations, duplicates,
/// overlaps, job plan, estimate). Nothing is stored.
#[utoipa::path(
    post, path = "/api/v1/requests/validate", tag = "requests",
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The verdict", body = Validation),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn validate(
    State(api): State<StatusApi>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Answer<Json<Validation>> {
    let mut intake = api.intake.clone();
    let answer = intake
        .validate_request(pb::SubmitRequestRequest::from(body))
        .await?;
    Ok(Json(answer.into_inner().into()))
}

/// Where a request stands: received, accepted (with its production) or
/// rejected (with its violations).
#[utoipa::path(
    get, path = "/api/v1/requests/{request_id}", tag = "requests",
    params(("request_id" = String, Path, description = "As submit answered it")),
    responses(
        (status = 200, description = "The request", body = RequestView,
            links(("GetProduction" = (
                operation_id = "production",
                parameters(("production_id" = "$response.body#/production_id"))
            )))),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn request(
    State(api): State<StatusApi>,
    PathId(request_id): PathId,
) -> Answer<Json<RequestView>> {
    let mut intake = api.intake.clone();
    let answer = intake
        .get_request(pb::GetRequestRequest { request_id })
        .await?;
    Ok(Json(answer.into_inner().into()))
}

/// Filters of `GET /api/v1/productions`, as `ListProductions` has them.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ProductionFilters {
    /// Only this virtual organisation's.
    vo: Option<String>,
    /// Only this profile's.
    profile: Option<String>,
    /// Only productions in this state (`RUNNING`, `COMPLETED`, …).
    state: Option<String>,
    /// Only this request's productions.
    request_id: Option<String>,
    /// Productions per page (a default when 0).
    page_size: Option<u32>,
    /// The `next_page_token` of the page before.
    page_token: Option<String>,
}

/// A page of productions, newest first, with filters.
#[utoipa::path(
    get, path = "/api/v1/productions", tag = "productions",
    params(ProductionFilters),
    responses(
        (status = 200, description = "A page of productions", body = ProductionPage,
            links(
                ("GetProduction" = (
                    operation_id = "production",
                    parameters(("production_id" = "$response.body#/productions/0/production_id"))
                )),
                ("GetRecord" = (
                    operation_id = "record",
                    parameters(("production_id" = "$response.body#/productions/0/production_id"))
                )),
                ("Cancel" = (
                    operation_id = "cancel",
                    parameters(("production_id" = "$response.body#/productions/0/production_id"))
                )),
            )),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn productions(
    State(api): State<StatusApi>,
    RawQuery(query): RawQuery,
) -> Answer<Json<ProductionPage>> {
    let mut q = QueryParams::parse(
        query.as_deref(),
        &[
            "vo",
            "profile",
            "state",
            "request_id",
            "page_size",
            "page_token",
        ],
    );
    let state = q.text("state");
    let state = if state.is_empty() {
        pb::ProductionState::Unspecified
    } else {
        match state.to_ascii_uppercase().parse::<ProductionState>() {
            Ok(state) => state.to_proto(),
            Err(error) => {
                q.violation("state", error.to_string());
                pb::ProductionState::Unspecified
            }
        }
    };
    let request = pb::ListProductionsRequest {
        vo: q.text("vo"),
        state: state as i32,
        profile: q.text("profile"),
        page_size: q.count("page_size"),
        page_token: q.text("page_token"),
        request_id: q.text("request_id"),
    };
    q.finish()?;
    let answer = api
        .list_productions(tonic::Request::new(request))
        .await?
        .into_inner();
    Ok(Json(ProductionPage {
        productions: answer.productions.into_iter().map(Into::into).collect(),
        next_page_token: answer.next_page_token,
    }))
}

/// A production: state, job counts, forwarding.
#[utoipa::path(
    get, path = "/api/v1/productions/{production_id}", tag = "productions",
    params(("production_id" = String, Path)),
    responses(
        (status = 200, description = "The production", body = ProductionView,
            links(("GetRequest" = (
                operation_id = "request",
                parameters(("request_id" = "$response.body#/request_id"))
            )))),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn production(
    State(api): State<StatusApi>,
    PathId(production_id): PathId,
) -> Answer<Json<ProductionView>> {
    let answer = api
        .get_production(tonic::Request::new(pb::GetProductionRequest {
            production_id,
        }))
        .await?;
    Ok(Json(answer.into_inner().into()))
}

/// Stops a production: its queued and running jobs are killed, the rest
/// never start, and it ends CANCELLED.
#[utoipa::path(
    post, path = "/api/v1/productions/{production_id}/cancel", tag = "productions",
    params(("production_id" = String, Path)),
    request_body(content = Option<CancelBody>, content_type = "application/json"),
    responses(
        (status = 202, description = "The cancellation is on its way", body = Cancelled),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn cancel(
    State(api): State<StatusApi>,
    PathId(production_id): PathId,
    JsonBody(body): JsonBody<CancelBody>,
) -> Answer<(StatusCode, Json<Cancelled>)> {
    let mut intake = api.intake.clone();
    let answer = intake
        .cancel_production(pb::CancelProductionRequest {
            production_id,
            reason: body.reason,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Cancelled {
            accepted: answer.into_inner().accepted,
        }),
    ))
}

/// A finished production's record (who asked for what, how its jobs went,
/// what it wrote), as the catalog keeps it; 404 until it is written.
#[utoipa::path(
    get, path = "/api/v1/productions/{production_id}/record", tag = "productions",
    params(("production_id" = String, Path)),
    responses(
        (status = 200, description = "The record", body = Object),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn record(
    State(api): State<StatusApi>,
    PathId(production_id): PathId,
) -> Answer<Json<Map<String, Value>>> {
    let mut catalog = api.catalog.clone();
    let answer = catalog
        .get_production_record(pb::GetProductionRecordRequest {
            production_id,
            format: pb::RecordFormat::Json as i32,
        })
        .await?;
    Ok(Json(object(&answer.into_inner().rendered)))
}

/// A page of files (in LFN order) matching every condition, with their
/// replicas: the conditions of gRPC `FindFiles`.
#[utoipa::path(
    post, path = "/api/v1/files/search", tag = "files",
    request_body(content = FilesQuery, content_type = "application/json"),
    responses(
        (status = 200, description = "A page of files", body = FilePage),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn files(
    State(api): State<StatusApi>,
    JsonBody(query): JsonBody<FilesQuery>,
) -> Answer<Json<FilePage>> {
    if query.page_size > problem::PAGE_SIZE_MAX {
        return Err(Problem::field(
            "page_size",
            format!("must be at most {}", problem::PAGE_SIZE_MAX),
        ));
    }
    let mut catalog = api.catalog.clone();
    let answer = catalog
        .find_files(pb::FindFilesRequest::from(query))
        .await?;
    Ok(Json(answer.into_inner().into()))
}

/// The query of `GET /api/v1/files`: `POST /api/v1/files/search` with its
/// conditions written in the query string.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct FileFilters {
    /// Only this production's files.
    production_id: Option<String>,
    /// Only files of this dataset.
    dataset: Option<String>,
    /// Only files whose LFN starts with this.
    lfn_prefix: Option<String>,
    /// A condition on a metadata value, `<key><op><value>` with op `=`, `!=`,
    /// `<`, `<=`, `>`, `>=`, or `<key> in <v1>,<v2>,…`; repeat for several
    /// (all must hold).
    condition: Option<Vec<String>>,
    /// Files per page (the catalog's default when 0).
    page_size: Option<u32>,
    /// The `next_page_token` of the page before.
    page_token: Option<String>,
}

/// `nsb in 1,5` or `run_number>=2` as a condition.
fn condition(text: &str) -> Result<pb::MetadataCondition, String> {
    use pb::ConditionOperator as Op;
    let lower = text.to_ascii_lowercase();
    let (key, operator, values) = if let Some(at) = lower.find(" in ") {
        let values = text[at + 4..].split(',').map(|v| v.trim().to_string());
        (&text[..at], Op::In, values.collect())
    } else {
        let (at, symbol, operator) = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("!=", Op::Ne),
            ("=", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find_map(|(symbol, op)| text.find(symbol).map(|at| (at, symbol, op)))
        .ok_or_else(|| {
            format!(
                "{text:?}: write <key><op><value> (op =, !=, <, <=, >, >=) or <key> in <v1>,<v2>"
            )
        })?;
        let value = text[at + symbol.len()..].trim().to_string();
        (&text[..at], operator, vec![value])
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("{text:?}: names no metadata key"));
    }
    Ok(pb::MetadataCondition {
        key: key.to_string(),
        operator: operator as i32,
        values,
    })
}

/// A page of files (in LFN order) as `POST /api/v1/files/search` finds
/// them, the conditions in the query string (`condition=nsb in 1,5`).
#[utoipa::path(
    get, path = "/api/v1/files", tag = "files",
    params(FileFilters),
    responses(
        (status = 200, description = "A page of files", body = FilePage),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn files_by_query(
    State(api): State<StatusApi>,
    RawQuery(query): RawQuery,
) -> Answer<Json<FilePage>> {
    let mut q = QueryParams::parse_with_lists(
        query.as_deref(),
        &[
            "production_id",
            "dataset",
            "lfn_prefix",
            "page_size",
            "page_token",
        ],
        &["condition"],
    );
    let mut conditions = Vec::new();
    for (i, text) in q.list("condition").into_iter().enumerate() {
        match condition(&text) {
            Ok(c) => conditions.push(c),
            Err(why) => q.violation(&format!("condition[{i}]"), why),
        }
    }
    let request = pb::FindFilesRequest {
        metadata_by_class: false,
        production_id: q.text("production_id"),
        metadata: Default::default(),
        page_size: q.count("page_size"),
        page_token: q.text("page_token"),
        conditions,
        lfn_prefix: q.text("lfn_prefix"),
        dataset: q.text("dataset"),
    };
    q.finish()?;
    let mut catalog = api.catalog.clone();
    let answer = catalog.find_files(request).await?;
    Ok(Json(answer.into_inner().into()))
}

/// The production profiles this deployment accepts.
#[utoipa::path(
    get, path = "/api/v1/profiles", tag = "configuration",
    responses(
        (status = 200, description = "The profiles", body = Profiles),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn profiles(
    State(api): State<StatusApi>,
    RawQuery(query): RawQuery,
) -> Answer<Json<Profiles>> {
    QueryParams::parse(query.as_deref(), &[]).finish()?;
    let mut intake = api.intake.clone();
    let answer = intake.list_profiles(pb::ListProfilesRequest {}).await?;
    Ok(Json(Profiles {
        profiles: answer
            .into_inner()
            .profiles
            .into_iter()
            .map(|p| Profile {
                parameters_schema: object(&p.parameters_schema_json),
                name: p.name,
                description: p.description,
                vos: p.vos,
                id_prefix: p.id_prefix,
                identity: p.identity,
            })
            .collect(),
    }))
}

/// Filters of templates and periods.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ByProfile {
    /// Only this profile's.
    profile: Option<String>,
    /// Only the one of this name.
    name: Option<String>,
}

fn by_profile(query: Option<&str>) -> Answer<(String, String)> {
    let mut q = QueryParams::parse(query, &["profile", "name"]);
    let filters = (q.text("profile"), q.text("name"));
    q.finish()?;
    Ok(filters)
}

/// The container templates requests may name: shipped, and derived by
/// earlier requests.
#[utoipa::path(
    get, path = "/api/v1/templates", tag = "configuration",
    params(ByProfile),
    responses(
        (status = 200, description = "The templates", body = Templates),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn templates(
    State(api): State<StatusApi>,
    RawQuery(query): RawQuery,
) -> Answer<Json<Templates>> {
    let (profile, name) = by_profile(query.as_deref())?;
    let mut checker = api.checker.clone();
    let answer = checker
        .list_templates(pb::ListTemplatesRequest { profile, name })
        .await?;
    Ok(Json(Templates {
        templates: answer
            .into_inner()
            .templates
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

/// The observation periods requests may name.
#[utoipa::path(
    get, path = "/api/v1/periods", tag = "configuration",
    params(ByProfile),
    responses(
        (status = 200, description = "The periods", body = Periods),
        (status = "default", description = "A problem", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn periods(State(api): State<StatusApi>, RawQuery(query): RawQuery) -> Answer<Json<Periods>> {
    let (profile, name) = by_profile(query.as_deref())?;
    let mut checker = api.checker.clone();
    let answer = checker
        .list_periods(pb::ListPeriodsRequest { profile, name })
        .await?;
    Ok(Json(Periods {
        periods: answer
            .into_inner()
            .periods
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_are_read_from_the_query_string() {
        let c = condition("nsb in 1, 5").unwrap();
        assert_eq!(
            (c.key.as_str(), c.operator, c.values),
            (
                "nsb",
                pb::ConditionOperator::In as i32,
                vec!["1".to_string(), "5".to_string()]
            )
        );
        let c = condition("run_number>=2").unwrap();
        assert_eq!(
            (c.key.as_str(), c.operator, c.values),
            (
                "run_number",
                pb::ConditionOperator::Ge as i32,
                vec!["2".to_string()]
            )
        );
        let c = condition("particle != gamma").unwrap();
        assert_eq!(
            (c.key.as_str(), c.operator),
            ("particle", pb::ConditionOperator::Ne as i32)
        );
        assert!(condition("nsb").is_err());
        assert!(condition("=1").is_err());
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_operation() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/api/v1/requests",
            "/api/v1/requests/validate",
            "/api/v1/requests/{request_id}",
            "/api/v1/productions",
            "/api/v1/productions/{production_id}",
            "/api/v1/productions/{production_id}/cancel",
            "/api/v1/productions/{production_id}/record",
            "/api/v1/files/search",
            "/api/v1/files",
            "/api/v1/profiles",
            "/api/v1/templates",
            "/api/v1/periods",
        ] {
            assert!(paths.contains_key(path), "{path}");
        }
        let link =
            &doc["paths"]["/api/v1/requests"]["post"]["responses"]["202"]["links"]["GetRequest"];
        assert_eq!(link["operationId"], "request", "{link}");
        let submit = &doc["components"]["schemas"]["SubmitBody"];
        assert_eq!(submit["additionalProperties"], false, "{submit}");
    }
}
