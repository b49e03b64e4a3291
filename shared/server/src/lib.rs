//! What every prodsys service process shares besides the database and the
//! broker: binding and serving gRPC with `grpc.health.v1` and server
//! reflection, keeping health true to whether PostgreSQL and the broker
//! answer, and the one mapping from the boundary error to `tonic::Status`.

pub mod batch;
pub mod failure;
pub mod input;

pub use failure::Failure;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prodsys_core::Violation;
use prodsys_db::Db;
use prodsys_messaging::{Broker, Holding};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_types::{ErrorDetails, StatusExt};

/// Errors at a service boundary, mapped once to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {}", summary(.0))]
    Validation(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Validation(violations) => {
                let message = format!("invalid request: {}", summary(&violations));
                let mut details = ErrorDetails::new();
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                tonic::Status::with_error_details(tonic::Code::InvalidArgument, message, details)
            }
            ServiceError::NotFound(what) => tonic::Status::not_found(what),
            ServiceError::Conflict(what) => tonic::Status::already_exists(what),
            // The details (SQL, hosts, paths) stay in the log; the caller
            // gets an incident ID to quote, which the log line carries too.
            ServiceError::Unexpected(error) if prodsys_messaging::is_transient(&error) => {
                let incident = uuid::Uuid::new_v4();
                tracing::warn!(%incident, error = format!("{error:#}"), "a dependency is unavailable");
                tonic::Status::unavailable(format!(
                    "a service this call needs is unavailable; retry later (incident {incident})"
                ))
            }
            ServiceError::Unexpected(error) => {
                let incident = uuid::Uuid::new_v4();
                tracing::error!(%incident, error = format!("{error:#}"), "internal error");
                tonic::Status::internal(format!(
                    "internal error (incident {incident}; the details are in the service's log)"
                ))
            }
        }
    }
}

/// The tokio runtime of a prodsys process running `services` services.
///
/// A process running one service gets one worker thread: a service waits
/// on the database and the broker far more than it computes, it scales by
/// running more replicas (competing consumers), and with several services
/// sharing a machine each extra worker only adds thread wake-ups (measured
/// on two cores with five services: 14 % more requests/s with one worker
/// each). All services in one process get one worker per core.
/// `TOKIO_WORKER_THREADS` overrides both.
pub fn runtime(services: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if services <= 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.build()
}

/// Listeners bound ahead of their server by [`reserve`], by address.
static RESERVED: Mutex<Vec<std::net::TcpListener>> = Mutex::new(Vec::new());

/// Binds a free port on `host` now, for a server of this process that
/// starts later: [`bind`] on that port takes this very listener, so the
/// port is known (to services started before it) and no other process can
/// take it in between.
pub fn reserve(host: &str) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind((host, 0))
        .with_context(|| format!("reserving a port on {host}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    RESERVED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(listener);
    Ok(addr)
}

/// A bound gRPC listener, its address known before serving (port 0 works;
/// a port [`reserve`]d in this process is the listener reserved).
pub async fn bind(host: &str, port: u16) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let reserved = {
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        let found = reserved
            .iter()
            .position(|l| port != 0 && l.local_addr().is_ok_and(|a| a.port() == port));
        found.map(|i| reserved.swap_remove(i))
    };
    let listener = match reserved {
        Some(listener) => TcpListener::from_std(listener)?,
        None => TcpListener::bind((host, port))
            .await
            .with_context(|| format!("binding gRPC on {host}:{port}"))?,
    };
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Health (NOT_SERVING until [`track_health`] says otherwise), to which a
/// service adds its own gRPC services; [`Foundation::serve_grpc`] adds
/// reflection of exactly those.
pub fn base_routes() -> anyhow::Result<(Routes, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    Ok((Routes::new(health), reporter))
}

/// `routes` plus `GET /metrics`: the process's figures (see
/// `prodsys_telemetry::metrics`) in the OpenMetrics text format, on the
/// service's gRPC port over HTTP/1.1, as Prometheus scrapes them. (Status
/// serves its own `/metrics`, which adds its read model's gauges.)
pub fn with_metrics(routes: Routes) -> Routes {
    async fn metrics() -> impl axum::response::IntoResponse {
        (
            [(
                http::header::CONTENT_TYPE,
                prodsys_telemetry::metrics::CONTENT_TYPE,
            )],
            prodsys_telemetry::metrics::metrics().encode(),
        )
    }
    Routes::from(
        routes
            .into_axum_router()
            .route("/metrics", axum::routing::get(metrics)),
    )
}

/// Server reflection advertising `services` (and health), as
/// `grpc.reflection.v1` and as the older `v1alpha` that many tools still
/// speak only (Python's grpcio-reflection, older grpcurl, Postman, Kreya).
pub fn with_reflection(routes: Routes, services: &[&str]) -> anyhow::Result<Routes> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(prodsys_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let v1 = builder().build_v1().context("building server reflection")?;
    let v1alpha = builder()
        .build_v1alpha()
        .context("building server reflection (v1alpha)")?;
    Ok(routes.add_service(v1).add_service(v1alpha))
}

/// Serves `routes` on `listener` until `shutdown`, every call admitted by
/// `auth` (bearer tokens, or the development mode), over TLS when `tls` is
/// given.
pub fn serve(
    listener: TcpListener,
    routes: Routes,
    auth: prodsys_auth::Auth,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            // HTTP/1.1 too: the status service's dashboard and /metrics are
            // read by browsers and scrapers on the same port.
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(tower::util::MapResponseLayer::new(
                undecodable_is_invalid_argument,
            ))
            .layer(auth.layer())
            .add_routes(routes);
        match tls {
            Some(config) => {
                router
                    .serve_with_incoming_shutdown(
                        prodsys_auth::tls::incoming(listener, config),
                        shutdown.cancelled_owned(),
                    )
                    .await
            }
            None => {
                // Without TCP_NODELAY an answer written in more than one
                // piece (headers, a small body, trailers) waits for the
                // client's delayed ACK: about 40 ms a call.
                router
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                        shutdown.cancelled_owned(),
                    )
                    .await
            }
        }
        .context("gRPC server")
    })
}

