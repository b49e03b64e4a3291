//! What every prodsys service process shares besides the database and the
//! broker: binding and serving gRPC with `grpc.health.v1` and server
//! reflection, keeping health true to whether PostgreSQL and the broker
//! answer, and the one mapping from the boundary error to `tonic::Status`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use prodsys_core::Violation;
use prodsys_db::Db;
use prodsys_messaging::Broker;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
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
            ServiceError::Unexpected(error) if connection_lost(&error) => {
                tracing::warn!(error = format!("{error:#}"), "database connection lost");
                tonic::Status::unavailable(format!("database connection lost, retry: {error:#}"))
            }
            ServiceError::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                tonic::Status::internal(format!("internal error: {error:#}"))
            }
        }
    }
}

/// Whether `error` is a lost database connection (worth a retry), not a bug.
fn connection_lost(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<prodsys_db::tokio_postgres::Error>()
            .is_some_and(|e| {
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        let code = c.code();
                        // 08: connection exception; 57P01..57P03: shutdown, crash, cannot connect now.
                        code.starts_with("08") || code.starts_with("57P")
                    })
            })
            || cause
                .downcast_ref::<prodsys_db::deadpool_postgres::PoolError>()
                .is_some()
    })
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

/// A bound gRPC listener, its address known before serving (port 0 works).
pub async fn bind(host: &str, port: u16) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding gRPC on {host}:{port}"))?;
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

/// Serves `routes` on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            // HTTP/1.1 too: the status service's dashboard and /metrics are
            // read by browsers and scrapers on the same port.
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(tower::util::MapResponseLayer::new(
                undecodable_is_invalid_argument,
            ))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
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
/// the database answers and the broker is connected.
pub fn track_health(
    reporter: HealthReporter,
    services: &[&'static str],
    db: Db,
    broker: Broker,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let services: Vec<&'static str> = std::iter::once("")
        .chain(services.iter().copied())
        .collect();
    tokio::spawn(async move {
        let mut broker_state = broker.connected();
        let mut last = None;
        loop {
            let healthy = broker.is_connected() && db.ping().await;
            if last != Some(healthy) {
                let status = if healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in &services {
                    reporter.set_service_status(*name, status).await;
                }
                tracing::info!(healthy, "health changed");
                last = Some(healthy);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = broker_state.changed() => {}
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

/// The parts every service starts the same way: its migrated schema, its
/// supervised broker connection with its topology, and its outbox relay.
#[derive(Clone, Debug)]
pub struct Foundation {
    pub service: &'static str,
    pub db: Db,
    pub broker: Broker,
    pub names: prodsys_messaging::Names,
}

impl Foundation {
    /// Migrates the service's schema, connects to the broker (declaring the
    /// queue bound to `bindings` on `prodsys.events` and `ingest_bindings` on
    /// `prodsys.ingest`) and starts the outbox relay.
    pub async fn start(
        settings: &prodsys_config::Settings,
        service: &'static str,
        migrations: &[prodsys_db::Migration],
        bindings: &[&str],
        ingest_bindings: &[&str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let db = Db::new(
            settings.database.url(),
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
        let broker = Broker::start(settings.amqp.url(), topology, shutdown.clone()).await?;
        let publisher = prodsys_messaging::Publisher::new(
            broker.clone(),
            Duration::from_millis(settings.amqp.confirm_timeout_ms),
        );
        tokio::spawn(prodsys_messaging::relay::run_relay(
            db.clone(),
            publisher,
            names.clone(),
            format!("/prodsys/{service}"),
            shutdown.clone(),
        ));
        Ok(Self {
            service,
            db,
            broker,
            names,
        })
    }

    /// Consumes the service's queue with `handler` until `shutdown`.
    pub fn consume<H: prodsys_messaging::BatchHandler>(
        &self,
        settings: &prodsys_config::Settings,
        handler: H,
        shutdown: &CancellationToken,
    ) -> JoinHandle<()> {
        let consumer = prodsys_messaging::consumer::ConsumerSettings {
            queue: self.names.queue(self.service),
            prefetch: settings.amqp.prefetch,
            batch_size: settings.amqp.batch_size,
            confirm_timeout: Duration::from_millis(settings.amqp.confirm_timeout_ms),
        };
        tokio::spawn(prodsys_messaging::run_consumer(
            self.broker.clone(),
            consumer,
            handler,
            shutdown.clone(),
        ))
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
    ) -> Vec<JoinHandle<()>> {
        let handler = std::sync::Arc::new(handler);
        (0..consumers.max(1))
            .map(|_| self.consume(settings, handler.clone(), shutdown))
            .collect()
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
        track_health(
            reporter,
            services,
            self.db.clone(),
            self.broker.clone(),
            shutdown.clone(),
        );
        let server = serve(listener, routes, shutdown.clone());
        tracing::info!(service = self.service, %addr, "serving gRPC");
        Ok(Running {
            service: self.service,
            addr,
            server,
        })
    }
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    pub service: &'static str,
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the gRPC server stops (after shutdown, or on failure).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await.context("gRPC server task")?
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
