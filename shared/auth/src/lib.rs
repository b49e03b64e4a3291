//! Who may call prodsys, and over what.
//!
//! Every service port (gRPC and the status service's HTTP) is served behind
//! [`AuthLayer`]: a call carries a bearer JWT of the WLCG profile (the
//! `authorization` header, or on an HTTP GET the `access_token` query
//! parameter of RFC 6750, which browsers' `EventSource` needs), checked
//! against the configured issuers — signature by the issuer's keys (OpenID
//! Connect discovery, keys cached and fetched again when a token names an
//! unknown `kid`), `iss`, `aud`, `exp` and `nbf` with a small leeway — and
//! the scope its operation needs ([`need`]). The caller it admits, a
//! [`Caller`], is in the request's extensions and, for the whole handling of
//! the call, in a task-local that [`caller`] reads: handlers filter by its
//! VOs, record its subject as the submitter, and check ownership on cancel.
//!
//! The development mode (no tokens, every caller may do everything) is
//! allowed only on loopback addresses ([`Auth::check_bind`]).
//!
//! Between services, [`Credentials`] puts a bearer on every outgoing call:
//! the caller's own token where a service acts for it (the status service's
//! HTTP API asking intake or the catalog), otherwise the internal token the
//! services share.

pub mod tls;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use secrecy::ExposeSecret;
use tonic::Status;

pub use verify::Verifier;

/// Scope to submit and validate requests.
pub const COMPUTE_CREATE: &str = "compute.create";
/// Scope to read requests, productions, files and records.
pub const COMPUTE_READ: &str = "compute.read";
/// Scope to cancel productions.
pub const COMPUTE_CANCEL: &str = "compute.cancel";
/// Scope to stream a production's files for download.
pub const STORAGE_READ: &str = "storage.read";

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    kind: Kind,
    /// `sub` of the token.
    pub subject: String,
    /// `preferred_username` (or `name`) of the token, when it has one.
    pub name: String,
    /// `iss` of the token.
    pub issuer: String,
    pub vos: BTreeSet<String>,
    pub groups: BTreeSet<String>,
    pub scopes: BTreeSet<String>,
    token: Option<Arc<str>>,
    managers: Arc<BTreeMap<String, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Development mode: no tokens, anything goes.
    Dev,
    /// Another prodsys service (the internal token), or code not reached
    /// through a port (a consumer, a test calling a handler directly).
    Internal,
    /// A token's bearer.
    User,
}

impl Caller {
    /// A caller of `kind` with no identity, VO, group or scope.
    fn empty(kind: Kind) -> Self {
        Self {
            kind,
            subject: String::new(),
            name: String::new(),
            issuer: String::new(),
            vos: BTreeSet::new(),
            groups: BTreeSet::new(),
            scopes: BTreeSet::new(),
            token: None,
            managers: Arc::default(),
        }
    }

    /// The caller of code not reached through a port.
    pub fn internal() -> Self {
        Self::empty(Kind::Internal)
    }

    /// Whether the port runs in the development mode (no tokens).
    pub fn is_dev(&self) -> bool {
        self.kind == Kind::Dev
    }

    /// Whether what the caller sees is limited to its VOs.
    pub fn is_restricted(&self) -> bool {
        self.kind == Kind::User
    }

    /// Whether the caller may see what belongs to `vo`.
    pub fn may_see(&self, vo: &str) -> bool {
        !self.is_restricted() || self.vos.contains(vo)
    }

    /// The VOs the caller may see; `None` for all.
    pub fn visible_vos(&self) -> Option<Vec<String>> {
        self.is_restricted()
            .then(|| self.vos.iter().cloned().collect())
    }

    /// PERMISSION_DENIED naming `field` unless the caller carries `vo`.
    #[allow(clippy::result_large_err)]
    pub fn may_act_for(&self, field: &str, vo: &str) -> Result<(), Status> {
        if self.may_see(vo) {
            return Ok(());
        }
        let carried: Vec<&str> = self.vos.iter().map(String::as_str).collect();
        let description = format!(
            "the token does not carry VO {vo:?} (it carries {})",
            if carried.is_empty() {
                "none".to_string()
            } else {
                carried.join(", ")
            }
        );
        let mut details = tonic_types::ErrorDetails::new();
        details.add_bad_request_violation(field, description.clone());
        Err(<Status as tonic_types::StatusExt>::with_error_details(
            tonic::Code::PermissionDenied,
            format!("{field}: {description}"),
            details,
        ))
    }

