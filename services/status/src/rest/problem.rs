//! Problems as RFC 9457 problem details (`application/problem+json`), and
//! the extractors that turn every bad input (malformed JSON, a wrong type,
//! an unknown or missing field, a body too large, a bad query parameter)
//! into one that names the field, never a 5xx.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic_types::StatusExt;
use utoipa::ToSchema;

/// The largest request body accepted (bytes).
pub const BODY_LIMIT: usize = 1 << 20;

/// The largest page size a query may ask for (as the document's int32
/// says; every service then caps it at its own largest page).
pub const PAGE_SIZE_MAX: u32 = i32::MAX as u32;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One field a request got wrong: the same pair the gRPC API gives in its
/// `google.rpc.BadRequest` details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldViolation {
    /// The field, as a path into the request (`parameters.nsb`,
    /// `conditions[0].operator`), a query parameter's or a path parameter's
    /// name, or `body` for the body as a whole.
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A problem details document (RFC 9457).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// `about:blank`: the status code and `code` say what kind of problem.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The status code's reason phrase.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, in words.
    pub detail: String,
    /// The gRPC code the call ended with (`INVALID_ARGUMENT`, `NOT_FOUND`,
    /// `UNAVAILABLE`, …), as gRPC clients see it.
    pub code: &'static str,
    /// The fields at fault; empty when the problem is not one of input.
    pub violations: Vec<FieldViolation>,
}

impl Problem {
    pub fn new(status: StatusCode, code: tonic::Code, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            code: code_name(code),
            violations: Vec::new(),
        }
    }

    /// 400: input that could not be read as the operation's (syntax, types,
    /// unknown or missing fields, query and path parameters).
    pub fn bad_input(violations: Vec<FieldViolation>) -> Self {
        let detail = summary(&violations);
        Self {
            violations,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
                detail,
            )
        }
    }

    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::bad_input(vec![FieldViolation::new(field, description)])
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status.as_u16();
        self.title = status.canonical_reason().unwrap_or("Error");
        self
    }
}

fn summary(violations: &[FieldViolation]) -> String {
    let text = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    format!("invalid request: {text}")
}

/// The HTTP status of a gRPC code: a refusal of the input is 422 (the
/// request was read, the service found fields at fault), a missing thing
/// 404, a conflict with the current state 409, a peer that cannot be
/// reached 503.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<tonic::Status> for Problem {
    fn from(status: tonic::Status) -> Self {
        let violations = status
            .get_details_bad_request()
            .map(|bad| {
                bad.field_violations
                    .into_iter()
                    .map(|v| FieldViolation::new(v.field, v.description))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            violations,
            ..Self::new(
                http_status(status.code()),
                status.code(),
                status.message().to_string(),
            )
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response()
    }
}

/// A field that holds a NUL character, which no service can store: the
/// path of the first found.
fn nul_in(value: &serde_json::Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.to_string()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(join(key))
            } else {
                nul_in(item, &join(key))
            }
        }),
        _ => None,
    }
}

/// The field a serde error names: its path, plus the name of an unknown or
/// missing field (which serde reports at the enclosing object).
fn field_of(path: &str, message: &str, whole: &str) -> String {
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    let path = if path == "." { "" } else { path };
    match named {
        Some(name) if path.is_empty() => name.to_string(),
        Some(name) if !path.ends_with(name) => format!("{path}.{name}"),
        _ if path.is_empty() => whole.to_string(),
        _ => path.to_string(),
    }
}

/// Reads `T` from a JSON document, naming the field of any fault.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        // No body: an empty object (every field its default, or missing).
        &b"{}"[..]
    } else {
        bytes
    };
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Problem::field("body", format!("malformed JSON: {e}")))?;
    if value.is_null() {
        value = serde_json::Value::Object(serde_json::Map::new());
    }
    if !value.is_object() {
        return Err(Problem::field("body", "must be a JSON object"));
    }
    if let Some(field) = nul_in(&value, "") {
        return Err(Problem::field(field, "must not contain a NUL character"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        Problem::field(field_of(&e.path().to_string(), &message, "body"), message)
    })
}

/// A query string read as `T` (`Query` of axum, with every fault a problem
/// naming the parameter, and NUL characters refused).
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let raw = parts.uri.query().unwrap_or_default().as_bytes();
        for (name, value) in form_urlencoded::parse(raw) {
            if name.contains('\0') || value.contains('\0') {
                return Err(Problem::field(
                    name.replace('\0', "\\0"),
                    "must not contain a NUL character",
                ));
            }
        }
        let query = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw));
        serde_path_to_error::deserialize(query)
            .map(Query)
            .map_err(|e| {
                let message = e.inner().to_string();
                Problem::field(field_of(&e.path().to_string(), &message, "query"), message)
            })
    }
}

/// A JSON request body of at most [`BODY_LIMIT`] bytes, read as `T`; an
/// empty body reads as `{}`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, _: &S) -> Result<Self, Problem> {
        let too_large = || {
            Problem::field("body", format!("is larger than {BODY_LIMIT} bytes"))
                .with_status(StatusCode::PAYLOAD_TOO_LARGE)
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(too_large());
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|_| too_large())?;
        if let Some(content_type) = content_type
            && !bytes.is_empty()
        {
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(Problem::field(
                    "Content-Type",
                    format!("{content_type:?}: send application/json"),
                )
                .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
            }
        }
        from_json(&bytes).map(JsonBody)
    }
}

