//! The supervised AMQP connection. One task owns it: connects, declares the
//! topology, watches for loss, and reconnects with capped exponential backoff.
//! Everyone else asks for a fresh channel, waiting while the broker is away.
//! lapin's own auto-recovery is deliberately not used: the supervisor knows
//! the topology and the health flag, and consumers rebuild their own state.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::{Backoff, Topology};

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    topology: Topology,
    connection: Mutex<Option<Connection>>,
    connected: watch::Sender<bool>,
    /// Bumped on every new connection, so users notice a reconnect.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("service", &self.inner.topology.service)
            .finish_non_exhaustive()
    }
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Broker {
    /// Starts the supervisor and waits (until `shutdown`) for the first connection.
    pub async fn start(
        url: &str,
        topology: Topology,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (connected, _) = watch::channel(false);
        let (generation, _) = watch::channel(0);
        let broker = Broker {
            inner: Arc::new(Inner {
                url: url.to_string(),
                topology,
                connection: Mutex::new(None),
                connected,
                generation,
            }),
        };
        let supervisor = broker.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { supervisor.supervise(stop).await });
        let mut up = broker.inner.connected.subscribe();
        tokio::select! {
            result = up.wait_for(|c| *c) => { result.context("broker supervisor stopped")?; }
            _ = shutdown.cancelled() => anyhow::bail!("shut down before the broker was reached"),
        }
        Ok(broker)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Follows whether the broker is reachable right now.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// A new channel on the live connection, waiting for a reconnect if needed.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut up = self.inner.connected.subscribe();
        tokio::time::timeout(Duration::from_secs(30), up.wait_for(|c| *c))
            .await
            .context("broker unreachable for 30 s")?
            .context("broker supervisor stopped")?;
        let guard = self.inner.connection.lock().await;
        let connection = guard.as_ref().context("no broker connection")?;
        let channel = connection.create_channel().await;
        drop(guard);
        match channel {
            Ok(channel) => Ok(channel),
            Err(error) => {
                // The supervisor may not have noticed yet; tell it.
                self.inner.connected.send_replace(false);
                Err(error).context("opening a channel")
            }
        }
    }

    async fn supervise(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let service = self.inner.topology.service.clone();
        loop {
            let attempt = tokio::select! {
                result = self.connect() => result,
                _ = shutdown.cancelled() => break,
            };
            match attempt {
                Ok(connection) => {
                    backoff.reset();
                    let mut events = connection.events_listener();
                    *self.inner.connection.lock().await = Some(connection);
                    self.inner.generation.send_modify(|g| *g += 1);
                    self.inner.connected.send_replace(true);
                    tracing::info!(%service, "broker connected");
                    let mut ticker = tokio::time::interval(Duration::from_millis(500));
                    let mut flag = self.inner.connected.subscribe();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            event = events.next() => {
                                if let Some(lapin::Event::Error(error)) = event {
                                    tracing::warn!(%service, %error, "broker connection error");
                                    break;
                                }
                                if event.is_none() { break; }
                            }
                            _ = ticker.tick() => {
                                let alive = self.inner.connection.lock().await
                                    .as_ref().is_some_and(|c| c.status().connected());
                                if !alive { break; }
                            }
                            changed = flag.changed() => {
                                let down = changed.is_err() || !*flag.borrow();
                                if down { break; }
                            }
                        }
                    }
                    self.inner.connected.send_replace(false);
                    if let Some(old) = self.inner.connection.lock().await.take() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            old.close(200, "reconnecting".into()),
                        )
                        .await;
                    }
                    if shutdown.is_cancelled() {
                        break;
                    }
                    tracing::warn!(%service, "broker connection lost; reconnecting");
                }
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(%service, error = format!("{error:#}"), retry_in_ms = wait.as_millis() as u64, "broker unreachable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.inner.connected.send_replace(false);
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        // The prefix in the name tells deployments sharing a broker apart in its admin tools.
        let topology = &self.inner.topology;
        let name = match topology.names.prefix.as_str() {
            "" => format!("prodsys-{}", topology.service),
            prefix => format!("prodsys-{}@{prefix}", topology.service),
        };
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&self.inner.url, properties),
        )
        .await
        .context("connecting timed out")?
        .context("connecting to the broker")?;
        let channel = connection.create_channel().await?;
        self.inner
            .topology
            .declare(&channel)
            .await
            .context("declaring the topology")?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(connection)
    }
}