    /// Who submits: with tokens, the token's subject (and its preferred
    /// name); otherwise what the request declares.
    pub fn submitter(&self, declared: &str) -> String {
        if !self.is_restricted() {
            return declared.to_string();
        }
        if self.name.is_empty() || self.name == self.subject {
            self.subject.clone()
        } else {
            format!("{} ({})", self.name, self.subject)
        }
    }

    /// The owner recorded with what the caller submits: its issuer and
    /// subject; `None` without a token.
    pub fn owner(&self) -> Option<String> {
        self.is_restricted()
            .then(|| format!("{} {}", self.issuer, self.subject))
    }

    /// Whether the caller is in the production-manager group of `vo`.
    pub fn manages(&self, vo: &str) -> bool {
        self.managers
            .get(vo)
            .is_some_and(|group| self.groups.contains(group))
    }

    /// Whether the caller may cancel a production of `vo` whose request
    /// `owner` made: its own, or any of the VO as its production manager.
    pub fn may_cancel(&self, vo: &str, owner: Option<&str>) -> bool {
        if !self.is_restricted() {
            return true;
        }
        self.may_see(vo) && (self.manages(vo) || owner == self.owner().as_deref())
    }

    /// The caller's bearer token, passed on by services acting for it.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the call being handled; [`Caller::internal`] outside any.
pub fn caller() -> Caller {
    CALLER
        .try_with(Caller::clone)
        .unwrap_or_else(|_| Caller::internal())
}

/// Runs `future` as `caller`'s.
pub fn scope<F: Future>(caller: Caller, future: F) -> impl Future<Output = F::Output> {
    CALLER.scope(caller, future)
}

/// Spawns `future` as the current caller's (a stream fed by a task).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(scope(caller(), future))
}

/// What an operation needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing (health, the OpenAPI document).
    Open,
    /// A valid token with this scope.
    Scope(&'static str),
    /// A valid token, any scope (server reflection).
    Token,
    /// Another prodsys service (the internal token).
    Internal,
}

/// The scope each operation of every port needs: gRPC methods by path, the
/// status service's HTTP routes by method and path.
pub fn need(method: &http::Method, path: &str) -> Need {
    if let Some(rest) = path.strip_prefix("/prodsys.v1.") {
        let (service, operation) = rest.split_once('/').unwrap_or((rest, ""));
        return match (service, operation) {
            ("RequestService", "SubmitRequest" | "ValidateRequest") => Need::Scope(COMPUTE_CREATE),
            ("RequestService", "CancelProduction") => Need::Scope(COMPUTE_CANCEL),
            ("CheckerService", "Evaluate") => Need::Scope(COMPUTE_CREATE),
            ("CatalogService", "StreamFiles") => Need::Scope(STORAGE_READ),
            ("CatalogService", "FindExisting" | "FindExistingMany") => Need::Scope(COMPUTE_CREATE),
            ("CatalogService", "RegisterFiles") => Need::Internal,
            _ => Need::Scope(COMPUTE_READ),
        };
    }
    if path.starts_with("/grpc.health.") {
        return Need::Open;
    }
    if path.starts_with("/grpc.reflection.") {
        return Need::Token;
    }
    if path == "/openapi.json" {
        return Need::Open;
    }
    if method == http::Method::POST {
        if path == "/api/v1/requests" || path == "/api/v1/requests/validate" {
            return Need::Scope(COMPUTE_CREATE);
        }
        if path.starts_with("/api/v1/productions/") && path.ends_with("/cancel") {
            return Need::Scope(COMPUTE_CANCEL);
        }
    }
    Need::Scope(COMPUTE_READ)
}

const NO_TOKEN: &str = "a bearer token is required (authorization: Bearer <token>)";

/// Why a call is refused before it reaches its handler.
#[derive(Debug)]
pub enum Denial {
    /// No token, or one that does not verify: UNAUTHENTICATED / 401.
    Unauthenticated(String),
    /// A valid token without what the operation needs: PERMISSION_DENIED / 403.
    Forbidden(String),
    /// The issuer's keys cannot be fetched: UNAVAILABLE / 503.
    Unavailable(String),
}

