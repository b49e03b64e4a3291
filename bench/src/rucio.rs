//! Registration in a real Rucio server (tests/servers/rucio): many small
//! files already catalogued under one production, already on the storage
//! the Rucio RSE describes, are registered by the catalog's `rucio`
//! destination (replica with PFN, bytes and adler32 and the catalog's
//! metadata on the RSE, attached to the production's dataset) until every
//! replica is `registered`; beside the same number of replicas registered
//! with Rucio's bulk REST calls directly (`POST /replicas` with the same
//! metadata, `POST /dids/attachments`), against the same server and RSE in
//! the same run.
//!
//! The storage is a directory (a `posix` destination; the RSE's `file`
//! protocol has it as its prefix) where the files were written at their
//! LFNs and catalogued there, as a remote job's outputs are: the catalog
//! reads each file's adler32 there (a local read of a small file) and
//! copies nothing, so the figure is the registration's.

use std::time::Instant;

use anyhow::{Context, bail};
use prodsys_config::{DestinationSettings, RucioAuth, RucioSettings};
use prodsys_testkit::TestEnv;
use serde_json::{Value, json};

use crate::forwarding::{SmallFile, forward, write_files};
use crate::services::Services;
use crate::sys;

/// The test server's root identity (tests/servers/rucio/start bootstraps it).
const ACCOUNT: &str = "root";
const USERNAME: &str = "prodsys";
const PASSWORD: &str = "prodsys-test";
/// The instance of tests/servers/rucio the bench uses.
const INSTANCE: &str = "bench";
const STORAGE: &str = "bench-disk";
const REGISTER_IN: &str = "bench-rucio";

#[derive(Debug, Clone, Copy)]
pub struct RucioPlan {
    pub files: u64,
    /// Replicas per bulk call, for prodsys (`batch` of the destination)
    /// and the raw registration alike.
    pub batch: usize,
    /// Bulk calls in flight at once in the raw registration.
    pub raw_clients: usize,
}

#[derive(Debug, Clone, Default)]
pub struct RucioResult {
    pub files: u64,
    pub batch: usize,
    pub raw_clients: usize,
    pub server: String,
    pub max_concurrent_copies: usize,
    pub claim_batch: usize,
    /// `request.accepted` published → every replica registered.
    pub prodsys_seconds: f64,
    pub catalogue_seconds: f64,
    /// Files Rucio lists in the production's dataset afterwards, and in the
    /// raw run's.
    pub listed: u64,
    pub raw_listed: u64,
    pub raw_seconds: f64,
    pub prodsys_cpu: sys::CpuUse,
    pub raw_cpu: sys::CpuUse,
}

impl RucioResult {
    pub fn prodsys_per_s(&self) -> f64 {
        self.files as f64 / self.prodsys_seconds
    }
    pub fn raw_per_s(&self) -> f64 {
        self.files as f64 / self.raw_seconds
    }
    pub fn ratio(&self) -> f64 {
        self.raw_seconds / self.prodsys_seconds
    }
}

/// The bench's client of the Rucio server, as an operator would have it.
struct Rucio {
    url: String,
    http: reqwest::Client,
    token: String,
}

