//! TLS to PostgreSQL (rustls), configured the way libpq is: `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` in the query of the database URL
//! (`postgres://prodsys@db.example.org/prodsys?sslmode=verify-full&sslrootcert=/etc/prodsys/db-ca.pem`).
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | (none), `disable` | never | — |
//! | `prefer` | when the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, as `verify-ca` (as libpq does) |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | signed by a CA of `sslrootcert`, and issued for the URL's host |
//!
//! `sslcert` and `sslkey` (PEM) are a client certificate for servers that
//! ask for one (`clientcert=verify-full` in `pg_hba.conf`). The session's
//! `tls-server-end-point` channel binding is offered, so SCRAM
//! authentication can be bound to the TLS session (`channel_binding=require`
//! refuses a server that does not bind it).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`: the other
//! parameters are taken off the URL here, and it sees the mode it knows.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// How a connection uses TLS (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => anyhow::bail!(
                "database URL: sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

/// The TLS parameters of a database URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: Option<SslMode>,
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate chain and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The parameters taken off the URL here.
pub const TLS_PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `url` into what tokio-postgres reads and its TLS parameters: a
/// `postgres://` URL's query parameters, or words of a `key=value`
/// connection string.
pub fn split_url(url: &str) -> anyhow::Result<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    let mut take = |key: &str, value: String| -> anyhow::Result<bool> {
        match key {
            "sslmode" => options.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => options.root_cert = Some(PathBuf::from(value)),
            "sslcert" => options.cert = Some(PathBuf::from(value)),
            "sslkey" => options.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        if url.contains(['\'', '\\']) {
            // Quoted values: tokio-postgres reads them, and TLS words here would be misread.
            if TLS_PARAMETERS.iter().any(|k| url.contains(k)) {
                anyhow::bail!(
                    "database URL: give TLS parameters (sslmode, sslrootcert, sslcert, sslkey) in a postgres:// URL, or in words without quotes"
                );
            }
            return Ok((url.to_string(), options));
        }
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if !take(key, value.to_string())? {
                kept.push(word);
            }
        }
        return Ok((kept.join(" "), options));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), options));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .with_context(|| format!("database URL: {key} is not percent-encoded UTF-8"))?;
        if !take(key, value)? {
            kept.push(pair);
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, options))
}

