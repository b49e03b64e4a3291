//! A whole prodsys stack per test, on a fresh database and AMQP prefix, with gRPC clients.

#![allow(dead_code)]

pub mod browser;
pub mod storage;

use std::time::Duration;

use prodsys::{Service, Stack};
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub struct App {
    pub env: TestEnv,
    pub stack: Stack,
    pub shutdown: CancellationToken,
    pub intake: pb::request_service_client::RequestServiceClient<Channel>,
    pub status: pb::status_service_client::StatusServiceClient<Channel>,
    pub catalog: pb::catalog_service_client::CatalogServiceClient<Channel>,
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connecting to the service")
}

/// The request once the checker has decided it, read from intake.
pub async fn decided(
    intake: &pb::request_service_client::RequestServiceClient<Channel>,
    request_id: &str,
) -> pb::Request {
    wait_for("the checker's verdict", Duration::from_secs(30), || {
        let mut intake = intake.clone();
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

pub async fn spawn_app() -> App {
    spawn_app_with(|_| {}).await
}

/// The shipped profiles plus the test ones (tests/profiles), in the test's own directory.
pub fn use_test_profiles(env: &mut TestEnv) {
    let dir = env.work_dir.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    let root = prodsys_testkit::repo_root();
    for source in [root.join("profiles"), root.join("tests/profiles")] {
        for entry in std::fs::read_dir(source).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    env.settings.profiles_dir = dir;
}

/// Builds the KM3NeT example's image (deploy/local/build-images) and writes
/// its templates, pinned to the digest podman reports, into `dir`; returns
/// the pinned image reference.
pub fn build_km3net_templates(dir: &std::path::Path) -> String {
    let toysim = built_binary("prodsys-toysim", "prodsys-toysim");
    let out =
        std::process::Command::new(prodsys_testkit::repo_root().join("deploy/local/build-images"))
            .arg("--templates-dir")
            .arg(dir)
            .arg("--toysim")
            .arg(&toysim)
            .output()
            .expect("running deploy/local/build-images");
    assert!(
        out.status.success(),
        "deploy/local/build-images failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The KM3NeT templates, with their image built here, in the test's own
/// templates directory; returns the pinned image reference.
pub fn use_km3net_templates(env: &mut TestEnv) -> String {
    let dir = env.work_dir.join("templates");
    let image = build_km3net_templates(&dir);
    env.settings.templates_dir = dir;
    image
}

/// A stack whose settings `adjust` changed first.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut TestEnv)) -> App {
    // Shown by the test runner when a test fails.
    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.expect("test environment");
    adjust(&mut env);
    start_stack(env).await
}

async fn start_stack(env: TestEnv) -> App {
    let shutdown = CancellationToken::new();
    let stack = prodsys::start(&Service::ALL, &env.settings, shutdown.clone())
        .await
        .expect("starting the stack");
    let intake = pb::request_service_client::RequestServiceClient::new(
        channel(stack.addr(Service::Intake).unwrap()).await,
    );
    let status = pb::status_service_client::StatusServiceClient::new(
        channel(stack.addr(Service::Status).unwrap()).await,
    );
    let catalog = pb::catalog_service_client::CatalogServiceClient::new(
        channel(stack.addr(Service::Catalog).unwrap()).await,
    );
    App {
        env,
        stack,
        shutdown,
        intake,
        status,
        catalog,
    }
}

/// The shipped CTA example as a gRPC request.
pub fn cta_example() -> pb::SubmitRequestRequest {
    let path = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pb::SubmitRequestRequest {
        profile: file["profile"].as_str().unwrap().into(),
        vo: file["vo"].as_str().unwrap().into(),
        parameters_json: file["parameters"].to_string(),
        backend: file["backend"].as_str().unwrap_or_default().into(),
        idempotency_key: String::new(),
        submitter: "tests".into(),
        extend: false,
        reuse_existing: false,
        priority: 0,
        forward: Vec::new(),
        forward_replace: false,
        chain: Vec::new(),
    }
}

/// A request of the test-sleep profile (tests/profiles): `jobs` jobs that sleep
/// `seconds`, the one at `fail_job` always failing; on installation `backend`.
pub fn sleep_request(
    jobs: u64,
    seconds: f64,
    fail_job: i64,
    tag: &str,
    backend: &str,
) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-sleep".into(),
        vo: "test".into(),
        parameters_json: serde_json::json!({
            "jobs": jobs, "per_job": 1, "seconds": seconds, "fail_job": fail_job, "tag": tag
        })
        .to_string(),
        backend: backend.into(),
        ..cta_example()
    }
}

impl App {
    /// The production as status shows it now, if status knows it.
    pub async fn production(&self, production_id: &str) -> Option<pb::Production> {
        self.status
            .clone()
            .get_production(pb::GetProductionRequest {
                production_id: production_id.to_string(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits up to `timeout` for the production to satisfy `done`; returns
    /// that snapshot, or fails naming `what`.
    pub async fn production_when(
        &self,
        what: &str,
        timeout: Duration,
        production_id: &str,
        done: impl Fn(&pb::Production) -> bool,
    ) -> pb::Production {
        wait_for(what, timeout, || async {
            self.production(production_id).await.filter(|p| done(p))
        })
        .await
        .unwrap()
    }

    /// Asks intake to cancel `production_id`.
    pub async fn cancel(
        &self,
        production_id: &str,
        reason: &str,
    ) -> Result<pb::CancelProductionResponse, tonic::Status> {
        self.intake
            .clone()
            .cancel_production(pb::CancelProductionRequest {
                production_id: production_id.to_string(),
                reason: reason.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Submits `request`, which must be accepted; returns its production ID.
    pub async fn accepted(&self, request: pb::SubmitRequestRequest) -> String {
        let request = self
            .decided(&self.submit(request).await.unwrap().request_id)
            .await;
        assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
        request.production_id
    }

    pub async fn submit(
        &self,
        request: pb::SubmitRequestRequest,
    ) -> Result<pb::SubmitRequestResponse, tonic::Status> {
        self.intake
            .clone()
            .submit_request(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Waits until the checker has decided the request.
    pub async fn decided(&self, request_id: &str) -> pb::Request {
        decided(&self.intake, request_id).await
    }

    /// Follows WatchProduction to its end, returning every snapshot.
    pub async fn watch(&self, production_id: &str) -> Vec<pb::Production> {
        let status = self.status.clone();
        let mut stream = wait_for(
            "the production in the status service",
            Duration::from_secs(30),
            || {
                let mut status = status.clone();
                let production_id = production_id.to_string();
                async move {
                    status
                        .watch_production(pb::GetProductionRequest { production_id })
                        .await
                        .ok()
                        .map(|s| s.into_inner())
                }
            },
        )
        .await
        .unwrap();
        let mut snapshots = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                Ok(Ok(Some(snapshot))) => snapshots.push(snapshot),
                Ok(Ok(None)) => return snapshots,
                Ok(Err(status)) => panic!("watch failed: {status}"),
                Err(_) => panic!("no update for 60 s; last: {:?}", snapshots.last()),
            }
        }
    }

    pub async fn files(&self, production_id: &str) -> Vec<pb::OutputFile> {
        let mut files = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .catalog
                .clone()
                .find_files(pb::FindFilesRequest {
                    production_id: production_id.into(),
                    metadata: Default::default(),
                    page_size: 3,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            files.extend(page.files);
            if page.next_page_token.is_empty() {
                return files;
            }
            token = page.next_page_token;
        }
    }

    /// How many requests intake has stored, whatever their state.
    pub async fn stored_requests(&self) -> i64 {
        let db = self.env.db().await.unwrap();
        db.query_one("SELECT count(*) FROM intake.requests", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The next `n` dead letters of `service`, with the reason each carries.
    pub async fn dead_letters(
        &self,
        service: &str,
        n: usize,
    ) -> Vec<(String, lapin::types::FieldTable)> {
        let (connection, channel) = self.env.amqp().await.unwrap();
        let dlq = format!("{}prodsys.{service}.dlq", self.env.prefix);
        let mut letters = Vec::new();
        for _ in 0..n {
            let letter =
                next_message(&channel, &dlq, "a dead letter", Duration::from_secs(20)).await;
            let headers = letter
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            let reason = match headers.inner().get("x-prodsys-dead-letter-reason") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("a dead letter without a reason: {other:?}"),
            };
            letters.push((reason, headers));
        }
        let _ = connection.close(200, "done".into()).await;
        letters
    }

    /// Stops every service and starts them again on the same database and broker.
    pub async fn restart(self) -> App {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stack.wait()).await;
        start_stack(self.env).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stack.wait()).await;
        self.env.cleanup().await;
    }
}

/// A stack of only `services`, on `env` (the others run elsewhere: in
/// processes a test starts itself, on the same database and prefix).
pub async fn spawn_services(env: TestEnv, services: &[Service]) -> App {
    prodsys_telemetry::init("warn");
    start_services(env, services).await
}

/// A stack of only `services`, on `env`; clients for intake, status and catalog.
async fn start_services(env: TestEnv, services: &[Service]) -> App {
    // The shipped profiles run prodsys-toysim from the build's directory: a
    // run of this package alone (`-p prodsys-tests`) does not build it, and
    // every job would end "exited 127".
    if !prodsys_testkit::bin_dir().join("prodsys-toysim").exists() {
        built_binary("prodsys-toysim", "prodsys-toysim");
    }
    let shutdown = CancellationToken::new();
    let stack = prodsys::start(services, &env.settings, shutdown.clone())
        .await
        .expect("starting the services");
    let addr = |service| stack.addr(service).expect("intake, status and catalog run");
    let intake =
        pb::request_service_client::RequestServiceClient::new(channel(addr(Service::Intake)).await);
    let status =
        pb::status_service_client::StatusServiceClient::new(channel(addr(Service::Status)).await);
    let catalog = pb::catalog_service_client::CatalogServiceClient::new(
        channel(addr(Service::Catalog)).await,
    );
    App {
        env,
        stack,
        shutdown,
        intake,
        status,
        catalog,
    }
}

/// The shipped CTA example with its parameters changed by `change`.
pub fn cta_with(change: impl FnOnce(&mut serde_json::Value)) -> pb::SubmitRequestRequest {
    let mut request = cta_example();
    let mut parameters: serde_json::Value = serde_json::from_str(&request.parameters_json).unwrap();
    change(&mut parameters);
    request.parameters_json = parameters.to_string();
    request
}

/// The shipped KM3NeT example with its parameters changed by `change`.
pub fn km3net_with(change: impl FnOnce(&mut serde_json::Value)) -> pb::SubmitRequestRequest {
    let path = prodsys_testkit::repo_root().join("examples/km3net-container-sim.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut parameters = file["parameters"].clone();
    change(&mut parameters);
    pb::SubmitRequestRequest {
        profile: file["profile"].as_str().unwrap().into(),
        vo: file["vo"].as_str().unwrap().into(),
        parameters_json: parameters.to_string(),
        backend: file["backend"].as_str().unwrap_or_default().into(),
        submitter: "tests".into(),
        ..Default::default()
    }
}

/// A metadata condition for FindFiles.
pub fn condition(
    key: &str,
    operator: pb::ConditionOperator,
    values: &[&str],
) -> pb::MetadataCondition {
    pb::MetadataCondition {
        key: key.into(),
        operator: operator as i32,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

/// The field violations of a refusal.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|d| d.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

impl App {
    /// Every file `query` finds, page by page (`page_size` as the query says).
    pub async fn find_all(
        &self,
        mut query: pb::FindFilesRequest,
    ) -> Result<Vec<pb::OutputFile>, tonic::Status> {
        let mut files = Vec::new();
        loop {
            let page = self
                .catalog
                .clone()
                .find_files(query.clone())
                .await?
                .into_inner();
            files.extend(page.files);
            if page.next_page_token.is_empty() {
                return Ok(files);
            }
            query.page_token = page.next_page_token;
        }
    }

    /// Runs `request` to its end and waits until the catalog holds its record
    /// (every file it reported registered); returns its production ID.
    pub async fn run_and_catalogue(&self, request: pb::SubmitRequestRequest) -> String {
        let production_id = self.accepted(request).await;
        let last = self.watch(&production_id).await.pop().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
        let catalog = self.catalog.clone();
        wait_for(
            "the catalog's production record",
            Duration::from_secs(30),
            || {
                let mut catalog = catalog.clone();
                let production_id = production_id.clone();
                async move {
                    catalog
                        .get_production_record(pb::GetProductionRecordRequest {
                            production_id,
                            ..Default::default()
                        })
                        .await
                        .ok()
                }
            },
        )
        .await
        .unwrap();
        production_id
    }

    /// What ValidateRequest answers for `request`.
    pub async fn validate(&self, request: pb::SubmitRequestRequest) -> pb::Validation {
        self.intake
            .clone()
            .validate_request(request)
            .await
            .unwrap()
            .into_inner()
    }
}

/// How many messages wait in `queue` (ready, not counting unacknowledged ones).
pub async fn queue_depth(env: &TestEnv, queue: &str) -> u32 {
    let (connection, channel) = env.amqp().await.unwrap();
    let depth = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
    let _ = connection.close(200, "done".into()).await;
    depth
}

/// How many dead letters `service`'s dead-letter queue holds.
pub async fn dlq_depth(env: &TestEnv, service: &str) -> u32 {
    queue_depth(env, &format!("{}prodsys.{service}.dlq", env.prefix)).await
}

/// Publishes one message with the CloudEvents headers of `event_type`
/// (binary mode) to `exchange` under `routing_key`; returns its ID.
pub async fn publish_raw(
    env: &TestEnv,
    exchange: &str,
    routing_key: &str,
    event_type: &str,
    body: &[u8],
) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let event = prodsys_messaging::CloudEvent {
        id: id.clone(),
        event_type: event_type.to_string(),
        source: "/tests".into(),
        specversion: "1.0".into(),
        time: None,
        subject: Some("test".into()),
    };
    let (connection, channel) = env.amqp().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.as_str().into())
        .with_content_type("application/protobuf".into())
        .with_headers(event.to_headers());
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "published to {exchange} {routing_key}: {confirm:?}"
    );
    let _ = connection.close(200, "done".into()).await;
    id
}

/// The path of a binary of this workspace, built (once per test process) if needed.
pub fn built_binary(package: &str, bin: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == bin) {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package, "--bin", bin])
            .current_dir(prodsys_testkit::repo_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {bin}");
        built.push(bin.to_string());
    }
    prodsys_testkit::bin_dir().join(bin)
}

/// The overall health status a service reports.
pub async fn health(addr: std::net::SocketAddr) -> Option<i32> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

impl App {
    /// Stops every service and starts again only `services` (intake, status
    /// and catalog among them) on the same database and broker.
    pub async fn restart_only(self, services: &[Service]) -> App {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stack.wait()).await;
        start_services(self.env, services).await
    }
}

/// The broker-side ids of the connections whose client name carries `prefix`
/// (every service names its connection `prodsys-<service>@<prefix>`).
pub fn broker_connections(prefix: &str) -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl runs");
    let marker = format!("@{prefix}\"");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&marker))
        .filter_map(|line| line.split('\t').next().map(str::to_string))
        .collect()
}

/// Starts (or finds running) the real one-host Slurm of the suite.
pub fn start_slurm() {
    let script = prodsys_testkit::repo_root().join("tests/servers/slurm/start");
    let status = std::process::Command::new(script)
        .status()
        .expect("running tests/servers/slurm/start");
    assert!(status.success(), "the Slurm test cluster did not start");
}

/// Slurm jobs whose name holds `part` (squeue keeps finished ones a while).
pub fn slurm_jobs(part: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("squeue")
        .args(["--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["name"].as_str().unwrap_or_default().contains(part))
        .map(|j| {
            let state = match &j["job_state"] {
                serde_json::Value::Array(a) => a[0].as_str().unwrap().to_string(),
                s => s.as_str().unwrap().to_string(),
            };
            (j["name"].as_str().unwrap().to_string(), state)
        })
        .collect()
}

/// The next message in `queue` (taken without an ack), waiting up to
/// `timeout` for it.
#[allow(dead_code)]
pub async fn next_message(
    channel: &lapin::Channel,
    queue: &str,
    what: &str,
    timeout: Duration,
) -> lapin::message::BasicGetMessage {
    wait_for(what, timeout, || async {
        channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap()
}

/// The body of a test binary's `dispatcher_process` entry: serves a
/// dispatcher with the settings file `config` until SIGTERM, or until the
/// test process that started it is gone.
pub fn serve_dispatcher(config: &std::ffi::OsStr, log_filter: &str) {
    prodsys_telemetry::init(log_filter);
    let settings = prodsys_config::Settings::load(Some(std::path::Path::new(config))).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = CancellationToken::new();
        let stack = prodsys::start(&[Service::Dispatcher], &settings, shutdown.clone())
            .await
            .unwrap();
        println!("dispatcher ready");
        let parent = std::os::unix::process::parent_id();
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tick.tick() => if std::os::unix::process::parent_id() != parent { break },
            }
        }
        shutdown.cancel();
        stack.wait().await.unwrap();
    });
}
