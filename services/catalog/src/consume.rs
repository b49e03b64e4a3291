//! The catalog's AMQP consumer: registers the files of `job.output` events
//! and writes a record per `production.completed`.

use std::sync::Arc;

use prodsys_core::ProductionState;
use prodsys_core::events::{JOB_OUTPUT, PRODUCTION_COMPLETED};
use prodsys_db::Db;
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use prodsys_server::decode_event;
use uuid::Uuid;

use crate::domain::KeyTypes;
use crate::error::Result;
use crate::store;

pub struct Registrar {
    pub db: Db,
    pub types: Arc<KeyTypes>,
}

enum Record {
    Output(pb::JobOutput),
    Completed(pb::ProductionCompleted),
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
        let mut completed = Vec::new();
        for (id, record) in records {
            // Taken once: the same event twice in one batch takes effect once.
            if !fresh.remove(&id) {
                continue;
            }
            match record {
                Record::Output(output) => {
                    files.extend(output.files.into_iter().map(|f| (output.attempt, f)))
                }
                Record::Completed(c) => completed.push(c),
            }
        }
        store::register_files(&tx, &self.types, &files).await?;
        for c in completed {
            let state =
                ProductionState::from_proto(c.state).map_or("UNKNOWN", ProductionState::as_str);
            store::record_completed(&tx, &c.production_id, state).await?;
            tracing::info!(production_id = %c.production_id, %state, "production record written");
        }
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
