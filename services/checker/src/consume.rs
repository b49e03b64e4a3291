//! The checker's AMQP consumer: decides each `request.received` and
//! announces `request.accepted`, `request.reused` or `request.rejected`.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Context;
use prodsys_core::events::{REQUEST_ACCEPTED, REQUEST_REJECTED, REQUEST_REUSED};
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, OutboxEvent};
use prodsys_messaging::{BatchHandler, HandlerError, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{decode_event, outbox_event};
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::domain::{self, Candidate, CatalogAnswer, Lookups, Prepared, Rules, Verdict};
use crate::error::Result;
use crate::store::{self, NewProduction, NewProductions};

pub struct Checker {
    pub db: Db,
    pub rules: Arc<Rules>,
    pub catalog: Catalog,
}

/// What a request event asks the checker to decide.
fn candidate(r: &pb::RequestReceived) -> Candidate<'_> {
    Candidate {
        request_id: &r.request_id,
        profile: &r.profile,
        backend: &r.backend,
        vo: &r.vo,
        parameters_json: &r.parameters_json,
        extend: r.extend,
        reuse_existing: r.reuse_existing,
        forward: &r.forward,
        forward_replace: r.forward_replace,
    }
}

/// A request of a batch on its way to a decision: what it asks, the checks
/// that need nothing stored, and what the catalog holds of its simulation.
struct Pending<'r, 'p> {
    request: &'r pb::RequestReceived,
    prepared: Prepared<'p>,
    catalog: Option<CatalogAnswer>,
}

