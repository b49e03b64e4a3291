//! Outages that must not cost work: a dependency down for longer than the
//! delivery limit would last, poison messages next to valid ones, dead
//! letters an operator can list, replay and drop, and a graceful stop.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use support::{App, built_binary, cta_example, dlq_depth, health, publish_raw, spawn_app};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// The test-sleep profile, renamed, with a catalog identity: the checker
/// then asks the catalog about every request.
fn write_outage_profile(env: &TestEnv) {
    let source = prodsys_testkit::repo_root().join("tests/profiles/test-sleep.json");
    let mut profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    profile["name"] = "test-outage".into();
    profile["id_prefix"] = "OUT".into();
    // The checker asks the catalog about every request of this profile.
    profile["outputs"]["metadata"]["tag"] = "{tag}".into();
    profile["catalog"] = serde_json::json!({
        "keys": { "run_number": "integer", "tag": "string" },
        "required": ["tag"]
    });
    std::fs::write(
        env.settings.profiles_dir.join("test-outage.json"),
        profile.to_string(),
    )
    .unwrap();
}

fn outage_request(tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-outage".into(),
        ..support::sleep_request(1, 0.0, -1, tag, "local")
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn request(
    intake: &pb::request_service_client::RequestServiceClient<tonic::transport::Channel>,
    request_id: &str,
) -> pb::Request {
    intake
        .clone()
        .get_request(pb::GetRequestRequest {
            request_id: request_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_wait_out_a_catalog_outage_longer_than_the_delivery_limit() {
    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.unwrap();
    support::use_test_profiles(&mut env);
    write_outage_profile(&env);
    // Three deliveries would be spent in about a second by requeueing; a
    // batch held longer than 2 s is republished, several times over the outage.
    env.settings.amqp.delivery_limit = 3;
    env.settings.amqp.hold_limit_ms = 2_000;
    env.settings.amqp.hold_retry_max_ms = 500;
    let port = free_port();
    env.settings.catalog.port = port;
    env.settings.checker.catalog_url = format!("http://127.0.0.1:{port}");
    // The catalog's queue exists before anything is published for it.
    let catalog_stop = CancellationToken::new();
    let catalog = prodsys::start(&[Service::Catalog], &env.settings, catalog_stop.clone())
        .await
        .unwrap();
    catalog_stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), catalog.wait())
        .await
        .expect("the catalog stops")
        .unwrap();

    let shutdown = CancellationToken::new();
    let stack = prodsys::start(
        &[
            Service::Status,
            Service::Dispatcher,
            Service::Checker,
            Service::Intake,
        ],
        &env.settings,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let checker = stack.addr(Service::Checker).unwrap();
    let intake = pb::request_service_client::RequestServiceClient::new(
        support::channel(stack.addr(Service::Intake).unwrap()).await,
    );
    let mut ids = Vec::new();
    for i in 0..20 {
        let answer = intake
            .clone()
            .submit_request(outage_request(&format!("outage-{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.push(answer.request_id);
    }
    wait_for(
        "the checker to report NOT_SERVING",
        Duration::from_secs(20),
        || async { (health(checker).await == Some(NOT_SERVING)).then_some(()) },
    )
    .await
    .unwrap();
    // Far longer than three deliveries would last: the catalog stays down.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(12) {
        assert_eq!(health(checker).await, Some(NOT_SERVING));
        assert_eq!(dlq_depth(&env, "checker").await, 0, "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &ids {
        assert_eq!(
            request(&intake, id).await.state(),
            pb::RequestState::Received,
            "undecided while the catalog is down"
        );
    }

    let catalog_stop = CancellationToken::new();
    let catalog = prodsys::start(&[Service::Catalog], &env.settings, catalog_stop.clone())
        .await
        .unwrap();
    let back = Instant::now();
    for id in &ids {
        let decided = support::decided(&intake, id).await;
        assert_eq!(decided.state(), pb::RequestState::Accepted, "{decided:?}");
    }
    println!(
        "catalog outage: 20 requests accepted {:?} after the catalog returned",
        back.elapsed()
    );
    wait_for(
        "the checker to report SERVING again",
        Duration::from_secs(20),
        || async { (health(checker).await == Some(SERVING)).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(dlq_depth(&env, "checker").await, 0);
    let db = env.db().await.unwrap();
    let productions: i64 = db
        .query_one("SELECT count(*) FROM checker.productions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(productions, 20, "each request decided once");

    shutdown.cancel();
    catalog_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), stack.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), catalog.wait()).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_alone_while_valid_ones_are_processed() {
    let app = spawn_app().await;
    let events = format!("{}prodsys.events", app.env.prefix);
    // Valid type headers, bodies that are not the protobuf they claim to be.
    let garbage = b"\xff\xff\xff\xff not protobuf";
    let poison_checker = publish_raw(
        &app.env,
        &events,
        "request.received",
        "org.prodsys.request.received.v1",
        garbage,
    )
    .await;
    let mut submitted = Vec::new();
    for zenith in [10, 30, 50] {
        let mut r = cta_example();
        r.parameters_json = r
            .parameters_json
            .replace("\"zenith_deg\":20", &format!("\"zenith_deg\":{zenith}"));
        submitted.push(app.submit(r).await.unwrap().request_id);
    }
    let poison_status = publish_raw(
        &app.env,
        &events,
        "production.completed",
        "org.prodsys.production.completed.v1",
        garbage,
    )
    .await;
    let mut productions = Vec::new();
    for id in &submitted {
        let r = app.decided(id).await;
        assert_eq!(r.state(), pb::RequestState::Accepted, "{r:?}");
        productions.push(r.production_id);
    }
    for production_id in &productions {
        app.production_when(
            "the status service to know the production",
            Duration::from_secs(30),
            production_id,
            |_| true,
        )
        .await;
    }
    for (service, poison) in [("checker", &poison_checker), ("status", &poison_status)] {
        let letters = app.dead_letters(service, 1).await;
        let (reason, headers) = &letters[0];
        assert!(reason.contains("does not decode"), "{service}: {reason}");
        let id = headers
            .inner()
            .get("cloudEvents_id")
            .and_then(prodsys_messaging::envelope::value_text);
        assert_eq!(
            id.as_ref(),
            Some(poison),
            "{service} dead-lettered the poison"
        );
        assert_eq!(
            dlq_depth(&app.env, service).await,
            0,
            "{service}: only the poison"
        );
    }
    app.stop().await;
}

/// Runs prodctl against this test's broker.
async fn prodctl(app: &App, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(built_binary("prodctl", "prodctl"))
        .arg("dlq")
        .args(args)
        .env("PRODSYS_AMQP_URL", prodsys_testkit::amqp_url())
        .env("PRODSYS__AMQP__PREFIX", &app.env.prefix)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prodctl_lists_shows_replays_and_drops_dead_letters() {
    let app = spawn_app().await;
    let prefix = app.env.prefix.clone();
    let (connection, channel) = app.env.amqp().await.unwrap();
    // A copy of every request.received and request.accepted event.
    let tap = format!("{prefix}tap");
    channel
        .queue_declare(
            tap.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    for key in ["request.received", "request.accepted"] {
        channel
            .queue_bind(
                tap.as_str().into(),
                format!("{prefix}prodsys.events").as_str().into(),
                key.into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    let production = app.accepted(cta_example()).await;
    let received = wait_for(
        "the tapped request.received",
        Duration::from_secs(10),
        || {
            let channel = channel.clone();
            let tap = tap.clone();
            async move {
                let m = channel
                    .basic_get(
                        tap.as_str().into(),
                        lapin::options::BasicGetOptions { no_ack: true },
                    )
                    .await
                    .ok()??;
                (m.delivery.routing_key.as_str() == "request.received").then_some(m.delivery)
            }
        },
    )
    .await
    .unwrap();
    let valid_id = received
        .properties
        .message_id()
        .as_ref()
        .unwrap()
        .to_string();
    // The event that already took effect, as if the checker had dead-lettered it.
    let mut headers = received.properties.headers().clone().unwrap_or_default();
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    headers.insert(
        "x-prodsys-dead-letter-reason".into(),
        text("test: dead-lettered by hand"),
    );
    headers.insert(
        "x-prodsys-original-routing-key".into(),
        text("request.received"),
    );
    headers.insert(
        "x-prodsys-original-exchange".into(),
        text(&format!("{prefix}prodsys.events")),
    );
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            format!("{prefix}prodsys.dlx").as_str().into(),
            "checker".into(),
            Default::default(),
            &received.data,
            received.properties.clone().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // And a real one: the checker dead-letters a body that does not decode.
    let poison_id = publish_raw(
        &app.env,
        &format!("{prefix}prodsys.events"),
        "request.received",
        "org.prodsys.request.received.v1",
        b"\xff\xfe not protobuf",
    )
    .await;
    wait_for("two dead letters", Duration::from_secs(20), || async {
        (dlq_depth(&app.env, "checker").await == 2).then_some(())
    })
    .await
    .unwrap();

    let (ok, list, err) = prodctl(&app, &["list", "checker"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    let line = |id: &str| lines.iter().find(|l| l.starts_with(id)).copied().unwrap();
    assert!(
        line(&valid_id).contains("test: dead-lettered by hand"),
        "{list}"
    );
    assert!(line(&valid_id).contains("request.received"), "{list}");
    assert!(line(&poison_id).contains("does not decode"), "{list}");
    assert!(
        line(&poison_id).contains("org.prodsys.request.received.v1"),
        "{list}"
    );
    // Listing gave everything back.
    assert_eq!(dlq_depth(&app.env, "checker").await, 2);

    let (ok, show, err) = prodctl(&app, &["show", "checker", &poison_id]).await;
    assert!(ok, "{err}");
    assert!(show.contains("does not decode"), "{show}");
    assert!(
        show.contains("cloudEvents_type = org.prodsys.request.received.v1"),
        "{show}"
    );
    assert!(show.contains("ff fe 20 6e 6f 74"), "hex body: {show}");
    let (ok, _, _) = prodctl(&app, &["show", "checker", "no-such-id"]).await;
    assert!(!ok, "an unknown message ID fails");

    // Replaying the event that already took effect changes nothing.
    let (ok, out, err) = prodctl(&app, &["replay", "checker", &valid_id]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("replayed {valid_id}")), "{out}");
    assert_eq!(dlq_depth(&app.env, "checker").await, 1);
    // The checker handles its queue in order: once a later request is
    // decided, the replay has been handled too.
    let mut later = cta_example();
    later.parameters_json = later
        .parameters_json
        .replace("\"zenith_deg\":20", "\"zenith_deg\":45");
    app.accepted(later).await;
    let db = app.env.db().await.unwrap();
    let productions: i64 = db
        .query_one("SELECT count(*) FROM checker.productions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(productions, 2, "the replay created no production");
    // Both verdicts reached the tap before intake could record them.
    let mut accepted = 0;
    while let Some(m) = channel
        .basic_get(
            tap.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        accepted += usize::from(m.delivery.routing_key.as_str() == "request.accepted");
    }
    assert_eq!(accepted, 2, "no verdict announced again");
    let first = app.decided(&valid_request_id(&received)).await;
    assert_eq!(first.production_id, production);
    assert_eq!(
        dlq_depth(&app.env, "checker").await,
        1,
        "not dead-lettered again"
    );

    let (ok, out, err) = prodctl(&app, &["drop", "checker", "--all"]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("dropped {poison_id}")), "{out}");
    assert_eq!(dlq_depth(&app.env, "checker").await, 0);
    let (ok, list, _) = prodctl(&app, &["list", "checker"]).await;
    assert!(ok && list.is_empty(), "{list}");
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

/// The request ID a request.received event carries.
fn valid_request_id(delivery: &lapin::message::Delivery) -> String {
    <pb::RequestReceived as prost::Message>::decode(delivery.data.as_slice())
        .unwrap()
        .request_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_serve_all_within_the_grace_period_with_the_outbox_flushed() {
    let env = TestEnv::new().await.unwrap();
    let grace = Duration::from_secs(10);
    let s = &env.settings;
    let mut child = tokio::process::Command::new(built_binary("prodsys", "prodsys"))
        .args(["serve", "all"])
        .env("PRODSYS_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("PRODSYS__DATABASE__URL", s.database.url())
        .env("PRODSYS__AMQP__URL", s.amqp.url())
        .env("PRODSYS__AMQP__PREFIX", &s.amqp.prefix)
        .env("PRODSYS__PROFILES_DIR", &s.profiles_dir)
        .env("PRODSYS__DISPATCHER__WORK_DIR", &s.dispatcher.work_dir)
        .env("PRODSYS__DISPATCHER__TOOLS_DIR", &s.dispatcher.tools_dir)
        .env("PRODSYS__SHUTDOWN_GRACE_MS", grace.as_millis().to_string())
        .env("PRODSYS__INTAKE__PORT", "0")
        .env("PRODSYS__CHECKER__PORT", "0")
        .env("PRODSYS__DISPATCHER__PORT", "0")
        .env("PRODSYS__STATUS__PORT", "0")
        .env("PRODSYS__CATALOG__PORT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut intake = None;
    let mut ready = 0;
    let mut log = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while ready < 5 {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("prodsys exited early");
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == "ready" {
                ready += 1;
                if entry["service"] == "intake" {
                    intake = entry["addr"].as_str().map(str::to_string);
                }
            }
            log.push(line);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("five services ready: {log:#?}"));
    // Keep reading the log so the child never blocks on a full pipe.
    let tail = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    let intake = pb::request_service_client::RequestServiceClient::new(
        support::channel(intake.unwrap().parse().unwrap()).await,
    );
    // Work in flight at the signal: requests whose events are still moving.
    for zenith in [11, 22, 33, 44, 55] {
        let mut r = cta_example();
        r.parameters_json = r
            .parameters_json
            .replace("\"zenith_deg\":20", &format!("\"zenith_deg\":{zenith}"));
        intake.clone().submit_request(r).await.unwrap();
    }
    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(grace + Duration::from_secs(2), child.wait())
        .await
        .expect("prodsys exits within the grace period")
        .unwrap();
    let took = signalled.elapsed();
    let rest = tail.await.unwrap();
    assert!(status.success(), "exit status {status:?}: {rest:#?}");
    assert!(took <= grace, "stopped in {took:?}");
    println!("graceful shutdown: exit 0 after {took:?}");
    let db = env.db().await.unwrap();
    for schema in prodsys_testkit::SERVICES {
        let unsent: i64 = db
            .query_one(&format!("SELECT count(*) FROM {schema}.outbox"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(unsent, 0, "{schema} left unsent outbox rows");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inboxes_forget_event_ids_older_than_the_retention() {
    let app = support::spawn_app_with(|env| env.settings.database.inbox_retention_s = 2).await;
    let production = app.accepted(cta_example()).await;
    let db = app.env.db().await.unwrap();
    let inboxes = || async {
        let mut total = 0i64;
        for schema in ["intake", "checker", "status"] {
            let n: i64 = db
                .query_one(&format!("SELECT count(*) FROM {schema}.inbox"), &[])
                .await
                .unwrap()
                .get(0);
            total += n;
        }
        total
    };
    wait_for(
        "events recorded in the inboxes",
        Duration::from_secs(20),
        || async { (inboxes().await >= 3).then_some(()) },
    )
    .await
    .unwrap();
    app.production_when(
        "the production's end",
        Duration::from_secs(60),
        &production,
        |p| p.state() == pb::ProductionState::Completed,
    )
    .await;
    // Nothing new arrives now; after the retention the background task empties them.
    wait_for("pruned inboxes", Duration::from_secs(20), || async {
        (inboxes().await == 0).then_some(())
    })
    .await
    .unwrap();
    let r = app.production(&production).await.unwrap();
    assert_eq!(
        r.state(),
        pb::ProductionState::Completed,
        "the read model stays"
    );
    app.stop().await;
}
