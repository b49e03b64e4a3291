//! Registering forwarded outputs in Rucio, against a real Rucio server
//! (PyPI rucio 41.5.1 on PostgreSQL, started by tests/servers/rucio/start
//! bound to this machine) whose RSE describes a real XRootD server
//! (tests/servers/xrootd/start): every file lands on the storage with the
//! catalog's adler32 and is listed by Rucio in its production's dataset
//! with that adler32 and size, its PFN on the RSE, its metadata, under the
//! dataset's rule; registering again changes nothing; Rucio down or an RSE
//! it does not know holds the production, which recovers by itself; a file
//! Rucio knows with other bytes is a conflict, never registered over.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prodsys_config::{DestinationSettings, RucioAuth, RucioRule, RucioSettings};
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use serde_json::{Value, json};
use support::{App, cta_example, spawn_app_with};

/// Starts (or finds running) instance `name` of a test server kind
/// (`xrootd`, `rucio`); what it prints: its URL.
fn server(kind: &str, name: &str) -> String {
    let script = prodsys_testkit::repo_root().join(format!("tests/servers/{kind}/start"));
    let output = std::process::Command::new(script)
        .arg(name)
        .output()
        .unwrap_or_else(|e| panic!("running tests/servers/{kind}/start: {e}"));
    assert!(
        output.status.success(),
        "{kind} {name} did not start: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn stop(kind: &str, name: &str) {
    let script = prodsys_testkit::repo_root().join(format!("tests/servers/{kind}/stop"));
    let status = std::process::Command::new(script)
        .arg(name)
        .status()
        .unwrap_or_else(|e| panic!("running tests/servers/{kind}/stop: {e}"));
    assert!(status.success());
}

/// What the storage answers for the adler32 of `path` (`xrdfs query checksum`).
fn storage_adler32(server: &str, path: &str) -> Option<String> {
    let output = std::process::Command::new("xrdfs")
        .args([server, "query", "checksum", path])
        .output()
        .expect("running xrdfs");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace();
    match (output.status.success(), words.next(), words.next()) {
        (true, Some("adler32"), Some(sum)) => Some(sum.to_string()),
        _ => None,
    }
}

/// The test server's root identity (tests/servers/rucio/start bootstraps it).
const ACCOUNT: &str = "root";
const USERNAME: &str = "prodsys";
const PASSWORD: &str = "prodsys-test";

/// The test's own view of the Rucio server, as an operator would have it.
struct Rucio {
    url: String,
    http: reqwest::Client,
    token: String,
}

impl Rucio {
    async fn login(url: &str) -> Self {
        let http = reqwest::Client::new();
        let response = http
            .get(format!("{url}/auth/userpass"))
            .header("X-Rucio-Account", ACCOUNT)
            .header("X-Rucio-Username", USERNAME)
            .header("X-Rucio-Password", PASSWORD)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
        let token = response.headers()["X-Rucio-Auth-Token"]
            .to_str()
            .unwrap()
            .to_string();
        Self {
            url: url.to_string(),
            http,
            token,
        }
    }

    async fn post(&self, path: &str, body: Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("X-Rucio-Auth-Token", &self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "POST {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// A GET's answer: Rucio streams lists as one JSON document a line.
    async fn get(&self, path: &str) -> Vec<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .header("X-Rucio-Auth-Token", &self.token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status} {text}");
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A scope of the test's own.
    async fn scope(&self) -> String {
        let scope = format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        self.post(&format!("/scopes/{ACCOUNT}/{scope}"), json!({}))
            .await;
        scope
    }

    /// An RSE of the test's own whose `root` protocol is the XRootD server
    /// `server` under `base`, with room for rules of the account.
    async fn rse_on(&self, server: &str, base: &str) -> String {
        let rse = format!(
            "XRD-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..].to_uppercase()
        );
        self.add_rse_on(&rse, server, base).await;
        rse
    }

    async fn add_rse_on(&self, rse: &str, server: &str, base: &str) {
        let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
        // prodsys writes where its storage destination says: the RSE is
        // not deterministic, it keeps the PFN it is given.
        self.post(&format!("/rses/{rse}"), json!({ "deterministic": false }))
            .await;
        self.post(
            &format!("/rses/{rse}/protocols/root"),
            json!({
                "scheme": "root",
                "hostname": "127.0.0.1",
                "port": port,
                "prefix": format!("/{base}"),
                "impl": "rucio.rse.protocols.xrootd.Default",
                "domains": {
                    "lan": { "read": 1, "write": 1, "delete": 1 },
                    "wan": { "read": 1, "write": 1, "delete": 1 },
                },
            }),
        )
        .await;
        self.post(
            &format!("/accounts/{ACCOUNT}/limits/local/{rse}"),
            json!({ "bytes": 1_000_000_000_000u64 }),
        )
        .await;
    }

    /// The files of dataset `scope:name` by name: (bytes, adler32).
    async fn dataset_files(&self, scope: &str, name: &str) -> BTreeMap<String, (u64, String)> {
        let files = self.get(&format!("/dids/{scope}/{name}/files")).await;
        let by_name: BTreeMap<String, (u64, String)> = files
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_string(),
                    (
                        f["bytes"].as_u64().unwrap(),
                        f["adler32"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        assert_eq!(by_name.len(), files.len(), "each file once: {files:?}");
        by_name
    }
}

/// Short retries, so outages resolve within a test.
fn quick_retries(env: &mut TestEnv) {
    let f = &mut env.settings.forwarding;
    f.retry_min_ms = 200;
    f.retry_max_ms = 1_000;
    f.claim_ttl_ms = 5_000;
    f.copy_timeout_s = 30;
}

/// Destinations `xrd-store` (the XRootD server under `base`) and
/// `rucio-test` registering there on `rse` in `scope`.
fn rucio_destinations(
    env: &mut TestEnv,
    xrootd: &str,
    base: &str,
    rucio: &str,
    scope: &str,
    rse: &str,
) {
    quick_retries(env);
    let d = &mut env.settings.forwarding.destinations;
    d.insert(
        "xrd-store".into(),
        DestinationSettings::Xroot {
            url: format!("{xrootd}/{base}"),
            xrdcp: "xrdcp".into(),
            xrdfs: "xrdfs".into(),
        },
    );
    d.insert(
        "rucio-test".into(),
        DestinationSettings::Rucio(Box::new(RucioSettings {
            url: rucio.into(),
            account: ACCOUNT.into(),
            vo: None,
            auth: RucioAuth::Userpass {
                username: USERNAME.into(),
                password: PASSWORD.to_string().into(),
            },
            scope: scope.into(),
            rse: rse.into(),
            storage: "xrd-store".into(),
            dataset: "{production_id}".into(),
            rule: Some(RucioRule {
                rse_expression: rse.into(),
                copies: 1,
                lifetime_s: None,
            }),
            batch: 500,
            timeout_s: 10,
        })),
    );
}

fn forwarded_to(destinations: &[&str]) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        forward: destinations.iter().map(|d| d.to_string()).collect(),
        ..cta_example()
    }
}

/// A unique base path on the shared XRootD server for one test.
fn base_path() -> String {
    format!("/prodsys-tests/{}", uuid::Uuid::now_v7().simple())
}

/// Every file of `production_id` with its replicas.
async fn files_of(app: &App, production_id: &str) -> Vec<(pb::OutputFile, Vec<pb::Replica>)> {
    let mut query = pb::FindFilesRequest {
        production_id: production_id.into(),
        page_size: 100,
        ..Default::default()
    };
    let mut all = Vec::new();
    loop {
        let page = app
            .catalog
            .clone()
            .find_files(query.clone())
            .await
            .unwrap()
            .into_inner();
        for (file, replicas) in page.files.into_iter().zip(page.replicas) {
            all.push((file, replicas.replicas));
        }
        if page.next_page_token.is_empty() {
            return all;
        }
        query.page_token = page.next_page_token;
    }
}

fn registered(replicas: &[pb::Replica], destination: &str) -> Option<pb::Replica> {
    replicas
        .iter()
        .find(|r| r.destination == destination && r.state() == pb::ReplicaState::Registered)
        .cloned()
}

/// What Rucio holds about `production_id`'s dataset, to compare before and
/// after a registration is repeated.
async fn rucio_state(rucio: &Rucio, scope: &str, production_id: &str, lfns: &[String]) -> Value {
    let files = rucio.dataset_files(scope, production_id).await;
    let mut replicas = BTreeMap::new();
    for lfn in lfns {
        let found = rucio.get(&format!("/replicas/{scope}/{lfn}")).await;
        assert_eq!(found.len(), 1, "{found:?}");
        replicas.insert(lfn.clone(), found[0]["rses"].clone());
    }
    let rules: Vec<Value> = rucio
        .get(&format!("/dids/{scope}/{production_id}/rules"))
        .await
        .into_iter()
        .map(|r| json!([r["id"], r["rse_expression"], r["copies"], r["account"]]))
        .collect();
    json!({ "files": files, "replicas": replicas, "rules": rules })
}

#[tokio::test]
async fn the_cta_example_is_registered_in_rucio_once_on_the_xrootd_rse() {
    let xrootd = server("xrootd", "rucio");
    let rucio_url = server("rucio", "rucio");
    let rucio = Rucio::login(&rucio_url).await;
    let base = base_path();
    let scope = rucio.scope().await;
    let rse = rucio.rse_on(&xrootd, &base).await;
    let app = spawn_app_with(|env| {
        rucio_destinations(env, &xrootd, &base, &rucio_url, &scope, &rse);
    })
    .await;

    // Only the Rucio destination is asked for: it copies to its storage
    // itself, then registers.
    let production_id = app.accepted(forwarded_to(&["rucio-test"])).await;
    let last = app.watch(&production_id).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert!(last.finished, "{last:?}");
    assert_eq!(
        last.forwarding,
        [pb::DestinationProgress {
            destination: "rucio-test".into(),
            forwarded: 8,
            total: 8,
            failing: 0,
            held_reason: String::new(),
        }]
    );

    let found = files_of(&app, &production_id).await;
    assert_eq!(found.len(), 8, "4 jobs × 2 NSB levels");
    // Rucio lists every file in the production's dataset, with the
    // catalog's adler32 and size, and nothing else.
    let listed = rucio.dataset_files(&scope, &production_id).await;
    let expected: BTreeMap<String, (u64, String)> = found
        .iter()
        .map(|(f, _)| (f.lfn.clone(), (f.size, f.adler32.clone())))
        .collect();
    assert_eq!(listed, expected);
    for (file, replicas) in &found {
        // The registered PFN is where the copy is on the storage, and the
        // storage itself computes the catalog's adler32 for it.
        let replica = registered(replicas, "rucio-test").unwrap_or_else(|| panic!("{replicas:?}"));
        let path = format!("{base}{}", file.lfn);
        assert_eq!(replica.url, format!("{xrootd}/{path}"));
        assert_eq!(
            storage_adler32(&xrootd, &path).as_deref(),
            Some(file.adler32.as_str())
        );
        let on_rucio = rucio.get(&format!("/replicas/{scope}/{}", file.lfn)).await;
        assert_eq!(on_rucio.len(), 1, "{on_rucio:?}");
        let rses = on_rucio[0]["rses"].as_object().unwrap();
        assert_eq!(rses.keys().collect::<Vec<_>>(), [&rse], "{on_rucio:?}");
        assert_eq!(on_rucio[0]["states"][&rse], "AVAILABLE", "{on_rucio:?}");
        // The catalog's metadata, as Rucio's generic metadata keeps it.
        let meta = rucio
            .get(&format!("/dids/{scope}/{}/meta?plugin=ALL", file.lfn))
            .await;
        for key in ["site", "particle", "nsb"] {
            let catalogued = &file.metadata[key];
            let kept = match &meta[0][key] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert!(
                kept == *catalogued,
                "{key}: catalog {catalogued:?}, Rucio {kept:?}"
            );
        }
    }
    // The dataset's rule, once, owned by the account.
    let rules = rucio
        .get(&format!("/dids/{scope}/{production_id}/rules"))
        .await;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["rse_expression"], rse.as_str());
    assert_eq!(rules[0]["account"], ACCOUNT);

    // A redelivery: the catalog forgets that it registered (as a crash
    // between registering and recording would leave it) and registers
    // every file again. Rucio ends exactly as it was.
    let lfns: Vec<String> = found.iter().map(|(f, _)| f.lfn.clone()).collect();
    let before = rucio_state(&rucio, &scope, &production_id, &lfns).await;
    let db = app.env.db().await.unwrap();
    let reset = db
        .execute(
            "UPDATE catalog.replicas SET state = 'pending', url = '', attempts = 1,
                    next_try_at = now()
             WHERE production_id = $1 AND destination = 'rucio-test'",
            &[&production_id],
        )
        .await
        .unwrap();
    assert_eq!(reset, 8);
    wait_for(
        "every file registered again",
        Duration::from_secs(60),
        || async {
            let again = files_of(&app, &production_id).await;
            again
                .iter()
                .all(|(_, r)| registered(r, "rucio-test").is_some_and(|r| r.attempts == 2))
                .then_some(())
        },
    )
    .await
    .unwrap();
    let after = rucio_state(&rucio, &scope, &production_id, &lfns).await;
    assert_eq!(before, after);
    app.stop().await;
}

#[tokio::test]
async fn rucio_down_during_registration_holds_the_production_until_it_is_back() {
    const NAME: &str = "rucio-outage";
    let xrootd = server("xrootd", "rucio");
    let rucio_url = server("rucio", NAME);
    let rucio = Rucio::login(&rucio_url).await;
    let base = base_path();
    let scope = rucio.scope().await;
    let rse = rucio.rse_on(&xrootd, &base).await;
    let app = spawn_app_with(|env| {
        rucio_destinations(env, &xrootd, &base, &rucio_url, &scope, &rse);
    })
    .await;
    // The production forwards to the storage too: the registrations wait
    // for those copies and register them.
    let production_id = app
        .accepted(forwarded_to(&["xrd-store", "rucio-test"]))
        .await;
    stop("rucio", NAME);
    let held = app
        .production_when(
            "the production completed, held by Rucio",
            Duration::from_secs(120),
            &production_id,
            |p| {
                p.state() == pb::ProductionState::Completed
                    && p.forwarding
                        .iter()
                        .any(|d| d.destination == "rucio-test" && d.total == 8 && d.failing > 0)
            },
        )
        .await;
    assert!(!held.finished, "{held:?}");
    assert!(
        held.held_reason
            .contains("forwarding to rucio-test is failing"),
        "{held:?}"
    );
    let found = files_of(&app, &production_id).await;
    assert!(
        found
            .iter()
            .all(|(_, r)| registered(r, "rucio-test").is_none())
    );
    // (A failed registration is retried meanwhile: catch it between tries.)
    let failed = wait_for("a failed registration", Duration::from_secs(30), || async {
        files_of(&app, &production_id)
            .await
            .into_iter()
            .flat_map(|(_, r)| r)
            .find(|r| r.destination == "rucio-test" && r.state() == pb::ReplicaState::Failed)
    })
    .await
    .unwrap();
    assert!(
        failed.reason.contains("unreachable") && failed.attempts >= 1,
        "{failed:?}"
    );

    // Back on the same port: the retries find it by themselves.
    assert_eq!(server("rucio", NAME), rucio_url);
    let done = app
        .production_when(
            "the production finished after the outage",
            Duration::from_secs(90),
            &production_id,
            |p| p.finished,
        )
        .await;
    assert!(
        done.forwarding
            .iter()
            .all(|d| d.forwarded == 8 && d.failing == 0),
        "{done:?}"
    );
    let rucio = Rucio::login(&rucio_url).await;
    let found = files_of(&app, &production_id).await;
    let listed = rucio.dataset_files(&scope, &production_id).await;
    let expected: BTreeMap<String, (u64, String)> = found
        .iter()
        .map(|(f, _)| (f.lfn.clone(), (f.size, f.adler32.clone())))
        .collect();
    assert_eq!(listed, expected, "every file registered, once");
    for (file, replicas) in &found {
        let registered = registered(replicas, "rucio-test").unwrap();
        assert_eq!(registered.url, format!("{xrootd}/{base}{}", file.lfn));
        let on_rucio = rucio.get(&format!("/replicas/{scope}/{}", file.lfn)).await;
        assert_eq!(on_rucio.len(), 1);
        assert_eq!(
            on_rucio[0]["rses"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            [&rse]
        );
    }
    let rules = rucio
        .get(&format!("/dids/{scope}/{production_id}/rules"))
        .await;
    assert_eq!(rules.len(), 1, "{rules:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_rse_holds_until_it_is_added_and_a_conflicting_file_is_never_registered() {
    let xrootd = server("xrootd", "rucio");
    let rucio_url = server("rucio", "rucio");
    let rucio = Rucio::login(&rucio_url).await;
    let base = base_path();
    let scope = rucio.scope().await;
    let rse = format!(
        "XRD-LATE-{}",
        &uuid::Uuid::now_v7().simple().to_string()[24..].to_uppercase()
    );
    let app = spawn_app_with(|env| {
        rucio_destinations(env, &xrootd, &base, &rucio_url, &scope, &rse);
    })
    .await;
    let production_id = app.accepted(forwarded_to(&["rucio-test"])).await;
    let held = app
        .production_when(
            "the production held by the unknown RSE",
            Duration::from_secs(120),
            &production_id,
            |p| {
                p.state() == pb::ProductionState::Completed
                    && p.forwarding
                        .first()
                        .is_some_and(|d| d.total == 8 && d.failing > 0)
            },
        )
        .await;
    assert!(!held.finished, "{held:?}");
    // Held with Rucio's own reason (caught between two tries).
    wait_for(
        "a registration failed on RSENotFound",
        Duration::from_secs(30),
        || async {
            files_of(&app, &production_id)
                .await
                .into_iter()
                .flat_map(|(_, r)| r)
                .find(|r| {
                    r.state() == pb::ReplicaState::Failed
                        && r.reason.contains("RSENotFound")
                        && r.reason.contains(&rse)
                })
        },
    )
    .await
    .unwrap();
    // Meanwhile someone registered one of the files elsewhere with other
    // bytes: a conflict, reported, never registered over.
    let files = files_of(&app, &production_id).await;
    let (clash, _) = &files[0];
    let elsewhere = rucio.rse_on(&xrootd, "/elsewhere").await;
    rucio
        .post(
            "/replicas",
            json!({
                "rse": elsewhere,
                "files": [{
                    "scope": scope,
                    "name": clash.lfn,
                    "bytes": clash.size + 1,
                    "adler32": "00000001",
                    "pfn": format!("{xrootd}//elsewhere{}", clash.lfn),
                }],
            }),
        )
        .await;
    // The operator adds the RSE: registration resumes by itself, for every
    // file but the conflicting one.
    rucio.add_rse_on(&rse, &xrootd, &base).await;
    let (registered_now, conflict) = wait_for(
        "every file but the conflicting one registered",
        Duration::from_secs(90),
        || async {
            let found = files_of(&app, &production_id).await;
            let registered_now: BTreeSet<String> = found
                .iter()
                .filter(|(_, r)| registered(r, "rucio-test").is_some())
                .map(|(f, _)| f.lfn.clone())
                .collect();
            let conflict = found
                .iter()
                .find(|(f, _)| f.lfn == clash.lfn)
                .and_then(|(_, r)| r.iter().find(|r| r.reason.contains("conflict")).cloned());
            (registered_now.len() == 7).then_some((registered_now, conflict?))
        },
    )
    .await
    .unwrap();
    assert!(!registered_now.contains(&clash.lfn));
    assert!(
        conflict.reason.contains("00000001") && conflict.reason.contains(&clash.adler32),
        "{conflict:?}"
    );
    let listed = rucio.dataset_files(&scope, &production_id).await;
    assert_eq!(
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        registered_now,
        "the conflicting file is not attached"
    );
    let still = app
        .production_when(
            "the production held by the conflict",
            Duration::from_secs(30),
            &production_id,
            |p| {
                p.forwarding
                    .first()
                    .is_some_and(|d| d.forwarded == 7 && d.failing == 1)
            },
        )
        .await;
    assert!(!still.finished, "{still:?}");
    assert!(
        still
            .held_reason
            .contains("forwarding to rucio-test is failing"),
        "{still:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_refused_token_holds_until_the_token_file_holds_a_good_one() {
    let xrootd = server("xrootd", "rucio");
    let rucio_url = server("rucio", "rucio");
    let rucio = Rucio::login(&rucio_url).await;
    let base = base_path();
    let scope = rucio.scope().await;
    let rse = rucio.rse_on(&xrootd, &base).await;
    let token_file = std::env::temp_dir().join(format!(
        "prodsys-rucio-token-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::write(&token_file, "root-expired-token\n").unwrap();
    let app = spawn_app_with(|env| {
        rucio_destinations(env, &xrootd, &base, &rucio_url, &scope, &rse);
        let Some(DestinationSettings::Rucio(r)) =
            env.settings.forwarding.destinations.get_mut("rucio-test")
        else {
            unreachable!()
        };
        r.auth = RucioAuth::Token {
            file: Some(token_file.clone()),
            env: None,
            token: None,
        };
    })
    .await;
    let production_id = app.accepted(forwarded_to(&["rucio-test"])).await;
    // Rucio refuses the token: held with its answer.
    wait_for(
        "a registration refused with 401",
        Duration::from_secs(120),
        || async {
            files_of(&app, &production_id)
                .await
                .into_iter()
                .flat_map(|(_, r)| r)
                .find(|r| {
                    r.state() == pb::ReplicaState::Failed
                        && r.reason.contains("401")
                        && r.reason.contains("CannotAuthenticate")
                })
        },
    )
    .await
    .unwrap();
    let held = app.production(&production_id).await.unwrap();
    assert!(!held.finished, "{held:?}");
    // Whatever renews the token writes a good one: the next try reads it.
    std::fs::write(&token_file, format!("{}\n", rucio.token)).unwrap();
    app.production_when(
        "the production finished with the new token",
        Duration::from_secs(90),
        &production_id,
        |p| p.finished,
    )
    .await;
    assert_eq!(rucio.dataset_files(&scope, &production_id).await.len(), 8);
    std::fs::remove_file(&token_file).unwrap();
    app.stop().await;
}
