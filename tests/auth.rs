//! Tokens on: every call carries a bearer JWT of the WLCG profile, checked
//! against the configured issuers, scoped per operation, and everything a
//! caller sees or changes is limited to its VOs.
//!
//! The tokens come from a real OpenID provider: npm's `oidc-provider`
//! (tests/servers/oidc), issuing JWT access tokens by the client-credentials
//! grant with `wlcg.groups` and scopes; prodsys finds its keys by OpenID
//! Connect discovery. Tokens that are bad on purpose and that the provider
//! cannot issue (expired, not yet valid, of an unknown key or issuer) are
//! minted by the test with its own key, published by a second issuer the
//! test serves (discovery and JWKS) and that the stack trusts too.

mod support;

use std::time::Duration;

use base64::Engine;
use prodsys_auth::Credentials;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{App, sleep_request, spawn_app_with, use_test_profiles};
use tokio::io::AsyncBufReadExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const CTA: &str = "vo.cta.in2p3.fr";
const AUDIENCE: &str = "prodsys";
const ALL: &str = "compute.create compute.read compute.cancel storage.read";

/// The real OpenID provider, stopped when dropped.
struct Provider {
    _child: tokio::process::Child,
    issuer: String,
    http: reqwest::Client,
}

impl Provider {
    async fn start() -> Self {
        let root = prodsys_testkit::repo_root();
        let installed = std::process::Command::new(root.join("tests/servers/oidc/install"))
            .status()
            .expect("running tests/servers/oidc/install");
        assert!(installed.success(), "installing the OpenID provider failed");
        let mut child = tokio::process::Command::new("node")
            .arg("provider.mjs")
            .current_dir(root.join("var/servers/oidc"))
            .env("PORT", "0")
            .env("AUDIENCE", AUDIENCE)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting node provider.mjs");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let issuer = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the provider printing its issuer")
            .unwrap()
            .expect("the provider's issuer line");
        Self {
            _child: child,
            issuer,
            http: reqwest::Client::new(),
        }
    }

    /// An access token of `client` by the client-credentials grant.
    async fn token(&self, client: &str, scope: &str, resource: Option<&str>) -> String {
        let mut body = format!(
            "grant_type=client_credentials&scope={}",
            scope.replace(' ', "+")
        );
        if let Some(resource) = resource {
            body.push_str(&format!("&resource={resource}"));
        }
        let answer: serde_json::Value = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(format!("secret-{client}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token in {answer}"))
            .to_string()
    }
}

/// An issuer the test runs itself: discovery and a JWKS with one EC key,
/// whose private half mints the tokens that are bad on purpose.
struct OwnIssuer {
    url: String,
    key: jsonwebtoken::EncodingKey,
    /// A key the issuer does not publish.
    stray: jsonwebtoken::EncodingKey,
}

const OWN_KID: &str = "test-own-1";

impl OwnIssuer {
    async fn start() -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let stray = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, X, Y.
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            "kid": OWN_KID, "alg": "ES256", "use": "sig",
        }]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({"issuer": url, "jwks_uri": format!("{url}/jwks")});
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || async move { axum::Json(jwks) }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
            stray: jsonwebtoken::EncodingKey::from_ec_der(&stray.serialize_der()),
        }
    }

    /// A token for CTA with all scopes, `change` applied to its claims,
    /// signed by `key` under `kid`.
    fn mint(
        &self,
        kid: &str,
        key: &jsonwebtoken::EncodingKey,
        change: impl FnOnce(&mut serde_json::Value),
    ) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = serde_json::json!({
            "iss": self.url, "sub": "minted", "aud": AUDIENCE, "iat": now, "nbf": now - 5,
            "exp": now + 600, "scope": ALL, "wlcg.groups": [format!("/{CTA}")],
        });
        change(&mut claims);
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }
}

struct Secured {
    app: App,
    provider: Provider,
    own: OwnIssuer,
    http: reqwest::Client,
}

/// A stack with tokens on, trusting the provider and the test's own issuer;
/// `/vo.cta.in2p3.fr/production` manages CTA's productions.
async fn secured() -> Secured {
    secured_with(|_| {}).await
}

async fn secured_with(adjust: impl FnOnce(&mut prodsys_testkit::TestEnv)) -> Secured {
    let provider = Provider::start().await;
    let own = OwnIssuer::start().await;
    let issuers = [provider.issuer.clone(), own.url.clone()];
    let app = spawn_app_with(|env| {
        adjust(env);
        use_test_profiles(env);
        let auth = &mut env.settings.auth;
        auth.dev_mode = false;
        auth.issuers = issuers
            .iter()
            .map(|url| prodsys_config::IssuerSettings { url: url.clone() })
            .collect();
        auth.audience = AUDIENCE.into();
        auth.leeway_s = 5;
        auth.production_managers
            .insert(CTA.into(), format!("/{CTA}/production"));
        auth.internal_token = Some(uuid::Uuid::new_v4().to_string().into());
    })
    .await;
    Secured {
        app,
        provider,
        own,
        http: reqwest::Client::new(),
    }
}

type Authed = InterceptedService<Channel, Credentials>;

