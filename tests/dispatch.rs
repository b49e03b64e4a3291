//! Jobs on the way to their end: retries, exhaustion, cancellation,
//! backpressure, and choosing the WMS installation.

mod support;

use std::time::{Duration, Instant};

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{cta_example, sleep_request, spawn_app_with, use_test_profiles};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_attempts_are_retried_up_to_the_limit_then_exhausted() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 4;
    })
    .await;

    // Job 1 always fails: two attempts (the profile's limit), then EXHAUSTED.
    let partial = app.accepted(sleep_request(3, 0.0, 1, "partial", "")).await;
    let last = app.watch(&partial).await.pop().unwrap();
    assert_eq!(
        last.state(),
        pb::ProductionState::PartiallyCompleted,
        "{last:?}"
    );
    let counts = last.counts.unwrap();
    assert_eq!(
        (counts.done, counts.exhausted, counts.failed),
        (2, 1, 0),
        "{counts:?}"
    );
    let db = app.env.db().await.unwrap();
    let row = db
        .query_one(
            "SELECT attempt, state, raw_status FROM dispatcher.jobs WHERE production_id = $1 AND job_index = 1",
            &[&partial],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, &str>(1), "EXHAUSTED");
    assert_eq!(row.get::<_, &str>(2), "exited 1");
    // Each attempt had its own working directory.
    let attempts = std::fs::read_dir(app.env.settings.dispatcher.work_dir.join(&partial))
        .unwrap()
        .count();
    assert_eq!(attempts, 4, "3 first attempts and 1 retry");

    // Every job failing: FAILED.
    let failed = app.accepted(sleep_request(1, 0.0, 0, "failed", "")).await;
    let last = app.watch(&failed).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Failed);
    assert_eq!(last.counts.unwrap().exhausted, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_kills_running_jobs_and_never_starts_the_rest() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    // An odd duration, to find the job's own processes afterwards.
    let production = app
        .accepted(sleep_request(5, 61.737, -1, "cancel", ""))
        .await;
    let running = app
        .production_when(
            "two running jobs",
            Duration::from_secs(30),
            &production,
            |p| p.counts.unwrap_or_default().running == 2,
        )
        .await
        .counts
        .unwrap_or_default();
    // Backpressure: the installation runs two at once; the others wait.
    assert_eq!(running.created, 3, "{running:?}");

    let started = std::time::Instant::now();
    let answer = app.cancel(&production, "wrong energy range").await.unwrap();
    assert!(answer.accepted);
    let snapshots = app.watch(&production).await;
    let last = snapshots.last().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    assert_eq!(last.counts.unwrap().cancelled, 5);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "jobs were killed, not waited for"
    );
    for s in &snapshots {
        assert!(s.counts.unwrap_or_default().running <= 2, "{s:?}");
    }
    // Nothing the jobs started survives them.
    wait_for(
        "the jobs' processes to end",
        Duration::from_secs(10),
        || async {
            let out = std::process::Command::new("pgrep")
                .args(["-f", "sleep 61.737"])
                .output()
                .ok()?;
            out.stdout.is_empty().then_some(())
        },
    )
    .await
    .unwrap();
    let bad = app.cancel("not an id", "").await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_installation_is_refused_by_name() {
    let app = spawn_app_with(|_| {}).await;
    let request = pb::SubmitRequestRequest {
        backend: "dirac-nowhere".into(),
        ..cta_example()
    };
    let refused = app
        .decided(&app.submit(request).await.unwrap().request_id)
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected);
    let violation = &refused.violations[0];
    assert_eq!(violation.field, "backend");
    assert!(
        violation.description.contains("dirac-nowhere") && violation.description.contains("local")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_productions_start_in_order_of_priority() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 1;
    })
    .await;
    // The installation's one slot is taken ...
    let blocker = app.accepted(sleep_request(1, 2.0, -1, "blocker", "")).await;
    app.production_when(
        "the blocker to run",
        Duration::from_secs(30),
        &blocker,
        |p| p.counts.unwrap_or_default().running == 1,
    )
    .await;
    // ... while an older production of default priority and a newer urgent one wait.
    let ordinary = app
        .accepted(sleep_request(1, 2.0, -1, "ordinary", ""))
        .await;
    let urgent = app
        .accepted(pb::SubmitRequestRequest {
            priority: 10,
            ..sleep_request(1, 2.0, -1, "urgent", "")
        })
        .await;
    app.production_when(
        "the urgent production to start",
        Duration::from_secs(30),
        &urgent,
        |p| {
            let c = p.counts.unwrap_or_default();
            c.running + c.done == 1
        },
    )
    .await;
    let waiting = app.production(&ordinary).await.unwrap().counts.unwrap();
    assert_eq!(
        waiting.created, 1,
        "the older, ordinary one still waits: {waiting:?}"
    );
    for production in [&blocker, &urgent, &ordinary] {
        let last = app.watch(production).await.pop().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    }

    // A priority out of range is refused by name.
    let bad = app
        .submit(pb::SubmitRequestRequest {
            priority: 5000,
            ..sleep_request(1, 0.1, -1, "bad", "")
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&bad).unwrap();
    assert!(
        details
            .field_violations
            .iter()
            .any(|v| v.field == "priority"),
        "{details:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_installation_holds_its_productions_and_says_why() {
    // A DIRAC installation whose server does not answer (nothing listens on
    // port 1), beside the local one.
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.poll_interval_ms = 200;
        env.settings.dispatcher.backends.insert(
            "dirac-down".into(),
            prodsys_config::BackendSettings::Dirac(prodsys_config::DiracSettings {
                url: "http://127.0.0.1:1".into(),
                token: Some("not-used".to_string().into()),
                token_file: None,
                token_command: vec![],
                token_refresh_margin_s: 300,
                ca_file: None,
                max_in_flight: 10,
                sites: vec![],
                output_se: None,
                jdl: Default::default(),
                shared_filesystem: true,
            }),
        );
    })
    .await;
    let held = app
        .accepted(sleep_request(2, 0.1, -1, "held", "dirac-down"))
        .await;
    let production = app
        .production_when(
            "the production to show as held once its jobs are planned",
            Duration::from_secs(30),
            &held,
            // Held already while ACCEPTED (the installation's failure may be
            // projected before the production's dispatch): wait for both.
            |p| !p.held_reason.is_empty() && p.state() == pb::ProductionState::Running,
        )
        .await;
    assert_eq!(production.state(), pb::ProductionState::Running);
    assert!(
        production.held_reason.contains("dirac-down"),
        "{}",
        production.held_reason
    );
    // Reserved (committed as submitted before the backend call) or waiting; none ran.
    let c = production.counts.unwrap();
    assert_eq!(c.created + c.submitted, 2, "{production:?}");
    // Nothing crashed: the local installation still runs productions to the end.
    let local = app
        .accepted(sleep_request(1, 0.1, -1, "local-still-works", ""))
        .await;
    let last = app.watch(&local).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert!(last.held_reason.is_empty(), "{}", last.held_reason);
    // The held production can still be cancelled.
    let answer = app.cancel(&held, "installation down").await.unwrap();
    assert!(answer.accepted);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_jobs_wait_their_turn_start_when_a_slot_frees_and_a_cancel_ends_them_unstarted() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 1;
        env.settings.dispatcher.max_queued_jobs = 2;
    })
    .await;
    // Four jobs of 1.5 s on one slot with two places in the queue: one
    // runs, two wait at the executor (QUEUED), one waits for room (CREATED).
    let production = app.accepted(sleep_request(4, 1.5, -1, "queue", "")).await;
    let waiting = app
        .production_when(
            "one running and two queued",
            Duration::from_secs(30),
            &production,
            |p| {
                let c = p.counts.unwrap_or_default();
                c.running == 1 && c.queued == 2
            },
        )
        .await
        .counts
        .unwrap_or_default();
    assert_eq!(waiting.created, 1, "{waiting:?}");
    let snapshots = app.watch(&production).await;
    let last = snapshots.last().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    for s in &snapshots {
        assert!(s.counts.unwrap_or_default().running <= 1, "{s:?}");
    }
    // One slot: no two attempts ran at once; the queued ones waited in
    // their directories.
    let work = app.env.settings.dispatcher.work_dir.join(&production);
    let mut spans = Vec::new();
    for entry in std::fs::read_dir(&work).unwrap() {
        let dir = entry.unwrap().path();
        let started = std::fs::metadata(dir.join("prodsys.started"))
            .unwrap()
            .modified()
            .unwrap();
        let ended = std::fs::metadata(dir.join("prodsys.exit"))
            .unwrap()
            .modified()
            .unwrap();
        spans.push((started, ended, dir.join("prodsys.queued").exists()));
    }
    spans.sort();
    assert_eq!(spans.len(), 4, "{spans:?}");
    assert!(spans.iter().filter(|s| s.2).count() >= 2, "{spans:?}");
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two at once on one slot: {spans:?}");
    }

    // A cancel ends the queued attempts without starting them.
    let cancelled = app
        .accepted(sleep_request(3, 60.0, -1, "queue-cancel", ""))
        .await;
    app.production_when(
        "one running and two queued",
        Duration::from_secs(30),
        &cancelled,
        |p| {
            let c = p.counts.unwrap_or_default();
            c.running == 1 && c.queued == 2
        },
    )
    .await;
    assert!(app.cancel(&cancelled, "queued").await.unwrap().accepted);
    let last = app.watch(&cancelled).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    assert_eq!(last.counts.unwrap().cancelled, 3);
    let work = app.env.settings.dispatcher.work_dir.join(&cancelled);
    let mut unstarted = 0;
    for entry in std::fs::read_dir(&work).unwrap() {
        let dir = entry.unwrap().path();
        // Every attempt has a queue entry; the two that waited were claimed
        // by the cancel, so nobody started them: no supervisor ever ran.
        assert!(dir.join("prodsys.queued").exists(), "{}", dir.display());
        let exit = std::fs::read_to_string(dir.join("prodsys.exit")).unwrap();
        assert!(exit.starts_with("exit 143"), "{}: {exit}", dir.display());
        if !dir.join("prodsys.pid").exists() {
            unstarted += 1;
        }
    }
    assert_eq!(unstarted, 2);
    app.stop().await;
}

