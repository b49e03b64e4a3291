//! The supervised AMQP connection. One task owns it: connects, declares the
//! topology, watches for loss, and reconnects with capped exponential backoff.
//! Everyone else asks for a fresh channel, waiting while the broker is away.
//! lapin's own auto-recovery is deliberately not used: the supervisor knows
//! the topology and the health flag, and consumers rebuild their own state.
//! `amqps://` connections trust a private CA and present a client
//! certificate as [`tls_config`] reads them from the settings.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::{Backoff, Topology};

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    tls: OwnedTLSConfig,
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
        Self::start_with_tls(url, OwnedTLSConfig::default(), topology, shutdown).await
    }

    /// As [`Broker::start`], an `amqps://` broker trusted and answered as `tls` says.
    pub async fn start_with_tls(
        url: &str,
        tls: OwnedTLSConfig,
        topology: Topology,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (connected, _) = watch::channel(false);
        let (generation, _) = watch::channel(0);
        let broker = Broker {
            inner: Arc::new(Inner {
                url: url.to_string(),
                tls,
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
            Connection::connect_with_config(
                &self.inner.url,
                properties,
                self.inner.tls.clone(),
                lapin::runtime::default_runtime()?,
            ),
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

/// The TLS of `amqps://` connections the settings describe: `amqp.ca_file`
/// (trusted besides the web PKI roots) and the client certificate
/// `amqp.cert_file` with `amqp.key_file`. Each file is read and checked
/// now, so a wrong one stops the service at start, named.
pub fn tls_config(settings: &prodsys_config::AmqpSettings) -> anyhow::Result<OwnedTLSConfig> {
    tls_from_files(
        settings.ca_file.as_deref(),
        settings.cert_file.as_deref(),
        settings.key_file.as_deref(),
    )
}

/// As [`tls_config`], from the files themselves.
pub fn tls_from_files(
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> anyhow::Result<OwnedTLSConfig> {
    let mut tls = OwnedTLSConfig::default();
    if let Some(ca_file) = ca_file {
        let pem = read_pem(ca_file, "amqp.ca_file")?;
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("amqp.ca_file: {} is not PEM: {e}", ca_file.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "amqp.ca_file: {} holds no certificate",
            ca_file.display()
        );
        tls.cert_chain = Some(pem);
    }
    match (cert_file, key_file) {
        (None, None) => {}
        (Some(cert_file), Some(key_file)) => {
            let pem = read_pem(cert_file, "amqp.cert_file")?;
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!("amqp.cert_file: {} is not PEM: {e}", cert_file.display())
                })?;
            anyhow::ensure!(
                !certs.is_empty(),
                "amqp.cert_file: {} holds no certificate",
                cert_file.display()
            );
            let key = read_pem(key_file, "amqp.key_file")?;
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
                anyhow::anyhow!(
                    "amqp.key_file: {} holds no PEM private key: {e}",
                    key_file.display()
                )
            })?;
            tls.identity = Some(OwnedIdentity::PKCS8 {
                pem: pem.into_bytes(),
                key: key.into_bytes(),
            });
        }
        (Some(_), None) => anyhow::bail!("amqp.key_file: amqp.cert_file is set but its key is not"),
        (None, Some(_)) => {
            anyhow::bail!("amqp.cert_file: amqp.key_file is set but its certificate is not")
        }
    }
    Ok(tls)
}

fn read_pem(path: &Path, key: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{key}: reading {}", path.display()))
}

/// Refuses TLS settings for a broker URL that is not `amqps://`: they
/// would be ignored, and the connection would be plain text.
pub fn check_tls_url(url: &str, tls: &OwnedTLSConfig, what: &str) -> anyhow::Result<()> {
    if (tls.cert_chain.is_some() || tls.identity.is_some()) && !url.starts_with("amqps://") {
        anyhow::bail!(
            "amqp.ca_file / amqp.cert_file are set, but {what} is not an amqps:// URL: the connection would not use TLS"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_tls_files_are_read_and_named_when_wrong() {
        let dir = std::env::temp_dir().join(format!("prodsys-amqp-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let none = tls_config(&prodsys_config::AmqpSettings::default()).unwrap();
        assert_eq!(none, OwnedTLSConfig::default());
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let settings = prodsys_config::AmqpSettings {
            ca_file: Some(not_pem.clone()),
            ..Default::default()
        };
        let error = tls_config(&settings).unwrap_err().to_string();
        assert!(error.contains("amqp.ca_file"), "{error}");
        let settings = prodsys_config::AmqpSettings {
            cert_file: Some(not_pem),
            ..Default::default()
        };
        let error = tls_config(&settings).unwrap_err().to_string();
        assert!(error.contains("amqp.key_file"), "{error}");
        let settings = prodsys_config::AmqpSettings {
            ca_file: Some(dir.join("missing.pem")),
            ..Default::default()
        };
        let error = tls_config(&settings).unwrap_err().to_string();
        assert!(error.contains("missing.pem"), "{error}");
        let tls = OwnedTLSConfig {
            cert_chain: Some(String::new()),
            identity: None,
        };
        assert!(check_tls_url("amqp://h/%2f", &tls, "amqp.url").is_err());
        assert!(check_tls_url("amqps://h/%2f", &tls, "amqp.url").is_ok());
        assert!(check_tls_url("amqp://h/%2f", &OwnedTLSConfig::default(), "amqp.url").is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
