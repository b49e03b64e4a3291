//! Container start overhead: container jobs of the KM3NeT example's image
//! (one event each, so the job itself does next to nothing) run by prodsys
//! on the local executor, beside `podman run` of the same command line the
//! same number of times at the same concurrency, in the same run.
//!
//! The raw command is the profile's podman runtime line (its memory limit,
//! no network, the output directory bound) with the template's image,
//! entrypoint and the job's arguments, as the dispatcher renders them; the
//! prodsys time runs from SubmitRequest to the production's COMPLETED, so it
//! holds the checks, planning, the supervisor of every job and collecting
//! (and checksumming) every output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::services::Services;
use crate::sys;

#[derive(Debug, Clone, Copy)]
pub struct ContainerPlan {
    pub jobs: u64,
    /// Jobs at once: the local executor's slots, and the raw run's.
    pub concurrency: usize,
    /// Jobs the local executor holds waiting for a slot (`max_queued_jobs`),
    /// each started the moment one frees, as the raw run starts its next.
    pub queued: usize,
    /// The dispatcher's poll interval (ms; None: the tests' 200).
    pub poll_interval_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ContainerResult {
    pub jobs: u64,
    pub concurrency: usize,
    pub queued: usize,
    pub image: String,
    /// `podman run` of the same command, `jobs` times.
    pub raw_seconds: f64,
    /// SubmitRequest → COMPLETED.
    pub prodsys_seconds: f64,
    /// Files prodsys catalogued (one per job).
    pub files: u64,
    /// The machine's CPU over the `podman run` runs, and over prodsys's.
    pub raw_cpu: sys::CpuUse,
    pub prodsys_cpu: sys::CpuUse,
}

impl ContainerResult {
    pub fn raw_per_s(&self) -> f64 {
        self.jobs as f64 / self.raw_seconds
    }
    pub fn prodsys_per_s(&self) -> f64 {
        self.jobs as f64 / self.prodsys_seconds
    }
    /// prodsys's rate over the raw one: 1 is no overhead at all.
    pub fn ratio(&self) -> f64 {
        self.raw_seconds / self.prodsys_seconds
    }
}

/// Builds the example's image and writes its templates into `dir` (as
/// `deploy/local/build-images` does for `deploy/local/up`); the pinned image.
fn build_image(dir: &Path) -> anyhow::Result<String> {
    let script = prodsys_testkit::repo_root().join("deploy/local/build-images");
    let out = std::process::Command::new(&script)
        .arg("--templates-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "deploy/local/build-images failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The example's parameters for `jobs` jobs of one event each.
fn parameters(jobs: u64) -> anyhow::Result<serde_json::Value> {
    let example = prodsys_testkit::repo_root().join("examples/km3net-container-sim.json");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(example)?)?;
    let mut parameters = file["parameters"].clone();
    parameters["n_events"] = jobs.into();
    parameters["events_per_job"] = 1.into();
    Ok(parameters)
}

/// The command of the raw run: the profile's podman line rendered for one
/// job of `parameters` writing into `output`, the template's image and
/// entrypoint, and the job's arguments.
fn raw_command(
    image: &str,
    templates: &Path,
    parameters: &serde_json::Value,
    output: &Path,
    run: u64,
) -> anyhow::Result<Vec<String>> {
    let root = prodsys_testkit::repo_root();
    let profile: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("profiles/km3net-container-sim.json"),
    )?)?;
    let file = std::fs::read_dir(templates)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .context("no templates file was written")?;
    let templates: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let template = &templates["templates"][parameters["container_template"]
        .as_str()
        .context("the example names no template")?];
    let memory = profile["resources"]["memory_mb"].as_u64().unwrap_or(1024);
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut vars: BTreeMap<&str, String> = BTreeMap::new();
    for key in [
        "generator",
        "detector",
        "flavour",
        "energy_min_gev",
        "energy_max_gev",
        "spectral_index",
    ] {
        vars.insert(key, text(&parameters[key]));
    }
    vars.insert("job_units", "1".into());
    vars.insert("run_number", run.to_string());
    vars.insert("seed", (1000 + run).to_string());
    vars.insert("memory_mb", memory.to_string());
    vars.insert("output_dir", output.to_string_lossy().into_owned());
    let render = |word: &str| {
        let mut word = word.to_string();
        for (key, value) in &vars {
            word = word.replace(&format!("{{{key}}}"), value);
        }
        word
    };
    let words = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|w| w.as_str()).map(render).collect())
            .unwrap_or_default()
    };
    let mut command = words(&profile["containers"]["runtimes"]["podman"]);
    for (key, value) in template["parameters"].as_object().into_iter().flatten() {
        command.push("--env".into());
        command.push(format!(
            "PRODSYS_PARAM_{}={}",
            key.to_ascii_uppercase(),
            text(value)
        ));
    }
    command.push(image.to_string());
    command.extend(words(&template["entrypoint"]));
    command.extend(words(&profile["job"]["command"]));
    Ok(command)
}

