//! The `rucio` forwarding destination: a file is first put on the storage
//! destination the Rucio RSE describes (or found there, verified, when its
//! production forwards there too), then registered on the Rucio server —
//! replica with its PFN, bytes and adler32 (and its catalog metadata), in
//! the production's dataset, under the dataset's replication rule when one
//! is configured.
//!
//! Registrations are gathered into bulk calls: every file claimed at about
//! the same time goes in one `POST /dids/attachments` naming the RSE, which
//! adds the files, their replicas and their attachment to the dataset in
//! one transaction (Rucio's own way of registering replicas with their
//! dataset), two batches under way at once. Rucio refuses such a call when
//! it knows one of the files with other bytes: only then are the batch's
//! files looked up, the conflicts reported and the others registered.
//! Every step is idempotent on the server (an existing replica is skipped,
//! a dataset or rule that exists answers 409, an attachment that exists is
//! ignored), so a batch that failed half-way, or a file registered again
//! after a crash, is simply registered again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prodsys_config::{RucioAuth, RucioSettings};
use prodsys_db::Db;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::destination::Destination;
use crate::store::Claimed;

/// Rucio takes at most this many DIDs per attachment.
const MAX_ATTACH: usize = 1000;
/// How long a batch waits for the next file claimed at about the same time,
/// and for all of them.
const LINGER: Duration = Duration::from_millis(20);
const GATHER: Duration = Duration::from_secs(1);
/// Batches whose calls are under way at once: the server works on one
/// while the next is sent (a Rucio server runs several workers).
const BATCHES_IN_FLIGHT: usize = 2;
/// A userpass token lives an hour; ask for a new one well before.
const USERPASS_TOKEN_AGE: Duration = Duration::from_secs(30 * 60);
/// Metadata keys that describe the file itself in Rucio: never overwritten
/// with catalog metadata.
const RESERVED_KEYS: &[&str] = &[
    "scope", "name", "bytes", "adler32", "md5", "guid", "account", "did_type",
];

/// Why a file is not registered (yet).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Another destination is still copying the file to the storage:
    /// tried again soon, not counted as a failure.
    #[error("{0}")]
    Waiting(String),
    /// The storage, the server or the input failed: held with the reason,
    /// tried again with backoff.
    #[error("{0}")]
    Failed(String),
}

/// One configured `rucio` destination.
pub struct Registrar {
    name: String,
    storage_name: String,
    storage: Destination,
    db: Db,
    queue: mpsc::UnboundedSender<(Item, oneshot::Sender<Result<(), String>>)>,
    /// Checks and copies on the storage at once (a copy slot carries many
    /// registrations, so they meet in bulk calls; the storage's client
    /// commands stay as many as a slot's copies would be).
    storage_slots: Arc<Semaphore>,
}

/// A file on its way into Rucio.
struct Item {
    lfn: String,
    production_id: String,
    size: u64,
    adler32: String,
    pfn: String,
}