/// The query parameters of a request, checked against the names the
/// operation takes: an unknown name, a repeated one or a NUL character is a
/// violation naming the parameter.
pub struct QueryParams {
    values: BTreeMap<String, String>,
    /// Parameters that may be repeated, in the order given.
    lists: BTreeMap<String, Vec<String>>,
    violations: Vec<FieldViolation>,
}

impl QueryParams {
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Self {
        Self::parse_with_lists(query, allowed, &[])
    }

    /// As [`Self::parse`], with `repeatable` parameters that may be given
    /// several times (read with [`Self::list`]).
    pub fn parse_with_lists(query: Option<&str>, allowed: &[&str], repeatable: &[&str]) -> Self {
        let mut values = BTreeMap::new();
        let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut violations = Vec::new();
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or_default()).unwrap_or_default();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) && !repeatable.contains(&name.as_str()) {
                let expected = [allowed, repeatable].concat().join(", ");
                violations.push(FieldViolation::new(
                    name.replace('\0', "\\0"),
                    format!("unknown parameter; expected one of: {expected}"),
                ));
            } else if value.contains('\0') {
                violations.push(FieldViolation::new(
                    name,
                    "must not contain a NUL character",
                ));
            } else if repeatable.contains(&name.as_str()) {
                lists.entry(name).or_default().push(value);
            } else {
                match values.entry(name) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(value);
                    }
                    std::collections::btree_map::Entry::Occupied(slot) => {
                        violations.push(FieldViolation::new(
                            slot.key().clone(),
                            "is given more than once",
                        ));
                    }
                }
            }
        }
        Self {
            values,
            lists,
            violations,
        }
    }

    /// A repeatable parameter's values; empty when absent.
    pub fn list(&mut self, name: &str) -> Vec<String> {
        self.lists.remove(name).unwrap_or_default()
    }

    /// A text parameter; empty when absent.
    pub fn text(&mut self, name: &str) -> String {
        self.values.remove(name).unwrap_or_default()
    }

    /// A non-negative integer parameter; 0 when absent.
    pub fn count(&mut self, name: &str) -> u32 {
        match self.values.remove(name) {
            None => 0,
            Some(v) if v.is_empty() => 0,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n <= PAGE_SIZE_MAX => n,
                _ => {
                    self.violations.push(FieldViolation::new(
                        name,
                        format!("{v:?} is not an integer in 0..={PAGE_SIZE_MAX}"),
                    ));
                    0
                }
            },
        }
    }

    /// Adds a violation found while reading the parameters.
    pub fn violation(&mut self, field: &str, description: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field, description));
    }

    /// Every violation found, as one problem.
    pub fn finish(self) -> Result<(), Problem> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(Problem::bad_input(self.violations))
        }
    }
}

/// Path parameters read as `T` (`Path` of axum), each UTF-8 without NUL;
/// any fault is a problem naming the parameter.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| Problem::field("path", e.body_text()))?;
        if let Some((name, _)) = raw.iter().find(|(_, value)| value.contains('\0')) {
            return Err(Problem::field(name, "must not contain a NUL character"));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|e| Problem::field("path", e.body_text()))
    }
}

/// The one path parameter of an operation (an ID), UTF-8 without NUL.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Self(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        key: String,
        operator: u8,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        conditions: Vec<Inner>,
    }

    fn fault(text: &str) -> FieldViolation {
        from_json::<Outer>(text.as_bytes())
            .unwrap_err()
            .violations
            .remove(0)
    }

    #[test]
    fn every_fault_names_its_field() {
        assert_eq!(fault("{\"name\": ").field, "body");
        assert_eq!(fault("[1]").field, "body");
        assert_eq!(fault("{\"name\": 3}").field, "name");
        assert_eq!(fault("{\"name\": \"a\", \"extra\": 1}").field, "extra");
        assert_eq!(fault("{}").field, "name");
        assert_eq!(
            fault("{\"name\": \"a\", \"conditions\": [{\"key\": \"k\", \"operator\": -1}]}").field,
            "conditions[0].operator"
        );
        assert_eq!(
            fault(
                "{\"name\": \"a\", \"conditions\": [{\"key\": \"k\", \"operator\": 1, \"x\": 1}]}"
            )
            .field,
            "conditions[0].x"
        );
        assert_eq!(
            fault("{\"name\": \"a\", \"conditions\": [{\"operator\": 1}]}").field,
            "conditions[0].key"
        );
        assert_eq!(fault("{\"name\": \"a\\u0000\"}").field, "name");
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let mut q = QueryParams::parse(
            Some("vo=x&page_size=abc&bogus=1&vo=y"),
            &["vo", "page_size"],
        );
        assert_eq!(q.text("vo"), "x");
        assert_eq!(q.count("page_size"), 0);
        let problem = q.finish().unwrap_err();
        let fields: Vec<_> = problem
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["bogus", "vo", "page_size"]);
        assert_eq!(problem.status, 400);
    }

    #[test]
    fn grpc_codes_map_onto_http_statuses() {
        let refused = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "invalid request",
            tonic_types::ErrorDetails::with_bad_request_violation("parameters.nsb", "must be > 0"),
        );
        let problem = Problem::from(refused);
        assert_eq!(problem.status, 422);
        assert_eq!(problem.code, "INVALID_ARGUMENT");
        assert_eq!(
            problem.violations,
            [FieldViolation::new("parameters.nsb", "must be > 0")]
        );
        assert_eq!(Problem::from(tonic::Status::not_found("no")).status, 404);
        assert_eq!(
            Problem::from(tonic::Status::failed_precondition("ended")).status,
            409
        );
        assert_eq!(
            Problem::from(tonic::Status::unavailable("down")).status,
            503
        );
    }
}
