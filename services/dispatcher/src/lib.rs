//! Dispatcher: turns an accepted production into jobs and follows every job
//! to its end. The consumer records each production with its plan inputs;
//! its jobs are created in bounded chunks (in the consumer's transaction when
//! small, else by the planning task, see `planning`), so a production is
//! never held in memory or in one transaction whole; the scheduler reserves
//! ready jobs, submits them to the backend, polls the backend in bulk,
//! retries failed attempts up to the profile's limit, registers outputs, and
//! closes the production by the stated rule (all done → COMPLETED, some →
//! PARTIALLY_COMPLETED, none → FAILED). A cancel is remembered if its
//! production has not arrived yet.

pub mod backend;
pub mod dirac;
pub mod lease;
mod planning;
mod scheduler;
pub mod slurm;
pub mod supervisor;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use prodsys_config::BackendSettings;
use prodsys_core::events::{PRODUCTION_CANCEL, PRODUCTION_DISPATCHED, REQUEST_ACCEPTED};
use prodsys_core::{ProductionState, ProfileSet};
use prodsys_db::Cached;
use prodsys_db::{Db, Migration};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, decode_event, outbox_event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SERVICE: &str = "dispatcher";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_productions_and_jobs.sql",
    "0002_unfinished_jobs_index.sql",
    "0003_deployment_tag.sql",
    "0004_productions_by_installation_and_state.sql",
    "0005_dispatch_priority.sql",
    "0006_installation_leases.sql",
    "0010_incremental_planning.sql",
    "0011_cancels_received_before_their_production.sql",
];

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let profiles = Arc::new(
        ProfileSet::load_dir(&settings.profiles_dir).context("loading production profiles")?,
    );
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[REQUEST_ACCEPTED, PRODUCTION_CANCEL],
        &[],
        &shutdown,
    )
    .await?;
    let work_dir = std::path::absolute(&settings.dispatcher.work_dir)
        .context("resolving the dispatcher work directory")?;
    let tools_dir = (!settings.dispatcher.tools_dir.as_os_str().is_empty())
        .then(|| std::path::absolute(&settings.dispatcher.tools_dir))
        .transpose()?;
    let deployment: String = foundation
        .db
        .client()
        .await?
        .query_one_cached("SELECT tag FROM deployment", &[])
        .await
        .context("reading the deployment tag")?
        .get(0);
    // This dispatcher's name in installation_leases: host, pid, and a
    // random part (two dispatchers may run in one process).
    let owner = format!(
        "{}:{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let lease_ttl = std::time::Duration::from_millis(settings.dispatcher.lease_ttl_ms);
    let mut wakes = Vec::new();
    let mut schedulers = Vec::new();
    let poll_interval = std::time::Duration::from_millis(settings.dispatcher.poll_interval_ms);
    for (name, installation) in settings.dispatcher.installations() {
        let backend: Arc<dyn backend::Backend> = match installation {
            BackendSettings::Local { max_running } => Arc::new(backend::LocalExecutor::new(
                &name,
                max_running,
                tools_dir.clone(),
            )),
            BackendSettings::Slurm {
                partition,
                max_in_flight,
                sbatch_args,
            } => Arc::new(slurm::Slurm::new(
                &name,
                &partition,
                max_in_flight,
                sbatch_args,
                tools_dir.clone(),
            )),
            BackendSettings::Dirac(dirac) => Arc::new(
                dirac::Dirac::new(&name, &dirac)
                    .with_context(|| format!("setting up installation {name}"))?,
            ),
        };
        let wake = Arc::new(Notify::new());
        wakes.push(wake.clone());
        let scheduler = scheduler::Scheduler {
            db: foundation.db.clone(),
            profiles: profiles.clone(),
            backend,
            work_dir: work_dir.clone(),
            deployment: deployment.clone(),
            wake,
            poll_interval,
            lease: Arc::new(lease::Lease::new(
                foundation.db.clone(),
                &name,
                &owner,
                lease_ttl,
            )),
        };
        schedulers.push(tokio::spawn(scheduler.run(shutdown.clone())));
    }
    // The gRPC server (what `Running::wait` waits for) stops only once the
    // schedulers gave their leases up, so a successor takes over at once.
    let served = CancellationToken::new();
    {
        let (shutdown, served) = (shutdown.clone(), served.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                futures::future::join_all(schedulers),
            )
            .await;
            served.cancel();
        });
    }
    let planning = Arc::new(Notify::new());
    let chunk = settings.dispatcher.plan_chunk_jobs.max(1);
    tokio::spawn(
        planning::PlanningTask {
            db: foundation.db.clone(),
            profiles: profiles.clone(),
            chunk,
            wake: planning.clone(),
            schedulers: wakes.clone(),
            idle: poll_interval,
        }
        .run(shutdown.clone()),
    );
    foundation.consume(
        settings,
        Planner {
            db: foundation.db.clone(),
            profiles,
            wakes,
            planning,
            inline_jobs: chunk,
            max_jobs: settings.dispatcher.max_jobs_per_production,
        },
        &shutdown,
    );
    let (routes, reporter) = prodsys_server::base_routes()?;
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.dispatcher.port,
            routes,
            reporter,
            &[],
            &served,
        )
        .await
}

