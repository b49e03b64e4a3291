//! Registering forwarded outputs in Rucio, against a real Rucio server
//! (PyPI rucio 41.5.1 on PostgreSQL, started by tests/servers/rucio/start
//! bound to this machine) whose RSE describes a real XRootD server
//! (tests/servers/xrootd/start): every file lands on the storage with the
//! catalog's adler32 and is listed by Rucio in its production's dataset
//! with that adler32 and size, its PFN on the RSE, its metadata, under the
//! dataset's rule; registering again changes nothing; Rucio down or an RSE
//! it does not know holds the production, which recovers by itself; a file
//! Rucio knows with other bytes is a conflict, never registered over; and
//! a catalog process killed with SIGKILL while it copies and registers
//! hundreds of files resumes with nothing registered twice, nothing
//! recorded that is not on the storage, and nothing missing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prodsys_config::{DestinationSettings, RucioAuth, RucioRule, RucioSettings};
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use serde_json::{Value, json};
use support::spawn_app_with;
use support::storage::{
    base_path, files_of, forwarded_to, publish_event, quick_retries, replica_in, server,
    stop_server, storage_adler32, stored_adler32, stored_below,
};

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
            parallel: prodsys_config::DEFAULT_XROOT_PARALLEL,
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

fn registered(replicas: &[pb::Replica], destination: &str) -> Option<pb::Replica> {
    replica_in(replicas, destination, pb::ReplicaState::Registered)
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
    stop_server("rucio", NAME);
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

/// One `prodsys serve catalog` process of the test's own, so it can be
/// killed with SIGKILL (no shutdown, no cleanup) and started again.
struct CatalogProcess {
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl CatalogProcess {
    async fn start(env: &TestEnv) -> Self {
        std::fs::create_dir_all(&env.work_dir).unwrap();
        let config = env.work_dir.join("catalog.toml");
        std::fs::write(&config, toml::to_string(&env.settings).unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut process = Self {
            config,
            log: env.work_dir.join("catalog.log"),
            port,
            child: None,
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = std::process::Command::new(support::built_binary("prodsys", "prodsys"))
            .args(["serve", "catalog", "--config"])
            .arg(&self.config)
            .env("PRODSYS__CATALOG__PORT", self.port.to_string())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prodsys serve catalog");
        self.child = Some(child);
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], self.port).into();
        wait_for(
            "the catalog process serving",
            Duration::from_secs(60),
            || async move {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                (answer.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log_tail()));
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("a running catalog");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn client(
        &self,
    ) -> pb::catalog_service_client::CatalogServiceClient<tonic::transport::Channel> {
        pb::catalog_service_client::CatalogServiceClient::new(
            support::channel(([127, 0, 0, 1], self.port).into()).await,
        )
    }
}

impl Drop for CatalogProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The catalog process killed with SIGKILL while it copies hundreds of
/// files to XRootD and registers them in Rucio, then started again: at the
/// kill, every replica it had recorded is on the storage with the
/// catalogued adler32 (and, registered, in Rucio); after the restart it
/// takes over the dead process's claims, and in the end every file is on
/// each destination once, with its checksum, registered in Rucio once,
/// and the production announced forwarded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_catalog_killed_mid_forwarding_resumes_with_nothing_twice_and_nothing_missing() {
    const JOBS: u64 = 10;
    const FILES_PER_JOB: u64 = 15;
    const XROOTD: &str = "rucio";
    let xrootd = server("xrootd", XROOTD);
    let rucio_url = server("rucio", "rucio");
    let rucio = Rucio::login(&rucio_url).await;
    let base = base_path();
    let scope = rucio.scope().await;
    let rse = rucio.rse_on(&xrootd, &format!("{base}/rucio")).await;

    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.expect("test environment");
    rucio_destinations(
        &mut env,
        &xrootd,
        &format!("{base}/rucio"),
        &rucio_url,
        &scope,
        &rse,
    );
    // A second, plain copy destination beside Rucio's storage.
    env.settings.forwarding.destinations.insert(
        "xrd-plain".into(),
        DestinationSettings::Xroot {
            url: format!("{xrootd}/{base}/plain"),
            xrdcp: "xrdcp".into(),
            xrdfs: "xrdfs".into(),
            parallel: prodsys_config::DEFAULT_XROOT_PARALLEL,
        },
    );
    // Few copies at once: the kill lands mid-run.
    env.settings.forwarding.max_concurrent_copies = 4;
    env.settings.forwarding.claim_batch = 4;
    env.settings.forwarding.claim_ttl_ms = 3_000;
    // Status runs here (it reports the production finished); the catalog
    // is the process the test kills.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let status_stack = prodsys::start(&[prodsys::Service::Status], &env.settings, shutdown.clone())
        .await
        .expect("starting status");
    let status = pb::status_service_client::StatusServiceClient::new(
        support::channel(status_stack.addr(prodsys::Service::Status).unwrap()).await,
    );
    // Every production.forwarded the catalog announces, counted.
    let (amqp, channel) = env.amqp().await.unwrap();
    let announced = format!("{}test.forwarded", env.prefix);
    channel
        .queue_declare(
            announced.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            announced.as_str().into(),
            format!("{}prodsys.events", env.prefix).into(),
            "production.forwarded".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut catalog = CatalogProcess::start(&env).await;

    // The production, its jobs' outputs and its end, as the checker and
    // the dispatcher announce them.
    let production_id = "CTA-990002";
    publish_event(
        &env,
        "request.accepted",
        &pb::RequestAccepted {
            request_id: uuid::Uuid::now_v7().to_string(),
            production_id: production_id.into(),
            profile: "cta-irf-mc".into(),
            vo: "vo.cta.in2p3.fr".into(),
            backend: "local".into(),
            forward: vec!["xrd-plain".into(), "rucio-test".into()],
            ..Default::default()
        },
    )
    .await;
    publish_event(
        &env,
        "production.dispatched",
        &pb::ProductionDispatched {
            production_id: production_id.into(),
            job_total: JOBS,
            ..Default::default()
        },
    )
    .await;
    let written = env.work_dir.join("written");
    std::fs::create_dir_all(&written).unwrap();
    let mut expected: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for job in 0..JOBS {
        let files = (0..FILES_PER_JOB)
            .map(|n| {
                let bytes = format!("{production_id} job {job} file {n} ")
                    .repeat(50 + n as usize)
                    .into_bytes();
                let path = written.join(format!("j{job}-f{n}.dat"));
                std::fs::write(&path, &bytes).unwrap();
                let adler32 = prodsys_core::checksum::adler32_hex(bytes.as_slice())
                    .unwrap()
                    .1;
                let lfn = format!("/vo.cta.in2p3.fr/MC/kill/{production_id}/j{job}-f{n}.dat");
                expected.insert(lfn.clone(), (bytes.len() as u64, adler32.clone()));
                pb::OutputFile {
                    lfn,
                    size: bytes.len() as u64,
                    adler32,
                    url: format!("file://{}", path.display()),
                    production_id: production_id.into(),
                    job_index: job,
                    ..Default::default()
                }
            })
            .collect();
        publish_event(
            &env,
            "job.output",
            &pb::JobOutput {
                production_id: production_id.into(),
                job_index: job,
                attempt: 1,
                files,
            },
        )
        .await;
    }
    publish_event(
        &env,
        "production.completed",
        &pb::ProductionCompleted {
            production_id: production_id.into(),
            state: pb::ProductionState::Completed as i32,
            counts: Some(pb::JobCounts {
                done: JOBS,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let total = (JOBS * FILES_PER_JOB) as i64;

    // Killed once a tenth of the replicas is done.
    let db = env.db().await.unwrap();
    let done_count = || async {
        db.query_one(
            "SELECT count(*) FILTER (WHERE state IN ('verified', 'registered')),
                    count(*) FILTER (WHERE state = 'copying')
             FROM catalog.replicas WHERE production_id = $1",
            &[&production_id],
        )
        .await
        .unwrap()
    };
    wait_for(
        "a tenth of the replicas done",
        Duration::from_secs(60),
        || async {
            let row = done_count().await;
            (row.get::<_, i64>(0) >= total * 2 / 10).then_some(())
        },
    )
    .await
    .unwrap();
    catalog.kill();
    let row = done_count().await;
    let (done_at_kill, copying_at_kill): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        done_at_kill < total * 2,
        "the kill came after everything was done: nothing was cut off"
    );

    // At the kill: every replica recorded done is on the storage with the
    // catalog's adler32, and every one recorded registered is in Rucio.
    let recorded = db
        .query(
            "SELECT r.lfn, r.destination, r.state, r.url, f.adler32
             FROM catalog.replicas r JOIN catalog.files f USING (lfn)
             WHERE r.production_id = $1 AND r.state IN ('verified', 'registered')",
            &[&production_id],
        )
        .await
        .unwrap();
    assert_eq!(recorded.len() as i64, done_at_kill);
    let in_rucio = rucio.dataset_files(&scope, production_id).await;
    for row in &recorded {
        let (lfn, destination, state, url, adler32): (String, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let (sub, want_state) = match destination.as_str() {
            "xrd-plain" => ("plain", "verified"),
            "rucio-test" => ("rucio", "registered"),
            other => panic!("a replica on {other}"),
        };
        assert_eq!(state, want_state, "{lfn}");
        let path = format!("{base}/{sub}{lfn}");
        assert_eq!(url, format!("{xrootd}/{path}"));
        assert_eq!(
            stored_adler32(XROOTD, &path).as_deref(),
            Some(adler32.as_str()),
            "{lfn} recorded {state} on {destination} at the kill but not so on the storage"
        );
        if destination == "rucio-test" {
            assert_eq!(
                in_rucio.get(&lfn).map(|(_, sum)| sum.as_str()),
                Some(adler32.as_str()),
                "{lfn} recorded registered at the kill but not in Rucio's dataset"
            );
        }
    }

    // Started again (copying more at once): it takes over what the dead
    // process held.
    env.settings.forwarding.max_concurrent_copies = 16;
    env.settings.forwarding.claim_batch = 64;
    std::fs::write(&catalog.config, toml::to_string(&env.settings).unwrap()).unwrap();
    let restarted = std::time::Instant::now();
    catalog.spawn().await;
    let finished = wait_for(
        "the production finished after the restart",
        Duration::from_secs(300),
        || {
            let mut status = status.clone();
            async move {
                let p = status
                    .get_production(pb::GetProductionRequest {
                        production_id: production_id.into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                p.finished.then_some(p)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", catalog.log_tail()));
    let recovered = restarted.elapsed();
    let progress: Vec<(String, u64, u64)> = finished
        .forwarding
        .iter()
        .map(|d| (d.destination.clone(), d.forwarded, d.total))
        .collect();
    let n = total as u64;
    assert_eq!(
        progress,
        [
            ("xrd-plain".to_string(), n, n),
            ("rucio-test".to_string(), n, n)
        ]
    );

    // Each file catalogued once, with both replicas, on the storage once
    // with its adler32, and nothing else there.
    let mut catalog_client = catalog.client().await;
    let mut query = pb::FindFilesRequest {
        production_id: production_id.into(),
        page_size: 1000,
        ..Default::default()
    };
    let mut found = Vec::new();
    loop {
        let page = catalog_client
            .find_files(query.clone())
            .await
            .unwrap()
            .into_inner();
        found.extend(page.files.into_iter().zip(page.replicas));
        if page.next_page_token.is_empty() {
            break;
        }
        query.page_token = page.next_page_token;
    }
    let listed: BTreeMap<String, (u64, String)> = found
        .iter()
        .map(|(f, _)| (f.lfn.clone(), (f.size, f.adler32.clone())))
        .collect();
    assert_eq!(listed, expected);
    for (file, replicas) in &found {
        let states: BTreeSet<(String, pb::ReplicaState)> = replicas
            .replicas
            .iter()
            .map(|r| (r.destination.clone(), r.state()))
            .collect();
        assert_eq!(
            states,
            BTreeSet::from([
                ("rucio-test".to_string(), pb::ReplicaState::Registered),
                ("xrd-plain".to_string(), pb::ReplicaState::Verified),
            ]),
            "{}",
            file.lfn
        );
        for sub in ["plain", "rucio"] {
            assert_eq!(
                stored_adler32(XROOTD, &format!("{base}/{sub}{}", file.lfn)).as_deref(),
                Some(file.adler32.as_str()),
                "{}",
                file.lfn
            );
        }
    }
    let lfns: BTreeSet<String> = expected.keys().cloned().collect();
    assert_eq!(stored_below(XROOTD, &format!("{base}/plain")), lfns);
    assert_eq!(stored_below(XROOTD, &format!("{base}/rucio")), lfns);
    // Rucio: the dataset holds every file once with its size and adler32,
    // each file one replica on the RSE, the dataset one rule.
    assert_eq!(rucio.dataset_files(&scope, production_id).await, expected);
    let replicas = rucio
        .get(&format!("/replicas/{scope}/{production_id}"))
        .await;
    assert_eq!(replicas.len(), expected.len());
    for r in &replicas {
        let rses = r["rses"].as_object().unwrap();
        assert_eq!(rses.keys().collect::<Vec<_>>(), [&rse], "{r}");
        assert_eq!(rses[&rse].as_array().unwrap().len(), 1, "{r}");
    }
    let rules = rucio
        .get(&format!("/dids/{scope}/{production_id}/rules"))
        .await;
    assert_eq!(rules.len(), 1, "{rules:?}");
    // Announced forwarded once, after the restart as before it.
    let forwarded_events = channel
        .queue_declare(
            announced.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(forwarded_events, 1);
    println!(
        "killed with {done_at_kill} of {} replicas done and {copying_at_kill} being copied; \
         every one done once {:.1} s after the restart",
        total * 2,
        recovered.as_secs_f64()
    );
    let _ = channel
        .queue_delete(announced.as_str().into(), Default::default())
        .await;
    let _ = amqp.close(200, "done".into()).await;
    catalog.kill();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), status_stack.wait()).await;
    env.cleanup().await;
}
