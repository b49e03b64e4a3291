//! The status service's AMQP consumer: projects `request.accepted`,
//! `production.dispatched`, `job.status`, `production.completed` and
//! `installation.health` into the read model, with where each production's
//! outputs are forwarded (`forwarding.progress`, `production.forwarded`).

use anyhow::Context;
use prodsys_core::events::{
    FORWARDING_PROGRESS, INSTALLATION_HEALTH, JOB_STATUS, PRODUCTION_COMPLETED,
    PRODUCTION_DISPATCHED, PRODUCTION_FORWARDED, REQUEST_ACCEPTED,
};
use prodsys_core::{JobState, ProductionState};
use prodsys_db::Db;
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_server::decode_event;
use uuid::Uuid;

use crate::domain::{InstallationHealth, JobTransition, Projection};
use crate::error::Result;
use crate::{forwarding, store};

/// Builds the read model from events.
pub struct Projector {
    pub db: Db,
}

enum Update {
    Accepted(pb::RequestAccepted),
    Dispatched(pb::ProductionDispatched),
    Jobs(pb::JobStatusBatch),
    Completed(pb::ProductionCompleted),
    Health(pb::InstallationHealth),
    Progress(pb::ForwardingProgress),
    Forwarded(pb::ProductionForwarded),
}

fn decode(incoming: &Incoming) -> Result<(Uuid, Update), String> {
    match incoming.routing_key.as_str() {
        REQUEST_ACCEPTED => decode_event(incoming).map(|(id, m)| (id, Update::Accepted(m))),
        PRODUCTION_DISPATCHED => decode_event(incoming).map(|(id, m)| (id, Update::Dispatched(m))),
        JOB_STATUS => decode_event(incoming).map(|(id, m)| (id, Update::Jobs(m))),
        PRODUCTION_COMPLETED => decode_event(incoming).map(|(id, m)| (id, Update::Completed(m))),
        INSTALLATION_HEALTH => decode_event(incoming).map(|(id, m)| (id, Update::Health(m))),
        FORWARDING_PROGRESS => decode_event(incoming).map(|(id, m)| (id, Update::Progress(m))),
        PRODUCTION_FORWARDED => decode_event(incoming).map(|(id, m)| (id, Update::Forwarded(m))),
        other => Err(format!("status does not handle {other:?}")),
    }
}

/// Folds one event into the batch's projection.
fn apply(projection: &mut Projection, update: Update) -> Result<()> {
    match update {
        Update::Accepted(m) => {
            projection.pointing(m.production_id.clone(), m.period, m.pointing);
            projection.accepted(
                m.production_id,
                Uuid::parse_str(&m.request_id).ok(),
                m.profile,
                m.vo,
                m.backend,
            )
        }
        Update::Dispatched(m) => {
            projection.members(&m.production_id, m.installations);
            if m.waiting_for_input || m.inputs_used > 0 {
                projection.inputs(m.production_id.clone(), m.inputs_used, None);
            }
            projection.dispatched(
                m.production_id,
                m.job_total,
                m.estimate.as_ref().map(prost::Message::encode_to_vec),
                m.waiting_for_input,
            )
        }
        Update::Health(m) => projection.health(InstallationHealth {
            installation: m.installation,
            healthy: m.healthy,
            reason: m.reason,
            since_unix_ms: m.since_unix_ms,
        }),
        Update::Completed(m) => {
            let state = ProductionState::from_proto(m.state)
                .context("production.completed without a state")?;
            let counts = m.counts.map(prodsys_core::JobCounts::from);
            if m.inputs_used > 0 || !m.inputs_note.is_empty() {
                projection.inputs(m.production_id.clone(), m.inputs_used, Some(m.inputs_note));
            }
            projection.completed(m.production_id, state, counts.as_ref());
        }
        // Written by `forwarding` in the batch's transaction.
        Update::Progress(_) | Update::Forwarded(_) => {}
        Update::Jobs(m) => {
            for t in m.transitions {
                projection.job(JobTransition {
                    state: JobState::from_proto(t.state),
                    production_id: t.production_id,
                    job_index: t.job_index,
                    attempt: t.attempt,
                    raw_status: t.raw_status,
                    installation: t.installation,
                });
            }
        }
    }
    Ok(())
}

impl Projector {
    async fn handle_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut updates = Vec::new();
        for incoming in batch {
            match decode(incoming) {
                Ok(u) => {
                    updates.push(u);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<Uuid> = updates.iter().map(|(id, _)| *id).collect();
        let mut fresh = prodsys_db::claim(&tx, &ids).await?;
        // Everything the batch says, merged first: one statement then writes
        // each kind (a row may change once per statement).
        let mut projection = Projection::default();
        let mut touched_by_forwarding = Vec::new();
        for (id, update) in updates {
            // Taken once: the same event twice in one batch takes effect once.
            if !fresh.remove(&id) {
                continue;
            }
            match &update {
                Update::Accepted(m) => forwarding::plan(&tx, m).await?,
                Update::Progress(m) => {
                    forwarding::progress(&tx, m).await?;
                    touched_by_forwarding.push(m.production_id.clone());
                }
                Update::Forwarded(m) => {
                    forwarding::forwarded(&tx, m).await?;
                    touched_by_forwarding.push(m.production_id.clone());
                }
                _ => {}
            }
            apply(&mut projection, update)?;
        }
        let mut changes = projection.finish();
        // Watchers of a production whose forwarding moved are told too.
        for id in touched_by_forwarding {
            if !changes.touched.contains(&id) {
                changes.touched.push(id);
            }
        }
        store::project(&tx, changes).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

impl BatchHandler for Projector {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
