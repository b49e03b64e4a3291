//! Workload management backends. One object-safe trait; the dispatcher runs
//! one scheduler per named installation ("local", "slurm-local", "dirac-cta").
//! The scheduler reserves a job, submits it, then polls the backend in bulk.
//!
//! `local` runs each job as a process on this machine: bounded concurrency,
//! a working directory per attempt, stdout and stderr kept beside the outputs.
//! Each attempt runs under a supervisor ([`crate::supervisor`]) that outlives
//! the dispatcher; the attempt's directory is its backend ID, so any
//! dispatcher (after a restart, or another replica on the same work
//! directory) finds how it is from its files and never starts it again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use anyhow::Context;
use prodsys_core::JobState;
use tokio::sync::Notify;

use crate::supervisor::{self, Observed};

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
    /// Where the job writes its outputs; created before it starts (a
    /// container job binds it, and a bind needs an existing directory).
    pub output_dir: PathBuf,
    pub cpu_seconds: f64,
    pub memory_mb: u64,
    pub disk_mb: f64,
    /// Set when the installation does not share the work directory: where
    /// the job uploads its outputs and their manifest after its command.
    pub remote: Option<crate::remote::RemoteOutputs>,
    /// A chained job's input list (one input a line), which a remote job
    /// writes into its own directory before its command starts.
    pub input_list: Option<(PathBuf, String)>,
}

/// A job's state as the backend reports it, with the backend's own word kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub backend_job_id: String,
    pub state: JobState,
    pub raw: String,
    pub exit_code: Option<i32>,
    /// CPU time (user + system) of an ended attempt, in milliseconds, where
    /// the WMS reports it: the local executor from its processes' rusage
    /// (the supervisor's `times`), Slurm from the same lines its batch
    /// script writes; DIRAC leaves it unknown.
    pub cpu_ms: Option<u64>,
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
    /// The backend ID of the attempt `spec` describes (by its tag, or for the
    /// local executor its directory), if the backend has it: how a submission
    /// whose commit a crash lost is found again instead of being repeated.
    fn find<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<Option<String>>>;
    /// Woken when something changed, so the scheduler need not wait a whole poll interval.
    fn changed(&self) -> Arc<Notify>;
    /// Whether the installation can take work now, checked before each
    /// round's submissions; one that cannot is announced failing and given
    /// nothing. By default it can (a backend's own calls show it failing).
    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// This process no longer schedules the installation (its lease is lost
    /// or given up): what it holds back for later is left to the next holder.
    fn stand_down(&self) {}
}

/// Runs jobs as local processes, each under its supervisor, at most
/// `max_running` at once. Like a batch system it may also hold up to
/// `max_queued` attempts waiting for a slot, started the moment one frees
/// (not at the scheduler's next round), in the order they came. A waiting
/// attempt is written to its directory (`prodsys.queued`), so a dispatcher
/// that restarts, or a replica that takes the installation over, finds it and
/// starts it; `prodsys.started` still lets it start only once.
pub struct LocalExecutor {
    inner: Arc<Local>,
}

struct Local {
    name: String,
    max_running: usize,
    max_queued: usize,
    /// Root of the attempts' directories, probed before each round's submissions.
    work_dir: Option<PathBuf>,
    tools_dir: Option<PathBuf>,
    state: Mutex<State>,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// Supervisors this process started and has not yet reaped, by attempt
    /// directory, with their pids (for a cancel before the pid file exists).
    children: HashMap<String, u32>,
    /// Attempts this process found running that it did not start, told once as RUNNING.
    adopted: HashSet<String>,
    /// Attempts waiting for a slot, in order, and their IDs.
    waiting: VecDeque<Start>,
    waiting_ids: HashSet<String>,
    /// Attempts taken from the queue whose supervisor is being started.
    starting: usize,
    /// Attempts started from the queue, not yet told as RUNNING.
    untold: HashSet<String>,
}