impl Registrar {
    /// Checks the settings (a clear error names the field) and starts the
    /// registering task; at most `storage_slots` files are checked or
    /// copied on the storage at once.
    pub fn new(
        name: &str,
        settings: &RucioSettings,
        destinations: &HashMap<String, Destination>,
        db: Db,
        storage_slots: usize,
    ) -> anyhow::Result<Arc<Self>> {
        let field = |f: &str| format!("forwarding.destinations.{name}.{f}");
        let storage = destinations
            .get(&settings.storage)
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: {:?} is not an xroot or posix destination (known: {:?})",
                    field("storage"),
                    settings.storage,
                    destinations.keys().collect::<Vec<_>>()
                )
            })?;
        let client = Client::new(name, settings)?;
        for (key, value) in [("scope", &settings.scope), ("rse", &settings.rse)] {
            if value.is_empty() || !value.chars().all(is_name_char) || value.contains('/') {
                anyhow::bail!("{}: {value:?} is empty or not a Rucio name", field(key));
            }
        }
        template_keys(&settings.dataset)
            .map_err(|e| anyhow::anyhow!("{}: {e}", field("dataset")))?;
        if let Some(rule) = &settings.rule {
            if rule.rse_expression.trim().is_empty() {
                anyhow::bail!("{}: empty", field("rule.rse_expression"));
            }
            if rule.copies == 0 {
                anyhow::bail!("{}: at least 1", field("rule.copies"));
            }
        }
        let (queue, received) = mpsc::unbounded_channel();
        let registering = Registering {
            client,
            settings: settings.clone(),
            db: db.clone(),
            datasets: Mutex::new(HashSet::new()),
        };
        tokio::spawn(registering.run(received));
        Ok(Arc::new(Self {
            name: name.to_string(),
            storage_name: settings.storage.clone(),
            storage,
            db,
            queue,
            storage_slots: Arc::new(Semaphore::new(storage_slots.max(1))),
        }))
    }

    /// Puts `claim`'s file on the storage (unless it is there, verified)
    /// and registers it; the PFN on success.
    pub async fn forward(&self, claim: &Claimed) -> Result<String, RegisterError> {
        let pfn = self.storage.url_of(&claim.lfn);
        let slot = self
            .storage_slots
            .acquire()
            .await
            .map_err(|e| RegisterError::Failed(e.to_string()))?;
        match self.storage_state(&claim.lfn).await? {
            // The production forwards to the storage itself: that copy is
            // the one registered, once it verified.
            Some(state) if state == "verified" => {}
            Some(state) => {
                return Err(RegisterError::Waiting(format!(
                    "waiting for the copy on {} ({state})",
                    self.storage_name
                )));
            }
            None => {
                let there = self
                    .storage
                    .checksum(&claim.lfn)
                    .await
                    .map_err(|e| self.failed_on_storage(e))?;
                if there.as_deref() != Some(claim.adler32.as_str()) && claim.source_url == pfn {
                    // Written there by a remote job: no other copy to put.
                    return Err(RegisterError::Failed(format!(
                        "{}: the file is catalogued at its place on {}, where its adler32 is {} and the catalog's {}",
                        self.name,
                        self.storage_name,
                        there.as_deref().unwrap_or("missing"),
                        claim.adler32
                    )));
                }
                if there.as_deref() != Some(claim.adler32.as_str()) {
                    self.storage
                        .put(&claim.source_url, &claim.lfn, &claim.adler32)
                        .await
                        .map_err(|e| self.failed_on_storage(e))?;
                }
            }
        }
        drop(slot);
        let (answer, registered) = oneshot::channel();
        let item = Item {
            lfn: claim.lfn.clone(),
            production_id: claim.production_id.clone(),
            size: claim.size,
            adler32: claim.adler32.clone(),
            pfn: pfn.clone(),
        };
        if self.queue.send((item, answer)).is_err() {
            return Err(RegisterError::Failed(format!(
                "{}: the registering task stopped",
                self.name
            )));
        }
        match registered.await {
            Ok(Ok(())) => Ok(pfn),
            Ok(Err(reason)) => Err(RegisterError::Failed(reason)),
            Err(_) => Err(RegisterError::Failed(format!(
                "{}: the registering task stopped",
                self.name
            ))),
        }
    }

    fn failed_on_storage(&self, e: crate::destination::CopyError) -> RegisterError {
        RegisterError::Failed(format!("copying to {}: {e}", self.storage_name))
    }

    /// The state of the file's replica on the storage destination when its
    /// production forwards there too.
    async fn storage_state(&self, lfn: &str) -> Result<Option<String>, RegisterError> {
        crate::store::replica_state(&self.db, lfn, &self.storage_name)
            .await
            .map_err(|e| RegisterError::Failed(format!("{e:#}")))
    }
}

/// The task that turns queued files into bulk calls.
struct Registering {
    client: Client,
    settings: RucioSettings,
    db: Db,
    /// Datasets (and their rules) known to exist on the server.
    datasets: Mutex<HashSet<String>>,
}

