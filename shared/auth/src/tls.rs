//! TLS (rustls) of the service ports and of the clients between services.
//!
//! A port with `tls.cert_file` and `tls.key_file` speaks TLS only, offering
//! both HTTP/2 (gRPC) and HTTP/1.1 (browsers, scrapers, curl) by ALPN, as
//! the same port serves both in plain text. With `tls.client_ca_file` it
//! requires a client certificate of that CA too. Clients of `https://` URLs
//! verify the server against `tls.ca_file` and present the client
//! certificate of `tls.client_cert_file` (else `tls.cert_file`) when asked.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::{Channel, Credentials};

/// The server configuration of `settings`, or `None` without TLS. With
/// `tls.client_ca_file`, every connection must present a client certificate
/// that chains to it.
pub fn server_config(
    settings: &prodsys_config::TlsSettings,
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    settings.check()?;
    let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
        return Ok(None);
    };
    let certs = read_certs(cert_file, "tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("tls.key_file: no PEM private key in {}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &settings.client_ca_file {
        Some(client_ca_file) => {
            builder.with_client_cert_verifier(client_verifier(client_ca_file, provider)?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("tls.cert_file and tls.key_file do not make a server identity")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Accepts only clients whose certificate chains to the CA(s) of
/// `client_ca_file`; a client without a certificate is refused.
fn client_verifier(
    client_ca_file: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(client_ca_file, "tls.client_ca_file")? {
        roots.add(cert).with_context(|| {
            format!(
                "tls.client_ca_file: {} holds a certificate that is not a CA",
                client_ca_file.display()
            )
        })?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .with_context(|| {
            format!(
                "tls.client_ca_file: {} does not make a client certificate verifier",
                client_ca_file.display()
            )
        })
}

/// A client certificate chain and its key, read and checked (PEM, the key
/// that of the certificate).
#[derive(Clone)]
pub struct ClientCertificate {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("ClientCertificate").finish_non_exhaustive()
    }
}

impl ClientCertificate {
    /// Reads `cert_file` and `key_file`; an error names `cert_setting` or
    /// `key_setting` (the setting or flag that gave the file).
    pub fn from_files(
        cert_file: &Path,
        cert_setting: &str,
        key_file: &Path,
        key_setting: &str,
    ) -> anyhow::Result<Self> {
        let certs = read_certs(cert_file, cert_setting)?;
        let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
            format!(
                "{key_setting}: no PEM private key in {}",
                key_file.display()
            )
        })?;
        rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
            .with_context(|| {
                format!("{cert_setting} and {key_setting} do not make a client identity")
            })?;
        let read = |path: &Path, setting: &str| {
            std::fs::read(path).with_context(|| format!("{setting}: reading {}", path.display()))
        };
        Ok(Self {
            cert_pem: read(cert_file, cert_setting)?,
            key_pem: read(key_file, key_setting)?,
        })
    }

    /// The certificate the services present to each other (see
    /// [`prodsys_config::TlsSettings::client_identity`]), or `None`.
    pub fn from_settings(settings: &prodsys_config::TlsSettings) -> anyhow::Result<Option<Self>> {
        settings.check()?;
        settings
            .client_identity()
            .map(|id| Self::from_files(id.cert_file, id.cert_setting, id.key_file, id.key_setting))
            .transpose()
    }

    fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{key}: reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: {} is not PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{key}: {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

/// A TLS connection accepted on a port.
pub struct TlsIo(TlsStream<TcpStream>);

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

/// The TLS connections of `listener`: each handshake runs on its own task
/// (a slow or silent client holds up no other), and one that fails is
/// logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = io::Result<TlsIo>> + Send + 'static {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsIo>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsIo(stream))).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An endpoint of `url`: `https://` verified against `ca_file`.
pub fn endpoint(
    url: &str,
    ca_file: Option<&Path>,
    what: &str,
) -> anyhow::Result<tonic::transport::Endpoint> {
    client_endpoint(url, ca_file, None, what)
}

/// An endpoint of `url`: `https://` verified against `ca_file`, presenting
/// `certificate` when the server asks for one.
pub fn client_endpoint(
    url: &str,
    ca_file: Option<&Path>,
    certificate: Option<&ClientCertificate>,
    what: &str,
) -> anyhow::Result<tonic::transport::Endpoint> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("{what}: {url:?} is not a URL"))?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca_file = ca_file.with_context(|| {
        format!("{what}: {url} is https, and tls.ca_file (the CA to verify it against) is not set")
    })?;
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("tls.ca_file: reading {}", ca_file.display()))?;
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem));
    if let Some(certificate) = certificate {
        config = config.identity(certificate.identity());
    }
    endpoint
        .tls_config(config)
        .with_context(|| format!("{what}: TLS configuration"))
}

/// A lazily connected channel to another service at `url` whose calls carry
/// `credentials`, verifying an `https://` server against `tls.ca_file` and
/// presenting `certificate` when asked for one.
pub fn channel(
    url: &str,
    settings: &prodsys_config::Settings,
    certificate: Option<&ClientCertificate>,
    what: &str,
    timeout: Option<Duration>,
    credentials: Credentials,
) -> anyhow::Result<Channel> {
    let mut endpoint = client_endpoint(url, settings.tls.ca_file.as_deref(), certificate, what)?
        .connect_timeout(Duration::from_secs(5));
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint.connect_lazy();
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        credentials,
    ))
}
