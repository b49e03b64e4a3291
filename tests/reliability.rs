//! Things break; productions still finish. These tests cut the services'
//! connections to the broker and to PostgreSQL in the middle of a run.

mod support;

use std::process::Command;
use std::time::Duration;

use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{App, broker_connections, cta_example, spawn_app};

/// A request for a simulation nobody submitted before in this test.
fn fresh_request(zenith: u32) -> pb::SubmitRequestRequest {
    let mut request = cta_example();
    request.parameters_json = request
        .parameters_json
        .replace("\"zenith_deg\":20", &format!("\"zenith_deg\":{zenith}"));
    request
}

async fn run_to_completion(app: &App, request: pb::SubmitRequestRequest) -> String {
    let answer = app.submit(request).await.unwrap();
    let request = app.decided(&answer.request_id).await;
    assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
    let last = app.watch(&request.production_id).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let production_id = request.production_id;
    wait_for(
        "the production's files",
        Duration::from_secs(30),
        || async { (app.files(&production_id).await.len() == 8).then_some(()) },
    )
    .await
    .unwrap();
    production_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_reconnect_to_the_broker_and_finish_new_productions() {
    let app = spawn_app().await;
    run_to_completion(&app, fresh_request(20)).await;
    let before = broker_connections(&app.env.prefix);
    assert_eq!(before.len(), 5, "one connection per service: {before:?}");
    for pid in &before {
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: broker connection lost"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let after = wait_for("five new connections", Duration::from_secs(30), || async {
        let now = broker_connections(&app.env.prefix);
        (now.len() == 5 && now.iter().all(|pid| !before.contains(pid))).then_some(now)
    })
    .await
    .unwrap();
    assert_eq!(after.len(), 5);
    // Consumers, relays and publishers all came back.
    run_to_completion(&app, fresh_request(40)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_survive_losing_their_database_connections() {
    let app = spawn_app().await;
    run_to_completion(&app, fresh_request(20)).await;
    let admin = app.env.db().await.unwrap();
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        killed >= 5,
        "pooled and LISTEN connections were terminated: {killed}"
    );
    // Pools replace broken connections, relays re-LISTEN, and work goes on.
    run_to_completion(&app, fresh_request(40)).await;
    drop(admin);
    app.stop().await;
}

/// A fresh test database with the catalog's schema, for tests that drive
/// the catalog's store calls themselves.
async fn catalog_schema() -> (prodsys_testkit::TestEnv, prodsys_db::Db) {
    let env = prodsys_testkit::TestEnv::new().await.unwrap();
    let db = prodsys_db::Db::new(env.settings.database.url(), "catalog", 4).unwrap();
    db.migrate(prodsys_catalog::MIGRATIONS).await.unwrap();
    (env, db)
}

/// Plans `production`'s forwarding to one destination and catalogues
/// `files` of it, as the catalog's consumer does: each file gets a replica
/// due at once.
async fn catalogued_for_forwarding(
    db: &prodsys_db::Db,
    production: &str,
    files: &[(u32, pb::OutputFile)],
) {
    use prodsys_catalog::store;
    let mut client = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    store::lock_forwarding(&tx, &[production], &[production])
        .await
        .unwrap();
    store::plan_forwarding(&tx, production, &["storage".to_string()])
        .await
        .unwrap();
    let types = prodsys_catalog::domain::KeyTypes(Default::default(), Default::default());
    store::register_files(&tx, &types, files).await.unwrap();
    tx.commit().await.unwrap();
}

/// A production's end and its last job's outputs recorded by two catalog
/// transactions at once (two consumers, or one consumer's batches taken
/// side by side), with the progress sweep running between their commits:
/// the outputs' transaction finds no forwarding row to mark (the end, which
/// makes it, has not committed), and the sweep must not judge the
/// production from what it sees before the outputs commit, or nothing ever
/// marks it again and it is never announced forwarded.
#[tokio::test]
async fn a_production_ending_beside_its_last_outputs_is_still_announced_forwarded() {
    use prodsys_catalog::store;
    let (_env, db) = catalog_schema().await;
    let production = "CTA-000001";
    let completed = pb::ProductionCompleted {
        production_id: production.into(),
        state: pb::ProductionState::Completed as i32,
        counts: Some(pb::JobCounts {
            done: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (mut a, mut b) = (db.client().await.unwrap(), db.client().await.unwrap());
    // The end, as the consumer records it.
    let ending = a.transaction().await.unwrap();
    store::lock_forwarding(&ending, &[production], &[])
        .await
        .unwrap();
    store::record_completed(&ending, &completed, "COMPLETED", chrono::Utc::now())
        .await
        .unwrap();
    store::forwarding_changed(&ending, &[production])
        .await
        .unwrap();
    // The last job's outputs, beside it: no row to mark yet.
    let outputs = b.transaction().await.unwrap();
    store::lock_forwarding(&outputs, &[production], &[])
        .await
        .unwrap();
    store::record_job_outputs(&outputs, &[(production, 0)])
        .await
        .unwrap();
    store::forwarding_changed(&outputs, &[production])
        .await
        .unwrap();
    ending.commit().await.unwrap();
    let sweep = || async {
        let mut client = db.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let swept = store::sweep_forwarding(&tx, 100, false).await.unwrap();
        tx.commit().await.unwrap();
        swept
            .into_iter()
            .map(|p| (p.production_id, p.finished))
            .collect::<Vec<_>>()
    };
    // Judged now, it would look unfinished (its outputs are not committed).
    let between = sweep().await;
    assert!(between.iter().all(|(_, finished)| !finished), "{between:?}");
    outputs.commit().await.unwrap();
    assert_eq!(sweep().await, vec![(production.to_string(), true)]);
    assert_eq!(sweep().await, vec![], "announced once");
}

/// A copy's result recorded while the same claim is being renewed (the
/// forwarder renews its claims every third of their time to live, in a
/// transaction of its own): the result waits for the renewal's lock and is
/// then recorded. Were it dropped, the replica would stay `copying` under a
/// claim its own process keeps renewing, and never be copied again.
#[tokio::test]
async fn a_copy_recorded_while_its_claim_is_renewed_is_recorded() {
    use prodsys_catalog::store;
    let (env, db) = catalog_schema().await;
    let production = "CTA-000001";
    let lfn = "/vo.cta.in2p3.fr/MC/renewed/CTA-000001/f0.dat";
    let file = pb::OutputFile {
        lfn: lfn.into(),
        size: 4,
        adler32: "03d8018b".into(),
        url: "file:///nowhere/f0.dat".into(),
        production_id: production.into(),
        job_index: 0,
        ..Default::default()
    };
    catalogued_for_forwarding(&db, production, &[(1, file)]).await;
    let claimer = uuid::Uuid::new_v4();
    let claimed = store::claim_replicas(&db, claimer, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");

    // A renewal of the claim, holding the replica's row until it commits.
    let mut renewer = db.client().await.unwrap();
    let renewal = renewer.transaction().await.unwrap();
    let renewed = renewal
        .execute(
            "UPDATE replicas SET next_try_at = now() + interval '1 minute'
             WHERE claimed_by = $1 AND state = 'copying'",
            &[&claimer],
        )
        .await
        .unwrap();
    assert_eq!(renewed, 1);
    // The result, recorded meanwhile: it waits for the renewal's lock.
    let recording = tokio::spawn({
        let db = db.clone();
        let result = (
            claimed[0].clone(),
            store::CopyResult::Verified {
                url: "root://storage//f0.dat".into(),
            },
        );
        async move { store::record_copies(&db, claimer, &[result]).await }
    });
    let watcher = env.db().await.unwrap();
    prodsys_testkit::wait_for(
        "the recording to wait for the renewal's lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await
    .unwrap();
    renewal.commit().await.unwrap();
    assert_eq!(recording.await.unwrap().unwrap(), 1, "the result recorded");
    let state: String = watcher
        .query_one("SELECT state FROM catalog.replicas WHERE lfn = $1", &[&lfn])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "verified");
}

/// Recording a batch of copies while thousands of replicas are claimed, with
/// the statistics of a table where nothing was claimed yet (as after a
/// production's forwarding was planned): each result's replica is found by
/// its key. A plan that starts from the claimed replicas (expected one row,
/// found thousands) and compares each with every result took seconds a
/// batch and made the first rounds of a forwarding several times slower than
/// the copies themselves.
#[tokio::test]
async fn copies_are_recorded_by_key_however_many_replicas_are_claimed() {
    use prodsys_catalog::store;
    let (env, db) = catalog_schema().await;
    let production = "CTA-000001";
    const FILES: usize = 4_000;
    let files: Vec<(u32, pb::OutputFile)> = (0..FILES)
        .map(|i| {
            (
                1,
                pb::OutputFile {
                    lfn: format!("/vo.cta.in2p3.fr/MC/claimed/CTA-000001/f{i:05}.dat"),
                    size: 4,
                    adler32: "03d8018b".into(),
                    url: format!("file:///nowhere/f{i:05}.dat"),
                    production_id: production.into(),
                    job_index: i as u64,
                    ..Default::default()
                },
            )
        })
        .collect();
    catalogued_for_forwarding(&db, production, &files).await;
    // The statistics of the moment nothing was claimed.
    let admin = env.db().await.unwrap();
    admin
        .batch_execute("ANALYZE catalog.replicas")
        .await
        .unwrap();
    let claimer = uuid::Uuid::new_v4();
    let claimed = store::claim_replicas(&db, claimer, FILES as i64, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), FILES);

    // The statement as `record_copies` runs it, for a batch of 500.
    let batch = &claimed[..500];
    let lfns: Vec<&str> = batch.iter().map(|c| c.lfn.as_str()).collect();
    let destinations: Vec<&str> = batch.iter().map(|c| c.destination.as_str()).collect();
    let states = vec!["verified"; batch.len()];
    let urls: Vec<String> = batch
        .iter()
        .map(|c| format!("root://storage/{}", c.lfn))
        .collect();
    let reasons = vec![""; batch.len()];
    let retry_ms = vec![0f64; batch.len()];
    let claimers = vec![claimer; batch.len()];
    let mut client = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    prodsys_db::plan_by_key(&tx).await.unwrap();
    let plan: Vec<String> = tx
        .query(
            &format!("EXPLAIN (ANALYZE, COSTS OFF) {}", store::RECORD_COPIES),
            &[
                &lfns,
                &destinations,
                &states,
                &urls,
                &reasons,
                &retry_ms,
                &claimers,
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().await.unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using replicas_pkey on replicas"),
        "each replica found by its key:\n{plan}"
    );
    assert!(
        !plan.contains("Rows Removed by Join Filter"),
        "no result compared with replicas other than its own:\n{plan}"
    );

    // And through the store: every result of the batch recorded, the other
    // claims left as they were.
    let results: Vec<_> = batch
        .iter()
        .map(|c| {
            (
                c.clone(),
                store::CopyResult::Verified {
                    url: format!("root://storage/{}", c.lfn),
                },
            )
        })
        .collect();
    assert_eq!(
        store::record_copies(&db, claimer, &results).await.unwrap(),
        500
    );
    let counts: Vec<(String, i64)> = admin
        .query(
            "SELECT state, count(*) FROM catalog.replicas GROUP BY state ORDER BY state",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("copying".to_string(), (FILES - 500) as i64),
            ("verified".to_string(), 500)
        ]
    );
    // A result under a claim another process holds now is not recorded.
    let other = uuid::Uuid::new_v4();
    let stale = (
        claimed[600].clone(),
        store::CopyResult::Verified {
            url: "root://storage/stale".into(),
        },
    );
    admin
        .execute(
            "UPDATE catalog.replicas SET claimed_by = $1 WHERE lfn = $2",
            &[&other, &claimed[600].lfn],
        )
        .await
        .unwrap();
    assert_eq!(
        store::record_copies(&db, claimer, &[stale]).await.unwrap(),
        0
    );
    // And a claim is only ever held while copying.
    let refused = admin
        .execute(
            "UPDATE catalog.replicas SET state = 'failed' WHERE lfn = $1",
            &[&claimed[600].lfn],
        )
        .await;
    assert!(
        refused.is_err(),
        "a claimed replica left copying with its claim"
    );
}

/// Two status consumers projecting the same job at once, the newer
/// transition first: the older one, its statement begun while the newer
/// one's transaction holds the job's row, waits for it, is checked again
/// against the row's new version, and changes nothing. Were the order
/// checked only on what the older statement's snapshot saw (SUBMITTED), the
/// job would move back to RUNNING and be counted twice.
#[tokio::test]
async fn an_older_transition_waiting_for_a_newer_ones_row_changes_nothing() {
    use prodsys_core::JobState;
    use prodsys_status::domain::{JobTransition, Projection};
    use prodsys_status::store;
    let env = prodsys_testkit::TestEnv::new().await.unwrap();
    let db = prodsys_db::Db::new(env.settings.database.url(), "status", 4).unwrap();
    db.migrate(prodsys_status::MIGRATIONS).await.unwrap();
    let production = "CTA-000001";
    let batch = |dispatched: bool, state: JobState| {
        let mut projection = Projection::default();
        if dispatched {
            projection.dispatched(production.into(), 1, None, false);
        }
        projection.job(JobTransition {
            production_id: production.into(),
            job_index: 0,
            attempt: 1,
            state: Some(state),
            raw_status: format!("{state:?}"),
            installation: "local".into(),
        });
        projection.finish()
    };
    // A batch projected in a transaction of its own, as a consumer does.
    async fn project_alone(db: prodsys_db::Db, changes: prodsys_status::domain::Changes) {
        let mut client = db.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        prodsys_status::store::project(&tx, changes).await.unwrap();
        tx.commit().await.unwrap();
    }
    project_alone(db.clone(), batch(true, JobState::Submitted)).await;
    let mut newer_client = db.client().await.unwrap();
    let newer = newer_client.transaction().await.unwrap();
    store::project(&newer, batch(false, JobState::Done))
        .await
        .unwrap();
    let older = tokio::spawn(project_alone(db.clone(), batch(false, JobState::Running)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !older.is_finished(),
        "the older transition did not wait for the job's row"
    );
    newer.commit().await.unwrap();
    older.await.unwrap();
    let read = store::production(&db, production).await.unwrap().unwrap();
    assert_eq!(
        (read.counts.submitted, read.counts.running, read.counts.done),
        (0, 0, 1),
        "{:?}",
        read.counts
    );
    drop(newer_client);
    env.cleanup().await;
}

#[tokio::test]
async fn outbox_rows_a_relay_took_come_back_unless_it_commits_and_go_in_order() {
    let env = prodsys_testkit::TestEnv::new().await.unwrap();
    let db = prodsys_db::Db::new(env.settings.database.url(), "intake", 2).unwrap();
    db.migrate(prodsys::Service::Intake.migrations())
        .await
        .unwrap();
    let mut client = db.client().await.unwrap();
    let events: Vec<prodsys_db::OutboxEvent> = (0..5)
        .map(|i| prodsys_db::OutboxEvent {
            event_id: uuid::Uuid::new_v4(),
            event_type: "request.received".into(),
            subject: format!("S{i}"),
            payload: vec![i],
            reply_to: None,
            content_type: "application/protobuf".into(),
        })
        .collect();
    // Two transactions, so the rows' order is the order they committed in.
    for part in [&events[..3], &events[3..]] {
        let tx = client.transaction().await.unwrap();
        prodsys_db::enqueue(&tx, &db, part).await.unwrap();
        tx.commit().await.unwrap();
    }
    let subjects = |rows: &[prodsys_db::PendingEvent]| -> Vec<String> {
        rows.iter().map(|r| r.event.subject.clone()).collect()
    };
    let all: Vec<String> = (0..5).map(|i| format!("S{i}")).collect();
    // Taken by a relay whose publishing failed: rolled back, all there again.
    {
        let tx = client.transaction().await.unwrap();
        let taken = prodsys_db::take_pending(&tx, 3).await.unwrap();
        assert_eq!(subjects(&taken), all[..3], "the oldest first, in order");
        let commit: String = tx
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            commit, "off",
            "the relay's commit does not wait for the disk"
        );
        tx.rollback().await.unwrap();
    }
    let commit: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(commit, "on", "only the relay's own transaction");
    // Two relays at once take different rows.
    let mut other = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let first = prodsys_db::take_pending(&tx, 2).await.unwrap();
    let other_tx = other.transaction().await.unwrap();
    let second = prodsys_db::take_pending(&other_tx, 10).await.unwrap();
    assert_eq!(subjects(&first), all[..2]);
    assert_eq!(
        subjects(&second),
        all[2..],
        "rows another relay holds are skipped"
    );
    other_tx.commit().await.unwrap();
    tx.commit().await.unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "committed, every row taken is gone");
}

#[tokio::test]
async fn statements_planned_by_key_keep_one_plan_and_the_others_are_planned_each_time() {
    use prodsys_db::Cached;
    let env = prodsys_testkit::TestEnv::new().await.unwrap();
    let db = prodsys_db::Db::new(env.settings.database.url(), "status", 2).unwrap();
    db.migrate(prodsys_status::MIGRATIONS).await.unwrap();
    // A key-shaped statement, as the status service's upsert is: rows of a
    // batch found by their keys.
    const BY_KEY: &str = "SELECT count(*) FROM unnest($1::text[], $2::bigint[]) AS u(p, i)
                          JOIN jobs j ON j.production_id = u.p AND j.job_index = u.i";
    let mut client = db.client().await.unwrap();
    let ids = vec!["CTA-000001"; 3];
    let indexes: Vec<i64> = vec![0, 1, 2];
    {
        let tx = client.transaction().await.unwrap();
        prodsys_db::plan_by_key(&tx).await.unwrap();
        for _ in 0..6 {
            tx.query_cached(BY_KEY, &[&ids, &indexes]).await.unwrap();
        }
        prodsys_db::plan_freely(&tx).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        plans(&client, BY_KEY).await,
        (6, 0),
        "six executions by key reuse one generic plan, none planned again"
    );
    // Everywhere else each execution is planned for its values.
    for _ in 0..3 {
        client
            .query_cached(BY_KEY, &[&ids, &indexes])
            .await
            .unwrap();
    }
    assert_eq!(plans(&client, BY_KEY).await, (6, 3));
}

/// How often the connection's prepared `statement` ran on its generic plan
/// and how often it was planned for its values.
async fn plans(client: &prodsys_db::deadpool_postgres::Object, statement: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements
             WHERE statement = $1",
            &[&statement],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}
