//! Whole productions: many CTA productions of real `prodsys-toysim` jobs on
//! the local executor, from SubmitRequest until every production is
//! COMPLETED and finished (every output scanned, checksummed and catalogued),
//! beside the same toysim commands run by a plain spawner at the same
//! concurrency, in the same run.
//!
//! The raw commands are the ones the dispatcher ran: each job's command and
//! environment rendered from the profile with the parameters, run number and
//! seed the dispatcher stored for it (`domain::job_spec` does the same), the
//! program found in the same tools directory, each writing into a directory
//! of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prodsys::Service;
use prodsys_core::profile::{PlannedJob, ProfileSet};
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::services::Services;
use crate::sys;

/// Requests in flight while the productions are submitted.
const SUBMIT_CONCURRENCY: usize = 16;
/// The forwarding destination's name in the services' settings.
const FORWARD_TO: &str = "bench-xrootd";

#[derive(Debug, Clone, Copy)]
pub struct ProductionsPlan {
    pub productions: u64,
    pub jobs_per_production: u64,
    /// Jobs at once: the local executor's slots, and the raw spawner's.
    pub concurrency: usize,
    /// Jobs the local executor holds beyond those, waiting for a slot.
    pub queued: usize,
    /// The dispatcher's poll interval (None: as `TestEnv` sets it).
    pub poll_interval_ms: Option<u64>,
    /// Processes of every service (1, or 2 to show replicas share the work).
    pub replicas: usize,
    /// Whether the raw spawner runs the same commands afterwards.
    pub raw: bool,
    /// Forward every output to a real XRootD server (tests/servers/xrootd,
    /// started for the run), and copy the raw run's with `xrdcp` too.
    pub xrootd: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ProductionsResult {
    pub productions: u64,
    pub jobs: u64,
    pub concurrency: usize,
    pub queued: usize,
    pub replicas: usize,
    /// The dispatcher's poll interval (the longest wait between two looks at the jobs).
    pub poll_interval_ms: u64,
    /// SubmitRequest of the first production → the last one finished.
    pub prodsys_seconds: f64,
    /// Until every request had been answered by intake.
    pub submit_seconds: f64,
    /// Files catalogued, and those whose size and adler32 the bench read
    /// again from the file itself and found equal.
    pub files: u64,
    pub files_verified: u64,
    /// The same commands by the plain spawner (NaN when it did not run).
    pub raw_seconds: f64,
    pub prodsys_cpu: sys::CpuUse,
    pub raw_cpu: sys::CpuUse,
    /// With forwarding: the XRootD server, and the files found under the
    /// production's base path on it afterwards.
    pub xrootd: Option<String>,
    pub forwarded: u64,
    /// Work done twice, counted in the databases.
    pub duplicates: Duplicates,
    /// Peak RSS (VmHWM) of each service process over the run.
    pub service_rss_peak: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
pub struct Duplicates {
    /// Requests with more than one production (checker).
    pub productions_per_request: i64,
    /// Jobs run by more than one attempt (dispatcher; no job fails here).
    pub extra_attempts: i64,
    /// Outputs catalogued more than once for one job.
    pub files_per_job: i64,
    /// For the first few jobs run more than once: which, and how each
    /// earlier attempt ended by its directory's exit record (what made the
    /// dispatcher try again).
    pub retried: Vec<String>,
}

impl Duplicates {
    pub fn total(&self) -> i64 {
        self.productions_per_request + self.extra_attempts + self.files_per_job
    }
}

impl ProductionsResult {
    pub fn prodsys_per_s(&self) -> f64 {
        self.jobs as f64 / self.prodsys_seconds
    }
    pub fn raw_per_s(&self) -> f64 {
        self.jobs as f64 / self.raw_seconds
    }
    /// prodsys's job rate over the raw spawner's.
    pub fn ratio(&self) -> f64 {
        self.raw_seconds / self.prodsys_seconds
    }
}

/// `prodsys-toysim` beside the bench's own binary (where `TestEnv` points the
/// dispatcher's tools directory); built with cargo in the same profile when
/// it is not there yet.
fn toysim() -> anyhow::Result<PathBuf> {
    let dir = prodsys_testkit::bin_dir();
    let path = dir.join("prodsys-toysim");
    if path.is_file() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.args(["build", "-q", "-p", "prodsys-toysim"]);
    if dir.ends_with("release") {
        command.arg("--release");
    }
    let status = command
        .current_dir(prodsys_testkit::repo_root())
        .stdin(Stdio::null())
        .status()
        .context("building prodsys-toysim with cargo")?;
    if !status.success() || !path.is_file() {
        bail!(
            "prodsys-toysim is not at {} and `cargo build -p prodsys-toysim` did not put it there",
            path.display()
        );
    }
    Ok(path)
}

/// The parameters of production `n`: the shipped CTA example, one job per
/// shower, one NSB level (one file a job), an array layout of its own so no
/// request duplicates or overlaps another.
fn parameters(n: u64, jobs: u64, tag: &str) -> anyhow::Result<serde_json::Value> {
    let example = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(example)?)?;
    let mut parameters = file["parameters"].clone();
    parameters["n_showers"] = jobs.into();
    parameters["showers_per_job"] = 1.into();
    parameters["nsb_levels"] = serde_json::json!([1]);
    parameters["array_layout"] = format!("bench-{tag}-{n}").into();
    Ok(parameters)
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// The XRootD test server of the run: instance `name`, files under `base`.
pub struct Xrootd {
    name: String,
    pub url: String,
    base: String,
}

impl Xrootd {
    /// Starts instance `name` with the repository's test-server script
    /// (which installs xrootd-server and xrootd-client when missing).
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let script = prodsys_testkit::repo_root().join("tests/servers/xrootd/start");
        let out = std::process::Command::new(&script)
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "tests/servers/xrootd/start {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            name: name.to_string(),
            url: String::from_utf8(out.stdout)?.trim().to_string(),
            base: format!("/prodsys-bench/{}", uuid::Uuid::now_v7().simple()),
        })
    }

    /// `root://host:port//base/sub`.
    pub fn at(&self, sub: &str) -> String {
        format!("{}/{}/{sub}", self.url, self.base)
    }

    /// Where the server keeps `base/sub` on this machine.
    pub fn local(&self, sub: &str) -> PathBuf {
        prodsys_testkit::repo_root()
            .join(format!("var/servers/xrootd/{}/data", self.name))
            .join(self.base.trim_start_matches('/'))
            .join(sub)
    }

    /// The run's base path on the server (`/prodsys-bench/…`).
    pub fn base_path(&self) -> &str {
        &self.base
    }

    /// Removes the run's files and stops the server.
    pub fn stop(self) {
        sys::set_aside(&self.local(""));
        let script = prodsys_testkit::repo_root().join("tests/servers/xrootd/stop");
        let _ = std::process::Command::new(script)
            .arg(&self.name)
            .stdin(Stdio::null())
            .status();
    }
}