fn percent_decode(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .context("a % without two hex digits")?;
                out.push(u8::from_str_radix(hex, 16).context("a % without two hex digits")?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Ok(String::from_utf8(out)?)
}

/// The connector of `options`, and the mode tokio-postgres is told.
pub fn connector(options: &TlsOptions) -> anyhow::Result<(tokio_postgres::config::SslMode, PgTls)> {
    use tokio_postgres::config::SslMode as Pg;
    let mode = match options.mode {
        Some(mode) => mode,
        None => {
            if let Some(key) = [
                ("sslrootcert", options.root_cert.is_some()),
                ("sslcert", options.cert.is_some()),
                ("sslkey", options.key.is_some()),
            ]
            .into_iter()
            .find_map(|(key, given)| given.then_some(key))
            {
                anyhow::bail!(
                    "database URL: {key} is given but sslmode is not (say sslmode=verify-full, verify-ca or require)"
                );
            }
            SslMode::Disable
        }
    };
    if mode == SslMode::Disable {
        return Ok((Pg::Disable, PgTls { config: None }));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, &options.root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => anyhow::bail!(
            "database URL: sslmode={} needs sslrootcert, the CA file the server's certificate is checked against",
            if mode == SslMode::VerifyCa {
                "verify-ca"
            } else {
                "verify-full"
            }
        ),
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(Unchecked(provider.clone()))
        }
        (_, Some(root_cert)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(root_cert, "sslrootcert")? {
                roots.add(cert).with_context(|| {
                    format!(
                        "database URL: sslrootcert {} holds a certificate that cannot be read",
                        root_cert.display()
                    )
                })?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .context("database URL: sslrootcert")?;
            if mode == SslMode::VerifyFull {
                webpki as Arc<dyn ServerCertVerifier>
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&options.cert, &options.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
                format!(
                    "database URL: sslkey {} holds no PEM private key",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("database URL: sslcert and sslkey do not make a client identity")?
        }
        (Some(_), None) => anyhow::bail!("database URL: sslcert is given but its sslkey is not"),
        (None, Some(_)) => anyhow::bail!("database URL: sslkey is given but its sslcert is not"),
    };
    Ok((
        if mode == SslMode::Prefer {
            Pg::Prefer
        } else {
            Pg::Require
        },
        PgTls {
            config: Some((Arc::new(config), mode == SslMode::VerifyFull)),
        },
    ))
}

fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("database URL: {key}: reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("database URL: {key}: {} is not PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "database URL: {key}: {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

/// `require` and `prefer` without a CA: the session is encrypted and its
/// handshake signatures checked, but anyone's certificate is taken.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the name the certificate is issued for is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Makes the TLS connections of a pool (none when the mode is `disable`).
#[derive(Clone)]
pub struct PgTls {
    /// The client configuration, and whether the host name must match.
    config: Option<(Arc<rustls::ClientConfig>, bool)>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("enabled", &self.config.is_some())
            .finish()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        // Checked when the handshake starts: a Unix socket (no host name)
        // never gets that far, since PostgreSQL speaks no TLS over one.
        Ok(PgTlsConnect {
            config: self.config.clone(),
            domain: domain.to_string(),
        })
    }
}

/// One connection's handshake.
pub struct PgTlsConnect {
    config: Option<(Arc<rustls::ClientConfig>, bool)>,
    domain: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let (config, check_name) = self
                .config
                .ok_or_else(|| io::Error::other("TLS to the database is not configured"))?;
            let name = match ServerName::try_from(self.domain.clone()) {
                Ok(name) => name,
                Err(_) if !check_name => ServerName::try_from("postgresql.invalid")
                    .map_err(io::Error::other)?
                    .to_owned(),
                Err(error) => {
                    return Err(io::Error::other(format!(
                        "sslmode=verify-full: {:?} is not a host name to check the certificate against: {error}",
                        self.domain
                    )));
                }
            };
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
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
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, connection) = self.0.get_ref();
        connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| tls_server_end_point(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// RFC 5929's `tls-server-end-point`: the server certificate hashed with its
/// signature's hash (SHA-256 for MD5 and SHA-1); `None` for a signature
/// algorithm without one (Ed25519, RSA-PSS), for which no binding is offered.
fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: [u8; 6] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (certificate, _) = der(cert, 0x30)?;
    let (_, rest) = der(certificate, 0x30)?;
    let (algorithm, _) = der(rest, 0x30)?;
    let (oid, _) = der(algorithm, 0x06)?;
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let hash = match oid {
        [rsa @ .., last] if *rsa == RSA => match last {
            0x04 | 0x05 | 0x0b => Hash::Sha256,
            0x0c => Hash::Sha384,
            0x0d => Hash::Sha512,
            _ => return None,
        },
        [ecdsa @ .., 0x01] if *ecdsa == ECDSA => Hash::Sha256,
        [ecdsa @ .., 0x03, last] if *ecdsa == ECDSA => match last {
            0x02 => Hash::Sha256,
            0x03 => Hash::Sha384,
            0x04 => Hash::Sha512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The contents of the DER element of `tag` at the start of `input`, and what follows it.
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        (
            bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)),
            rest,
        )
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_are_taken_off_the_url() {
        let (url, options) = split_url(
            "postgres://u@db:5433/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20one.pem&channel_binding=require",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@db:5433/x?application_name=a&channel_binding=require"
        );
        assert_eq!(options.mode, Some(SslMode::VerifyFull));
        assert_eq!(options.root_cert, Some(PathBuf::from("/etc/ca one.pem")));
        let (url, options) = split_url("postgres://u@db/x?sslmode=require").unwrap();
        assert_eq!(url, "postgres://u@db/x");
        assert_eq!(options.mode, Some(SslMode::Require));
        let (words, options) = split_url("host=db user=u sslmode=require").unwrap();
        assert_eq!(words, "host=db user=u");
        assert_eq!(options.mode, Some(SslMode::Require));
        assert!(split_url("host=db password='a b' sslmode=require").is_err());
        let error = split_url("postgres://u@db/x?sslmode=verify").unwrap_err();
        assert!(error.to_string().contains("sslmode"), "{error}");
    }

    #[test]
    fn a_mode_that_verifies_needs_its_ca_and_a_ca_needs_a_mode() {
        let (mode, tls) = connector(&TlsOptions::default()).unwrap();
        assert_eq!(mode, tokio_postgres::config::SslMode::Disable);
        assert!(tls.config.is_none());
        let verify = TlsOptions {
            mode: Some(SslMode::VerifyFull),
            ..TlsOptions::default()
        };
        let error = connector(&verify).unwrap_err().to_string();
        assert!(error.contains("sslrootcert"), "{error}");
        let no_mode = TlsOptions {
            root_cert: Some("/nonexistent.pem".into()),
            ..TlsOptions::default()
        };
        let error = connector(&no_mode).unwrap_err().to_string();
        assert!(error.contains("sslmode"), "{error}");
        let missing = TlsOptions {
            mode: Some(SslMode::VerifyCa),
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        let error = format!("{:#}", connector(&missing).unwrap_err());
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let (mode, tls) = connector(&TlsOptions {
            mode: Some(SslMode::Require),
            ..TlsOptions::default()
        })
        .unwrap();
        assert_eq!(mode, tokio_postgres::config::SslMode::Require);
        assert!(tls.config.is_some());
    }

    #[test]
    fn the_channel_binding_hashes_with_the_signature_hash() {
        // A self-signed ECDSA P-256 / SHA-256 certificate.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            tls_server_end_point(&der),
            Some(sha2::Sha256::digest(&der).to_vec())
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            tls_server_end_point(&der),
            Some(sha2::Sha384::digest(&der).to_vec())
        );
        assert_eq!(tls_server_end_point(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(tls_server_end_point(b""), None);
    }
}
