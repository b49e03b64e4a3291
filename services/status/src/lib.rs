//! Status: the read model of every production, built only from events. It
//! keeps each production's state and each job's latest state, answers
//! `GetProduction` / `ListProductions` with job counts that always sum to the
//! job total, and streams `WatchProduction` snapshots as changes commit
//! (PostgreSQL NOTIFY carries the change, so any replica can serve a watcher).
//!
//! `api` answers gRPC, `http` serves the dashboard, JSON and `/metrics`,
//! `rest` the HTTP/JSON API under `/api/v1` with its OpenAPI document,
//! `consume` handles the broker's deliveries, `domain` decides, `store` holds
//! every SQL statement, `error` maps failures onto gRPC codes and consumer
//! outcomes once.

pub mod api;
pub mod consume;
pub mod domain;
pub mod error;
mod follow;
pub mod forwarding;
mod gauges;
mod http;
pub mod installations;
mod rest;
pub mod store;

use prodsys_core::events::{
    FORWARDING_PROGRESS, INSTALLATION_HEALTH, JOB_STATUS, PRODUCTION_COMPLETED,
    PRODUCTION_DISPATCHED, PRODUCTION_FORWARDED, REQUEST_ACCEPTED,
};
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use error::StatusError;

pub const SERVICE: &str = "status";

/// Consumers of the status queue, each its own transaction: the database
/// projects two batches at once (see `store::project` for why that is safe).
const CONSUMERS: usize = 2;

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_production_and_job_read_models.sql",
    "0002_job_counters.sql",
    "0003_resource_estimates.sql",
    "0004_batched_upserts_in_place_job_updates.sql",
    "0005_installation_health.sql",
    "0006_previous_job_state.sql",
    "0040_final_job_counts.sql",
    "0100_forwarding_progress.sql",
    "0120_finished_once_catalogued.sql",
    "0200_observation_periods.sql",
    "0400_chained_inputs.sql",
    "0500_jobs_per_installation.sql",
    "0750_group_members.sql",
];

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[
            REQUEST_ACCEPTED,
            PRODUCTION_DISPATCHED,
            JOB_STATUS,
            PRODUCTION_COMPLETED,
            INSTALLATION_HEALTH,
            FORWARDING_PROGRESS,
            PRODUCTION_FORWARDED,
        ],
        &[],
        &shutdown,
    )
    .await?;
    foundation.consume_concurrently(
        settings,
        consume::Projector {
            db: foundation.db.clone(),
        },
        CONSUMERS,
        &shutdown,
    );
    let (changes, _) = broadcast::channel(1024);
    tokio::spawn(store::forward_changes(
        foundation.db.clone(),
        changes.clone(),
        shutdown.clone(),
    ));
    // Connected when first asked: the checker may start after status.
    // Each call made for an HTTP caller carries the caller's token: the
    // service asked decides what that caller may do and see.
    let checker = foundation.channel(
        &settings.status.checker_url,
        "status.checker_url",
        Some(std::time::Duration::from_secs(10)),
        true,
    )?;
    // Likewise the catalog, for production records and files.
    let catalog = foundation.channel(
        &settings.status.catalog_url,
        "status.catalog_url",
        Some(std::time::Duration::from_secs(30)),
        true,
    )?;
    // And intake, for the HTTP/JSON API's submit, validate, cancel, profiles.
    let intake = foundation.channel(
        &settings.status.intake_url,
        "status.intake_url",
        Some(std::time::Duration::from_secs(30)),
        true,
    )?;
    // And the dispatcher, for a production's jobs and their logs.
    let dispatcher = foundation.channel(
        &settings.status.dispatcher_url,
        "status.dispatcher_url",
        Some(std::time::Duration::from_secs(10)),
        true,
    )?;
    let snapshots = follow::Snapshots::start(foundation.db.clone(), &changes, shutdown.clone());
    let api = api::StatusApi {
        db: foundation.db.clone(),
        snapshots,
        checker: pb::checker_service_client::CheckerServiceClient::new(checker),
        catalog: pb::catalog_service_client::CatalogServiceClient::new(catalog)
            .max_decoding_message_size(settings.grpc.max_message_bytes),
        intake: pb::request_service_client::RequestServiceClient::new(intake)
            .max_decoding_message_size(settings.grpc.max_message_bytes),
        dispatcher: pb::job_service_client::JobServiceClient::new(dispatcher)
            .max_decoding_message_size(settings.grpc.max_message_bytes),
    };
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::status_service_server::StatusServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    // The dashboard, JSON and /metrics share the gRPC port (HTTP/1.1 and 2).
    let routes = tonic::service::Routes::from(routes.into_axum_router().merge(http::router(api)));
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.status.port,
            routes,
            reporter,
            &["prodsys.v1.StatusService"],
            &shutdown,
        )
        .await
}