struct Clients {
    intake: pb::request_service_client::RequestServiceClient<Authed>,
    status: pb::status_service_client::StatusServiceClient<Authed>,
    catalog: pb::catalog_service_client::CatalogServiceClient<Authed>,
    token: String,
}

impl Secured {
    fn status_url(&self) -> String {
        format!(
            "http://{}",
            self.app.stack.addr(prodsys::Service::Status).unwrap()
        )
    }

    /// Clients of every service carrying `token` (none when empty).
    async fn clients(&self, token: &str) -> Clients {
        let credentials = || {
            if token.is_empty() {
                Credentials::none()
            } else {
                Credentials::bearer(token)
            }
        };
        let channel = |service| support::channel(self.app.stack.addr(service).unwrap());
        Clients {
            intake: pb::request_service_client::RequestServiceClient::with_interceptor(
                channel(prodsys::Service::Intake).await,
                credentials(),
            ),
            status: pb::status_service_client::StatusServiceClient::with_interceptor(
                channel(prodsys::Service::Status).await,
                credentials(),
            ),
            catalog: pb::catalog_service_client::CatalogServiceClient::with_interceptor(
                channel(prodsys::Service::Catalog).await,
                credentials(),
            ),
            token: token.to_string(),
        }
    }

    /// A user of the provider with every scope.
    async fn user(&self, client: &str) -> Clients {
        self.clients(&self.provider.token(client, ALL, None).await)
            .await
    }

    async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.status_url()));
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn post(&self, token: &str, path: &str, body: serde_json::Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.status_url()))
            .json(&body);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }
}

/// A request of the test-sleep profile for CTA.
fn cta_sleep(jobs: u64, seconds: f64, tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        vo: CTA.into(),
        submitter: "someone-else".into(),
        ..sleep_request(jobs, seconds, -1, tag, "local")
    }
}

fn http_body(request: &pb::SubmitRequestRequest) -> serde_json::Value {
    serde_json::json!({
        "profile": request.profile,
        "vo": request.vo,
        "parameters": serde_json::from_str::<serde_json::Value>(&request.parameters_json).unwrap(),
    })
}

/// Submits as `user`; waits for acceptance; returns the request and production IDs.
async fn accepted(user: &Clients, request: pb::SubmitRequestRequest) -> (String, String) {
    let request_id = user
        .intake
        .clone()
        .submit_request(request)
        .await
        .expect("the submission")
        .into_inner()
        .request_id;
    let decided = decided(user, &request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Accepted, "{decided:?}");
    (request_id, decided.production_id)
}

/// The request once the checker has decided it, as `user` reads it.
async fn decided(user: &Clients, request_id: &str) -> pb::Request {
    wait_for("the checker's verdict", Duration::from_secs(30), || {
        let mut intake = user.intake.clone();
        let request_id = request_id.to_string();
        async move {
            let r = intake
                .get_request(pb::GetRequestRequest { request_id })
                .await
                .ok()?
                .into_inner();
            (r.state() != pb::RequestState::Received).then_some(r)
        }
    })
    .await
    .unwrap()
}

