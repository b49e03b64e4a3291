//! Forwarding: copies each registered file to every destination its
//! production asked for, driven from the catalog's tables so any number of
//! catalog processes share the work and a killed one loses nothing.
//!
//! A process claims due replicas (`FOR UPDATE SKIP LOCKED`, a claim renewed
//! while it copies), copies a bounded number at once, and records each
//! result only while the claim is still its own: `verified` only once the
//! destination answered the catalogued adler32, `failed` with the reason and
//! a backoff before the next try otherwise. A claim that runs out (its
//! process died) is taken over; a retried copy first asks the destination
//! whether the file is already there and correct. A file catalogued at its
//! place on a destination (a remote job wrote it there) is only verified
//! there. A sweep announces the
//! progress of every production whose replicas changed
//! (`forwarding.progress`) and, once its record exists (and, where records
//! are written, is catalogued) and every file is verified everywhere,
//! `production.forwarded` — once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prodsys_config::{DestinationSettings, ForwardingSettings};
use prodsys_core::events::{FORWARDING_PROGRESS, PRODUCTION_FORWARDED};
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_server::outbox_event;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::destination::{CopyError, Destination, Transfer};
use crate::domain;
use crate::rucio::{RegisterError, Registrar};
use crate::store::{self, Claimed, CopyResult};

/// Productions announced per sweep transaction.
const SWEEP_BATCH: i64 = 100;

/// The forwarding work of one catalog process.
pub struct Forwarder {
    db: Db,
    destinations: HashMap<String, Destination>,
    /// The `rucio` destinations: each copies to one of `destinations` and
    /// registers what landed there.
    registrars: HashMap<String, Arc<Registrar>>,
    settings: ForwardingSettings,
    /// This process's name on its claims.
    claimer: Uuid,
    /// Whether production records are written (and catalogued): a
    /// production is then finished only once its record is catalogued.
    records: bool,
}

