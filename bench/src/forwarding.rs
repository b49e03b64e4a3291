//! Forwarding to a real XRootD server: many small files already catalogued
//! under one production are forwarded by the catalog (its `xroot`
//! destination) until every replica is verified on the storage, beside
//! `xrdcp` of the same files to the same server in the same run.
//!
//! The files are catalogued first (their production has no forwarding plan
//! yet); the clock starts when the `request.accepted` naming the destination
//! is published, which gives every file a due replica at once, and stops
//! when the catalog holds every replica `verified` (the storage answered the
//! catalog's adler32 for it). The raw run copies the same files with
//! `xrdcp --parallel` of many files per invocation, several invocations at
//! once, each file's adler32 checked on the storage by `xrdcp --cksum`
//! (the server's checksum of each file that landed, against the one
//! computed here), without `--posc`, as the catalog's batches go.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prodsys_core::events::{JOB_OUTPUT, REQUEST_ACCEPTED};
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use tokio::sync::Semaphore;

use crate::productions::Xrootd;
use crate::services::Services;
use crate::{amqp, sys};

/// The destination's name in the services' settings.
const FORWARD_TO: &str = "bench-xrootd";
/// Files per `job.output` event that catalogues them.
const FILES_PER_MESSAGE: u64 = 200;

#[derive(Debug, Clone, Copy)]
pub struct ForwardingPlan {
    pub files: u64,
    pub file_bytes: usize,
    /// The raw run: files per `xrdcp` invocation, invocations at once, and
    /// transfers at once within one (`--parallel`): the catalog's
    /// `claim_batch`, one invocation at a time, and the destination's
    /// `parallel` (the catalog's transfers at once).
    pub raw_batch: usize,
    pub raw_concurrency: usize,
    pub raw_parallel: usize,
    /// prodsys runs, each of its own production's files, each followed by
    /// a raw run (and one raw run before the first): the figures compared
    /// are the medians, the machine's drift falling on both.
    pub rounds: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardingResult {
    pub files: u64,
    pub file_bytes: usize,
    pub xrootd: String,
    /// `request.accepted` published → every replica verified.
    pub prodsys_seconds: f64,
    /// Cataloguing the files beforehand (not part of the figure).
    pub catalogue_seconds: f64,
    /// Replicas verified, and files found on the storage afterwards.
    pub verified: u64,
    pub stored: u64,
    /// The catalog's settings the run used.
    pub max_concurrent_copies: usize,
    pub claim_batch: usize,
    pub raw_seconds: f64,
    /// Every run's seconds, in the order they ran: raw before the services
    /// started, then after each prodsys run (the services idle); prodsys,
    /// one per round. `prodsys_seconds` and `raw_seconds` are their medians.
    pub raw_runs: Vec<f64>,
    pub prodsys_runs: Vec<f64>,
    pub raw_batch: usize,
    pub raw_concurrency: usize,
    pub raw_parallel: usize,
    pub raw_stored: u64,
    pub prodsys_cpu: sys::CpuUse,
    pub raw_cpu: sys::CpuUse,
}

impl ForwardingResult {
    pub fn prodsys_per_s(&self) -> f64 {
        self.files as f64 / self.prodsys_seconds
    }
    pub fn raw_per_s(&self) -> f64 {
        self.files as f64 / self.raw_seconds
    }
    /// prodsys's rate over raw xrdcp's, each round against the raw runs
    /// just before and just after it (their mean): what drifts over the
    /// scenario (the machine, the server's state) falls on both sides.
    pub fn round_ratios(&self) -> Vec<f64> {
        self.prodsys_runs
            .iter()
            .enumerate()
            .filter_map(|(i, prodsys)| {
                let raw = (self.raw_runs.get(i)? + self.raw_runs.get(i + 1)?) / 2.0;
                Some(raw / prodsys)
            })
            .collect()
    }

