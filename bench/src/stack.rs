//! prodsys measured whole: the five services, each in its own process, on a
//! fresh database and AMQP prefix, driven over gRPC and the broker as clients
//! and other services drive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use prodsys::Service;
use prodsys_core::events::{
    JOB_OUTPUT, JOB_STATUS, PRODUCTION_DISPATCHED, REQUEST_ACCEPTED, REQUEST_RECEIVED,
    REQUEST_REJECTED,
};
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::services::Services;
use crate::{amqp, percentile_ms, sys};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
const PUBLISH_WINDOW: usize = 64;
/// gRPC connections the clients share (HTTP/2 multiplexes the rest).
const GRPC_CONNECTIONS: usize = 4;

#[derive(Clone, Copy)]
struct Verdict {
    at: Instant,
    accepted: bool,
}

enum Slot {
    Waiting(oneshot::Sender<Verdict>),
    Arrived(Verdict),
}

/// Verdicts seen on the bench's own queue, matched to waiting submitters.
#[derive(Default)]
struct Verdicts {
    slots: Mutex<HashMap<String, Slot>>,
    /// When each request's request.received event reached the bench's queue.
    received: Mutex<HashMap<String, Instant>>,
}

impl Verdicts {
    fn received(&self, request_id: String, at: Instant) {
        self.received
            .lock()
            .expect("received lock")
            .insert(request_id, at);
    }

    fn take_received(&self, request_id: &str) -> Option<Instant> {
        self.received
            .lock()
            .expect("received lock")
            .remove(request_id)
    }

    fn arrived(&self, request_id: String, verdict: Verdict) {
        let mut slots = self.slots.lock().expect("verdicts lock");
        match slots.remove(&request_id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(verdict);
            }
            _ => {
                slots.insert(request_id, Slot::Arrived(verdict));
            }
        }
    }

    fn wait(&self, request_id: String) -> Result<Verdict, oneshot::Receiver<Verdict>> {
        let mut slots = self.slots.lock().expect("verdicts lock");
        match slots.remove(&request_id) {
            Some(Slot::Arrived(v)) => Ok(v),
            _ => {
                let (tx, rx) = oneshot::channel();
                slots.insert(request_id, Slot::Waiting(tx));
                Err(rx)
            }
        }
    }

    fn forget(&self, request_id: &str) {
        self.slots.lock().expect("verdicts lock").remove(request_id);
        self.take_received(request_id);
    }
}

/// Sizes of the prodsys measurements.
#[derive(Debug, Clone, Copy)]
pub struct StackPlan {
    pub submit_duration: Duration,
    pub submit_clients: usize,
    /// Requests in flight of each short closed-loop run before the sustained one.
    pub sweep_clients: [usize; 5],
    pub sweep_duration: Duration,
    pub latency_rate: f64,
    pub latency_duration: Duration,
    pub latency_warmup: Duration,
    pub status_jobs: u64,
    pub transitions_per_message: u64,
    pub catalog_files: u64,
    pub files_per_message: u64,
    pub plan_jobs: u64,
    /// WatchProduction streams and dashboard SSE clients of the watchers measurement.
    pub watchers: (usize, usize),
}

#[derive(Debug, Clone, Default)]
pub struct PhaseLoad {
    pub cpu: sys::CpuUse,
    /// Peak RSS of each service's process during the measurement, by
    /// service: its VmHWM, reset at the start (`/proc/PID/clear_refs`), or
    /// the largest 250 ms sample where the reset was refused (`hwm` false).
    pub max_rss: BTreeMap<String, u64>,
    /// Whether `max_rss` holds each process's VmHWM over the measurement.
    pub hwm: bool,
    /// Largest RSS seen of the bench's own process (its clients).
    pub bench_max_rss: u64,
    /// Most ready messages seen in each service's queue.
    pub max_depth: BTreeMap<String, u32>,
    /// CPU of the PostgreSQL backends serving each service (by application_name), in cores.
    pub pg_cpu: BTreeMap<String, f64>,
    /// Transactions committed in the run's database (pg_stat_database; a
    /// backend reports at least once a second while busy).
    pub commits: i64,
}

async fn xact_commits(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .map(|row| row.get(0))
    .unwrap_or(0)
}

type Backends = HashMap<i32, (String, u64)>;

/// The database's backends for this run, by pid: the service they serve and their CPU ticks.
async fn pg_backends(db: &tokio_postgres::Client) -> Backends {
    let rows = db
        .query(
            "SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .filter_map(|row| {
            let pid: i32 = row.get(0);
            let app: String = row.get(1);
            let name = match app.strip_prefix("prodsys-") {
                Some(service) => service.to_string(),
                None => "bench".to_string(),
            };
            sys::pid_ticks(pid).map(|t| (pid, (name, t)))
        })
        .collect()
}

fn pg_cpu(start: &Backends, end: &Backends, seconds: f64) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (name, ticks)) in end {
        let before = start.get(pid).map_or(0, |(_, t)| *t);
        *out.entry(name.clone()).or_default() +=
            ticks.saturating_sub(before) as f64 / 100.0 / seconds.max(1e-3);
    }
    out
}

/// Where the time of submit → ACCEPTED went: until request.received was
/// published (intake's commit and outbox relay), and from there to
/// request.accepted (the checker's consume, commit and relay).
#[derive(Debug, Clone, Default)]
pub struct Stages {
    pub intake_p50_ms: f64,
    pub intake_p99_ms: f64,
    pub checker_p50_ms: f64,
    pub checker_p99_ms: f64,
}

