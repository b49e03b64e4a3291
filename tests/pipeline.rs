//! A production's whole journey through the five services, and the ways a
//! request or an event can be wrong.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::json;
use support::{cta_example, cta_with, spawn_app, violated_fields};
use tonic_types::StatusExt;

/// adler32 written out here, independent of the code under test.
fn adler32(data: &[u8]) -> String {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    format!("{:08x}", (b << 16) | a)
}

fn counts_sum(p: &pb::Production) -> u64 {
    let c = p.counts.unwrap_or_default();
    c.created + c.submitted + c.queued + c.running + c.done + c.failed + c.cancelled + c.exhausted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cta_example_runs_to_completed_and_every_file_is_catalogued() {
    let app = spawn_app().await;
    let answer = app
        .submit(cta_example())
        .await
        .expect("submission accepted for checking");
    assert!(!answer.replayed);
    let request = app.decided(&answer.request_id).await;
    assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
    let production_id = request.production_id.clone();
    assert_eq!(production_id, "CTA-000001");

    let snapshots = app.watch(&production_id).await;
    let last = snapshots.last().expect("at least one snapshot");
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    // 4000 showers in jobs of 1000.
    assert_eq!(last.job_total, 4);
    assert_eq!(last.counts.unwrap().done, 4);
    for snapshot in &snapshots {
        if snapshot.job_total > 0 {
            assert_eq!(counts_sum(snapshot), snapshot.job_total, "{snapshot:?}");
        }
    }
    assert_eq!(last.request_id, answer.request_id);
    let estimate = last.estimate.expect("the production's resource estimate");
    // 60 s + 0.05 s per shower, per job of 1000 showers.
    assert!(
        (estimate.cpu_seconds_per_job - 110.0).abs() < 1e-9,
        "{estimate:?}"
    );
    assert_eq!(estimate.memory_mb, 2000);
    assert_eq!(last.vo, "vo.cta.in2p3.fr");

    // The catalog may lag the status service by an event; once it holds the
    // production's record, every file of it is registered.
    let mut catalog = app.catalog.clone();
    let record = wait_for(
        "the catalog's production record",
        Duration::from_secs(30),
        || {
            let mut catalog = catalog.clone();
            let production_id = production_id.clone();
            async move {
                catalog
                    .get_production_record(pb::GetProductionRecordRequest {
                        production_id,
                        ..Default::default()
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(record.state(), pb::ProductionState::Completed);
    let files = app.files(&production_id).await;
    // Two NSB levels per job.
    assert_eq!(files.len(), 8);
    assert_eq!(record.file_count, 8);
    assert_eq!(
        record.total_bytes,
        files.iter().map(|f| f.size).sum::<u64>()
    );
    let missing = catalog
        .get_production_record(pb::GetProductionRecordRequest {
            production_id: "CTA-999999".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut runs = BTreeSet::new();
    for file in &files {
        let path = file.url.strip_prefix("file://").expect("a local file URL");
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(file.size, bytes.len() as u64, "{}", file.lfn);
        assert_eq!(file.adler32, adler32(&bytes), "{}", file.lfn);
        assert!(
            file.size > 1000 * 64,
            "a run of 1000 showers: {}",
            file.size
        );
        assert!(
            file.lfn.starts_with(
                "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/CTA-000001/Data/000xxx/"
            ),
            "{}",
            file.lfn
        );
        assert_eq!(file.metadata["phiP"], "180");
        assert_eq!(file.metadata["thetaP"], "20");
        assert_eq!(file.metadata["site"], "LaPalma");
        assert_eq!(file.production_id, production_id);
        runs.insert(file.metadata["run_number"].clone());
    }
    assert_eq!(runs.len(), 4, "one run number per job: {runs:?}");
    let lfns: BTreeSet<&str> = files.iter().map(|f| f.lfn.as_str()).collect();
    assert_eq!(lfns.len(), 8);

    // Filtering by metadata finds the subset.
    let nsb_dark = app
        .catalog
        .clone()
        .find_files(pb::FindFilesRequest {
            production_id: production_id.clone(),
            metadata: [("run_number".to_string(), "2".to_string())].into(),
            page_size: 0,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nsb_dark.files.len(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_simulation_twice_is_one_production() {
    let app = spawn_app().await;
    let first = app.submit(cta_example()).await.unwrap();
    let first = app.decided(&first.request_id).await;
    assert_eq!(first.state(), pb::RequestState::Accepted);

    // The same physics written differently (20.0 for 20) is still the same.
    let mut again = cta_example();
    again.parameters_json = again
        .parameters_json
        .replace("\"zenith_deg\":20", "\"zenith_deg\":20.0");
    assert!(again.parameters_json.contains("20.0"));
    let second = app.submit(again).await.unwrap();
    let second = app.decided(&second.request_id).await;
    assert_eq!(second.state(), pb::RequestState::Rejected);
    assert_eq!(second.existing_production_id, first.production_id);
    assert!(
        second
            .violations
            .iter()
            .any(|v| v.description.contains(&first.production_id)),
        "{:?}",
        second.violations
    );

    // Asked for, the existing production is the answer instead of a refusal.
    let reuse = pb::SubmitRequestRequest {
        reuse_existing: true,
        ..cta_example()
    };
    let reused = app
        .decided(&app.submit(reuse).await.unwrap().request_id)
        .await;
    assert_eq!(reused.state(), pb::RequestState::Accepted, "{reused:?}");
    assert_eq!(reused.production_id, first.production_id);
    assert_eq!(reused.existing_production_id, first.production_id);

    // A repeated idempotency key answers with the first request.
    let mut keyed = cta_example();
    keyed.idempotency_key = "notebook-42".into();
    let a = app.submit(keyed.clone()).await.unwrap();
    let b = app.submit(keyed.clone()).await.unwrap();
    assert_eq!(a.request_id, b.request_id);
    assert!(!a.replayed && b.replayed);
    // ... and refuses a different request under the same key.
    keyed.parameters_json = keyed
        .parameters_json
        .replace("\"n_showers\":4000", "\"n_showers\":8000");
    let conflict = app.submit(keyed).await.unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);

    // Identical requests racing each other: exactly one production.
    let mut racing = cta_example();
    racing.parameters_json = racing
        .parameters_json
        .replace("\"zenith_deg\":20", "\"zenith_deg\":40");
    let submissions = (0..6).map(|_| app.submit(racing.clone()));
    let answers = futures::future::join_all(submissions).await;
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    for answer in answers {
        let request = app.decided(&answer.unwrap().request_id).await;
        match request.state() {
            pb::RequestState::Accepted => accepted.push(request.production_id),
            _ => rejected.push(request),
        }
    }
    assert_eq!(accepted.len(), 1, "accepted {accepted:?}");
    // Decided in one batch or several, each refusal names the production by its ID.
    for r in &rejected {
        assert_eq!(r.existing_production_id, accepted[0], "{r:?}");
        assert!(
            r.violations.iter().any(|v| v
                .description
                .contains(&format!("production {}", accepted[0]))),
            "{:?}",
            r.violations
        );
    }
    assert_eq!(
        accepted[0], "CTA-000002",
        "IDs are sequential and never reused"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_request_gets_a_violation_per_field_and_is_not_stored() {
    let app = spawn_app().await;
    let mut request = cta_example();
    let mut parameters: serde_json::Value = serde_json::from_str(&request.parameters_json).unwrap();
    let object = parameters.as_object_mut().unwrap();
    object.remove("site");
    object.insert("zenith_deg".into(), serde_json::json!("twenty"));
    object.insert("n_showers".into(), serde_json::json!(0));
    object.insert("energy_min_tev".into(), serde_json::json!(400));
    object.insert("colour".into(), serde_json::json!("blue"));
    request.parameters_json = parameters.to_string();
    let status = app.submit(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let details = status
        .get_details_bad_request()
        .expect("google.rpc.BadRequest details");
    let fields: BTreeSet<String> = details
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    for expected in [
        "parameters.site",
        "parameters.zenith_deg",
        "parameters.n_showers",
        "parameters.energy_min_tev",
        "parameters.colour",
    ] {
        assert!(fields.contains(expected), "{expected} not in {fields:?}");
    }

    let unknown = pb::SubmitRequestRequest {
        profile: "no-such-profile".into(),
        ..cta_example()
    };
    let status = app.submit(unknown).await.unwrap_err();
    let details = status.get_details_bad_request().unwrap();
    assert_eq!(details.field_violations[0].field, "profile");
    assert!(
        details.field_violations[0]
            .description
            .contains("cta-irf-mc")
    );

    let not_json = pb::SubmitRequestRequest {
        parameters_json: "{\"site\": ".into(),
        ..cta_example()
    };
    let status = app.submit(not_json).await.unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "parameters"
    );

    let stored = app.stored_requests().await;
    assert_eq!(stored, 0, "refused requests are not stored");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_the_consumer_goes_on() {
    let app = spawn_app().await;
    let (connection, channel) = app.env.amqp().await.unwrap();
    let events = format!("{}prodsys.events", app.env.prefix);
    let text = |s: &str| AMQPValue::LongString(s.into());

    // Valid CloudEvents attributes, a body that is not a RequestReceived.
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_id", "0192f2c4-0000-7000-8000-000000000001"),
        ("cloudEvents_type", "org.prodsys.request.received.v1"),
        ("cloudEvents_source", "/tests"),
        ("cloudEvents_specversion", "1.0"),
    ] {
        headers.insert(k.into(), text(v));
    }
    let properties = lapin::BasicProperties::default().with_headers(headers);
    channel
        .basic_publish(
            events.as_str().into(),
            "request.received".into(),
            BasicPublishOptions::default(),
            b"\xff\xfe garbage",
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // No CloudEvents attributes at all.
    channel
        .basic_publish(
            events.as_str().into(),
            "request.received".into(),
            BasicPublishOptions::default(),
            b"{}",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let mut reasons = Vec::new();
    for (reason, headers) in app.dead_letters("checker", 2).await {
        let key = headers
            .inner()
            .get("x-prodsys-original-routing-key")
            .cloned();
        assert_eq!(key, Some(text("request.received")));
        reasons.push(reason);
    }
    reasons.sort();
    assert!(
        reasons[0].contains("missing CloudEvents attribute \"id\""),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("payload does not decode"),
        "{reasons:?}"
    );

    // The checker still decides real requests.
    let answer = app.submit(cta_example()).await.unwrap();
    assert_eq!(
        app.decided(&answer.request_id).await.state(),
        pb::RequestState::Accepted
    );
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validation_is_a_dry_run_and_overlaps_need_the_extension_flag() {
    let app = spawn_app().await;
    let mut intake = app.intake.clone();

    // Before anything exists: acceptable, with a plan and an estimate, and nothing stored.
    let dry = intake
        .validate_request(cta_example())
        .await
        .unwrap()
        .into_inner();
    assert!(dry.acceptable, "{dry:?}");
    assert_eq!(dry.fingerprint.len(), 64);
    let plan = dry.plan.unwrap();
    assert_eq!(
        (plan.jobs, plan.units_per_job, plan.first_run, plan.last_run),
        (4, 1000, 1, 4)
    );
    let estimate = dry.estimate.unwrap();
    // 60 s + 0.05 s per shower, from the profile's resource model.
    assert!(
        (estimate.cpu_seconds_per_job - 110.0).abs() < 1e-9,
        "{estimate:?}"
    );
    assert!(
        (estimate.cpu_hours_total - 440.0 / 3600.0).abs() < 1e-9,
        "{estimate:?}"
    );
    let stored = app.stored_requests().await;
    assert_eq!(stored, 0);

    let first = app.submit(cta_example()).await.unwrap();
    let first = app.decided(&first.request_id).await;
    assert_eq!(first.state(), pb::RequestState::Accepted);

    // The same request now: a duplicate, named.
    let dry = intake
        .validate_request(cta_example())
        .await
        .unwrap()
        .into_inner();
    assert!(!dry.acceptable);
    assert_eq!(dry.existing_production_id, first.production_id);

    // More showers of the same simulation: an overlap, refused without the flag...
    let mut more = cta_example();
    more.parameters_json = more
        .parameters_json
        .replace("\"n_showers\":4000", "\"n_showers\":6000");
    let dry = intake
        .validate_request(more.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!dry.acceptable);
    assert_eq!(dry.overlaps.len(), 1);
    assert_eq!(dry.overlaps[0].production_id, first.production_id);
    assert!(
        dry.overlaps[0]
            .description
            .contains("n_showers 6000 (existing 4000)"),
        "{:?}",
        dry.overlaps
    );
    let refused = app
        .decided(&app.submit(more.clone()).await.unwrap().request_id)
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected);
    assert!(
        refused
            .violations
            .iter()
            .any(|v| v.field == "extend" && v.description.contains(&first.production_id))
    );

    // ... and accepted as an extension, with run numbers after the first production's.
    more.extend = true;
    let dry = intake
        .validate_request(more.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(dry.acceptable, "{dry:?}");
    let plan = dry.plan.unwrap();
    assert_eq!((plan.first_run, plan.last_run), (5, 10));
    let extension = app
        .decided(&app.submit(more).await.unwrap().request_id)
        .await;
    assert_eq!(
        extension.state(),
        pb::RequestState::Accepted,
        "{extension:?}"
    );
    let last = app.watch(&extension.production_id).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed);
    let files = wait_for("the extension's files", Duration::from_secs(30), || async {
        let files = app.files(&extension.production_id).await;
        (files.len() == 12).then_some(files)
    })
    .await
    .unwrap();
    let runs: BTreeSet<u64> = files
        .iter()
        .map(|f| f.metadata["run_number"].parse().unwrap())
        .collect();
    assert_eq!(runs, (5..=10).collect());

    // A disjoint energy range is a different simulation: no overlap, no flag needed.
    let mut higher = cta_example();
    higher.parameters_json = higher
        .parameters_json
        .replace("\"energy_min_tev\":0.003", "\"energy_min_tev\":330")
        .replace("\"energy_max_tev\":330", "\"energy_max_tev\":600");
    let dry = intake.validate_request(higher).await.unwrap().into_inner();
    assert!(dry.acceptable && dry.overlaps.is_empty(), "{dry:?}");
    assert_eq!(
        dry.plan.unwrap().first_run,
        11,
        "run numbers never collide within an identity"
    );
    app.stop().await;
}

/// A SubmitRequest whose parameters travel as raw bytes, to send what a
/// careless client could: bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawSubmit {
    #[prost(string, tag = "1")]
    profile: String,
    #[prost(string, tag = "2")]
    vo: String,
    #[prost(bytes = "vec", tag = "3")]
    parameters_json: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_huge_and_undecodable_requests_are_refused_by_field() {
    let app = spawn_app().await;
    let fields = |status: &tonic::Status| -> BTreeSet<String> {
        status
            .get_details_bad_request()
            .map(|d| d.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default()
    };

    let empty = app
        .submit(pb::SubmitRequestRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        fields(&empty),
        ["parameters", "profile", "vo"].map(String::from).into()
    );

    let huge = pb::SubmitRequestRequest {
        parameters_json: format!("{{\"x\":\"{}\"}}", "a".repeat(10 * 1024 * 1024)),
        ..cta_example()
    };
    let status = app.submit(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let details = status.get_details_bad_request().unwrap();
    assert_eq!(details.field_violations[0].field, "parameters");
    assert!(
        details.field_violations[0]
            .description
            .contains("more than the limit")
    );

    let addr = app.stack.addr(prodsys::Service::Intake).unwrap();
    let mut grpc = tonic::client::Grpc::new(support::channel(addr).await);
    grpc.ready().await.unwrap();
    let raw = RawSubmit {
        profile: "cta-irf-mc".into(),
        vo: "vo.cta.in2p3.fr".into(),
        parameters_json: vec![b'{', 0xff, 0xfe, b'}'],
    };
    let answer: Result<tonic::Response<pb::SubmitRequestResponse>, tonic::Status> = grpc
        .unary(
            tonic::Request::new(raw),
            http::uri::PathAndQuery::from_static("/prodsys.v1.RequestService/SubmitRequest"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let status = answer.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("parameters_json"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("UTF-8"), "{}", status.message());

    let stored = app.stored_requests().await;
    assert_eq!(stored, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nul_characters_are_field_violations_not_internal_errors() {
    let app = spawn_app().await;
    let keyed = pb::SubmitRequestRequest {
        idempotency_key: "key\0with-nul".into(),
        ..cta_example()
    };
    let status = app.submit(keyed).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["idempotency_key"]);

    let parameters = cta_with(|p| {
        p["observation_period"] = json!("2026\0winter");
    });
    let status = app.submit(parameters).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["parameters.observation_period"]);
    assert!(status.message().contains("NUL"), "{}", status.message());

    assert_eq!(app.stored_requests().await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_registered_from_elsewhere_count_as_existing() {
    let app = spawn_app().await;
    let mut catalog = app.catalog.clone();
    let metadata: std::collections::HashMap<String, String> = [
        ("array_layout", "Prod6-Hyperarray"),
        ("site", "LaPalma"),
        ("particle", "gamma"),
        ("phiP", "180"),
        ("thetaP", "20"),
        ("MCCampaign", "PROD6"),
        ("data_level", "DL0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let file = |n: u32| pb::OutputFile {
        class_id: 0,
        lfn: format!(
            "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/2021/Data/000xxx/run{n}.simtel.zst"
        ),
        size: 1000 + u64::from(n),
        adler32: "0a0b0c0d".into(),
        url: format!("root://eos.example.org//eos/cta/run{n}.simtel.zst"),
        metadata: metadata.clone(),
        production_id: String::new(),
        job_index: 0,
    };

    // Bad files are refused by field, good ones registered once.
    let bad = pb::OutputFile {
        adler32: "XYZ".into(),
        ..file(9)
    };
    let status = catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![file(1), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "files[1].adler32"
    );
    let added = catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![file(1), file(2)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.registered, 2);
    let again = catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![file(1)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.registered, 0);

    // Many identities in one call (how the checker asks for a batch): the
    // answers come in the order asked, and an empty one is refused by index.
    let other: std::collections::HashMap<String, String> =
        [("particle".to_string(), "proton".to_string())].into();
    let many = catalog
        .find_existing_many(pb::FindExistingManyRequest {
            queries: vec![
                pb::FindExistingRequest {
                    metadata: other.clone(),
                    ..Default::default()
                },
                pb::FindExistingRequest {
                    metadata: metadata.clone(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(many.len(), 2);
    assert_eq!(many[0].file_count, 0);
    assert_eq!(many[1].file_count, 2);
    assert_eq!(many[1].total_bytes, 1001 + 1002);
    assert_eq!(many[1].production_ids, vec![String::new()]);
    assert_eq!(many[1].example_lfns, vec![file(1).lfn, file(2).lfn]);
    let status = catalog
        .find_existing_many(pb::FindExistingManyRequest {
            queries: vec![
                pb::FindExistingRequest {
                    metadata: other,
                    ..Default::default()
                },
                pb::FindExistingRequest::default(),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "queries[1].metadata"
    );

    let dry = app
        .intake
        .clone()
        .validate_request(cta_example())
        .await
        .unwrap()
        .into_inner();
    assert!(!dry.acceptable);
    let reason = &dry.violations[0].description;
    assert!(
        reason.contains("already exist in the catalog: 2 file(s)"),
        "{reason}"
    );
    assert!(reason.contains("registered from elsewhere"), "{reason}");
    let refused = app
        .decided(&app.submit(cta_example()).await.unwrap().request_id)
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected);

    // Asked for explicitly, more of the same simulation is fine.
    let extended = pb::SubmitRequestRequest {
        extend: true,
        ..cta_example()
    };
    let accepted = app
        .decided(&app.submit(extended).await.unwrap().request_id)
        .await;
    assert_eq!(accepted.state(), pb::RequestState::Accepted, "{accepted:?}");
    app.stop().await;
}

/// Publishes `message` on the events exchange as a service would: CloudEvents
/// headers with `id`, persistent, confirmed.
async fn publish_event(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    id: uuid::Uuid,
    message: &impl prost::Message,
) {
    let event = prodsys_messaging::CloudEvent {
        id: id.to_string(),
        event_type: format!("org.prodsys.{routing_key}.v1"),
        source: "/tests".into(),
        specversion: "1.0".into(),
        time: None,
        subject: None,
    };
    let properties = lapin::BasicProperties::default()
        .with_headers(event.to_headers())
        .with_delivery_mode(2);
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            &message.encode_to_vec(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_read_model_ignores_late_and_repeated_transitions() {
    let app = spawn_app().await;
    let (_connection, channel) = app.env.amqp().await.unwrap();
    let events = format!("{}prodsys.events", app.env.prefix);
    let production_id = "TEST-000077".to_string();
    publish_event(
        &channel,
        &events,
        "production.dispatched",
        uuid::Uuid::now_v7(),
        &pb::ProductionDispatched {
            production_id: production_id.clone(),
            job_total: 3,
            backend: "local".into(),
            estimate: None,
            ..Default::default()
        },
    )
    .await;
    let transition = |job_index: u64, attempt: u32, state: pb::JobState| pb::JobTransition {
        production_id: production_id.clone(),
        job_index,
        attempt,
        state: state as i32,
        raw_status: format!("{state:?}"),
        at_unix_ms: 0,
        ..Default::default()
    };
    use pb::JobState::{Done, Failed, Running, Submitted};
    // In separate messages (separate batches or not): job 0 runs, then a late
    // SUBMITTED for it arrives; job 1 finishes; job 0's first attempt fails
    // and its second finishes; a late RUNNING of attempt 1 arrives after.
    let batches = [
        vec![transition(0, 1, Running)],
        vec![transition(0, 1, Submitted), transition(1, 1, Done)],
        vec![transition(0, 1, Failed)],
        vec![transition(0, 2, Done)],
        vec![transition(0, 1, Running)],
    ];
    let repeated = uuid::Uuid::now_v7();
    for (i, transitions) in batches.into_iter().enumerate() {
        let id = if i == 1 {
            repeated
        } else {
            uuid::Uuid::now_v7()
        };
        let batch = pb::JobStatusBatch { transitions };
        publish_event(&channel, &events, "job.status", id, &batch).await;
    }
    // A redelivered message (same CloudEvents id) takes no second effect,
    // even though job 2 is in it now.
    publish_event(
        &channel,
        &events,
        "job.status",
        repeated,
        &pb::JobStatusBatch {
            transitions: vec![transition(2, 1, Running)],
        },
    )
    .await;
    let first = app
        .production_when(
            "jobs 0 and 1 done",
            Duration::from_secs(30),
            &production_id,
            |p| p.counts.is_some_and(|c| c.done == 2),
        )
        .await;
    // Give a wrongly applied late event the time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = app
        .production(&production_id)
        .await
        .unwrap()
        .counts
        .unwrap();
    assert_eq!(first.job_total, 3);
    assert_eq!(
        (c.created, c.submitted, c.running, c.failed, c.done),
        (1, 0, 0, 0, 2),
        "{c:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_projection_of_overlapping_transitions_converges() {
    let app = spawn_app().await;
    let (_connection, channel) = app.env.amqp().await.unwrap();
    let events = format!("{}prodsys.events", app.env.prefix);
    let production_id = "TEST-000088".to_string();
    let jobs = 300u64;
    publish_event(
        &channel,
        &events,
        "production.dispatched",
        uuid::Uuid::now_v7(),
        &pb::ProductionDispatched {
            production_id: production_id.clone(),
            job_total: jobs,
            backend: "local".into(),
            estimate: None,
            ..Default::default()
        },
    )
    .await;
    // Every job goes SUBMITTED → RUNNING → DONE, in messages of overlapping
    // ranges published newest state first, so the consumers see them late,
    // early and at once.
    use pb::JobState::{Done, Running, Submitted};
    let mut messages = Vec::new();
    for state in [Done, Running, Submitted] {
        for start in (0..jobs).step_by(50) {
            let transitions = (start..(start + 100).min(jobs))
                .map(|job_index| pb::JobTransition {
                    production_id: production_id.clone(),
                    job_index,
                    attempt: 1,
                    state: state as i32,
                    raw_status: format!("{state:?}"),
                    at_unix_ms: 0,
                    ..Default::default()
                })
                .collect();
            messages.push(pb::JobStatusBatch { transitions });
        }
    }
    for batch in &messages {
        publish_event(&channel, &events, "job.status", uuid::Uuid::now_v7(), batch).await;
    }
    let counts = app
        .production_when(
            "every job done",
            Duration::from_secs(30),
            &production_id,
            |p| p.counts.is_some_and(|c| c.done == jobs),
        )
        .await
        .counts;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = app
        .production(&production_id)
        .await
        .unwrap()
        .counts
        .unwrap();
    assert_eq!(Some(c), counts);
    assert_eq!(
        (c.created, c.submitted, c.running, c.done),
        (0, 0, 0, jobs),
        "{c:?}"
    );
    app.stop().await;
}

/// A catalog from before `FindExistingMany`: it answers `FindExisting` only,
/// saying outputs of every identity were registered from elsewhere.
struct OlderCatalog;

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for OlderCatalog {
    async fn find_files(
        &self,
        _: tonic::Request<pb::FindFilesRequest>,
    ) -> Result<tonic::Response<pb::FindFilesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("FindFiles"))
    }

    type StreamFilesStream = tokio_stream::Empty<Result<pb::FindFilesResponse, tonic::Status>>;

    async fn stream_files(
        &self,
        _: tonic::Request<pb::FindFilesRequest>,
    ) -> Result<tonic::Response<Self::StreamFilesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("StreamFiles"))
    }

    async fn find_existing(
        &self,
        _: tonic::Request<pb::FindExistingRequest>,
    ) -> Result<tonic::Response<pb::FindExistingResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::FindExistingResponse {
            file_count: 3,
            total_bytes: 3000,
            production_ids: vec![String::new()],
            example_lfns: vec!["/vo.cta.in2p3.fr/MC/elsewhere/run1.simtel".into()],
            ..Default::default()
        }))
    }

    async fn find_existing_many(
        &self,
        _: tonic::Request<pb::FindExistingManyRequest>,
    ) -> Result<tonic::Response<pb::FindExistingManyResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("FindExistingMany"))
    }

    async fn get_production_record(
        &self,
        _: tonic::Request<pb::GetProductionRecordRequest>,
    ) -> Result<tonic::Response<pb::ProductionRecord>, tonic::Status> {
        Err(tonic::Status::unimplemented("GetProductionRecord"))
    }

    async fn register_files(
        &self,
        _: tonic::Request<pb::RegisterFilesRequest>,
    ) -> Result<tonic::Response<pb::RegisterFilesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("RegisterFiles"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checker_newer_than_its_catalog_asks_one_request_at_a_time() {
    use prodsys::Service;
    // Services upgraded in any order: the checker meets a catalog without
    // FindExistingMany and still refuses what the catalog already holds.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let catalog_addr = listener.local_addr().unwrap();
    let older = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::catalog_service_server::CatalogServiceServer::new(
                OlderCatalog,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    prodsys_telemetry::init("warn");
    let mut env = prodsys_testkit::TestEnv::new().await.unwrap();
    env.settings.checker.catalog_url = format!("http://{catalog_addr}");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stack = prodsys::start(
        &[Service::Intake, Service::Checker],
        &env.settings,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut intake = pb::request_service_client::RequestServiceClient::new(
        support::channel(stack.addr(Service::Intake).unwrap()).await,
    );
    let submitted = intake
        .submit_request(cta_example())
        .await
        .unwrap()
        .into_inner();
    let decided = support::decided(&intake, &submitted.request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Rejected, "{decided:?}");
    let reason = &decided.violations[0].description;
    assert!(
        reason.contains(
            "already exist in the catalog: 3 file(s), 3000 bytes (registered from elsewhere)"
        ),
        "{reason}"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), stack.wait()).await;
    older.abort();
    env.cleanup().await;
}