/// When an event was made: the time in its UUIDv7 ID (every prodsys event's),
/// else now.
fn event_time(event_id: Uuid) -> chrono::DateTime<chrono::Utc> {
    event_id
        .get_timestamp()
        .and_then(|t| {
            let (seconds, nanos) = t.to_unix();
            chrono::DateTime::from_timestamp(seconds as i64, nanos)
        })
        .unwrap_or_else(chrono::Utc::now)
}

/// Plans accepted productions into jobs.
struct Planner {
    db: Db,
    profiles: Arc<ProfileSet>,
    /// One per installation's scheduler.
    wakes: Vec<Arc<Notify>>,
    /// The planning task's.
    planning: Arc<Notify>,
    /// Most jobs one batch plans in the consumer's own transaction; larger
    /// productions are left to the planning task.
    inline_jobs: u64,
    /// The deployment's ceiling on one production's jobs.
    max_jobs: u64,
}

/// What planning needs, checked before anything is written.
struct Prepared<'a> {
    plan: prodsys_core::JobPlan,
    /// When the checker accepted it (the event's UUIDv7 time).
    accepted_at: chrono::DateTime<chrono::Utc>,
    estimate: pb::ResourceEstimate,
    parameters: serde_json::Value,
    request_id: Uuid,
    accepted: &'a pb::RequestAccepted,
}

