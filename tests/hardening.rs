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

/// The shipped CTA example as the `data` of a submit CloudEvent.
fn submit_event(id: &str) -> serde_json::Value {
    let path = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/tests/hardening",
        "type": "org.prodsys.request.submit.v1",
        "data": { "profile": file["profile"], "vo": file["vo"], "parameters": file["parameters"] },
    })
}

/// Publishes `event` (structured mode) to the ingest exchange with `properties`.
async fn publish_ingest(
    channel: &lapin::Channel,
    prefix: &str,
    event: &serde_json::Value,
    properties: lapin::BasicProperties,
) {
    channel.confirm_select(Default::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            format!("{prefix}prodsys.ingest").as_str().into(),
            "org.prodsys.request.submit.v1".into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            event.to_string().as_bytes(),
            properties
                .with_content_type("application/cloudevents+json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "{confirm:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ingest_event_answered_into_a_queue_outside_the_pattern_is_dead_lettered() {
    let app = spawn_app().await;
    let (connection, channel) = app.env.amqp().await.unwrap();
    // The checker's own queue: an answer there would be a forged event.
    let target = format!("{}prodsys.checker", app.env.prefix);
    publish_ingest(
        &channel,
        &app.env.prefix,
        &submit_event("reply-elsewhere"),
        lapin::BasicProperties::default().with_reply_to(target.as_str().into()),
    )
    .await;
    let letters = app.dead_letters("intake", 1).await;
    assert!(
        letters[0].0.contains("reply_to") && letters[0].0.contains("amq.gen-*"),
        "{}",
        letters[0].0
    );
    assert_eq!(app.stored_requests().await, 0);
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_user_mapped_to_vos_may_submit_only_for_them() {
    let app = support::spawn_app_with(|env| {
        let user = url_user(&prodsys_testkit::amqp_url());
        env.settings
            .intake
            .broker_users
            .insert(user, vec!["vo.km3net.eu".into()]);
    })
    .await;
    let user = url_user(&prodsys_testkit::amqp_url());
    let (connection, channel) = app.env.amqp().await.unwrap();
    let answers = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let answers = answers.name().as_str().to_string();
    assert!(answers.starts_with("amq.gen-"), "{answers}");
    publish_ingest(
        &channel,
        &app.env.prefix,
        &submit_event("cta-from-a-km3net-user"),
        lapin::BasicProperties::default()
            .with_reply_to(answers.as_str().into())
            .with_user_id(user.as_str().into()),
    )
    .await;
    let answer = support::next_message(
        &channel,
        &answers,
        "the answer",
        std::time::Duration::from_secs(20),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&answer.delivery.data).unwrap();
    let data = body.get("data").unwrap_or(&body);
    assert_eq!(data["outcome"], "rejected", "{body}");
    assert_eq!(data["violations"][0]["field"], "vo", "{body}");
    let reason = data["violations"][0]["description"].as_str().unwrap();
    assert!(reason.contains("vo.km3net.eu"), "{reason}");
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

/// The user name of an AMQP URL (`guest` by default).
fn url_user(url: &str) -> String {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(credentials, _)| credentials.split(':').next())
        .filter(|u| !u.is_empty())
        .unwrap_or("guest")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dispatcher_takes_no_accepted_request_on_trust() {
    use prost::Message;
    let app = spawn_app().await;
    let events = format!("{}prodsys.events", app.env.prefix);
    let example = cta_example();
    let forged = |production_id: &str, parameters_json: &str| pb::RequestAccepted {
        request_id: uuid::Uuid::now_v7().to_string(),
        production_id: production_id.into(),
        profile: example.profile.clone(),
        vo: example.vo.clone(),
        fingerprint: "f".repeat(64),
        parameters_json: parameters_json.into(),
        backend: "local".into(),
        ..Default::default()
    };
    // A production ID is a directory under the work directory.
    let escape = forged("CTA-000001/../../../../tmp/owned", &example.parameters_json);
    support::publish_raw(
        &app.env,
        &events,
        "request.accepted",
        "request.accepted",
        &escape.encode_to_vec(),
    )
    .await;
    let letters = app.dead_letters("dispatcher", 1).await;
    assert!(
        letters[0].0.contains("is not an ID of profile cta-irf-mc"),
        "{}",
        letters[0].0
    );
    // Parameters become a command line: checked against the profile again.
    let mut parameters: serde_json::Value = serde_json::from_str(&example.parameters_json).unwrap();
    parameters["particle"] = "gamma; rm -rf ~".into();
    let injected = forged("CTA-000002", &parameters.to_string());
    support::publish_raw(
        &app.env,
        &events,
        "request.accepted",
        "request.accepted",
        &injected.encode_to_vec(),
    )
    .await;
    let letters = app.dead_letters("dispatcher", 1).await;
    assert!(
        letters[0].0.contains("breaks its profile") && letters[0].0.contains("parameters.particle"),
        "{}",
        letters[0].0
    );
    let db = app.env.db().await.unwrap();
    let planned: i64 = db
        .query_one("SELECT count(*) FROM dispatcher.productions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(planned, 0);
    assert!(!std::path::Path::new("/tmp/owned").exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_over_its_vos_job_limit_is_refused_with_a_field_violation() {
    let app = support::spawn_app_with(|env| {
        support::use_test_profiles(env);
        env.settings.intake.vo_limits.insert(
            "test".into(),
            prodsys_config::VoLimits {
                max_jobs_in_flight: Some(10),
                max_productions_waiting: Some(5),
            },
        );
    })
    .await;
    // Over the limit on its own: nothing stored.
    let status = app
        .submit(support::sleep_request(11, 0.0, -1, "alone", "local"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["vo"]);
    assert!(
        status.message().contains("limit of 10"),
        "{}",
        status.message()
    );
    assert_eq!(app.stored_requests().await, 0);

    // Eight long jobs admitted; three more would pass the limit, two do not.
    let long = app
        .accepted(support::sleep_request(8, 600.0, -1, "long", "local"))
        .await;
    let status = app
        .submit(support::sleep_request(3, 0.0, -1, "three", "local"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["vo"], "{status:?}");
    assert!(
        status.message().contains("8 jobs in flight"),
        "{}",
        status.message()
    );
    app.accepted(support::sleep_request(2, 0.0, -1, "two", "local"))
        .await;
    // Once the long production has ended (cancelled), its jobs count no more.
    app.cancel(&long, "making room").await.unwrap();
    prodsys_testkit::wait_for(
        "room for three more jobs",
        std::time::Duration::from_secs(60),
        || async {
            app.submit(support::sleep_request(3, 0.0, -1, "three", "local"))
                .await
                .ok()
        },
    )
    .await
    .unwrap();
    app.stop().await;
}

/// `prodsys broker-users` (or `db-roles`) with `args`; panics unless it succeeds.
fn prodsys_command(args: &[&str]) -> String {
    let out = std::process::Command::new(support::built_binary("prodsys", "prodsys"))
        .args(args)
        .output()
        .expect("running prodsys");
    assert!(
        out.status.success(),
        "prodsys {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test broker's URL as `user` (its password put in from a file later).
fn amqp_url_as(user: &str) -> String {
    let url = prodsys_testkit::amqp_url();
    let (_, host) = url
        .rsplit_once('@')
        .expect("the test AMQP URL names a user");
    format!("amqp://{user}@{host}")
}

/// Deletes the broker users of a test when dropped, whatever happened.
struct BrokerUsersOf {
    prefix: String,
    user_prefix: String,
    secrets: std::path::PathBuf,
}

impl Drop for BrokerUsersOf {
    fn drop(&mut self) {
        let _ = std::process::Command::new(support::built_binary("prodsys", "prodsys"))
            .args(["broker-users", "--delete", "--prefix", &self.prefix])
            .args(["--user-prefix", &self.user_prefix, "--secrets-dir"])
            .arg(&self.secrets)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_runs_as_its_own_broker_user_and_the_ingest_user_only_submits() {
    let mut env = prodsys_testkit::TestEnv::new()
        .await
        .expect("test environment");
    let user_prefix = format!(
        "prodsys-test-{}-",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let secrets = env.work_dir.join("secrets");
    let users = BrokerUsersOf {
        prefix: env.prefix.clone(),
        user_prefix: user_prefix.clone(),
        secrets: secrets.clone(),
    };
    let printed = prodsys_command(&[
        "broker-users",
        "--prefix",
        &env.prefix,
        "--user-prefix",
        &user_prefix,
        "--secrets-dir",
        secrets.to_str().unwrap(),
    ]);
    let password = |role: &str| {
        std::fs::read_to_string(secrets.join(format!("{user_prefix}{role}.password"))).unwrap()
    };
    assert!(
        !printed.contains(&password("ingest")),
        "a password was printed"
    );
    for service in ["intake", "checker", "dispatcher", "status", "catalog"] {
        let user = format!("{user_prefix}{service}");
        env.settings
            .amqp
            .service_urls
            .insert(service.into(), amqp_url_as(&user).into());
        env.settings
            .amqp
            .password_files
            .insert(service.into(), secrets.join(format!("{user}.password")));
    }
    prodsys_telemetry::init("warn");
    let app = support::spawn_services(env, &prodsys::Service::ALL).await;
    // The whole pipeline works with each service's own permissions.
    let production = app.accepted(cta_example()).await;
    app.production_when(
        "the production to complete",
        std::time::Duration::from_secs(120),
        &production,
        |p| p.state() == pb::ProductionState::Completed,
    )
    .await;

    let ingest_url = prodsys_config::with_password(
        &amqp_url_as(&format!("{user_prefix}ingest")),
        &password("ingest"),
    )
    .unwrap();
    let connection = lapin::Connection::connect(&ingest_url, Default::default())
        .await
        .expect("the ingest user connects");
    let channel = connection.create_channel().await.unwrap();
    let answers = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the ingest user declares its reply queue");
    let answers = answers.name().as_str().to_string();
    let mut event = submit_event("from-the-ingest-user");
    // Another simulation than the one above (40 degrees), so it is accepted.
    event["data"]["parameters"]["zenith_deg"] = 40.into();
    publish_ingest(
        &channel,
        &app.env.prefix,
        &event,
        lapin::BasicProperties::default().with_reply_to(answers.as_str().into()),
    )
    .await;
    let answer = support::next_message(
        &channel,
        &answers,
        "the answer",
        std::time::Duration::from_secs(30),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&answer.delivery.data).unwrap();
    assert_eq!(body["outcome"], "accepted", "{body}");

    // Forging an event of prodsys itself is refused by the broker.
    let forged = channel
        .basic_publish(
            format!("{}prodsys.events", app.env.prefix).as_str().into(),
            "request.accepted".into(),
            Default::default(),
            b"forged",
            Default::default(),
        )
        .await;
    let refused = match forged {
        Err(error) => format!("{error:?}"),
        Ok(confirm) => format!("{:?}", confirm.await),
    };
    // The refusal closes the channel; a new one says why.
    let retried = channel
        .basic_publish(
            format!("{}prodsys.events", app.env.prefix).as_str().into(),
            "request.accepted".into(),
            Default::default(),
            b"forged",
            Default::default(),
        )
        .await;
    let refused = format!("{refused} {retried:?}");
    assert!(
        refused.contains("ACCESS_REFUSED") || refused.contains("403"),
        "{refused}"
    );
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
    drop(users);
}

/// Drops the database roles of a test when dropped, whatever happened.
struct DbRolesOf {
    role_prefix: String,
    secrets: std::path::PathBuf,
    /// The test's database, where the roles own objects until it is dropped.
    database_url: String,
}

impl Drop for DbRolesOf {
    fn drop(&mut self) {
        let admin = std::env::var("PRODSYS_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        // In the test's database first (a failed test leaves it), then where
        // it is gone already.
        for url in [&self.database_url, &admin] {
            let _ = std::process::Command::new(support::built_binary("prodsys", "prodsys"))
                .args(["db-roles", "--delete", "--admin-url", url])
                .args(["--role-prefix", &self.role_prefix, "--secrets-dir"])
                .arg(&self.secrets)
                .output();
        }
    }
}

/// `url` (`postgres://user@host/db`) as `user`.
fn database_url_as(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_owns_its_schema_under_its_own_role_and_reads_no_other() {
    use secrecy::ExposeSecret;
    let mut env = prodsys_testkit::TestEnv::new()
        .await
        .expect("test environment");
    let role_prefix = format!(
        "prodsys_t{}_",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let secrets = env.work_dir.join("secrets");
    let admin_url = env.settings.database.url.expose_secret().to_string();
    let roles = DbRolesOf {
        role_prefix: role_prefix.clone(),
        secrets: secrets.clone(),
        database_url: admin_url.clone(),
    };
    let printed = prodsys_command(&[
        "db-roles",
        "--admin-url",
        &admin_url,
        "--role-prefix",
        &role_prefix,
        "--secrets-dir",
        secrets.to_str().unwrap(),
    ]);
    let password = |service: &str| {
        std::fs::read_to_string(secrets.join(format!("{role_prefix}{service}.password"))).unwrap()
    };
    assert!(
        !printed.contains(&password("intake")),
        "a password was printed"
    );
    for service in ["intake", "checker", "dispatcher", "status", "catalog"] {
        let role = format!("{role_prefix}{service}");
        env.settings
            .database
            .service_urls
            .insert(service.into(), database_url_as(&admin_url, &role).into());
        env.settings
            .database
            .password_files
            .insert(service.into(), secrets.join(format!("{role}.password")));
    }
    prodsys_telemetry::init("warn");
    let app = support::spawn_services(env, &prodsys::Service::ALL).await;
    let production = app.accepted(cta_example()).await;
    app.production_when(
        "the production to complete",
        std::time::Duration::from_secs(120),
        &production,
        |p| p.state() == pb::ProductionState::Completed,
    )
    .await;
    assert!(!app.files(&production).await.is_empty());

    // The intake role reads its own tables and no other service's.
    let intake_url = prodsys_config::with_password(
        &database_url_as(&admin_url, &format!("{role_prefix}intake")),
        &password("intake"),
    )
    .unwrap();
    let (client, connection) =
        prodsys_db::tokio_postgres::connect(&intake_url, prodsys_db::tokio_postgres::NoTls)
            .await
            .expect("the intake role logs in");
    tokio::spawn(connection);
    let own: i64 = client
        .query_one("SELECT count(*) FROM intake.requests", &[])
        .await
        .expect("intake reads its own schema")
        .get(0);
    assert_eq!(own, 1);
    for table in [
        "catalog.files",
        "dispatcher.jobs",
        "checker.productions",
        "status.productions",
    ] {
        let error = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect_err(table);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("permission denied"), "{table}: {error:?}");
    }
    // Nor may it make itself owner of another schema's objects or create one.
    assert!(client.batch_execute("CREATE SCHEMA stolen").await.is_err());
    drop(client);
    app.stop().await;
    drop(roles);
}