fn stages(done: &[&Done]) -> Stages {
    let mut intake: Vec<Duration> = Vec::new();
    let mut checker: Vec<Duration> = Vec::new();
    for d in done {
        if let Some(received) = d.received {
            intake.push(received.saturating_duration_since(d.scheduled));
            checker.push(d.at.saturating_duration_since(received));
        }
    }
    intake.sort_unstable();
    checker.sort_unstable();
    Stages {
        intake_p50_ms: percentile_ms(&intake, 0.5),
        intake_p99_ms: percentile_ms(&intake, 0.99),
        checker_p50_ms: percentile_ms(&checker, 0.5),
        checker_p99_ms: percentile_ms(&checker, 0.99),
    }
}

#[derive(Debug, Clone, Default)]
pub struct SubmitResult {
    pub stages: Stages,
    pub clients: usize,
    pub seconds: f64,
    pub submitted: u64,
    pub accepted_in_window: u64,
    pub accepted_per_s: f64,
    /// Verdicts (accepted or rejected) inside the run's seconds.
    pub decided_in_window: u64,
    pub rejected: u64,
    pub failed: u64,
    pub grpc_p50_ms: f64,
    pub grpc_p99_ms: f64,
    pub accept_p50_ms: f64,
    pub accept_p99_ms: f64,
    /// Accepted per second, in ten equal slices of the run.
    pub slices: Vec<f64>,
    pub load: PhaseLoad,
}

#[derive(Debug, Clone, Default)]
pub struct LatencyResult {
    pub stages: Stages,
    pub offered_per_s: f64,
    pub seconds: f64,
    pub samples: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub load: PhaseLoad,
}

#[derive(Debug, Clone, Default)]
pub struct StatusResult {
    pub jobs: u64,
    pub transitions: u64,
    pub messages: u64,
    pub per_message: u64,
    pub publish_seconds: f64,
    pub seconds: f64,
    pub transitions_per_s: f64,
    /// Transitions/s offered when the messages were paced (else as fast as
    /// the broker confirms them).
    pub offered_per_s: Option<f64>,
    /// Watchers of the production during the measurement, if any.
    pub watchers: Option<crate::watchers::WatcherStats>,
    pub load: PhaseLoad,
}

#[derive(Debug, Clone, Default)]
pub struct CatalogResult {
    pub files: u64,
    pub messages: u64,
    pub per_message: u64,
    pub publish_seconds: f64,
    pub seconds: f64,
    pub files_per_s: f64,
    pub load: PhaseLoad,
}

impl SubmitResult {
    /// Requests decided (accepted or rejected) per second of the run.
    pub fn decided_per_s(&self) -> f64 {
        self.decided_in_window as f64 / self.seconds
    }
}

/// One production of many jobs planned and persisted by the dispatcher.
#[derive(Debug, Clone)]
pub struct PlanResult {
    pub production_id: String,
    pub jobs: u64,
    /// From request.accepted (the dispatcher's input) until the status
    /// service counts the production's jobs (after production.dispatched,
    /// which the dispatcher publishes once the whole plan is committed).
    pub seconds: f64,
    pub jobs_per_s: f64,
    /// Rows in dispatcher.jobs afterwards (must equal `jobs`).
    pub rows: i64,
    pub load: PhaseLoad,
}

/// The planned production cancelled: every job, set-based.
#[derive(Debug, Clone)]
pub struct CancelResult {
    pub jobs: u64,
    /// From CancelProduction sent until the status service counts the
    /// production CANCELLED with every job cancelled.
    pub seconds: f64,
    /// Jobs of the production in the dispatcher not CANCELLED afterwards (must be 0).
    pub unfinished: i64,
    /// How long the same run took to plan the production.
    pub plan_seconds: f64,
    /// Every message published to the topic exchanges while the production
    /// was planned and cancelled (a copy on a queue of the bench's own).
    pub messages: Option<amqp::TapResult>,
    pub load: PhaseLoad,
}

pub struct Bench {
    pub env: TestEnv,
    /// The service processes (a lock only to look whether one has exited).
    services: Mutex<Services>,
    /// Name and pid of each service's process, in pipeline order.
    pids: Vec<(&'static str, u32)>,
    intake: Vec<pb::request_service_client::RequestServiceClient<Channel>>,
    status: pb::status_service_client::StatusServiceClient<Channel>,
    pub(crate) catalog: pb::catalog_service_client::CatalogServiceClient<Channel>,
    /// Where the status service answers gRPC and HTTP (the dashboard).
    status_addr: std::net::SocketAddr,
    amqp: lapin::Connection,
    publish: lapin::Channel,
    /// The bench's own connection to the run's database.
    pub(crate) db: tokio_postgres::Client,
    verdicts: Arc<Verdicts>,
    listener_stop: CancellationToken,
    base_parameters: serde_json::Value,
    tag: String,
    seq: Arc<AtomicU64>,
    /// The bench's own RSS before the services started, and when all were idle.
    pub rss_before_start: u64,
    pub rss_idle: u64,
    /// Each service process's RSS when all were idle, by service.
    pub service_rss_idle: BTreeMap<String, u64>,
}

async fn grpc_channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connecting to a service")
}

