//! The catalog's AMQP consumer: registers the files of `job.output` events,
//! writes a record per `production.completed`, and keeps what
//! `request.accepted` and `production.dispatched` tell of a production for
//! that record.

use std::sync::Arc;

use prodsys_core::ProductionState;
use prodsys_core::events::{
    JOB_OUTPUT, PRODUCTION_COMPLETED, PRODUCTION_DISPATCHED, REQUEST_ACCEPTED,
};
use prodsys_db::Db;
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_server::decode_event;
use uuid::Uuid;

use crate::domain::KeyTypes;
use crate::domain::record::uuid_v7_unix_ms;
use crate::error::Result;
use crate::store;

pub struct Registrar {
    pub db: Db,
    pub types: Arc<KeyTypes>,
}

enum Record {
    Output(pb::JobOutput),
    Completed(pb::ProductionCompleted),
    Accepted(pb::RequestAccepted),
    Dispatched(pb::ProductionDispatched),
}

/// When a UUIDv7 was made, as a time.
fn made_at(id: &Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    uuid_v7_unix_ms(id).and_then(chrono::DateTime::from_timestamp_millis)
}

impl Registrar {
    async fn handle_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut records = Vec::new();
        for incoming in batch {
            let decoded = match incoming.routing_key.as_str() {
                JOB_OUTPUT => decode_event(incoming).map(|(id, m)| (id, Record::Output(m))),
                PRODUCTION_COMPLETED => {
                    decode_event(incoming).map(|(id, m)| (id, Record::Completed(m)))
                }
                REQUEST_ACCEPTED => decode_event(incoming).map(|(id, m)| (id, Record::Accepted(m))),
                PRODUCTION_DISPATCHED => {
                    decode_event(incoming).map(|(id, m)| (id, Record::Dispatched(m)))
                }
                other => Err(format!("catalog does not handle {other:?}")),
            };
            match decoded {
                Ok(r) => {
                    records.push(r);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<Uuid> = records.iter().map(|(id, _)| *id).collect();
        let mut fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut files = Vec::new();
        let mut jobs: Vec<(String, i64)> = Vec::new();
        let mut completed = Vec::new();
        let mut plans = Vec::new();
        let mut accepted = Vec::new();
        let mut dispatched = Vec::new();
        for (id, record) in records {
            // Taken once: the same event twice in one batch takes effect once.
            if !fresh.remove(&id) {
                continue;
            }
            match record {
                Record::Output(output) => {
                    jobs.push((output.production_id, output.job_index as i64));
                    files.extend(output.files.into_iter().map(|f| (output.attempt, f)))
                }
                Record::Completed(c) => completed.push((id, c)),
                Record::Accepted(a) => accepted.push((id, a)),
                Record::Dispatched(d) => dispatched.push(d),
            }
        }
        for (_, a) in &accepted {
            if !a.forward.is_empty() {
                plans.push(a);
            }
        }
        // The forwarding locks first, all at once and in order: shared for
        // every production whose files, outputs taken or end this batch
        // records (the sweep judges none of them until this commits).
        let registering: Vec<&str> = files
            .iter()
            .map(|(_, f)| f.production_id.as_str())
            .chain(jobs.iter().map(|(p, _)| p.as_str()))
            .chain(completed.iter().map(|(_, c)| c.production_id.as_str()))
            .collect();
        let planning: Vec<&str> = plans.iter().map(|a| a.production_id.as_str()).collect();
        store::lock_forwarding(&tx, &registering, &planning).await?;
        for a in &plans {
            store::plan_forwarding(&tx, &a.production_id, &a.forward).await?;
            tracing::info!(production_id = %a.production_id, destinations = ?a.forward, "forwarding planned");
        }
        let registered = store::register_files(&tx, &self.types, &files).await?;
        let taken: Vec<(&str, i64)> = jobs.iter().map(|(p, j)| (p.as_str(), *j)).collect();
        store::record_job_outputs(&tx, &taken).await?;
        // A job's outputs taken may be the last its production waited for,
        // even when they added no replica (no files, or files known already).
        let mut changed: Vec<&str> = registered
            .forwarding
            .iter()
            .map(String::as_str)
            .chain(taken.iter().map(|(p, _)| *p))
            .collect();
        let kept: Vec<store::Accepted<'_>> = accepted
            .iter()
            .map(|(id, a)| store::Accepted {
                accepted: a,
                // Parameters a publisher left out (or mangled) are kept as none.
                parameters: serde_json::from_str(&a.parameters_json)
                    .unwrap_or_else(|_| serde_json::Value::Object(Default::default())),
                submitted_at: Uuid::parse_str(&a.request_id)
                    .ok()
                    .and_then(|r| made_at(&r)),
                accepted_at: made_at(id),
            })
            .collect();
        store::record_accepted(&tx, &kept).await?;
        store::record_dispatched(&tx, &dispatched).await?;
        for (id, c) in &completed {
            let state =
                ProductionState::from_proto(c.state).map_or("UNKNOWN", ProductionState::as_str);
            // Every DONE job sent one job.output (in the same transaction as
            // its DONE): their number is what forwarding waits for. When it
            // ended is its event's time (the same however often it comes).
            let completed_at = made_at(id).unwrap_or_else(chrono::Utc::now);
            store::record_completed(&tx, c, state, completed_at).await?;
            crate::installations::record(&tx, c).await?;
            tracing::info!(production_id = %c.production_id, %state, "production record written");
            // Its forwarding may now be finished.
            changed.push(&c.production_id);
        }
        changed.sort_unstable();
        changed.dedup();
        store::forwarding_changed(&tx, &changed).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

impl BatchHandler for Registrar {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