/// Rounds the dispatcher's schedulers have run, from its `/metrics`.
async fn scheduler_rounds(addr: std::net::SocketAddr) -> u64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("prodsys_dispatcher_scheduler_rounds_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_installation_is_not_looked_at_for_every_arriving_production_and_a_cancel_still_acts_at_once()
 {
    let poll = Duration::from_secs(3);
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.max_concurrent_jobs = 1;
        env.settings.dispatcher.max_queued_jobs = 0;
        env.settings.dispatcher.poll_interval_ms = poll.as_millis() as u64;
    })
    .await;
    let holder = app
        .accepted(sleep_request(1, 120.0, -1, "holder", ""))
        .await;
    app.production_when("its job running", Duration::from_secs(30), &holder, |p| {
        p.counts.unwrap_or_default().running == 1
    })
    .await;
    let dispatcher = app.stack.addr(Service::Dispatcher).unwrap();
    let before = scheduler_rounds(dispatcher).await;
    assert!(before > 0, "the scheduler counts its rounds");
    // Twenty productions arrive, each later than the shortest gap between
    // two rounds (50 ms): each used to cost a round of the full installation.
    let started = Instant::now();
    let mut waiting = Vec::new();
    for i in 0..20 {
        waiting.push(
            app.accepted(sleep_request(1, 0.0, -1, &format!("waiting-{i}"), ""))
                .await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rounds = scheduler_rounds(dispatcher).await - before;
    let elapsed = started.elapsed();
    // One a poll interval, and the one running when they began.
    let allowed = (elapsed.as_secs_f64() / poll.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        rounds <= allowed,
        "{rounds} rounds in {elapsed:?} for 20 productions arriving at a full installation (at most {allowed})"
    );
    for id in &waiting {
        let p = app.production(id).await.unwrap();
        assert_eq!(p.counts.unwrap_or_default().running, 0, "{p:?}");
    }
    // A cancel does not wait for the poll interval, and the slot it frees is
    // taken as soon as the killed job ends, each waiting job's end making
    // room for the next.
    let cancelled_at = Instant::now();
    assert!(app.cancel(&holder, "make room").await.unwrap().accepted);
    let last = app
        .production_when(
            "the holder cancelled",
            Duration::from_secs(30),
            &holder,
            |p| p.state() == pb::ProductionState::Cancelled,
        )
        .await;
    assert_eq!(last.counts.unwrap_or_default().cancelled, 1, "{last:?}");
    assert!(
        cancelled_at.elapsed() < poll,
        "the cancel took {:?}, a poll interval or more",
        cancelled_at.elapsed()
    );
    for id in &waiting {
        let last = app.watch(id).await.pop().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    }
    assert!(
        cancelled_at.elapsed() < poll * 5,
        "20 waiting jobs of no time took {:?} after the slot freed",
        cancelled_at.elapsed()
    );
    app.stop().await;
}
