//! Incremental planning. The consumer records a production with its plan
//! inputs (profile, parameters, fingerprint, run offset) and a `planned_jobs`
//! counter; a production small enough is planned whole in the consumer's
//! transaction, a larger one here: one task per dispatcher process creates
//! its jobs in chunks of `plan_chunk_jobs`, each chunk its own transaction
//! holding the production's row (`FOR UPDATE SKIP LOCKED`, so replicas share
//! the work and never plan the same jobs twice). The scheduler starts the
//! first jobs while the last are still being planned; a production is not
//! closed while `planned_jobs < job_total`. A cancel marks the production
//! CANCELLING between two chunks, and planning stops there.
//!
//! Cancels that arrive before their production are kept in `pending_cancels`
//! and applied when it arrives (by the consumer, or by this task's sweep when
//! the two crossed in concurrent transactions).

use std::sync::Arc;
use std::time::Duration;

use prodsys_core::{ProductionState, ProfileSet};
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_db::{Cached, Db};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Productions looked at per planning transaction (a chunk may span several small ones).
const PICK: i64 = 64;

pub(crate) struct PlanningTask {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    /// Jobs created per transaction.
    pub chunk: u64,
    /// Rung by the consumer when a production waits to be planned.
    pub wake: Arc<Notify>,
    /// The schedulers, rung when jobs were created.
    pub schedulers: Vec<Arc<Notify>>,
    /// Longest wait between two looks for work (another replica's productions).
    pub idle: Duration,
    /// How long a cancel whose production has not come is remembered.
    pub pending_cancel_ttl: Duration,
}

/// Most time between two sweeps of expired remembered cancels (less when
/// the time to live is shorter).
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);

impl PlanningTask {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_sweep: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            match self.db.client().await {
                Ok(client) => {
                    if let Err(error) = apply_pending_cancels(&client, None).await {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "applying pending cancels failed"
                        );
                    }
                    if last_sweep
                        .is_none_or(|at| at.elapsed() >= EXPIRY_SWEEP.min(self.pending_cancel_ttl))
                    {
                        last_sweep = Some(tokio::time::Instant::now());
                        self.expire_pending_cancels(&client).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "no database connection for planning"
                    )
                }
            }
            match self.advance_chained().await {
                Ok(0) => {}
                Ok(created) => {
                    tracing::debug!(created, "made jobs of chained productions' inputs");
                    for wake in &self.schedulers {
                        wake.notify_one();
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "advancing chained productions failed; retrying"
                    )
                }
            }
            match self.plan_chunk().await {
                Ok(Some(created)) => {
                    tracing::debug!(created, "planned a chunk of jobs");
                    for wake in &self.schedulers {
                        wake.notify_one();
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "planning a chunk failed; retrying"
                    )
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.idle) => {}
            }
        }
    }

    /// Advances every chained production still taking inputs, each in its
    /// own transaction: what the consumer does as files and ends arrive,
    /// again, so nothing waits on a transaction that crossed another (a
    /// parent's last job closing while its child was being advanced).
    /// How many jobs it made.
    async fn advance_chained(&self) -> anyhow::Result<u64> {
        let client = self.db.client().await?;
        let waiting = crate::store::waiting_for_input(&client).await?;
        drop(client);
        let mut created = 0;
        for production_id in waiting {
            let mut client = self.db.client().await?;
            let tx = client.transaction().await?;
            let (events, made) =
                crate::chain::advance(&tx, &self.profiles, std::slice::from_ref(&production_id))
                    .await?;
            prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
            tx.commit().await?;
            created += made;
        }
        Ok(created)
    }

    /// Forgets remembered cancels older than the time to live: their
    /// production never came.
    async fn expire_pending_cancels<C: GenericClient + Sync>(&self, client: &C) {
        let ttl =
            chrono::Duration::from_std(self.pending_cancel_ttl).unwrap_or(chrono::Duration::MAX);
        let older_than = chrono::Utc::now()
            .checked_sub_signed(ttl)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        match crate::store::expire_pending_cancels(client, older_than).await {
            Ok(0) => {}
            Ok(dropped) => tracing::info!(
                dropped,
                ttl_s = self.pending_cancel_ttl.as_secs(),
                "forgot cancels whose production never came"
            ),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "forgetting expired pending cancels failed"
            ),
        }
    }

    /// Creates up to `chunk` jobs of the productions still planning (highest
    /// priority first, then the one with least left, so small productions are
    /// not held behind a large one) in one transaction; `None` when there was
    /// nothing to plan.
    async fn plan_chunk(&self) -> anyhow::Result<Option<usize>> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query_cached(
                "SELECT production_id, profile, parameters, fingerprint, run_number_offset,
                        planned_jobs, job_total
                 FROM productions WHERE planned_jobs < job_total AND state = 'RUNNING'
                 ORDER BY priority DESC, job_total - planned_jobs, created_at, production_id
                 LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&PICK],
            )
            .await?;
        let mut budget = self.chunk.max(1);
        let mut jobs = JobRows::default();
        let mut ids = Vec::new();
        let mut planned = Vec::new();
        for row in &rows {
            if budget == 0 {
                break;
            }
            let production_id: String = row.get(0);
            let profile_name: &str = row.get(1);
            let Some(profile) = self.profiles.get(profile_name) else {
                tracing::warn!(%production_id, profile = profile_name, "cannot plan: unknown profile");
                continue;
            };
            let parameters: serde_json::Value = row.get(2);
            let Some(plan) = profile.plan(&parameters, row.get(3), row.get::<_, i64>(4) as u64)
            else {
                tracing::warn!(%production_id, "cannot plan: the parameters give no job plan");
                continue;
            };
            let from = row.get::<_, i64>(5) as u64;
            let total = (row.get::<_, i64>(6) as u64).min(plan.job_count);
            let to = total.min(from + budget);
            for index in from..to {
                jobs.push(&production_id, &plan.job(index));
            }
            budget -= to - from;
            if to == total {
                tracing::info!(%production_id, jobs = total, "production planned");
            }
            ids.push(production_id);
            planned.push(to as i64);
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let created = jobs.len();
        jobs.flush(&tx).await?;
        tx.execute_cached(
            "UPDATE productions p SET planned_jobs = u.planned, updated_at = now()
             FROM unnest($1::text[], $2::bigint[]) AS u(id, planned)
             WHERE p.production_id = u.id",
            &[&ids, &planned],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(created))
    }
}