impl Planner {
    /// Marks the production CANCELLING; its installation's scheduler kills
    /// and closes it. A production not seen yet has its cancel remembered,
    /// applied when it arrives.
    async fn cancel(
        &self,
        tx: &prodsys_db::deadpool_postgres::Transaction<'_>,
        event_id: Uuid,
        cancel: &pb::ProductionCancel,
    ) -> anyhow::Result<()> {
        let from = ProductionState::Running;
        let updated = tx
            .execute_cached(
                "UPDATE productions SET state = $2, updated_at = now() WHERE production_id = $1 AND state = $3",
                &[
                    &cancel.production_id,
                    &from.transition(ProductionState::Cancelling)?.as_str(),
                    &from.as_str(),
                ],
            )
            .await?;
        let remembered = if updated == 0 {
            tx.execute_cached(
                "INSERT INTO pending_cancels (production_id, reason, requested_at)
                 SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM productions WHERE production_id = $1)
                 ON CONFLICT (production_id) DO NOTHING",
                &[&cancel.production_id, &cancel.reason, &event_time(event_id)],
            )
            .await?
                == 1
        } else {
            false
        };
        tracing::info!(production_id = %cancel.production_id, reason = %cancel.reason,
            running = updated == 1, remembered, "cancel requested");
        Ok(())
    }

    fn prepare<'a>(
        &self,
        event_id: Uuid,
        accepted: &'a pb::RequestAccepted,
    ) -> Result<Prepared<'a>, String> {
        let profile = self
            .profiles
            .get(&accepted.profile)
            .ok_or_else(|| format!("unknown profile {:?}", accepted.profile))?;
        let parameters: serde_json::Value = serde_json::from_str(&accepted.parameters_json)
            .map_err(|e| format!("parameters are not JSON: {e}"))?;
        let plan = profile
            .plan(
                &parameters,
                &accepted.fingerprint,
                accepted.run_number_offset,
            )
            .ok_or("parameters give no job plan")?;
        // Refused at submit time; a request accepted before a lower limit
        // was set is not planned either.
        if let Some(violation) = profile.check_job_count(&plan, self.max_jobs) {
            return Err(format!("{}: {}", violation.field, violation.description));
        }
        let request_id =
            Uuid::parse_str(&accepted.request_id).map_err(|e| format!("request_id: {e}"))?;
        Ok(Prepared {
            accepted_at: event_time(event_id),
            estimate: profile.resource_estimate(&plan).into(),
            plan,
            parameters,
            request_id,
            accepted,
        })
    }

    /// Records a batch of accepted productions in one transaction: one
    /// insert for the productions, one outbox write. Productions whose jobs
    /// fit together in `inline_jobs` are planned here whole; the others are
    /// left to the planning task (`planned_jobs` 0). A production whose
    /// cancel came first is recorded CANCELLING, with no jobs.
    async fn plan(
        &self,
        tx: &prodsys_db::deadpool_postgres::Transaction<'_>,
        prepared: &[Prepared<'_>],
    ) -> anyhow::Result<()> {
        if prepared.is_empty() {
            return Ok(());
        }
        let n = prepared.len();
        let mut ids = Vec::with_capacity(n);
        for p in prepared {
            ids.push(p.accepted.production_id.as_str());
        }
        // Cancels that came first, with when each was asked for.
        let pending: HashMap<String, chrono::DateTime<chrono::Utc>> = tx
            .query_cached(
                "SELECT production_id, requested_at FROM pending_cancels WHERE production_id = ANY($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // A cancel asked for before the production was accepted named an ID
        // not given yet: it is dropped, not applied to whoever got the ID.
        let cancelled: HashSet<String> = prepared
            .iter()
            .filter(|p| {
                pending
                    .get(&p.accepted.production_id)
                    .is_some_and(|asked| *asked >= p.accepted_at)
            })
            .map(|p| p.accepted.production_id.clone())
            .collect();
        let mut request_ids = Vec::with_capacity(n);
        let mut profiles = Vec::with_capacity(n);
        let mut vos = Vec::with_capacity(n);
        let mut parameters = Vec::with_capacity(n);
        let mut fingerprints = Vec::with_capacity(n);
        let mut backends = Vec::with_capacity(n);
        let mut offsets = Vec::with_capacity(n);
        let mut totals = Vec::with_capacity(n);
        let mut priorities = Vec::with_capacity(n);
        let mut accepted_ats = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut planned = Vec::with_capacity(n);
        let mut budget = self.inline_jobs;
        let running = ProductionState::Running;
        let cancelling = running.transition(ProductionState::Cancelling)?;
        for p in prepared {
            request_ids.push(p.request_id);
            profiles.push(p.accepted.profile.as_str());
            vos.push(p.accepted.vo.as_str());
            parameters.push(&p.parameters);
            fingerprints.push(p.accepted.fingerprint.as_str());
            backends.push(p.accepted.backend.as_str());
            offsets.push(p.accepted.run_number_offset as i64);
            totals.push(p.plan.job_count as i64);
            priorities.push(p.accepted.priority);
            accepted_ats.push(p.accepted_at);
            let jobs = p.plan.job_count;
            if cancelled.contains(&p.accepted.production_id) {
                states.push(cancelling.as_str());
                planned.push(0i64);
            } else if jobs <= budget {
                budget -= jobs;
                states.push(running.as_str());
                planned.push(jobs as i64);
            } else {
                states.push(running.as_str());
                planned.push(0i64);
            }
        }
        let inserted: HashSet<String> = tx
            .query_cached(
                "INSERT INTO productions (production_id, request_id, profile, vo, parameters, fingerprint,
                                          backend, run_number_offset, job_total, priority, state, planned_jobs,
                                          accepted_at)
                 SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[],
                                      $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::int[],
                                      $11::text[], $12::bigint[], $13::timestamptz[])
                 ON CONFLICT (production_id) DO NOTHING RETURNING production_id",
                &[
                    &ids,
                    &request_ids,
                    &profiles,
                    &vos,
                    &parameters,
                    &fingerprints,
                    &backends,
                    &offsets,
                    &totals,
                    &priorities,
                    &states,
                    &planned,
                    &accepted_ats,
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Applied or dropped, a remembered cancel is done with once its production is recorded.
        let applied: Vec<&str> = pending
            .keys()
            .filter(|id| inserted.contains(*id))
            .map(String::as_str)
            .collect();
        if !applied.is_empty() {
            tx.execute_cached(
                "DELETE FROM pending_cancels WHERE production_id = ANY($1)",
                &[&applied],
            )
            .await?;
        }
        let mut jobs = planning::JobRows::default();
        let mut events = Vec::new();
        for (p, planned) in prepared.iter().zip(&planned) {
            let accepted = p.accepted;
            // Planned before (a replayed event under another ID): nothing to add.
            if !inserted.contains(&accepted.production_id) {
                continue;
            }
            for i in 0..*planned as u64 {
                jobs.push(&accepted.production_id, &p.plan.job(i));
            }
            let event = pb::ProductionDispatched {
                production_id: accepted.production_id.clone(),
                job_total: p.plan.job_count,
                backend: accepted.backend.clone(),
                estimate: Some(p.estimate),
            };
            events.push(outbox_event(
                PRODUCTION_DISPATCHED,
                &accepted.production_id,
                &event,
            ));
            let id = &accepted.production_id;
            tracing::info!(production_id = %id, jobs = p.plan.job_count,
                planned_now = *planned, cancelled = cancelled.contains(id),
                ignored_cancel = pending.contains_key(id) && !cancelled.contains(id),
                "production recorded");
        }
        jobs.flush(tx).await?;
        prodsys_db::enqueue(tx, &self.db.outbox_channel(), &events).await?;
        Ok(())
    }
}

impl BatchHandler for Planner {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // (slot in the batch, event ID, event) of each production to plan.
        let mut accepted = Vec::new();
        let mut cancels = Vec::new();
        for (slot, incoming) in batch.iter().enumerate() {
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
        let mut prepared = Vec::with_capacity(accepted.len());
        let mut ids = Vec::with_capacity(accepted.len());
        for (slot, id, event) in &accepted {
            match self.prepare(*id, event) {
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
        self.plan(&tx, &prepared).await?;
        // After the plans: a cancel in the same batch finds its production.
        for (id, cancel) in &cancels {
            if !prodsys_db::claim(&tx, &[*id]).await?.is_empty() {
                self.cancel(&tx, *id, cancel).await?;
            }
        }
        tx.commit().await?;
        self.planning.notify_one();
        for wake in &self.wakes {
            wake.notify_one();
        }
        Ok(outcomes)
    }
}