impl Checker {
    async fn handle_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut requests = Vec::new();
        for incoming in batch {
            match decode_event::<pb::RequestReceived>(incoming) {
                Ok(decoded) => {
                    requests.push(decoded);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        // The checks that need nothing stored and the catalog's answers come
        // before the transaction: the decisions hold the checker's lock for
        // database work only. (A request delivered again is checked in vain.)
        let names =
            domain::template_names(requests.iter().map(|(_, r)| r.parameters_json.as_str()));
        let recorded = store::recorded_templates(&self.db, &names).await?;
        let prepared: Vec<Prepared<'_>> = requests
            .iter()
            .map(|(_, r)| self.rules.prepare(&candidate(r), &recorded))
            .collect();
        let catalog = self.catalog.ask(&prepared).await?;
        let pending: Vec<(Uuid, Pending<'_, '_>)> = requests
            .iter()
            .zip(prepared)
            .zip(catalog)
            .map(|(((id, request), prepared), catalog)| {
                let pending = Pending {
                    request,
                    prepared,
                    catalog,
                };
                (*id, pending)
            })
            .collect();
        // Decisions see each other's productions: one checker at a time
        // decides for a prefix, so identical requests racing through replicas
        // cannot both pass. A production's neighbourhood (its fingerprints)
        // never leaves its profile, nor its ID its prefix's sequence, so
        // replicas deciding for other prefixes need not wait. The locks are
        // taken in one order, so two batches cannot each hold what the other wants.
        let mut keys: Vec<i64> = pending
            .iter()
            .filter_map(|(_, p)| p.prepared.checked.as_ref())
            .map(|(profile, _, _)| domain::decide_lock_key(profile.id_prefix()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        store::lock_prefixes(&tx, &keys).await?;
        let ids: Vec<Uuid> = requests.iter().map(|(id, _)| *id).collect();
        let fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut seen = HashSet::new();
        // A request delivered twice in one batch is decided once.
        let pending: Vec<Pending<'_, '_>> = pending
            .into_iter()
            .filter(|(id, _)| fresh.contains(id) && seen.insert(*id))
            .map(|(_, p)| p)
            .collect();
        let events = self.decide(&tx, pending).await?;
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Decides a batch of requests inside `tx`, in order, each seeing the
    /// decisions before it; returns the events announcing the verdicts. The
    /// database work is a fixed number of statements however large the batch:
    /// one read of the neighbourhood, one sequence update, one insert.
    async fn decide(
        &self,
        tx: &Transaction<'_>,
        mut pending: Vec<Pending<'_, '_>>,
    ) -> Result<Vec<OutboxEvent>> {
        // A derivation's name, checked before the lock, may have been given away since.
        let derivations =
            domain::derivations(&pending.iter().map(|p| &p.prepared).collect::<Vec<_>>());
        let names: Vec<&str> = derivations
            .iter()
            .flatten()
            .map(|t| t.name.as_str())
            .collect();
        let taken = store::taken_template_names(tx, &names).await?;
        domain::refuse_taken_names(
            &mut pending
                .iter_mut()
                .map(|p| &mut p.prepared)
                .collect::<Vec<_>>(),
            taken,
        );
        let requests: Vec<&pb::RequestReceived> = pending.iter().map(|p| p.request).collect();
        let lookups = Lookups::of(pending.iter().map(|p| &p.prepared));
        let mut known = store::neighbourhood(tx, &lookups).await?;
        // Verdicts first (IDs need the count per prefix), then one write for all.
        let evaluations = self.rules.evaluate_batch(
            pending
                .into_iter()
                .map(|p| (candidate(p.request), p.prepared, p.catalog))
                .collect(),
            &mut known,
        );
        // An ID is the profile's prefix and a number: one sequence per prefix.
        let mut next = store::take_numbers(tx, domain::numbers_wanted(&evaluations)).await?;
        let request_ids: Vec<&str> = requests.iter().map(|r| r.request_id.as_str()).collect();
        let verdicts = domain::verdicts(&request_ids, evaluations, &mut next);
        let mut rows = NewProductions::default();
        let mut derived = Vec::new();
        let mut events = Vec::with_capacity(requests.len());
        for (request, verdict) in requests.iter().zip(verdicts) {
            match verdict {
                Verdict::Reused { validation } => {
                    let existing = validation.existing_production_id;
                    tracing::info!(request_id = %request.request_id, %existing, "request answered with the existing production");
                    let event = pb::RequestAccepted {
                        request_id: request.request_id.clone(),
                        production_id: existing.clone(),
                        profile: request.profile.clone(),
                        vo: request.vo.clone(),
                        fingerprint: validation.fingerprint,
                        parameters_json: request.parameters_json.clone(),
                        backend: request.backend.clone(),
                        run_number_offset: 0,
                        correlation_id: request.correlation_id.clone(),
                        priority: request.priority,
                        forward: Vec::new(),
                        submitter: request.submitter.clone(),
                        profile_sha256: String::new(),
                    };
                    events.push(outbox_event(REQUEST_REUSED, &existing, &event));
                }
                Verdict::Rejected { validation } => {
                    tracing::info!(request_id = %request.request_id, violations = validation.violations.len(),
                        existing = %validation.existing_production_id, "request rejected");
                    let event = pb::RequestRejected {
                        request_id: request.request_id.clone(),
                        violations: validation.violations.into_iter().map(Into::into).collect(),
                        existing_production_id: validation.existing_production_id,
                        correlation_id: request.correlation_id.clone(),
                    };
                    events.push(outbox_event(REQUEST_REJECTED, &request.request_id, &event));
                }
                Verdict::Accepted {
                    production_id,
                    validation,
                    accepted,
                } => {
                    let request_id =
                        Uuid::parse_str(&request.request_id).context("request_id is not a UUID")?;
                    tracing::info!(request_id = %request.request_id, %production_id,
                        extends = validation.overlaps.len(), "request accepted");
                    let parameters_json = accepted.parameters.to_string();
                    let run_number_offset = accepted.run_number_offset as u64;
                    // Checked in `prepare`: an unknown destination refused the request.
                    let forward = accepted
                        .profile
                        .destinations(
                            &accepted.parameters,
                            &request.forward,
                            request.forward_replace,
                            &self.rules.destinations,
                        )
                        .unwrap_or_default();
                    let profile_sha256 = accepted.profile.content_sha256().to_string();
                    if let Some(template) = domain::derived_template(&accepted.parameters) {
                        derived.push((template, request.profile.clone(), production_id.clone()));
                    }
                    rows.push(
                        NewProduction {
                            production_id: &production_id,
                            fingerprint: &validation.fingerprint,
                            request_id,
                            profile: &request.profile,
                            vo: &request.vo,
                            backend: &request.backend,
                        },
                        accepted,
                    );
                    let event = pb::RequestAccepted {
                        request_id: request.request_id.clone(),
                        production_id: production_id.clone(),
                        profile: request.profile.clone(),
                        vo: request.vo.clone(),
                        fingerprint: validation.fingerprint,
                        parameters_json,
                        backend: request.backend.clone(),
                        run_number_offset,
                        correlation_id: request.correlation_id.clone(),
                        priority: request.priority,
                        forward,
                        submitter: request.submitter.clone(),
                        profile_sha256,
                    };
                    events.push(outbox_event(REQUEST_ACCEPTED, &production_id, &event));
                }
            }
        }
        rows.insert(tx).await?;
        store::record_derivations(tx, &derived).await?;
        Ok(events)
    }
}

impl BatchHandler for Checker {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
