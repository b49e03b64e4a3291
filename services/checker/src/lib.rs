//! Checker: decides whether a received request becomes a production, before
//! a single CPU hour is spent. It validates the parameters against the
//! profile (requests also come from event publishers), computes the physics
//! fingerprint, refuses an exact duplicate by naming the production that has
//! that identity, reports overlaps (same identity but other statistics or an
//! intersecting range, or output files of the same identity: NSB levels in
//! common) and accepts them only as explicit extensions with new run numbers.
//! It compares each identity of a request's files with what the catalog holds
//! (from prodsys or registered elsewhere) and explains what matched and which
//! keys differ. It assigns a human-readable production ID from a per-prefix
//! sequence that never reuses a number. `Evaluate` answers the same question
//! without storing anything (intake's `ValidateRequest`).
//!
//! `api` answers gRPC, `consume` handles the broker's deliveries, `catalog`
//! asks the catalog what it holds, `domain` decides, `store` holds every SQL
//! statement, `error` maps failures onto gRPC codes and consumer outcomes once.

pub mod api;
pub mod catalog;
pub mod consume;
pub mod domain;
pub mod error;
pub mod store;
pub mod visibility;

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProfileSet;
use prodsys_core::events::REQUEST_RECEIVED;
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running};
use tokio_util::sync::CancellationToken;

pub use domain::{decide_lock_key, production_id};
pub use error::CheckerError;

pub const SERVICE: &str = "checker";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_productions_and_id_sequences.sql",
    "0002_overlaps_and_run_ranges.sql",
    "0020_file_base_fingerprints.sql",
    "0050_id_sequences_by_prefix.sql",
    "0150_derived_templates.sql",
    "0200_productions_per_pointing.sql",
];

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    settings.check_federation()?;
    let profiles = Arc::new(
        ProfileSet::load_dir(&settings.profiles_dir)
            .context("loading production profiles")?
            .with_templates(&settings.templates_dir)
            .context("loading container templates")?
            .with_periods(&settings.periods_dir)
            .context("loading observation periods")?,
    );
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[REQUEST_RECEIVED],
        &[],
        &shutdown,
    )
    .await?;
    let channel = foundation.channel(
        &settings.checker.catalog_url,
        "checker.catalog_url",
        Some(std::time::Duration::from_secs(10)),
        false,
    )?;
    let catalog = catalog::Catalog {
        client: pb::catalog_service_client::CatalogServiceClient::new(channel),
    };
    let rules = Arc::new(domain::Rules {
        profiles,
        installations: settings.dispatcher.installations().into_keys().collect(),
        federation: settings.federation.clone(),
        destinations: settings.forwarding.destinations.keys().cloned().collect(),
        remote_installations: settings
            .dispatcher
            .installations()
            .into_iter()
            .filter(|(_, installation)| !installation.shares_filesystem())
            .map(|(name, _)| name)
            .collect(),
        max_jobs: settings.dispatcher.max_jobs_per_production,
    });
    foundation.consume(
        settings,
        consume::Checker {
            db: foundation.db.clone(),
            rules: rules.clone(),
            catalog: catalog.clone(),
            isolate_vos: !settings.auth.dev_mode,
        },
        &shutdown,
    );
    let api = api::CheckerApi {
        db: foundation.db.clone(),
        rules,
        catalog,
        isolate_vos: !settings.auth.dev_mode,
    };
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = prodsys_server::with_metrics(routes);
    let routes = routes.add_service(
        pb::checker_service_server::CheckerServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.checker.port,
            routes,
            reporter,
            &["prodsys.v1.CheckerService"],
            &shutdown,
        )
        .await
}
