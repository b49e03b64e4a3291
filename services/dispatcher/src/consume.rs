//! The dispatcher's AMQP consumer: records accepted productions with their
//! plan (planning the small ones at once) and takes cancels, remembering one
//! whose production has not arrived yet (a cancel also cancels the
//! productions chained after it). It takes `job.output` and
//! `production.completed` too: the files and ends that chained productions
//! make their jobs of (see `chain`).

use std::collections::HashSet;
use std::sync::Arc;

use prodsys_core::events::{
    JOB_OUTPUT, PRODUCTION_CANCEL, PRODUCTION_COMPLETED, PRODUCTION_DISPATCHED,
};
use prodsys_core::{ProductionState, ProfileSet};
use prodsys_db::Db;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{decode_event, outbox_event};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::chain;
use crate::domain::{self, Prepared};
use crate::error::{DispatcherError, Result};
use crate::store::{self, JobRows};

/// Plans accepted productions into jobs.
pub(crate) struct Planner {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    /// One per installation's scheduler.
    pub wakes: Vec<Arc<crate::scheduler::Wake>>,
    /// The planning task's.
    pub planning: Arc<Notify>,
    /// Most jobs one batch plans in the consumer's own transaction; larger
    /// productions are left to the planning task.
    pub inline_jobs: u64,
    /// The deployment's ceiling on one production's jobs.
    pub max_jobs: u64,
    /// The profiles whose outputs chained productions may take (`None`: any).
    pub sources: Option<Vec<String>>,
    /// Groups of installations: the members a federated production may use.
    pub federation: Arc<crate::federation::Federation>,
}

impl Planner {
    /// Marks the production CANCELLING; its installation's scheduler kills
    /// and closes it. A production not seen yet has its cancel remembered,
    /// applied when it arrives.
    async fn cancel(
        &self,
        tx: &Transaction<'_>,
        event_id: Uuid,
        cancel: &pb::ProductionCancel,
    ) -> Result<()> {
        let from = ProductionState::Running;
        let to = from
            .transition(ProductionState::Cancelling)
            .map_err(|e| DispatcherError::Unexpected(e.into()))?;
        let running = store::move_production(tx, &cancel.production_id, from, to).await?;
        let remembered = !running
            && store::remember_cancel(
                tx,
                &cancel.production_id,
                &cancel.reason,
                domain::event_time(event_id, chrono::Utc::now()),
            )
            .await?;
        // Cancelling a production cancels the steps chained after it.
        let chained = if running {
            store::cancel_chained_after(tx, &cancel.production_id).await?
        } else {
            Vec::new()
        };
        tracing::info!(production_id = %cancel.production_id, reason = %cancel.reason,
            running, remembered, ?chained, "cancel requested");
        Ok(())
    }