    /// The median of the rounds' ratios.
    pub fn ratio(&self) -> f64 {
        median(&self.round_ratios())
    }
}

/// One small file of the measurement: where it is, its LFN and figures.
#[derive(Debug, Clone)]
pub struct SmallFile {
    pub path: PathBuf,
    pub lfn: String,
    pub size: u64,
    pub adler32: String,
}

/// Bytes of file `n`: a xorshift stream seeded by `n` (no two alike).
fn contents(n: u64, len: usize) -> Vec<u8> {
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `count` files of `bytes` each below `root`, each at its LFN (as a
/// job writes its outputs under its own directory: the file's name is the
/// LFN's).
pub fn write_files(
    root: &Path,
    production: &str,
    count: u64,
    bytes: usize,
) -> anyhow::Result<Vec<SmallFile>> {
    let mut files = Vec::with_capacity(count as usize);
    for n in 0..count {
        let lfn = crate::stack::catalog_lfn(production, n);
        let path = root.join(lfn.trim_start_matches('/'));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let data = contents(n, bytes);
        std::fs::write(&path, &data)?;
        let (size, adler32) = prodsys_core::checksum::adler32_hex(data.as_slice())?;
        files.push(SmallFile {
            path,
            lfn,
            size,
            adler32,
        });
    }
    Ok(files)
}

/// The catalog's view of `files`: `job.output` events of
/// [`FILES_PER_MESSAGE`] files, each file with its URL `url_of` gives and
/// the metadata a CTA job gives its outputs.
pub fn outputs(
    exchange: &str,
    production: &str,
    files: &[SmallFile],
    url_of: impl Fn(&SmallFile) -> String,
) -> Vec<amqp::Message> {
    files
        .chunks(FILES_PER_MESSAGE as usize)
        .enumerate()
        .map(|(job_index, chunk)| {
            let job_index = job_index as u64;
            let files = chunk
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let n = job_index * FILES_PER_MESSAGE + i as u64;
                    pb::OutputFile {
                        lfn: f.lfn.clone(),
                        size: f.size,
                        adler32: f.adler32.clone(),
                        url: url_of(f),
                        ..crate::stack::catalog_file(production, job_index, n)
                    }
                })
                .collect();
            let output = pb::JobOutput {
                production_id: production.to_string(),
                job_index,
                attempt: 1,
                files,
                ..Default::default()
            };
            amqp::event(
                exchange,
                JOB_OUTPUT,
                production,
                prost::Message::encode_to_vec(&output),
            )
        })
        .collect()
}

/// `request.accepted` of `production` forwarded to `destination`, as the
/// checker publishes it.
pub fn accepted(exchange: &str, production: &str, destination: &str) -> amqp::Message {
    let accepted = pb::RequestAccepted {
        request_id: uuid::Uuid::now_v7().to_string(),
        production_id: production.to_string(),
        profile: "cta-irf-mc".into(),
        vo: "vo.cta.in2p3.fr".into(),
        backend: "local".into(),
        submitter: "bench".into(),
        forward: vec![destination.to_string()],
        ..Default::default()
    };
    amqp::event(
        exchange,
        REQUEST_ACCEPTED,
        production,
        prost::Message::encode_to_vec(&accepted),
    )
}

/// Publishes `messages` on the run's broker with confirms.
pub async fn publish(messages: Vec<amqp::Message>) -> anyhow::Result<()> {
    let connection =
        amqp::connect(&prodsys_testkit::amqp_url(), "prodsys-bench-forwarding").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    amqp::publish_all(&channel, messages, 64).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Waits until `sql` (one bigint, `$1` the production) reaches `want`;
/// fails when a service exits or `limit` passes.
pub async fn wait_count(
    db: &tokio_postgres::Client,
    services: &mut Services,
    sql: &str,
    production: &str,
    want: u64,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let statement = db.prepare(sql).await?;
    let deadline = Instant::now() + limit;
    loop {
        let n: i64 = db.query_one(&statement, &[&production]).await?.get(0);
        if n as u64 >= want {
            return Ok(());
        }
        services.ensure_running()?;
        if Instant::now() > deadline {
            bail!("{what}: {n} of {want} after {limit:?}");
        }
        // Each look counts the production's rows: looked at often, the
        // counting would take CPU from the copies it times (every 20 ms:
        // about a tenth of a core). Every 100 ms ends the timing at most
        // 0.1 s late.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Catalogues `files` of `production` (no forwarding plan yet) and waits
/// until the catalog holds every one; the seconds it took.
pub async fn catalogue(
    env: &TestEnv,
    db: &tokio_postgres::Client,
    services: &mut Services,
    production: &str,
    files: &[SmallFile],
    url_of: impl Fn(&SmallFile) -> String,
) -> anyhow::Result<f64> {
    let exchange = format!("{}prodsys.events", env.prefix);
    let began = Instant::now();
    publish(outputs(&exchange, production, files, url_of)).await?;
    wait_count(
        db,
        services,
        "SELECT count(*) FROM catalog.files WHERE production_id = $1",
        production,
        files.len() as u64,
        Duration::from_secs(300),
        "files catalogued",
    )
    .await?;
    Ok(began.elapsed().as_secs_f64())
}

pub async fn run(plan: ForwardingPlan) -> anyhow::Result<ForwardingResult> {
    let env = TestEnv::new().await?;
    sys::own_database(&env.database);
    let xrootd = match tokio::task::spawn_blocking(|| Xrootd::start("bench-forwarding")).await? {
        Ok(x) => x,
        Err(e) => {
            sys::cleanup(env).await;
            return Err(e);
        }
    };
    let mut env = env;
    let result = measure(plan, &mut env, &xrootd).await;
    sys::cleanup(env).await;
    let _ = tokio::task::spawn_blocking(move || xrootd.stop()).await;
    result
}

async fn measure(
    plan: ForwardingPlan,
    env: &mut TestEnv,
    xrootd: &Xrootd,
) -> anyhow::Result<ForwardingResult> {
    let tag = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let outputs_dir = env.work_dir.join("outputs");
    let rounds = plan.rounds.max(1);
    // One production of `plan.files` files a round.
    let mut sets = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let production = format!("BENCH-F{tag}-{round}");
        let (dir, name, files, bytes) = (
            outputs_dir.clone(),
            production.clone(),
            plan.files,
            plan.file_bytes,
        );
        let files =
            tokio::task::spawn_blocking(move || write_files(&dir, &name, files, bytes)).await??;
        sets.push((production, files));
    }
    let mut result = ForwardingResult {
        files: plan.files,
        file_bytes: plan.file_bytes,
        xrootd: xrootd.url.clone(),
        raw_batch: plan.raw_batch,
        raw_concurrency: plan.raw_concurrency,
        raw_parallel: plan.raw_parallel,
        verified: u64::MAX,
        raw_stored: u64::MAX,
        ..Default::default()
    };

    // The raw limit first, nothing of prodsys running.
    let meter = sys::CpuMeter::start();
    result
        .raw_runs
        .push(raw_xrdcp(&sets[0].1, xrootd, "raw-0", plan).await?);
    result.raw_cpu = meter.stop();
    result.raw_stored = crate::productions::files_below(&xrootd.local("raw-0"));

    env.settings.forwarding.destinations.insert(
        FORWARD_TO.into(),
        prodsys_config::DestinationSettings::Xroot {
            url: xrootd.at("prodsys"),
            xrdcp: "xrdcp".into(),
            xrdfs: "xrdfs".into(),
            parallel: plan.raw_parallel,
        },
    );
    env.settings.forwarding.claim_batch = plan.raw_batch;
    result.max_concurrent_copies = env.settings.forwarding.max_concurrent_copies;
    result.claim_batch = env.settings.forwarding.claim_batch;
    let mut services = Services::start(&env.settings, &env.work_dir.join("services")).await?;
    let outcome = async {
        for (round, (production, files)) in sets.iter().enumerate() {
            let run = forward(
                env,
                &mut services,
                production,
                files,
                FORWARD_TO,
                "verified",
            )
            .await?;
            result.catalogue_seconds += run.catalogue_seconds;
            result.prodsys_runs.push(run.prodsys_seconds);
            if round == 0 {
                result.prodsys_cpu = run.prodsys_cpu;
            }
            result.verified = result.verified.min(run.reached);
            // The same copies without prodsys (its services idle).
            let sub = format!("raw-{}", round + 1);
            result
                .raw_runs
                .push(raw_xrdcp(files, xrootd, &sub, plan).await?);
            result.raw_stored = result
                .raw_stored
                .min(crate::productions::files_below(&xrootd.local(&sub)));
        }
        anyhow::Ok(())
    }
    .await;
    services.stop().await;
    outcome?;
    result.prodsys_seconds = median(&result.prodsys_runs);
    result.raw_seconds = median(&result.raw_runs);
    // Every round's files below the one destination directory.
    result.stored = crate::productions::files_below(&xrootd.local("prodsys")) / rounds as u64;
    Ok(result)
}

/// The middle of `runs` (the mean of the middle two of an even count).
fn median(runs: &[f64]) -> f64 {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// What [`forward`] measured.
pub struct Forwarded {
    /// Cataloguing the files (before the clock).
    pub catalogue_seconds: f64,
    /// From the forwarding planned until every replica was in its state.
    pub prodsys_seconds: f64,
    pub prodsys_cpu: sys::CpuUse,
    /// Replicas in the state at the end.
    pub reached: u64,
}

/// Catalogues `files` under `production` (as local files), then plans its
/// forwarding to `destination` (a `request.accepted` naming it) and waits
/// until every file's replica there is in `state`.
pub async fn forward(
    env: &TestEnv,
    services: &mut Services,
    production: &str,
    files: &[SmallFile],
    destination: &str,
    state: &str,
) -> anyhow::Result<Forwarded> {
    let db = env.db().await?;
    let catalogue_seconds = catalogue(env, &db, services, production, files, |f| {
        format!("file://{}", f.path.display())
    })
    .await?;
    let exchange = format!("{}prodsys.events", env.prefix);
    let meter = sys::CpuMeter::start_with(&services.pids());
    let began = Instant::now();
    publish(vec![accepted(&exchange, production, destination)]).await?;
    let in_state = format!(
        "SELECT count(*) FROM catalog.replicas WHERE production_id = $1 AND state = '{state}'"
    );
    wait_count(
        &db,
        services,
        &in_state,
        production,
        files.len() as u64,
        Duration::from_secs(120 + files.len() as u64 / 5),
        &format!("replicas {state}"),
    )
    .await?;
    let prodsys_seconds = began.elapsed().as_secs_f64();
    let prodsys_cpu = meter.stop();
    let reached = db
        .query_one(&in_state, &[&production])
        .await?
        .get::<_, i64>(0) as u64;
    Ok(Forwarded {
        catalogue_seconds,
        prodsys_seconds,
        prodsys_cpu,
        reached,
    })
}

/// `xrdcp` of every file to `sub` on the server, keeping each file's path
/// below its LFN: the directories made first (one `xrdfs` session), then
/// `raw_batch` files of one directory per `xrdcp --parallel
/// raw_parallel --cksum adler32` (each file's adler32 computed here and
/// compared with the storage's), `raw_concurrency` invocations at once.
async fn raw_xrdcp(
    files: &[SmallFile],
    xrootd: &Xrootd,
    sub: &str,
    plan: ForwardingPlan,
) -> anyhow::Result<f64> {
    let mut by_dir: BTreeMap<String, Vec<&SmallFile>> = BTreeMap::new();
    for f in files {
        let dir = f.lfn.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        by_dir.entry(dir.to_string()).or_default().push(f);
    }
    let base = format!("{}/{}", xrootd.base_path(), sub);
    let began = Instant::now();
    let script: String = by_dir
        .keys()
        .map(|dir| format!("mkdir -p {base}{dir}\n"))
        .collect();
    xrdfs_session(&xrootd.url, &script).await?;
    let slots = Arc::new(Semaphore::new(plan.raw_concurrency.max(1)));
    let mut runs = tokio::task::JoinSet::new();
    for (dir, group) in &by_dir {
        for chunk in group.chunks(plan.raw_batch.max(1)) {
            let permit = slots.clone().acquire_owned().await?;
            let mut command = tokio::process::Command::new("xrdcp");
            command
                // No --posc: it makes each small file's copy several times
                // slower on the server.
                .args(["--force", "--nopbar", "--cksum", "adler32"])
                .arg("--parallel")
                .arg(plan.raw_parallel.max(1).to_string())
                .args(chunk.iter().map(|f| &f.path))
                .arg(format!("{}/{base}{dir}/", xrootd.url))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            runs.spawn(async move {
                let out = command.output().await.context("running xrdcp");
                drop(permit);
                let out = out?;
                if !out.status.success() {
                    bail!(
                        "xrdcp exited {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(())
            });
        }
    }
    while let Some(joined) = runs.join_next().await {
        joined??;
    }
    Ok(began.elapsed().as_secs_f64())
}

/// Runs `script` (one command a line) in one `xrdfs` session on `server`.
async fn xrdfs_session(server: &str, script: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("xrdfs")
        .arg(server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running xrdfs")?;
    let mut stdin = child.stdin.take().context("xrdfs's stdin")?;
    let script = script.to_string();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(script.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });
    let out = child.wait_with_output().await?;
    let _ = writer.await;
    if !out.status.success() {
        bail!(
            "xrdfs exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