impl State {
    fn running(&self) -> usize {
        self.children.len() + self.adopted.len() + self.starting
    }
}

/// What starting an attempt takes; kept in `prodsys.queued` while it waits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Start {
    tag: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
}

impl Start {
    fn of(spec: &JobSpec) -> Self {
        Self {
            tag: spec.tag.clone(),
            program: spec.program.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
        }
    }

    fn id(&self) -> String {
        self.workdir.to_string_lossy().into_owned()
    }
}

/// An attempt waiting for a slot: what starts it (written before the
/// submission is answered, readable only by the dispatcher's user).
pub const QUEUED_FILE: &str = "prodsys.queued";

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow::anyhow!("executor state poisoned"))
}

/// The status an attempt's recorded end means.
fn ended(id: &str, exit: &supervisor::Exit) -> BackendStatus {
    let (state, raw, exit_code) = match (exit.status, exit.signal()) {
        (0, _) => (JobState::Done, "exited 0".to_string(), Some(0)),
        // 137 is also how a container runtime reports a container the kernel
        // killed for exceeding its memory limit.
        (137, _) => (
            JobState::Failed,
            "exited 137: killed by SIGKILL (over its memory limit, or killed)".to_string(),
            Some(137),
        ),
        (_, Some(signal)) => (JobState::Failed, format!("killed by signal {signal}"), None),
        (code, None) => (JobState::Failed, format!("exited {code}"), Some(code)),
    };
    BackendStatus {
        backend_job_id: id.to_string(),
        state,
        raw,
        exit_code,
        cpu_ms: Some(((exit.user_s + exit.sys_s) * 1000.0).round().max(0.0) as u64),
    }
}

fn failed(id: &str, raw: String) -> BackendStatus {
    BackendStatus {
        cpu_ms: None,
        backend_job_id: id.to_string(),
        state: JobState::Failed,
        raw,
        exit_code: None,
    }
}

impl LocalExecutor {
    pub fn new(name: &str, max_running: usize, tools_dir: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Local {
                name: name.to_string(),
                max_running: max_running.max(1),
                max_queued: 0,
                work_dir: None,
                tools_dir,
                state: Mutex::default(),
                changed: Arc::new(Notify::new()),
            }),
        }
    }

    /// Probes `work_dir` before each round's submissions: an installation
    /// whose disk is gone or read-only takes no work.
    pub fn with_work_dir(mut self, work_dir: PathBuf) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before use")
            .work_dir = Some(work_dir);
        self
    }

    /// Holds up to `max_queued` attempts beyond the running ones, each started
    /// the moment a slot frees.
    pub fn with_queue(mut self, max_queued: usize) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before use")
            .max_queued = max_queued;
        self
    }
}

impl Local {
    fn resolve(&self, program: &str) -> PathBuf {
        match &self.tools_dir {
            Some(dir) if !program.contains('/') && dir.join(program).is_file() => dir.join(program),
            _ => PathBuf::from(program),
        }
    }

    /// Submits one attempt: started now if a slot is free and nothing waits,
    /// queued otherwise.
    async fn submit(self: &Arc<Self>, spec: &JobSpec) -> anyhow::Result<BackendStatus> {
        let (start, output_dir) = (Start::of(spec), spec.output_dir.clone());
        let queue = self.max_queued > 0;
        let prepared = start.clone();
        tokio::task::spawn_blocking(move || prepare(&prepared, &output_dir, queue)).await??;
        self.place(start).await
    }