impl Registering {
    async fn run(
        self,
        mut received: mpsc::UnboundedReceiver<(Item, oneshot::Sender<Result<(), String>>)>,
    ) {
        let this = Arc::new(self);
        let batch_size = this.settings.batch.max(1);
        let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = received.recv().await {
            // Files queue up while the calls in flight take their time: the
            // next batch takes what waits, up to its size.
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            // Open while files keep coming (each within LINGER of the one
            // before, as a slot's files come from their checks on the
            // storage), up to GATHER in all.
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + GATHER;
            while batch.len() < batch_size {
                let next = (tokio::time::Instant::now() + LINGER).min(until);
                match tokio::time::timeout_at(next, received.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    _ => break,
                }
            }
            let this = this.clone();
            tokio::spawn(async move {
                let (items, answers): (Vec<Item>, Vec<_>) = batch.into_iter().unzip();
                let outcomes = this.register(&items).await;
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
                drop(permit);
            });
        }
    }

    /// Registers `items`; one outcome per item, in order.
    async fn register(&self, items: &[Item]) -> Vec<Result<(), String>> {
        let metadata = match self.metadata(items).await {
            Ok(m) => m,
            Err(e) => return vec![Err(format!("{e:#}")); items.len()],
        };
        let empty = serde_json::Map::new();
        // A file whose dataset name cannot be made fails alone.
        let mut outcomes: Vec<Result<(), String>> = Vec::with_capacity(items.len());
        let mut per_dataset: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let meta = metadata.get(&item.lfn).unwrap_or(&empty);
            match dataset_name(&self.settings.dataset, &item.production_id, meta) {
                Ok(name) => {
                    per_dataset.entry(name).or_default().push(i);
                    outcomes.push(Ok(()));
                }
                Err(reason) => {
                    outcomes.push(Err(format!("dataset name of {}: {reason}", item.lfn)));
                }
            }
        }
        for (dataset, files) in &per_dataset {
            // A dataset new to this process is made first and its rule
            // once files are in it (a rule naming an RSE Rucio does not
            // know fails, and the files' own call names the RSE then).
            let known = self.known(dataset);
            if !known && let Err(reason) = self.make_dataset(dataset).await {
                for &i in files {
                    outcomes[i] = Err(reason.clone());
                }
                continue;
            }
            for chunk in files.chunks(MAX_ATTACH) {
                let batch: Vec<&Item> = chunk.iter().map(|&i| &items[i]).collect();
                let failed = self.attach(dataset, &batch, &metadata).await;
                for &i in chunk {
                    if let Some(reason) = failed.get(&items[i].lfn) {
                        outcomes[i] = Err(reason.clone());
                    }
                }
            }
            if known || files.iter().all(|&i| outcomes[i].is_err()) {
                continue;
            }
            match self.make_rule(dataset).await {
                Ok(()) => {
                    self.datasets
                        .lock()
                        .expect("datasets lock")
                        .insert(dataset.clone());
                }
                Err(reason) => {
                    for &i in files {
                        if outcomes[i].is_ok() {
                            outcomes[i] = Err(reason.clone());
                        }
                    }
                }
            }
        }
        outcomes
    }

    /// Registers the replicas of `items` on the RSE and attaches them to
    /// `dataset`, in one call: `POST /dids/attachments` naming the RSE adds
    /// each new file (bytes, adler32, metadata) and its replica (PFN) and
    /// attaches it, in one transaction, and refuses the whole call with
    /// `FileConsistencyMismatch` when it knows one of the files with
    /// other bytes or another adler32. An existing replica is skipped and
    /// an existing attachment ignored, so registering again changes
    /// nothing. Only a refused batch is checked file by file (`POST
    /// /dids/bulkmeta`): each conflict fails with its reason, never
    /// registered over, and the others are registered. The files that
    /// failed, and why.
    async fn attach(
        &self,
        dataset: &str,
        items: &[&Item],
        metadata: &HashMap<String, serde_json::Map<String, Value>>,
    ) -> HashMap<String, String> {
        let scope = &self.settings.scope;
        let empty = serde_json::Map::new();
        let mut failed = HashMap::new();
        let mut items = items.to_vec();
        let mut checked = false;
        while !items.is_empty() {
            let dids: Vec<Value> = items
                .iter()
                .map(|item| {
                    json!({
                        "scope": scope,
                        "name": item.lfn,
                        "bytes": item.size,
                        "adler32": item.adler32,
                        "pfn": item.pfn,
                        "meta": rucio_metadata(metadata.get(&item.lfn).unwrap_or(&empty)),
                    })
                })
                .collect();
            let attachment = json!({
                "scope": scope,
                "name": dataset,
                "rse": self.settings.rse,
                "dids": dids,
            });
            let refused = match self
                .client
                .answer(
                    Method::POST,
                    "/dids/attachments",
                    Some(json!({ "attachments": [attachment], "ignore_duplicate": true })),
                    &[],
                )
                .await
            {
                Ok(_) => break,
                Err(refused) => refused,
            };
            let reason = if refused.class == "FileConsistencyMismatch" && !checked {
                checked = true;
                match self.conflicts(&items).await {
                    Ok(conflicts) if !conflicts.is_empty() => {
                        items.retain(|item| match conflicts.get(&item.lfn) {
                            Some(conflict) => {
                                failed.insert(item.lfn.clone(), conflict.clone());
                                false
                            }
                            None => true,
                        });
                        continue;
                    }
                    // Gone again since: tried again later.
                    Ok(_) => refused.reason,
                    Err(reason) => reason,
                }
            } else {
                // The dataset may have been removed on the server since:
                // make it again on the next try.
                self.datasets.lock().expect("datasets lock").remove(dataset);
                refused.reason
            };
            for item in items {
                failed.insert(item.lfn.clone(), reason.clone());
            }
            break;
        }
        failed
    }

    /// The files of `items` Rucio knows with another adler32 or size, and
    /// why each is a conflict (asked only of a batch Rucio refused so).
    async fn conflicts(&self, items: &[&Item]) -> Result<HashMap<String, String>, String> {
        let scope = &self.settings.scope;
        let mut conflicts = HashMap::new();
        let ours: HashMap<&str, &Item> = items.iter().map(|i| (i.lfn.as_str(), *i)).collect();
        for chunk in items.chunks(MAX_ATTACH) {
            let dids: Vec<Value> = chunk
                .iter()
                .map(|i| json!({ "scope": scope, "name": i.lfn }))
                .collect();
            let text = self
                .client
                .call(
                    Method::POST,
                    "/dids/bulkmeta",
                    Some(json!({ "dids": dids })),
                    &[],
                )
                .await?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let known: Value = serde_json::from_str(line).map_err(|e| {
                    format!(
                        "rucio {}: POST /dids/bulkmeta answered {line:?}: {e}",
                        self.client.destination
                    )
                })?;
                let Some(item) = known["name"].as_str().and_then(|n| ours.get(n)) else {
                    continue;
                };
                let adler32 = known["adler32"].as_str().unwrap_or_default();
                let bytes = known["bytes"].as_u64();
                if adler32 != item.adler32 || bytes != Some(item.size) {
                    conflicts.insert(
                        item.lfn.clone(),
                        format!(
                            "conflict: rucio {} has {scope}:{} with adler32 {adler32} and {} bytes, \
                             the catalog has adler32 {} and {} bytes",
                            self.client.destination,
                            item.lfn,
                            bytes.map(|b| b.to_string()).unwrap_or_else(|| "no".into()),
                            item.adler32,
                            item.size
                        ),
                    );
                }
            }
        }
        Ok(conflicts)
    }

    /// Makes `dataset` on the server (an existing one is fine).
    async fn make_dataset(&self, dataset: &str) -> Result<(), String> {
        let scope = &self.settings.scope;
        self.client
            .call(
                Method::POST,
                &format!("/dids/{scope}/{dataset}"),
                Some(json!({ "type": "DATASET" })),
                &["DataIdentifierAlreadyExists"],
            )
            .await
            .map(|_| ())
    }

    /// Puts `dataset` under the configured replication rule, if any (an
    /// existing one is fine).
    async fn make_rule(&self, dataset: &str) -> Result<(), String> {
        let Some(rule) = &self.settings.rule else {
            return Ok(());
        };
        self.client
            .call(
                Method::POST,
                "/rules/",
                Some(json!({
                    "dids": [{ "scope": self.settings.scope, "name": dataset }],
                    "account": self.settings.account,
                    "copies": rule.copies,
                    "rse_expression": rule.rse_expression,
                    "lifetime": rule.lifetime_s,
                })),
                &["DuplicateRule"],
            )
            .await
            .map(|_| ())
    }

    /// Whether `dataset` (and its rule) is known to exist on the server.
    fn known(&self, dataset: &str) -> bool {
        self.datasets
            .lock()
            .expect("datasets lock")
            .contains(dataset)
    }

    /// The catalog metadata of `items`, by LFN.
    async fn metadata(
        &self,
        items: &[Item],
    ) -> anyhow::Result<HashMap<String, serde_json::Map<String, Value>>> {
        let lfns: Vec<&str> = items.iter().map(|i| i.lfn.as_str()).collect();
        crate::store::files_metadata(&self.db, &lfns).await
    }
}