async fn production_in(user: &Clients, production_id: &str, states: &[pb::ProductionState]) {
    wait_for("the production's state", Duration::from_secs(60), || {
        let mut status = user.status.clone();
        let production_id = production_id.to_string();
        async move {
            let p = status
                .get_production(pb::GetProductionRequest { production_id })
                .await
                .ok()?
                .into_inner();
            states.contains(&p.state()).then_some(())
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_tokens_are_refused_and_nothing_is_stored() {
    let s = secured().await;
    let good = s.provider.token("cta-alice", ALL, None).await;
    let other = s.provider.token("cta-bob", ALL, None).await;
    let now = chrono::Utc::now().timestamp();
    let signature_of = |t: &str| t.rsplit_once('.').unwrap().1.to_string();
    let cases: Vec<(&str, String, tonic::Code, u16)> = vec![
        ("missing", String::new(), tonic::Code::Unauthenticated, 401),
        (
            "expired",
            s.own.mint(OWN_KID, &s.own.key, |c| {
                c["exp"] = (now - 600).into();
                c["iat"] = (now - 1200).into();
                c["nbf"] = (now - 1200).into();
            }),
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "not yet valid",
            s.own
                .mint(OWN_KID, &s.own.key, |c| c["nbf"] = (now + 600).into()),
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "wrong audience",
            s.provider.token("cta-alice", ALL, Some("urn:other")).await,
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "wrong issuer",
            s.own.mint(OWN_KID, &s.own.key, |c| {
                c["iss"] = "https://elsewhere.example.org".into()
            }),
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "bad signature",
            format!(
                "{}.{}",
                good.rsplit_once('.').unwrap().0,
                signature_of(&other)
            ),
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "unknown kid",
            s.own.mint("not-published", &s.own.stray, |_| {}),
            tonic::Code::Unauthenticated,
            401,
        ),
        (
            "wrong scope",
            s.provider.token("cta-reader", "compute.read", None).await,
            tonic::Code::PermissionDenied,
            403,
        ),
    ];
    let request = cta_sleep(1, 0.0, "refused");
    for (what, token, code, http_status) in &cases {
        let c = s.clients(token).await;
        let refused = c
            .intake
            .clone()
            .submit_request(request.clone())
            .await
            .expect_err(&format!("{what} token: SubmitRequest was not refused"));
        assert_eq!(refused.code(), *code, "{what} token over gRPC: {refused:?}");
        let answer = s.post(token, "/api/v1/requests", http_body(&request)).await;
        let challenge = answer
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert_eq!(
            answer.status().as_u16(),
            *http_status,
            "{what} token over HTTP: {:?}",
            answer.text().await
        );
        let expected = match (*what, *http_status) {
            ("missing", _) => "Bearer realm=\"prodsys\"",
            (_, 401) => "error=\"invalid_token\"",
            _ => "error=\"insufficient_scope\"",
        };
        assert!(
            challenge.contains(expected),
            "{what}: WWW-Authenticate {challenge:?}"
        );
        if *code == tonic::Code::Unauthenticated {
            let listed = c
                .status
                .clone()
                .list_productions(pb::ListProductionsRequest::default())
                .await
                .expect_err(&format!("{what} token: ListProductions was not refused"));
            assert_eq!(listed.code(), *code, "{what} token: {listed:?}");
            let page = s.get(token, "/").await;
            assert_eq!(page.status().as_u16(), 401, "{what} token: the dashboard");
            let metrics = s.get(token, "/metrics").await;
            assert_eq!(metrics.status().as_u16(), 401, "{what} token: /metrics");
        }
    }
    assert_eq!(
        s.app.stored_requests().await,
        0,
        "a refused call stored a request"
    );
    // The good token from the same provider is taken (the refusals above are the tokens').
    let c = s.clients(&good).await;
    c.intake
        .clone()
        .submit_request(request)
        .await
        .expect("a good token's submission");
    assert_eq!(s.app.stored_requests().await, 1);
    // The dashboard answers a token in the query (as a browser opens it),
    // without the development mode's warning.
    let page = s.get("", &format!("/?access_token={good}")).await;
    assert_eq!(page.status().as_u16(), 200);
    assert!(!page.text().await.unwrap().contains("id=\"dev-mode\""));
    // Health stays open to probes.
    assert_eq!(
        support::health(s.app.stack.addr(prodsys::Service::Intake).unwrap()).await,
        Some(1)
    );
    s.app.stop().await;
}

#[tokio::test]
async fn a_vo_sees_and_touches_only_its_own_productions() {
    let s = secured().await;
    let alice = s.user("cta-alice").await;
    let carol = s.user("km3net-carol").await;
    let (request_id, production_id) = accepted(&alice, cta_sleep(2, 0.0, "isolated")).await;
    production_in(&alice, &production_id, &[pb::ProductionState::Completed]).await;
    // The submitter is the token's, not what the request declared.
    let db = s.app.env.db().await.unwrap();
    let submitter: String = db
        .query_one("SELECT submitter FROM intake.requests", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(submitter, "Alice (cta-alice)");
    // Alice's files are catalogued (what Carol must not find).
    let files = wait_for("the files in the catalog", Duration::from_secs(30), || {
        let mut catalog = alice.catalog.clone();
        let production_id = production_id.clone();
        async move {
            let page = catalog
                .find_files(pb::FindFilesRequest {
                    production_id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (page.files.len() == 2).then_some(page.files)
        }
    })
    .await
    .unwrap();
    assert_eq!(files.len(), 2);

    // Carol (KM3NeT) cannot submit for CTA, over gRPC or HTTP.
    let refused = carol
        .intake
        .clone()
        .submit_request(cta_sleep(1, 0.0, "carol"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(support::violated_fields(&refused), ["vo"]);
    let refused = carol
        .intake
        .clone()
        .validate_request(cta_sleep(1, 0.0, "carol"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::PermissionDenied,
        "validate: {refused:?}"
    );
    let answer = s
        .post(
            &carol.token,
            "/api/v1/requests",
            http_body(&cta_sleep(1, 0.0, "carol")),
        )
        .await;
    assert_eq!(answer.status().as_u16(), 403);
    assert_eq!(
        s.app.stored_requests().await,
        1,
        "Carol's refused request was stored"
    );

    // She cannot see it: get, list, watch, request, record, files; over gRPC ...
    let mut status = carol.status.clone();
    let not_found = |r: Result<tonic::Response<pb::Production>, tonic::Status>, what: &str| {
        let e = r.expect_err(&format!("{what}: Carol saw CTA's production"));
        assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e:?}");
    };
    not_found(
        status
            .get_production(pb::GetProductionRequest {
                production_id: production_id.clone(),
            })
            .await,
        "GetProduction",
    );
    // A guessed ID that exists answers as one that does not.
    let guessed = status
        .get_production(pb::GetProductionRequest {
            production_id: "TEST-999999".into(),
        })
        .await
        .unwrap_err();
    let real = status
        .get_production(pb::GetProductionRequest {
            production_id: production_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        real.message().replace(&production_id, "ID"),
        guessed.message().replace("TEST-999999", "ID")
    );
    let watched = status
        .watch_production(pb::GetProductionRequest {
            production_id: production_id.clone(),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        watched.code(),
        tonic::Code::NotFound,
        "WatchProduction: {watched:?}"
    );
    for vo in ["", CTA] {
        let page = status
            .list_productions(pb::ListProductionsRequest {
                vo: vo.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.productions.is_empty(),
            "ListProductions(vo={vo:?}): {page:?}"
        );
    }
    let request = carol
        .intake
        .clone()
        .get_request(pb::GetRequestRequest {
            request_id: request_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        request.code(),
        tonic::Code::NotFound,
        "GetRequest: {request:?}"
    );
    let cancel = carol
        .intake
        .clone()
        .cancel_production(pb::CancelProductionRequest {
            production_id: production_id.clone(),
            reason: "not mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        cancel.code(),
        tonic::Code::NotFound,
        "CancelProduction: {cancel:?}"
    );
    for query in [
        pb::FindFilesRequest {
            production_id: production_id.clone(),
            ..Default::default()
        },
        pb::FindFilesRequest {
            lfn_prefix: "/test/".into(),
            ..Default::default()
        },
    ] {
        let page = carol
            .catalog
            .clone()
            .find_files(query.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.files.is_empty(), "FindFiles {query:?}: {page:?}");
        let mut stream = carol
            .catalog
            .clone()
            .stream_files(query.clone())
            .await
            .unwrap()
            .into_inner();
        while let Some(page) = stream.message().await.unwrap() {
            assert!(page.files.is_empty(), "StreamFiles {query:?}: {page:?}");
        }
    }
    let record = carol
        .catalog
        .clone()
        .get_production_record(pb::GetProductionRecordRequest {
            production_id: production_id.clone(),
            format: pb::RecordFormat::Json as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(
        record.code(),
        tonic::Code::NotFound,
        "GetProductionRecord: {record:?}"
    );

    // ... and over HTTP.
    for path in [
        format!("/api/v1/productions/{production_id}"),
        format!("/api/productions/{production_id}"),
        "/api/v1/productions/TEST-999999".to_string(),
        format!("/api/v1/requests/{request_id}"),
    ] {
        let answer = s.get(&carol.token, &path).await;
        assert_eq!(answer.status().as_u16(), 404, "GET {path}");
    }
    for path in [
        "/api/v1/productions".to_string(),
        format!("/api/v1/productions?vo={CTA}"),
        "/api/productions".to_string(),
    ] {
        let answer: serde_json::Value = s.get(&carol.token, &path).await.json().await.unwrap();
        assert_eq!(answer["productions"], serde_json::json!([]), "GET {path}");
    }
    let files: serde_json::Value = s
        .get(
            &carol.token,
            &format!("/api/v1/files?production_id={production_id}"),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        files["files"],
        serde_json::json!([]),
        "GET /api/v1/files: {files}"
    );
    let cancel = s
        .post(
            &carol.token,
            &format!("/api/v1/productions/{production_id}/cancel"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(cancel.status().as_u16(), 404, "POST cancel");

    // Alice, of CTA, sees all of it (the same calls can answer).
    let mine = s
        .get(
            &alice.token,
            &format!("/api/v1/productions/{production_id}"),
        )
        .await;
    assert_eq!(mine.status().as_u16(), 200);
    let listed: serde_json::Value = s
        .get(&alice.token, "/api/v1/productions")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["productions"].as_array().unwrap().len(), 1);

    // The live stream: Carol's (token in the query, as the dashboard's
    // EventSource sends it) carries no CTA change; Alice's does.
    let events = |token: String| {
        let url = format!("{}/api/events?access_token={token}", s.status_url());
        let http = s.http.clone();
        async move {
            let mut response = http.get(url).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                while let Ok(Some(chunk)) = response.chunk().await {
                    if tx
                        .send(String::from_utf8_lossy(&chunk).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
            });
            rx
        }
    };
    let mut carol_events = events(carol.token.clone()).await;
    let mut alice_events = events(alice.token.clone()).await;
    let (_, second) = accepted(&alice, cta_sleep(1, 0.0, "streamed")).await;
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains(&second) {
            seen.push_str(&alice_events.recv().await.unwrap());
        }
    })
    .await
    .expect("Alice's stream carrying her new production");
    production_in(&alice, &second, &[pb::ProductionState::Completed]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut carol_seen = String::new();
    while let Ok(chunk) = carol_events.try_recv() {
        carol_seen.push_str(&chunk);
    }
    assert!(
        !carol_seen.contains("event: production"),
        "Carol's stream carried a CTA production: {carol_seen}"
    );
    s.app.stop().await;
}

#[tokio::test]
async fn a_production_manager_cancels_others_productions_a_plain_user_cannot() {
    let s = secured().await;
    let alice = s.user("cta-alice").await;
    let bob = s.user("cta-bob").await;
    let manager = s.user("cta-manager").await;
    let (_, first) = accepted(&alice, cta_sleep(2, 120.0, "cancel-by-manager")).await;
    production_in(
        &alice,
        &first,
        &[pb::ProductionState::Running, pb::ProductionState::Accepted],
    )
    .await;

    // Bob, of CTA too but no manager, may see it and not cancel it.
    bob.status
        .clone()
        .get_production(pb::GetProductionRequest {
            production_id: first.clone(),
        })
        .await
        .expect("Bob sees his VO's production");
    let refused = bob
        .intake
        .clone()
        .cancel_production(pb::CancelProductionRequest {
            production_id: first.clone(),
            reason: "not mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let answer = s
        .post(
            &bob.token,
            &format!("/api/v1/productions/{first}/cancel"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(answer.status().as_u16(), 403);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = bob
        .status
        .clone()
        .get_production(pb::GetProductionRequest {
            production_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        p.state(),
        pb::ProductionState::Cancelled,
        "Bob's refused cancel took effect"
    );

    // The manager may.
    manager
        .intake
        .clone()
        .cancel_production(pb::CancelProductionRequest {
            production_id: first.clone(),
            reason: "managed".into(),
        })
        .await
        .expect("the production manager's cancel");
    production_in(&alice, &first, &[pb::ProductionState::Cancelled]).await;

    // And the owner may cancel her own, over HTTP.
    let (_, second) = accepted(&alice, cta_sleep(2, 120.0, "cancel-by-owner")).await;
    let answer = s
        .post(
            &alice.token,
            &format!("/api/v1/productions/{second}/cancel"),
            serde_json::json!({"reason": "mine"}),
        )
        .await;
    assert_eq!(answer.status().as_u16(), 202, "{:?}", answer.text().await);
    production_in(&alice, &second, &[pb::ProductionState::Cancelled]).await;
    s.app.stop().await;
}

/// A submit CloudEvent (structured mode) of `request`.
fn ingest_event(id: &str, request: &pb::SubmitRequestRequest) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/tests/auth/ingest",
        "type": "org.prodsys.request.submit.v1",
        "data": {
            "profile": request.profile, "vo": request.vo,
            "parameters": serde_json::from_str::<serde_json::Value>(&request.parameters_json).unwrap(),
        },
    })
}

/// The answer on `queue` to the event just published: its `data`.
async fn ingest_answer(channel: &lapin::Channel, queue: &str) -> serde_json::Value {
    let answer = support::next_message(channel, queue, "the answer", Duration::from_secs(30)).await;
    let body: serde_json::Value = serde_json::from_slice(&answer.delivery.data).unwrap();
    body.get("data").cloned().unwrap_or(body)
}

#[tokio::test]
async fn ingest_events_are_admitted_by_their_token_or_a_broker_user_mapped_to_the_vo() {
    const KM3NET: &str = "km3net.org";
    // The test publishes as the broker user of the test URL (guest), mapped to KM3NeT only.
    let user = prodsys_testkit::amqp_url()
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['@', ':']).next().map(str::to_string))
        .unwrap();
    let mapped = user.clone();
    let s = secured_with(move |env| {
        env.settings
            .intake
            .broker_users
            .insert(mapped, vec![KM3NET.into()]);
    })
    .await;
    let (connection, channel) = s.app.env.amqp().await.unwrap();
    let answers = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let answers = answers.name().as_str().to_string();
    channel.confirm_select(Default::default()).await.unwrap();
    let publish = |id: &str, request: pb::SubmitRequestRequest, authorization: Option<String>| {
        let channel = channel.clone();
        let (prefix, answers, user) = (s.app.env.prefix.clone(), answers.clone(), user.clone());
        let event = ingest_event(id, &request);
        async move {
            let mut headers = lapin::types::FieldTable::default();
            if let Some(value) = authorization {
                headers.insert(
                    "authorization".into(),
                    lapin::types::AMQPValue::LongString(value.into_bytes().into()),
                );
            }
            let confirm = channel
                .basic_publish(
                    format!("{prefix}prodsys.ingest").as_str().into(),
                    "org.prodsys.request.submit.v1".into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    event.to_string().as_bytes(),
                    lapin::BasicProperties::default()
                        .with_content_type("application/cloudevents+json".into())
                        .with_delivery_mode(2)
                        .with_reply_to(answers.as_str().into())
                        .with_user_id(user.as_str().into())
                        .with_headers(headers),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(
                matches!(confirm, lapin::Confirmation::Ack(None)),
                "{confirm:?}"
            );
        }
    };
    let alice = s.user("cta-alice").await;
    let bob = s.user("cta-bob").await;

    // Alice's token: the request is hers (her VO, her subject as owner).
    publish(
        "with-alice-token",
        cta_sleep(1, 120.0, "ingest-token"),
        Some(format!("Bearer {}", alice.token)),
    )
    .await;
    let answer = ingest_answer(&channel, &answers).await;
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    let production_id = answer["production_id"].as_str().unwrap().to_string();
    production_in(
        &alice,
        &production_id,
        &[pb::ProductionState::Running, pb::ProductionState::Accepted],
    )
    .await;
    let refused = bob
        .intake
        .clone()
        .cancel_production(pb::CancelProductionRequest {
            production_id: production_id.clone(),
            reason: "not mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    alice
        .intake
        .clone()
        .cancel_production(pb::CancelProductionRequest {
            production_id: production_id.clone(),
            reason: "mine, submitted by event".into(),
        })
        .await
        .expect("the owner of an event's request cancels it");
    production_in(&alice, &production_id, &[pb::ProductionState::Cancelled]).await;

    // No token: the broker user is mapped to KM3NeT, so KM3NeT it may, CTA not.
    publish(
        "no-token-km3net",
        pb::SubmitRequestRequest {
            vo: KM3NET.into(),
            ..cta_sleep(1, 0.0, "ingest-mapped")
        },
        None,
    )
    .await;
    let answer = ingest_answer(&channel, &answers).await;
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    let stored = s.app.stored_requests().await;
    assert_eq!(stored, 2);

    // Refused, stored nowhere, dead-lettered and answered with the reason.
    let own = &s.own;
    let reader = s.provider.token("cta-reader", "compute.read", None).await;
    let carol = s.provider.token("km3net-carol", ALL, None).await;
    let expired = own.mint(OWN_KID, &own.key, |c| {
        c["exp"] = (chrono::Utc::now().timestamp() - 3600).into();
    });
    let forged = own.mint(OWN_KID, &own.stray, |_| {});
    let refusals: [(&str, Option<String>, &str, &str); 6] = [
        ("no-token-cta", None, "authorization", "not mapped"),
        (
            "expired",
            Some(format!("Bearer {expired}")),
            "authorization",
            "expired",
        ),
        (
            "forged",
            Some(format!("Bearer {forged}")),
            "authorization",
            "signature",
        ),
        (
            "no-scope",
            Some(format!("Bearer {reader}")),
            "authorization",
            "compute.create",
        ),
        ("other-vo", Some(format!("Bearer {carol}")), "vo", CTA),
        (
            "not-bearer",
            Some(format!("Basic {}", alice.token)),
            "authorization",
            "Bearer",
        ),
    ];
    for (id, authorization, field, says) in &refusals {
        let (id, field, says) = (*id, *field, *says);
        publish(id, cta_sleep(1, 0.0, id), authorization.clone()).await;
        let answer = ingest_answer(&channel, &answers).await;
        assert_eq!(answer["outcome"], "rejected", "{id}: {answer}");
        assert_eq!(answer["correlation_id"], id, "{answer}");
        assert_eq!(answer["request_id"], "", "{id}: {answer}");
        assert_eq!(answer["violations"][0]["field"], field, "{id}: {answer}");
        let reason = answer["violations"][0]["description"].as_str().unwrap();
        assert!(reason.contains(says), "{id}: {reason}");
    }
    let letters = s.app.dead_letters("intake", refusals.len()).await;
    for ((reason, headers), (id, _, field, _)) in letters.iter().zip(&refusals) {
        assert!(reason.starts_with(&format!("{field}: ")), "{id}: {reason}");
        // The token is not kept where operators read dead letters.
        assert!(
            !headers
                .inner()
                .keys()
                .any(|k| k.as_str().eq_ignore_ascii_case("authorization")),
            "{id}: {headers:?}"
        );
    }
    assert_eq!(s.app.stored_requests().await, stored);
    let _ = connection.close(200, "done".into()).await;
    s.app.stop().await;
}

#[tokio::test]
async fn a_duplicate_of_another_vos_production_is_said_to_exist_without_its_id() {
    const KM3NET: &str = "km3net.org";
    let s = secured().await;
    let alice = s.user("cta-alice").await;
    let carol = s.user("km3net-carol").await;
    // test-sleep names no `vos`: both VOs may use it, and the same
    // parameters are the same simulation whoever asks.
    let (_, production_id) = accepted(&alice, cta_sleep(1, 0.0, "shared-identity")).await;
    let for_km3net = pb::SubmitRequestRequest {
        vo: KM3NET.into(),
        ..cta_sleep(1, 0.0, "shared-identity")
    };

    // Alice, of the production's VO, is told which production it is.
    let own = alice
        .intake
        .clone()
        .validate_request(cta_sleep(1, 0.0, "shared-identity"))
        .await
        .unwrap()
        .into_inner();
    assert!(!own.acceptable);
    assert_eq!(own.existing_production_id, production_id);

    // Carol, of KM3NeT, is told it exists, and nothing that names it.
    let validation = carol
        .intake
        .clone()
        .validate_request(for_km3net.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!validation.acceptable, "{validation:?}");
    assert_eq!(validation.existing_production_id, "");
    let said = format!("{validation:?}");
    assert!(!said.contains(&production_id), "{said}");
    assert!(
        validation.violations.iter().any(|v| v
            .description
            .contains("already exists as a production of another VO")),
        "{said}"
    );
    // Submitted, it is refused the same way, in the stored verdict too.
    let request_id = carol
        .intake
        .clone()
        .submit_request(for_km3net.clone())
        .await
        .unwrap()
        .into_inner()
        .request_id;
    let refused = decided(&carol, &request_id).await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    assert_eq!(refused.existing_production_id, "");
    let said = format!("{refused:?}");
    assert!(!said.contains(&production_id), "{said}");
    assert!(said.contains("another VO"), "{said}");
    // Nor can another VO's production be the answer to a request asking for reuse.
    let reuse = pb::SubmitRequestRequest {
        reuse_existing: true,
        idempotency_key: "reuse-across-vos".into(),
        ..for_km3net.clone()
    };
    let validation = carol
        .intake
        .clone()
        .validate_request(reuse.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!validation.acceptable, "{validation:?}");
    assert!(!format!("{validation:?}").contains(&production_id));
    let request_id = carol
        .intake
        .clone()
        .submit_request(reuse)
        .await
        .unwrap()
        .into_inner()
        .request_id;
    let refused = decided(&carol, &request_id).await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    assert_eq!(refused.production_id, "");
    assert!(
        !format!("{refused:?}").contains(&production_id),
        "{refused:?}"
    );
    assert!(
        refused
            .violations
            .iter()
            .any(|v| v.field == "reuse_existing"),
        "{refused:?}"
    );
    s.app.stop().await;
}

#[tokio::test]
async fn the_development_mode_takes_no_tokens_serves_loopback_only_and_says_so() {
    let app = support::spawn_app().await;
    // No token: the call passes, and the declared submitter counts.
    let response = app.submit(support::cta_example()).await.unwrap();
    let db = app.env.db().await.unwrap();
    let submitter: String = db
        .query_one(
            "SELECT submitter FROM intake.requests WHERE request_id = $1::text::uuid",
            &[&response.request_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(submitter, "tests");
    let url = format!(
        "http://{}/",
        app.stack.addr(prodsys::Service::Status).unwrap()
    );
    let page = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert!(
        page.contains("id=\"dev-mode\""),
        "the dashboard does not warn"
    );
    app.stop().await;

    // Bound to every address, the development mode refuses to start.
    let mut env = prodsys_testkit::TestEnv::new().await.unwrap();
    env.settings.grpc.host = "0.0.0.0".into();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refused = prodsys::start(&prodsys::Service::ALL, &env.settings, shutdown.clone())
        .await
        .map(|_| ())
        .expect_err("the development mode served 0.0.0.0");
    shutdown.cancel();
    assert!(
        format!("{refused:#}").contains("auth.dev_mode"),
        "{refused:#}"
    );
    env.cleanup().await;
}

/// `${NAME:-default}` and `${NAME:?message}` of a compose value, as compose
/// substitutes them with `vars`; `None` when a required one is missing.
fn compose_substitute(value: &str, vars: &[(&str, &str)]) -> Option<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let inner = &rest[start + 2..end];
        let (name, fallback) = match inner.find([':']) {
            Some(i) => (&inner[..i], Some(&inner[i + 1..])),
            None => (inner, None),
        };
        let given = vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        match (given, fallback) {
            (Some(v), _) if !v.is_empty() => out.push_str(v),
            (_, Some(f)) if f.starts_with('-') => out.push_str(&f[1..]),
            (_, Some(f)) if f.starts_with('?') => return None,
            _ => {}
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[test]
fn the_compose_deployment_runs_with_tokens_on() {
    let root = prodsys_testkit::repo_root();
    let compose = root.join("deploy/docker-compose.yml");
    // The YAML as compose reads it (PyYAML; the suite's Python has it).
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import json, sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(json.dumps(d['x-prodsys']['environment']))")
        .arg(&compose)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let environment: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).unwrap();
    // The image's own environment (deploy/Dockerfile) binds every address.
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("PRODSYS__GRPC__HOST=0.0.0.0"));
    let vars = [
        ("PRODSYS_TOKEN_ISSUER", "https://iam.example.org/"),
        ("PRODSYS_INTERNAL_TOKEN", "a-shared-secret"),
    ];
    let load = |vars: &[(&str, &str)]| {
        let mut env: std::collections::HashMap<String, String> = environment
            .iter()
            .map(|(k, v)| {
                let v = compose_substitute(v, vars).unwrap_or_else(|| panic!("{k} is required"));
                (k.clone(), v)
            })
            .collect();
        env.insert("PRODSYS__GRPC__HOST".into(), "0.0.0.0".into());
        prodsys_config::Settings::load_with_env(Some(&root.join("deploy/prodsys.toml")), Some(env))
            .unwrap()
    };
    let settings = load(&vars);
    assert!(!settings.auth.dev_mode, "compose runs with tokens on");
    assert_eq!(settings.auth.issuers[0].url, "https://iam.example.org/");
    assert_eq!(settings.auth.audience, "prodsys");
    assert_eq!(
        settings.auth.production_managers[CTA],
        format!("/{CTA}/production")
    );
    let auth = prodsys_auth::Auth::from_settings(&settings).expect("the compose settings");
    auth.check_bind("intake", "0.0.0.0:50051".parse().unwrap())
        .expect("tokens on serve every address");
    // Without the issuer or the internal token, compose refuses to start.
    for missing in ["PRODSYS_TOKEN_ISSUER", "PRODSYS_INTERNAL_TOKEN"] {
        let some: Vec<_> = vars
            .iter()
            .copied()
            .filter(|(n, _)| *n != missing)
            .collect();
        assert!(
            environment
                .values()
                .any(|v| compose_substitute(v, &some).is_none()),
            "{missing} is not required"
        );
    }
    // The same image without the auth settings would not start.
    let mut plain = settings.clone();
    plain.auth = prodsys_config::AuthSettings::default();
    assert!(
        prodsys_auth::Auth::from_settings(&plain)
            .unwrap()
            .check_bind("intake", "0.0.0.0:50051".parse().unwrap())
            .is_err()
    );
}

/// A CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM
/// files in `dir`: (ca, cert, key).
fn certificates(dir: &std::path::Path, name: &str) -> [std::path::PathBuf; 3] {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("prodsys test CA {name}"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = [
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    ];
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&paths[0], ca.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn every_port_speaks_tls_verified_against_the_configured_ca() {
    let dir = std::env::temp_dir().join(format!("prodsys-tls-{}", uuid::Uuid::new_v4()));
    let [ca, cert, key] = certificates(&dir, "good");
    let [other_ca, _, _] = certificates(&dir, "other");
    let s = secured_with(|env| {
        env.settings.tls = prodsys_config::TlsSettings {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
    })
    .await;
    let token = s.provider.token("cta-alice", ALL, None).await;
    let addr = |service| s.app.stack.addr(service).unwrap();
    let intake_url = format!("https://{}", addr(prodsys::Service::Intake));
    let status_url = format!("https://{}", addr(prodsys::Service::Status));
    let catalog_url = format!("https://{}", addr(prodsys::Service::Catalog));

    // gRPC over TLS, the server verified against the CA, with the token.
    let channel = prodsys_auth::tls::endpoint(&intake_url, Some(&ca), "intake")
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection verified against the CA");
    let mut intake = pb::request_service_client::RequestServiceClient::with_interceptor(
        channel,
        Credentials::bearer(token.as_str()),
    );
    let profiles = intake
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .expect("ListProfiles over TLS")
        .into_inner();
    assert!(!profiles.profiles.is_empty());
    // A client that does not trust the CA, or speaks plain text, gets nowhere.
    let untrusted = prodsys_auth::tls::endpoint(&intake_url, Some(&other_ca), "intake")
        .unwrap()
        .connect()
        .await;
    assert!(untrusted.is_err(), "a server of another CA was trusted");
    let plain = match Channel::from_shared(format!("http://{}", addr(prodsys::Service::Intake)))
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => pb::request_service_client::RequestServiceClient::new(channel)
            .list_profiles(pb::ListProfilesRequest {})
            .await
            .map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(plain.is_err(), "plain text was answered on a TLS port");

    // HTTP/1.1 over TLS on the status port too (ALPN offers it beside the
    // HTTP/2 of gRPC above); the HTTP API's submit reaches intake over TLS
    // with the caller's token.
    let pem = std::fs::read(&ca).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let answer = http
        .get(format!("{status_url}/api/v1/productions"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);
    let submitted = http
        .post(format!("{status_url}/api/v1/requests"))
        .bearer_auth(&token)
        .json(&http_body(&cta_sleep(1, 0.0, "tls-http")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        submitted.status().as_u16(),
        202,
        "{:?}",
        submitted.text().await
    );

    // prodctl: --ca-file and a token file; the checker reaches the catalog
    // over TLS to decide, and status follows the production to its end.
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let request_file = dir.join("request.json");
    let request = cta_sleep(2, 0.0, "tls-prodctl");
    std::fs::write(&request_file, http_body(&request).to_string()).unwrap();
    let prodctl = support::built_binary("prodctl", "prodctl");
    let run = |args: Vec<String>| {
        let prodctl = prodctl.clone();
        let (intake, status, catalog) =
            (intake_url.clone(), status_url.clone(), catalog_url.clone());
        let (ca, token_file) = (ca.clone(), token_file.clone());
        async move {
            tokio::process::Command::new(prodctl)
                .args(args)
                .env("PRODSYS_INTAKE_URL", intake)
                .env("PRODSYS_STATUS_URL", status)
                .env("PRODSYS_CATALOG_URL", catalog)
                .env("PRODSYS_CA_FILE", ca)
                .env("PRODSYS_TOKEN_FILE", token_file)
                .env_remove("PRODSYS_TOKEN")
                .output()
                .await
                .unwrap()
        }
    };
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        run(vec![
            "submit".into(),
            request_file.display().to_string(),
            "--watch".into(),
            "-o".into(),
            "json".into(),
        ]),
    )
    .await
    .expect("prodctl submit --watch over TLS in time");
    assert!(
        out.status.success(),
        "prodctl submit --watch over TLS: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PRODUCTION_STATE_COMPLETED"));
    // Without the CA prodctl does not trust the server.
    let out = tokio::process::Command::new(&prodctl)
        .args(["profiles"])
        .env("PRODSYS_INTAKE_URL", &intake_url)
        .env("PRODSYS_CA_FILE", &other_ca)
        .env("PRODSYS_TOKEN_FILE", &token_file)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "prodctl trusted another CA");

    // The Python client: https:// verified against ca_file, with the token.
    let script = "import json, sys; sys.path.insert(0, sys.argv[1]); \
        from prodsys_client import Client; \
        c = Client(sys.argv[2], sys.argv[3], sys.argv[4], token=open(sys.argv[5]).read(), ca_file=sys.argv[6]); \
        print(json.dumps({'productions': len(c.productions()), 'profiles': len(c.profiles())}))";
    let root = prodsys_testkit::repo_root();
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(root.join("clients/python/src"))
        .args([&intake_url, &status_url, &catalog_url])
        .arg(&token_file)
        .arg(&ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the Python client over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["productions"], 2, "{seen}");
    assert!(seen["profiles"].as_u64().unwrap() > 0);
    s.app.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
