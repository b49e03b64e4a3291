//! The scheduler of one backend installation: submits ready jobs while the
//! installation has room, polls its in-flight jobs in bulk, retries failed
//! attempts, registers outputs, cancels, and closes finished productions.
//! Every change commits with its events (`job.status` batches, `job.output`,
//! `production.completed`) in one transaction; status changes not yet
//! committed are kept and applied again.
//!
//! Submission is reserve-then-submit: a job is first committed as SUBMITTED
//! without a backend ID, then submitted under its attempt's stable tag, then
//! its backend ID is committed. A job found reserved without an ID (the
//! dispatcher died in between) is looked up on the backend by its tag before
//! anything is submitted again, so an attempt is never submitted twice.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prodsys_core::events::{INSTALLATION_HEALTH, JOB_OUTPUT, JOB_STATUS, PRODUCTION_COMPLETED};
use prodsys_core::{JobState, ProductionState, Profile, ProfileSet};
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, OutboxEvent};
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_server::outbox_event;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendStatus, JobSpec};
use crate::domain::{self, JobRow};
use crate::lease::Lease;
use crate::outputs::{Scanned, scan_outputs_under};
use crate::store;

pub(crate) struct Scheduler {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    pub backend: Arc<dyn Backend>,
    pub work_dir: PathBuf,
    /// Prefix of every backend job name, unique to this deployment.
    pub deployment: String,
    pub wake: Arc<Wake>,
    pub poll_interval: Duration,
    /// This replica's lease on the installation: rounds run only while it is held.
    pub lease: Arc<Lease>,
    /// Groups of installations, for the jobs of productions that name one.
    pub federation: Arc<crate::federation::Federation>,
    /// Set when the installation does not share the work directory: the
    /// storages its jobs upload their outputs to (see `remote`).
    pub remote: Option<Arc<crate::remote::Destinations>>,
}

/// What rings a scheduler before its poll interval is up.
#[derive(Default)]
pub(crate) struct Wake {
    /// Jobs became ready: worth a round only while the installation has
    /// room, so a full installation is not looked at again for every
    /// production that arrives (it is when one of its jobs ends, or its
    /// poll interval is up).
    ready: Notify,
    /// Something a round acts on whatever the room: a cancel, a chained
    /// production's inputs or end.
    now: Notify,
}

impl Wake {
    pub(crate) fn ready(&self) {
        self.ready.notify_one();
    }

    pub(crate) fn now(&self) {
        self.now.notify_one();
    }
}

/// The events one transaction will publish.
#[derive(Default)]
pub(crate) struct Changes {
    /// The installation whose scheduler makes the changes.
    installation: String,
    transitions: Vec<pb::JobTransition>,
    outputs: Vec<OutboxEvent>,
    touched: BTreeSet<String>,
    /// Job rows to update, written in one statement when the changes commit.
    updates: Vec<store::JobUpdate>,
}

impl Changes {
    pub(crate) fn transition(&mut self, job: &JobRow, attempt: i32, state: JobState, raw: &str) {
        self.touched.insert(job.production_id.clone());
        self.transitions.push(pb::JobTransition {
            production_id: job.production_id.clone(),
            job_index: job.job_index as u64,
            attempt: attempt as u32,
            state: state.to_proto() as i32,
            raw_status: raw.to_string(),
            at_unix_ms: chrono::Utc::now().timestamp_millis(),
            installation: self.installation.clone(),
        });
    }

    /// The job's row is to say `state` in `attempt` (written at commit).
    pub(crate) fn set_job(
        &mut self,
        job: &JobRow,
        state: JobState,
        attempt: i32,
        status: &BackendStatus,
    ) {
        self.updates.push(store::JobUpdate {
            production_id: job.production_id.clone(),
            job_index: job.job_index,
            state,
            attempt,
            raw: status.raw.clone(),
            exit_code: status.exit_code,
            cpu_ms: status.cpu_ms,
        });
    }

    /// A retry that waits to be placed again, anywhere in its group.
    pub(crate) fn unplaced(&mut self) {
        if let Some(last) = self.transitions.last_mut() {
            last.installation.clear();
        }
    }
}

/// The time each step of a round took, for the round's debug line.
struct Steps {
    last: std::time::Instant,
    taken: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
            taken: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.taken.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, took)) in self.taken.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {:.1} ms", took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// The shortest time between the starts of two rounds of one scheduler.
const MIN_ROUND_GAP: Duration = Duration::from_millis(50);

/// Longest time between two looks for jobs reserved without a backend ID
/// while no round gave a reason to look (see `rounds`).
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Transitions per `job.status` event of a cancel (about 60 bytes each).
const CANCEL_TRANSITIONS_PER_EVENT: usize = 10_000;

/// Longest wait between two rounds while the backend fails.
const ROUND_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Most in-flight jobs polled in one round.
const POLL_BATCH: i64 = 10_000;