/// The catalog metadata Rucio's generic metadata takes: keys without `.`
/// (its filter syntax) that do not name the file's own attributes.
fn rucio_metadata(meta: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    meta.iter()
        .filter(|(k, _)| !k.is_empty() && !k.contains('.') && !RESERVED_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Characters Rucio's generic schema allows in a name.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_')
}

/// The placeholders of a dataset template (`{production_id}`, metadata
/// keys), or why it is not one.
fn template_keys(template: &str) -> Result<Vec<&str>, String> {
    let mut keys = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(format!("{template:?} has a '}}' without '{{'"));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?} has a '{{' without '}}'"))?;
        let key = &after[..close];
        if key.is_empty() || key.contains('{') {
            return Err(format!("{template:?} has an empty or nested placeholder"));
        }
        keys.push(key);
        rest = &after[close + 1..];
    }
    if template.is_empty() {
        return Err("empty".into());
    }
    Ok(keys)
}

/// The dataset a file of `production_id` with `meta` goes into.
fn dataset_name(
    template: &str,
    production_id: &str,
    meta: &serde_json::Map<String, Value>,
) -> Result<String, String> {
    let mut name = template.to_string();
    for key in template_keys(template)? {
        let value = if key == "production_id" {
            production_id.to_string()
        } else {
            match meta.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => return Err(format!("the file has no metadata {key:?} for the template")),
            }
        };
        name = name.replacen(&format!("{{{key}}}"), &value, 1);
    }
    if name.len() > 250
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '/')
        || !name.chars().all(is_name_char)
    {
        return Err(format!(
            "{name:?} is not a Rucio name (letters, digits, / . - _; at most 250)"
        ));
    }
    Ok(name)
}

