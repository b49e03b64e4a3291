//! The checker's AMQP consumer: decides each `request.received` and
//! announces `request.accepted`, `request.reused` or `request.rejected`.

use std::collections::{BTreeSet, HashMap};
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
use prodsys_core::Pointing;
use prodsys_core::container::ResolvedTemplate;

use crate::domain::{
    self, Candidate, CatalogAnswer, Expanded, Lookups, PointingVerdict, Prepared, Rules, Verdict,
};
use crate::error::Result;
use crate::store::{self, NewProduction, NewProductions};
use crate::visibility;

pub struct Checker {
    pub db: Db,
    pub rules: Arc<Rules>,
    pub catalog: Catalog,
    /// Tokens on: a verdict names only productions of the request's VO
    /// (see [`crate::visibility`]).
    pub isolate_vos: bool,
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

/// One production a request of a batch may become (the request itself, or
/// one pointing of the observation period it names) on its way to a
/// decision: what it asks, the checks that need nothing stored, and what the
/// catalog holds of its simulation.
struct Pending<'r, 'p> {
    /// The request's position in the batch.
    index: usize,
    request: &'r pb::RequestReceived,
    candidate: Candidate<'r>,
    pointing: Option<Pointing>,
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
        // A request that names an observation period becomes one candidate
        // per pointing; any other is one candidate, itself.
        let expanded: Vec<Expanded> = requests
            .iter()
            .map(|(_, r)| self.rules.expand(&candidate(r)))
            .collect();
        // The checks that need nothing stored and the catalog's answers come
        // before the transaction: the decisions hold the checker's lock for
        // database work only. (A request delivered again is checked in vain.)
        let names = domain::template_names(
            expanded
                .iter()
                .flat_map(|e| e.shares.iter().map(|s| s.parameters_json.as_str())),
        );
        let recorded = store::recorded_templates(&self.db, &names).await?;
        let mut shares = Vec::new();
        for (index, ((_, request), expanded)) in requests.iter().zip(&expanded).enumerate() {
            let pointings: Vec<Option<Pointing>> = match expanded.shares.is_empty() {
                true => vec![None],
                false => expanded.shares.iter().map(|s| s.pointing).collect(),
            };
            let prepared = self
                .rules
                .prepare_shares(&candidate(request), expanded, &recorded);
            for ((candidate, prepared), pointing) in prepared.into_iter().zip(pointings) {
                shares.push((index, request, candidate, pointing, prepared));
            }
        }
        let (meta, prepared): (Vec<_>, Vec<Prepared<'_>>) = shares
            .into_iter()
            .map(|(index, request, candidate, pointing, p)| {
                ((index, request, candidate, pointing), p)
            })
            .unzip();
        let catalog = self.catalog.ask(&prepared).await?;
        let pending: Vec<Pending<'_, '_>> = meta
            .into_iter()
            .zip(prepared)
            .zip(catalog)
            .map(
                |(((index, request, candidate, pointing), prepared), catalog)| Pending {
                    index,
                    request,
                    candidate,
                    pointing,
                    prepared,
                    catalog,
                },
            )
            .collect();
        // Decisions see each other's productions: one checker at a time
        // decides for a prefix, so identical requests racing through replicas
        // cannot both pass. A production's neighbourhood (its fingerprints)
        // never leaves its profile, nor its ID its prefix's sequence, so
        // replicas deciding for other prefixes need not wait. The locks are
        // taken in one order, so two batches cannot each hold what the other wants.
        let mut keys: Vec<i64> = pending
            .iter()
            .filter_map(|p| p.prepared.checked.as_ref())
            .map(|(profile, _, _)| domain::decide_lock_key(profile.id_prefix()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        store::lock_prefixes(&tx, &keys).await?;
        let ids: Vec<Uuid> = requests.iter().map(|(id, _)| *id).collect();
        let fresh = prodsys_db::claim(&tx, &ids).await?;
        // A request delivered twice in one batch is decided once: at its
        // first position (all its pointings).
        let mut first: HashMap<Uuid, usize> = HashMap::new();
        for (index, id) in ids.iter().enumerate() {
            first.entry(*id).or_insert(index);
        }
        let pending: Vec<Pending<'_, '_>> = pending
            .into_iter()
            .filter(|p| {
                let id = ids[p.index];
                fresh.contains(&id) && first[&id] == p.index
            })
            .collect();
        let events = self.decide(&tx, pending, &expanded).await?;
        prodsys_db::enqueue(&tx, &self.db, &events).await?;
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
        expanded: &[Expanded],
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
        let shares: Vec<(usize, &pb::RequestReceived, Option<Pointing>)> = pending
            .iter()
            .map(|p| (p.index, p.request, p.pointing))
            .collect();
        let share_ids: Vec<&str> = pending.iter().map(|p| p.candidate.request_id).collect();
        let lookups = Lookups::of(pending.iter().map(|p| &p.prepared));
        let mut known = store::neighbourhood(tx, &lookups).await?;
        // Verdicts first (IDs need the count per prefix), then one write for all.
        let evaluations = self.rules.evaluate_batch(
            pending
                .into_iter()
                .map(|p| (p.candidate, p.prepared, p.catalog))
                .collect(),
            &mut known,
        );
        // An ID is the profile's prefix and a number: one sequence per prefix.
        let mut next = store::take_numbers(tx, domain::numbers_wanted(&evaluations)).await?;
        let mut verdicts = domain::verdicts(&share_ids, evaluations, &mut next);
        if self.isolate_vos {
            verdicts = self.hide_other_vos(tx, &shares, verdicts).await?;
        }
        let mut rows = NewProductions::default();
        let mut derived = Vec::new();
        let mut events = Vec::with_capacity(shares.len());
        // The shares of one request are next to each other.
        let mut verdicts = shares.into_iter().zip(verdicts).peekable();
        while let Some(((index, request, pointing), verdict)) = verdicts.next() {
            let mut group = vec![(pointing, verdict)];
            while let Some(((i, _, p), _)) = verdicts.peek()
                && *i == index
            {
                let p = *p;
                let (_, v) = verdicts.next().expect("peeked");
                group.push((p, v));
            }
            let expanded = &expanded[index];
            // Without a period, or refused by it before any pointing: one verdict.
            if !expanded.has_period() || expanded.shares.is_empty() {
                let (_, verdict) = group.pop().expect("one share");
                let grouping = Grouping {
                    period: expanded.period.clone(),
                    ..Grouping::default()
                };
                self.announce(
                    request,
                    verdict,
                    &grouping,
                    &mut rows,
                    &mut derived,
                    &mut events,
                )?;
                continue;
            }
            self.announce_period(
                request,
                &expanded.period,
                group,
                &mut rows,
                &mut derived,
                &mut events,
            )?;
        }
        rows.insert(tx).await?;
        store::record_derivations(tx, &derived).await?;
        Ok(events)
    }

    /// The verdicts as the requests' VOs may read them: productions of other
    /// VOs (those of this batch included) not named.
    async fn hide_other_vos<'p>(
        &self,
        tx: &Transaction<'_>,
        shares: &[(usize, &pb::RequestReceived, Option<Pointing>)],
        verdicts: Vec<Verdict<'p>>,
    ) -> Result<Vec<Verdict<'p>>> {
        let prefixes = self.rules.id_prefixes();
        let mut vos: HashMap<String, String> = HashMap::new();
        let mut named = Vec::with_capacity(verdicts.len());
        for ((_, request, _), verdict) in shares.iter().zip(&verdicts) {
            if let Verdict::Accepted { production_id, .. } = verdict {
                vos.insert(production_id.clone(), request.vo.clone());
            }
            named.push(visibility::named(verdict.validation(), &prefixes));
        }
        let unknown: Vec<String> = named
            .iter()
            .flatten()
            .filter(|id| !vos.contains_key(*id))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        vos.extend(store::production_vos(tx, &unknown).await?);
        Ok(shares
            .iter()
            .zip(verdicts)
            .zip(named)
            .map(|(((_, request, _), verdict), named)| {
                let hidden = visibility::hidden_from(&request.vo, &named, &vos);
                visibility::hide_verdict(verdict, &hidden)
            })
            .collect())
    }

