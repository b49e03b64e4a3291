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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prodsys_core::events::{INSTALLATION_HEALTH, JOB_OUTPUT, JOB_STATUS, PRODUCTION_COMPLETED};
use prodsys_core::profile::render;
use prodsys_core::state::count_job;
use prodsys_core::{JobState, PlannedJob, ProductionState, Profile, ProfileSet};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, OutboxEvent};
use prodsys_proto as pb;
use prodsys_server::outbox_event;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendStatus, JobSpec};
use crate::lease::Lease;

pub(crate) struct Scheduler {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    pub backend: Arc<dyn Backend>,
    pub work_dir: PathBuf,
    /// Prefix of every backend job name, unique to this deployment.
    pub deployment: String,
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    /// This replica's lease on the installation: rounds run only while it is held.
    pub lease: Arc<Lease>,
}

/// A job row with what its templates need.
struct JobRow {
    production_id: String,
    job_index: i64,
    run_number: i64,
    seed: i64,
    units: i64,
    attempt: i32,
    state: JobState,
    workdir: Option<String>,
    profile: String,
    vo: String,
    parameters: serde_json::Value,
}

const JOB_COLUMNS: &str =
    "j.production_id, j.job_index, j.run_number, j.seed, j.units, j.attempt, j.state,
                           j.workdir, p.profile, p.vo, p.parameters";

impl JobRow {
    fn from_row(row: &prodsys_db::tokio_postgres::Row) -> anyhow::Result<Self> {
        Ok(Self {
            production_id: row.get(0),
            job_index: row.get(1),
            run_number: row.get(2),
            seed: row.get(3),
            units: row.get(4),
            attempt: row.get(5),
            state: row.get::<_, &str>(6).parse()?,
            workdir: row.get(7),
            profile: row.get(8),
            vo: row.get(9),
            parameters: row.get(10),
        })
    }

    fn planned(&self) -> PlannedJob {
        PlannedJob {
            index: self.job_index as u64,
            run_number: self.run_number as u64,
            seed: self.seed as u64,
            units: self.units as u64,
        }
    }

    /// The attempt's name on the backend: unique per deployment and attempt, stable across restarts.
    fn tag(&self, deployment: &str) -> String {
        format!(
            "{deployment}.{}.{:06}.a{}",
            self.production_id, self.job_index, self.attempt
        )
    }
}

/// The events one transaction will publish.
#[derive(Default)]
struct Changes {
    transitions: Vec<pb::JobTransition>,
    outputs: Vec<OutboxEvent>,
    touched: BTreeSet<String>,
}

impl Changes {
    fn transition(&mut self, job: &JobRow, attempt: i32, state: JobState, raw: &str) {
        self.touched.insert(job.production_id.clone());
        self.transitions.push(pb::JobTransition {
            production_id: job.production_id.clone(),
            job_index: job.job_index as u64,
            attempt: attempt as u32,
            state: state.to_proto() as i32,
            raw_status: raw.to_string(),
            at_unix_ms: chrono::Utc::now().timestamp_millis(),
        });
    }
}

/// The shortest time between the starts of two rounds of one scheduler.
const MIN_ROUND_GAP: Duration = Duration::from_millis(50);

