//! The security boundary that does not depend on who the caller is:
//! distrust of every string a request carries, where ingest events may
//! send their answers, what the dispatcher re-checks, per-VO limits, and the
//! least privilege of each service on the broker and in PostgreSQL.

mod support;

use prodsys_proto as pb;
use support::{cta_example, spawn_app, violated_fields};

/// Asserts `result` is a refusal naming exactly `field`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>, field: &str) {
    let status = result.expect_err(field);
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{field}: {status:?}"
    );
    assert_eq!(violated_fields(&status), [field], "{status:?}");
    assert!(
        !status.message().contains("SQL") && !status.message().contains("incident"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_string_of_every_public_request_is_checked_before_the_database() {
    let app = spawn_app().await;
    let mut intake = app.intake.clone();
    let mut status = app.status.clone();
    let mut catalog = app.catalog.clone();

    for (field, request) in [
        (
            "profile",
            pb::SubmitRequestRequest {
                profile: "cta\0".into(),
                ..cta_example()
            },
        ),
        (
            "vo",
            pb::SubmitRequestRequest {
                vo: "vo\0".into(),
                ..cta_example()
            },
        ),
        (
            "backend",
            pb::SubmitRequestRequest {
                backend: "local\0".into(),
                ..cta_example()
            },
        ),
        (
            "submitter",
            pb::SubmitRequestRequest {
                submitter: "me\0".into(),
                ..cta_example()
            },
        ),
        (
            "idempotency_key",
            pb::SubmitRequestRequest {
                idempotency_key: "k\0".into(),
                ..cta_example()
            },
        ),
        (
            "idempotency_key",
            pb::SubmitRequestRequest {
                idempotency_key: "k".repeat(2000),
                ..cta_example()
            },
        ),
        (
            "forward[0]",
            pb::SubmitRequestRequest {
                forward: vec!["\0".into()],
                ..cta_example()
            },
        ),
        (
            "parameters_json",
            pb::SubmitRequestRequest {
                parameters_json: "{\"a\":\"\0\"}".into(),
                ..cta_example()
            },
        ),
    ] {
        refused(intake.submit_request(request.clone()).await, field);
        refused(intake.validate_request(request).await, field);
    }
    refused(
        intake
            .get_request(pb::GetRequestRequest {
                request_id: "\0".into(),
            })
            .await,
        "request_id",
    );
    // A cancel's reason was stored as given: a NUL in it reached PostgreSQL.
    refused(
        intake
            .cancel_production(pb::CancelProductionRequest {
                production_id: "CTA-000001".into(),
                reason: "oops\0".into(),
            })
            .await,
        "reason",
    );
    refused(
        intake
            .list_templates(pb::ListTemplatesRequest {
                profile: String::new(),
                name: "\u{1b}".into(),
            })
            .await,
        "name",
    );
    refused(
        intake
            .list_periods(pb::ListPeriodsRequest {
                profile: "\0".into(),
                name: String::new(),
            })
            .await,
        "profile",
    );
    refused(
        status
            .get_production(pb::GetProductionRequest {
                production_id: "CTA-\0".into(),
            })
            .await,
        "production_id",
    );
    refused(
        status
            .watch_production(pb::GetProductionRequest {
                production_id: "CTA-\0".into(),
            })
            .await,
        "production_id",
    );
    refused(
        status
            .list_productions(pb::ListProductionsRequest {
                page_token: "CTA-\0".into(),
                ..Default::default()
            })
            .await,
        "page_token",
    );
    refused(
        status
            .list_productions(pb::ListProductionsRequest {
                vo: "v\0".into(),
                ..Default::default()
            })
            .await,
        "vo",
    );
    refused(
        catalog
            .find_files(pb::FindFilesRequest {
                lfn_prefix: "/vo/\0".into(),
                ..Default::default()
            })
            .await,
        "lfn_prefix",
    );
    refused(
        catalog
            .find_files(pb::FindFilesRequest {
                metadata: [("site".to_string(), "north\0".to_string())].into(),
                ..Default::default()
            })
            .await,
        "metadata.site",
    );
    refused(
        catalog
            .stream_files(pb::FindFilesRequest {
                dataset: "d\0".into(),
                ..Default::default()
            })
            .await,
        "dataset",
    );
    refused(
        catalog
            .get_production_record(pb::GetProductionRecordRequest {
                production_id: "\0".into(),
                ..Default::default()
            })
            .await,
        "production_id",
    );
    refused(
        catalog
            .find_existing(pb::FindExistingRequest {
                metadata: [("site".to_string(), "\0".to_string())].into(),
                ..Default::default()
            })
            .await,
        "metadata.site",
    );
    assert_eq!(app.stored_requests().await, 0);
    app.stop().await;
}
