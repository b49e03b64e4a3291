//! DIRAC through the DiracX REST API. One attempt is one DIRAC job, named by
//! the attempt's tag (JDL `JobName`) and grouped by production (`JobGroup`);
//! jobs are submitted as JDL in calls of at most 20, followed in bulk with
//! `POST /api/jobs/search`, and killed by setting their status to `Killed`
//! (DiracX 0.7 has no kill endpoint). The bearer token comes from
//! configuration and is fetched again before its `exp` claim.
//!
//! Outputs: a DIRAC site does not share the dispatcher's filesystem (unless
//! configured with `shared_filesystem`), so each job's script uploads its
//! outputs to its production's first forwarding destination after its
//! command, where the scheduler checks and catalogues them (see `remote`).
//! A site that shares the attempt's working directory has its files
//! collected from there, as the Slurm backend's are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use prodsys_config::DiracSettings;
use prodsys_core::JobState;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use crate::backend::{Backend, BackendStatus, BoxFuture, JobSpec};

/// DiracX accepts at most this many JDLs per submission call.
pub const SUBMIT_BATCH: usize = 20;
/// Job IDs per search call.
const SEARCH_BATCH: usize = 1000;
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// A token without an `exp` claim is fetched again after this long.
const UNDATED_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Our state for a DIRAC job status. A job killed behind our back failed as
/// far as the production goes: it is retried, as a cancelled Slurm job is.
pub fn map_status(status: &str) -> JobState {
    match status {
        "Submitting" | "Received" | "Checking" | "Staging" | "Waiting" | "Matched"
        | "Rescheduled" => JobState::Queued,
        // Completing/Completed: the payload ended, outputs are being uploaded.
        "Running" | "Stalled" | "Completing" | "Completed" => JobState::Running,
        "Done" => JobState::Done,
        _ => JobState::Failed,
    }
}

enum TokenSource {
    Fixed(SecretString),
    File(PathBuf),
    Command(Vec<String>),
}

struct Token {
    value: SecretString,
    /// When to fetch a new one: the token's expiry less the margin.
    renew_at: SystemTime,
}

pub struct Dirac {
    name: String,
    base: String,
    max_in_flight: usize,
    http: reqwest::Client,
    source: TokenSource,
    margin: Duration,
    token: Mutex<Option<Token>>,
    sites: Vec<String>,
    output_se: Option<String>,
    extra_jdl: BTreeMap<String, String>,
    changed: Arc<Notify>,
}

/// The `exp` claim of a JWT, read without verifying it (the server does that).
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    (exp > 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(exp))
}

/// The shell script a DIRAC job writes and runs when its command cannot be
/// `Executable` and `Arguments` (see [`Dirac::jdl`]).
const JOB_SCRIPT: &str = "prodsys-job.sh";

/// A JDL string value, `"…"`. DIRAC's JDL parser knows no escapes: a value
/// is taken as it is up to the next `"`, so what goes here never holds one
/// (a command that would is sent as a script, see [`Dirac::jdl`]).
fn jdl_string(value: &str) -> String {
    debug_assert!(!value.contains('"'), "a JDL string with a quote: {value}");
    format!("\"{}\"", value.replace('"', "'"))
}

fn jdl_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = values.into_iter().map(jdl_string).collect();
    format!("{{{}}}", items.join(", "))
}

/// `'it'\''s'` quoting: DIRAC runs `Executable Arguments` through a shell.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/=+@%".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `arg` quoted for the shell that runs a DIRAC job, with every occurrence of
/// `here` (a path on the dispatcher's host) replaced by `there` (a shell
/// expression for the same place in the job's own directory).
fn on_site(arg: &str, here: &str, there: &str) -> String {
    if here.is_empty() || !arg.contains(here) {
        return shell_quote(arg);
    }
    arg.split(here)
        .map(|piece| {
            if piece.is_empty() {
                String::new()
            } else {
                shell_quote(piece)
            }
        })
        .collect::<Vec<_>>()
        .join(there)
}