/// Applies the remembered cancels whose production now exists (all of them,
/// or those of `only`): a RUNNING production accepted before the cancel was
/// asked for becomes CANCELLING; the remembered cancel is dropped whatever
/// the production's state (one asked for before its ID was given named
/// another production).
pub(crate) async fn apply_pending_cancels<C: GenericClient + Sync>(
    client: &C,
    only: Option<&[String]>,
) -> anyhow::Result<u64> {
    let from = ProductionState::Running;
    let to = from.transition(ProductionState::Cancelling)?;
    let rows = client
        .query_cached(
            "WITH found AS (
                 DELETE FROM pending_cancels c USING productions p
                 WHERE p.production_id = c.production_id
                   AND ($1::text[] IS NULL OR c.production_id = ANY($1))
                 RETURNING c.production_id, c.reason, c.requested_at >= p.accepted_at AS applies)
             UPDATE productions p SET state = $2, updated_at = now()
             FROM found WHERE p.production_id = found.production_id AND found.applies AND p.state = $3
             RETURNING p.production_id, found.reason",
            &[&only, &to.as_str(), &from.as_str()],
        )
        .await?;
    for row in &rows {
        tracing::info!(
            production_id = row.get::<_, &str>(0),
            reason = row.get::<_, &str>(1),
            "cancel received before the production applied"
        );
    }
    Ok(rows.len() as u64)
}

/// Job rows waiting for one insert, column by column.
#[derive(Default)]
pub(crate) struct JobRows {
    productions: Vec<String>,
    indexes: Vec<i64>,
    run_numbers: Vec<i64>,
    seeds: Vec<i64>,
    units: Vec<i64>,
    /// The LFNs a chained production's job takes (a JSON array).
    inputs: Vec<Option<serde_json::Value>>,
}

impl JobRows {
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    pub fn push(&mut self, production_id: &str, job: &prodsys_core::PlannedJob) {
        self.productions.push(production_id.to_string());
        self.indexes.push(job.index as i64);
        self.run_numbers.push(job.run_number as i64);
        self.seeds.push(job.seed as i64);
        self.units.push(job.units as i64);
        self.inputs.push(None);
    }

    /// A chained production's job, with the input files it takes.
    pub fn push_taking(
        &mut self,
        production_id: &str,
        job: &prodsys_core::PlannedJob,
        lfns: &[&str],
    ) {
        self.push(production_id, job);
        if let Some(last) = self.inputs.last_mut() {
            *last = Some(serde_json::Value::from(lfns.to_vec()));
        }
    }

    pub async fn flush(&mut self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.indexes.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO jobs (production_id, job_index, run_number, seed, units, inputs)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                                  $6::jsonb[])",
            &[
                &self.productions,
                &self.indexes,
                &self.run_numbers,
                &self.seeds,
                &self.units,
                &self.inputs,
            ],
        )
        .await?;
        *self = JobRows::default();
        Ok(())
    }
}