impl Bench {
    /// Starts the five services, each in its own process, on a fresh database
    /// and prefix, with a queue of the bench's own bound to request.accepted
    /// and request.rejected.
    pub async fn start() -> anyhow::Result<Self> {
        let rss_before_start = sys::rss_bytes();
        let mut env = TestEnv::new().await?;
        sys::own_database(&env.database);
        let services = match Self::launch(&mut env).await {
            Ok(services) => services,
            Err(error) => {
                sys::cleanup(env).await;
                return Err(error.context("starting the prodsys services"));
            }
        };
        let parts = Self::connect(&env, &services).await;
        let (
            intake,
            status,
            catalog,
            connection,
            publish,
            verdicts,
            listener_stop,
            base_parameters,
            db,
        ) = match parts {
            Ok(parts) => parts,
            Err(error) => {
                services.stop().await;
                sys::cleanup(env).await;
                return Err(error);
            }
        };
        let tag: String = env
            .prefix
            .split('.')
            .nth(1)
            .unwrap_or("bench")
            .chars()
            .take(8)
            .collect();
        let pids = services.pids();
        let status_addr = match services.addr(Service::Status) {
            Ok(addr) => addr,
            Err(error) => {
                services.stop().await;
                sys::cleanup(env).await;
                return Err(error);
            }
        };
        let mut bench = Self {
            status_addr,
            env,
            services: Mutex::new(services),
            pids,
            intake,
            status,
            catalog,
            amqp: connection,
            publish,
            db,
            verdicts,
            listener_stop,
            base_parameters,
            tag,
            seq: Arc::new(AtomicU64::new(0)),
            rss_before_start,
            rss_idle: 0,
            service_rss_idle: BTreeMap::new(),
        };
        // Idle: started, migrated, consumers and relays waiting.
        tokio::time::sleep(Duration::from_secs(3)).await;
        bench.rss_idle = sys::rss_bytes();
        bench.service_rss_idle = bench
            .pids
            .iter()
            .map(|(name, pid)| (name.to_string(), sys::pid_rss_bytes(*pid)))
            .collect();
        Ok(bench)
    }