/// An attribute name JDL accepts (letters, digits, underscore; a letter first).
fn jdl_name_ok(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Dirac {
    pub fn new(name: &str, settings: &DiracSettings) -> anyhow::Result<Self> {
        let base = settings.url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base)
            .with_context(|| format!("dispatcher.backends.{name}.url: not a URL: {base:?}"))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            bail!("dispatcher.backends.{name}.url: http or https, not {base:?}");
        }
        let mut sources = Vec::new();
        if let Some(token) = &settings.token {
            sources.push(TokenSource::Fixed(token.clone()));
        }
        if let Some(file) = &settings.token_file {
            sources.push(TokenSource::File(file.clone()));
        }
        if !settings.token_command.is_empty() {
            sources.push(TokenSource::Command(settings.token_command.clone()));
        }
        if sources.len() != 1 {
            bail!(
                "dispatcher.backends.{name}: give exactly one of token, token_file, token_command ({} given)",
                sources.len()
            );
        }
        for key in settings.jdl.keys() {
            if !jdl_name_ok(key) {
                bail!("dispatcher.backends.{name}.jdl: {key:?} is not a JDL attribute name");
            }
        }
        let mut http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("prodsys-dispatcher/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = &settings.ca_file {
            let pem = std::fs::read(ca_file).with_context(|| {
                format!(
                    "dispatcher.backends.{name}.ca_file: reading {}",
                    ca_file.display()
                )
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "dispatcher.backends.{name}.ca_file: no PEM certificates in {}",
                    ca_file.display()
                )
            })? {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Self {
            name: name.to_string(),
            base,
            max_in_flight: settings.max_in_flight.max(1),
            http: http.build().context("building the HTTP client")?,
            source: sources.pop().expect("one token source"),
            margin: Duration::from_secs(settings.token_refresh_margin_s),
            token: Mutex::new(None),
            sites: settings.sites.clone(),
            output_se: settings.output_se.clone(),
            extra_jdl: settings.jdl.clone(),
            changed: Arc::new(Notify::new()),
        })
    }

    /// The JDL of one attempt.
    ///
    /// DIRAC's JDL parser takes no `"` inside a string value, and a job runs
    /// in its own directory on a worker node that does not share the
    /// dispatcher's filesystem. A command that needs either (an argument or
    /// environment value with a `"`, or the attempt's output directory, which
    /// becomes `output` in the job's own directory, created before the
    /// command starts since a container runtime binds it) goes as a small
    /// shell script, base64 in `Arguments`, which the job writes to
    /// `prodsys-job.sh` (returned in its output sandbox) and runs. Anything
    /// else is `Executable` and `Arguments` as they are.
    pub fn jdl(&self, spec: &JobSpec) -> String {
        let mut lines: Vec<(String, String)> = vec![
            ("JobName".into(), jdl_string(&spec.tag)),
            ("JobGroup".into(), jdl_string(&spec.production_id)),
        ];
        let env: Vec<(&str, &str)> = spec
            .env
            .iter()
            .filter(|(k, _)| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let output_dir = spec.output_dir.to_string_lossy();
        let words = || std::iter::once(&spec.program).chain(&spec.args);
        let names_output = !output_dir.is_empty() && words().any(|a| a.contains(&*output_dir));
        // A job at a site that does not share the work directory: every path
        // in the attempt's directory is one in the job's own, and its
        // outputs are uploaded after its command.
        let remote = spec.remote.as_ref();
        let as_script = names_output
            || remote.is_some()
            || words().any(|a| a.contains(['"', '\\']))
            || env.iter().any(|(_, v)| v.contains(['"', '\\']));
        let mut sandbox = vec!["stdout.log", "stderr.log"];
        if as_script {
            let mut script = String::from("#!/bin/sh\nset -e\n");
            let workdir = format!("{}/", spec.workdir.to_string_lossy());
            let on_site_output = match spec.output_dir.strip_prefix(&spec.workdir) {
                Ok(relative) if remote.is_some() => {
                    format!(r#""$PWD"/{}"#, shell_quote(&relative.to_string_lossy()))
                }
                _ => r#""$PWD"/output"#.to_string(),
            };
            if names_output || remote.is_some() {
                script.push_str(&format!("mkdir -p {on_site_output}\n"));
            }
            for (key, value) in &env {
                script.push_str(&format!("export {key}={}\n", shell_quote(value)));
            }
            if let Some(remote) = remote {
                script.push_str(&crate::remote::export_script(remote));
            }
            if let (Some(_), Some((list, text))) = (remote, &spec.input_list) {
                let name = list
                    .strip_prefix(&spec.workdir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "inputs.txt".into());
                script.push_str(&format!(
                    "cat > {} <<'PRODSYS_INPUTS'\n{text}PRODSYS_INPUTS\n",
                    shell_quote(&name)
                ));
            }
            let command: Vec<String> = match remote {
                Some(_) => words()
                    .map(|a| on_site(a, &workdir, r#""$PWD"/"#))
                    .collect(),
                None => words()
                    .map(|a| on_site(a, &output_dir, r#""$PWD"/output"#))
                    .collect(),
            };
            match remote {
                // The command, then the upload of what it wrote.
                Some(_) => {
                    script.push_str(&format!("{}\n", command.join(" ")));
                    script.push_str(&crate::remote::upload_script(&on_site_output));
                    sandbox.push(crate::remote::MANIFEST_FILE);
                }
                None => script.push_str(&format!("exec {}\n", command.join(" "))),
            }
            let encoded = base64::engine::general_purpose::STANDARD.encode(script);
            lines.push(("Executable".into(), jdl_string("/bin/sh")));
            lines.push((
                "Arguments".into(),
                jdl_string(&format!(
                    "-c 'echo {encoded} | base64 -d > {JOB_SCRIPT} && exec /bin/sh {JOB_SCRIPT}'"
                )),
            ));
            sandbox.push(JOB_SCRIPT);
        } else {
            lines.push(("Executable".into(), jdl_string(&spec.program)));
            if !spec.args.is_empty() {
                let args: Vec<String> = spec.args.iter().map(|a| shell_quote(a)).collect();
                lines.push(("Arguments".into(), jdl_string(&args.join(" "))));
            }
        }
        // Twice the estimate, and never under ten minutes: an estimate is a guess.
        let cpu = ((spec.cpu_seconds * 2.0).ceil() as u64).max(600);
        lines.push(("CPUTime".into(), cpu.to_string()));
        lines.push(("MaxRAM".into(), spec.memory_mb.max(1).to_string()));
        lines.push(("StdOutput".into(), jdl_string("stdout.log")));
        lines.push(("StdError".into(), jdl_string("stderr.log")));
        lines.push(("OutputSandbox".into(), jdl_list(sandbox)));
        if !as_script && !env.is_empty() {
            let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            lines.push((
                "ExecutionEnvironment".into(),
                jdl_list(env.iter().map(String::as_str)),
            ));
        }
        if !self.sites.is_empty() {
            lines.push((
                "Site".into(),
                jdl_list(self.sites.iter().map(String::as_str)),
            ));
        }
        if let Some(se) = &self.output_se {
            lines.push(("OutputSE".into(), jdl_string(se)));
        }
        for (key, value) in &self.extra_jdl {
            lines.retain(|(k, _)| k != key);
            lines.push((key.clone(), value.clone()));
        }
        let body: Vec<String> = lines
            .into_iter()
            .map(|(k, v)| format!("    {k} = {v};"))
            .collect();
        format!("[\n{}\n]", body.join("\n"))
    }

    /// The current token, fetched again when it nears expiry or `stale` is set.
    async fn token(&self, stale: bool) -> anyhow::Result<SecretString> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && !stale
            && SystemTime::now() < token.renew_at
        {
            return Ok(token.value.clone());
        }
        let value = match &self.source {
            TokenSource::Fixed(token) => token.clone(),
            TokenSource::File(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .with_context(|| format!("reading the DiracX token from {}", path.display()))?;
                SecretString::from(text.trim().to_string())
            }
            TokenSource::Command(command) => {
                let output = tokio::time::timeout(
                    TOKEN_COMMAND_TIMEOUT,
                    tokio::process::Command::new(&command[0])
                        .args(&command[1..])
                        .kill_on_drop(true)
                        .output(),
                )
                .await
                .with_context(|| format!("token command {:?} did not finish in 60 s", command[0]))?
                .with_context(|| format!("running token command {:?}", command[0]))?;
                if !output.status.success() {
                    bail!(
                        "token command {:?} failed ({}): {}",
                        command[0],
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                let text = String::from_utf8_lossy(&output.stdout);
                SecretString::from(text.lines().next().unwrap_or_default().trim().to_string())
            }
        };
        if value.expose_secret().is_empty() {
            bail!(
                "the DiracX token source of {} gave an empty token",
                self.name
            );
        }
        let now = SystemTime::now();
        let renew_at = match jwt_expiry(value.expose_secret()) {
            Some(expiry) => {
                if expiry <= now {
                    tracing::warn!(backend = %self.name, "the DiracX token given has already expired");
                }
                expiry.checked_sub(self.margin).unwrap_or(now).max(now)
            }
            None => now + UNDATED_TOKEN_LIFETIME,
        };
        tracing::debug!(backend = %self.name, "fetched a DiracX token");
        *cached = Some(Token {
            value: value.clone(),
            renew_at,
        });
        Ok(value)
    }

    /// One API call with the bearer token; a 401 fetches a new token and tries once more.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: &Value,
    ) -> anyhow::Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Value)> {
        let url = format!("{}{path}", self.base);
        let mut stale = false;
        loop {
            let token = self.token(stale).await?;
            let response = self
                .http
                .request(method.clone(), &url)
                .query(query)
                .bearer_auth(token.expose_secret())
                .json(body)
                .send()
                .await
                .with_context(|| format!("{method} {url}"))?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !stale {
                tracing::info!(backend = %self.name, "DiracX refused the token; fetching a new one");
                stale = true;
                continue;
            }
            let headers = response.headers().clone();
            let text = response
                .text()
                .await
                .with_context(|| format!("reading the answer to {method} {url}"))?;
            if !status.is_success() && status != reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                bail!(
                    "{method} {url} answered {status}: {}",
                    text.chars().take(500).collect::<String>()
                );
            }
            let value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{method} {url} answered no JSON: {}",
                        text.chars().take(200).collect::<String>()
                    )
                })?
            };
            return Ok((status, headers, value));
        }
    }

    /// Submits up to 20 JDLs in one call; DiracX answers the IDs in order.
    async fn submit_chunk(&self, specs: &[JobSpec]) -> anyhow::Result<Vec<BackendStatus>> {
        let jdls: Vec<String> = specs.iter().map(|s| self.jdl(s)).collect();
        let (_, _, answer) = self
            .call(reqwest::Method::POST, "/api/jobs/jdl", &[], &json!(jdls))
            .await?;
        let jobs = answer
            .as_array()
            .context("the submission answer is not a list")?;
        if jobs.len() != specs.len() {
            bail!(
                "DiracX answered {} jobs for {} JDLs: {answer}",
                jobs.len(),
                specs.len()
            );
        }
        jobs.iter()
            .map(|job| {
                let id = job
                    .get("JobID")
                    .and_then(Value::as_u64)
                    .with_context(|| format!("no JobID in {job}"))?;
                let raw = job
                    .get("Status")
                    .and_then(Value::as_str)
                    .unwrap_or("Received");
                Ok(BackendStatus {
                    cpu_ms: None,
                    backend_job_id: id.to_string(),
                    state: JobState::Queued,
                    raw: raw.to_string(),
                    exit_code: None,
                })
            })
            .collect()
    }

    /// Every job matching `search`, following DiracX's pages.
    async fn search(&self, search: Value) -> anyhow::Result<Vec<Value>> {
        let mut found = Vec::new();
        let per_page = SEARCH_BATCH.to_string();
        for page in 1.. {
            let page = page.to_string();
            let body = json!({
                "parameters": ["JobID", "JobName", "Status", "MinorStatus", "ApplicationStatus"],
                "search": search,
                "sort": [{"parameter": "JobID", "direction": "asc"}],
            });
            let (status, _, answer) = self
                .call(
                    reqwest::Method::POST,
                    "/api/jobs/search",
                    &[("page", &page), ("per_page", &per_page)],
                    &body,
                )
                .await?;
            // 416: past the last page.
            if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                break;
            }
            let jobs = answer
                .as_array()
                .context("the search answer is not a list")?;
            found.extend(jobs.iter().cloned());
            // 200 is the whole (last) page; 206 says more may follow.
            if status != reqwest::StatusCode::PARTIAL_CONTENT || jobs.len() < SEARCH_BATCH {
                break;
            }
        }
        Ok(found)
    }

    fn status_of(job: &Value) -> Option<BackendStatus> {
        let id = job.get("JobID")?.as_u64()?;
        let raw = job.get("Status")?.as_str()?.to_string();
        let minor = job
            .get("MinorStatus")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // DIRAC reports no exit code; the minor status says why a job failed.
        Some(BackendStatus {
            cpu_ms: None,
            backend_job_id: id.to_string(),
            state: map_status(&raw),
            raw: if minor.is_empty() {
                raw
            } else {
                format!("{raw}: {minor}")
            },
            exit_code: None,
        })
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Backend for Dirac {
    fn name(&self) -> &str {
        &self.name
    }

    fn capacity(&self) -> usize {
        self.max_in_flight
    }

    fn submit<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<BackendStatus>> {
        Box::pin(async move {
            let mut statuses = self.submit_chunk(std::slice::from_ref(spec)).await?;
            statuses.pop().context("DiracX answered no job")
        })
    }

    fn submit_many<'a>(
        &'a self,
        specs: &'a [JobSpec],
    ) -> BoxFuture<'a, Vec<anyhow::Result<BackendStatus>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(specs.len());
            let mut chunks = specs.chunks(SUBMIT_BATCH);
            for chunk in chunks.by_ref() {
                match self.submit_chunk(chunk).await {
                    Ok(statuses) => results.extend(statuses.into_iter().map(Ok)),
                    Err(error) => {
                        let error = format!("{error:#}");
                        results.extend(chunk.iter().map(|_| Err(anyhow::anyhow!("{error}"))));
                        break;
                    }
                }
            }
            for chunk in chunks {
                results.extend(
                    chunk
                        .iter()
                        .map(|_| Err(anyhow::anyhow!("not submitted: an earlier call failed"))),
                );
            }
            results
        })
    }

    fn poll<'a>(
        &'a self,
        in_flight: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<BackendStatus>>> {
        Box::pin(async move {
            let mut statuses = Vec::with_capacity(in_flight.len());
            for chunk in in_flight.chunks(SEARCH_BATCH) {
                let ids: Vec<u64> = chunk.iter().filter_map(|id| id.parse().ok()).collect();
                let jobs = self
                    .search(json!([{"parameter": "JobID", "operator": "in", "values": ids}]))
                    .await?;
                statuses.extend(jobs.iter().filter_map(Self::status_of));
            }
            Ok(statuses)
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(SEARCH_BATCH) {
                let at = now_rfc3339();
                let body: serde_json::Map<String, Value> = chunk
                    .iter()
                    .map(|id| {
                        (
                            id.clone(),
                            json!({ &at: {
                                "Status": "Killed",
                                "MinorStatus": "Cancelled through prodsys",
                                "Source": "prodsys",
                            }}),
                        )
                    })
                    .collect();
                let (_, _, answer) = self
                    .call(
                        reqwest::Method::PATCH,
                        "/api/jobs/status",
                        &[],
                        &Value::Object(body),
                    )
                    .await?;
                if let Some(failed) = answer.get("failed").and_then(Value::as_object)
                    && !failed.is_empty()
                {
                    let failed = Value::Object(failed.clone());
                    tracing::warn!(backend = %self.name, %failed, "DiracX could not kill some jobs");
                }
            }
            self.changed.notify_one();
            Ok(())
        })
    }

    fn find<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move {
            // By JobName, whatever the job's status: one that finished while
            // no dispatcher watched is found too, and followed by its ID.
            let tag = spec.tag.as_str();
            let jobs = self
                .search(json!([{"parameter": "JobName", "operator": "eq", "value": tag}]))
                .await?;
            Ok(jobs
                .iter()
                .find(|job| job.get("JobName").and_then(Value::as_str) == Some(tag))
                .and_then(|job| job.get("JobID")?.as_u64())
                .map(|id| id.to_string()))
        })
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            // The search `find` makes, for a name no job has: answered only
            // by a server that is up and takes the token.
            self.search(
                json!([{"parameter": "JobName", "operator": "eq", "value": "prodsys-probe"}]),
            )
            .await
            .map(|_| ())
        })
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DiracSettings {
        DiracSettings {
            url: "https://diracx.example.org/".into(),
            token: Some(SecretString::from("t".to_string())),
            token_file: None,
            token_command: vec![],
            token_refresh_margin_s: 300,
            ca_file: None,
            max_in_flight: 10,
            sites: vec!["LCG.CNAF.it".into()],
            output_se: Some("CNAF-Disk".into()),
            jdl: BTreeMap::from([("Priority".into(), "5".into())]),
            shared_filesystem: false,
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            tag: "d1.CTA-000001.000003.a1".into(),
            production_id: "CTA-000001".into(),
            program: "prodsys-toysim".into(),
            args: vec!["--layout".into(), "it's \"quoted\"".into()],
            env: vec![("PRODSYS_RUN".into(), "42".into())],
            workdir: PathBuf::from("/w"),
            output_dir: PathBuf::from("/w/output"),
            cpu_seconds: 1000.0,
            memory_mb: 2048,
            disk_mb: 10.0,
            remote: None,
            input_list: None,
        }
    }

    #[test]
    fn dirac_statuses_map_to_ours() {
        for queued in ["Received", "Checking", "Waiting", "Matched", "Rescheduled"] {
            assert_eq!(map_status(queued), JobState::Queued, "{queued}");
        }
        for running in ["Running", "Stalled", "Completing", "Completed"] {
            assert_eq!(map_status(running), JobState::Running, "{running}");
        }
        assert_eq!(map_status("Done"), JobState::Done);
        for failed in ["Failed", "Killed", "Deleted"] {
            assert_eq!(map_status(failed), JobState::Failed, "{failed}");
        }
    }

    /// The script a JDL in script form carries, decoded.
    fn script_of(jdl: &str) -> String {
        let arguments = jdl
            .lines()
            .find_map(|l| l.trim().strip_prefix("Arguments = \"-c 'echo "))
            .unwrap_or_else(|| panic!("a script: {jdl}"));
        let encoded = arguments.split_once(' ').unwrap().0;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_jdl_names_groups_limits_and_quotes_the_job() {
        let dirac = Dirac::new("dirac-cta", &settings()).unwrap();
        let mut plain = spec();
        plain.args = vec!["--layout".into(), "it's alpha".into()];
        let jdl = dirac.jdl(&plain);
        assert!(
            jdl.contains(r#"JobName = "d1.CTA-000001.000003.a1";"#),
            "{jdl}"
        );
        assert!(jdl.contains(r#"JobGroup = "CTA-000001";"#), "{jdl}");
        assert!(jdl.contains(r#"Executable = "prodsys-toysim";"#), "{jdl}");
        assert!(
            jdl.contains(r#"Arguments = "--layout 'it'\''s alpha'";"#),
            "{jdl}"
        );
        assert!(jdl.contains("CPUTime = 2000;"), "{jdl}");
        assert!(jdl.contains("MaxRAM = 2048;"), "{jdl}");
        assert!(
            jdl.contains(r#"ExecutionEnvironment = {"PRODSYS_RUN=42"};"#),
            "{jdl}"
        );
        assert!(
            jdl.contains(r#"OutputSandbox = {"stdout.log", "stderr.log"};"#),
            "{jdl}"
        );
        assert!(jdl.contains(r#"Site = {"LCG.CNAF.it"};"#), "{jdl}");
        assert!(jdl.contains(r#"OutputSE = "CNAF-Disk";"#), "{jdl}");
        assert!(jdl.contains("Priority = 5;"), "{jdl}");
        assert!(jdl.starts_with('[') && jdl.ends_with(']'));
        // A double quote cannot be in a JDL string: the command goes as a script.
        let jdl = dirac.jdl(&spec());
        assert!(jdl.contains(r#"Executable = "/bin/sh";"#), "{jdl}");
        assert_eq!(jdl.matches('"').count() % 2, 0);
        assert!(!jdl.contains("ExecutionEnvironment"), "{jdl}");
        assert!(jdl.contains(r#""prodsys-job.sh"}"#), "{jdl}");
        assert_eq!(
            script_of(&jdl),
            "#!/bin/sh\nset -e\nexport PRODSYS_RUN=42\nexec prodsys-toysim --layout 'it'\\''s \"quoted\"'\n"
        );
    }

    #[test]
    fn a_command_naming_its_output_directory_writes_into_the_jobs_own() {
        let dirac = Dirac::new("dirac-cta", &settings()).unwrap();
        let mut container = spec();
        container.program = "echo".into();
        container.args = vec![
            "run".into(),
            "-v".into(),
            "/w/output:/output".into(),
            "--env".into(),
            "X=$it's".into(),
            "img@sha256:00".into(),
        ];
        let jdl = dirac.jdl(&container);
        assert!(jdl.contains(r#"Executable = "/bin/sh";"#), "{jdl}");
        let script = script_of(&jdl);
        assert!(
            script.contains(
                r#"exec echo run -v "$PWD"/output:/output --env 'X=$it'\''s' img@sha256:00"#
            ),
            "{script}"
        );
        // As a worker node's shell runs it: the bind is the job's own directory.
        let arguments = jdl
            .lines()
            .find_map(|l| l.trim().strip_prefix("Arguments = \""))
            .and_then(|l| l.strip_suffix("\";"))
            .unwrap();
        let site = std::env::temp_dir().join(format!("prodsys-jdl-{}", std::process::id()));
        std::fs::create_dir_all(&site).unwrap();
        let echoed = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("/bin/sh {arguments}"))
            .current_dir(&site)
            .output()
            .unwrap();
        let site = site.canonicalize().unwrap();
        assert_eq!(
            String::from_utf8(echoed.stdout).unwrap().trim(),
            format!(
                "run -v {}/output:/output --env X=$it's img@sha256:00",
                site.display()
            )
        );
        assert!(site.join("output").is_dir());
        assert!(site.join("prodsys-job.sh").is_file());
        std::fs::remove_dir_all(site).ok();
    }

    #[test]
    fn a_remote_job_writes_its_inputs_runs_and_uploads_its_outputs() {
        let dirac = Dirac::new("dirac-cta", &settings()).unwrap();
        let mut remote = spec();
        remote.args = vec![
            "--inputs".into(),
            "/w/inputs.txt".into(),
            "--out".into(),
            "/w/output".into(),
        ];
        remote.remote = Some(crate::remote::RemoteOutputs {
            output_url: "root://se:1094//data/cta/CTA-000001/Data".into(),
            manifest_url: "root://se:1094//data/.prodsys/outputs/CTA-000001/t.txt".into(),
        });
        remote.input_list = Some((
            PathBuf::from("/w/inputs.txt"),
            "root://se:1094//data/a.simtel\nroot://se:1094//data/b.simtel\n".into(),
        ));
        let jdl = dirac.jdl(&remote);
        assert!(jdl.contains(r#"Executable = "/bin/sh";"#), "{jdl}");
        assert!(
            jdl.contains(r#""prodsys-outputs.txt", "prodsys-job.sh"}"#),
            "{jdl}"
        );
        let script = script_of(&jdl);
        assert!(
            script
                .contains("export PRODSYS_OUTPUT_URL='root://se:1094//data/cta/CTA-000001/Data'\n"),
            "{script}"
        );
        assert!(
            script.contains(
                "cat > inputs.txt <<'PRODSYS_INPUTS'\nroot://se:1094//data/a.simtel\nroot://se:1094//data/b.simtel\nPRODSYS_INPUTS\n"
            ),
            "{script}"
        );
        // Paths in the attempt's directory are the job's own; the command
        // is not the script's last word: the upload follows it.
        assert!(
            script.contains(r#"prodsys-toysim --inputs "$PWD"/inputs.txt --out "$PWD"/output"#),
            "{script}"
        );
        assert!(!script.contains("exec prodsys-toysim"), "{script}");
        assert!(
            script.contains(r#"for prodsys_file in "$PWD"/output/*; do"#),
            "{script}"
        );
        assert!(
            script.contains(r#"prodsys_put "$prodsys_manifest" "$PRODSYS_OUTPUT_MANIFEST_URL""#),
            "{script}"
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let mut two = settings();
        two.token_command = vec!["get-token".into()];
        let error = Dirac::new("dirac-cta", &two).err().unwrap().to_string();
        assert!(error.contains("exactly one of token"), "{error}");
        let mut url = settings();
        url.url = "diracx.example.org".into();
        let error = Dirac::new("dirac-cta", &url).err().unwrap().to_string();
        assert!(error.contains("dirac-cta.url"), "{error}");
        let mut jdl = settings();
        jdl.jdl.insert("Bad Name".into(), "1".into());
        let error = Dirac::new("dirac-cta", &jdl).err().unwrap().to_string();
        assert!(error.contains("Bad Name"), "{error}");
    }

    #[test]
    fn a_jwt_expiry_is_read_from_its_claims() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"x","exp":1900000000}"#);
        let token = format!("eyJhbGciOiJFZERTQSJ9.{claims}.c2ln");
        assert_eq!(
            jwt_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(jwt_expiry("not-a-jwt"), None);
    }

    #[test]
    fn search_answers_become_statuses_with_the_raw_status_kept() {
        let failed = json!({"JobID": 7, "Status": "Failed", "MinorStatus": "Application Finished With Errors"});
        let status = Dirac::status_of(&failed).unwrap();
        assert_eq!(status.backend_job_id, "7");
        assert_eq!(status.state, JobState::Failed);
        assert_eq!(status.raw, "Failed: Application Finished With Errors");
        assert_eq!(status.exit_code, None);
        let done =
            Dirac::status_of(&json!({"JobID": 8, "Status": "Done", "MinorStatus": ""})).unwrap();
        assert_eq!((done.state, done.raw.as_str()), (JobState::Done, "Done"));
    }
}