/// Speaks to one Rucio server: auth token kept and renewed, each call's
/// answer mapped onto success or a reason.
struct Client {
    destination: String,
    base: String,
    account: String,
    vo: Option<String>,
    auth: RucioAuth,
    http: reqwest::Client,
    token: Mutex<Option<(SecretString, Instant)>>,
}

impl Client {
    fn new(name: &str, settings: &RucioSettings) -> anyhow::Result<Self> {
        let field = |f: &str| format!("forwarding.destinations.{name}.{f}");
        let base = settings.url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!("{}: {:?} is not an http(s) URL", field("url"), settings.url);
        }
        if settings.account.is_empty() {
            anyhow::bail!("{}: empty", field("account"));
        }
        if let RucioAuth::Token { file, env, token } = &settings.auth {
            let given = file.is_some() as u8 + env.is_some() as u8 + token.is_some() as u8;
            if given != 1 {
                anyhow::bail!(
                    "{}: give exactly one of file, env and token (got {given})",
                    field("auth")
                );
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_s.max(1)))
            .build()
            .context("building the Rucio HTTP client")?;
        Ok(Self {
            destination: name.to_string(),
            base,
            account: settings.account.clone(),
            vo: settings.vo.clone(),
            auth: settings.auth.clone(),
            http,
            token: Mutex::new(None),
        })
    }

    /// Calls `path`; its answer's body when it is 2xx, or 409 with one of `fine_conflicts`
    /// (the thing exists already), is success. A refused token is renewed
    /// and the call made once more.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        fine_conflicts: &[&str],
    ) -> Result<String, String> {
        self.answer(method, path, body, fine_conflicts)
            .await
            .map_err(|refused| refused.reason)
    }

    /// [`Client::call`], a failure with Rucio's exception class.
    async fn answer(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        fine_conflicts: &[&str],
    ) -> Result<String, Refused> {
        let mut renewed = false;
        loop {
            let token = self.token(renewed).await.map_err(Refused::unclassed)?;
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .header("X-Rucio-Auth-Token", token.expose_secret())
                .header("X-Rucio-Account", &self.account);
            if let Some(vo) = &self.vo {
                request = request.header("X-Rucio-VO", vo);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request
                .send()
                .await
                .map_err(|e| Refused::unclassed(self.unreachable(e)))?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(text);
            }
            let (class, message) = rucio_error(&text);
            if status == StatusCode::CONFLICT && fine_conflicts.contains(&class.as_str()) {
                return Ok(String::new());
            }
            if status == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                continue;
            }
            let reason = format!(
                "rucio {}: {method} {path} answered {status}: {class}: {message}",
                self.destination
            );
            return Err(Refused { class, reason });
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> String {
        format!("rucio {}: {} unreachable: {e}", self.destination, self.base)
    }

    /// The token to send: the kept one, or a new one when `renew` (the
    /// server refused it) or when it is old.
    async fn token(&self, renew: bool) -> Result<SecretString, String> {
        if !renew
            && let Some((token, at)) = self.token.lock().expect("token lock").as_ref()
            && (at.elapsed() < USERPASS_TOKEN_AGE
                || !matches!(self.auth, RucioAuth::Userpass { .. }))
        {
            return Ok(token.clone());
        }
        let token = match &self.auth {
            RucioAuth::Userpass { username, password } => {
                let mut request = self
                    .http
                    .get(format!("{}/auth/userpass", self.base))
                    .header("X-Rucio-Account", &self.account)
                    .header("X-Rucio-Username", username)
                    .header("X-Rucio-Password", password.expose_secret());
                if let Some(vo) = &self.vo {
                    request = request.header("X-Rucio-VO", vo);
                }
                let response = request.send().await.map_err(|e| self.unreachable(e))?;
                let status = response.status();
                let token = response
                    .headers()
                    .get("X-Rucio-Auth-Token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match token {
                    Some(token) if status.is_success() => SecretString::from(token),
                    _ => {
                        let (class, message) =
                            rucio_error(&response.text().await.unwrap_or_default());
                        return Err(format!(
                            "rucio {}: GET /auth/userpass answered {status}: {class}: {message}",
                            self.destination
                        ));
                    }
                }
            }
            RucioAuth::Token {
                token: Some(token), ..
            } => token.clone(),
            RucioAuth::Token {
                file: Some(file), ..
            } => {
                let text = tokio::fs::read_to_string(file).await.map_err(|e| {
                    format!(
                        "rucio {}: reading the token file {}: {e}",
                        self.destination,
                        file.display()
                    )
                })?;
                SecretString::from(text.trim().to_string())
            }
            RucioAuth::Token { env: Some(var), .. } => match std::env::var(var) {
                Ok(token) if !token.trim().is_empty() => {
                    SecretString::from(token.trim().to_string())
                }
                _ => {
                    return Err(format!(
                        "rucio {}: the environment variable {var} holds no token",
                        self.destination
                    ));
                }
            },
            RucioAuth::Token { .. } => {
                return Err(format!("rucio {}: no token configured", self.destination));
            }
        };
        *self.token.lock().expect("token lock") = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// A call that failed: Rucio's exception class (empty when the server
/// did not answer with one) and the reason to report.
struct Refused {
    class: String,
    reason: String,
}

impl Refused {
    fn unclassed(reason: String) -> Self {
        Self {
            class: String::new(),
            reason,
        }
    }
}

/// Rucio's error body `{"ExceptionClass": …, "ExceptionMessage": …}`, or the
/// start of whatever else came.
fn rucio_error(text: &str) -> (String, String) {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v.get("ExceptionClass").is_some() => (
            v["ExceptionClass"].as_str().unwrap_or_default().to_string(),
            v["ExceptionMessage"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        _ => (
            "no Rucio error".into(),
            text.chars()
                .take(200)
                .collect::<String>()
                .trim()
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: Value) -> serde_json::Map<String, Value> {
        pairs.as_object().unwrap().clone()
    }

    #[test]
    fn dataset_names_come_from_the_template() {
        let m = meta(json!({"MCCampaign": "PROD6", "run_number": 7, "site": "La Palma"}));
        assert_eq!(
            dataset_name("{production_id}", "CTA-000001", &m).unwrap(),
            "CTA-000001"
        );
        assert_eq!(
            dataset_name("{MCCampaign}.{production_id}.r{run_number}", "CTA-1", &m).unwrap(),
            "PROD6.CTA-1.r7"
        );
        let missing = dataset_name("{particle}", "CTA-1", &m).unwrap_err();
        assert!(missing.contains("particle"), "{missing}");
        let bad = dataset_name("{site}", "CTA-1", &m).unwrap_err();
        assert!(bad.contains("not a Rucio name"), "{bad}");
        assert!(template_keys("{production_id").is_err());
        assert!(template_keys("a}b").is_err());
        assert!(template_keys("{}").is_err());
        assert!(template_keys("").is_err());
        assert_eq!(template_keys("x{a}y{b}").unwrap(), ["a", "b"]);
    }

    #[test]
    fn metadata_keeps_what_rucio_takes() {
        let m =
            meta(json!({"site": "LaPalma", "thetaP": 20.0, "a.b": 1, "adler32": "x", "name": "n"}));
        let kept = rucio_metadata(&m);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["site", "thetaP"]);
    }

    #[test]
    fn rucio_errors_are_read_from_their_body() {
        assert_eq!(
            rucio_error(
                r#"{"ExceptionClass": "RSENotFound", "ExceptionMessage": "RSE 'X' cannot be found"}"#
            ),
            ("RSENotFound".into(), "RSE 'X' cannot be found".into())
        );
        assert_eq!(
            rucio_error("<html>bad gateway</html>").1,
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        let settings = |auth: RucioAuth, url: &str| RucioSettings {
            url: url.into(),
            account: "root".into(),
            vo: None,
            auth,
            scope: "cta".into(),
            rse: "XRD".into(),
            storage: "xrd".into(),
            dataset: "{production_id}".into(),
            rule: None,
            batch: 10,
            timeout_s: 5,
        };
        let userpass = RucioAuth::Userpass {
            username: "u".into(),
            password: SecretString::from("p"),
        };
        let err = Client::new("r", &settings(userpass, "rucio.example.org"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("forwarding.destinations.r.url"), "{err}");
        let none = RucioAuth::Token {
            file: None,
            env: None,
            token: None,
        };
        let err = Client::new("r", &settings(none, "https://rucio"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("forwarding.destinations.r.auth"), "{err}");
    }
}