    /// The events of a request that named an observation period: one
    /// `request.accepted` per new production (one per pointing), one
    /// `request.reused` per pointing answered with an existing production,
    /// each listing every pointing's outcome; or, when no pointing became
    /// or found a production, one `request.rejected` listing why not.
    fn announce_period<'p>(
        &self,
        request: &pb::RequestReceived,
        period: &str,
        group: Vec<(Option<Pointing>, Verdict<'p>)>,
        rows: &mut NewProductions,
        derived: &mut Vec<(ResolvedTemplate, String, String)>,
        events: &mut Vec<OutboxEvent>,
    ) -> Result<()> {
        let productions: Vec<pb::PointingProduction> = group
            .iter()
            .map(|(pointing, verdict)| pointing_production(PointingVerdict::of(*pointing, verdict)))
            .collect();
        let produced = group
            .iter()
            .any(|(_, v)| !matches!(v, Verdict::Rejected { .. }));
        if !produced {
            let validations = group
                .into_iter()
                .map(|(pointing, verdict)| match verdict {
                    Verdict::Rejected { validation } | Verdict::Reused { validation } => {
                        (pointing, validation)
                    }
                    Verdict::Accepted { validation, .. } => (pointing, validation),
                })
                .collect();
            let whole = domain::combine(period, validations);
            tracing::info!(request_id = %request.request_id, %period, violations = whole.violations.len(),
                "request of an observation period rejected");
            let event = pb::RequestRejected {
                request_id: request.request_id.clone(),
                violations: whole.violations.into_iter().map(Into::into).collect(),
                existing_production_id: whole.existing_production_id,
                correlation_id: request.correlation_id.clone(),
                period: period.to_string(),
                productions,
            };
            events.push(outbox_event(REQUEST_REJECTED, &request.request_id, &event));
            return Ok(());
        }
        for (pointing, verdict) in group {
            if let Verdict::Rejected { validation } = &verdict {
                tracing::info!(request_id = %request.request_id, %period, pointing = %domain::pointing_label(pointing.as_ref()),
                    existing = %validation.existing_production_id, "pointing not produced");
                continue;
            }
            let grouping = Grouping {
                period: period.to_string(),
                pointing: domain::pointing_label(pointing.as_ref()),
                productions: productions.clone(),
            };
            self.announce(request, verdict, &grouping, rows, derived, events)?;
        }
        Ok(())
    }

