//! Intake: the front door. It checks a request against its profile (so a
//! scientist hears about a bad field at once), stores it under a request ID,
//! answers a repeated idempotency key with the first request, and announces
//! `request.received`. It follows `request.accepted` / `request.rejected` so
//! `GetRequest` tells where a request stands.
//!
//! `api` answers gRPC, `consume` handles the broker's deliveries (`ingest`
//! reads requests published as CloudEvents), `domain` decides, `store` holds
//! every SQL statement, `error` maps failures onto gRPC codes and consumer
//! outcomes once.

pub mod api;
pub mod consume;
pub mod domain;
pub mod error;
pub mod ingest;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use prodsys_core::ProfileSet;
use prodsys_core::events::{
    PRODUCTION_COMPLETED, REQUEST_ACCEPTED, REQUEST_REJECTED, REQUEST_REUSED,
};
use prodsys_db::Migration;
use prodsys_proto as pb;
use prodsys_server::batch::GroupCommit;
use prodsys_server::{Foundation, Running};
use tokio_util::sync::CancellationToken;

pub use domain::PRIORITY_RANGE;
pub use error::IntakeError;

pub const SERVICE: &str = "intake";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_requests.sql",
    "0002_extension_requests.sql",
    "0003_requests_from_events.sql",
    "0004_reuse_of_existing_productions.sql",
    "0005_dispatch_priority.sql",
    "0006_room_for_the_verdict.sql",
    "0100_forwarding_destinations.sql",
    "0200_pointing_productions.sql",
    "0600_request_owners.sql",
    "0610_admission_per_vo.sql",
];

/// Most submissions in one group commit.
const GROUP_MAX: usize = 256;
/// Group-commit writers: while one commits, the next gathers and writes its group.
const GROUP_WRITERS: usize = 2;

/// Starts intake: schema, broker, relay, consumer and gRPC server.
pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
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
        &[
            REQUEST_ACCEPTED,
            REQUEST_REJECTED,
            REQUEST_REUSED,
            PRODUCTION_COMPLETED,
        ],
        &["#"],
        &shutdown,
    )
    .await?;
    foundation.consume(
        settings,
        consume::IntakeConsumer {
            db: foundation.db.clone(),
            profiles: profiles.clone(),
            ingest_exchange: foundation.names.ingest(),
            policy: ingest::Policy::from_settings(&settings.intake)
                .with_tokens(!foundation.auth.dev_mode()),
            auth: foundation.auth.clone(),
        },
        &shutdown,
    );
    let checker = foundation.channel(
        &settings.intake.checker_url,
        "intake.checker_url",
        None,
        false,
    )?;
    let db = foundation.db.clone();
    let committer = GroupCommit::start(GROUP_MAX, GROUP_WRITERS, &shutdown, move |group| {
        let db = db.clone();
        async move { store::write_group(&db, group).await }
    });
    let api = api::RequestApi {
        db: foundation.db.clone(),
        committer,
        profiles,
        checker: pb::checker_service_client::CheckerServiceClient::new(checker),
        settings: Arc::new(settings.intake.clone()),
    };
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = prodsys_server::with_metrics(routes);
    let routes = routes.add_service(
        pb::request_service_server::RequestServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.intake.port,
            routes,
            reporter,
            &["prodsys.v1.RequestService"],
            &shutdown,
        )
        .await
}