impl Scheduler {
    /// Stands by until this replica holds the installation's lease, runs
    /// rounds while it does, and gives it up on shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let backend = self.backend.name().to_string();
        let retry = (self.lease.ttl() / 3).max(Duration::from_millis(10));
        let mut standing_by = false;
        while !shutdown.is_cancelled() {
            let taken_at = std::time::Instant::now();
            match self.lease.acquire().await {
                Ok(Some(previous)) => {
                    tracing::info!(%backend, owner = self.lease.owner(), previous = previous.as_deref().unwrap_or(""),
                        "holding the installation's lease; scheduling its jobs");
                    standing_by = false;
                    let held = self.lease.hold(&shutdown);
                    let heartbeat = self.lease.heartbeat(held.clone(), taken_at);
                    tokio::join!(heartbeat, async {
                        self.rounds(&held).await;
                        self.backend.stand_down();
                        held.cancel();
                    });
                    continue;
                }
                Ok(None) => {
                    if !standing_by {
                        tracing::info!(%backend, "another dispatcher holds the installation's lease; standing by");
                        standing_by = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(%backend, error = format!("{error:#}"), "taking the installation's lease failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(retry) => {}
            }
        }
        // Graceful: a successor takes over at once; the jobs run on and are adopted.
        if let Err(error) = self.lease.release().await {
            tracing::warn!(%backend, error = format!("{error:#}"), "releasing the installation's lease failed");
        }
    }

    /// Scheduling rounds until `held` is cancelled (shutdown, or the lease lost).
    async fn rounds(&self, held: &CancellationToken) {
        let changed = self.backend.changed();
        let backend = self.backend.name().to_string();
        // Statuses polled but not yet committed survive a failed transaction here.
        let mut pending: Vec<BackendStatus> = Vec::new();
        // Consecutive rounds in which the backend failed: the wait between
        // rounds doubles with each, up to a minute, so a backend that is down
        // is not hammered; one good round resets it.
        let mut failing: u32 = 0;
        let mut backoff = prodsys_messaging::Backoff::new(
            self.poll_interval * 2,
            ROUND_BACKOFF_MAX.max(self.poll_interval * 2),
        );
        // What status was last told about this installation: None until told
        // once (so a restart announces the installation healthy again).
        let mut announced: Option<bool> = None;
        // Since when the installation fails (rounds in a row), if it does.
        let mut failing_since: Option<tokio::time::Instant> = None;
        // Whether jobs may be reserved here without a backend ID: on taking
        // the lease (a predecessor's submission a crash cut short) and after
        // a round whose submitting or reconciling failed. A round that
        // submitted every job it reserved left none, so the next one does
        // not look (one statement less a round), and at least every
        // RECONCILE_EVERY a round looks anyway.
        let mut reconcile_due = true;
        let mut reconciled_at = tokio::time::Instant::now();
        while !held.is_cancelled() {
            let round_started = tokio::time::Instant::now();
            prodsys_telemetry::metrics::metrics().scheduler_round(&backend);
            // How long each step of the round took (logged at debug level).
            let mut steps = Steps::new();
            let mut backend_failed = false;
            let mut last_error = String::new();
            if reconcile_due || failing > 0 || reconciled_at.elapsed() >= RECONCILE_EVERY {
                reconciled_at = tokio::time::Instant::now();
                match self.reconcile(failing > 0).await {
                    Ok(()) => reconcile_due = false,
                    Err(error) => {
                        last_error = format!("{error:#}");
                        backend_failed = true;
                        tracing::warn!(%backend, error = format!("{error:#}"), "reconciling reserved jobs failed");
                    }
                }
            }
            if let Err(error) = self.cancel_requested().await {
                last_error = format!("{error:#}");
                backend_failed = true;
                tracing::warn!(%backend, error = format!("{error:#}"), "cancelling failed; retrying");
            }
            steps.mark("reconcile and cancel");
            let in_flight = match self.in_flight().await {
                Ok(ids) => ids,
                Err(error) => {
                    tracing::warn!(%backend, error = format!("{error:#}"), "reading in-flight jobs failed");
                    Vec::new()
                }
            };
            steps.mark("in flight");
            // Whether the backend answered a poll this round (then it needs no probe).
            let mut answered = false;
            if !in_flight.is_empty() {
                match self.backend.poll(&in_flight).await {
                    Ok(statuses) => {
                        answered = true;
                        pending.extend(statuses)
                    }
                    Err(error) => {
                        last_error = format!("{error:#}");
                        backend_failed = true;
                        tracing::warn!(%backend, error = format!("{error:#}"), "polling the backend failed")
                    }
                }
            }
            steps.mark("poll");
            let followed = pending.len();
            if !pending.is_empty() {
                match self.follow(&pending).await {
                    Ok(()) => pending.clear(),
                    Err(error) => tracing::warn!(
                        %backend,
                        error = format!("{error:#}"),
                        "applying job statuses failed; retrying"
                    ),
                }
            }
            steps.mark("follow");
            if let Err(error) = self.close_federated().await {
                tracing::warn!(%backend, error = format!("{error:#}"), "closing finished federated productions failed");
            }
            // What just ended frees room: count again after applying it
            // (nothing applied, nothing freed).
            let in_flight = if in_flight.is_empty() {
                0
            } else if followed == 0 {
                in_flight.len()
            } else {
                self.in_flight()
                    .await
                    .map_or(in_flight.len(), |ids| ids.len())
            };
            let free = self.backend.capacity().saturating_sub(in_flight);
            steps.mark("close and count");
            // An installation that cannot take work now (its probe fails)
            // is given none; placement sends its group's jobs elsewhere.
            let probed = if free > 0 && !answered {
                self.backend.probe().await
            } else {
                Ok(())
            };
            let submitted = match probed {
                Err(error) => Err(error.context("probing the installation")),
                Ok(()) => self.submit_ready(free).await,
            };
            let submitted = match submitted {
                Ok(n) => n,
                // Another installation's round (or a chained production's
                // jobs) took the same rows in another order: the database's
                // doing, not this installation's; the next round does it.
                Err(error) if lost_a_race(&error) => {
                    tracing::warn!(%backend, error = format!("{error:#}"), "submitting jobs met another transaction; retried next round");
                    reconcile_due = true;
                    0
                }
                Err(error) => {
                    reconcile_due = true;
                    last_error = format!("{error:#}");
                    backend_failed = true;
                    tracing::warn!(%backend, error = format!("{error:#}"), "submitting jobs failed");
                    0
                }
            };
            steps.mark("submit");
            tracing::debug!(%backend, followed, submitted, free, steps = %steps, "round");
            if held.is_cancelled() {
                // The lease was lost in the round: what failed is not the installation's fault.
                return;
            }
            let healthy = !backend_failed;
            if healthy && announced == Some(false) {
                // Back: what was given up here while it failed must not run.
                if let Err(error) = self.cancel_abandoned().await {
                    tracing::warn!(%backend, error = format!("{error:#}"), "cancelling given-up attempts failed");
                }
            }
            failing_since = if healthy {
                None
            } else {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                let limit = self.federation.settings.abandon_after_s;
                if limit > 0
                    && since.elapsed() >= Duration::from_secs(limit)
                    && let Err(error) = self.abandon_in_flight().await
                {
                    tracing::warn!(%backend, error = format!("{error:#}"), "giving up in-flight jobs failed");
                }
                Some(since)
            };
            if announced != Some(healthy) {
                match self.announce(healthy, &last_error).await {
                    Ok(()) => announced = Some(healthy),
                    Err(error) => {
                        tracing::warn!(%backend, error = format!("{error:#}"), "announcing the installation's health failed")
                    }
                }
            }
            if backend_failed {
                failing = failing.saturating_add(1);
                // The workspace's backoff (jittered, so replicas of other
                // installations do not retry in step), never below the poll interval.
                let wait = backoff.next_wait().max(self.poll_interval);
                tracing::info!(%backend, failing, wait_ms = wait.as_millis() as u64, "backend failing; waiting before the next round");
                tokio::select! {
                    _ = held.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            failing = 0;
            backoff.reset();
            if submitted > 0 && submitted < free {
                continue;
            }
            // No room: jobs made ready meanwhile wait for a job to end (or
            // the poll interval), not a round each.
            let full = free == 0;
            tokio::select! {
                _ = held.cancelled() => break,
                _ = self.wake.now.notified() => {}
                _ = self.wake.ready.notified(), if !full => {}
                _ = changed.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
            // Rounds start at most every MIN_ROUND_GAP: while productions
            // arrive in a stream, each wakes the scheduler, and one round
            // takes in everything that arrived during the gap.
            tokio::select! {
                _ = held.cancelled() => break,
                _ = tokio::time::sleep_until(round_started + MIN_ROUND_GAP) => {}
            }
        }
    }

    /// Backend IDs of this installation's jobs that are queued or running.
    async fn in_flight(&self) -> anyhow::Result<Vec<String>> {
        let client = self.db.client().await?;
        store::in_flight(&client, self.backend.name(), POLL_BATCH).await
    }

    /// Jobs reserved but without a backend ID: found on the backend by their
    /// tag, or submitted now if the backend never saw them.
    /// While the installation fails, a federated production's jobs the
    /// backend never got are released to the other installations instead.
    async fn reconcile(&self, failing: bool) -> anyhow::Result<()> {
        let client = self.db.client().await?;
        let jobs = store::reserved_without_id(&client, self.backend.name()).await?;
        drop(client);
        let jobs = if failing && !jobs.is_empty() {
            self.release_unsubmitted(jobs).await?
        } else {
            jobs
        };
        if jobs.is_empty() {
            return Ok(());
        }
        tracing::info!(
            backend = self.backend.name(),
            jobs = jobs.len(),
            "reconciling jobs reserved before a restart"
        );
        self.submit_reserved(jobs, true).await
    }

    /// Reserves up to `free` ready jobs (highest priority first; productions
    /// of equal priority by turns, see `take_ready`), then submits them.
    async fn submit_ready(&self, free: usize) -> anyhow::Result<usize> {
        if free == 0 {
            return Ok(0);
        }
        let mut steps = Steps::new();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        let ready = self.take_ready(&tx, free).await?;
        if ready.is_empty() {
            return Ok(0);
        }
        steps.mark("take");
        let mut changes = self.changes();
        let reserved: Vec<(&JobRow, String)> = ready
            .iter()
            .map(|job| {
                let workdir = job.workdir_in(&self.work_dir);
                (job, workdir.to_string_lossy().into_owned())
            })
            .collect();
        store::reserve(&tx, &reserved, self.backend.name()).await?;
        let workdirs: Vec<String> = reserved.into_iter().map(|(_, w)| w).collect();
        let mut jobs = Vec::with_capacity(ready.len());
        for (job, workdir) in ready.into_iter().zip(workdirs) {
            changes.transition(&job, job.attempt, JobState::Submitted, "reserved");
            jobs.push(JobRow {
                state: JobState::Submitted,
                workdir: Some(workdir),
                ..job
            });
        }
        self.commit(tx, changes).await?;
        steps.mark("reserve");
        let count = jobs.len();
        self.submit_reserved(jobs, false).await?;
        steps.mark("submit");
        tracing::debug!(backend = self.backend.name(), jobs = count, steps = %steps, "submitted");
        Ok(count)
    }

    /// Submits reserved jobs and commits their backend IDs. Jobs reserved in
    /// an earlier round (`look_first`) may have reached the backend before a
    /// crash lost their commit: those are looked up by tag first.
    async fn submit_reserved(&self, jobs: Vec<JobRow>, look_first: bool) -> anyhow::Result<()> {
        let mut submitted = Vec::with_capacity(jobs.len());
        let mut failure = None;
        let mut to_submit = Vec::with_capacity(jobs.len());
        let mut refused: Vec<(JobRow, String)> = Vec::new();
        let mut steps = Steps::new();
        let inputs = self.inputs_of(&jobs).await?;
        for job in jobs {
            let Some(profile) = self.profiles.get(&job.profile) else {
                failure = Some(anyhow::anyhow!(
                    "profile {} is no longer loaded",
                    job.profile
                ));
                continue;
            };
            let job_inputs = inputs
                .get(&(job.production_id.clone(), job.job_index))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let tag = job.tag(&self.deployment);
            let remote = match &self.remote {
                None => None,
                Some(destinations) => match self.refusal(destinations, profile, &job, job_inputs) {
                    Ok(outputs) => Some(outputs),
                    // Nothing a site could run: the attempt fails, saying why.
                    Err(reason) => {
                        tracing::warn!(job = %tag, %reason, "attempt refused before submission");
                        refused.push((job, reason));
                        continue;
                    }
                },
            };
            let spec = domain::job_spec(
                profile,
                &job,
                &self.work_dir,
                &self.deployment,
                job_inputs,
                remote,
            );
            if let Some(spec_inputs) = profile.inputs()
                && spec.remote.is_none()
                && let Err(error) =
                    write_input_list(&spec.workdir, &spec_inputs.list_file, job_inputs).await
            {
                failure = Some(error);
                break;
            }
            if self.lease.lost() {
                // Another replica may hold the installation now: it submits.
                failure = Some(anyhow::anyhow!("the installation's lease was lost"));
                break;
            }
            if look_first {
                match self.backend.find(&spec).await {
                    Ok(Some(id)) => {
                        submitted.push((
                            job,
                            BackendStatus {
                                cpu_ms: None,
                                backend_job_id: id,
                                state: JobState::Submitted,
                                raw: "found on the backend after a restart".into(),
                                exit_code: None,
                            },
                        ));
                        continue;
                    }
                    Ok(None) => {}
                    // It stays reserved; the next round looks for it again.
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            to_submit.push((job, spec));
        }
        let specs: Vec<JobSpec> = to_submit.iter().map(|(_, spec)| spec.clone()).collect();
        steps.mark("specs");
        let results = if specs.is_empty() {
            Vec::new()
        } else {
            self.backend.submit_many(&specs).await
        };
        for ((job, _), result) in to_submit.into_iter().zip(results) {
            match result {
                Ok(status) => submitted.push((job, status)),
                // The job stays reserved; the next round looks for it, then submits it.
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        steps.mark("backend");
        if !submitted.is_empty() || !refused.is_empty() {
            let mut client = self.db.client().await?;
            let tx = client.transaction().await?;
            self.lease.fence(&tx).await?;
            let mut changes = self.changes();
            for (job, reason) in &refused {
                if let Some(profile) = self.profiles.get(&job.profile) {
                    let status = BackendStatus {
                        backend_job_id: String::new(),
                        state: JobState::Failed,
                        raw: reason.clone(),
                        exit_code: None,
                        cpu_ms: None,
                    };
                    self.fail(&tx, profile, job, &status, &mut changes).await?;
                }
            }
            let ids: Vec<(&JobRow, &str, &str)> = submitted
                .iter()
                .map(|(job, status)| (job, status.backend_job_id.as_str(), status.raw.as_str()))
                .collect();
            store::set_backend_ids(&tx, &ids).await?;
            for (job, status) in &submitted {
                // An attempt that ended already is collected when polled
                // (its outputs are scanned outside any transaction).
                if let Some(profile) = self.profiles.get(&job.profile)
                    && status.state != JobState::Done
                {
                    self.apply(&tx, profile, job, status, None, &mut changes)
                        .await?;
                }
            }
            self.commit(tx, changes).await?;
        }
        steps.mark("commit");
        tracing::debug!(backend = self.backend.name(), jobs = submitted.len(), steps = %steps, "submitted reserved jobs");
        match failure {
            Some(error) => Err(error.context("submitting to the backend")),
            None => Ok(()),
        }
    }

    /// Where a job of this installation, which does not share the work
    /// directory, uploads its outputs; or why it cannot run there: its
    /// production forwards nowhere, or an input is a file on the
    /// dispatcher's host, which no site can read.
    fn refusal(
        &self,
        destinations: &crate::remote::Destinations,
        profile: &Profile,
        job: &JobRow,
        inputs: &[String],
    ) -> Result<crate::remote::RemoteOutputs, String> {
        let installation = self.backend.name();
        if let Some(local) = inputs
            .iter()
            .map(|url| prodsys_core::inputs::input_location(url))
            .find(|location| !location.contains("://"))
        {
            return Err(format!(
                "input {local} is a file on the dispatcher's host, which a job on installation \
                 {installation} cannot read (it does not share the work directory): only \
                 inputs on a storage reach it, as a parent production's outputs are when its \
                 jobs ran where the work directory is not shared"
            ));
        }
        destinations
            .outputs_of(profile, job, &job.tag(&self.deployment))
            .map_err(|reason| format!("installation {installation}: {reason}"))
    }

    /// The input files of the chained productions' jobs among `jobs`.
    async fn inputs_of(
        &self,
        jobs: &[JobRow],
    ) -> anyhow::Result<HashMap<(String, i64), Vec<String>>> {
        let chained: Vec<(&str, i64)> = jobs
            .iter()
            .filter(|j| {
                self.profiles
                    .get(&j.profile)
                    .is_some_and(|p| p.inputs().is_some())
            })
            .map(|j| (j.production_id.as_str(), j.job_index))
            .collect();
        if chained.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.db.client().await?;
        store::job_inputs(&client, &chained).await
    }

    /// Tells status (through the outbox) that this installation started
    /// failing, with the error, or answers again.
    async fn announce(&self, healthy: bool, reason: &str) -> anyhow::Result<()> {
        let installation = self.backend.name().to_string();
        let event = pb::InstallationHealth {
            installation: installation.clone(),
            healthy,
            reason: if healthy {
                String::new()
            } else {
                reason.to_string()
            },
            since_unix_ms: chrono::Utc::now().timestamp_millis(),
        };
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        store::federation::record_health(&tx, &installation, healthy, &event.reason).await?;
        prodsys_db::enqueue(
            &tx,
            &self.db,
            &[outbox_event(INSTALLATION_HEALTH, &installation, &event)],
        )
        .await?;
        tx.commit().await?;
        if healthy {
            tracing::info!(%installation, "installation answers");
        } else {
            tracing::warn!(%installation, %reason, "installation failing; its jobs wait");
        }
        Ok(())
    }

    /// Productions asked to stop: kill their in-flight jobs, cancel the rest, close them CANCELLED.
    /// Set-based however large the production: the backend is asked to kill
    /// only the jobs in flight, outside any transaction; then one statement
    /// cancels those (each a transition for status), one removes the jobs
    /// that never started (a delete costs a fraction of an update: a million
    /// in seconds) and one cancels the few that wait for a retry.
    /// `production.completed` counts every job without a row as cancelled, so
    /// no message holds a transition per job.
    async fn cancel_requested(&self) -> anyhow::Result<()> {
        let client = self.db.client().await?;
        let mut productions = store::cancelling_productions(&client, self.backend.name()).await?;
        productions.extend(self.federated_cancelling(&client).await?);
        if productions.is_empty() {
            return Ok(());
        }
        let flying = store::flying_ids(&client, &productions, self.backend.name()).await?;
        drop(client);
        if !flying.is_empty() {
            self.backend.cancel(&flying).await?;
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        // Another replica may be closing some of them: those are its own.
        let productions = store::lock_cancelling(&tx, &productions).await?;
        if productions.is_empty() {
            return Ok(());
        }
        let cancelled = store::cancel_jobs(&tx, &productions, self.backend.name()).await?;
        let killed: std::collections::HashSet<&str> = flying.iter().map(String::as_str).collect();
        let now = chrono::Utc::now().timestamp_millis();
        let mut transitions = Vec::with_capacity(cancelled.stopped.len());
        let mut late = Vec::new();
        for job in &cancelled.stopped {
            transitions.push(pb::JobTransition {
                production_id: job.production_id.clone(),
                job_index: job.job_index as u64,
                attempt: job.attempt as u32,
                state: JobState::Cancelled.to_proto() as i32,
                raw_status: "cancelled".into(),
                at_unix_ms: now,
                installation: self.backend.name().to_string(),
            });
            if let Some(id) = &job.backend_job_id
                && !killed.contains(id.as_str())
            {
                late.push(id.clone());
            }
        }
        // However many were in flight, no message grows past a bounded size.
        let mut all: Vec<OutboxEvent> = transitions
            .chunks(CANCEL_TRANSITIONS_PER_EVENT)
            .map(|chunk| {
                let batch = pb::JobStatusBatch {
                    transitions: chunk.to_vec(),
                };
                outbox_event(JOB_STATUS, &chunk[0].production_id, &batch)
            })
            .collect();
        for production_id in &productions {
            // A federated production's jobs on other installations are
            // theirs to kill; the last one closes it.
            if store::federation::in_flight_anywhere(&tx, production_id).await? {
                continue;
            }
            all.extend(
                close(
                    &tx,
                    production_id,
                    |_| ProductionState::Cancelled,
                    "CANCELLING",
                )
                .await?,
            );
        }
        tracing::info!(
            ?productions,
            jobs_killed = cancelled.stopped.len(),
            never_started = cancelled.never_started,
            retrying = cancelled.retrying,
            "productions cancelled"
        );
        prodsys_db::enqueue(&tx, &self.db, &all).await?;
        tx.commit().await?;
        // Submitted after the first look (another replica's round): killed now.
        if !late.is_empty()
            && let Err(error) = self.backend.cancel(&late).await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                jobs = late.len(),
                "killing late jobs of a cancelled production failed"
            );
        }
        Ok(())
    }

    async fn follow(&self, statuses: &[BackendStatus]) -> anyhow::Result<()> {
        // Outputs of the attempts that ended DONE, scanned and checksummed
        // before any row is locked.
        let scanned = self.scan_done(statuses).await?;
        let ids: Vec<&str> = statuses.iter().map(|s| s.backend_job_id.as_str()).collect();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        let jobs = store::in_flight_jobs(&tx, self.backend.name(), &ids, true).await?;
        let mut changes = self.changes();
        for status in statuses {
            let Some(job) = jobs.get(&status.backend_job_id) else {
                continue;
            };
            let Some(profile) = self.profiles.get(&job.profile) else {
                continue;
            };
            let outputs = scanned
                .get(&status.backend_job_id)
                .filter(|(attempt, _)| *attempt == job.attempt)
                .map(|(_, outputs)| outputs);
            self.apply(&tx, profile, job, status, outputs, &mut changes)
                .await?;
        }
        self.commit(tx, changes).await
    }

    /// The output files of each attempt in `statuses` that ended DONE, by
    /// backend ID, with the attempt they belong to; or why they cannot be
    /// taken (the attempt then fails). Reads rows without locking them.
    async fn scan_done(
        &self,
        statuses: &[BackendStatus],
    ) -> anyhow::Result<HashMap<String, (i32, Result<Vec<Scanned>, String>)>> {
        let ids: Vec<&str> = statuses
            .iter()
            .filter(|s| s.state == JobState::Done)
            .map(|s| s.backend_job_id.as_str())
            .collect();
        let mut scanned = HashMap::new();
        if ids.is_empty() {
            return Ok(scanned);
        }
        let client = self.db.client().await?;
        let jobs = store::in_flight_jobs(&client, self.backend.name(), &ids, false).await?;
        drop(client);
        for (backend_job_id, job) in jobs {
            let Some(profile) = self.profiles.get(&job.profile) else {
                continue;
            };
            if let Some(destinations) = &self.remote {
                // Its outputs are on its production's storage, not here.
                let tag = job.tag(&self.deployment);
                match destinations.collect(profile, &job, &tag).await {
                    Ok(outputs) => {
                        scanned.insert(backend_job_id, (job.attempt, outputs));
                    }
                    Err(reason) => tracing::warn!(job = %tag, %reason,
                        "the storage of a remote job's outputs cannot be asked; asking again at the next poll"),
                }
                continue;
            }
            let workdir = PathBuf::from(
                job.workdir
                    .as_deref()
                    .context("job has no working directory")?,
            );
            let output_dir = workdir.join(&profile.outputs().dir);
            // The row's directory is re-checked too: outputs are read only
            // inside the work directory, through no symbolic link.
            let root = self.work_dir.clone();
            let outputs =
                tokio::task::spawn_blocking(move || scan_outputs_under(&root, &output_dir))
                    .await??;
            scanned.insert(backend_job_id, (job.attempt, outputs));
        }
        Ok(scanned)
    }

    /// Applies one backend status to one job, retrying a failed attempt while the profile allows.
    /// A DONE attempt needs its scanned `outputs`; without them it stays as
    /// it is until polled again.
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        profile: &Profile,
        job: &JobRow,
        status: &BackendStatus,
        outputs: Option<&Result<Vec<Scanned>, String>>,
        changes: &mut Changes,
    ) -> anyhow::Result<()> {
        if status.state == job.state {
            return Ok(());
        }
        if !job.state.can_become(status.state) {
            tracing::warn!(job = %job.tag(&self.deployment), from = %job.state, to = %status.state, "ignoring an illegal job transition");
            return Ok(());
        }
        match status.state {
            JobState::Failed => self.fail(tx, profile, job, status, changes).await?,
            JobState::Done => {
                let files = match outputs {
                    None => return Ok(()),
                    Some(Err(reason)) => {
                        // Its outputs cannot be taken as they are: the attempt failed.
                        let failed = BackendStatus {
                            state: JobState::Failed,
                            raw: reason.clone(),
                            ..status.clone()
                        };
                        return self.fail(tx, profile, job, &failed, changes).await;
                    }
                    Some(Ok(scanned)) => domain::describe_outputs(profile, job, scanned),
                };
                changes.set_job(job, JobState::Done, job.attempt, status);
                changes.transition(job, job.attempt, JobState::Done, &status.raw);
                let output = pb::JobOutput {
                    production_id: job.production_id.clone(),
                    job_index: job.job_index as u64,
                    attempt: job.attempt as u32,
                    files,
                };
                changes
                    .outputs
                    .push(outbox_event(JOB_OUTPUT, &job.production_id, &output));
            }
            other => {
                changes.set_job(job, other, job.attempt, status);
                changes.transition(job, job.attempt, other, &status.raw);
            }
        }
        Ok(())
    }

    /// A failed attempt: retried while the profile allows, else EXHAUSTED.
    async fn fail(
        &self,
        tx: &Transaction<'_>,
        profile: &Profile,
        job: &JobRow,
        status: &BackendStatus,
        changes: &mut Changes,
    ) -> anyhow::Result<()> {
        changes.transition(job, job.attempt, JobState::Failed, &status.raw);
        let (next, attempt) = domain::after_failure(job.attempt, job.moved, profile.max_attempts());
        changes.set_job(job, next, attempt, status);
        changes.transition(job, attempt, next, &status.raw);
        if next == JobState::Created
            && crate::domain::placement::retry_installation(
                self.backend.name(),
                self.federation.settings.retry_elsewhere,
            )
            .is_none()
        {
            store::federation::unplace(tx, job).await?;
            changes.unplaced();
        }
        tracing::info!(job = %job.tag(&self.deployment), raw = %status.raw, next = %next, "job attempt failed");
        Ok(())
    }

    /// The events of this installation's changes.
    pub(crate) fn changes(&self) -> Changes {
        Changes {
            installation: self.backend.name().to_string(),
            ..Changes::default()
        }
    }

    /// Closes the productions whose jobs all ended, then commits with every event.
    pub(crate) async fn commit(&self, tx: Transaction<'_>, changes: Changes) -> anyhow::Result<()> {
        let touched: Vec<String> = changes.touched.iter().cloned().collect();
        let ids: Vec<&str> = touched.iter().map(String::as_str).collect();
        // The jobs' rows and the touched productions' rows are found by their
        // keys: planned once per connection (a round's commit of a few jobs
        // spent longer planning these statements than running them). Not
        // the check of which productions finished: its generic plan, nested
        // loops over the jobs' indexes, ran 2.6 times longer than the plans
        // made for each batch (their planning included).
        if !changes.updates.is_empty() || !ids.is_empty() {
            prodsys_db::plan_by_key(&tx).await?;
            store::set_jobs(&tx, &changes.updates).await?;
            // The touched productions held, in order.
            if !ids.is_empty() {
                store::lock_productions(&tx, &ids).await?;
            }
            prodsys_db::plan_freely(&tx).await?;
        }
        // Those none of whose jobs can still change, in one statement however many.
        let finished = if ids.is_empty() {
            Vec::new()
        } else {
            store::finished_of(&tx, &ids).await?
        };
        let mut events = changes.into_events();
        for production_id in finished {
            if let Some(event) = close(&tx, &production_id, domain::outcome, "RUNNING").await? {
                events.push(event);
            }
        }
        prodsys_db::enqueue(&tx, &self.db, &events).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Changes {
    /// The batched `job.status` event, then the outputs.
    fn into_events(self) -> Vec<OutboxEvent> {
        let mut events = Vec::new();
        if !self.transitions.is_empty() {
            let subject = self.touched.iter().next().cloned().unwrap_or_default();
            let batch = pb::JobStatusBatch {
                transitions: self.transitions,
            };
            events.push(outbox_event(JOB_STATUS, &subject, &batch));
        }
        events.extend(self.outputs);
        events
    }
}

/// The production's final state, if none of its jobs can still change (one
/// still being planned has jobs to come, a chained one inputs to take). Its
/// row is held first: a transaction adding a chained production's jobs or
/// completing its inputs commits before this looks.
pub(crate) async fn close_if_finished(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<Option<OutboxEvent>> {
    store::lock_production(tx, production_id).await?;
    if store::unfinished(tx, production_id).await? {
        return Ok(None);
    }
    close(tx, production_id, domain::outcome, "RUNNING").await
}

/// Moves the production from `from` to the final state `decide` makes of its
/// jobs' states, and returns the `production.completed` event, with job
/// counts; `None` if it was not in `from`.
async fn close(
    tx: &Transaction<'_>,
    production_id: &str,
    decide: fn(&[(JobState, u64)]) -> ProductionState,
    from: &str,
) -> anyhow::Result<Option<OutboxEvent>> {
    let states = store::job_states(tx, production_id).await?;
    let state = decide(&states);
    let Some(job_total) = store::close(tx, production_id, state, from).await? else {
        return Ok(None);
    };
    let counts = domain::final_counts(&states, job_total);
    let accounting = store::accounting(tx, production_id).await?;
    let (inputs_note, inputs_used) = store::inputs_summary(tx, production_id).await?;
    tracing::info!(%production_id, %state, done = counts.done, attempts = accounting.attempts, "production finished");
    let at_ms = |at: Option<chrono::DateTime<chrono::Utc>>| at.map_or(0, |t| t.timestamp_millis());
    let placed = store::federation::jobs_per_installation(tx, production_id).await?;
    let ranges = store::federation::job_ranges_per_installation(
        tx,
        production_id,
        domain::placement::JOB_RANGES_KEPT as i64,
    )
    .await?;
    let event = pb::ProductionCompleted {
        installations: domain::placement::per_installation(&placed, &ranges),
        production_id: production_id.to_string(),
        state: state.to_proto() as i32,
        counts: Some(counts),
        attempts: accounting.attempts,
        retries: accounting
            .attempts
            .saturating_sub(accounting.jobs_submitted),
        cpu_seconds: accounting.cpu_ms as f64 / 1000.0,
        cpu_measured_attempts: accounting.cpu_measured,
        first_job_started_unix_ms: at_ms(accounting.first_started),
        last_job_ended_unix_ms: at_ms(accounting.last_ended),
        first_run: accounting.first_run,
        last_run: accounting.last_run,
        inputs_note,
        inputs_used,
    };
    Ok(Some(outbox_event(
        PRODUCTION_COMPLETED,
        production_id,
        &event,
    )))
}

/// Writes a chained job's input list (one input a line: a path, or a URL
/// where it is not a local file) into its directory before it starts.
async fn write_input_list(
    workdir: &std::path::Path,
    name: &str,
    inputs: &[String],
) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(workdir)
        .await
        .with_context(|| format!("creating {}", workdir.display()))?;
    let mut text = String::new();
    for url in inputs {
        text.push_str(prodsys_core::inputs::input_location(url));
        text.push('\n');
    }
    let path = workdir.join(name);
    tokio::fs::write(&path, text)
        .await
        .with_context(|| format!("writing {}", path.display()))
}

/// Whether `error` is a deadlock or serialization failure of this round's
/// transaction against another's (SQLSTATE 40P01, 40001).
fn lost_a_race(error: &anyhow::Error) -> bool {
    use prodsys_db::deadpool_postgres::tokio_postgres::error::SqlState;
    error.chain().any(|cause| {
        cause
            .downcast_ref::<prodsys_db::deadpool_postgres::tokio_postgres::Error>()
            .and_then(|e| e.code())
            .is_some_and(|code| {
                *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
            })
    })
}