/// Files below `dir`, counted.
pub fn files_below(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let path = e.path();
            if path.is_dir() { files_below(&path) } else { 1 }
        })
        .sum()
}

pub async fn run(plan: ProductionsPlan) -> anyhow::Result<ProductionsResult> {
    let mut env = TestEnv::new().await?;
    sys::own_database(&env.database);
    let xrootd = if plan.xrootd {
        // One instance for every bench run (the script reuses its port);
        // each run's files under a base path of their own.
        match tokio::task::spawn_blocking(|| Xrootd::start("bench")).await? {
            Ok(x) => Some(x),
            Err(e) => {
                sys::cleanup(env).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let result = measure(plan, &mut env, xrootd.as_ref()).await;
    sys::cleanup(env).await;
    if let Some(x) = xrootd {
        let _ = tokio::task::spawn_blocking(move || x.stop()).await;
    }
    result
}

async fn measure(
    plan: ProductionsPlan,
    env: &mut TestEnv,
    xrootd: Option<&Xrootd>,
) -> anyhow::Result<ProductionsResult> {
    let toysim = toysim()?;
    if let Some(x) = xrootd {
        env.settings.forwarding.destinations.insert(
            FORWARD_TO.into(),
            prodsys_config::DestinationSettings::Xroot {
                url: x.at("prodsys"),
                xrdcp: "xrdcp".into(),
                xrdfs: "xrdfs".into(),
                parallel: prodsys_config::DEFAULT_XROOT_PARALLEL,
            },
        );
    }
    let tools = toysim.parent().context("toysim's directory")?.to_path_buf();
    env.settings.dispatcher.tools_dir = tools.clone();
    env.settings.dispatcher.max_concurrent_jobs = plan.concurrency;
    env.settings.dispatcher.max_queued_jobs = plan.queued;
    if let Some(ms) = plan.poll_interval_ms {
        env.settings.dispatcher.poll_interval_ms = ms;
    }
    let services =
        Services::start_replicated(&env.settings, &env.work_dir.join("services"), plan.replicas)
            .await?;
    let mut services = services;
    let outcome = through_prodsys(plan, env, &mut services, xrootd.is_some()).await;
    let peaks = services.stop().await;
    let mut result = outcome?;
    if let Some(x) = xrootd {
        result.xrootd = Some(x.url.clone());
        result.forwarded = files_below(&x.local("prodsys"));
    }
    result.service_rss_peak = peaks;
    result.poll_interval_ms = env.settings.dispatcher.poll_interval_ms;
    if !plan.raw {
        return Ok(result);
    }
    // The commands the dispatcher ran, now run plainly (the services are
    // stopped: nothing else of prodsys takes CPU).
    let db = env.db().await?;
    let commands = commands(&db, env, &env.work_dir.join("raw")).await?;
    anyhow::ensure!(
        commands.len() as u64 == result.jobs,
        "{} commands rendered for {} jobs",
        commands.len(),
        result.jobs
    );
    let meter = sys::CpuMeter::start();
    let copy_to = xrootd.map(|x| x.at("raw"));
    result.raw_seconds = spawn_all(commands, plan.concurrency, &tools, copy_to).await?;
    result.raw_cpu = meter.stop();
    Ok(result)
}

async fn through_prodsys(
    plan: ProductionsPlan,
    env: &TestEnv,
    services: &mut Services,
    forward: bool,
) -> anyhow::Result<ProductionsResult> {
    let mut intakes = Vec::new();
    for addr in services.addrs(Service::Intake) {
        intakes.push(pb::request_service_client::RequestServiceClient::new(
            channel(addr).await?,
        ));
    }
    anyhow::ensure!(!intakes.is_empty(), "no intake process");
    let db = env.db().await?;
    let tag: String = env
        .prefix
        .split('.')
        .nth(1)
        .unwrap_or("bench")
        .chars()
        .take(8)
        .collect();
    let jobs = plan.productions * plan.jobs_per_production;
    let meter = sys::CpuMeter::start_with(&services.pids());
    let began = Instant::now();
    let slots = Arc::new(Semaphore::new(SUBMIT_CONCURRENCY));
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..plan.productions {
        let permit = slots.clone().acquire_owned().await?;
        let mut intake = intakes[n as usize % intakes.len()].clone();
        let parameters = parameters(n, plan.jobs_per_production, &tag)?;
        calls.spawn(async move {
            let answer = intake
                .submit_request(pb::SubmitRequestRequest {
                    profile: "cta-irf-mc".into(),
                    vo: "vo.cta.in2p3.fr".into(),
                    parameters_json: parameters.to_string(),
                    backend: "local".into(),
                    submitter: "bench".into(),
                    forward: if forward {
                        vec![FORWARD_TO.into()]
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                })
                .await;
            drop(permit);
            answer.map(|a| a.into_inner().request_id)
        });
    }
    while let Some(joined) = calls.join_next().await {
        joined?.context("SubmitRequest")?;
    }
    let submit_seconds = began.elapsed().as_secs_f64();
    // Finished: COMPLETED and every output catalogued (status's `forwarded`,
    // which the catalog's production.forwarded fills, for productions without
    // destinations too).
    let deadline = began + Duration::from_secs(300 + jobs);
    loop {
        let row = db
            .query_one(
                // Three scans of small tables (a probe of each production
                // against `forwarded` cost 3.5 ms a poll at 1,000 productions,
                // PostgreSQL CPU counted as the run's).
                "SELECT (SELECT count(*) FROM status.productions WHERE state = 'COMPLETED'),
                        (SELECT count(*) FROM status.productions
                         WHERE state IN ('FAILED', 'PARTIALLY_COMPLETED', 'CANCELLED', 'REJECTED')),
                        (SELECT count(*) FROM status.forwarded f
                         JOIN status.productions p USING (production_id) WHERE p.state = 'COMPLETED')",
                &[],
            )
            .await?;
        let (completed, ended_otherwise, finished): (i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        if ended_otherwise > 0 {
            bail!("{ended_otherwise} production(s) ended other than COMPLETED");
        }
        if finished as u64 >= plan.productions {
            break;
        }
        services.ensure_running()?;
        if Instant::now() > deadline {
            bail!(
                "{completed} of {} productions COMPLETED ({finished} finished) after {:.0} s",
                plan.productions,
                began.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prodsys_seconds = began.elapsed().as_secs_f64();
    let prodsys_cpu = meter.stop();
    let (files, files_verified) = verify_files(&db).await?;
    anyhow::ensure!(
        files == jobs,
        "{files} files catalogued for {jobs} jobs of one file each"
    );
    let duplicates = duplicates(&db, &env.settings.dispatcher.work_dir).await?;
    Ok(ProductionsResult {
        productions: plan.productions,
        jobs,
        concurrency: plan.concurrency,
        queued: plan.queued,
        replicas: plan.replicas,
        prodsys_seconds,
        submit_seconds,
        files,
        files_verified,
        prodsys_cpu,
        duplicates,
        raw_seconds: f64::NAN,
        ..Default::default()
    })
}

/// Every catalogued file read again: its size and adler32 against the
/// catalog's. Returns (files, files that matched).
async fn verify_files(db: &tokio_postgres::Client) -> anyhow::Result<(u64, u64)> {
    let rows = db
        .query("SELECT url, size, adler32 FROM catalog.files", &[])
        .await?;
    let files = rows.len() as u64;
    let checked = tokio::task::spawn_blocking(move || {
        let mut matched = 0u64;
        for row in rows {
            let url: String = row.get(0);
            let size: i64 = row.get(1);
            let adler32: String = row.get(2);
            let Some(path) = url.strip_prefix("file://") else {
                continue;
            };
            let Ok(file) = std::fs::File::open(path) else {
                continue;
            };
            if let Ok((read, sum)) =
                prodsys_core::checksum::adler32_hex(std::io::BufReader::new(file))
                && read == size as u64
                && sum.eq_ignore_ascii_case(&adler32)
            {
                matched += 1;
            }
        }
        matched
    })
    .await?;
    Ok((files, checked))
}

/// Work done twice, as the databases record it; for a job run more than
/// once, how its earlier attempts ended, from their directories under `work_dir`.
pub async fn duplicates(
    db: &tokio_postgres::Client,
    work_dir: &Path,
) -> anyhow::Result<Duplicates> {
    let one = |sql: &'static str| async move {
        db.query_one(sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .with_context(|| format!("counting duplicates: {sql}"))
    };
    Ok(Duplicates {
        productions_per_request: one("SELECT coalesce(sum(n - 1), 0)::bigint FROM
               (SELECT count(*) AS n FROM dispatcher.productions GROUP BY request_id) t")
        .await?,
        extra_attempts: one("SELECT coalesce(sum(attempt - 1), 0)::bigint FROM dispatcher.jobs")
            .await?,
        files_per_job: one("SELECT coalesce(sum(n - 1), 0)::bigint FROM
               (SELECT count(*) AS n FROM catalog.files GROUP BY production_id, job_index) t")
        .await?,
        retried: db
            .query(
                "SELECT production_id, job_index, attempt, raw_status FROM dispatcher.jobs
                 WHERE attempt > 1 ORDER BY production_id, job_index LIMIT 5",
                &[],
            )
            .await
            .context("reading the jobs run more than once")?
            .iter()
            .map(|row| {
                let (production, job, attempt): (String, i64, i32) =
                    (row.get(0), row.get(1), row.get(2));
                let earlier: Vec<String> = (1..attempt)
                    .map(|a| {
                        let dir = work_dir.join(&production).join(format!("{job:06}.a{a}"));
                        let exit = std::fs::read_to_string(dir.join("prodsys.exit"))
                            .map(|e| {
                                e.lines()
                                    .next()
                                    .unwrap_or("an empty exit record")
                                    .to_string()
                            })
                            .unwrap_or_else(|_| "no exit record".into());
                        format!("attempt {a}: {exit}")
                    })
                    .collect();
                format!(
                    "{production} job {job} (attempt {attempt} {}; {})",
                    row.get::<_, String>(3),
                    earlier.join(", ")
                )
            })
            .collect(),
    })
}

/// One job's command, as the dispatcher rendered it for its first attempt,
/// writing into a directory under `dir` instead.
struct RawCommand {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
}

async fn commands(
    db: &tokio_postgres::Client,
    env: &TestEnv,
    dir: &Path,
) -> anyhow::Result<Vec<RawCommand>> {
    let profiles = ProfileSet::load_dir(&env.settings.profiles_dir)?;
    let rows = db
        .query(
            "SELECT p.production_id, p.profile, p.vo, p.parameters,
                    j.job_index, j.run_number, j.seed, j.units
             FROM dispatcher.jobs j JOIN dispatcher.productions p USING (production_id)
             ORDER BY p.production_id, j.job_index",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let production_id: String = row.get(0);
        let profile_name: String = row.get(1);
        let vo: String = row.get(2);
        let parameters: serde_json::Value = row.get(3);
        let job = PlannedJob {
            index: row.get::<_, i64>(4) as u64,
            run_number: row.get::<_, i64>(5) as u64,
            seed: row.get::<_, i64>(6) as u64,
            units: row.get::<_, i64>(7) as u64,
        };
        let profile = profiles
            .get(&profile_name)
            .with_context(|| format!("no profile {profile_name}"))?;
        let workdir = dir
            .join(&production_id)
            .join(format!("{:06}.a1", job.index));
        let output_dir = workdir.join(&profile.outputs().dir);
        std::fs::create_dir_all(&output_dir)?;
        let vars = profile.job_variables(
            &parameters,
            &production_id,
            &vo,
            &job,
            1,
            &output_dir.to_string_lossy(),
        );
        let command = profile
            .job_command(&parameters, &vars)
            .map_err(|reason| anyhow::anyhow!("rendering {production_id}'s job: {reason}"))?;
        out.push(RawCommand {
            program: command.program,
            args: command.args,
            env: command.env,
            workdir,
        });
    }
    Ok(out)
}

/// Runs every command, `concurrency` at once, in its own directory with the
/// tools directory first on PATH (as the local executor runs them, less its
/// supervisor); the seconds all of them took.
async fn spawn_all(
    commands: Vec<RawCommand>,
    concurrency: usize,
    tools: &Path,
    copy_to: Option<String>,
) -> anyhow::Result<f64> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(tools.to_path_buf()).chain(std::env::split_paths(&path)),
    )?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let began = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for command in commands {
        let permit = slots.clone().acquire_owned().await?;
        let program = if command.program.contains('/') {
            PathBuf::from(&command.program)
        } else {
            tools.join(&command.program)
        };
        let path = path.clone();
        let copy_to = copy_to.clone();
        runs.spawn(async move {
            let out = tokio::process::Command::new(&program)
                .args(&command.args)
                .envs(command.env.iter().map(|(k, v)| (k, v)))
                .env("PATH", path)
                .current_dir(&command.workdir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .await;
            if let (Ok(done), Some(base)) = (&out, &copy_to)
                && done.status.success()
            {
                // The job's outputs, each copied as the forwarder copies it.
                copy_outputs(&command.workdir, base).await?;
            }
            drop(permit);
            match out {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(anyhow::anyhow!(
                    "{} exited {}: {}",
                    program.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(e) => Err(anyhow::Error::from(e).context("starting a job")),
            }
        });
    }
    while let Some(joined) = runs.join_next().await {
        joined??;
    }
    Ok(began.elapsed().as_secs_f64())
}

/// `xrdcp -f` of every file below `workdir` to `base`/<its path below `workdir`>.
async fn copy_outputs(workdir: &Path, base: &str) -> anyhow::Result<()> {
    let mut stack = vec![workdir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            // Below the raw run's directory: the production, the job, the file.
            let root = workdir.ancestors().nth(2).unwrap_or(workdir);
            let below = path.strip_prefix(root)?;
            let target = format!("{base}/{}", below.display());
            let out = tokio::process::Command::new("xrdcp")
                .args(["-f", "-s"])
                .arg(&path)
                .arg(&target)
                .stdin(Stdio::null())
                .output()
                .await
                .context("running xrdcp")?;
            if !out.status.success() {
                bail!(
                    "xrdcp to {target} exited {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    Ok(())
}
