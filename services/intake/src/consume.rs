//! Intake's AMQP consumer: the checker's verdicts (`request.accepted`,
//! `request.reused`, `request.rejected`) and requests other systems publish
//! on the ingest exchange.

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProfileSet;
use prodsys_core::events::{
    PRODUCTION_COMPLETED, REQUEST_ACCEPTED, REQUEST_REJECTED, REQUEST_REUSED,
};
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, OutboxEvent};
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{decode_event, outbox_event};
use uuid::Uuid;

use crate::domain::{self, NewRequest, PointingOutcome, Verdicts};
use crate::error::{IntakeError, Result};
use crate::{ingest, store};

pub struct IntakeConsumer {
    pub db: Db,
    pub profiles: Arc<ProfileSet>,
    pub ingest_exchange: String,
    pub policy: ingest::Policy,
    /// Checks the tokens events carry, as the gRPC port checks calls'.
    pub auth: prodsys_auth::Auth,
}

/// Why an event may not submit at all (tokens on): the field the refusal
/// names (`authorization` or `vo`) and the reason.
struct Refusal {
    field: &'static str,
    reason: String,
}

enum Work {
    Accepted(Uuid, pb::RequestAccepted),
    Reused(Uuid, pb::RequestAccepted),
    Rejected(Uuid, pb::RequestRejected),
    Submit(Box<ingest::Submission>),
    /// A production ended: its request no longer counts against its VO.
    Ended(String),
}

impl IntakeConsumer {
    /// What a delivery asks for; `Err` is why it can never be handled.
    fn classify(&self, incoming: &Incoming) -> Result<Work, String> {
        if incoming.exchange == self.ingest_exchange {
            return ingest::parse(incoming, &self.profiles, &self.policy)
                .map(|s| Work::Submit(Box::new(s)));
        }
        match incoming.routing_key.as_str() {
            REQUEST_ACCEPTED => decode_event(incoming).map(|(id, m)| Work::Accepted(id, m)),
            REQUEST_REUSED => decode_event(incoming).map(|(id, m)| Work::Reused(id, m)),
            REQUEST_REJECTED => decode_event(incoming).map(|(id, m)| Work::Rejected(id, m)),
            PRODUCTION_COMPLETED => decode_event::<pb::ProductionCompleted>(incoming)
                .map(|(_, m)| Work::Ended(m.production_id)),
            other => Err(format!("intake does not handle {other:?}")),
        }
    }

    /// With tokens on, whether the event may submit: a valid token with
    /// `compute.create` carrying the request's VO (whose subject becomes the
    /// submitter and owner), or no token and a broker user mapped to the VO.
    /// `Err` only when the token's issuer cannot be reached (transient).
    async fn admit(&self, s: &mut ingest::Submission) -> Result<Option<Refusal>> {
        if !self.policy.tokens {
            return Ok(None);
        }
        let token = match &s.authorization {
            ingest::Authorization::Bearer(token) => token.clone(),
            ingest::Authorization::Malformed => {
                return Ok(Some(Refusal {
                    field: "authorization",
                    reason: format!(
                        "the `{}` header is not `Bearer <token>`",
                        ingest::AUTHORIZATION_HEADER
                    ),
                }));
            }
            ingest::Authorization::None => {
                return Ok(self
                    .policy
                    .refuses_without_token(s.user_id.as_deref(), &s.data.vo)
                    .map(|reason| Refusal {
                        field: "authorization",
                        reason,
                    }));
            }
        };
        let caller = match self
            .auth
            .admit(
                prodsys_auth::Need::Scope(prodsys_auth::COMPUTE_CREATE),
                Some(token.as_str()),
            )
            .await
        {
            Ok(caller) => caller,
            Err(prodsys_auth::Denial::Unavailable(reason)) => {
                return Err(IntakeError::Transient(anyhow::anyhow!(
                    "checking an event's token: {reason}"
                )));
            }
            Err(
                prodsys_auth::Denial::Unauthenticated(reason)
                | prodsys_auth::Denial::Forbidden(reason),
            ) => {
                return Ok(Some(Refusal {
                    field: "authorization",
                    reason,
                }));
            }
        };
        if let Err(status) = caller.may_act_for("vo", &s.data.vo) {
            let reason = status.message();
            return Ok(Some(Refusal {
                field: "vo",
                reason: reason.strip_prefix("vo: ").unwrap_or(reason).to_string(),
            }));
        }
        s.data.submitter = caller.submitter(&s.data.submitter);
        s.owner = caller.owner();
        Ok(None)
    }