    /// Submits attempts in order, their directories and queue entries made in
    /// one blocking task.
    async fn submit_many(
        self: &Arc<Self>,
        specs: &[JobSpec],
    ) -> Vec<anyhow::Result<BackendStatus>> {
        let work: Vec<(Start, PathBuf)> = specs
            .iter()
            .map(|spec| (Start::of(spec), spec.output_dir.clone()))
            .collect();
        let queue = self.max_queued > 0;
        let prepared = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(start, output_dir)| prepare(&start, &output_dir, queue).map(|()| start))
                .collect::<Vec<_>>()
        })
        .await;
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                return specs
                    .iter()
                    .map(|_| {
                        Err(anyhow::anyhow!(
                            "preparing the attempts' directories: {error}"
                        ))
                    })
                    .collect();
            }
        };
        let mut results = Vec::with_capacity(prepared.len());
        for start in prepared {
            results.push(match start {
                Ok(start) => self.place(start).await,
                Err(error) => Err(error),
            });
        }
        results
    }

    /// Starts a prepared attempt now if a slot is free and nothing waits;
    /// queues it otherwise.
    async fn place(self: &Arc<Self>, start: Start) -> anyhow::Result<BackendStatus> {
        let now = {
            let mut state = lock(&self.state)?;
            let room = state.waiting.is_empty() && state.running() < self.max_running;
            if room {
                state.starting += 1;
            }
            room
        };
        if now {
            let result = self.start(&start).await;
            lock(&self.state)?.starting -= 1;
            return result;
        }
        let id = start.id();
        {
            let mut state = lock(&self.state)?;
            if state.waiting_ids.insert(id.clone()) {
                state.waiting.push_back(start);
            }
        }
        // A slot may have freed meanwhile.
        self.pump();
        Ok(BackendStatus {
            cpu_ms: None,
            backend_job_id: id,
            state: JobState::Queued,
            raw: "queued: waiting for a free slot".into(),
            exit_code: None,
        })
    }

    /// Whether the scheduler should take a round now that an attempt ended:
    /// when at most half the queue still waits (a slot would soon have
    /// nothing to start; with no queue, always). With more waiting, the
    /// slots stay busy, and the next round (its poll interval, or the end
    /// that leaves the queue half empty) reports every end since and refills
    /// the queue in one go, instead of a round for each job that ends.
    fn running_low(&self) -> bool {
        lock(&self.state).map_or(true, |state| state.waiting.len() * 2 <= self.max_queued)
    }

    /// Starts waiting attempts while slots are free (in a task of its own).
    fn pump(self: &Arc<Self>) {
        let next = {
            let Ok(mut state) = lock(&self.state) else {
                return;
            };
            if state.running() >= self.max_running {
                return;
            }
            let Some(start) = state.waiting.pop_front() else {
                return;
            };
            state.waiting_ids.remove(&start.id());
            state.starting += 1;
            start
        };
        let local = self.clone();
        tokio::spawn(async move {
            let id = next.id();
            let result = local.start(&next).await;
            if let Ok(mut state) = lock(&local.state) {
                state.starting -= 1;
                if matches!(&result, Ok(status) if status.state == JobState::Running) {
                    state.untold.insert(id.clone());
                }
            }
            if let Err(error) = result {
                // An attempt that cannot start fails, saying why; it is not left waiting.
                tracing::warn!(job = %next.tag, error = format!("{error:#}"), "a queued attempt could not start");
                let message = format!("cannot start: {error:#}");
                let _ = std::fs::write(next.workdir.join("stderr.log"), &message);
                let _ = write_exit(&next.workdir, 126);
                local.changed.notify_one();
            }
            // A start alone rings no round: the attempt is told RUNNING by
            // the next one (a job's end or the poll interval), so a queue
            // that refills slots costs a round per job, not two.
            local.pump();
        });
    }

    async fn start(self: &Arc<Self>, spec: &Start) -> anyhow::Result<BackendStatus> {
        let id = spec.id();
        // At most one start per attempt directory, whoever tries.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(spec.workdir.join(supervisor::STARTED_FILE))
        {
            Ok(mut marker) => {
                use std::io::Write;
                writeln!(marker, "{}", spec.tag)?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::info!(job = %spec.tag, "attempt already started; following it");
                return Ok(BackendStatus {
                    cpu_ms: None,
                    backend_job_id: id,
                    state: JobState::Submitted,
                    raw: "already started".into(),
                    exit_code: None,
                });
            }
            Err(error) => {
                return Err(error).with_context(|| format!("starting {}", spec.tag));
            }
        }
        let stdout = std::fs::File::create(spec.workdir.join("stdout.log"))?;
        let stderr = std::fs::File::create(spec.workdir.join("stderr.log"))?;
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(supervisor::SCRIPT)
            .arg("prodsys-supervisor")
            .arg(self.resolve(&spec.program))
            .args(&spec.args)
            .current_dir(&spec.workdir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group, so cancel reaches whatever the job started.
            .process_group(0)
            // The job outlives this process: the next dispatcher adopts it.
            .kill_on_drop(false);
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
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                // A supervisor that cannot start is a failed attempt, not a dispatcher error.
                let message = format!("cannot start {}: {error}", spec.program);
                std::fs::write(spec.workdir.join("stderr.log"), &message)?;
                write_exit(&spec.workdir, 127)?;
                return Ok(failed(&id, message));
            }
        };
        lock(&self.state)?
            .children
            .insert(id.clone(), child.id().unwrap_or_default());
        let local = self.clone();
        let key = id.clone();
        // Reaps the supervisor (its files say how the job ended) and starts
        // what waits for the slot it frees.
        tokio::spawn(async move {
            let _ = child.wait().await;
            if let Ok(mut state) = local.state.lock() {
                state.children.remove(&key);
            }
            local.pump();
            if local.running_low() {
                local.changed.notify_one();
            }
        });
        Ok(BackendStatus {
            cpu_ms: None,
            backend_job_id: id,
            state: JobState::Running,
            raw: "process started".into(),
            exit_code: None,
        })
    }

    /// The change, if any, an attempt directory shows for the job `id`.
    fn look(&self, id: &str, now: SystemTime) -> anyhow::Result<Option<BackendStatus>> {
        let dir = Path::new(id);
        if !dir.is_absolute() {
            // An ID of a version that kept jobs only in memory.
            return Ok(Some(failed(
                id,
                "lost: the dispatcher restarted while the job ran".into(),
            )));
        }
        let ours = lock(&self.state)?.children.contains_key(id);
        let change = match supervisor::observe(dir, now) {
            Observed::Ended(exit) => {
                tracing::debug!(
                    job = id,
                    status = exit.status,
                    user_s = exit.user_s,
                    sys_s = exit.sys_s,
                    "attempt ended"
                );
                Some(ended(id, &exit))
            }
            Observed::Unreadable(error) => Some(failed(
                id,
                format!("the job's exit file cannot be read: {error}"),
            )),
            // Started by this process from its queue: told once as RUNNING.
            _ if ours && lock(&self.state)?.untold.remove(id) => {
                return Ok(Some(BackendStatus {
                    cpu_ms: None,
                    backend_job_id: id.to_string(),
                    state: JobState::Running,
                    raw: "process started (a slot freed)".into(),
                    exit_code: None,
                }));
            }
            // Started by this process and not reaped yet: its waiter wakes us.
            _ if ours => None,
            Observed::Running(_) => {
                return Ok(lock(&self.state)?.adopted.insert(id.to_string()).then(|| {
                    BackendStatus {
                        cpu_ms: None,
                        backend_job_id: id.to_string(),
                        state: JobState::Running,
                        raw: "running (adopted)".into(),
                        exit_code: None,
                    }
                }));
            }
            Observed::Starting => None,
            Observed::Gone => Some(failed(id, "lost: the job's supervisor is gone".into())),
            Observed::Unknown => {
                if lock(&self.state)?.waiting_ids.contains(id) {
                    return Ok(None);
                }
                match read_queued(dir) {
                    // Queued by a dispatcher before this one: waits here now.
                    Ok(Some(start)) => {
                        let mut state = lock(&self.state)?;
                        if state.waiting_ids.insert(id.to_string()) {
                            tracing::info!(job = %start.tag, "queued attempt adopted");
                            state.waiting.push_back(start);
                        }
                        return Ok(None);
                    }
                    Ok(None) => Some(failed(id, "lost: the job never started".into())),
                    Err(error) => Some(failed(
                        id,
                        format!("lost: its queue entry cannot be read: {error:#}"),
                    )),
                }
            }
        };
        if change.is_some() {
            let mut state = lock(&self.state)?;
            state.adopted.remove(id);
            state.untold.remove(id);
        }
        Ok(change)
    }

    /// Ends an attempt that waits for a slot, before it starts (claiming its
    /// start, so no dispatcher starts it after): true if it was one.
    fn cancel_waiting(&self, id: &str) -> anyhow::Result<bool> {
        {
            let mut state = lock(&self.state)?;
            if state.waiting_ids.remove(id) {
                state.waiting.retain(|start| start.id() != id);
            }
        }
        let dir = Path::new(id);
        if !dir.join(QUEUED_FILE).exists() {
            return Ok(false);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(supervisor::STARTED_FILE))
        {
            Ok(_) => {
                std::fs::write(dir.join("stderr.log"), "cancelled before it started\n")?;
                write_exit(dir, 143)?;
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            // Its directory is gone: nothing to start, nothing to kill.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(error) => Err(error).with_context(|| format!("cancelling {id}")),
        }
    }
}

