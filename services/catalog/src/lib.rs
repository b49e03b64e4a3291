//! Catalog: every file a production wrote, with its LFN, size, adler32,
//! storage URL and metadata, registered from `job.output` events (an LFN is
//! registered once, however often the event arrives), and a record per
//! finished production. Metadata values are stored as the types the profiles
//! declare for their keys (numbers as JSON numbers), so they compare as
//! numbers. `FindFiles`/`StreamFiles` answer typed conditions, an LFN prefix,
//! a production and a dataset; `FindExisting(Many)` tells the checker what is
//! held of an identity, which keys files lack or differ in, and the last run.

//!
//! `api` answers gRPC, `consume` handles the broker's deliveries, `domain`
//! decides, `store` holds every SQL statement, `error` maps failures onto
//! gRPC codes and consumer outcomes once.

pub mod api;
pub mod consume;
pub mod domain;
pub mod error;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProfileSet;
use prodsys_core::events::{JOB_OUTPUT, PRODUCTION_COMPLETED};
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running};
use tokio_util::sync::CancellationToken;

pub use error::CatalogError;

pub const SERVICE: &str = "catalog";

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "files and production records",
        sql: r#"
        CREATE TABLE files (
            lfn           text PRIMARY KEY,
            production_id text NOT NULL,
            job_index     bigint NOT NULL,
            attempt       integer NOT NULL,
            size          bigint NOT NULL,
            adler32       text NOT NULL,
            url           text NOT NULL,
            metadata      jsonb NOT NULL DEFAULT '{}',
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX files_production ON files (production_id, lfn);
        CREATE INDEX files_metadata ON files USING gin (metadata jsonb_path_ops);
        CREATE TABLE productions (
            production_id text PRIMARY KEY,
            state         text NOT NULL,
            file_count    bigint NOT NULL,
            total_bytes   bigint NOT NULL,
            completed_at  timestamptz NOT NULL DEFAULT now()
        );
    "#,
    },
    Migration {
        version: 2,
        name: "running totals per production",
        // Kept with every registration, so a production's record reads one
        // row however many files it has, and is right whichever of several
        // consumers commits last.
        sql: "CREATE TABLE totals (
                  production_id text PRIMARY KEY,
                  file_count    bigint NOT NULL,
                  total_bytes   bigint NOT NULL
              );
              INSERT INTO totals SELECT production_id, count(*), sum(size) FROM files GROUP BY 1;",
    },
    Migration {
        version: 20,
        name: "numeric metadata as numbers",
        // Files registered before metadata had types carry every value as a
        // string: the numeric keys of the shipped profiles become numbers,
        // so they compare as numbers (registration types them from now on).
        sql: r#"
        UPDATE files SET metadata = (
            SELECT jsonb_object_agg(key,
                       CASE WHEN key = ANY (ARRAY['phiP', 'thetaP', 'nsb', 'energy_min', 'energy_max',
                                                  'spectral_index', 'viewcone', 'core_scatter',
                                                  'run_number', 'energy_min_gev', 'energy_max_gev'])
                                 AND jsonb_typeof(value) = 'string'
                                 AND value #>> '{}' ~ '^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$'
                            THEN to_jsonb((value #>> '{}')::numeric)
                            ELSE value END)
            FROM jsonb_each(metadata))
        WHERE metadata <> '{}'
          AND EXISTS (SELECT FROM jsonb_each(metadata) e
                      WHERE jsonb_typeof(e.value) = 'string'
                        AND e.key = ANY (ARRAY['phiP', 'thetaP', 'nsb', 'energy_min', 'energy_max',
                                               'spectral_index', 'viewcone', 'core_scatter',
                                               'run_number', 'energy_min_gev', 'energy_max_gev']));
    "#,
    },
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
    let types = Arc::new(domain::KeyTypes(profiles.metadata_types().map_err(
        |e| anyhow::anyhow!("profiles in {}: {e}", settings.profiles_dir.display()),
    )?));
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[JOB_OUTPUT, PRODUCTION_COMPLETED],
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
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::catalog_service_server::CatalogServiceServer::new(api::CatalogApi {
            db: foundation.db.clone(),
            types,
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