impl Forwarder {
    /// With no destination configured it copies nothing, but still
    /// announces each production whose outputs are all catalogued.
    pub fn new(db: Db, settings: &ForwardingSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(settings.copy_timeout_s.max(1));
        let destinations: HashMap<String, Destination> = settings
            .destinations
            .iter()
            .filter(|(_, d)| !matches!(d, DestinationSettings::Rucio(_)))
            .map(|(name, d)| Ok((name.clone(), Destination::from_settings(name, d, timeout)?)))
            .collect::<anyhow::Result<_>>()?;
        let registrars = settings
            .destinations
            .iter()
            .filter_map(|(name, d)| match d {
                DestinationSettings::Rucio(rucio) => Some((name, rucio)),
                _ => None,
            })
            .map(|(name, rucio)| {
                Ok((
                    name.clone(),
                    Registrar::new(
                        name,
                        rucio,
                        &destinations,
                        db.clone(),
                        settings.max_concurrent_copies,
                    )?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            db,
            destinations,
            registrars,
            settings: settings.clone(),
            claimer: Uuid::now_v7(),
            records: false,
        })
    }

    /// A production is finished only once its record is catalogued too
    /// (when this deployment writes records).
    pub fn awaiting_records(mut self, records: bool) -> Self {
        self.records = records;
        self
    }

    /// Copies, records and announces until `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        tokio::spawn(this.clone().sweep(shutdown.clone()));
        if !this.destinations.is_empty() || !this.registrars.is_empty() {
            tokio::spawn(this.clone().renew(shutdown.clone()));
            tokio::spawn(this.copy(shutdown));
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.settings.claim_ttl_ms.max(1000))
    }

    /// Claims due replicas as copy slots free up, copies them, and hands the
    /// results to the recorder.
    async fn copy(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.max_concurrent_copies.max(1)));
        let (results, received) = mpsc::unbounded_channel();
        let recorder = tokio::spawn(self.clone().record(received));
        let mut wake = None;
        let mut backoff = prodsys_messaging::Backoff::new(
            Duration::from_millis(200),
            Duration::from_millis(self.settings.retry_max_ms.max(200)),
        );
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if wake.is_none() {
                match self.db.listen(&store::forward_channel(&self.db)).await {
                    Ok(listener) => wake = Some(listener),
                    Err(error) => tracing::warn!(%error, "forwarding: LISTEN failed; polling"),
                }
            }
            // At least one free slot before claiming anything.
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = shutdown.cancelled() => break,
            };
            // Replicas copied one by one are claimed for every free slot at
            // once; batches one slot's at a time, so the first copy starts
            // after a small claim and the next claims are made while copies
            // run.
            let limit = match self.per_slot() {
                1 => slots.available_permits() + 1,
                per_slot => per_slot,
            } as i64;
            let began = std::time::Instant::now();
            let claimed =
                match store::claim_replicas(&self.db, self.claimer, limit, self.ttl()).await {
                    Ok(claimed) => {
                        backoff.reset();
                        if !claimed.is_empty() {
                            tracing::debug!(
                                claimed = claimed.len(),
                                elapsed_ms = began.elapsed().as_millis() as u64,
                                "forwarding: claimed"
                            );
                        }
                        claimed
                    }
                    Err(error) => {
                        drop(first);
                        let wait = backoff.next_wait();
                        tracing::warn!(%error, ?wait, "forwarding: claiming replicas failed");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => break,
                        }
                        continue;
                    }
                };
            if claimed.is_empty() {
                drop(first);
                // Woken by new replicas, or soon for retries coming due.
                let idle = Duration::from_millis(500);
                match wake.as_mut() {
                    Some(listener) => {
                        let lost = tokio::select! {
                            got = listener.notifications.recv() => {
                                while listener.notifications.try_recv().is_ok() {}
                                got.is_none()
                            }
                            _ = tokio::time::sleep(idle) => false,
                            _ = shutdown.cancelled() => break,
                        };
                        if lost {
                            wake = None;
                        }
                    }
                    None => tokio::select! {
                        _ = tokio::time::sleep(idle) => {}
                        _ = shutdown.cancelled() => break,
                    },
                }
                continue;
            }
            let mut first = Some(first);
            for group in self.groups(claimed) {
                // A slot per group: the first is held, the others free or
                // freed soon (copies of another destination than the
                // batches took more slots than the round counted on).
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => slots.clone().acquire_owned().await.expect("never closed"),
                    },
                };
                let this = self.clone();
                let results = results.clone();
                tokio::spawn(async move {
                    let copied = this.copy_group(&group).await;
                    for (claim, result) in group.into_iter().zip(copied) {
                        let _ = results.send((claim, result));
                    }
                    drop(permit);
                });
            }
        }
        drop(results);
        // Copies under way finish and are recorded (within the grace period);
        // what is cut off is taken over once its claim runs out.
        let _ = recorder.await;
    }

    /// Replicas one copy slot takes at once: `claim_batch` where copies go
    /// in batches (an `xroot` destination, whose client commands each cost
    /// a process and a login) or registrations gather into bulk calls (a
    /// `rucio` destination), else one.
    fn per_slot(&self) -> usize {
        let batches = !self.registrars.is_empty()
            || self
                .destinations
                .values()
                .any(Destination::copies_in_batches);
        if batches {
            self.settings.claim_batch.max(1)
        } else {
            1
        }
    }

    /// A round's claims as the slots take them: up to [`Forwarder::per_slot`]
    /// replicas of one destination together where that destination batches
    /// (in LFN order, so the files of one directory go in one copy), every
    /// other replica alone.
    fn groups(&self, claimed: Vec<Claimed>) -> Vec<Vec<Claimed>> {
        let mut groups = Vec::new();
        let mut batched: HashMap<String, Vec<Claimed>> = HashMap::new();
        for claim in claimed {
            let batches = self.registrars.contains_key(&claim.destination)
                || self.destinations.get(&claim.destination).is_some_and(|d| {
                    d.copies_in_batches() && d.url_of(&claim.lfn) != claim.source_url
                });
            if batches {
                batched
                    .entry(claim.destination.clone())
                    .or_default()
                    .push(claim);
            } else {
                groups.push(vec![claim]);
            }
        }
        let per_slot = self.per_slot();
        for (_, mut claims) in batched {
            claims.sort_by(|a, b| a.lfn.cmp(&b.lfn));
            let mut claims = claims.into_iter().peekable();
            while claims.peek().is_some() {
                groups.push(claims.by_ref().take(per_slot).collect());
            }
        }
        groups
    }

    /// The copies of one slot, a result each in order: a batch to an
    /// `xroot` destination in one go, registrations side by side (they meet
    /// in the registrar's bulk calls), anything else alone.
    async fn copy_group(self: &Arc<Self>, group: &[Claimed]) -> Vec<CopyResult> {
        if let [claim] = group {
            return vec![self.copy_one(claim).await];
        }
        let Some(first) = group.first() else {
            return Vec::new();
        };
        if let Some(destination) = self.destinations.get(&first.destination) {
            let transfers: Vec<Transfer> = group
                .iter()
                .map(|c| Transfer {
                    source_url: &c.source_url,
                    lfn: &c.lfn,
                    adler32: &c.adler32,
                    retried: c.attempts > 0,
                })
                .collect();
            let copied = destination.put_many(&transfers).await;
            return group
                .iter()
                .zip(copied)
                .map(|(claim, copied)| self.copied(claim, destination, copied))
                .collect();
        }
        let mut each = tokio::task::JoinSet::new();
        for (i, claim) in group.iter().enumerate() {
            let (this, claim) = (self.clone(), claim.clone());
            each.spawn(async move { (i, this.copy_one(&claim).await) });
        }
        let mut results: Vec<Option<CopyResult>> = group.iter().map(|_| None).collect();
        while let Some(joined) = each.join_next().await {
            match joined {
                Ok((i, result)) => results[i] = Some(result),
                Err(error) => tracing::warn!(%error, "forwarding: a copy task failed"),
            }
        }
        group
            .iter()
            .zip(results)
            .map(|(claim, result)| {
                result.unwrap_or_else(|| self.failed(claim, "the copy task failed".into()))
            })
            .collect()
    }

    /// The result of a copy to `destination` made by [`Destination::put`].
    fn copied(
        &self,
        claim: &Claimed,
        destination: &Destination,
        copied: Result<(), CopyError>,
    ) -> CopyResult {
        match copied {
            Ok(()) => {
                tracing::debug!(lfn = %claim.lfn, destination = %claim.destination, "copy verified");
                CopyResult::Verified {
                    url: destination.url_of(&claim.lfn),
                }
            }
            Err(e) => {
                let level_reason = e.to_string();
                match e {
                    CopyError::Mismatch { .. } => {
                        tracing::warn!(lfn = %claim.lfn, destination = %claim.destination,
                            reason = %level_reason, "copy did not verify; copying again")
                    }
                    _ => {
                        tracing::info!(lfn = %claim.lfn, destination = %claim.destination,
                            reason = %level_reason, "copy failed")
                    }
                }
                self.failed(claim, level_reason)
            }
        }
    }

    /// One copy: already there and correct (a resumed or retried copy), or
    /// copied and verified, or failed with the reason.
    async fn copy_one(&self, claim: &Claimed) -> CopyResult {
        if let Some(registrar) = self.registrars.get(&claim.destination) {
            return match registrar.forward(claim).await {
                Ok(url) => CopyResult::Registered { url },
                Err(RegisterError::Waiting(reason)) => CopyResult::Waiting {
                    reason,
                    retry_in: Duration::from_millis(self.settings.retry_min_ms.max(100)),
                },
                Err(RegisterError::Failed(reason)) => {
                    tracing::info!(lfn = %claim.lfn, destination = %claim.destination,
                        %reason, "registration failed");
                    self.failed(claim, reason)
                }
            };
        }
        let Some(destination) = self.destinations.get(&claim.destination) else {
            return self.failed(
                claim,
                format!(
                    "destination {:?} is not configured in this catalog",
                    claim.destination
                ),
            );
        };
        let url = destination.url_of(&claim.lfn);
        if claim.source_url == url {
            // A remote job wrote the file here itself (the dispatcher checked
            // it against the job's manifest): this copy is the source, so it
            // is only verified, never copied onto itself.
            return match destination.checksum(&claim.lfn).await {
                Ok(Some(sum)) if sum == claim.adler32 => CopyResult::Verified { url },
                Ok(found) => self.failed(
                    claim,
                    format!(
                        "the file is catalogued at its place on this destination, where its adler32 is {} and the catalog's {}",
                        found.as_deref().unwrap_or("missing"),
                        claim.adler32
                    ),
                ),
                Err(e) => self.failed(claim, e.to_string()),
            };
        }
        if claim.attempts > 0 {
            match destination.checksum(&claim.lfn).await {
                Ok(Some(sum)) if sum == claim.adler32 => return CopyResult::Verified { url },
                Ok(_) => {}
                Err(e) => return self.failed(claim, e.to_string()),
            }
        }
        let copied = destination
            .put(&claim.source_url, &claim.lfn, &claim.adler32)
            .await;
        self.copied(claim, destination, copied)
    }

    fn failed(&self, claim: &Claimed, reason: String) -> CopyResult {
        CopyResult::Failed {
            reason,
            // The jitter is drawn here, so the decision stays a pure function.
            retry_in: domain::retry_wait_jittered(
                claim.attempts + 1,
                Duration::from_millis(self.settings.retry_min_ms),
                Duration::from_millis(self.settings.retry_max_ms),
                prodsys_messaging::backoff::unit_random(),
            ),
        }
    }

    /// Writes results in batches (one transaction for what has arrived).
    async fn record(self: Arc<Self>, mut received: mpsc::UnboundedReceiver<(Claimed, CopyResult)>) {
        let mut backoff =
            prodsys_messaging::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while let Some(first) = received.recv().await {
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match received.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            loop {
                let began = std::time::Instant::now();
                match store::record_copies(&self.db, self.claimer, &batch).await {
                    Ok(recorded) => {
                        backoff.reset();
                        tracing::debug!(
                            recorded,
                            elapsed_ms = began.elapsed().as_millis() as u64,
                            "forwarding: results recorded"
                        );
                        if (recorded as usize) < batch.len() {
                            tracing::info!(
                                lost = batch.len() - recorded as usize,
                                "copies whose claims another process took over were not recorded"
                            );
                        }
                        break;
                    }
                    Err(error) => {
                        // The database is away: keep the results and try
                        // again (the claims are renewed meanwhile).
                        let wait = backoff.next_wait();
                        tracing::warn!(%error, ?wait, "forwarding: recording copies failed");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }

    /// Renews this process's claims every third of their time to live.
    async fn renew(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.ttl() / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(error) = store::renew_claims(&self.db, self.claimer, self.ttl()).await {
                tracing::warn!(%error, "forwarding: renewing claims failed");
            }
        }
    }

    /// Announces changed progress, and the end of forwarding, every
    /// quarter second while there is something to announce.
    async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                match self.sweep_once().await {
                    Ok(n) if n as i64 == SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "forwarding: announcing progress failed");
                        break;
                    }
                }
            }
        }
    }

    async fn sweep_once(&self) -> anyhow::Result<usize> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let swept = store::sweep_forwarding(&tx, SWEEP_BATCH, self.records).await?;
        let at_unix_ms = chrono::Utc::now().timestamp_millis();
        let mut events = Vec::with_capacity(swept.len());
        for p in &swept {
            // A production without destinations has nothing to report on
            // the way: only, at the end, that its outputs are all catalogued.
            if !p.destinations.is_empty() {
                events.push(outbox_event(
                    FORWARDING_PROGRESS,
                    &p.production_id,
                    &pb::ForwardingProgress {
                        production_id: p.production_id.clone(),
                        destinations: p.destinations.clone(),
                        at_unix_ms,
                    },
                ));
            }
            if p.finished {
                if p.destinations.is_empty() {
                    tracing::info!(production_id = %p.production_id, "every output catalogued");
                } else {
                    tracing::info!(production_id = %p.production_id, "outputs forwarded to every destination");
                }
                events.push(outbox_event(
                    PRODUCTION_FORWARDED,
                    &p.production_id,
                    &pb::ProductionForwarded {
                        production_id: p.production_id.clone(),
                        destinations: p.destinations.clone(),
                    },
                ));
            }
        }
        prodsys_db::enqueue(&tx, &self.db, &events).await?;
        tx.commit().await?;
        Ok(swept.len())
    }
}