/// `jobs` runs of the raw command, `concurrency` at once; seconds taken.
async fn raw_run(
    plan: ContainerPlan,
    image: &str,
    templates: &Path,
    parameters: &serde_json::Value,
    dir: &Path,
) -> anyhow::Result<f64> {
    let slots = Arc::new(Semaphore::new(plan.concurrency));
    let began = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for run in 1..=plan.jobs {
        let output = dir.join(format!("run{run}"));
        std::fs::create_dir_all(&output)?;
        let command = raw_command(image, templates, parameters, &output, run)?;
        let permit = slots.clone().acquire_owned().await?;
        runs.spawn(async move {
            let status = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .await;
            drop(permit);
            match status {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(anyhow::anyhow!(
                    "podman run exited {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(e) => Err(anyhow::Error::from(e).context("starting podman")),
            }
        });
    }
    while let Some(joined) = runs.join_next().await {
        joined??;
    }
    Ok(began.elapsed().as_secs_f64())
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// The production through prodsys: SubmitRequest → COMPLETED, seconds and
/// files catalogued.
async fn through_prodsys(
    services: &Services,
    parameters: &serde_json::Value,
    jobs: u64,
) -> anyhow::Result<(f64, u64)> {
    let mut intake = pb::request_service_client::RequestServiceClient::new(
        channel(services.addr(Service::Intake)?).await?,
    );
    let mut status = pb::status_service_client::StatusServiceClient::new(
        channel(services.addr(Service::Status)?).await?,
    );
    let mut catalog = pb::catalog_service_client::CatalogServiceClient::new(
        channel(services.addr(Service::Catalog)?).await?,
    );
    let began = Instant::now();
    let request_id = intake
        .submit_request(pb::SubmitRequestRequest {
            profile: "km3net-container-sim".into(),
            vo: "km3net.org".into(),
            parameters_json: parameters.to_string(),
            backend: "local".into(),
            submitter: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request_id;
    // A generous bound: a job a second at the least.
    let deadline = began + Duration::from_secs(120 + jobs);
    let production = loop {
        let request = intake
            .get_request(pb::GetRequestRequest {
                request_id: request_id.clone(),
            })
            .await?
            .into_inner();
        match request.state() {
            pb::RequestState::Accepted => break request.production_id,
            pb::RequestState::Rejected => {
                bail!("the request was rejected: {:?}", request.violations)
            }
            _ if Instant::now() > deadline => bail!("no verdict for the request"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // Followed as a client would: one WatchProduction stream, a snapshot
    // each time the production changes (polling GetProduction ten times a
    // second cost the status service and PostgreSQL CPU the run counted).
    let mut stream = status
        .watch_production(pb::GetProductionRequest {
            production_id: production.clone(),
        })
        .await
        .context("WatchProduction")?
        .into_inner();
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("the production did not complete in time"))?
            .context("reading WatchProduction")?;
        let Some(p) = next else {
            bail!("the WatchProduction stream ended before the production completed");
        };
        match p.state() {
            pb::ProductionState::Completed => break,
            pb::ProductionState::Failed
            | pb::ProductionState::PartiallyCompleted
            | pb::ProductionState::Cancelled => bail!("the production ended {:?}", p.state()),
            _ => {}
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    // The record is there once every output is catalogued.
    let record = loop {
        match catalog
            .get_production_record(pb::GetProductionRecordRequest {
                production_id: production.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(record) => break record.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => bail!("the production record: {s}"),
        }
    };
    Ok((seconds, record.file_count))
}

pub async fn run(plan: ContainerPlan) -> anyhow::Result<ContainerResult> {
    let mut env = TestEnv::new().await?;
    sys::own_database(&env.database);
    let result = measure(plan, &mut env).await;
    sys::cleanup(env).await;
    result
}

async fn measure(plan: ContainerPlan, env: &mut TestEnv) -> anyhow::Result<ContainerResult> {
    let templates = env.work_dir.join("templates");
    let image = build_image(&templates)?;
    let parameters = parameters(plan.jobs)?;
    // Raw first, so both find podman's storage equally warm after one run
    // of the image (below).
    let raw_dir: PathBuf = env.work_dir.join("raw");
    raw_run(
        ContainerPlan {
            jobs: 1,
            concurrency: 1,
            queued: 0,
            poll_interval_ms: None,
        },
        &image,
        &templates,
        &parameters,
        &raw_dir.join("warm"),
    )
    .await?;
    let meter = sys::CpuMeter::start();
    let raw_seconds = raw_run(plan, &image, &templates, &parameters, &raw_dir).await?;
    let raw_cpu = meter.stop();
    sys::set_aside(&raw_dir);

    env.settings.templates_dir = templates;
    env.settings.dispatcher.max_concurrent_jobs = plan.concurrency;
    env.settings.dispatcher.max_queued_jobs = plan.queued;
    if let Some(ms) = plan.poll_interval_ms {
        env.settings.dispatcher.poll_interval_ms = ms;
    }
    let services = Services::start(&env.settings, &env.work_dir.join("services")).await?;
    let meter = sys::CpuMeter::start_with(&services.pids());
    let measured = through_prodsys(&services, &parameters, plan.jobs).await;
    let prodsys_cpu = meter.stop();
    services.stop().await;
    let (prodsys_seconds, files) = measured?;
    if files != plan.jobs {
        bail!(
            "{} files catalogued for {} jobs of one file each",
            files,
            plan.jobs
        );
    }
    Ok(ContainerResult {
        jobs: plan.jobs,
        concurrency: plan.concurrency,
        queued: plan.queued,
        image,
        raw_seconds,
        prodsys_seconds,
        files,
        raw_cpu,
        prodsys_cpu,
    })
}
