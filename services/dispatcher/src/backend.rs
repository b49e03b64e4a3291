//! Workload management backends. One object-safe trait; the dispatcher runs
//! one scheduler per named installation ("local", "slurm-local", "dirac-cta").
//! The scheduler reserves a job, submits it, then polls the backend in bulk.
//!
//! `local` runs each job as a process on this machine: bounded concurrency,
//! a working directory per attempt, stdout and stderr kept beside the outputs.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use prodsys_core::JobState;
use tokio::sync::Notify;

/// Everything a backend needs to run one attempt of a job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Unique per attempt and stable (`CTA-000001.000042.a1`), so a backend
    /// can be searched for it after a crash.
    pub tag: String,
    pub production_id: String,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub cpu_seconds: f64,
    pub memory_mb: u64,
    pub disk_mb: f64,
}

/// A job's state as the backend reports it, with the backend's own word kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub backend_job_id: String,
    pub state: JobState,
    pub raw: String,
    pub exit_code: Option<i32>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A workload management system installation.
pub trait Backend: Send + Sync + 'static {
    /// The installation's name, as requests choose it.
    fn name(&self) -> &str;
    /// Most jobs it may hold at once (queued or running); the rest wait, in order of priority.
    fn capacity(&self) -> usize;
    /// Submits one attempt; returns the backend's ID and the state right after.
    fn submit<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<BackendStatus>>;
    /// Submits several attempts, answering for each in order; a backend with a
    /// bulk call overrides this. By default one by one, stopping at the first error.
    fn submit_many<'a>(
        &'a self,
        specs: &'a [JobSpec],
    ) -> BoxFuture<'a, Vec<anyhow::Result<BackendStatus>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(specs.len());
            let mut failed = false;
            for spec in specs {
                if failed {
                    results.push(Err(anyhow::anyhow!(
                        "not submitted: an earlier submission failed"
                    )));
                    continue;
                }
                let result = self.submit(spec).await;
                failed = result.is_err();
                results.push(result);
            }
            results
        })
    }
    /// The state of these in-flight jobs, in bulk; a job not mentioned is unchanged.
    fn poll<'a>(
        &'a self,
        in_flight: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<BackendStatus>>>;
    /// Kills these jobs.
    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, anyhow::Result<()>>;
    /// The backend ID of the job submitted under `tag`, if the backend has one:
    /// how a submission whose commit a crash lost is found again.
    fn find<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, anyhow::Result<Option<String>>>;
    /// Woken when something changed, so the scheduler need not wait a whole poll interval.
    fn changed(&self) -> Arc<Notify>;
}

/// Runs jobs as local processes.
pub struct LocalExecutor {
    name: String,
    max_running: usize,
    tools_dir: Option<PathBuf>,
    /// Jobs started by this process, by tag: `None` while running, then how it ended.
    jobs: Arc<Mutex<HashMap<String, Option<BackendStatus>>>>,
    /// Process ids of running jobs, for cancel.
    pids: Arc<Mutex<HashMap<String, u32>>>,
    changed: Arc<Notify>,
}

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow::anyhow!("executor state poisoned"))
}

impl LocalExecutor {
    pub fn new(name: &str, max_running: usize, tools_dir: Option<PathBuf>) -> Self {
        Self {
            name: name.to_string(),
            max_running: max_running.max(1),
            tools_dir,
            jobs: Arc::default(),
            pids: Arc::default(),
            changed: Arc::new(Notify::new()),
        }
    }

    fn resolve(&self, program: &str) -> PathBuf {
        match &self.tools_dir {
            Some(dir) if !program.contains('/') && dir.join(program).is_file() => dir.join(program),
            _ => PathBuf::from(program),
        }
    }

    async fn start(&self, spec: &JobSpec) -> anyhow::Result<BackendStatus> {
        tokio::fs::create_dir_all(&spec.workdir)
            .await
            .with_context(|| format!("creating {}", spec.workdir.display()))?;
        let stdout = std::fs::File::create(spec.workdir.join("stdout.log"))?;
        let stderr = std::fs::File::create(spec.workdir.join("stderr.log"))?;
        let mut command = tokio::process::Command::new(self.resolve(&spec.program));
        command
            .args(&spec.args)
            .current_dir(&spec.workdir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so cancel reaches whatever the job started.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.tools_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let joined = std::env::join_paths(
                std::iter::once(dir.clone()).chain(std::env::split_paths(&path)),
            )?;
            command.env("PATH", joined);
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let tag = spec.tag.clone();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                // A command that cannot start is a failed attempt, not a dispatcher error.
                let message = format!("cannot start {}: {error}", spec.program);
                std::fs::write(spec.workdir.join("stderr.log"), &message)?;
                return Ok(BackendStatus {
                    backend_job_id: tag,
                    state: JobState::Failed,
                    raw: message,
                    exit_code: None,
                });
            }
        };
        lock(&self.jobs)?.insert(tag.clone(), None);
        if let Some(pid) = child.id() {
            lock(&self.pids)?.insert(tag.clone(), pid);
        }
        let jobs = self.jobs.clone();
        let pids = self.pids.clone();
        let changed = self.changed.clone();
        let id = tag.clone();
        tokio::spawn(async move {
            let ended = |state, raw: String, exit_code| BackendStatus {
                backend_job_id: id.clone(),
                state,
                raw,
                exit_code,
            };
            let status = match child.wait().await {
                Ok(exit) if exit.success() => ended(JobState::Done, "exited 0".into(), Some(0)),
                Ok(exit) => match exit.code() {
                    Some(code) => ended(JobState::Failed, format!("exited {code}"), Some(code)),
                    None => ended(JobState::Failed, "killed by a signal".into(), None),
                },
                Err(error) => ended(JobState::Failed, format!("lost: {error}"), None),
            };
            if let Ok(mut map) = pids.lock() {
                map.remove(&id);
            }
            if let Ok(mut map) = jobs.lock() {
                map.insert(id, Some(status));
            }
            changed.notify_one();
        });
        Ok(BackendStatus {
            backend_job_id: tag,
            state: JobState::Running,
            raw: "process started".into(),
            exit_code: None,
        })
    }
}

impl Backend for LocalExecutor {
    fn name(&self) -> &str {
        &self.name
    }

    fn capacity(&self) -> usize {
        self.max_running
    }

    fn submit<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<BackendStatus>> {
        Box::pin(self.start(spec))
    }

    fn poll<'a>(
        &'a self,
        in_flight: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<BackendStatus>>> {
        Box::pin(async move {
            let mut jobs = lock(&self.jobs)?;
            let mut ended = Vec::new();
            for id in in_flight {
                match jobs.get(id) {
                    Some(Some(status)) => {
                        ended.push(status.clone());
                        jobs.remove(id);
                    }
                    Some(None) => {}
                    // Not started by this process: it died with an earlier one.
                    None => ended.push(BackendStatus {
                        backend_job_id: id.clone(),
                        state: JobState::Failed,
                        raw: "lost: the dispatcher restarted while the job ran".into(),
                        exit_code: None,
                    }),
                }
            }
            Ok(ended)
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let pids: Vec<u32> = {
                let map = lock(&self.pids)?;
                ids.iter().filter_map(|id| map.get(id).copied()).collect()
            };
            for pid in pids {
                // SIGTERM to the job's whole process group, so the job may
                // clean up and nothing it started lingers; its waiter records the end.
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", "--", &format!("-{pid}")])
                    .status()
                    .await;
            }
            Ok(())
        })
    }

    fn find<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move { Ok(lock(&self.jobs)?.contains_key(tag).then(|| tag.to_string())) })
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}
