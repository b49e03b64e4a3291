//! `[auth]` and `[tls]`: who may call the services, and how the ports and
//! the clients between services are secured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Bearer tokens of the WLCG JWT profile (as INDIGO IAM and DiracX issue
/// them), or the development mode without tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// No tokens: every caller may do everything, and a request's declared
    /// `submitter` counts. Allowed only while every port is bound to a
    /// loopback address; the log and the dashboard say so.
    pub dev_mode: bool,
    /// Issuers whose tokens are accepted (`[[auth.issuers]]`, or URLs
    /// separated by commas, as `PRODSYS__AUTH__ISSUERS` gives them); their
    /// keys come from OpenID Connect discovery.
    #[serde(deserialize_with = "issuers")]
    pub issuers: Vec<IssuerSettings>,
    /// The `aud` a token must carry (one of its audiences).
    pub audience: String,
    /// Claim naming the caller's VOs: `wlcg.groups` (each group's first
    /// path component is a VO: `/vo.cta.in2p3.fr/production` is VO
    /// `vo.cta.in2p3.fr`), or a claim holding the VO name(s), as DiracX's `vo`.
    pub vo_claim: String,
    /// Claim holding the caller's groups (a string or an array of strings):
    /// `wlcg.groups`, or DiracX's `dirac_group`.
    pub group_claim: String,
    /// Per VO, the group whose members may cancel any production of the VO
    /// (`[auth.production_managers]`, `"vo.cta.in2p3.fr" = "/vo.cta.in2p3.fr/production"`;
    /// or `vo=group` pairs separated by commas, as `PRODSYS__AUTH__PRODUCTION_MANAGERS`
    /// gives them, VO names holding dots).
    #[serde(deserialize_with = "managers")]
    pub production_managers: BTreeMap<String, String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_s: u64,
    /// Shortest time between two fetches of an issuer's keys when a token
    /// names a key (`kid`) that is not among them.
    pub jwks_refresh_min_s: u64,
    /// The bearer the services present to each other when no caller's token
    /// is being passed on (a consumer asking the catalog, say): a secret
    /// shared by the services, from `internal_token_file` or this value.
    #[serde(
        default,
        serialize_with = "crate::expose_optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub internal_token: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_token_file: Option<PathBuf>,
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// The issuer URL, exactly as its tokens' `iss` has it;
    /// `<url>/.well-known/openid-configuration` names its keys.
    pub url: String,
}

/// Issuers as TOML tables, as URLs, or as one string of URLs separated by
/// commas (from the environment).
fn issuers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IssuerSettings>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum One {
        Url(String),
        Table(IssuerSettings),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Many {
        Text(String),
        List(Vec<One>),
    }
    Ok(match Many::deserialize(d)? {
        Many::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| IssuerSettings { url: url.into() })
            .collect(),
        Many::List(items) => items
            .into_iter()
            .map(|one| match one {
                One::Url(url) => IssuerSettings { url },
                One::Table(table) => table,
            })
            .collect(),
    })
}

/// Production-manager groups as a TOML table, or as one string of
/// `vo=group` pairs separated by commas (from the environment).
fn managers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Managers {
        Text(String),
        Table(BTreeMap<String, String>),
    }
    match Managers::deserialize(d)? {
        Managers::Table(table) => Ok(table),
        Managers::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                pair.split_once('=')
                    .map(|(vo, group)| (vo.trim().to_string(), group.trim().to_string()))
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "auth.production_managers: {pair:?} is not vo=group"
                        ))
                    })
            })
            .collect(),
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            dev_mode: true,
            issuers: Vec::new(),
            audience: "prodsys".into(),
            vo_claim: "wlcg.groups".into(),
            group_claim: "wlcg.groups".into(),
            production_managers: BTreeMap::new(),
            leeway_s: 30,
            jwks_refresh_min_s: 10,
            internal_token: None,
            internal_token_file: None,
        }
    }
}

impl AuthSettings {
    /// Whether the settings make sense: with tokens on, at least one issuer
    /// and an audience.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.dev_mode {
            return Ok(());
        }
        if self.issuers.is_empty() {
            return Err(ConfigError(
                "auth.issuers: tokens are on (auth.dev_mode = false) but no issuer is configured"
                    .into(),
            ));
        }
        if self.audience.is_empty() {
            return Err(ConfigError(
                "auth.audience: tokens are on but no audience is configured".into(),
            ));
        }
        for (i, issuer) in self.issuers.iter().enumerate() {
            if !(issuer.url.starts_with("https://") || issuer.url.starts_with("http://")) {
                return Err(ConfigError(format!(
                    "auth.issuers[{i}].url: {:?} is not an http(s) URL",
                    issuer.url
                )));
            }
        }
        if self.internal_token.is_some() && self.internal_token_file.is_some() {
            return Err(ConfigError(
                "auth.internal_token and auth.internal_token_file: give one, not both".into(),
            ));
        }
        Ok(())
    }
}

/// TLS (rustls) of every service port, gRPC and HTTP alike, and the CA the
/// clients between services verify the servers against.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the server; with `key_file`, every port
    /// speaks TLS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA certificate(s) clients verify servers against (the services'
    /// `https://` URLs of each other, and the token issuers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM CA certificate(s) client certificates must chain to: with it,
    /// every port requires a client certificate (mutual TLS), gRPC and HTTP
    /// alike. Needs `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// PEM certificate chain the service presents when it calls another
    /// service over `https://` and is asked for one; default `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`; default `key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether the ports speak TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(ConfigError(
                "tls.key_file: tls.cert_file is set but its key is not".into(),
            )),
            (None, Some(_)) => Err(ConfigError(
                "tls.cert_file: tls.key_file is set but its certificate is not".into(),
            )),
            _ => Ok(()),
        }?;
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => Err(ConfigError(
                "tls.client_key_file: tls.client_cert_file is set but its key is not".into(),
            )),
            (None, Some(_)) => Err(ConfigError(
                "tls.client_cert_file: tls.client_key_file is set but its certificate is not"
                    .into(),
            )),
            _ => Ok(()),
        }?;
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            return Err(ConfigError(
                "tls.client_ca_file: client certificates need TLS, and tls.cert_file is not set"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether every port requires a client certificate.
    pub fn client_certificates_required(&self) -> bool {
        self.client_ca_file.is_some()
    }

    /// The certificate and key the service presents to the services it
    /// calls: `client_cert_file` and `client_key_file`, else the server's
    /// own `cert_file` and `key_file`.
    pub fn client_identity(&self) -> Option<ClientIdentity<'_>> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_file: cert,
                cert_setting: "tls.client_cert_file",
                key_file: key,
                key_setting: "tls.client_key_file",
            }),
            _ => match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => Some(ClientIdentity {
                    cert_file: cert,
                    cert_setting: "tls.cert_file",
                    key_file: key,
                    key_setting: "tls.key_file",
                }),
                _ => None,
            },
        }
    }
}

/// A client certificate and its key, with the settings that named them
/// (for errors).
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    pub cert_file: &'a Path,
    pub cert_setting: &'static str,
    pub key_file: &'a Path,
    pub key_setting: &'static str,
}