/// Transitions per `job.status` event of a cancel (about 60 bytes each).
const CANCEL_TRANSITIONS_PER_EVENT: usize = 10_000;

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
        // What status was last told about this installation: None until told
        // once (so a restart announces the installation healthy again).
        let mut announced: Option<bool> = None;
        while !held.is_cancelled() {
            let round_started = tokio::time::Instant::now();
            let mut backend_failed = false;
            let mut last_error = String::new();
            if let Err(error) = self.reconcile().await {
                last_error = format!("{error:#}");
                backend_failed = true;
                tracing::warn!(%backend, error = format!("{error:#}"), "reconciling reserved jobs failed");
            }
            if let Err(error) = self.cancel_requested().await {
                last_error = format!("{error:#}");
                backend_failed = true;
                tracing::warn!(%backend, error = format!("{error:#}"), "cancelling failed; retrying");
            }
            let in_flight = match self.in_flight().await {
                Ok(ids) => ids,
                Err(error) => {
                    tracing::warn!(%backend, error = format!("{error:#}"), "reading in-flight jobs failed");
                    Vec::new()
                }
            };
            if !in_flight.is_empty() {
                match self.backend.poll(&in_flight).await {
                    Ok(statuses) => pending.extend(statuses),
                    Err(error) => {
                        last_error = format!("{error:#}");
                        backend_failed = true;
                        tracing::warn!(%backend, error = format!("{error:#}"), "polling the backend failed")
                    }
                }
            }
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
            // What just ended frees room: count again after applying it.
            let in_flight = if in_flight.is_empty() {
                0
            } else {
                self.in_flight()
                    .await
                    .map_or(in_flight.len(), |ids| ids.len())
            };
            let free = self.backend.capacity().saturating_sub(in_flight);
            let submitted = match self.submit_ready(free).await {
                Ok(n) => n,
                Err(error) => {
                    last_error = format!("{error:#}");
                    backend_failed = true;
                    tracing::warn!(%backend, error = format!("{error:#}"), "submitting jobs failed");
                    0
                }
            };
            if held.is_cancelled() {
                // The lease was lost in the round: what failed is not the installation's fault.
                return;
            }
            let healthy = !backend_failed;
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
                let wait = backoff(self.poll_interval, failing);
                tracing::info!(%backend, failing, wait_ms = wait.as_millis() as u64, "backend failing; waiting before the next round");
                tokio::select! {
                    _ = held.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            failing = 0;
            if submitted > 0 && submitted < free {
                continue;
            }
            tokio::select! {
                _ = held.cancelled() => break,
                _ = self.wake.notified() => {}
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
        let rows = client
            .query_cached(
                // In-flight jobs first, through their small partial index, whatever
                // the size of the productions they belong to; then each one's
                // production by its key. A plain join lets the planner, before
                // the tables are analysed, read every production of the
                // installation to hash them (3 ms a round with a few thousand).
                "WITH flying AS MATERIALIZED (
                     SELECT production_id, backend_job_id FROM jobs
                     WHERE state IN ('SUBMITTED', 'QUEUED', 'RUNNING') AND backend_job_id IS NOT NULL)
                 SELECT f.backend_job_id FROM flying f
                 CROSS JOIN LATERAL (
                     SELECT 1 FROM productions p
                     WHERE p.production_id = f.production_id AND p.backend = $1 LIMIT 1) p
                 LIMIT $2",
                &[&self.backend.name(), &POLL_BATCH],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Jobs reserved but without a backend ID: found on the backend by their
    /// tag, or submitted now if the backend never saw them.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let client = self.db.client().await?;
        let rows = client
            .query_cached(
                &format!(
                    "WITH reserved AS MATERIALIZED (
                         SELECT production_id, job_index FROM jobs
                         WHERE state = 'SUBMITTED' AND backend_job_id IS NULL)
                     SELECT {JOB_COLUMNS} FROM reserved r
                     JOIN jobs j USING (production_id, job_index)
                     JOIN productions p ON p.production_id = j.production_id
                     WHERE p.backend = $1
                     ORDER BY j.production_id, j.job_index LIMIT 1000"
                ),
                &[&self.backend.name()],
            )
            .await?;
        drop(client);
        if rows.is_empty() {
            return Ok(());
        }
        let jobs: Vec<JobRow> = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<anyhow::Result<_>>()?;
        tracing::info!(
            backend = self.backend.name(),
            jobs = jobs.len(),
            "reconciling jobs reserved before a restart"
        );
        self.submit_reserved(jobs, true).await
    }

    /// Reserves up to `free` ready jobs, oldest production first, then submits them.
    async fn submit_ready(&self, free: usize) -> anyhow::Result<usize> {
        if free == 0 {
            return Ok(0);
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        // Highest priority first, then the oldest production; within one, by
        // job index through the partial index of ready jobs, so a million
        // waiting jobs cost nothing here.
        let productions: Vec<String> = tx
            .query_cached(
                "SELECT production_id FROM productions WHERE backend = $1 AND state = 'RUNNING'
                 ORDER BY priority DESC, created_at, production_id",
                &[&self.backend.name()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut rows = Vec::new();
        for production_id in &productions {
            let wanted = (free - rows.len()) as i64;
            if wanted == 0 {
                break;
            }
            rows.extend(
                tx.query_cached(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM jobs j JOIN productions p USING (production_id)
                         WHERE j.production_id = $1 AND j.state = 'CREATED'
                         ORDER BY j.job_index LIMIT $2
                         FOR UPDATE OF j SKIP LOCKED"
                    ),
                    &[production_id, &wanted],
                )
                .await?,
            );
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let mut changes = Changes::default();
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let job = JobRow::from_row(row)?;
            let workdir = self.workdir(&job);
            tx.execute_cached(
                "UPDATE jobs SET state = 'SUBMITTED', backend_job_id = NULL, workdir = $3,
                                 raw_status = 'reserved', updated_at = now()
                 WHERE production_id = $1 AND job_index = $2",
                &[
                    &job.production_id,
                    &job.job_index,
                    &workdir.to_string_lossy().as_ref(),
                ],
            )
            .await?;
            changes.transition(&job, job.attempt, JobState::Submitted, "reserved");
            jobs.push(JobRow {
                state: JobState::Submitted,
                workdir: Some(workdir.to_string_lossy().into_owned()),
                ..job
            });
        }
        self.commit(tx, changes).await?;
        let count = jobs.len();
        self.submit_reserved(jobs, false).await?;
        Ok(count)
    }

    /// Submits reserved jobs and commits their backend IDs. Jobs reserved in
    /// an earlier round (`look_first`) may have reached the backend before a
    /// crash lost their commit: those are looked up by tag first.
    async fn submit_reserved(&self, jobs: Vec<JobRow>, look_first: bool) -> anyhow::Result<()> {
        let mut submitted = Vec::with_capacity(jobs.len());
        let mut failure = None;
        let mut to_submit = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Some(profile) = self.profiles.get(&job.profile) else {
                failure = Some(anyhow::anyhow!(
                    "profile {} is no longer loaded",
                    job.profile
                ));
                continue;
            };
            let spec = self.spec(profile, &job);
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
        if !submitted.is_empty() {
            let mut client = self.db.client().await?;
            let tx = client.transaction().await?;
            self.lease.fence(&tx).await?;
            let mut changes = Changes::default();
            for (job, status) in &submitted {
                tx.execute_cached(
                    "UPDATE jobs SET backend_job_id = $3, raw_status = $4, updated_at = now()
                     WHERE production_id = $1 AND job_index = $2",
                    &[
                        &job.production_id,
                        &job.job_index,
                        &status.backend_job_id,
                        &status.raw,
                    ],
                )
                .await?;
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
        match failure {
            Some(error) => Err(error.context("submitting to the backend")),
            None => Ok(()),
        }
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
        prodsys_db::enqueue(
            &tx,
            &self.db.outbox_channel(),
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
        let productions: Vec<String> = client
            .query_cached(
                "SELECT production_id FROM productions WHERE state = 'CANCELLING' AND backend = $1",
                &[&self.backend.name()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if productions.is_empty() {
            return Ok(());
        }
        let flying: Vec<String> = client
            .query_cached(
                "SELECT backend_job_id FROM jobs
                 WHERE production_id = ANY($1) AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
                   AND backend_job_id IS NOT NULL",
                &[&productions],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        if !flying.is_empty() {
            self.backend.cancel(&flying).await?;
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        // Another replica may be closing some of them: those are its own.
        let productions: Vec<String> = tx
            .query_cached(
                "SELECT production_id FROM productions
                 WHERE production_id = ANY($1) AND state = 'CANCELLING'
                 FOR UPDATE SKIP LOCKED",
                &[&productions],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if productions.is_empty() {
            return Ok(());
        }
        let stopped = tx
            .query_cached(
                "UPDATE jobs SET state = 'CANCELLED', raw_status = 'cancelled', updated_at = now()
                 WHERE production_id = ANY($1) AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
                 RETURNING production_id, job_index, attempt, backend_job_id",
                &[&productions],
            )
            .await?;
        let never_started = tx
            .execute_cached(
                "DELETE FROM jobs WHERE production_id = ANY($1) AND state = 'CREATED' AND attempt = 1",
                &[&productions],
            )
            .await?;
        let retrying = tx
            .execute_cached(
                "UPDATE jobs SET state = 'CANCELLED', raw_status = 'cancelled', updated_at = now()
                 WHERE production_id = ANY($1) AND state IN ('CREATED', 'FAILED')",
                &[&productions],
            )
            .await?;
        let killed: std::collections::HashSet<&str> = flying.iter().map(String::as_str).collect();
        let now = chrono::Utc::now().timestamp_millis();
        let mut transitions = Vec::with_capacity(stopped.len());
        let mut late = Vec::new();
        for row in &stopped {
            transitions.push(pb::JobTransition {
                production_id: row.get(0),
                job_index: row.get::<_, i64>(1) as u64,
                attempt: row.get::<_, i32>(2) as u32,
                state: JobState::Cancelled.to_proto() as i32,
                raw_status: "cancelled".into(),
                at_unix_ms: now,
            });
            if let Some(id) = row.get::<_, Option<&str>>(3)
                && !killed.contains(id)
            {
                late.push(id.to_string());
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
            all.extend(close(&tx, production_id, ProductionState::Cancelled, "CANCELLING").await?);
        }
        tracing::info!(
            ?productions,
            jobs_killed = stopped.len(),
            never_started,
            retrying,
            "productions cancelled"
        );
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &all).await?;
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

    fn workdir(&self, job: &JobRow) -> PathBuf {
        self.work_dir
            .join(&job.production_id)
            .join(format!("{:06}.a{}", job.job_index, job.attempt))
    }

    fn spec(&self, profile: &Profile, job: &JobRow) -> JobSpec {
        let workdir = self.workdir(job);
        let output_dir = workdir.join(&profile.outputs().dir);
        let vars = profile.job_variables(
            &job.parameters,
            &job.production_id,
            &job.vo,
            &job.planned(),
            job.attempt as u32,
            &output_dir.to_string_lossy(),
        );
        let prodsys_core::profile::JobCommand { program, args, env } = profile
            .job_command(&job.parameters, &vars)
            .unwrap_or_else(|reason| {
                // Only a production accepted without its template gets here:
                // the attempt fails, saying why.
                let script = "echo \"$1\" >&2; exit 127";
                prodsys_core::profile::JobCommand {
                    program: "/bin/sh".into(),
                    args: vec!["-c".into(), script.into(), "prodsys".into(), reason],
                    env: Vec::new(),
                }
            });
        let estimate = profile.estimate(job.units as u64);
        JobSpec {
            tag: job.tag(&self.deployment),
            production_id: job.production_id.clone(),
            program,
            args,
            env,
            workdir,
            output_dir,
            cpu_seconds: estimate.cpu_seconds,
            memory_mb: estimate.memory_mb,
            disk_mb: estimate.disk_mb,
        }
    }

    async fn follow(&self, statuses: &[BackendStatus]) -> anyhow::Result<()> {
        // Outputs of the attempts that ended DONE, scanned and checksummed
        // before any row is locked.
        let scanned = self.scan_done(statuses).await?;
        let ids: Vec<&str> = statuses.iter().map(|s| s.backend_job_id.as_str()).collect();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        let rows = tx
            .query_cached(
                &format!(
                    "SELECT {JOB_COLUMNS}, j.backend_job_id FROM jobs j JOIN productions p USING (production_id)
                     WHERE j.backend_job_id = ANY($1) AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
                     FOR UPDATE OF j"
                ),
                &[&ids],
            )
            .await?;
        let mut jobs: HashMap<String, JobRow> = HashMap::new();
        for row in &rows {
            jobs.insert(row.get(11), JobRow::from_row(row)?);
        }
        let mut changes = Changes::default();
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
        let rows = client
            .query_cached(
                &format!(
                    "SELECT {JOB_COLUMNS}, j.backend_job_id FROM jobs j JOIN productions p USING (production_id)
                     WHERE j.backend_job_id = ANY($1) AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')"
                ),
                &[&ids],
            )
            .await?;
        drop(client);
        for row in &rows {
            let job = JobRow::from_row(row)?;
            let Some(profile) = self.profiles.get(&job.profile) else {
                continue;
            };
            let workdir = PathBuf::from(
                job.workdir
                    .as_deref()
                    .context("job has no working directory")?,
            );
            let output_dir = workdir.join(&profile.outputs().dir);
            let outputs = tokio::task::spawn_blocking(move || scan_outputs(&output_dir)).await??;
            scanned.insert(row.get::<_, String>(11), (job.attempt, outputs));
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
                    Some(Ok(scanned)) => self.describe_outputs(profile, job, scanned),
                };
                set_job(tx, job, JobState::Done, job.attempt, status).await?;
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
                set_job(tx, job, other, job.attempt, status).await?;
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
        let (next, attempt) = if (job.attempt as u32) < profile.max_attempts() {
            (JobState::Created, job.attempt + 1)
        } else {
            (JobState::Exhausted, job.attempt)
        };
        set_job(tx, job, next, attempt, status).await?;
        changes.transition(job, attempt, next, &status.raw);
        tracing::info!(job = %job.tag(&self.deployment), raw = %status.raw, next = %next, "job attempt failed");
        Ok(())
    }

    /// LFN, URL and metadata of each file the attempt left in its output directory.
    fn describe_outputs(
        &self,
        profile: &Profile,
        job: &JobRow,
        scanned: &[Scanned],
    ) -> Vec<pb::OutputFile> {
        let output_dir =
            PathBuf::from(job.workdir.as_deref().unwrap_or_default()).join(&profile.outputs().dir);
        let mut vars = profile.job_variables(
            &job.parameters,
            &job.production_id,
            &job.vo,
            &job.planned(),
            job.attempt as u32,
            &output_dir.to_string_lossy(),
        );
        let mut files = Vec::with_capacity(scanned.len());
        for file in scanned {
            vars.insert("file_name".into(), file.name.clone());
            files.push(pb::OutputFile {
                lfn: render(&profile.outputs().lfn, &vars),
                size: file.size,
                adler32: file.adler32.clone(),
                url: format!("file://{}", file.path.display()),
                metadata: profile.output_metadata(&vars),
                production_id: job.production_id.clone(),
                job_index: job.job_index as u64,
            });
        }
        files
    }

    /// Closes the productions whose jobs all ended, then commits with every event.
    async fn commit(&self, tx: Transaction<'_>, changes: Changes) -> anyhow::Result<()> {
        let touched: Vec<String> = changes.touched.iter().cloned().collect();
        let mut events = changes.into_events();
        for production_id in &touched {
            if let Some(event) = close_if_finished(&tx, production_id).await? {
                events.push(event);
            }
        }
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
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

async fn set_job(
    tx: &Transaction<'_>,
    job: &JobRow,
    state: JobState,
    attempt: i32,
    status: &BackendStatus,
) -> anyhow::Result<()> {
    let update = tx
        .prepare_cached(
            "UPDATE jobs SET state = $3, attempt = $4, raw_status = $5, exit_code = $6, updated_at = now()
             WHERE production_id = $1 AND job_index = $2",
        )
        .await?;
    tx.execute(
        &update,
        &[
            &job.production_id,
            &job.job_index,
            &state.as_str(),
            &attempt,
            &status.raw,
            &status.exit_code,
        ],
    )
    .await?;
    Ok(())
}

/// The production's final state, if none of its jobs can still change.
async fn close_if_finished(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<Option<OutboxEvent>> {
    // Through the partial index of unfinished jobs: cheap however large the
    // production. One still being planned has jobs to come.
    let unfinished = tx
        .query_one_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE production_id = $1
                            AND state IN ('CREATED', 'SUBMITTED', 'QUEUED', 'RUNNING', 'FAILED'))
                 OR EXISTS (SELECT 1 FROM productions WHERE production_id = $1
                            AND planned_jobs < job_total)",
            &[&production_id],
        )
        .await?
        .get::<_, bool>(0);
    if unfinished {
        return Ok(None);
    }
    let (done, total): (i64, i64) = {
        let row = tx
            .query_one_cached(
                "SELECT count(*) FILTER (WHERE state = 'DONE'), count(*) FROM jobs WHERE production_id = $1",
                &[&production_id],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    close(
        tx,
        production_id,
        ProductionState::outcome(done as u64, total as u64),
        "RUNNING",
    )
    .await
}

/// Moves the production from `from` to its final `state` and returns the
/// `production.completed` event, with job counts; `None` if it was not in `from`.
/// Jobs without a row (never planned, or removed unstarted by a cancel) count as cancelled.
async fn close(
    tx: &Transaction<'_>,
    production_id: &str,
    state: ProductionState,
    from: &str,
) -> anyhow::Result<Option<OutboxEvent>> {
    let Some(closed) = tx
        .query_opt_cached(
            "UPDATE productions SET state = $2, updated_at = now() WHERE production_id = $1 AND state = $3
             RETURNING job_total",
            &[&production_id, &state.as_str(), &from],
        )
        .await?
    else {
        return Ok(None);
    };
    let job_total = closed.get::<_, i64>(0) as u64;
    let mut counts = pb::JobCounts::default();
    for row in tx
        .query_cached(
            "SELECT state, count(*) FROM jobs WHERE production_id = $1 GROUP BY state",
            &[&production_id],
        )
        .await?
    {
        count_job(
            &mut counts,
            row.get::<_, &str>(0).parse()?,
            row.get::<_, i64>(1) as u64,
        );
    }
    let rows = prodsys_core::state::counts_total(&counts);
    counts.cancelled += job_total.saturating_sub(rows);
    tracing::info!(%production_id, %state, done = counts.done, "production finished");
    let event = pb::ProductionCompleted {
        production_id: production_id.to_string(),
        state: state.to_proto() as i32,
        counts: Some(counts),
    };
    Ok(Some(outbox_event(
        PRODUCTION_COMPLETED,
        production_id,
        &event,
    )))
}

/// The wait after `failing` consecutive failed rounds: the poll interval doubled
/// for each, at most a minute.
fn backoff(poll_interval: Duration, failing: u32) -> Duration {
    let factor = 1u32 << failing.min(10);
    poll_interval
        .saturating_mul(factor)
        .min(Duration::from_secs(60))
        .max(poll_interval)
}

/// One output file, checksummed.
#[derive(Debug, Clone, PartialEq)]
struct Scanned {
    path: PathBuf,
    name: String,
    size: u64,
    adler32: String,
}

/// Suffixes of files still being written: never collected.
const TEMPORARY_SUFFIXES: [&str; 2] = [".part", ".tmp"];

/// Every complete regular file directly under `dir`, sorted, with size and
/// adler32. `Ok(Err(reason))` when the attempt's outputs cannot be taken: a
/// symbolic link (it could point anywhere) or a name that is not UTF-8 (no
/// LFN can hold it). Files with a temporary suffix are left out.
fn scan_outputs(dir: &Path) -> anyhow::Result<Result<Vec<Scanned>, String>> {
    let mut found = Vec::new();
    if !dir.is_dir() {
        return Ok(Ok(Vec::new()));
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Ok(Err(format!(
                "output file name is not UTF-8: {}",
                path.display()
            )));
        };
        if kind.is_symlink() {
            return Ok(Err(format!(
                "output {name} is a symbolic link; outputs must be regular files"
            )));
        }
        if !kind.is_file() || TEMPORARY_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        found.push((path, name));
    }
    found.sort();
    let mut files = Vec::with_capacity(found.len());
    for (path, name) in found {
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (size, adler32) = prodsys_core::checksum::adler32_hex(std::io::BufReader::new(file))?;
        files.push(Scanned {
            path,
            name,
            size,
            adler32,
        });
    }
    Ok(Ok(files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backend_is_waited_for_longer_each_round_up_to_a_minute() {
        let poll = Duration::from_millis(500);
        assert_eq!(backoff(poll, 1), Duration::from_secs(1));
        assert_eq!(backoff(poll, 2), Duration::from_secs(2));
        assert_eq!(backoff(poll, 6), Duration::from_secs(32));
        assert_eq!(backoff(poll, 7), Duration::from_secs(60));
        assert_eq!(backoff(poll, u32::MAX), Duration::from_secs(60));
        // A poll interval above a minute is never shortened.
        assert_eq!(backoff(Duration::from_secs(90), 3), Duration::from_secs(90));
    }

    #[test]
    fn only_complete_regular_files_with_utf8_names_are_collected() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::env::temp_dir().join(format!("prodsys-outputs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.simtel"), "bb").unwrap();
        std::fs::write(dir.join("a.simtel"), "a").unwrap();
        std::fs::write(dir.join("c.simtel.part"), "still writing").unwrap();
        std::fs::write(dir.join("d.tmp"), "scratch").unwrap();
        let files = scan_outputs(&dir).unwrap().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.simtel", "b.simtel"]);
        assert_eq!(files[1].size, 2);
        assert_eq!(files[0].adler32, "00620062");

        std::os::unix::fs::symlink("/etc/passwd", dir.join("e.simtel")).unwrap();
        let refused = scan_outputs(&dir).unwrap().unwrap_err();
        assert!(
            refused.contains("e.simtel") && refused.contains("symbolic link"),
            "{refused}"
        );
        std::fs::remove_file(dir.join("e.simtel")).unwrap();

        let odd = std::ffi::OsStr::from_bytes(b"f\xff.simtel");
        std::fs::write(dir.join(odd), "x").unwrap();
        let refused = scan_outputs(&dir).unwrap().unwrap_err();
        assert!(refused.contains("not UTF-8"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();

        // No output directory: no files, no error.
        assert_eq!(scan_outputs(&dir).unwrap().unwrap(), vec![]);
    }
}