impl Rucio {
    async fn login(url: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::new();
        let response = http
            .get(format!("{url}/auth/userpass"))
            .header("X-Rucio-Account", ACCOUNT)
            .header("X-Rucio-Username", USERNAME)
            .header("X-Rucio-Password", PASSWORD)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /auth/userpass answered {}", response.status());
        }
        let token = response
            .headers()
            .get("X-Rucio-Auth-Token")
            .context("no X-Rucio-Auth-Token")?
            .to_str()?
            .to_string();
        Ok(Self {
            url: url.to_string(),
            http,
            token,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("X-Rucio-Auth-Token", &self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "POST {path}: {status} {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Lines of a GET's answer (Rucio streams lists a JSON document a line).
    async fn count(&self, path: &str) -> anyhow::Result<u64> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .header("X-Rucio-Auth-Token", &self.token)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {text}");
        }
        Ok(text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
    }
}

fn short_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_string()
}

/// Starts (or finds running) the bench's Rucio instance; its URL.
fn start_server() -> anyhow::Result<String> {
    let script = prodsys_testkit::repo_root().join("tests/servers/rucio/start");
    let out = std::process::Command::new(&script)
        .arg(INSTANCE)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "tests/servers/rucio/start {INSTANCE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

pub async fn run(plan: RucioPlan) -> anyhow::Result<RucioResult> {
    let url = tokio::task::spawn_blocking(start_server).await??;
    let mut env = TestEnv::new().await?;
    sys::own_database(&env.database);
    let result = measure(plan, &mut env, &url).await;
    sys::cleanup(env).await;
    result
}

async fn measure(plan: RucioPlan, env: &mut TestEnv, url: &str) -> anyhow::Result<RucioResult> {
    let rucio = Rucio::login(url).await?;
    let disk = env.work_dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    // A scope for prodsys's registrations and one for the raw run's (the
    // same names in each), and a non-deterministic RSE whose `file`
    // protocol is the directory.
    let scope = format!("b{}", short_id());
    let raw_scope = format!("r{}", short_id());
    for s in [&scope, &raw_scope] {
        rucio
            .post(&format!("/scopes/{ACCOUNT}/{s}"), json!({}))
            .await?;
    }
    let rse = format!("BENCH-{}", short_id().to_uppercase());
    rucio
        .post(&format!("/rses/{rse}"), json!({ "deterministic": false }))
        .await?;
    rucio
        .post(
            &format!("/rses/{rse}/protocols/file"),
            json!({
                "scheme": "file",
                "hostname": "localhost",
                "port": 0,
                "prefix": format!("{}/", disk.display()),
                "impl": "rucio.rse.protocols.posix.Default",
                "domains": {
                    "lan": { "read": 1, "write": 1, "delete": 1 },
                    "wan": { "read": 1, "write": 1, "delete": 1 },
                },
            }),
        )
        .await?;
    rucio
        .post(
            &format!("/accounts/{ACCOUNT}/limits/local/{rse}"),
            json!({ "bytes": 1_000_000_000_000u64 }),
        )
        .await?;

    let production = format!("BENCH-R{}", short_id());
    let files = {
        let (dir, production, count) = (disk.clone(), production.clone(), plan.files);
        tokio::task::spawn_blocking(move || write_files(&dir, &production, count, 1024)).await??
    };
    let mut result = RucioResult {
        files: plan.files,
        batch: plan.batch,
        raw_clients: plan.raw_clients,
        server: url.to_string(),
        ..Default::default()
    };

    // The raw limit first, nothing of prodsys running.
    let dataset = format!("{production}-raw");
    let meter = sys::CpuMeter::start();
    result.raw_seconds = raw_register(&rucio, &raw_scope, &rse, &dataset, &files, plan).await?;
    result.raw_cpu = meter.stop();
    result.raw_listed = rucio
        .count(&format!("/dids/{raw_scope}/{dataset}/files"))
        .await?;

    let f = &mut env.settings.forwarding;
    f.destinations
        .insert(STORAGE.into(), DestinationSettings::posix(disk.clone()));
    f.destinations.insert(
        REGISTER_IN.into(),
        DestinationSettings::Rucio(Box::new(RucioSettings {
            url: url.into(),
            account: ACCOUNT.into(),
            vo: None,
            auth: RucioAuth::Userpass {
                username: USERNAME.into(),
                password: PASSWORD.to_string().into(),
            },
            scope: scope.clone(),
            rse: rse.clone(),
            storage: STORAGE.into(),
            dataset: "{production_id}".into(),
            rule: None,
            batch: plan.batch,
            timeout_s: 60,
        })),
    );
    result.max_concurrent_copies = f.max_concurrent_copies;
    result.claim_batch = f.claim_batch;
    let mut services = Services::start(&env.settings, &env.work_dir.join("services")).await?;
    let outcome = forward(
        env,
        &mut services,
        &production,
        &files,
        REGISTER_IN,
        "registered",
    )
    .await;
    services.stop().await;
    let run = outcome?;
    (result.catalogue_seconds, result.prodsys_seconds) =
        (run.catalogue_seconds, run.prodsys_seconds);
    result.prodsys_cpu = run.prodsys_cpu;
    result.listed = rucio
        .count(&format!("/dids/{scope}/{production}/files"))
        .await?;
    Ok(result)
}

/// The same replicas registered with Rucio's bulk calls: the dataset made,
/// then per `batch` files one `POST /replicas` (PFN, bytes, adler32 and
/// the metadata the catalog sends) and one `POST /dids/attachments`,
/// `raw_clients` batches at once.
async fn raw_register(
    rucio: &Rucio,
    scope: &str,
    rse: &str,
    dataset: &str,
    files: &[SmallFile],
    plan: RucioPlan,
) -> anyhow::Result<f64> {
    let began = Instant::now();
    rucio
        .post(
            &format!("/dids/{scope}/{dataset}"),
            json!({ "type": "DATASET" }),
        )
        .await?;
    let batches: Vec<&[SmallFile]> = files.chunks(plan.batch.max(1)).collect();
    let calls = futures::stream::iter(batches.into_iter().enumerate().map(|(b, chunk)| {
        let replicas: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let n = (b * plan.batch.max(1) + i) as u64;
                let meta: serde_json::Map<String, Value> = crate::stack::catalog_file("raw", 0, n)
                    .metadata
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                json!({
                    "scope": scope,
                    "name": f.lfn,
                    "bytes": f.size,
                    "adler32": f.adler32,
                    "pfn": format!("file://{}", f.path.display()),
                    "meta": meta,
                })
            })
            .collect();
        let dids: Vec<Value> = chunk
            .iter()
            .map(|f| json!({ "scope": scope, "name": f.lfn }))
            .collect();
        async move {
            rucio
                .post("/replicas", json!({ "rse": rse, "files": replicas }))
                .await?;
            rucio
                .post(
                    "/dids/attachments",
                    json!({
                        "attachments": [{ "scope": scope, "name": dataset, "dids": dids }],
                        "ignore_duplicate": true,
                    }),
                )
                .await
        }
    }));
    use futures::StreamExt;
    let outcomes: Vec<anyhow::Result<()>> = calls
        .buffer_unordered(plan.raw_clients.max(1))
        .collect()
        .await;
    for outcome in outcomes {
        outcome?;
    }
    Ok(began.elapsed().as_secs_f64())
}
