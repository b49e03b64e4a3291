//! The fault suite: each service is its own `prodsys serve <service>`
//! process, on a fresh database and AMQP prefix, running productions of
//! jobs that record every run they make (`tests/profiles/test-runs.json`).
//! Each test strikes once while the productions run, then checks what an
//! operator would: every request has a verdict, every production ends
//! COMPLETED with counts that add up, no job's final attempt ran twice and no
//! finished attempt ran again, every file is catalogued once with the
//! checksum of its bytes, every outbox is empty, and the dead-letter queues
//! hold exactly the poison messages the test injected, each with a reason.
//! Each prints one line: the fault, what was checked, time to recover.
//!
//! The size of the productions comes from the environment, so the benchmark
//! harness runs the same faults at a larger size (`prodsys-bench -- faults`):
//! `PRODSYS_FAULT_JOBS` jobs per production (default 5) sleeping
//! `PRODSYS_FAULT_JOB_SECONDS` each (default 1.5).
//!
//! Faults of a whole server (the broker's `stop_app`, PostgreSQL restarted
//! with `-m immediate`) hit every user of that server, so the test command
//! runs this binary alone, after the rest of the suite.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use tonic::transport::Channel;

/// Jobs a production of the suite has, and how long each sleeps (the CI
/// size unless the environment names another).
fn jobs() -> u64 {
    static JOBS: OnceLock<u64> = OnceLock::new();
    *JOBS.get_or_init(|| size_from_env("PRODSYS_FAULT_JOBS", 5.0) as u64)
}

fn job_seconds() -> f64 {
    static SECONDS: OnceLock<f64> = OnceLock::new();
    *SECONDS.get_or_init(|| size_from_env("PRODSYS_FAULT_JOB_SECONDS", 1.5))
}

fn size_from_env(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => {
            let value: f64 = text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"));
            assert!(value > 0.0, "{name} must be positive");
            value
        }
        Err(_) => default,
    }
}

/// How long a whole scenario may take to settle after its fault: four
/// minutes at the CI size, more when its productions are larger.
fn settle() -> Duration {
    // Twelve productions' jobs on the cluster's four slots, three times over.
    let work = 12.0 * jobs() as f64 * (job_seconds() + 0.5) / 4.0 * 3.0;
    Duration::from_secs_f64(work.max(240.0))
}

/// The `prodsys` launcher of this build, built once per test process.
fn prodsys_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "prodsys", "--bin", "prodsys"])
            .current_dir(prodsys_testkit::repo_root())
            .status()
            .expect("running cargo build for the prodsys launcher");
        assert!(status.success(), "building the prodsys launcher failed");
        prodsys_testkit::bin_dir().join("prodsys")
    })
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One service process of the cluster.
struct Process {
    service: Service,
    replica: usize,
    port: u16,
    child: Option<Child>,
}

/// Every service as its own process (`replicas` of each), sharing one
/// database and one AMQP prefix.
struct Cluster {
    env: TestEnv,
    dir: PathBuf,
    config: PathBuf,
    runs: PathBuf,
    processes: Vec<Process>,
}

impl Cluster {
    async fn start(replicas: usize) -> Cluster {
        prodsys_telemetry::init("warn");
        let mut env = TestEnv::new().await.expect("test environment");
        support::use_test_profiles(&mut env);
        let dir = env.work_dir.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let runs = dir.join("runs.log");
        std::fs::write(&runs, "").unwrap();
        let mut processes = Vec::new();
        for replica in 0..replicas {
            for service in Service::ALL {
                processes.push(Process {
                    service,
                    replica,
                    port: free_port(),
                    child: None,
                });
            }
        }
        let mut settings = env.settings.clone();
        // A small delivery limit: a fault that spent deliveries would
        // dead-letter work within a few retries, and the suite would see it.
        settings.amqp.delivery_limit = 3;
        settings.dispatcher.max_concurrent_jobs = 4;
        let port_of = |service: Service| {
            processes
                .iter()
                .find(|p| p.service == service && p.replica == 0)
                .unwrap()
                .port
        };
        settings.intake.checker_url = format!("http://127.0.0.1:{}", port_of(Service::Checker));
        settings.checker.catalog_url = format!("http://127.0.0.1:{}", port_of(Service::Catalog));
        let config = dir.join("settings.toml");
        std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
        let mut cluster = Cluster {
            env,
            dir,
            config,
            runs,
            processes,
        };
        for i in 0..cluster.processes.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.processes.len() {
            cluster.serving(i).await;
        }
        cluster
    }

