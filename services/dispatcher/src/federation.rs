//! A scheduler's part in federated placement: in its submission
//! transaction, under the placement lock, it places the ready jobs of every
//! production naming a group (or `any`) that includes its installation over
//! the group's available installations ([`placement::place`]) and takes its
//! own portion; the other installations take theirs in their own rounds. A
//! job is thus bound to an installation only when it is reserved there, so
//! an installation that fails or is no longer scheduled is simply given
//! nothing more, and what waits goes elsewhere.

use std::collections::{BTreeMap, BTreeSet};

use prodsys_config::{FederationSettings, Settings};
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};

use prodsys_core::JobState;

use crate::domain::JobRow;
use crate::domain::placement::{self, Demand, Site};
use crate::scheduler::Scheduler;
use crate::store::federation as store;

/// Fewest productions whose ready jobs are counted in one statement while
/// looking for the ones placement can give a job to.
const READY_PROBES_AT_ONCE: usize = 32;

/// What placement knows of the deployment: every installation's capacity,
/// and the groups, shares and VOs.
#[derive(Debug, Clone, Default)]
pub struct Federation {
    pub settings: FederationSettings,
    /// Every installation by name, with its `max_in_flight`.
    pub capacities: BTreeMap<String, u64>,
    /// The installations that do not share the work directory: their jobs
    /// need a destination to write their outputs to.
    pub remote: BTreeSet<String>,
}

impl Federation {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            settings: settings.federation.clone(),
            capacities: settings
                .dispatcher
                .installations()
                .into_iter()
                .map(|(name, i)| (name, i.max_in_flight() as u64))
                .collect(),
            remote: settings
                .dispatcher
                .installations()
                .into_iter()
                .filter(|(_, i)| !i.shares_filesystem())
                .map(|(name, _)| name)
                .collect(),
        }
    }

    fn names(&self) -> BTreeSet<String> {
        self.capacities.keys().cloned().collect()
    }

    /// The backends (group names, `any`) that may place jobs on `installation`.
    pub fn backends_including(&self, installation: &str) -> Vec<String> {
        let mut backends: Vec<String> = self
            .settings
            .groups
            .iter()
            .filter(|(_, members)| members.iter().any(|m| m == installation))
            .map(|(name, _)| name.clone())
            .collect();
        backends.push(prodsys_config::ANY.to_string());
        backends
    }

    /// The installations a production naming a group (or `any`) for `vo`
    /// may run on; none for one naming a single installation.
    pub fn group_members(&self, backend: &str, vo: &str) -> Vec<String> {
        if self.capacities.contains_key(backend) {
            Vec::new()
        } else {
            self.members(backend, vo)
        }
    }

    /// The installations a production naming `backend` for `vo` may run on.
    pub fn members(&self, backend: &str, vo: &str) -> Vec<String> {
        self.settings
            .members(backend, vo, &self.names())
            .unwrap_or_default()
    }

    /// The members a production's jobs are placed on: without a forwarding
    /// destination (`forwards`), not the installations that do not share
    /// the work directory, while another member does (else they stay, and
    /// each attempt there is refused with the reason).
    pub fn placeable(&self, backend: &str, vo: &str, forwards: bool) -> Vec<String> {
        let members = self.members(backend, vo);
        if forwards {
            return members;
        }
        let sharing: Vec<String> = members
            .iter()
            .filter(|m| !self.remote.contains(*m))
            .cloned()
            .collect();
        if sharing.is_empty() { members } else { sharing }
    }
}