    /// The answer on the event's `reply_to` to an event refused before it
    /// became a request: no request ID, the event's ID as correlation.
    fn refusal_reply(s: &ingest::Submission, refusal: &Refusal) -> Result<Option<OutboxEvent>> {
        let Some(queue) = &s.reply_to else {
            return Ok(None);
        };
        let violation = prodsys_core::Violation::new(refusal.field, refusal.reason.clone());
        let mut body = domain::reply_body(
            Uuid::nil(),
            &s.event_id,
            "rejected",
            "",
            "",
            &[violation],
            &serde_json::Value::Null,
        );
        body["request_id"] = "".into();
        let mut reply = store::reply(queue, Uuid::nil(), body)?;
        reply.subject = s.event_id.clone();
        Ok(Some(reply))
    }

    /// Stores a request published as an event; the events it owes.
    async fn submit(
        &self,
        tx: &Transaction<'_>,
        s: &ingest::Submission,
    ) -> Result<Vec<OutboxEvent>> {
        let key = s.idempotency_key();
        let request = NewRequest {
            request_id: Uuid::now_v7(),
            idempotency_key: Some(&key),
            profile: &s.data.profile,
            vo: &s.data.vo,
            parameters: &s.data.parameters,
            backend: domain::backend_or_default(&s.data.backend),
            submitter: &s.data.submitter,
            owner: s.owner.as_deref(),
            extend: s.data.extend,
            reuse_existing: s.data.reuse_existing,
            priority: s.data.priority,
            forward: &s.data.forward,
            forward_replace: s.data.forward_replace,
            correlation_id: Some(&s.event_id),
            reply_to: s.reply_to.as_deref(),
            violations: &s.violations,
        };
        if !store::insert_request(tx, &request).await? {
            tracing::info!(key, "event already received");
            return Ok(Vec::new());
        }
        tracing::info!(request_id = %request.request_id, source = %s.source, event_id = %s.event_id,
            violations = s.violations.len(), "request received from an event");
        if s.violations.is_empty() {
            return Ok(vec![store::received_event(&request)]);
        }
        let rejected = pb::RequestRejected {
            request_id: request.request_id.to_string(),
            violations: s.violations.iter().cloned().map(Into::into).collect(),
            existing_production_id: String::new(),
            correlation_id: s.event_id.clone(),
            ..Default::default()
        };
        let mut events = vec![outbox_event(
            REQUEST_REJECTED,
            &request.request_id.to_string(),
            &rejected,
        )];
        if let Some(queue) = &s.reply_to {
            let body = domain::reply_body(
                request.request_id,
                &s.event_id,
                "rejected",
                "",
                "",
                &s.violations,
                &serde_json::Value::Null,
            );
            events.push(store::reply(queue, request.request_id, body)?);
        }
        Ok(events)
    }