    /// The event announcing one verdict (and, accepted, the production's row).
    fn announce<'p>(
        &self,
        request: &pb::RequestReceived,
        verdict: Verdict<'p>,
        grouping: &Grouping,
        rows: &mut NewProductions,
        derived: &mut Vec<(ResolvedTemplate, String, String)>,
        events: &mut Vec<OutboxEvent>,
    ) -> Result<()> {
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
                    period: grouping.period.clone(),
                    pointing: grouping.pointing.clone(),
                    productions: grouping.productions.clone(),
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
                    period: grouping.period.clone(),
                    productions: grouping.productions.clone(),
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
                    extends = validation.overlaps.len(), period = %grouping.period,
                    pointing = %grouping.pointing, "request accepted");
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
                    period: grouping.period.clone(),
                    pointing: grouping.pointing.clone(),
                    productions: grouping.productions.clone(),
                };
                events.push(outbox_event(REQUEST_ACCEPTED, &production_id, &event));
            }
        }
        Ok(())
    }
}

/// Where a production stands in its request: the observation period and
/// pointing it simulates, and every pointing's outcome (empty without a period).
#[derive(Default)]
struct Grouping {
    period: String,
    pointing: String,
    productions: Vec<pb::PointingProduction>,
}

fn pointing_production(v: PointingVerdict) -> pb::PointingProduction {
    let pointing = v.pointing.unwrap_or(Pointing {
        zenith_deg: 0.0,
        azimuth_deg: 0.0,
    });
    pb::PointingProduction {
        pointing: domain::pointing_label(v.pointing.as_ref()),
        zenith_deg: pointing.zenith_deg,
        azimuth_deg: pointing.azimuth_deg,
        production_id: v.production_id,
        fingerprint: v.fingerprint,
        existing_production_id: v.existing_production_id,
        violations: v.violations.into_iter().map(Into::into).collect(),
    }
}

impl BatchHandler for Checker {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        self.handle_batch(batch)
            .await
            .map_err(|e| HandlerError::from(e).into())
    }
}