/// tonic answers a request that does not decode (bytes that are not UTF-8 in
/// a string field, say) with INTERNAL; it is the caller's input that is
/// wrong, so say INVALID_ARGUMENT. The message, which names the field, stays.
fn undecodable_is_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|v| v == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.starts_with("failed%20to%20decode%20Protobuf")
                || m.starts_with("failed to decode Protobuf")
        });
    if internal && undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    response
}

/// Keeps the overall status ("") and each of `services` SERVING exactly while
/// the database answers, the broker is connected and no consumer holds a
/// batch because a dependency fails (see [`Holding`]).
pub fn track_health(
    reporter: HealthReporter,
    services: &[&'static str],
    db: Db,
    broker: Broker,
    holding: Holding,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let services: Vec<&'static str> = std::iter::once("")
        .chain(services.iter().copied())
        .collect();
    tokio::spawn(async move {
        let mut broker_state = broker.connected();
        let mut held = holding.subscribe();
        let mut last = None;
        loop {
            let holding = *held.borrow_and_update();
            let healthy = holding == 0 && broker.is_connected() && db.ping().await;
            if last != Some(healthy) {
                let status = if healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in &services {
                    reporter.set_service_status(*name, status).await;
                }
                tracing::info!(healthy, holding, "health changed");
                last = Some(healthy);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = broker_state.changed() => {}
                _ = held.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        for name in &services {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
    })
}

/// Every few seconds, what waits for the service: messages ready in its
/// queue and consumers on it (as the broker counts them, every replica's),
/// and events in its outbox not yet confirmed. A failed look leaves the last
/// figures as they were.
async fn sample_backlog(
    service: &'static str,
    db: Db,
    broker: Broker,
    queue: String,
    shutdown: CancellationToken,
) {
    use prodsys_db::Cached;
    const EVERY: Duration = Duration::from_secs(5);
    let metrics = prodsys_telemetry::metrics::metrics();
    use prodsys_messaging::lapin;
    let mut channel: Option<lapin::Channel> = None;
    while !shutdown.is_cancelled() {
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = broker.channel().await.ok();
        }
        if let Some(c) = &channel {
            match c
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
            {
                Ok(q) => metrics.queue(service, q.message_count(), q.consumer_count()),
                Err(_) => channel = None,
            }
        }
        if let Ok(client) = db.client().await
            && let Ok(row) = client
                .query_one_cached("SELECT count(*) FROM outbox", &[])
                .await
        {
            metrics.outbox(service, row.get::<_, i64>(0));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// The parts every service starts the same way: its migrated schema, its
/// supervised broker connection with its topology, its outbox relay, the
/// pruning of its inbox, and the order in which it stops.
///
/// Stopping (the `shutdown` token): consumers cancel their subscriptions and
/// finish what they hold, then the relay publishes what they committed, then
/// the broker connection closes — all within `shutdown_grace_ms`, after which
/// whatever is left is abandoned (unacknowledged deliveries go back to the
/// queue; unsent outbox rows wait for the next start).
#[derive(Clone, Debug)]
pub struct Foundation {
    pub service: &'static str,
    pub db: Db,
    pub broker: Broker,
    pub names: prodsys_messaging::Names,
    /// Consumers holding a batch through a dependency's outage (health reads it).
    pub holding: Holding,
    consumers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Cancelled when the gRPC server has stopped (calls in flight done).
    served: CancellationToken,
    stopped: Arc<Mutex<Option<JoinHandle<()>>>>,
    consumer_settings: prodsys_messaging::consumer::ConsumerSettings,
    /// Who may call the service's port (tokens, or the development mode).
    pub auth: prodsys_auth::Auth,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate presented to other services that ask for one.
    client_certificate: Option<prodsys_auth::tls::ClientCertificate>,
    /// The CA and such of the clients to other services.
    settings: Arc<prodsys_config::Settings>,
}

impl Foundation {
    /// Migrates the service's schema, connects to the broker (declaring the
    /// queue bound to `bindings` on `prodsys.events` and `ingest_bindings` on
    /// `prodsys.ingest`) and starts the outbox relay and the inbox pruning.
    pub async fn start(
        settings: &prodsys_config::Settings,
        service: &'static str,
        migrations: &[prodsys_db::Migration],
        bindings: &[&str],
        ingest_bindings: &[&str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        // Refused before anything starts: tokens on without what they need,
        // or a certificate that cannot be read.
        let auth = prodsys_auth::Auth::from_settings(settings)?;
        let tls = prodsys_auth::tls::server_config(&settings.tls)?;
        let client_certificate =
            prodsys_auth::tls::ClientCertificate::from_settings(&settings.tls)?;
        // Its own role and broker user where configured; secrets stay wrapped.
        let database_url = settings
            .database
            .url_for(service)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let amqp_url = settings
            .amqp
            .url_for(service)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let amqp_tls = prodsys_messaging::broker::tls_config(&settings.amqp)?;
        prodsys_messaging::broker::check_tls_url(
            secrecy::ExposeSecret::expose_secret(&amqp_url),
            &amqp_tls,
            &format!("the broker URL of {service}"),
        )?;
        let db = Db::new(
            secrecy::ExposeSecret::expose_secret(&database_url),
            service,
            settings.database.pool_size,
        )?;
        db.migrate(migrations).await?;
        let names = prodsys_messaging::Names::new(&settings.amqp.prefix);
        let topology = prodsys_messaging::Topology {
            names: names.clone(),
            service: service.to_string(),
            bindings: bindings.iter().map(|b| b.to_string()).collect(),
            ingest_bindings: ingest_bindings.iter().map(|b| b.to_string()).collect(),
            delivery_limit: settings.amqp.delivery_limit,
        };
        // The connection outlives `shutdown`: consumers still settle and the
        // relay still flushes after it; `stop_in_order` closes it last.
        let closing = CancellationToken::new();
        let broker = tokio::select! {
            broker = Broker::start_with_tls(secrecy::ExposeSecret::expose_secret(&amqp_url), amqp_tls, topology, closing.clone()) => broker,
            _ = shutdown.cancelled() => Err(anyhow::anyhow!("shut down before the broker was reached")),
        };
        let broker = match broker {
            Ok(broker) => broker,
            Err(error) => {
                closing.cancel();
                return Err(error);
            }
        };
        let publisher = prodsys_messaging::Publisher::new(
            broker.clone(),
            Duration::from_millis(settings.amqp.confirm_timeout_ms),
        );
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(prodsys_messaging::relay::run_relay(
            db.clone(),
            publisher,
            names.clone(),
            format!("/prodsys/{service}"),
            relay_stop.clone(),
        ));
        tokio::spawn(prune_inbox(
            db.clone(),
            Duration::from_secs(settings.database.inbox_retention_s),
            shutdown.clone(),
        ));
        tokio::spawn(sample_backlog(
            service,
            db.clone(),
            broker.clone(),
            names.queue(service),
            shutdown.clone(),
        ));
        let consumers = Arc::new(Mutex::new(Vec::new()));
        let served = CancellationToken::new();
        let stopped = tokio::spawn(stop_in_order(
            service,
            Duration::from_millis(settings.shutdown_grace_ms),
            consumers.clone(),
            served.clone(),
            (relay, relay_stop),
            closing,
            shutdown.clone(),
        ));
        let mut consumer_settings = prodsys_messaging::consumer::ConsumerSettings::new(
            names.queue(service),
            settings.amqp.prefetch,
            settings.amqp.batch_size,
            Duration::from_millis(settings.amqp.confirm_timeout_ms),
        );
        consumer_settings.batch_bytes = settings.amqp.batch_bytes.max(1);
        consumer_settings.hold_limit = Duration::from_millis(settings.amqp.hold_limit_ms);
        consumer_settings.retry_max = Duration::from_millis(settings.amqp.hold_retry_max_ms);
        // What the queue is bound to: anything else put into it is dead-lettered unread.
        consumer_settings.accepts = Some(prodsys_messaging::consumer::Accepts {
            events_exchange: names.events(),
            event_types: bindings.iter().map(|b| b.to_string()).collect(),
            other_exchanges: if ingest_bindings.is_empty() {
                Vec::new()
            } else {
                vec![names.ingest()]
            },
        });
        Ok(Self {
            service,
            db,
            broker,
            names,
            holding: Holding::new(),
            consumers,
            served,
            stopped: Arc::new(Mutex::new(Some(stopped))),
            consumer_settings,
            auth,
            tls,
            client_certificate,
            settings: Arc::new(settings.clone()),
        })
    }

    /// A lazily connected client channel to another service at `url`
    /// (`what` names the setting, for errors), presenting the service's
    /// client certificate when asked for one, its calls carrying the
    /// internal token, or with `for_caller` the token of the caller being
    /// served when there is one.
    pub fn channel(
        &self,
        url: &str,
        what: &str,
        timeout: Option<Duration>,
        for_caller: bool,
    ) -> anyhow::Result<prodsys_auth::Channel> {
        let credentials = if for_caller {
            self.auth.caller_credentials()
        } else {
            self.auth.internal_credentials()
        };
        prodsys_auth::tls::channel(
            url,
            &self.settings,
            self.client_certificate.as_ref(),
            what,
            timeout,
            credentials,
        )
    }

    /// Consumes the service's queue with `handler` until `shutdown`.
    pub fn consume<H: prodsys_messaging::BatchHandler>(
        &self,
        _settings: &prodsys_config::Settings,
        handler: H,
        shutdown: &CancellationToken,
    ) {
        let consumer = tokio::spawn(prodsys_messaging::run_consumer(
            self.broker.clone(),
            self.consumer_settings.clone(),
            handler,
            self.holding.clone(),
            shutdown.clone(),
        ));
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(consumer);
    }

    /// Consumes the service's queue with `consumers` consumers (each its own
    /// channel and prefetch) sharing `handler`: batches are then handled
    /// concurrently, so only for handlers whose effects commute.
    pub fn consume_concurrently<H: prodsys_messaging::BatchHandler>(
        &self,
        settings: &prodsys_config::Settings,
        handler: H,
        consumers: usize,
        shutdown: &CancellationToken,
    ) {
        let handler = std::sync::Arc::new(handler);
        for _ in 0..consumers.max(1) {
            self.consume(settings, handler.clone(), shutdown);
        }
    }

    /// Binds, then serves `routes` with health tracking; returns the address.
    pub async fn serve_grpc(
        &self,
        host: &str,
        port: u16,
        routes: Routes,
        reporter: HealthReporter,
        services: &[&'static str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Running> {
        let routes = with_reflection(routes, services)?;
        let (listener, addr) = bind(host, port).await?;
        self.auth.check_bind(self.service, addr)?;
        track_health(
            reporter,
            services,
            self.db.clone(),
            self.broker.clone(),
            self.holding.clone(),
            shutdown.clone(),
        );
        let server = serve(
            listener,
            routes,
            self.auth.clone(),
            self.tls.clone(),
            shutdown.clone(),
        );
        let served = self.served.clone();
        let server = tokio::spawn(async move {
            let result = server.await.context("gRPC server task").and_then(|r| r);
            served.cancel();
            result
        });
        tracing::info!(
            service = self.service,
            %addr,
            tls = self.tls.is_some(),
            tokens = !self.auth.dev_mode(),
            "serving gRPC"
        );
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(Running {
            service: self.service,
            addr,
            server,
            stopped,
        })
    }
}

/// After `shutdown`: waits for the consumers to finish what they hold and
/// the gRPC server its calls in flight, then lets the relay flush the
/// outbox, then closes the broker connection; what has not finished after
/// `grace` is abandoned.
async fn stop_in_order(
    service: &'static str,
    grace: Duration,
    consumers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    served: CancellationToken,
    (relay, relay_stop): (JoinHandle<()>, CancellationToken),
    closing: CancellationToken,
    shutdown: CancellationToken,
) {
    shutdown.cancelled().await;
    let started = tokio::time::Instant::now();
    // Each step has until its share of the grace period, so a step that
    // hangs still leaves the next its turn (and the process time to exit).
    let until = |share: f64| started + grace.mul_f64(share);
    let consumers: Vec<JoinHandle<()>> =
        std::mem::take(&mut *consumers.lock().unwrap_or_else(|e| e.into_inner()));
    let aborts: Vec<_> = consumers.iter().map(|c| c.abort_handle()).collect();
    if tokio::time::timeout_at(until(0.6), join_all(consumers))
        .await
        .is_err()
    {
        tracing::warn!(
            service,
            "consumers did not finish in time; their deliveries return to the queue"
        );
        aborts.iter().for_each(|a| a.abort());
    }
    // Calls in flight may still commit events; a stream a client keeps open
    // (WatchProduction) must not keep the outbox from being flushed.
    if tokio::time::timeout_at(until(0.7), served.cancelled())
        .await
        .is_err()
    {
        tracing::warn!(service, "gRPC calls still open; flushing the outbox anyway");
    }
    relay_stop.cancel();
    let relay_abort = relay.abort_handle();
    if tokio::time::timeout_at(until(0.9), relay).await.is_err() {
        tracing::warn!(
            service,
            "the outbox relay did not flush in time; the rest goes at the next start"
        );
        relay_abort.abort();
    }
    closing.cancel();
    tracing::info!(
        service,
        took_ms = started.elapsed().as_millis() as u64,
        "stopped"
    );
}

async fn join_all(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

/// Deletes inbox rows older than `retention` now and then, until `shutdown`.
async fn prune_inbox(db: Db, retention: Duration, shutdown: CancellationToken) {
    // Often enough that a day's rows go in small batches, rarely enough to cost nothing.
    let every = (retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match prodsys_db::prune_inbox(&db, retention, 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(schema = db.schema(), deleted = n, "inbox pruned"),
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "pruning the inbox failed")
            }
        }
    }
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    pub service: &'static str,
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
    server: JoinHandle<anyhow::Result<()>>,
    stopped: Option<JoinHandle<()>>,
}

impl Running {
    /// Waits until the gRPC server stops (after shutdown, or on failure) and,
    /// after shutdown, until the service has finished what it held, flushed
    /// its outbox and closed its broker connection.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.server.await.context("gRPC server task")?;
        if let Some(stopped) = self.stopped {
            if served.is_err() {
                stopped.abort();
            } else {
                let _ = stopped.await;
            }
        }
        served
    }
}

/// An outbox row carrying a protobuf payload.
pub fn outbox_event<M: prost::Message>(
    event_type: &str,
    subject: &str,
    message: &M,
) -> prodsys_db::OutboxEvent {
    prodsys_db::OutboxEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event_type.to_string(),
        subject: subject.to_string(),
        payload: message.encode_to_vec(),
        reply_to: None,
        content_type: prodsys_messaging::relay::CONTENT_TYPE_PROTOBUF.to_string(),
    }
}

/// A delivery decoded as one of our events, or the reason it cannot be.
pub fn decode_event<M: prost::Message + Default>(
    incoming: &prodsys_messaging::Incoming,
) -> Result<(uuid::Uuid, M), String> {
    let event = incoming.event.as_ref().map_err(Clone::clone)?;
    let id = uuid::Uuid::parse_str(&event.id)
        .map_err(|e| format!("CloudEvents id {:?} is not a UUID: {e}", event.id))?;
    let message = M::decode(incoming.body.as_slice())
        .map_err(|e| format!("{} payload does not decode: {e}", incoming.routing_key))?;
    Ok((id, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reserved_port_is_bound_by_its_server_and_by_no_one_else() {
        let reserved = reserve("127.0.0.1").unwrap();
        // Taken meanwhile: another bind of the port fails.
        assert!(std::net::TcpListener::bind(reserved).is_err());
        let (listener, addr) = bind("127.0.0.1", reserved.port()).await.unwrap();
        assert_eq!(addr, reserved);
        let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        tokio::net::TcpStream::connect(addr).await.unwrap();
        accepted.await.unwrap().unwrap();
        // Port 0 is still any free port.
        let (_, other) = bind("127.0.0.1", 0).await.unwrap();
        assert_ne!(other.port(), reserved.port());
    }
}
