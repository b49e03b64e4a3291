//! Bounded work: a request over the job limit is refused at submit time;
//! large productions are planned in chunks that a cancel interrupts; a cancel
//! that arrives before its production is remembered; cancelling many queued
//! jobs is quick and status counts every job.

mod support;

use std::time::{Duration, Instant};

use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{cta_example, sleep_request, spawn_app, spawn_app_with, use_test_profiles};

/// Rows the dispatcher holds for the production's jobs.
async fn job_rows(db: &tokio_postgres::Client, production_id: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1",
        &[&production_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// The dispatcher's planned_jobs counter of the production, if it has it.
async fn planned(db: &tokio_postgres::Client, production_id: &str) -> Option<i64> {
    db.query_opt(
        "SELECT planned_jobs FROM dispatcher.productions WHERE production_id = $1",
        &[&production_id],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

fn sum(c: &pb::JobCounts) -> u64 {
    c.created + c.submitted + c.queued + c.running + c.done + c.failed + c.cancelled + c.exhausted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_over_the_profiles_job_limit_is_refused_naming_the_limit() {
    let app = spawn_app().await;
    let mut request = cta_example();
    let mut parameters: serde_json::Value = serde_json::from_str(&request.parameters_json).unwrap();
    parameters["n_showers"] = 100_000_000_000u64.into();
    parameters["showers_per_job"] = 1.into();
    request.parameters_json = parameters.to_string();
    let expected = "gives 100000000000 jobs, more than the 1000000 this profile allows (max_jobs)";

    let validation = app
        .intake
        .clone()
        .validate_request(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!validation.acceptable, "{validation:?}");
    assert_eq!(validation.plan.unwrap().jobs, 100_000_000_000);
    assert!(
        validation
            .violations
            .iter()
            .any(|v| v.field == "parameters.n_showers" && v.description == expected),
        "{:?}",
        validation.violations
    );

    let refused = app
        .decided(&app.submit(request).await.unwrap().request_id)
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    assert!(refused.production_id.is_empty());
    assert!(
        refused
            .violations
            .iter()
            .any(|v| v.field == "parameters.n_showers" && v.description == expected),
        "{:?}",
        refused.violations
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_production_cancelled_while_planning_stops_planning_and_ends_cancelled() {
    const TOTAL: u64 = 2_000_000;
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_jobs_per_production = 5_000_000;
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let db = app.env.db().await.unwrap();
    let production = app
        .accepted(sleep_request(TOTAL, 600.0, -1, "huge", ""))
        .await;
    // Planning has begun and the first jobs run before the last are planned.
    let started = wait_for("planning to begin", Duration::from_secs(60), || async {
        planned(&db, &production)
            .await
            .filter(|n| *n > 0)
            .map(|_| Instant::now())
    })
    .await
    .unwrap();
    let first = wait_for(
        "some jobs planned and the first running",
        Duration::from_secs(60),
        || async {
            let n = planned(&db, &production).await?;
            let running = app.production(&production).await?.counts?.running;
            (n >= 100_000 && running > 0).then_some(n)
        },
    )
    .await
    .unwrap();
    let rate = first as f64 / started.elapsed().as_secs_f64();
    eprintln!("planned {first} jobs at about {rate:.0} jobs/s before the cancel");
    assert!(
        (first as u64) < TOTAL,
        "planning finished before the cancel: choose a larger production"
    );

    let asked = Instant::now();
    assert!(app.cancel(&production, "too big").await.unwrap().accepted);
    let last = app
        .production_when(
            "the production to end CANCELLED",
            Duration::from_secs(60),
            &production,
            |p| p.state() == pb::ProductionState::Cancelled,
        )
        .await;
    eprintln!("cancelled during planning in {:?}", asked.elapsed());
    let counts = last.counts.unwrap();
    assert_eq!(last.job_total, TOTAL);
    assert_eq!(counts.cancelled, TOTAL, "{counts:?}");
    assert_eq!(sum(&counts), TOTAL, "{counts:?}");

    // Planning stopped: the rows no longer grow, and not every job was created.
    let rows = job_rows(&db, &production).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = job_rows(&db, &production).await;
    assert_eq!(rows, again, "jobs were still being created after CANCELLED");
    assert!(
        (rows as u64) < TOTAL,
        "{rows} rows: planning was not stopped"
    );
    let unfinished: i64 = db
        .query_one(
            "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1 AND state <> 'CANCELLED'",
            &[&production],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_that_arrives_before_its_production_is_applied_when_it_arrives() {
    use lapin::options::BasicPublishOptions;
    use prodsys::Service;
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let db = app.env.db().await.unwrap();
    // The dispatcher is down while the production is accepted.
    let others: Vec<Service> = Service::ALL
        .into_iter()
        .filter(|s| *s != Service::Dispatcher)
        .collect();
    let app = app.restart_only(&others).await;
    let production = app
        .accepted(sleep_request(3, 30.0, -1, "reordered", ""))
        .await;
    // Its request.accepted is held back (as a requeue after a failure would)
    // while the cancel, asked for afterwards, reaches the dispatcher first.
    let (connection, channel) = app.env.amqp().await.unwrap();
    let queue = format!("{}prodsys.dispatcher", app.env.prefix);
    let held = support::next_message(
        &channel,
        &queue,
        "the request.accepted event",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(held.delivery.routing_key.as_str(), "request.accepted");
    assert!(
        app.cancel(&production, "wrong site")
            .await
            .unwrap()
            .accepted
    );
    let dispatcher_stop = tokio_util::sync::CancellationToken::new();
    let dispatcher = prodsys::start(
        &[Service::Dispatcher],
        &app.env.settings,
        dispatcher_stop.clone(),
    )
    .await
    .unwrap();
    cancel_remembered(&db, &production).await;
    channel
        .basic_publish(
            format!("{}prodsys.events", app.env.prefix).as_str().into(),
            "request.accepted".into(),
            BasicPublishOptions::default(),
            &held.delivery.data,
            held.delivery.properties.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    let counts = last.counts.unwrap();
    assert_eq!((counts.cancelled, sum(&counts)), (3, 3), "{counts:?}");
    assert!(
        !app.env
            .settings
            .dispatcher
            .work_dir
            .join(&production)
            .exists(),
        "no job of a cancelled production runs"
    );
    let remembered: i64 = db
        .query_one("SELECT count(*) FROM dispatcher.pending_cancels", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remembered, 0, "an applied cancel is forgotten");
    dispatcher_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), dispatcher.wait()).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_of_an_id_not_given_yet_does_not_cancel_the_production_that_gets_it() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let db = app.env.db().await.unwrap();
    // Production IDs are numbered in order: the next one is known.
    let first = app.accepted(sleep_request(1, 0.0, -1, "first", "")).await;
    let (prefix, number) = first.split_once('-').unwrap();
    let next = format!("{prefix}-{:06}", number.parse::<u64>().unwrap() + 1);
    // A mistyped ID that no production has yet: remembered, in case its
    // production is only late ...
    assert!(app.cancel(&next, "typo").await.unwrap().accepted);
    cancel_remembered(&db, &next).await;
    // ... but the production accepted afterwards under that ID runs.
    let production = app.accepted(sleep_request(2, 0.0, -1, "second", "")).await;
    assert_eq!(production, next);
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let remembered: i64 = db
        .query_one("SELECT count(*) FROM dispatcher.pending_cancels", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remembered, 0, "the stale cancel is forgotten");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remembered_cancel_whose_production_never_comes_is_forgotten_after_its_time_to_live() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.pending_cancel_ttl_s = 2;
    })
    .await;
    let db = app.env.db().await.unwrap();
    let never = "CTA-987654";
    assert!(
        app.cancel(never, "no such production")
            .await
            .unwrap()
            .accepted
    );
    cancel_remembered(&db, never).await;
    let remembered_at = Instant::now();
    wait_for(
        "the dispatcher to forget the cancel",
        Duration::from_secs(30),
        || async {
            db.query_opt(
                "SELECT 1 FROM dispatcher.pending_cancels WHERE production_id = $1",
                &[&never],
            )
            .await
            .unwrap()
            .is_none()
            .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        remembered_at.elapsed() >= Duration::from_millis(500),
        "kept until its time to live passed, not dropped at once"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_while_the_dispatcher_is_down_is_applied_when_it_starts() {
    use prodsys::Service;
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let others: Vec<Service> = Service::ALL
        .into_iter()
        .filter(|s| *s != Service::Dispatcher)
        .collect();
    let app = app.restart_only(&others).await;
    let production = app
        .accepted(sleep_request(4, 30.0, -1, "while-down", ""))
        .await;
    assert!(
        app.cancel(&production, "while down")
            .await
            .unwrap()
            .accepted
    );

    let dispatcher_stop = tokio_util::sync::CancellationToken::new();
    let dispatcher = prodsys::start(
        &[Service::Dispatcher],
        &app.env.settings,
        dispatcher_stop.clone(),
    )
    .await
    .unwrap();
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    let counts = last.counts.unwrap();
    assert_eq!((counts.cancelled, sum(&counts)), (4, 4), "{counts:?}");
    assert!(
        !app.env
            .settings
            .dispatcher
            .work_dir
            .join(&production)
            .exists(),
        "no job of a cancelled production runs"
    );
    dispatcher_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), dispatcher.wait()).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_two_hundred_thousand_queued_jobs_takes_seconds_and_counts_every_job() {
    const TOTAL: u64 = 200_000;
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let db = app.env.db().await.unwrap();
    let accepted = Instant::now();
    let production = app
        .accepted(sleep_request(TOTAL, 600.0, -1, "queued", ""))
        .await;
    wait_for("every job planned", Duration::from_secs(120), || async {
        planned(&db, &production)
            .await
            .filter(|n| *n as u64 == TOTAL)
    })
    .await
    .unwrap();
    eprintln!(
        "planned {TOTAL} jobs in {:?} from submit",
        accepted.elapsed()
    );
    app.production_when(
        "two jobs running, the rest queued",
        Duration::from_secs(60),
        &production,
        |p| p.counts.unwrap_or_default().running == 2,
    )
    .await;

    let asked = Instant::now();
    assert!(
        app.cancel(&production, "wrong site")
            .await
            .unwrap()
            .accepted
    );
    let last = app
        .production_when(
            "every job CANCELLED",
            Duration::from_secs(60),
            &production,
            |p| {
                p.state() == pb::ProductionState::Cancelled
                    && p.counts.unwrap_or_default().cancelled == TOTAL
            },
        )
        .await;
    let took = asked.elapsed();
    eprintln!("cancelled {TOTAL} queued jobs in {took:?}");
    let counts = last.counts.unwrap();
    assert_eq!(sum(&counts), TOTAL, "{counts:?}");
    assert!(took < Duration::from_secs(15), "cancel took {took:?}");
    let unfinished: i64 = db
        .query_one(
            "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1 AND state <> 'CANCELLED'",
            &[&production],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);
    app.stop().await;
}

/// Waits until the dispatcher has stored a cancel of `production_id` that
/// arrived before the production.
async fn cancel_remembered(db: &tokio_postgres::Client, production_id: &str) {
    wait_for(
        "the dispatcher to remember the cancel",
        Duration::from_secs(30),
        || async {
            db.query_opt(
                "SELECT 1 FROM dispatcher.pending_cancels WHERE production_id = $1",
                &[&production_id],
            )
            .await
            .unwrap()
            .map(|_| ())
        },
    )
    .await
    .unwrap();
}