    async fn handle_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut work = Vec::new();
        // Answers to events refused before they became requests.
        let mut refusals = Vec::new();
        for incoming in batch {
            match self.classify(incoming) {
                Ok(Work::Submit(mut s)) => match self.admit(&mut s).await? {
                    None => {
                        work.push(Work::Submit(s));
                        outcomes.push(Outcome::Ack);
                    }
                    Some(refusal) => {
                        tracing::info!(event_id = %s.event_id, source = %s.source,
                            field = refusal.field, reason = %refusal.reason, "event refused");
                        refusals.extend(Self::refusal_reply(&s, &refusal)?);
                        outcomes.push(Outcome::DeadLetter(format!(
                            "{}: {}",
                            refusal.field, refusal.reason
                        )));
                    }
                },
                Ok(w) => {
                    work.push(w);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await.map_err(anyhow::Error::from)?;
        let event_ids: Vec<Uuid> = work
            .iter()
            .filter_map(|w| match w {
                Work::Accepted(id, _) | Work::Reused(id, _) | Work::Rejected(id, _) => Some(*id),
                Work::Submit(_) | Work::Ended(_) => None,
            })
            .collect();
        // Taken once: the same event twice in one batch takes effect once.
        let mut fresh = prodsys_db::claim(&tx, &event_ids).await?;
        let mut events = refusals;
        let mut verdicts = Verdicts::default();
        let request_id =
            |id: &str| -> Result<Uuid> { Ok(Uuid::parse_str(id).context("request_id")?) };
        for w in &work {
            match w {
                Work::Accepted(id, m) if fresh.remove(id) => {
                    verdicts.push_grouped(
                        request_id(&m.request_id)?,
                        "accepted",
                        known_by(&m.productions).unwrap_or(&m.production_id),
                        "",
                        Vec::new(),
                        productions(&m.productions)?,
                    );
                }
                // Answered with the production that already is this simulation.
                Work::Reused(id, m) if fresh.remove(id) => {
                    let production_id = known_by(&m.productions).unwrap_or(&m.production_id);
                    let existing = match m.productions.is_empty() {
                        true => m.production_id.as_str(),
                        false => "",
                    };
                    verdicts.push_grouped(
                        request_id(&m.request_id)?,
                        "accepted",
                        production_id,
                        existing,
                        Vec::new(),
                        productions(&m.productions)?,
                    );
                }
                Work::Rejected(id, m) if fresh.remove(id) => {
                    verdicts.push_grouped(
                        request_id(&m.request_id)?,
                        "rejected",
                        "",
                        &m.existing_production_id,
                        m.violations.iter().cloned().map(Into::into).collect(),
                        productions(&m.productions)?,
                    );
                }
                // Events from outside are deduplicated by their own source and id.
                Work::Submit(s) => events.extend(self.submit(&tx, s).await?),
                _ => {}
            }
        }
        // Marking an end twice changes nothing: no inbox row for these.
        let ended: Vec<&str> = work
            .iter()
            .filter_map(|w| match w {
                Work::Ended(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        store::productions_ended(&tx, &ended).await?;
        for recorded in store::record_verdicts(&tx, &verdicts).await? {
            let Some(queue) = recorded.reply_to else {
                continue;
            };
            let i = verdicts
                .position(recorded.request_id)
                .expect("a row for a verdict asked for");
            let body = domain::reply_body(
                recorded.request_id,
                &recorded.correlation_id.unwrap_or_default(),
                verdicts.outcomes[i],
                verdicts.production_ids[i],
                verdicts.existing[i],
                &verdicts.violations[i],
                &verdicts.productions[i],
            );
            events.push(store::reply(&queue, recorded.request_id, body)?);
        }
        prodsys_db::enqueue(&tx, &self.db, &events).await?;
        tx.commit().await.map_err(anyhow::Error::from)?;
        Ok(outcomes)
    }
}

/// The production a period's request is known by: its first new production,
/// else the first existing one a pointing was answered with; `None` for a
/// request without a period.
fn known_by(productions: &[pb::PointingProduction]) -> Option<&str> {
    productions
        .iter()
        .find(|p| !p.production_id.is_empty())
        .map(|p| p.production_id.as_str())
        .or_else(|| {
            productions
                .iter()
                .find(|p| p.violations.is_empty() && !p.existing_production_id.is_empty())
                .map(|p| p.existing_production_id.as_str())
        })
}

/// Every pointing's outcome as the request keeps it (a JSON array).
fn productions(productions: &[pb::PointingProduction]) -> Result<serde_json::Value> {
    let outcomes: Vec<PointingOutcome> = productions
        .iter()
        .map(|p| PointingOutcome {
            pointing: p.pointing.clone(),
            zenith_deg: p.zenith_deg,
            azimuth_deg: p.azimuth_deg,
            production_id: p.production_id.clone(),
            fingerprint: p.fingerprint.clone(),
            existing_production_id: p.existing_production_id.clone(),
            violations: p.violations.iter().cloned().map(Into::into).collect(),
        })
        .collect();
    Ok(serde_json::to_value(outcomes).map_err(anyhow::Error::from)?)
}

impl BatchHandler for IntakeConsumer {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
