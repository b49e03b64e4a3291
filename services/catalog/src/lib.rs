//! Catalog: every file a production wrote, with its LFN, size, adler32,
//! storage URL and metadata, registered from `job.output` events (an LFN is
//! registered once, however often the event arrives), and a record per
//! finished production. Metadata values are stored as the types the profiles
//! declare for their keys (numbers as JSON numbers), so they compare as
//! numbers. `FindFiles`/`StreamFiles` answer typed conditions, an LFN prefix,
//! a production and a dataset; `FindExisting(Many)` tells the checker what is
//! held of an identity, which keys files lack or differ in, and the last run.
//!
//! A finished production's record (`GetProductionRecord`) tells who asked
//! for it and with what, how its jobs and attempts went and what it wrote,
//! from the events the catalog consumes; `recorder` writes it as a Workflow
//! Run RO-Crate and catalogues that file under the production.

//! It forwards each production's files to the destinations it asked for
//! (`forward`: copies verified by adler32 on the destination, replicas in
//! FindFiles, `forwarding.progress` and `production.forwarded` events).
//!
//! `api` answers gRPC, `consume` handles the broker's deliveries, `domain`
//! decides, `store` holds every SQL statement, `error` maps failures onto
//! gRPC codes and consumer outcomes once; `forward` drives the copies and
//! `destination` knows each kind of destination; `recorder` writes records.

pub mod api;
pub mod consume;
pub mod destination;
pub mod domain;
pub mod error;
pub mod forward;
pub mod installations;
pub mod recorder;
pub mod rucio;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProfileSet;
use prodsys_core::events::{
    JOB_OUTPUT, PRODUCTION_COMPLETED, PRODUCTION_DISPATCHED, REQUEST_ACCEPTED,
};
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running};
use tokio_util::sync::CancellationToken;

pub use error::CatalogError;

pub const SERVICE: &str = "catalog";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_files_and_production_records.sql",
    "0002_running_totals_per_production.sql",
    "0020_numeric_metadata_as_numbers.sql",
    "0100_forwarding.sql",
    "0110_registered_replicas.sql",
    "0120_outputs_awaited.sql",
    "0200_files_by_particle_in_lfn_order.sql",
    "0201_files_by_cta_identity.sql",
    "0202_files_by_particle_and_nsb_in_lfn_order.sql",
    "0203_every_production_followed_to_its_end.sql",
    "0300_production_records.sql",
    "0310_file_classes.sql",
    "0400_production_links.sql",
    "0500_jobs_per_installation.sql",
    "0510_replicas_due_in_lfn_order.sql",
    "0520_where_each_job_ran.sql",
    "0530_claims_only_while_copying.sql",
];

/// Consumers of the catalog's queue: registrations commute (running totals,
/// files by unique LFN), so two batches may be written at once.
const CONSUMERS: usize = 2;

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let profiles = ProfileSet::load_dir(&settings.profiles_dir)
        .context("loading production profiles (for the types of metadata keys)")?;
    let types = Arc::new(domain::KeyTypes(
        profiles
            .metadata_types()
            .map_err(|e| anyhow::anyhow!("profiles in {}: {e}", settings.profiles_dir.display()))?,
        profiles.run_keys(),
    ));
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[
            JOB_OUTPUT,
            PRODUCTION_COMPLETED,
            REQUEST_ACCEPTED,
            PRODUCTION_DISPATCHED,
        ],
        &[],
        &shutdown,
    )
    .await?;
    // A job.output carries many files (a CTA job writes one per NSB level,
    // a bulk registration hundreds): a quarter of the usual prefetch and batch
    // keeps a batch's files, decoded and encoded, to a few megabytes.
    let mut consuming = settings.clone();
    consuming.amqp.prefetch = (settings.amqp.prefetch / 4).max(1);
    consuming.amqp.batch_size = (settings.amqp.batch_size / 4).max(1);
    foundation.consume_concurrently(
        &consuming,
        consume::Registrar {
            db: foundation.db.clone(),
            types: types.clone(),
        },
        CONSUMERS,
        &shutdown,
    );
    if !settings.forwarding.destinations.is_empty() {
        tracing::info!(
            destinations = ?settings.forwarding.destinations.keys().collect::<Vec<_>>(),
            "forwarding outputs"
        );
    }
    // Without destinations it still announces productions whose outputs
    // are all catalogued.
    forward::Forwarder::new(foundation.db.clone(), &settings.forwarding)?
        .awaiting_records(!settings.catalog.records_dir.as_os_str().is_empty())
        .spawn(shutdown.clone());
    if let Some(recorder) = recorder::Recorder::new(foundation.db.clone(), &settings.catalog)? {
        tracing::info!(records_dir = %settings.catalog.records_dir.display(), "writing production records");
        recorder.spawn(shutdown.clone());
    }
    let moved = store::reclassify(&foundation.db, &types)
        .await
        .context("moving files to the classes the profiles' run keys give them")?;
    if moved > 0 {
        tracing::info!(
            files = moved,
            run_keys = ?types.1,
            "files moved to the classes of the profiles' run keys"
        );
    }
    let ordered_keys = Arc::new(
        store::ordered_keys(&foundation.db)
            .await
            .context("reading the catalog's indexes")?,
    );
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = prodsys_server::with_metrics(routes);
    let routes = routes.add_service(
        pb::catalog_service_server::CatalogServiceServer::new(api::CatalogApi {
            db: foundation.db.clone(),
            types,
            ordered_keys,
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.catalog.port,
            routes,
            reporter,
            &["prodsys.v1.CatalogService"],
            &shutdown,
        )
        .await
}
