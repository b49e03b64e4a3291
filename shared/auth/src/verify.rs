//! Checking a bearer JWT against the configured issuers: the issuer's keys
//! by OpenID Connect discovery (cached; fetched again, at most every
//! `jwks_refresh_min_s`, when a token names a key not among them), then the
//! signature, `iss`, `aud`, `exp` and `nbf` (with the leeway), and the
//! claims prodsys reads: `sub`, the preferred name, scopes, VOs and groups.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};

use crate::Denial;

/// What a verified token says of its bearer.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub name: String,
    pub scopes: BTreeSet<String>,
    pub vos: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

/// The configured issuers and their cached keys.
#[derive(Clone)]
pub struct Verifier {
    issuers: Arc<HashMap<String, Issuer>>,
    audience: String,
    leeway: u64,
    refresh_min: Duration,
    vo_claim: String,
    group_claim: String,
    http: reqwest::Client,
}

struct Issuer {
    url: String,
    keys: RwLock<Option<Keys>>,
    /// One fetch at a time.
    fetching: Mutex<()>,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

impl Verifier {
    pub fn new(
        settings: &prodsys_config::AuthSettings,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("tls.ca_file: reading {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("tls.ca_file: {} holds no PEM certificate", path.display())
            })? {
                http = http.add_root_certificate(cert);
            }
        }
        for issuer in &settings.issuers {
            if issuer.url.starts_with("http://") {
                tracing::warn!(
                    issuer = %issuer.url,
                    "the token issuer's keys are fetched over plain HTTP; use https:// outside tests"
                );
            }
        }
        let issuers = settings
            .issuers
            .iter()
            .map(|i| {
                (
                    i.url.clone(),
                    Issuer {
                        url: i.url.clone(),
                        keys: RwLock::new(None),
                        fetching: Mutex::new(()),
                    },
                )
            })
            .collect();
        Ok(Self {
            issuers: Arc::new(issuers),
            audience: settings.audience.clone(),
            leeway: settings.leeway_s,
            refresh_min: Duration::from_secs(settings.jwks_refresh_min_s),
            vo_claim: settings.vo_claim.clone(),
            group_claim: settings.group_claim.clone(),
            http: http
                .build()
                .context("building the HTTP client of the token issuers")?,
        })
    }

    /// The identity `token` proves, or why it proves none.
    pub async fn verify(&self, token: &str) -> Result<Identity, Denial> {
        let bad = |why: &str| Denial::Unauthenticated(format!("invalid bearer token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad("not a JWT"))?;
        let asymmetric = matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        );
        if !asymmetric {
            return Err(bad(&format!(
                "algorithm {:?} is not accepted (an issuer signs with its private key)",
                header.alg
            )));
        }
        let unverified = unverified_claims(token).ok_or_else(|| bad("its claims do not decode"))?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("it has no iss"))?;
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| bad(&format!("issuer {iss:?} is not trusted")))?;
        let kid = header.kid.as_deref().unwrap_or_default();
        let key = self.key(issuer, kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[iss]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => bad("expired (exp)"),
                    ErrorKind::ImmatureSignature => bad("not valid yet (nbf)"),
                    ErrorKind::InvalidAudience => {
                        bad(&format!("audience (aud) is not {:?}", self.audience))
                    }
                    ErrorKind::InvalidIssuer => bad("issuer (iss) does not match"),
                    ErrorKind::InvalidSignature => bad("signature does not verify"),
                    ErrorKind::MissingRequiredClaim(claim) => bad(&format!("no {claim} claim")),
                    ErrorKind::InvalidAlgorithm => bad("algorithm does not match the issuer's key"),
                    other => bad(&format!("{other:?}")),
                }
            })?;
        Ok(self.identity(&data.claims))
    }

    fn identity(&self, claims: &Map<String, Value>) -> Identity {
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut scopes: BTreeSet<String> = text("scope")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        scopes.extend(strings(claims.get("scp")));
        let groups: BTreeSet<String> = strings(claims.get(&self.group_claim)).collect();
        let vos: BTreeSet<String> = if self.vo_claim == "wlcg.groups" {
            strings(claims.get("wlcg.groups"))
                .filter_map(|g| {
                    g.trim_start_matches('/')
                        .split('/')
                        .next()
                        .filter(|vo| !vo.is_empty())
                        .map(str::to_string)
                })
                .collect()
        } else {
            strings(claims.get(&self.vo_claim)).collect()
        };
        let mut name = text("preferred_username");
        if name.is_empty() {
            name = text("name");
        }
        Identity {
            issuer: text("iss"),
            subject: text("sub"),
            name,
            scopes,
            vos,
            groups,
        }
    }

    /// The issuer's key `kid`: from the cache, or fetched again when the
    /// cache does not have it (not more often than `refresh_min`).
    async fn key(&self, issuer: &Issuer, kid: &str) -> Result<DecodingKey, Denial> {
        let find = |keys: &Keys| -> Option<Result<DecodingKey, Denial>> {
            let jwk = if kid.is_empty() {
                (keys.set.keys.len() == 1).then(|| &keys.set.keys[0])?
            } else {
                keys.set.find(kid)?
            };
            Some(DecodingKey::from_jwk(jwk).map_err(|e| {
                Denial::Unauthenticated(format!(
                    "invalid bearer token: key {kid:?} of {} is unusable: {e}",
                    issuer.url
                ))
            }))
        };
        if let Some(found) = issuer.keys.read().await.as_ref().and_then(find) {
            return found;
        }
        let _one = issuer.fetching.lock().await;
        // Another call may have fetched while this one waited.
        if let Some(keys) = issuer.keys.read().await.as_ref() {
            if let Some(found) = find(keys) {
                return found;
            }
            if keys.fetched.elapsed() < self.refresh_min {
                return Err(unknown_kid(kid, &issuer.url));
            }
        }
        let set = self.fetch(&issuer.url).await.map_err(|e| {
            tracing::warn!(issuer = %issuer.url, error = format!("{e:#}"), "fetching the issuer's keys failed");
            Denial::Unavailable(format!(
                "the keys of token issuer {} cannot be fetched; retry later",
                issuer.url
            ))
        })?;
        tracing::info!(issuer = %issuer.url, keys = set.keys.len(), "issuer keys fetched");
        let keys = Keys {
            set,
            fetched: Instant::now(),
        };
        let found = find(&keys);
        *issuer.keys.write().await = Some(keys);
        found.unwrap_or_else(|| Err(unknown_kid(kid, &issuer.url)))
    }

    async fn fetch(&self, issuer: &str) -> anyhow::Result<JwkSet> {
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let document: Value = self
            .http
            .get(&discovery)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {discovery}"))?
            .json()
            .await
            .with_context(|| format!("{discovery} is not JSON"))?;
        let jwks_uri = document
            .get("jwks_uri")
            .and_then(Value::as_str)
            .with_context(|| format!("{discovery} names no jwks_uri"))?;
        self.http
            .get(jwks_uri)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {jwks_uri}"))?
            .json()
            .await
            .with_context(|| format!("{jwks_uri} is not a JWK set"))
    }
}

fn unknown_kid(kid: &str, issuer: &str) -> Denial {
    Denial::Unauthenticated(format!(
        "invalid bearer token: key id (kid) {kid:?} is not among the keys of {issuer}"
    ))
}

/// A string or an array of strings.
fn strings(value: Option<&Value>) -> impl Iterator<Item = String> + '_ {
    let (one, many) = match value {
        Some(Value::String(s)) => (Some(s.clone()), None),
        Some(Value::Array(items)) => (None, Some(items.iter().filter_map(Value::as_str))),
        _ => (None, None),
    };
    one.into_iter()
        .chain(many.into_iter().flatten().map(str::to_string))
}

/// The claims of a JWT before its signature is checked: only to find which
/// issuer's keys check it.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
