//! Requests published as CloudEvents by other ESFRI systems.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};

use support::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_publisher_submits_with_the_public_cloudevents_and_pika_packages() {
    let app = spawn_app().await;
    let script = prodsys_testkit::repo_root().join("tests/ingest/publish.py");
    let example = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let exchange = format!("{}prodsys.ingest", app.env.prefix);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(prodsys_testkit::amqp_url())
            .arg(exchange)
            .arg(example)
            .output()
            .expect("python3 runs (pip install -r tests/requirements.txt)")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "publisher failed: {stderr}");
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_kind: BTreeMap<String, &serde_json::Value> = answers
        .iter()
        .map(|a| (a["sent_as"].as_str().unwrap().to_string(), a))
        .collect();
    assert_eq!(
        answers.len(),
        3,
        "one answer per distinct event, none for the repeat: {answers:#?}"
    );
    let structured = by_kind["structured"];
    assert_eq!(structured["outcome"], "accepted");
    assert_eq!(structured["production_id"], "CTA-000001");
    assert_eq!(structured["content_type"], "application/json");
    assert_eq!(
        structured["cloudevents_type"],
        "org.prodsys.request.accepted.v1"
    );
    let binary = by_kind["binary-amqp"];
    assert_eq!(binary["outcome"], "accepted");
    assert_eq!(binary["production_id"], "CTA-000002");
    let invalid = by_kind["binary-rabbitmq-invalid"];
    assert_eq!(invalid["outcome"], "rejected");
    assert_eq!(invalid["violations"][0]["field"], "parameters.zenith_deg");

    let db = app.env.db().await.unwrap();
    let rows = db
        .query(
            "SELECT state, correlation_id FROM intake.requests ORDER BY created_at",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the repeated event made no second request");
    for row in &rows {
        let correlation: String = row.get(1);
        assert!(
            answers
                .iter()
                .any(|a| a["correlation_id"] == correlation.as_str())
        );
    }
    // Accepted requests from events run like any other.
    let last = app.watch("CTA-000001").await.pop().unwrap();
    assert_eq!(last.state(), prodsys_proto::ProductionState::Completed);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_that_cannot_be_requests_are_dead_lettered_with_the_reason() {
    let app = spawn_app().await;
    let (connection, channel) = app.env.amqp().await.unwrap();
    let exchange = format!("{}prodsys.ingest", app.env.prefix);
    let attributes = |event_type: &str| {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("cloudEvents:id", "e-1"),
            ("cloudEvents:source", "/tests"),
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:type", event_type),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        headers
    };
    let submit = "org.prodsys.request.submit.v1";
    let good_data =
        serde_json::json!({"profile": "cta-irf-mc", "vo": "vo.cta.in2p3.fr", "parameters": {}});
    let unknown_profile = serde_json::json!({"profile": "lsst-sim", "vo": "x", "parameters": {}});
    let cases: Vec<(&str, FieldTable, Vec<u8>, &str)> = vec![
        (
            "bad json",
            attributes(submit),
            b"{not json".to_vec(),
            "body is not JSON",
        ),
        (
            "no attributes",
            FieldTable::default(),
            good_data.to_string().into_bytes(),
            "missing CloudEvents attribute \"id\"",
        ),
        (
            "unknown type",
            attributes("com.example.other"),
            good_data.to_string().into_bytes(),
            "unknown event type",
        ),
        (
            "unknown profile",
            attributes(submit),
            unknown_profile.to_string().into_bytes(),
            "unknown profile \"lsst-sim\"",
        ),
        (
            "oversized",
            attributes(submit),
            vec![b' '; 2 * 1024 * 1024],
            "exceeds the limit",
        ),
        (
            "not utf-8",
            attributes(submit),
            vec![0xff, 0xfe, 0x7b],
            "not UTF-8",
        ),
        (
            "not a request",
            attributes(submit),
            b"{\"colour\": 1}".to_vec(),
            "data is not a production request",
        ),
    ];
    for (_, headers, body, _) in &cases {
        channel
            .basic_publish(
                exchange.as_str().into(),
                submit.into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default().with_headers(headers.clone()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let reasons: Vec<String> = app
        .dead_letters("intake", cases.len())
        .await
        .into_iter()
        .map(|(reason, _)| reason)
        .collect();
    for (name, _, _, expected) in &cases {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{name}: {expected:?} not in {reasons:#?}"
        );
    }
    let stored = app.stored_requests().await;
    assert_eq!(stored, 0);
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}