/// Makes an attempt's output directory (a container job binds it, and a
/// bind needs an existing directory) and, where attempts may wait, its
/// queue entry: written before the submission is answered, so whoever
/// schedules the installation next can start it.
fn prepare(start: &Start, output_dir: &Path, queue: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;
    if !queue {
        return Ok(());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = start.workdir.join(QUEUED_FILE);
    let tmp = start.workdir.join(format!("{QUEUED_FILE}.tmp"));
    let body = serde_json::to_vec(start)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("queueing {}", tmp.display()))?;
    file.write_all(&body)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("queueing {}", path.display()))
}

/// The queue entry of an attempt directory, if it has one.
fn read_queued(dir: &Path) -> anyhow::Result<Option<Start>> {
    match std::fs::read(dir.join(QUEUED_FILE)) {
        Ok(body) => Ok(Some(serde_json::from_slice(&body)?)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Records an end for an attempt whose supervisor could not start.
fn write_exit(dir: &Path, status: i32) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{}.tmp", supervisor::EXIT_FILE));
    std::fs::write(&tmp, format!("exit {status}\n"))?;
    std::fs::rename(&tmp, dir.join(supervisor::EXIT_FILE))?;
    Ok(())
}

impl Backend for LocalExecutor {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capacity(&self) -> usize {
        self.inner.max_running + self.inner.max_queued
    }

    fn submit<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<BackendStatus>> {
        Box::pin(self.inner.submit(spec))
    }

    fn submit_many<'a>(
        &'a self,
        specs: &'a [JobSpec],
    ) -> BoxFuture<'a, Vec<anyhow::Result<BackendStatus>>> {
        Box::pin(self.inner.submit_many(specs))
    }

    fn poll<'a>(
        &'a self,
        in_flight: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<BackendStatus>>> {
        Box::pin(async move {
            let now = SystemTime::now();
            let local = self.inner.clone();
            let ids = in_flight.to_vec();
            // File reads, many of them: off the async workers.
            let changes = tokio::task::spawn_blocking(move || {
                let mut changes = Vec::new();
                for id in &ids {
                    if let Some(status) = local.look(id, now)? {
                        changes.push(status);
                    }
                }
                anyhow::Ok(changes)
            })
            .await??;
            // Queued attempts adopted from an earlier dispatcher start as slots allow.
            self.inner.pump();
            Ok(changes)
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut pids = Vec::with_capacity(ids.len());
            for id in ids {
                if self.inner.cancel_waiting(id)? {
                    continue;
                }
                let own = lock(&self.inner.state)?
                    .children
                    .get(id)
                    .copied()
                    .filter(|p| *p != 0);
                let pid =
                    own.or_else(
                        || match supervisor::observe(Path::new(id), SystemTime::now()) {
                            Observed::Running(pid) => Some(pid),
                            _ => None,
                        },
                    );
                pids.extend(pid);
            }
            for pid in pids {
                // SIGTERM to the job's whole process group, so the job may
                // clean up and nothing it started lingers; the supervisor records the end.
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", "--", &format!("-{pid}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
            Ok(())
        })
    }

    fn find<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move {
            // Started, or waiting in a queue (this dispatcher's or an earlier one's).
            if tokio::fs::try_exists(spec.workdir.join(QUEUED_FILE))
                .await
                .unwrap_or(false)
            {
                return Ok(Some(spec.workdir.to_string_lossy().into_owned()));
            }
            let started = spec.workdir.join(supervisor::STARTED_FILE);
            match tokio::fs::metadata(&started).await {
                Ok(_) => Ok(Some(spec.workdir.to_string_lossy().into_owned())),
                // No such directory (or a file where one of its parents
                // should be): the attempt never started here.
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    Ok(None)
                }
                Err(error) => {
                    Err(error).with_context(|| format!("looking for {}", started.display()))
                }
            }
        })
    }

    fn changed(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    fn stand_down(&self) {
        // Whoever schedules the installation next adopts them from their files.
        if let Ok(mut state) = lock(&self.inner.state) {
            state.waiting.clear();
            state.waiting_ids.clear();
        }
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let Some(dir) = &self.inner.work_dir else {
                return Ok(());
            };
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("work directory {}", dir.display()))?;
                let probe = dir.join(format!(".prodsys-probe-{}", std::process::id()));
                std::fs::write(&probe, b"")
                    .and_then(|()| std::fs::remove_file(&probe))
                    .with_context(|| format!("writing in {}", dir.display()))
            })
            .await?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(root: &Path, n: usize) -> JobSpec {
        let workdir = root.join(format!("job{n}"));
        std::fs::create_dir_all(&workdir).unwrap();
        JobSpec {
            tag: format!("TEST-000001.{n:06}.a1"),
            production_id: "TEST-000001".into(),
            program: "sleep".into(),
            args: vec!["0.2".into()],
            env: Vec::new(),
            output_dir: workdir.join("out"),
            workdir,
            cpu_seconds: 1.0,
            memory_mb: 64,
            disk_mb: 1.0,
            remote: None,
            input_list: None,
        }
    }

    fn ended(root: &Path, jobs: usize) -> usize {
        (0..jobs)
            .filter(|n| {
                root.join(format!("job{n}"))
                    .join(supervisor::EXIT_FILE)
                    .exists()
            })
            .count()
    }

    /// A slot refilled from the queue rings no round by starting; an end
    /// rings one only once at most half the queue still waits, so a full
    /// queue costs a round for every few jobs, not two for each.
    #[tokio::test]
    async fn ends_ring_the_scheduler_only_once_the_queue_runs_low() {
        let root = std::env::temp_dir().join(format!("prodsys-local-{}", uuid::Uuid::new_v4()));
        let executor = LocalExecutor::new("local", 1, None).with_queue(4);
        let changed = executor.changed();
        let jobs = 5;
        for n in 0..jobs {
            executor.submit(&spec(&root, n)).await.unwrap();
        }
        // One runs, four wait: the first end leaves three (more than half)
        // waiting, the second two.
        tokio::time::timeout(Duration::from_secs(30), changed.notified())
            .await
            .expect("an end rang the scheduler once the queue ran low");
        let seen = ended(&root, jobs);
        assert!(
            seen >= 2,
            "rung with {seen} attempt(s) ended, before the queue ran low"
        );
        // With nothing left waiting, every end rings.
        tokio::time::timeout(Duration::from_secs(30), async {
            while ended(&root, jobs) < jobs {
                changed.notified().await;
            }
        })
        .await
        .expect("the last ends rang too");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