    fn index(&self, service: Service, replica: usize) -> usize {
        self.processes
            .iter()
            .position(|p| p.service == service && p.replica == replica)
            .expect("a process of the cluster")
    }

    fn spawn(&mut self, i: usize) {
        let process = &self.processes[i];
        let log = self
            .dir
            .join(format!("{}.{}.log", process.service, process.replica));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let port_key = format!(
            "PRODSYS__{}__PORT",
            process.service.name().to_ascii_uppercase()
        );
        let child = Command::new(prodsys_binary())
            .args(["serve", process.service.name(), "--config"])
            .arg(&self.config)
            .env(port_key, process.port.to_string())
            .env("PRODSYS_TEST_RUNS", &self.runs)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting a service process");
        self.processes[i].child = Some(child);
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.processes[i].port))
    }

    /// Waits until process `i` answers health SERVING.
    async fn serving(&self, i: usize) {
        let addr = self.addr(i);
        let name = self.processes[i].service.name();
        wait_for(
            &format!("{name} answering SERVING"),
            Duration::from_secs(60),
            || async move {
                let channel = Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (answer.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log_tail(i)));
    }

    fn log_tail(&self, i: usize) -> String {
        let p = &self.processes[i];
        let text =
            std::fs::read_to_string(self.dir.join(format!("{}.{}.log", p.service, p.replica)))
                .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGKILL: no shutdown, no cleanup.
    fn kill(&mut self, service: Service, replica: usize) {
        let i = self.index(service, replica);
        if let Some(mut child) = self.processes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the process's exit status once it has stopped.
    fn terminate(&mut self, service: Service, replica: usize) -> std::process::ExitStatus {
        let i = self.index(service, replica);
        let mut child = self.processes[i].child.take().expect("a running process");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{service} did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn restart(&mut self, service: Service, replica: usize) {
        let i = self.index(service, replica);
        self.spawn(i);
        self.serving(i).await;
    }

    /// A gRPC channel to the first replica of `service` that answers.
    async fn channel(&self, service: Service) -> Option<Channel> {
        for (i, p) in self.processes.iter().enumerate() {
            if p.service != service || p.child.is_none() {
                continue;
            }
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr(i)))
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
            {
                return Some(channel);
            }
        }
        None
    }

    /// Submits `request` under `key`, retrying on any answer that is not a
    /// verdict on the request itself (a service restarting): the same key
    /// makes a retried submission the same request.
    async fn submit(&self, mut request: pb::SubmitRequestRequest, key: &str) -> String {
        request.idempotency_key = key.to_string();
        wait_for(
            "intake taking the request",
            Duration::from_secs(120),
            || {
                let request = request.clone();
                async move {
                    let channel = self.channel(Service::Intake).await?;
                    pb::request_service_client::RequestServiceClient::new(channel)
                        .submit_request(request)
                        .await
                        .ok()
                        .map(|r| r.into_inner().request_id)
                }
            },
        )
        .await
        .unwrap()
    }

    async fn request(&self, request_id: &str) -> Option<pb::Request> {
        let channel = self.channel(Service::Intake).await?;
        pb::request_service_client::RequestServiceClient::new(channel)
            .get_request(pb::GetRequestRequest {
                request_id: request_id.to_string(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    async fn production(&self, production_id: &str) -> Option<pb::Production> {
        let channel = self.channel(Service::Status).await?;
        pb::status_service_client::StatusServiceClient::new(channel)
            .get_production(pb::GetProductionRequest {
                production_id: production_id.to_string(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    async fn files(&self, production_id: &str) -> Option<Vec<pb::OutputFile>> {
        let channel = self.channel(Service::Catalog).await?;
        let mut catalog = pb::catalog_service_client::CatalogServiceClient::new(channel);
        let mut files = Vec::new();
        let mut token = String::new();
        loop {
            let page = catalog
                .find_files(pb::FindFilesRequest {
                    production_id: production_id.into(),
                    page_size: 100,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            files.extend(page.files);
            if page.next_page_token.is_empty() {
                return Some(files);
            }
            token = page.next_page_token;
        }
    }

    /// Messages waiting in each service's dead-letter queue.
    async fn dead_letters(&self) -> BTreeMap<String, u32> {
        let (connection, channel) = self.env.amqp().await.unwrap();
        let mut counts = BTreeMap::new();
        for service in prodsys_testkit::SERVICES {
            let queue = format!("{}prodsys.{service}.dlq", self.env.prefix);
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(queue) = declared {
                counts.insert(service.to_string(), queue.message_count());
            }
        }
        let _ = connection.close(200, "done".into()).await;
        counts
    }

    /// The reasons the dead letters of `service` carry (read without taking them).
    async fn dead_letter_reasons(&self, service: &str) -> Vec<String> {
        let (connection, channel) = self.env.amqp().await.unwrap();
        let queue = format!("{}prodsys.{service}.dlq", self.env.prefix);
        let mut reasons = Vec::new();
        while let Ok(Some(message)) = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
        {
            let headers = message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            reasons.push(match headers.inner().get("x-prodsys-dead-letter-reason") {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                _ => String::new(),
            });
        }
        // Closing the channel returns every message taken above to the queue.
        let _ = channel.close(200, "done".into()).await;
        let _ = connection.close(200, "done".into()).await;
        reasons
    }

    fn stop(mut self) -> TestEnv {
        for p in &mut self.processes {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.env
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A request of the counting profile: `jobs()` jobs under `tag`.
fn counting_request(tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-runs".into(),
        vo: "test".into(),
        parameters_json: serde_json::json!({
            "jobs": jobs(), "per_job": 1, "seconds": job_seconds(), "tag": tag
        })
        .to_string(),
        backend: "local".into(),
        submitter: "faults".into(),
        ..Default::default()
    }
}

/// What a scenario submitted.
struct Submitted {
    request_ids: Vec<String>,
}

async fn submit_all(cluster: &Cluster, name: &str, range: std::ops::Range<usize>) -> Submitted {
    let mut request_ids = Vec::new();
    for n in range {
        let tag = format!("{name}-{n}");
        request_ids.push(cluster.submit(counting_request(&tag), &tag).await);
    }
    Submitted { request_ids }
}

/// Every check of the suite; returns what was checked, for the report line.
async fn check_everything(
    cluster: &Cluster,
    submitted: &Submitted,
    poison: &BTreeMap<String, u32>,
) -> String {
    // Every request has a verdict, and every one is accepted.
    let mut productions = Vec::new();
    for request_id in &submitted.request_ids {
        let request = wait_for("a verdict", settle(), || async {
            cluster
                .request(request_id)
                .await
                .filter(|r| r.state() != pb::RequestState::Received)
        })
        .await
        .unwrap();
        assert_eq!(
            request.state(),
            pb::RequestState::Accepted,
            "every request of the suite is valid: {request:?}"
        );
        productions.push(request.production_id);
    }
    // Every production COMPLETED, counts adding up.
    for production_id in &productions {
        let production = wait_for("the production to finish", settle(), || async {
            cluster.production(production_id).await.filter(|p| {
                matches!(
                    p.state(),
                    pb::ProductionState::Completed
                        | pb::ProductionState::PartiallyCompleted
                        | pb::ProductionState::Failed
                        | pb::ProductionState::Cancelled
                )
            })
        })
        .await
        .unwrap();
        assert_eq!(
            production.state(),
            pb::ProductionState::Completed,
            "{production:?}"
        );
        let counts = production.counts.unwrap_or_default();
        assert_eq!(production.job_total, jobs(), "{production:?}");
        assert_eq!(counts.done, jobs(), "every job done: {production:?}");
        let sum = counts.created
            + counts.submitted
            + counts.queued
            + counts.running
            + counts.done
            + counts.failed
            + counts.cancelled
            + counts.exhausted;
        assert_eq!(sum, production.job_total, "counts add up: {production:?}");
    }
    // No job's final attempt ran twice; no finished attempt ran again.
    let runs = std::fs::read_to_string(&cluster.runs).unwrap();
    let mut starts: HashMap<(String, String), Vec<u32>> = HashMap::new();
    let mut ends: HashMap<(String, String), Vec<u32>> = HashMap::new();
    for line in runs.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [what, production, job, attempt] = parts[..] else {
            panic!("a malformed line in the runs log: {line:?}");
        };
        let key = (production.to_string(), job.to_string());
        let attempt: u32 = attempt.parse().unwrap();
        match what {
            "start" => starts.entry(key).or_default().push(attempt),
            "end" => ends.entry(key).or_default().push(attempt),
            other => panic!("unknown run record {other:?}"),
        }
    }
    for production_id in &productions {
        for job in 0..jobs() {
            let key = (production_id.clone(), job.to_string());
            let started = starts.get(&key).cloned().unwrap_or_default();
            let ended = ends.get(&key).cloned().unwrap_or_default();
            assert_eq!(
                ended.len(),
                1,
                "{production_id} job {job} ran to its end exactly once: started {started:?}, ended {ended:?}"
            );
            let last = *started.iter().max().expect("the job started");
            assert_eq!(
                started.iter().filter(|a| **a == last).count(),
                1,
                "{production_id} job {job}: its final attempt {last} started once ({started:?})"
            );
            assert_eq!(
                ended[0], last,
                "{production_id} job {job}: nothing started after the attempt that finished ({started:?}, {ended:?})"
            );
        }
    }
    // Every file catalogued once, with the checksum of its bytes.
    let mut lfns = BTreeSet::new();
    for production_id in &productions {
        let files = wait_for("every file catalogued", settle(), || async {
            cluster
                .files(production_id)
                .await
                .filter(|f| f.len() as u64 >= jobs())
        })
        .await
        .unwrap();
        assert_eq!(files.len() as u64, jobs(), "one file per job: {files:?}");
        for file in &files {
            assert!(
                lfns.insert(file.lfn.clone()),
                "{} catalogued twice",
                file.lfn
            );
            let path = file.url.strip_prefix("file://").expect("a local file");
            let bytes = std::fs::read(path).expect("the catalogued file exists");
            let (size, adler32) = prodsys_core::checksum::adler32_hex(bytes.as_slice()).unwrap();
            assert_eq!(
                (size, adler32.as_str()),
                (file.size, file.adler32.as_str()),
                "{file:?}"
            );
        }
    }
    // Every outbox drained.
    let db = cluster.env.db().await.unwrap();
    wait_for("every outbox empty", Duration::from_secs(60), || async {
        let mut waiting = 0i64;
        for service in prodsys_testkit::SERVICES {
            waiting += db
                .query_one(&format!("SELECT count(*) FROM {service}.outbox"), &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(1);
        }
        (waiting == 0).then_some(())
    })
    .await
    .unwrap();
    // The dead-letter queues hold exactly what was injected, with reasons.
    let expected: BTreeMap<String, u32> = prodsys_testkit::SERVICES
        .iter()
        .map(|s| (s.to_string(), poison.get(*s).copied().unwrap_or(0)))
        .collect();
    let letters = wait_for(
        "the dead letters injected",
        Duration::from_secs(30),
        || async {
            let letters = cluster.dead_letters().await;
            (letters == expected).then_some(letters)
        },
    )
    .await
    .unwrap_or_else(|_| BTreeMap::new());
    for service in prodsys_testkit::SERVICES {
        let expected = poison.get(service).copied().unwrap_or(0);
        assert_eq!(
            letters.get(service).copied().unwrap_or(0),
            expected,
            "dead letters of {service}: {:?}",
            cluster.dead_letter_reasons(service).await
        );
        if expected > 0 {
            for reason in cluster.dead_letter_reasons(service).await {
                assert!(
                    !reason.is_empty(),
                    "a dead letter of {service} without a reason"
                );
            }
        }
    }
    format!(
        "{} requests decided and accepted, {} productions COMPLETED with counts adding up, {} jobs each finished once, {} files catalogued once with matching adler32, outboxes empty, dead letters = injected ({})",
        submitted.request_ids.len(),
        productions.len(),
        productions.len() as u64 * jobs(),
        lfns.len(),
        poison.values().sum::<u32>()
    )
}

/// Runs one scenario: `before` productions submitted, `fault` struck while
/// they run (it may submit more), then every check.
async fn scenario<F, Fut>(name: &str, replicas: usize, before: usize, fault: F)
where
    F: FnOnce(Cluster, Submitted) -> Fut,
    Fut: std::future::Future<Output = (Cluster, Submitted, BTreeMap<String, u32>, Instant)>,
{
    let cluster = Cluster::start(replicas).await;
    let submitted = submit_all(&cluster, name, 0..before).await;
    let (cluster, submitted, poison, recovered_from) = fault(cluster, submitted).await;
    let checked = check_everything(&cluster, &submitted, &poison).await;
    println!(
        "fault: {name}; checked: {checked}; recovered in {:.1} s",
        recovered_from.elapsed().as_secs_f64()
    );
    cluster.stop().cleanup().await;
}

/// Waits until at least one job of the cluster has ended (so a fault strikes mid-run).
async fn some_jobs_ended(cluster: &Cluster) {
    wait_for("a job to end", Duration::from_secs(60), || async {
        std::fs::read_to_string(&cluster.runs)
            .ok()
            .filter(|r| r.lines().any(|l| l.starts_with("end ")))
            .map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigkill_of_each_service_in_turn() {
    scenario("sigkill", 1, 6, |mut cluster, mut submitted| async move {
        some_jobs_ended(&cluster).await;
        let mut n = 6;
        let mut last = Instant::now();
        for service in [
            Service::Dispatcher,
            Service::Intake,
            Service::Checker,
            Service::Status,
            Service::Catalog,
        ] {
            cluster.kill(service, 0);
            // Work keeps arriving while the service is down.
            if service != Service::Intake {
                let more = submit_all(&cluster, "sigkill", n..n + 1).await;
                submitted.request_ids.extend(more.request_ids);
                n += 1;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.restart(service, 0).await;
            last = Instant::now();
        }
        (cluster, submitted, BTreeMap::new(), last)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_catalog_down_longer_than_the_delivery_limit_lasts() {
    scenario("catalog-down", 1, 0, |mut cluster, _| async move {
        // Stopped as an operator stops it: SIGTERM, and it exits cleanly.
        let stopped = cluster.terminate(Service::Catalog, 0);
        assert!(
            stopped.success(),
            "the catalog exits 0 on SIGTERM: {stopped:?}"
        );
        let submitted = submit_all(&cluster, "catalog-down", 0..20).await;
        // With a delivery limit of 3 and a pause between deliveries well
        // under a second, 20 s of outage would spend it many times over.
        tokio::time::sleep(Duration::from_secs(20)).await;
        cluster.restart(Service::Catalog, 0).await;
        (cluster, submitted, BTreeMap::new(), Instant::now())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_connections_closed_and_broker_app_restarted() {
    scenario("broker", 1, 6, |cluster, mut submitted| async move {
        some_jobs_ended(&cluster).await;
        // This cluster's connections only (their client names carry the prefix):
        // the same fault to prodsys as close_all_connections, without touching
        // other users of the broker.
        close_connections(&cluster.env.prefix);
        let more = submit_all(&cluster, "broker", 6..8).await;
        submitted.request_ids.extend(more.request_ids);
        some_jobs_ended(&cluster).await;
        let stop = Command::new("rabbitmqctl")
            .arg("stop_app")
            .status()
            .unwrap();
        assert!(stop.success());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let start = Command::new("rabbitmqctl")
            .arg("start_app")
            .status()
            .unwrap();
        assert!(start.success());
        let back = Instant::now();
        let more = submit_all(&cluster, "broker", 8..10).await;
        submitted.request_ids.extend(more.request_ids);
        (cluster, submitted, BTreeMap::new(), back)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_postgres_restarted_immediately() {
    scenario("postgres", 1, 6, |cluster, mut submitted| async move {
        some_jobs_ended(&cluster).await;
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("a Debian PostgreSQL cluster")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()
            .unwrap();
        let restart = Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &version,
                "main",
                "restart",
                "-m",
                "immediate",
            ])
            .status()
            .unwrap();
        assert!(restart.success(), "pg_ctlcluster restart -m immediate");
        let back = Instant::now();
        let more = submit_all(&cluster, "postgres", 6..8).await;
        submitted.request_ids.extend(more.request_ids);
        (cluster, submitted, BTreeMap::new(), back)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_two_replicas_of_every_service_one_of_each_killed() {
    scenario("replicas", 2, 10, |mut cluster, mut submitted| async move {
        some_jobs_ended(&cluster).await;
        for service in Service::ALL {
            cluster.kill(service, 0);
        }
        let killed = Instant::now();
        // The survivors carry on alone, and take new work.
        let more = submit_all(&cluster, "replicas", 10..12).await;
        submitted.request_ids.extend(more.request_ids);
        (cluster, submitted, BTreeMap::new(), killed)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_poison_and_unknown_messages_in_every_queue() {
    scenario("poison", 1, 4, |cluster, submitted| async move {
        let (connection, channel) = cluster.env.amqp().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let mut poison = BTreeMap::new();
        let events = format!("{}prodsys.events", cluster.env.prefix);
        for (service, event_type) in [
            ("intake", "request.accepted"),
            ("checker", "request.received"),
            ("dispatcher", "request.accepted"),
            ("status", "job.status"),
            ("catalog", "job.output"),
        ] {
            let queue = format!("{}prodsys.{service}", cluster.env.prefix);
            // A type the service takes, whose body is not its protobuf
            // message (wire type 7 does not exist), put into the queue as a
            // replayed event is; and a type no service knows, with a body
            // (empty) that any message decodes from.
            publish_raw(
                &channel,
                &queue,
                Some((&events, event_type)),
                event_type,
                vec![0xff; 4],
            )
            .await;
            publish_raw(&channel, &queue, None, "example.unknown", Vec::new()).await;
            poison.insert(service.to_string(), 2);
        }
        let _ = connection.close(200, "done".into()).await;
        (cluster, submitted, poison, Instant::now())
    })
    .await;
}

async fn publish_raw(
    channel: &lapin::Channel,
    queue: &str,
    original: Option<(&str, &str)>,
    event_type: &str,
    body: Vec<u8>,
) {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut headers = FieldTable::default();
    headers.insert(
        "cloudEvents_id".into(),
        text(&uuid::Uuid::new_v4().to_string()),
    );
    headers.insert(
        "cloudEvents_type".into(),
        text(&prodsys_core::events::cloudevent_type(event_type)),
    );
    headers.insert("cloudEvents_source".into(), text("/tests/faults"));
    headers.insert("cloudEvents_specversion".into(), text("1.0"));
    if let Some((exchange, routing_key)) = original {
        headers.insert("x-prodsys-original-exchange".into(), text(exchange));
        headers.insert("x-prodsys-original-routing-key".into(), text(routing_key));
    }
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/protobuf".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Closes every broker connection whose client name carries `prefix`.
fn close_connections(prefix: &str) {
    let pids = support::broker_connections(prefix);
    assert!(!pids.is_empty(), "the cluster's connections are listed");
    for pid in pids {
        let _ = Command::new("rabbitmqctl")
            .args(["close_connection", &pid, "fault suite: connection lost"])
            .status();
    }
}