impl Scheduler {
    /// Closes the federated productions of this installation whose jobs all
    /// ended. Their last jobs may end on two installations in transactions
    /// that commit together, each seeing the other's job still running:
    /// the next round of either, seeing both, closes it (without waiting on
    /// the other's locks).
    pub(crate) async fn close_federated(&self) -> anyhow::Result<()> {
        let me = self.backend.name();
        let client = self.db.client().await?;
        let backends = self.federation.backends_including(me);
        let productions = store::federated_productions(&client, &backends, "RUNNING").await?;
        drop(client);
        for p in productions {
            if !self
                .federation
                .members(&p.backend, &p.vo)
                .iter()
                .any(|m| m == me)
            {
                continue;
            }
            let mut client = self.db.client().await?;
            let tx = client.transaction().await?;
            if let Some(event) = crate::scheduler::close_if_finished(&tx, &p.production_id).await? {
                prodsys_db::enqueue(&tx, &self.db, &[event]).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Gives up the federated jobs in flight here (the installation has
    /// failed too long): each goes back to wait as its next attempt, placed
    /// nowhere, and its attempt here is remembered, to be cancelled once
    /// the installation answers again.
    pub(crate) async fn abandon_in_flight(&self) -> anyhow::Result<()> {
        let me = self.backend.name();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        let jobs = store::federated_in_flight(&tx, me).await?;
        if jobs.is_empty() {
            return Ok(());
        }
        let mut changes = self.changes();
        let raw = format!("given up: installation {me} failing");
        for (job, backend_job_id) in &jobs {
            store::abandon(&tx, job, me, backend_job_id.as_deref(), &raw).await?;
            changes.transition(job, job.attempt, JobState::Failed, &raw);
            changes.transition(job, job.attempt + 1, JobState::Created, &raw);
            changes.unplaced();
        }
        self.commit(tx, changes).await?;
        tracing::warn!(
            installation = me,
            jobs = jobs.len(),
            "gave up in-flight jobs of a failing installation; placing them elsewhere"
        );
        Ok(())
    }

    /// Cancels the attempts given up here while the installation failed.
    pub(crate) async fn cancel_abandoned(&self) -> anyhow::Result<()> {
        let me = self.backend.name();
        let client = self.db.client().await?;
        let ids = store::abandoned(&client, me).await?;
        if ids.is_empty() {
            return Ok(());
        }
        self.backend.cancel(&ids).await?;
        store::forget_abandoned(&client, me, &ids).await?;
        tracing::info!(
            installation = me,
            attempts = ids.len(),
            "cancelled attempts given up while the installation failed"
        );
        Ok(())
    }

    /// Of `jobs` (reserved here without a backend ID while the installation
    /// fails), those of federated productions the backend says it never got
    /// go back to wait (their next attempt, placed nowhere: another
    /// installation takes them); the rest are returned. One whose fate the
    /// backend cannot tell stays reserved here, so it never runs twice.
    pub(crate) async fn release_unsubmitted(
        &self,
        jobs: Vec<JobRow>,
    ) -> anyhow::Result<Vec<JobRow>> {
        let me = self.backend.name();
        let client = self.db.client().await?;
        let federated = store::federated_of(&client, &jobs, me).await?;
        drop(client);
        let mut kept = Vec::with_capacity(jobs.len());
        let mut released = Vec::new();
        for job in jobs {
            let profile = self.profiles.get(&job.profile);
            let (Some(profile), true) = (profile, federated.contains(&job.production_id)) else {
                kept.push(job);
                continue;
            };
            // Only its tag is asked for.
            let spec =
                crate::domain::job_spec(profile, &job, &self.work_dir, &self.deployment, &[], None);
            match self.backend.find(&spec).await {
                Ok(None) => released.push(job),
                _ => kept.push(job),
            }
        }
        if released.is_empty() {
            return Ok(kept);
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        self.lease.fence(&tx).await?;
        let mut changes = self.changes();
        let raw = format!("not submitted: installation {me} is failing");
        for job in &released {
            store::release(&tx, job, &raw).await?;
            changes.transition(job, job.attempt, JobState::Failed, &raw);
            changes.transition(job, job.attempt + 1, JobState::Created, &raw);
            changes.unplaced();
        }
        self.commit(tx, changes).await?;
        tracing::info!(
            installation = me,
            jobs = released.len(),
            "released jobs to the other installations of their groups"
        );
        Ok(kept)
    }

    /// The CANCELLING productions naming a group (or `any`) that includes
    /// this installation: it kills their jobs it holds.
    pub(crate) async fn federated_cancelling<C: GenericClient + Sync>(
        &self,
        client: &C,
    ) -> anyhow::Result<Vec<String>> {
        let me = self.backend.name();
        let backends = self.federation.backends_including(me);
        Ok(
            store::federated_productions(client, &backends, "CANCELLING")
                .await?
                .into_iter()
                .filter(|p| {
                    self.federation
                        .members(&p.backend, &p.vo)
                        .iter()
                        .any(|m| m == me)
                })
                .map(|p| p.production_id)
                .collect(),
        )
    }

    /// For productions of this installation alone (`ids` theirs, in the
    /// same order): ready and in-flight counts of only those productions
    /// placement can give a job to, not of every RUNNING one (two index
    /// probes each, a round's largest cost with a thousand productions
    /// running). Every production placement gives a job to is among the
    /// first `room` with jobs ready in [`placement::turn_order`]. Those are
    /// found by counting every production's jobs in flight (one statement
    /// through their index), then the ready jobs of a few productions at a
    /// time in that order, until `room` of them have some.
    async fn ready_of_the_first(
        &self,
        tx: &Transaction<'_>,
        productions: &[(store::Candidate, Vec<String>)],
        ids: &[&str],
        room: u64,
    ) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let in_flight = store::in_flight_of(tx, ids).await?;
        let flying = |id: &str| in_flight.get(id).copied().unwrap_or(0);
        let keys: Vec<(i32, u64)> = productions
            .iter()
            .map(|(p, _)| (p.priority, flying(&p.production_id)))
            .collect();
        let order = placement::turn_order(&keys);
        let wanted = room as usize;
        let mut counts = BTreeMap::new();
        let mut with_ready = 0;
        let mut next = 0;
        while with_ready < wanted && next < order.len() {
            let chunk: Vec<&str> = order[next..]
                .iter()
                .take((wanted - with_ready).max(READY_PROBES_AT_ONCE))
                .map(|&i| ids[i])
                .collect();
            next += chunk.len();
            for (id, ready) in store::ready_of(tx, &chunk, room as i64).await? {
                with_ready += usize::from(ready > 0);
                let flying = flying(&id);
                counts.insert(id, (ready, flying));
            }
        }
        Ok(counts)
    }

    /// Locks up to `free` ready jobs for this installation: first retries
    /// placed on it (that may not move), then its portion of what its own
    /// productions and the federated productions that include it have
    /// waiting, by priority and, within a priority, by turns
    /// ([`placement::place`]). Federated ones are placed under the placement
    /// lock, over every installation of their groups.
    pub(crate) async fn take_ready(
        &self,
        tx: &Transaction<'_>,
        free: usize,
    ) -> anyhow::Result<Vec<JobRow>> {
        let me = self.backend.name();
        let mut taken = Vec::new();
        for production_id in store::placed_on(tx, me).await? {
            let wanted = free.saturating_sub(taken.len()) as i64;
            if wanted == 0 {
                return Ok(taken);
            }
            taken.extend(store::lock_jobs_for(tx, &production_id, me, true, wanted).await?);
        }
        if taken.len() >= free {
            return Ok(taken);
        }
        let mut backends = self.federation.backends_including(me);
        backends.push(me.to_string());
        let productions: Vec<(store::Candidate, Vec<String>)> = store::candidates(tx, &backends)
            .await?
            .into_iter()
            .filter_map(|p| {
                let members = if p.backend == me {
                    vec![me.to_string()]
                } else {
                    self.federation
                        .placeable(&p.backend, &p.vo, p.output_destination.is_some())
                };
                members.iter().any(|m| m == me).then_some((p, members))
            })
            .collect();
        if productions.is_empty() {
            return Ok(taken);
        }
        // This installation's room as the backend counts it.
        let mine = |in_flight: u64| Site {
            capacity: in_flight + free as u64,
            in_flight: in_flight + taken.len() as u64,
            share: self.federation.settings.share(me),
            available: true,
        };
        let federated = productions.iter().any(|(p, _)| p.backend != me);
        let sites: BTreeMap<String, Site> = if federated {
            store::lock_placement(tx).await?;
            let held = store::in_flight_per_installation(tx).await?;
            let available = store::available(tx).await?;
            self.federation
                .capacities
                .iter()
                .map(|(name, capacity)| {
                    let in_flight = held.get(name).copied().unwrap_or(0);
                    let site = if name == me {
                        mine(in_flight)
                    } else {
                        Site {
                            capacity: *capacity,
                            in_flight,
                            share: self.federation.settings.share(name),
                            available: available.contains(name),
                        }
                    };
                    (name.clone(), site)
                })
                .collect()
        } else {
            BTreeMap::from([(me.to_string(), mine(0))])
        };
        // No production can be given more than all the room there is.
        let room: u64 = sites
            .values()
            .filter(|s| s.available)
            .map(|s| s.capacity.saturating_sub(s.in_flight))
            .sum();
        let ids: Vec<&str> = productions
            .iter()
            .map(|(p, _)| p.production_id.as_str())
            .collect();
        let counts = if federated {
            store::ready_and_in_flight(tx, &ids, room as i64).await?
        } else {
            self.ready_of_the_first(tx, &productions, &ids, room)
                .await?
        };
        let demands: Vec<Demand> = productions
            .into_iter()
            .filter_map(|(p, members)| {
                let (ready, in_flight) = counts.get(&p.production_id).copied()?;
                (ready > 0).then_some(Demand {
                    production_id: p.production_id,
                    members,
                    ready,
                    priority: p.priority,
                    in_flight,
                })
            })
            .collect();
        let placed = placement::place(&sites, &demands);
        // What placement gave this installation, within its room, locked in one statement.
        let mut room_left = free.saturating_sub(taken.len());
        let mut wanted = Vec::new();
        for (production_id, n) in placement::taken_by(&placed, me) {
            let n = (n as usize).min(room_left);
            if n == 0 {
                break;
            }
            room_left -= n;
            wanted.push((production_id, n as i64));
        }
        taken.extend(store::lock_unplaced_jobs(tx, &wanted).await?);
        if !taken.is_empty() {
            tracing::debug!(installation = me, jobs = taken.len(), "placed ready jobs");
        }
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_production_forwarding_nowhere_is_placed_where_the_work_directory_is_shared() {
        let mut settings = FederationSettings::default();
        settings.groups.insert(
            "grid".into(),
            vec!["dirac".into(), "local".into(), "slurm".into()],
        );
        settings.groups.insert("sites".into(), vec!["dirac".into()]);
        let federation = Federation {
            settings,
            capacities: [("dirac", 10), ("local", 2), ("slurm", 10)]
                .into_iter()
                .map(|(n, c)| (n.to_string(), c))
                .collect(),
            remote: ["dirac".to_string()].into(),
        };
        assert_eq!(
            federation.placeable("grid", "cta", true),
            ["dirac", "local", "slurm"]
        );
        assert_eq!(
            federation.placeable("grid", "cta", false),
            ["local", "slurm"]
        );
        // Nowhere else to go: there, each attempt is refused with the reason.
        assert_eq!(federation.placeable("sites", "cta", false), ["dirac"]);
    }
}