impl Denial {
    fn message(&self) -> &str {
        match self {
            Denial::Unauthenticated(m) | Denial::Forbidden(m) | Denial::Unavailable(m) => m,
        }
    }

    /// The answer: a gRPC status to a gRPC call, else an RFC 9457 problem.
    pub fn response(&self, grpc: bool) -> http::Response<tonic::body::Body> {
        if grpc {
            let status = match self {
                Denial::Unauthenticated(m) => Status::unauthenticated(m.clone()),
                Denial::Forbidden(m) => Status::permission_denied(m.clone()),
                Denial::Unavailable(m) => Status::unavailable(m.clone()),
            };
            return status.into_http();
        }
        let (status, title, code, challenge) = match self {
            Denial::Unauthenticated(_) => (
                http::StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "UNAUTHENTICATED",
                Some("invalid_token"),
            ),
            Denial::Forbidden(_) => (
                http::StatusCode::FORBIDDEN,
                "Forbidden",
                "PERMISSION_DENIED",
                Some("insufficient_scope"),
            ),
            Denial::Unavailable(_) => (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "UNAVAILABLE",
                None,
            ),
        };
        let body = serde_json::json!({
            "type": "about:blank",
            "title": title,
            "status": status.as_u16(),
            "detail": self.message(),
            "code": code,
        });
        let mut response = http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/problem+json");
        if let Some(error) = challenge {
            // No error code when no token was sent (RFC 6750, 3.1).
            let challenge = if self.message() == NO_TOKEN {
                "Bearer realm=\"prodsys\"".to_string()
            } else {
                let description = self.message().replace(['"', '\\'], "'");
                format!(
                    "Bearer realm=\"prodsys\", error=\"{error}\", error_description=\"{description}\""
                )
            };
            response = response.header(http::header::WWW_AUTHENTICATE, challenge);
        }
        response
            .body(tonic::body::Body::new(http_body_full(body.to_string())))
            .unwrap_or_default()
    }
}

fn http_body_full(text: String) -> tonic::body::Body {
    tonic::body::Body::new(FullBody(Some(bytes::Bytes::from(text))))
}

/// A body of one chunk.
struct FullBody(Option<bytes::Bytes>);

impl http_body::Body for FullBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// The admission of every port: the development mode, or tokens.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    dev_mode: bool,
    verifier: Option<Verifier>,
    internal: Option<Arc<str>>,
    managers: Arc<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("dev_mode", &self.inner.dev_mode)
            .finish_non_exhaustive()
    }
}

/// The internal token of the settings (its file read), if any.
pub fn internal_token(settings: &prodsys_config::Settings) -> anyhow::Result<Option<Arc<str>>> {
    let auth = &settings.auth;
    if let Some(token) = &auth.internal_token {
        return Ok(Some(Arc::from(token.expose_secret().trim())));
    }
    if let Some(path) = &auth.internal_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("auth.internal_token_file: reading {}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(
            !token.is_empty(),
            "auth.internal_token_file: {} is empty",
            path.display()
        );
        return Ok(Some(Arc::from(token)));
    }
    Ok(None)
}