    /// The bench's settings for the services, then the five processes.
    async fn launch(env: &mut TestEnv) -> anyhow::Result<Services> {
        // Requests here plan one job each; those jobs must not compete with
        // the services for the two cores, so the one local slot holds a job
        // that only sleeps (bounded) and every other job waits as CREATED.
        let tools = env.work_dir.join("tools");
        std::fs::create_dir_all(&tools)?;
        let sleeper = tools.join("prodsys-toysim");
        std::fs::write(&sleeper, "#!/bin/sh\nexec sleep 600\n")?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sleeper, std::fs::Permissions::from_mode(0o755))?;
        }
        env.settings.dispatcher.tools_dir = tools;
        env.settings.dispatcher.max_concurrent_jobs = 1;
        Services::start(&env.settings, &env.work_dir.join("services")).await
    }

    #[allow(clippy::type_complexity)]
    async fn connect(
        env: &TestEnv,
        services: &Services,
    ) -> anyhow::Result<(
        Vec<pb::request_service_client::RequestServiceClient<Channel>>,
        pb::status_service_client::StatusServiceClient<Channel>,
        pb::catalog_service_client::CatalogServiceClient<Channel>,
        lapin::Connection,
        lapin::Channel,
        Arc<Verdicts>,
        CancellationToken,
        serde_json::Value,
        tokio_postgres::Client,
    )> {
        let mut intake = Vec::new();
        for _ in 0..GRPC_CONNECTIONS {
            intake.push(pb::request_service_client::RequestServiceClient::new(
                grpc_channel(services.addr(Service::Intake)?).await?,
            ));
        }
        let status = pb::status_service_client::StatusServiceClient::new(
            grpc_channel(services.addr(Service::Status)?).await?,
        )
        .max_decoding_message_size(64 * 1024 * 1024);
        let catalog = pb::catalog_service_client::CatalogServiceClient::new(
            grpc_channel(services.addr(Service::Catalog)?).await?,
        )
        .max_decoding_message_size(64 * 1024 * 1024);
        let url = prodsys_testkit::amqp_url();
        let connection = amqp::connect(&url, "prodsys-bench").await?;
        let publish = amqp::confirm_channel(&connection).await?;
        let verdicts = Arc::new(Verdicts::default());
        let listener_stop = CancellationToken::new();
        start_listener(
            &connection,
            &env.prefix,
            verdicts.clone(),
            listener_stop.clone(),
        )
        .await?;
        let example = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(example)?)?;
        let mut base_parameters = file["parameters"].clone();
        base_parameters["n_showers"] = 1.into();
        base_parameters["showers_per_job"] = 1.into();
        base_parameters["nsb_levels"] = serde_json::json!([1]);
        let db = env.db().await?;
        Ok((
            intake,
            status,
            catalog,
            connection,
            publish,
            verdicts,
            listener_stop,
            base_parameters,
            db,
        ))
    }

    /// Whether the bench's queue also takes `request.received` (to split the
    /// time to ACCEPTED into stages). A client waiting for its verdict takes
    /// only the verdicts; the sustained run does the same, so the broker
    /// carries no delivery for the bench's own instruments.
    pub async fn follow_received(&self, on: bool) -> anyhow::Result<()> {
        let queue = format!("{}bench.verdicts", self.env.prefix);
        let exchange = format!("{}prodsys.events", self.env.prefix);
        if on {
            self.publish
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    REQUEST_RECEIVED.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        } else {
            self.publish
                .queue_unbind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    REQUEST_RECEIVED.into(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Service processes that have exited since the last look, each with
    /// how it ended and the end of its log.
    pub fn exited_services(&self) -> Vec<String> {
        self.services
            .lock()
            .map(|mut s| s.newly_exited())
            .unwrap_or_default()
    }

    /// An error if a service process has exited (every later wait would only time out).
    /// The bench's own connection to the broker.
    pub(crate) fn amqp_connection(&self) -> &lapin::Connection {
        &self.amqp
    }

    pub(crate) fn ensure_services_run(&self) -> anyhow::Result<()> {
        let exited = self.services.lock().ok().and_then(|mut s| s.first_exited());
        match exited {
            Some(service) => anyhow::bail!("the {service} process has exited"),
            None => Ok(()),
        }
    }

    /// Stops the services and cleans up; returns the peak RSS (VmHWM) of
    /// each service's process over the run, read just before it stopped.
    pub async fn stop(self) -> BTreeMap<String, u64> {
        self.listener_stop.cancel();
        let services = self
            .services
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let peaks = services.stop().await;
        let _ = self.amqp.close(200, "bench done".into()).await;
        // PRODSYS_BENCH_KEEP_DATABASE=1 leaves the database for inspection
        // (query plans against what the run filled), and its queues.
        if std::env::var_os("PRODSYS_BENCH_KEEP_DATABASE").is_some_and(|v| v == "1") {
            eprintln!("kept database {}", self.env.database);
            prodsys_testkit::end_jobs(&self.env.work_dir);
            sys::set_aside(&self.env.work_dir);
        } else {
            sys::cleanup(self.env).await;
        }
        peaks
    }

    /// A copy of every event from now on, for the sizes of their bodies.
    pub async fn tap(&self) -> anyhow::Result<amqp::Tap> {
        amqp::Tap::start(&self.amqp, &self.env.prefix).await
    }

    fn service_queues(&self) -> Vec<(String, String)> {
        prodsys_testkit::SERVICES
            .iter()
            .map(|s| (s.to_string(), format!("{}prodsys.{s}", self.env.prefix)))
            .collect()
    }

    /// Samples the RSS of each service process and of the bench, and queue
    /// depths, every 250 ms until the returned sampler finishes.
    pub(crate) async fn sample(&self) -> anyhow::Result<Sampler> {
        let channel = self.amqp.create_channel().await?;
        let queues = self.service_queues();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let pg_start = pg_backends(&self.db).await;
        let commits_start = xact_commits(&self.db).await;
        let pids = self.pids.clone();
        // Each process's high-water mark starts again with the measurement.
        let hwm = pids.iter().all(|(_, pid)| sys::reset_peak_rss(*pid));
        let meter = sys::CpuMeter::start_with(&pids);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut load = PhaseLoad::default();
            let rss = |load: &mut PhaseLoad| {
                for (service, pid) in &pids {
                    let max = load.max_rss.entry(service.to_string()).or_default();
                    *max = (*max).max(sys::pid_rss_bytes(*pid));
                }
                load.bench_max_rss = load.bench_max_rss.max(sys::rss_bytes());
            };
            loop {
                rss(&mut load);
                for (service, queue) in &queues {
                    if let Ok(n) = amqp::depth(&channel, queue).await {
                        let max = load.max_depth.entry(service.clone()).or_default();
                        *max = (*max).max(n);
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            rss(&mut load);
            if hwm {
                for (service, pid) in &pids {
                    let peak = sys::pid_peak_rss_bytes(*pid);
                    if peak > 0 {
                        load.max_rss.insert(service.to_string(), peak);
                    }
                }
                load.hwm = true;
            }
            let _ = channel.close(200, "done".into()).await;
            load
        });
        Ok(Sampler {
            stop,
            task,
            meter,
            pg_start,
            commits_start,
            started,
        })
    }

    /// Waits until no service queue holds ready messages (three looks in a row).
    pub async fn quiesce(&self, limit: Duration) -> anyhow::Result<()> {
        let channel = self.amqp.create_channel().await?;
        let deadline = Instant::now() + limit;
        let mut calm = 0;
        while calm < 3 {
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the services did not drain their queues within {limit:?}"
            );
            let mut total = 0;
            for (_, queue) in self.service_queues() {
                total += amqp::depth(&channel, &queue).await?;
            }
            calm = if total == 0 { calm + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    pub(crate) fn client(&self) -> Submitter {
        Submitter {
            intake: self.intake.clone(),
            verdicts: self.verdicts.clone(),
            base: self.base_parameters.clone(),
            tag: self.tag.clone(),
            seq: self.seq.clone(),
            history: None,
        }
    }

    /// Open loop: `rate` submissions a second for `duration` (after a
    /// discarded warm-up), each timed from its scheduled start to ACCEPTED.
    pub async fn latency(&self, plan: &StackPlan) -> anyhow::Result<LatencyResult> {
        let interval = Duration::from_secs_f64(1.0 / plan.latency_rate);
        let warmup = (plan.latency_warmup.as_secs_f64() * plan.latency_rate) as u64;
        let measured = (plan.latency_duration.as_secs_f64() * plan.latency_rate) as u64;
        let mut sampler = None;
        let mut handles = Vec::with_capacity(measured as usize);
        let start = Instant::now() + Duration::from_millis(50);
        let mut measure_start = start;
        for i in 0..warmup + measured {
            let at = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(at.into()).await;
            if i == warmup {
                sampler = Some(self.sample().await?);
                measure_start = at;
            }
            let client = self.client();
            let handle = tokio::spawn(async move { client.submit_and_wait(at).await });
            if i >= warmup {
                handles.push(handle);
            }
        }
        let issued_seconds = measure_start.elapsed().as_secs_f64();
        let mut latencies = Vec::with_capacity(handles.len());
        let mut accepted = Vec::with_capacity(handles.len());
        let mut failed = 0;
        for handle in handles {
            match handle.await {
                Ok(Ok(done)) if done.accepted => {
                    latencies.push(done.at - done.scheduled);
                    accepted.push(done);
                }
                _ => failed += 1,
            }
        }
        let load = match sampler {
            Some(s) => s.finish(&self.db).await,
            None => PhaseLoad::default(),
        };
        latencies.sort_unstable();
        Ok(LatencyResult {
            stages: stages(&accepted.iter().collect::<Vec<_>>()),
            offered_per_s: plan.latency_rate,
            seconds: issued_seconds,
            samples: latencies.len() as u64,
            failed,
            p50_ms: percentile_ms(&latencies, 0.50),
            p90_ms: percentile_ms(&latencies, 0.90),
            p99_ms: percentile_ms(&latencies, 0.99),
            max_ms: percentile_ms(&latencies, 1.0),
            load,
        })
    }

    /// Closed loop: `clients` tasks each submit, wait for ACCEPTED, and submit
    /// again, for `duration`; the rate is the ACCEPTED events inside it.
    pub async fn submit(&self, clients: usize, duration: Duration) -> anyhow::Result<SubmitResult> {
        self.submit_with(clients, duration, None).await
    }

    /// [`Bench::submit`] of requests against a history of `history`
    /// productions ([`crate::history::history_request`]), or of new requests.
    pub async fn submit_with(
        &self,
        clients: usize,
        duration: Duration,
        history: Option<u64>,
    ) -> anyhow::Result<SubmitResult> {
        let sampler = self.sample().await?;
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let mut client = self.client();
            client.history = history;
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                let mut failures = 0u64;
                while Instant::now() < end {
                    match client.submit_and_wait(Instant::now()).await {
                        Ok(d) => done.push(d),
                        Err(error) => {
                            failures += 1;
                            if failures <= 3 {
                                eprintln!("submit failed: {error:#}");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                (done, failures)
            }));
        }
        let mut all = Vec::new();
        let mut failed = 0;
        for task in tasks {
            let (done, failures) = task.await.context("submit client")?;
            all.extend(done);
            failed += failures;
        }
        let load = sampler.finish(&self.db).await;
        let seconds = duration.as_secs_f64();
        let accepted: Vec<&Done> = all.iter().filter(|d| d.accepted).collect();
        let in_window: Vec<Instant> = accepted
            .iter()
            .map(|d| d.at)
            .filter(|at| *at <= end)
            .collect();
        let decided_in_window = all.iter().filter(|d| d.at <= end).count() as u64;
        let mut slices = [0u64; 10];
        for at in &in_window {
            let f = at.duration_since(start).as_secs_f64() / seconds;
            slices[((f * 10.0) as usize).min(9)] += 1;
        }
        let mut grpc: Vec<Duration> = all.iter().map(|d| d.grpc).collect();
        grpc.sort_unstable();
        let mut accept: Vec<Duration> = accepted.iter().map(|d| d.at - d.scheduled).collect();
        accept.sort_unstable();
        Ok(SubmitResult {
            stages: stages(&accepted),
            clients,
            seconds,
            submitted: all.len() as u64,
            accepted_in_window: in_window.len() as u64,
            accepted_per_s: in_window.len() as f64 / seconds,
            decided_in_window,
            rejected: all.iter().filter(|d| !d.accepted).count() as u64,
            failed,
            grpc_p50_ms: percentile_ms(&grpc, 0.5),
            grpc_p99_ms: percentile_ms(&grpc, 0.99),
            accept_p50_ms: percentile_ms(&accept, 0.5),
            accept_p99_ms: percentile_ms(&accept, 0.99),
            slices: slices
                .iter()
                .map(|n| *n as f64 / (seconds / 10.0))
                .collect(),
            load,
        })
    }

    /// Job transitions into the status service: a production it knows (from a
    /// production.dispatched), then job.status batches moving every job
    /// SUBMITTED → RUNNING → DONE; timed until GetProduction counts all DONE.
    pub async fn status(
        &self,
        plan: &StackPlan,
        watchers: Option<(usize, usize)>,
        pace: Option<f64>,
    ) -> anyhow::Result<StatusResult> {
        let exchange = format!("{}prodsys.events", self.env.prefix);
        let production = format!(
            "BENCH-S{}-{}",
            self.tag,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let dispatched = pb::ProductionDispatched {
            production_id: production.clone(),
            job_total: plan.status_jobs,
            backend: "local".into(),
            ..Default::default()
        };
        amqp::publish_all(
            &self.publish,
            [amqp::event(
                &exchange,
                PRODUCTION_DISPATCHED,
                &production,
                prost::Message::encode_to_vec(&dispatched),
            )],
            1,
        )
        .await?;
        let mut status = self.status.clone();
        let request = pb::GetProductionRequest {
            production_id: production.clone(),
            ..Default::default()
        };
        prodsys_testkit::wait_for(
            "the bench production in the status service",
            Duration::from_secs(30),
            || {
                let mut status = status.clone();
                let request = request.clone();
                async move {
                    let p = status.get_production(request).await.ok()?.into_inner();
                    (p.job_total == plan.status_jobs).then_some(())
                }
            },
        )
        .await?;
        // Built as they are published, so the bench holds no pile of them.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (jobs, per) = (plan.status_jobs, plan.transitions_per_message);
        let chunks = jobs.div_ceil(per);
        let messages = {
            let production = production.clone();
            [
                (pb::JobState::Submitted, "Submitted"),
                (pb::JobState::Running, "Running"),
                (pb::JobState::Done, "Done"),
            ]
            .into_iter()
            .flat_map(move |phase| (0..chunks).map(move |chunk| (phase, chunk)))
            .map(move |((state, raw), chunk)| {
                let first = chunk * per;
                let batch = pb::JobStatusBatch {
                    transitions: (first..(first + per).min(jobs))
                        .map(|job_index| pb::JobTransition {
                            production_id: production.clone(),
                            job_index,
                            attempt: 1,
                            state: state as i32,
                            raw_status: raw.into(),
                            at_unix_ms: now_ms,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                };
                amqp::event(
                    &exchange,
                    JOB_STATUS,
                    &production,
                    prost::Message::encode_to_vec(&batch),
                )
            })
        };
        let count = chunks * 3;
        let feed = crate::watchers::Feed::new(jobs, per);
        let messages = {
            let feed = feed.clone();
            messages.inspect(move |_| feed.publishing())
        };
        let watching = match watchers {
            Some((grpc, sse)) => Some(
                crate::watchers::Watchers::start(
                    self.status_addr,
                    &production,
                    feed.clone(),
                    grpc,
                    sse,
                )
                .await?,
            ),
            None => None,
        };
        let reads_before = match watchers {
            Some(_) => crate::watchers::snapshot_reads(self.status_addr).await,
            None => 0.0,
        };
        let sampler = self.sample().await?;
        let start = Instant::now();
        let published = match pace {
            Some(transitions_per_s) => self.publish_paced(messages, transitions_per_s / per as f64),
            None => self.publish_in_background(messages),
        };
        let deadline = start + Duration::from_secs(600);
        loop {
            let p = tokio::time::timeout(CALL_TIMEOUT, status.get_production(request.clone()))
                .await
                .context("GetProduction timed out")??
                .into_inner();
            if p.counts.unwrap_or_default().done >= plan.status_jobs {
                break;
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "status did not absorb the transitions in time: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = start.elapsed().as_secs_f64();
        let publish_seconds = published.await.context("publisher task")??;
        let load = sampler.finish(&self.db).await;
        let reads = crate::watchers::snapshot_reads(self.status_addr).await - reads_before;
        let watchers = match watching {
            Some(w) => {
                let mut stats = w.finish(Duration::from_secs(10)).await;
                stats.snapshot_reads = reads;
                Some(stats)
            }
            None => None,
        };
        let transitions = plan.status_jobs * 3;
        Ok(StatusResult {
            jobs: plan.status_jobs,
            transitions,
            messages: count,
            per_message: plan.transitions_per_message,
            publish_seconds,
            seconds,
            transitions_per_s: transitions as f64 / seconds,
            offered_per_s: pace,
            watchers,
            load,
        })
    }

    /// One production of `plan.plan_jobs` jobs: timed from its request.accepted
    /// until GetProduction shows its total and the dispatcher created every
    /// job (planning runs in chunks); RSS sampled throughout.
    /// Submits `request` (the `n`th of this run) and waits for its ACCEPTED:
    /// its production ID (once intake recorded it) and when it was accepted.
    pub(crate) async fn accepted_production(
        &self,
        n: u64,
        request: pb::SubmitRequestRequest,
    ) -> anyhow::Result<(String, Instant)> {
        let mut intake = self.intake[n as usize % self.intake.len()].clone();
        let request_id = tokio::time::timeout(CALL_TIMEOUT, intake.submit_request(request))
            .await
            .context("SubmitRequest timed out")??
            .into_inner()
            .request_id;
        let accepted = match self.verdicts.wait(request_id.clone()) {
            Ok(v) => v,
            Err(rx) => tokio::time::timeout(VERDICT_TIMEOUT, rx)
                .await
                .with_context(|| format!("no verdict for {request_id}"))?
                .context("verdict channel")?,
        };
        anyhow::ensure!(accepted.accepted, "request {request_id} was rejected");
        // The bench's queue may see request.accepted before intake records
        // the production ID from the same event.
        let deadline = Instant::now() + VERDICT_TIMEOUT;
        loop {
            let id = intake
                .get_request(pb::GetRequestRequest {
                    request_id: request_id.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .production_id;
            if !id.is_empty() {
                return Ok((id, accepted.at));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "intake never recorded the production ID of {request_id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn plan(&self, plan: &StackPlan) -> anyhow::Result<PlanResult> {
        let client = self.client();
        let (n, mut request) = client.request();
        let mut parameters: serde_json::Value = serde_json::from_str(&request.parameters_json)?;
        parameters["n_showers"] = plan.plan_jobs.into();
        parameters["showers_per_job"] = 1.into();
        request.parameters_json = parameters.to_string();
        let sampler = self.sample().await?;
        let (production_id, accepted_at) = self.accepted_production(n, request).await?;
        let mut status = self.status.clone();
        let deadline = Instant::now() + Duration::from_secs(600);
        let planned_at = loop {
            let p = tokio::time::timeout(
                CALL_TIMEOUT,
                status.get_production(pb::GetProductionRequest {
                    production_id: production_id.clone(),
                    ..Default::default()
                }),
            )
            .await
            .context("GetProduction timed out")?;
            // Planned: status knows the total and the dispatcher created every job.
            if let Ok(p) = p
                && p.into_inner().job_total == plan.plan_jobs
                && self
                    .db
                    .query_opt(
                        "SELECT 1 FROM dispatcher.productions
                         WHERE production_id = $1 AND planned_jobs >= job_total",
                        &[&production_id],
                    )
                    .await?
                    .is_some()
            {
                break Instant::now();
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{production_id} was not planned within 600 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let load = sampler.finish(&self.db).await;
        let rows: i64 = self
            .db
            .query_one(
                "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1",
                &[&production_id],
            )
            .await?
            .get(0);
        let seconds = planned_at.duration_since(accepted_at).as_secs_f64();
        Ok(PlanResult {
            production_id,
            jobs: plan.plan_jobs,
            seconds,
            jobs_per_s: plan.plan_jobs as f64 / seconds,
            rows,
            load,
        })
    }

    /// Cancels the production `plan` planned (its jobs waiting behind the one
    /// local slot): timed from CancelProduction sent until the status service
    /// counts it CANCELLED with every job cancelled.
    pub async fn cancel(&self, plan: &PlanResult) -> anyhow::Result<CancelResult> {
        let mut intake = self.intake[0].clone();
        let mut status = self.status.clone();
        let sampler = self.sample().await?;
        let start = Instant::now();
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            intake.cancel_production(pb::CancelProductionRequest {
                production_id: plan.production_id.clone(),
                reason: "bench: cancel at scale".into(),
                ..Default::default()
            }),
        )
        .await
        .context("CancelProduction timed out")??
        .into_inner();
        anyhow::ensure!(
            answer.accepted,
            "the cancel of {} was refused",
            plan.production_id
        );
        let deadline = start + Duration::from_secs(600);
        loop {
            let p = tokio::time::timeout(
                CALL_TIMEOUT,
                status.get_production(pb::GetProductionRequest {
                    production_id: plan.production_id.clone(),
                    ..Default::default()
                }),
            )
            .await
            .context("GetProduction timed out")??
            .into_inner();
            if p.state() == pb::ProductionState::Cancelled
                && p.counts.unwrap_or_default().cancelled >= plan.jobs
            {
                break;
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} was not cancelled within 600 s: {p:?}",
                plan.production_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = start.elapsed().as_secs_f64();
        let load = sampler.finish(&self.db).await;
        let unfinished: i64 = self
            .db
            .query_one(
                "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1 AND state <> 'CANCELLED'",
                &[&plan.production_id],
            )
            .await?
            .get(0);
        Ok(CancelResult {
            jobs: plan.jobs,
            seconds,
            unfinished,
            plan_seconds: plan.seconds,
            messages: None,
            load,
        })
    }

    /// Files into the catalog: job.output events of many files each, timed
    /// until `catalog.files` holds every one.
    pub async fn catalog(&self, plan: &StackPlan) -> anyhow::Result<CatalogResult> {
        let exchange = format!("{}prodsys.events", self.env.prefix);
        let production = format!("BENCH-C{}", self.tag);
        let jobs = plan.catalog_files.div_ceil(plan.files_per_message);
        // Built as they are published, so the bench holds no pile of them.
        let (total, per) = (plan.catalog_files, plan.files_per_message);
        let messages = {
            let production = production.clone();
            (0..jobs).map(move |job_index| {
                let first = job_index * per;
                let files = (first..(first + per).min(total))
                    .map(|n| catalog_file(&production, job_index, n))
                    .collect();
                let output = pb::JobOutput {
                    production_id: production.clone(),
                    job_index,
                    attempt: 1,
                    files,
                    ..Default::default()
                };
                amqp::event(
                    &exchange,
                    JOB_OUTPUT,
                    &production,
                    prost::Message::encode_to_vec(&output),
                )
            })
        };
        let last = catalog_lfn(&production, plan.catalog_files - 1);
        let db = &self.db;
        let exists = db
            .prepare("SELECT EXISTS (SELECT 1 FROM catalog.files WHERE lfn = $1)")
            .await?;
        let count = db
            .prepare("SELECT count(*) FROM catalog.files WHERE production_id = $1")
            .await?;
        let sampler = self.sample().await?;
        let start = Instant::now();
        let published = self.publish_in_background(messages);
        let deadline = start + Duration::from_secs(600);
        loop {
            let seen: bool = db.query_one(&exists, &[&last]).await?.get(0);
            if seen {
                let n: i64 = db.query_one(&count, &[&production]).await?.get(0);
                if n as u64 >= plan.catalog_files {
                    break;
                }
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the catalog did not register the files in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = start.elapsed().as_secs_f64();
        let publish_seconds = published.await.context("publisher task")??;
        let load = sampler.finish(&self.db).await;
        Ok(CatalogResult {
            files: plan.catalog_files,
            messages: jobs,
            per_message: plan.files_per_message,
            publish_seconds,
            seconds,
            files_per_s: plan.catalog_files as f64 / seconds,
            load,
        })
    }

    /// Publishes `messages` evenly at `per_second`, each confirmed before
    /// the next is taken (the iterator is advanced only when one is due, so
    /// it sees when each was published).
    pub(crate) fn publish_paced(
        &self,
        mut messages: impl Iterator<Item = amqp::Message> + Send + 'static,
        per_second: f64,
    ) -> tokio::task::JoinHandle<anyhow::Result<f64>> {
        let channel = self.publish.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0u64;
            loop {
                let due = start + Duration::from_secs_f64(sent as f64 / per_second);
                tokio::time::sleep_until(due.into()).await;
                let Some(message) = messages.next() else {
                    break;
                };
                amqp::publish_all(&channel, [message], 1).await?;
                sent += 1;
            }
            Ok(start.elapsed().as_secs_f64())
        })
    }

    pub(crate) fn publish_in_background(
        &self,
        messages: impl Iterator<Item = amqp::Message> + Send + 'static,
    ) -> tokio::task::JoinHandle<anyhow::Result<f64>> {
        let channel = self.publish.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            amqp::publish_all(&channel, messages, PUBLISH_WINDOW).await?;
            Ok(start.elapsed().as_secs_f64())
        })
    }
}

pub(crate) fn catalog_lfn(production: &str, n: u64) -> String {
    format!(
        "/vo.cta.in2p3.fr/MC/BENCH/LaPalma/gamma/sim_telarray/{production}/Data/{:03}xxx/run{:06}___cta-prod6-lapalma_nsb{}.simtel.zst",
        n / 1000,
        n,
        n % 3
    )
}

/// File `n` of the catalog measurement, as a job of the CTA profile describes its outputs.
pub(crate) fn catalog_file(production: &str, job_index: u64, n: u64) -> pb::OutputFile {
    let metadata: HashMap<String, String> = [
        ("array_layout", "Prod6-Hyperarray".to_string()),
        ("site", "LaPalma".into()),
        ("particle", "gamma".into()),
        ("phiP", "180".into()),
        ("thetaP", "20".into()),
        ("tel_sim_prog", "sim_telarray".into()),
        ("tel_sim_prog_version", "2024-02-05".into()),
        ("data_level", "DL0".into()),
        ("MCCampaign", "BENCH".into()),
        ("run_number", n.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    pb::OutputFile {
        lfn: catalog_lfn(production, n),
        size: 1_000_000 + n,
        adler32: format!("{:08x}", (n as u32).wrapping_mul(2_654_435_761)),
        url: format!("file:///var/bench/{production}/{n}.simtel.zst"),
        metadata,
        production_id: production.to_string(),
        job_index,
        ..Default::default()
    }
}

pub(crate) struct Sampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<PhaseLoad>,
    meter: sys::CpuMeter,
    pg_start: Backends,
    commits_start: i64,
    started: Instant,
}

impl Sampler {
    pub(crate) async fn finish(self, db: &tokio_postgres::Client) -> PhaseLoad {
        let cpu = self.meter.stop();
        let seconds = self.started.elapsed().as_secs_f64();
        let pg_end = pg_backends(db).await;
        self.stop.cancel();
        let mut load = self.task.await.unwrap_or_default();
        load.cpu = cpu;
        load.pg_cpu = pg_cpu(&self.pg_start, &pg_end, seconds);
        load.commits = xact_commits(db).await - self.commits_start;
        load
    }
}

/// One submission's journey.
#[derive(Debug, Clone, Copy)]
struct Done {
    scheduled: Instant,
    grpc: Duration,
    /// When its request.received event was seen.
    received: Option<Instant>,
    at: Instant,
    accepted: bool,
}

#[derive(Clone)]
pub(crate) struct Submitter {
    intake: Vec<pb::request_service_client::RequestServiceClient<Channel>>,
    verdicts: Arc<Verdicts>,
    base: serde_json::Value,
    tag: String,
    seq: Arc<AtomicU64>,
    /// Requests against a history of this many productions instead.
    history: Option<u64>,
}

impl Submitter {
    /// A request no earlier one duplicates or overlaps: its own array layout
    /// (free text in the profile) and a fractional zenith angle in 0..70.
    pub(crate) fn request(&self) -> (u64, pb::SubmitRequestRequest) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let parameters = match self.history {
            Some(productions) => crate::history::history_request(n, productions, &self.tag),
            None => {
                let mut parameters = self.base.clone();
                parameters["array_layout"] = format!("bench-{}-{n}", self.tag).into();
                let zenith = ((n as f64) * 0.0137).rem_euclid(70.0);
                parameters["zenith_deg"] = ((zenith * 10_000.0).round() / 10_000.0).into();
                parameters
            }
        };
        (
            n,
            pb::SubmitRequestRequest {
                profile: "cta-irf-mc".into(),
                vo: "vo.cta.in2p3.fr".into(),
                parameters_json: parameters.to_string(),
                backend: String::new(),
                submitter: "bench".into(),
                // No idempotency key, no extension: the defaults.
                ..Default::default()
            },
        )
    }

    async fn submit_and_wait(&self, scheduled: Instant) -> anyhow::Result<Done> {
        let (n, request) = self.request();
        let mut intake = self.intake[n as usize % self.intake.len()].clone();
        let answer = tokio::time::timeout(CALL_TIMEOUT, intake.submit_request(request))
            .await
            .context("SubmitRequest timed out")?
            .context("SubmitRequest")?
            .into_inner();
        let grpc = scheduled.elapsed();
        let verdict = match self.verdicts.wait(answer.request_id.clone()) {
            Ok(v) => v,
            Err(rx) => match tokio::time::timeout(VERDICT_TIMEOUT, rx).await {
                Ok(Ok(v)) => v,
                _ => {
                    self.verdicts.forget(&answer.request_id);
                    anyhow::bail!(
                        "no verdict for {} within {VERDICT_TIMEOUT:?}",
                        answer.request_id
                    )
                }
            },
        };
        Ok(Done {
            scheduled,
            grpc,
            received: self.verdicts.take_received(&answer.request_id),
            at: verdict.at,
            accepted: verdict.accepted,
        })
    }
}

/// The bench's own queue on `prodsys.events`: exclusive (gone with the
/// connection), bound to request.accepted and request.rejected.
async fn start_listener(
    connection: &lapin::Connection,
    prefix: &str,
    verdicts: Arc<Verdicts>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let queue = format!("{prefix}bench.verdicts");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let exchange = format!("{prefix}prodsys.events");
    for key in [REQUEST_RECEIVED, REQUEST_ACCEPTED, REQUEST_REJECTED] {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench-verdicts".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => break,
                next = consumer.next() => next,
            };
            let Some(Ok(delivery)) = delivery else {
                eprintln!("the bench's verdict consumer stopped");
                break;
            };
            let at = Instant::now();
            let body = delivery.data.as_slice();
            let parsed = match delivery.routing_key.as_str() {
                REQUEST_ACCEPTED => <pb::RequestAccepted as prost::Message>::decode(body)
                    .map(|m| (m.request_id, true)),
                REQUEST_REJECTED => <pb::RequestRejected as prost::Message>::decode(body)
                    .map(|m| (m.request_id, false)),
                REQUEST_RECEIVED => {
                    if let Ok(m) = <pb::RequestReceived as prost::Message>::decode(body) {
                        verdicts.received(m.request_id, at);
                    }
                    continue;
                }
                _ => continue,
            };
            if let Ok((request_id, accepted)) = parsed {
                verdicts.arrived(request_id, Verdict { at, accepted });
            }
        }
        let _ = channel.close(200, "done".into()).await;
    });
    Ok(())
}
