//! Dispatcher: turns an accepted production into jobs and follows every job
//! to its end. The consumer records each production with its plan inputs;
//! its jobs are created in bounded chunks (in the consumer's transaction when
//! small, else by the planning task, see `planning`), so a production is
//! never held in memory or in one transaction whole; the scheduler reserves
//! ready jobs, submits them to the backend, polls the backend in bulk,
//! retries failed attempts up to the profile's limit, registers outputs, and
//! closes the production by the stated rule (all done → COMPLETED, some →
//! PARTIALLY_COMPLETED, none → FAILED). A cancel is remembered if its
//! production has not arrived yet. A chained production (its profile
//! declares `inputs`) gets its jobs as its parents' output files arrive
//! (see `chain`).

mod api;
pub mod backend;
mod chain;
mod consume;
pub mod dirac;
mod domain;
pub mod error;
mod federation;
pub mod lease;
mod outputs;
mod planning;
pub mod remote;
mod scheduler;
pub mod slurm;
mod store;
pub mod supervisor;

use std::sync::Arc;

use anyhow::Context;
use prodsys_config::BackendSettings;
use prodsys_core::ProfileSet;
use prodsys_core::events::{JOB_OUTPUT, PRODUCTION_CANCEL, PRODUCTION_COMPLETED, REQUEST_ACCEPTED};
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running};
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
    "0012_job_accounting.sql",
    "0400_chained_inputs.sql",
    "0500_federated_placement.sql",
    "0600_inputs_used_counted.sql",
    "0700_output_destination.sql",
    "0750_moves_cost_no_retry.sql",
    "0751_jobs_in_flight_by_production.sql",
    "0800_chain_inputs_name_their_files.sql",
    "0900_inputs_taken_by_cursor.sql",
    "0910_no_index_of_unfinished_jobs.sql",
];

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    settings.check_federation()?;
    let federation = Arc::new(federation::Federation::from_settings(settings));
    let profiles = Arc::new(
        ProfileSet::load_dir(&settings.profiles_dir).context("loading production profiles")?,
    );
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[
            REQUEST_ACCEPTED,
            PRODUCTION_CANCEL,
            JOB_OUTPUT,
            PRODUCTION_COMPLETED,
        ],
        &[],
        &shutdown,
    )
    .await?;
    let work_dir = std::path::absolute(&settings.dispatcher.work_dir)
        .context("resolving the dispatcher work directory")?;
    let tools_dir = (!settings.dispatcher.tools_dir.as_os_str().is_empty())
        .then(|| std::path::absolute(&settings.dispatcher.tools_dir))
        .transpose()?;
    let deployment = store::deployment_tag(&foundation.db.client().await?)
        .await
        .context("reading the deployment tag")?;
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
    // The storages that jobs of installations not sharing the work directory write to.
    let destinations = Arc::new(
        remote::Destinations::from_settings(&settings.forwarding)
            .context("reading the forwarding destinations")?,
    );
    for (name, installation) in settings.dispatcher.installations() {
        let remote = (!installation.shares_filesystem()).then(|| destinations.clone());
        // A local installation may keep its attempts in a directory of its own.
        let mut installation_work_dir = work_dir.clone();
        let backend: Arc<dyn backend::Backend> = match installation {
            BackendSettings::Local {
                max_running,
                max_queued,
                work_dir: own,
            } => {
                if let Some(own) = own {
                    installation_work_dir = std::path::absolute(&own)
                        .with_context(|| format!("resolving the work directory of {name}"))?;
                }
                Arc::new(
                    backend::LocalExecutor::new(&name, max_running, tools_dir.clone())
                        .with_work_dir(installation_work_dir.clone())
                        .with_queue(max_queued),
                )
            }
            BackendSettings::Slurm {
                partition,
                max_in_flight,
                sbatch_args,
                ..
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
        let wake = Arc::new(scheduler::Wake::default());
        wakes.push(wake.clone());
        let scheduler = scheduler::Scheduler {
            db: foundation.db.clone(),
            profiles: profiles.clone(),
            backend,
            work_dir: installation_work_dir,
            deployment: deployment.clone(),
            wake,
            poll_interval,
            lease: Arc::new(lease::Lease::new(
                foundation.db.clone(),
                &name,
                &owner,
                lease_ttl,
            )),
            federation: federation.clone(),
            remote,
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
            pending_cancel_ttl: std::time::Duration::from_secs(
                settings.dispatcher.pending_cancel_ttl_s,
            ),
        }
        .run(shutdown.clone()),
    );
    let sources = chain::source_profiles(&profiles);
    foundation.consume(
        settings,
        consume::Planner {
            db: foundation.db.clone(),
            profiles,
            wakes,
            planning,
            inline_jobs: chunk,
            max_jobs: settings.dispatcher.max_jobs_per_production,
            sources,
            federation,
        },
        &shutdown,
    );
    let (routes, reporter) = prodsys_server::base_routes()?;
    // A production's jobs and their logs, for the dashboard.
    let routes = routes.add_service(pb::job_service_server::JobServiceServer::new(
        api::JobsApi::new(foundation.db.clone(), settings),
    ));
    let routes = prodsys_server::with_metrics(routes);
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.dispatcher.port,
            routes,
            reporter,
            &["prodsys.v1.JobService"],
            &served,
        )
        .await
}