    /// Records a batch of accepted productions in one transaction: one
    /// insert for the productions, one outbox write. Productions whose jobs
    /// fit together in `inline_jobs` are planned here whole; the others are
    /// left to the planning task (`planned_jobs` 0). A production whose
    /// cancel came first is recorded CANCELLING, with no jobs.
    ///
    /// A chained production (`parents` holds its parents, by its place in
    /// `prepared`) is linked to them and takes the files they delivered
    /// already; it is returned to be advanced, with whether any production
    /// recorded has jobs left for the planning task.
    async fn plan(
        &self,
        tx: &Transaction<'_>,
        prepared: &[Prepared<'_>],
        parents: &[Option<Vec<String>>],
    ) -> Result<(Vec<String>, bool)> {
        let mut chained = Vec::new();
        let mut left_to_plan = false;
        if prepared.is_empty() {
            return Ok((chained, left_to_plan));
        }
        let ids: Vec<&str> = prepared
            .iter()
            .map(|p| p.accepted.production_id.as_str())
            .collect();
        // Cancels that came first, with when each was asked for.
        let pending = store::pending_cancels(tx, &ids).await?;
        let cancelled = domain::cancels_applying(
            prepared
                .iter()
                .map(|p| (p.accepted.production_id.as_str(), p.accepted_at)),
            &pending,
        );
        let rows = domain::new_productions(prepared, &cancelled, self.inline_jobs);
        let inserted = store::insert_productions(tx, &rows).await?;
        // Applied or dropped, a remembered cancel is done with once its production is recorded.
        let done_with: Vec<&str> = pending
            .keys()
            .filter(|id| inserted.contains(*id))
            .map(String::as_str)
            .collect();
        store::forget_cancels(tx, &done_with).await?;
        let mut jobs = JobRows::default();
        let mut events = Vec::new();
        for ((p, row), parents) in prepared.iter().zip(&rows).zip(parents) {
            let accepted = p.accepted;
            // Planned before (a replayed event under another ID): nothing to add.
            if !inserted.contains(&accepted.production_id) {
                continue;
            }
            let waiting_for_input = parents.is_some();
            if let Some(parents) = parents
                && row.state == ProductionState::Running
                && let Some(profile) = self.profiles.get(&accepted.profile)
            {
                chain::link(tx, profile, &accepted.production_id, &p.parameters, parents)
                    .await
                    .map_err(DispatcherError::Unexpected)?;
                chained.push(accepted.production_id.clone());
            }
            for i in 0..row.planned_jobs {
                jobs.push(&accepted.production_id, &p.plan.job(i));
            }
            left_to_plan |= row.planned_jobs < row.job_total;
            let event = pb::ProductionDispatched {
                production_id: accepted.production_id.clone(),
                job_total: p.plan.job_count,
                backend: accepted.backend.clone(),
                estimate: Some(p.estimate),
                waiting_for_input,
                inputs_used: 0,
                installations: self
                    .federation
                    .group_members(&accepted.backend, &accepted.vo),
            };
            events.push(outbox_event(
                PRODUCTION_DISPATCHED,
                &accepted.production_id,
                &event,
            ));
            let id = &accepted.production_id;
            tracing::info!(production_id = %id, jobs = p.plan.job_count,
                planned_now = row.planned_jobs, cancelled = cancelled.contains(id),
                ignored_cancel = pending.contains_key(id) && !cancelled.contains(id),
                "production recorded");
        }
        jobs.flush(tx).await?;
        prodsys_db::enqueue(tx, &self.db, &events).await?;
        Ok((chained, left_to_plan))
    }

    async fn handle_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // (slot in the batch, event ID, event) of each production to plan.
        let mut accepted = Vec::new();
        let mut cancels = Vec::new();
        // (event ID, event) of finished jobs' outputs and ended productions.
        let mut outputs = Vec::new();
        let mut ended = Vec::new();
        for (slot, incoming) in batch.iter().enumerate() {
            if incoming.routing_key == JOB_OUTPUT {
                outcomes.push(match decode_event::<pb::JobOutput>(incoming) {
                    Ok(decoded) => {
                        outputs.push(decoded);
                        Outcome::Ack
                    }
                    Err(reason) => Outcome::DeadLetter(reason),
                });
                continue;
            }
            if incoming.routing_key == PRODUCTION_COMPLETED {
                outcomes.push(match decode_event::<pb::ProductionCompleted>(incoming) {
                    Ok(decoded) => {
                        ended.push(decoded);
                        Outcome::Ack
                    }
                    Err(reason) => Outcome::DeadLetter(reason),
                });
                continue;
            }
            if incoming.routing_key == PRODUCTION_CANCEL {
                outcomes.push(match decode_event::<pb::ProductionCancel>(incoming) {
                    Ok(decoded) => {
                        cancels.push(decoded);
                        Outcome::Ack
                    }
                    Err(reason) => Outcome::DeadLetter(reason),
                });
                continue;
            }
            outcomes.push(match decode_event::<pb::RequestAccepted>(incoming) {
                Ok((id, event)) => {
                    accepted.push((slot, id, event));
                    Outcome::Ack
                }
                Err(reason) => Outcome::DeadLetter(reason),
            });
        }
        let now = chrono::Utc::now();
        let mut prepared = Vec::with_capacity(accepted.len());
        let mut ids = Vec::with_capacity(accepted.len());
        for (slot, id, event) in &accepted {
            let accepted_at = domain::event_time(*id, now);
            match domain::prepare(&self.profiles, self.max_jobs, accepted_at, event) {
                Ok(p) => {
                    prepared.push(p);
                    ids.push(*id);
                }
                Err(reason) => outcomes[*slot] = Outcome::DeadLetter(reason),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut seen = HashSet::new();
        let prepared: Vec<Prepared<'_>> = prepared
            .into_iter()
            .zip(&ids)
            .filter(|(_, id)| fresh.contains(*id) && seen.insert(**id))
            .map(|(p, _)| p)
            .collect();
        // The parents of each chained production, and the producers of the
        // files offered: their source locks are taken once, in order.
        let mut parents = Vec::with_capacity(prepared.len());
        for p in &prepared {
            parents.push(match self.profiles.get(&p.accepted.profile) {
                Some(profile) if profile.inputs().is_some() => Some(
                    chain::parents_of(&tx, profile, &p.accepted.production_id, &p.parameters)
                        .await
                        .map_err(DispatcherError::Unexpected)?,
                ),
                _ => None,
            });
        }
        // No inbox claim for these: taking them again changes nothing (every
        // delivery, file and input is keyed), and a claim would cost a row
        // per finished job of every production.
        let outputs: Vec<pb::JobOutput> = match &self.sources {
            // No chained profile is loaded: nobody takes files.
            Some(sources) if sources.is_empty() => Vec::new(),
            _ => outputs.into_iter().map(|(_, o)| o).collect(),
        };
        let ended: Vec<String> = ended.into_iter().map(|(_, e)| e.production_id).collect();
        let mut sources: Vec<String> = parents.iter().flatten().flatten().cloned().collect();
        sources.extend(outputs.iter().map(|o| o.production_id.clone()));
        store::lock_sources(&tx, &sources)
            .await
            .map_err(DispatcherError::Unexpected)?;
        let (mut children, left_to_plan) = self.plan(&tx, &prepared, &parents).await?;
        // Files offered to chained productions become jobs in the planning
        // task's transactions (woken below), not here: the next batch's
        // files are taken while the jobs of this one's are made, instead of
        // every batch waiting on the chained production's lock in turn.
        chain::take_outputs(&tx, &outputs, self.sources.as_deref())
            .await
            .map_err(DispatcherError::Unexpected)?;
        children.extend(
            chain::ended(&tx, &ended)
                .await
                .map_err(DispatcherError::Unexpected)?,
        );
        // After the plans: a cancel in the same batch finds its production.
        for (id, cancel) in &cancels {
            if !prodsys_db::claim(&tx, &[*id]).await?.is_empty() {
                self.cancel(&tx, *id, cancel).await?;
            }
        }
        let (events, created) = chain::advance(&tx, &self.profiles, &children)
            .await
            .map_err(DispatcherError::Unexpected)?;
        prodsys_db::enqueue(&tx, &self.db, &events).await?;
        tx.commit().await?;
        if created > 0 {
            tracing::debug!(created, "jobs made of arriving inputs");
        }
        // A cancel (one remembered here may have crossed its production's
        // arrival), files offered to chained productions, or a parent's end.
        let urgent = !cancels.is_empty() || !outputs.is_empty() || !ended.is_empty();
        // The planning task is rung only for work of its own: those, and
        // the jobs of a production too large for this transaction; its own
        // sweep finds anything else within its idle wait.
        if left_to_plan || urgent {
            self.planning.notify_one();
        }
        // The schedulers: at once for the urgent; for new jobs only while
        // they have room.
        for wake in &self.wakes {
            if urgent {
                wake.now();
            } else if created > 0 || !prepared.is_empty() {
                wake.ready();
            }
        }
        Ok(outcomes)
    }
}

impl BatchHandler for Planner {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