impl Auth {
    /// The admission the settings describe; tokens on need an issuer, an
    /// audience and the internal token.
    pub fn from_settings(settings: &prodsys_config::Settings) -> anyhow::Result<Self> {
        settings.auth.check()?;
        settings.tls.check()?;
        let internal = internal_token(settings)?;
        let verifier = if settings.auth.dev_mode {
            None
        } else {
            anyhow::ensure!(
                internal.is_some(),
                "auth.internal_token_file: tokens are on, and the services need a shared internal token to call each other"
            );
            Some(Verifier::new(
                &settings.auth,
                settings.tls.ca_file.as_deref(),
            )?)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dev_mode: settings.auth.dev_mode,
                verifier,
                internal,
                managers: Arc::new(settings.auth.production_managers.clone()),
            }),
        })
    }

    /// The development mode: no tokens.
    pub fn dev() -> Self {
        Self {
            inner: Arc::new(Inner {
                dev_mode: true,
                verifier: None,
                internal: None,
                managers: Arc::default(),
            }),
        }
    }

    pub fn dev_mode(&self) -> bool {
        self.inner.dev_mode
    }

    /// Refuses to serve on `addr` in the development mode unless it is a
    /// loopback address; warns that it runs without tokens.
    pub fn check_bind(&self, service: &str, addr: SocketAddr) -> anyhow::Result<()> {
        if !self.dev_mode() {
            return Ok(());
        }
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "auth.dev_mode: {service} would listen on {addr} without tokens; the development mode is allowed only on loopback addresses (set grpc.host = \"127.0.0.1\", or configure [auth] issuers and dev_mode = false)"
        );
        tracing::warn!(
            service,
            %addr,
            "DEVELOPMENT MODE: no tokens are checked; anyone who reaches this port may do anything (loopback only)"
        );
        Ok(())
    }

    /// The tower layer admitting every call of a port.
    pub fn layer(&self) -> AuthLayer {
        AuthLayer { auth: self.clone() }
    }

    /// Admits a call needing `need` with `token`, or says why not.
    pub async fn admit(&self, need: Need, token: Option<&str>) -> Result<Caller, Denial> {
        if self.inner.dev_mode {
            return Ok(Caller::empty(Kind::Dev));
        }
        if need == Need::Open {
            // Health and the OpenAPI document read nothing of anyone's; a
            // caller without a token sees no VO's data all the same.
            return Ok(Caller::empty(Kind::User));
        }
        let Some(token) = token else {
            return Err(Denial::Unauthenticated(NO_TOKEN.into()));
        };
        if let Some(internal) = &self.inner.internal
            && constant_time_eq(internal.as_bytes(), token.as_bytes())
        {
            return Ok(Caller::internal());
        }
        let verifier = self
            .inner
            .verifier
            .as_ref()
            .ok_or_else(|| Denial::Unauthenticated("no issuer is configured".into()))?;
        let identity = verifier.verify(token).await?;
        let caller = Caller {
            kind: Kind::User,
            subject: identity.subject,
            name: identity.name,
            issuer: identity.issuer,
            vos: identity.vos,
            groups: identity.groups,
            scopes: identity.scopes,
            token: Some(Arc::from(token)),
            managers: self.inner.managers.clone(),
        };
        if need == Need::Internal {
            return Err(Denial::Forbidden(
                "only prodsys services may call this operation".into(),
            ));
        }
        if let Need::Scope(scope) = need
            && !caller.scopes.contains(scope)
        {
            return Err(Denial::Forbidden(format!(
                "the token lacks scope {scope} (it has: {})",
                caller
                    .scopes
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
        Ok(caller)
    }

    /// The credentials of this process's outgoing calls to other services:
    /// the internal token always.
    pub fn internal_credentials(&self) -> Credentials {
        Credentials {
            internal: self.inner.internal.clone(),
            on_behalf: false,
        }
    }

    /// The credentials of calls made for a caller: its token when it has
    /// one, else the internal token.
    pub fn caller_credentials(&self) -> Credentials {
        Credentials {
            internal: self.inner.internal.clone(),
            on_behalf: true,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request: `authorization: Bearer …`, or on a GET the
/// `access_token` query parameter (RFC 6750 §2.3), which is then taken off
/// the URI so the route does not see a parameter it does not know.
pub fn take_token<B>(request: &mut http::Request<B>) -> Option<String> {
    if let Some(value) = request.headers().get(http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
    {
        let mut parts = value.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some(token.trim().to_string());
        }
        return None;
    }
    if request.method() != http::Method::GET {
        return None;
    }
    let query = request.uri().query()?;
    let mut token = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("access_token=") {
            Some(value) => {
                token = Some(percent_decode(value));
                false
            }
            None => true,
        })
        .collect();
    let token = token?;
    let path = request.uri().path();
    let path_and_query = if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    Some(token)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&value[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The layer of [`Auth::layer`].
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Auth,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// A service admitting each call by [`Auth::admit`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            let need = need(request.method(), request.uri().path());
            let token = take_token(&mut request);
            match auth.admit(need, token.as_deref()).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller.clone());
                    scope(caller, inner.call(request)).await
                }
                Err(denial) => {
                    tracing::info!(
                        path = request.uri().path(),
                        reason = denial.message(),
                        "call refused"
                    );
                    Ok(denial.response(grpc))
                }
            }
        })
    }
}

