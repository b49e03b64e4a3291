//! Production IDs: one sequence per ID prefix (a profile open to several VOs
//! never issues an ID twice, also across the upgrade from per-VO sequences),
//! and the checker's decisions serialised per prefix, not globally.

mod support;

use std::time::Duration;

use prodsys::Service;
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use support::{sleep_request, spawn_app_with, spawn_services, use_test_profiles};

fn from_vo(vo: &str, tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        vo: vo.into(),
        ..sleep_request(1, 0.0, -1, tag, "")
    }
}

fn count_request(tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-count".into(),
        parameters_json: serde_json::json!({ "jobs": 1, "per_job": 1, "seconds": 0, "tag": tag })
            .to_string(),
        ..sleep_request(1, 0.0, -1, tag, "")
    }
}

#[tokio::test]
async fn a_profile_open_to_several_vos_never_issues_one_id_twice() {
    let app = spawn_app_with(use_test_profiles).await;
    let first = app.accepted(from_vo("vo-a", "ids-a")).await;
    let second = app.accepted(from_vo("vo-b", "ids-b")).await;
    let third = app.accepted(from_vo("vo-a", "ids-c")).await;
    assert_eq!(first, "TEST-000001");
    assert_eq!(second, "TEST-000002");
    assert_eq!(third, "TEST-000003");
    app.stop().await;
}

#[tokio::test]
async fn ids_continue_past_every_one_issued_before_sequences_were_per_prefix() {
    let mut env = TestEnv::new().await.unwrap();
    use_test_profiles(&mut env);
    // A checker schema as the per-VO sequences left it: vo-a took TEST
    // numbers 1 to 3, vo-b one CTA number (its counter at 1).
    let db = Db::new(env.settings.database.url(), "checker", 2).unwrap();
    let before_prefixes = &prodsys_checker::MIGRATIONS[..3];
    assert!(before_prefixes.iter().all(|m| m.version().unwrap() < 50));
    db.migrate(before_prefixes).await.unwrap();
    env.db()
        .await
        .unwrap()
        .batch_execute(
            "SET search_path TO checker;
             INSERT INTO id_sequences VALUES ('vo-a', 3), ('vo-b', 1);
             INSERT INTO productions (production_id, fingerprint, request_id, profile, vo,
                                      parameters, backend, run_number_offset)
             SELECT id, 'fp-' || id, gen_random_uuid(), profile, vo, '{}', 'local', 0
             FROM (VALUES ('TEST-000001', 'test-sleep', 'vo-a'), ('TEST-000002', 'test-sleep', 'vo-a'),
                          ('TEST-000003', 'test-sleep', 'vo-a'),
                          ('CTA-000001', 'cta-irf-mc', 'vo-b')) v (id, profile, vo);",
        )
        .await
        .unwrap();
    let app = spawn_services(env, &Service::ALL).await;
    // vo-b's counter said 1: it would have been given TEST-000002 again.
    assert_eq!(
        app.accepted(from_vo("vo-b", "upgrade-b")).await,
        "TEST-000004"
    );
    assert_eq!(
        app.accepted(from_vo("vo-a", "upgrade-a")).await,
        "TEST-000005"
    );
    assert_eq!(
        app.accepted(count_request("upgrade-count")).await,
        "COUNT-000001"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_held_prefix_does_not_hold_the_decisions_of_another() {
    let app = spawn_app_with(use_test_profiles).await;
    let mut client = app.env.db().await.unwrap();
    let holder = client.transaction().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&prodsys_checker::decide_lock_key("TEST")],
        )
        .await
        .unwrap();
    // Decisions for another prefix go on while TEST's are held.
    let count = app.accepted(count_request("held-count")).await;
    assert!(count.starts_with("COUNT-"), "{count}");
    // A TEST request waits for the lock ...
    let request_id = app
        .submit(sleep_request(1, 0.0, -1, "held-test", ""))
        .await
        .unwrap()
        .request_id;
    let probe = app.env.db().await.unwrap();
    wait_for(
        "the checker waiting for the TEST prefix",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                     WHERE l.locktype = 'advisory' AND NOT l.granted
                       AND d.datname = current_database()",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await
    .unwrap();
    let waiting = app
        .intake
        .clone()
        .get_request(pb::GetRequestRequest {
            request_id: request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.state(), pb::RequestState::Received);
    // ... and is decided once it is released.
    holder.commit().await.unwrap();
    let decided = app.decided(&request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Accepted, "{decided:?}");
    assert!(decided.production_id.starts_with("TEST-"));
    app.stop().await;
}
