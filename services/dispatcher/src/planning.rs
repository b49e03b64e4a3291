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
use prodsys_db::Db;
use prodsys_db::deadpool_postgres::GenericClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{self, JobRows};

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
    pub schedulers: Vec<Arc<crate::scheduler::Wake>>,
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
                        wake.ready();
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
                        wake.ready();
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
        let waiting = store::waiting_for_input(&client).await?;
        drop(client);
        let mut created = 0;
        for production_id in waiting {
            let mut client = self.db.client().await?;
            let tx = client.transaction().await?;
            let (events, made) =
                crate::chain::advance(&tx, &self.profiles, std::slice::from_ref(&production_id))
                    .await?;
            prodsys_db::enqueue(&tx, &self.db, &events).await?;
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
        match store::expire_pending_cancels(client, older_than).await {
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
        let unplanned = store::lock_unplanned(&tx, PICK).await?;
        let mut budget = self.chunk.max(1);
        let mut jobs = JobRows::default();
        let mut ids = Vec::new();
        let mut planned = Vec::new();
        for production in unplanned {
            if budget == 0 {
                break;
            }
            let production_id = production.production_id;
            let Some(profile) = self.profiles.get(&production.profile) else {
                tracing::warn!(%production_id, profile = %production.profile, "cannot plan: unknown profile");
                continue;
            };
            let Some(plan) = profile.plan(
                &production.parameters,
                &production.fingerprint,
                production.run_number_offset,
            ) else {
                tracing::warn!(%production_id, "cannot plan: the parameters give no job plan");
                continue;
            };
            let from = production.planned_jobs;
            let total = production.job_total.min(plan.job_count);
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
        store::set_planned(&tx, &ids, &planned).await?;
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
    let applied = store::apply_pending_cancels(client, only, from, to).await?;
    for cancel in &applied {
        tracing::info!(
            production_id = cancel.production_id,
            reason = cancel.reason,
            "cancel received before the production applied"
        );
    }
    Ok(applied.len() as u64)
}