/// An interceptor putting a bearer on each outgoing call (see
/// [`Auth::internal_credentials`], [`Auth::caller_credentials`]); a call
/// that already carries one keeps it.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    internal: Option<Arc<str>>,
    on_behalf: bool,
}

impl Credentials {
    /// No bearer (the development mode, or a client given none).
    pub fn none() -> Self {
        Self::default()
    }

    /// Always `token` (a client's own).
    pub fn bearer(token: impl Into<Arc<str>>) -> Self {
        Self {
            internal: Some(token.into()),
            on_behalf: false,
        }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if request.metadata().contains_key("authorization") {
            return Ok(request);
        }
        let caller = self.on_behalf.then(caller);
        let token = caller
            .as_ref()
            .and_then(Caller::token)
            .or(self.internal.as_deref());
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::unauthenticated("the bearer token is not a valid header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A channel whose calls carry [`Credentials`].
pub type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn scopes_follow_the_operation() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        assert_eq!(
            need(&post, "/prodsys.v1.RequestService/SubmitRequest"),
            Need::Scope(COMPUTE_CREATE)
        );
        assert_eq!(
            need(&post, "/prodsys.v1.RequestService/CancelProduction"),
            Need::Scope(COMPUTE_CANCEL)
        );
        assert_eq!(
            need(&post, "/prodsys.v1.StatusService/WatchProduction"),
            Need::Scope(COMPUTE_READ)
        );
        assert_eq!(
            need(&post, "/prodsys.v1.CatalogService/StreamFiles"),
            Need::Scope(STORAGE_READ)
        );
        assert_eq!(
            need(&post, "/prodsys.v1.CatalogService/RegisterFiles"),
            Need::Internal
        );
        assert_eq!(need(&post, "/grpc.health.v1.Health/Check"), Need::Open);
        assert_eq!(need(&post, "/api/v1/requests"), Need::Scope(COMPUTE_CREATE));
        assert_eq!(
            need(&post, "/api/v1/productions/CTA-000001/cancel"),
            Need::Scope(COMPUTE_CANCEL)
        );
        assert_eq!(need(&get, "/api/events"), Need::Scope(COMPUTE_READ));
        assert_eq!(need(&get, "/metrics"), Need::Scope(COMPUTE_READ));
    }

    #[test]
    fn a_query_token_is_taken_off_the_uri() {
        let mut r = http::Request::get("/api/productions?vo=x&access_token=a%2Eb.c&state=RUNNING")
            .body(())
            .unwrap();
        assert_eq!(take_token(&mut r).as_deref(), Some("a.b.c"));
        assert_eq!(r.uri(), "/api/productions?vo=x&state=RUNNING");
        let mut r = http::Request::post("/api/v1/requests?access_token=x")
            .body(())
            .unwrap();
        assert_eq!(take_token(&mut r), None);
        let mut r = http::Request::get("/")
            .header("authorization", "bearer t0k")
            .body(())
            .unwrap();
        assert_eq!(take_token(&mut r).as_deref(), Some("t0k"));
    }

    #[test]
    fn the_development_mode_serves_loopback_only() {
        let dev = Auth::dev();
        assert!(
            dev.check_bind("intake", "127.0.0.1:50051".parse().unwrap())
                .is_ok()
        );
        assert!(
            dev.check_bind("intake", "[::1]:50051".parse().unwrap())
                .is_ok()
        );
        let refused = dev
            .check_bind("intake", "0.0.0.0:50051".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("auth.dev_mode"), "{refused}");
        assert!(
            dev.check_bind("status", "192.0.2.7:50052".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn tokens_on_need_an_issuer_and_the_internal_token() {
        let mut settings = prodsys_config::Settings::default();
        settings.auth.dev_mode = false;
        let e = Auth::from_settings(&settings).unwrap_err().to_string();
        assert!(e.contains("auth.issuers"), "{e}");
        settings.auth.issuers = vec![prodsys_config::IssuerSettings {
            url: "https://iam.example.org".into(),
        }];
        let e = Auth::from_settings(&settings).unwrap_err().to_string();
        assert!(e.contains("auth.internal_token"), "{e}");
        settings.auth.internal_token = Some("s3cret".to_string().into());
        let auth = Auth::from_settings(&settings).unwrap();
        assert!(!auth.dev_mode());
        assert!(
            auth.check_bind("intake", "0.0.0.0:50051".parse().unwrap())
                .is_ok()
        );
    }

    #[tokio::test]
    async fn the_internal_token_is_a_service_and_nothing_else_passes_unverified() {
        let mut settings = prodsys_config::Settings::default();
        settings.auth.dev_mode = false;
        settings.auth.issuers = vec![prodsys_config::IssuerSettings {
            url: "https://iam.example.org".into(),
        }];
        settings.auth.internal_token = Some("s3cret".to_string().into());
        let auth = Auth::from_settings(&settings).unwrap();
        let internal = auth.admit(Need::Internal, Some("s3cret")).await.unwrap();
        assert!(!internal.is_restricted());
        assert!(matches!(
            auth.admit(Need::Internal, Some("s3cret!")).await,
            Err(Denial::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.admit(Need::Scope(COMPUTE_READ), None).await,
            Err(Denial::Unauthenticated(_))
        ));
        let anonymous = auth.admit(Need::Open, None).await.unwrap();
        assert!(anonymous.is_restricted() && !anonymous.may_see("vo.cta.in2p3.fr"));
        // An HMAC token is refused before any key is looked for.
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let hs = format!("{header}.e30.c2ln");
        match auth.admit(Need::Token, Some(&hs)).await {
            Err(Denial::Unauthenticated(m)) => assert!(m.contains("HS256"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_answer_grpc_and_http_each_in_its_terms() {
        let challenge = |d: Denial| {
            let r = d.response(false);
            (
                r.status().as_u16(),
                r.headers()
                    .get(http::header::WWW_AUTHENTICATE)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
            )
        };
        assert_eq!(
            challenge(Denial::Unauthenticated(NO_TOKEN.into())),
            (401, "Bearer realm=\"prodsys\"".to_string())
        );
        let (status, header) = challenge(Denial::Unauthenticated("expired \"exp\"".into()));
        assert_eq!(status, 401);
        assert!(header.contains("error=\"invalid_token\""), "{header}");
        assert!(header.contains("expired 'exp'"), "{header}");
        let (status, header) = challenge(Denial::Forbidden("no scope".into()));
        assert_eq!(status, 403);
        assert!(header.contains("insufficient_scope"), "{header}");
        let grpc = Denial::Forbidden("no scope".into()).response(true);
        assert_eq!(grpc.headers()["grpc-status"], "7");
        let grpc = Denial::Unauthenticated(NO_TOKEN.into()).response(true);
        assert_eq!(grpc.headers()["grpc-status"], "16");
    }

    #[test]
    fn without_a_token_everything_is_visible() {
        let c = Caller::internal();
        assert!(c.may_see("any"));
        assert_eq!(c.submitter("declared"), "declared");
        assert!(c.may_cancel("vo", None));
        assert!(c.visible_vos().is_none());
    }

    #[test]
    fn a_user_sees_its_vos_and_cancels_its_own_or_as_manager() {
        let mut managers = BTreeMap::new();
        managers.insert("cta".to_string(), "/cta/production".to_string());
        let mut c = Caller {
            kind: Kind::User,
            subject: "alice".into(),
            name: "Alice".into(),
            issuer: "https://iam".into(),
            vos: ["cta".to_string()].into(),
            groups: ["/cta".to_string()].into(),
            scopes: BTreeSet::new(),
            token: None,
            managers: Arc::new(managers),
        };
        assert!(c.may_see("cta"));
        assert!(!c.may_see("km3net"));
        assert!(c.may_act_for("vo", "km3net").is_err());
        assert_eq!(c.submitter("someone else"), "Alice (alice)");
        assert!(c.may_cancel("cta", Some("https://iam alice")));
        assert!(!c.may_cancel("cta", Some("https://iam bob")));
        assert!(!c.may_cancel("km3net", Some("https://iam alice")));
        c.groups.insert("/cta/production".into());
        assert!(c.may_cancel("cta", Some("https://iam bob")));
    }
}
