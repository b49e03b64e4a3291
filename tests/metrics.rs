//! Every service serves its own figures at `/metrics` on its gRPC port, in
//! the OpenMetrics text format that Prometheus' own parser reads: what its
//! consumer settled and how large its batches were, how long events waited
//! in its outbox, how many messages wait in its queue and in its outbox.
//! Status adds its read model's gauges to the same exposition, among them
//! files forwarded / catalogued per destination.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{cta_example, spawn_app_with};

#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// The samples of `text`, as Prometheus' OpenMetrics parser reads them.
fn parse(text: &str) -> Vec<Sample> {
    let script = prodsys_testkit::repo_root().join("tests/metrics/parse.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_reports_its_consumer_relay_and_backlog_in_openmetrics() {
    let app = spawn_app_with(|env| {
        support::storage::disk(env);
    })
    .await;
    let production = app
        .accepted(pb::SubmitRequestRequest {
            forward: vec!["disk".into()],
            ..cta_example()
        })
        .await;
    let finished = app
        .production_when(
            "the production finished, its outputs forwarded",
            Duration::from_secs(120),
            &production,
            |p| p.finished,
        )
        .await;
    assert_eq!(finished.forwarding[0].forwarded, 8, "{finished:?}");
    let http = reqwest::Client::new();
    // Which services consume, and which publish through their outbox, in
    // the CTA example's run.
    let services = [
        (Service::Intake, "intake", true),
        (Service::Checker, "checker", true),
        (Service::Dispatcher, "dispatcher", true),
        (Service::Status, "status", false),
        (Service::Catalog, "catalog", false),
    ];
    for (service, name, publishes) in services {
        let addr = app.stack.addr(service).unwrap();
        // The backlog is sampled every few seconds: wait for the first look.
        let samples = wait_for(
            &format!("{name}'s backlog figures"),
            Duration::from_secs(20),
            || {
                let http = http.clone();
                async move {
                    let response = http
                        .get(format!("http://{addr}/metrics"))
                        .send()
                        .await
                        .ok()?;
                    assert_eq!(response.status(), 200);
                    let content_type = response.headers()["content-type"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    assert!(
                        content_type.starts_with("application/openmetrics-text"),
                        "{content_type}"
                    );
                    let samples = parse(&response.text().await.ok()?);
                    // Sampled at start too, before the consumer attached.
                    (value(&samples, "prodsys_queue_consumers", &[("service", name)])? >= 1.0)
                        .then_some(samples)
                }
            },
        )
        .await
        .unwrap();
        let acked = value(
            &samples,
            "prodsys_consumer_deliveries_total",
            &[("service", name), ("outcome", "ack")],
        )
        .unwrap_or(0.0);
        assert!(acked >= 1.0, "{name} acknowledged deliveries: {acked}");
        let batches = value(
            &samples,
            "prodsys_consumer_batch_size_count",
            &[("service", name)],
        )
        .unwrap_or(0.0);
        assert!(batches >= 1.0, "{name} handled batches: {batches}");
        assert!(
            value(
                &samples,
                "prodsys_queue_ready_messages",
                &[("service", name)]
            )
            .is_some(),
            "{name} reports its queue's backlog"
        );
        assert!(
            value(&samples, "prodsys_outbox_depth", &[("service", name)]).is_some(),
            "{name} reports its outbox's depth"
        );
        if publishes {
            let relayed = value(
                &samples,
                "prodsys_outbox_relay_latency_seconds_count",
                &[("service", name)],
            )
            .unwrap_or(0.0);
            assert!(relayed >= 1.0, "{name} relayed events: {relayed}");
        }
        if service == Service::Status {
            assert_eq!(
                value(&samples, "prodsys_productions", &[("state", "COMPLETED")]),
                Some(1.0),
                "status adds its read model's gauges"
            );
            // Files forwarded / catalogued, per destination.
            for (gauge, n) in [
                ("prodsys_forwarding_files", 8.0),
                ("prodsys_forwarded_files", 8.0),
                ("prodsys_forwarding_failing_files", 0.0),
            ] {
                assert_eq!(
                    value(&samples, gauge, &[("destination", "disk")]),
                    Some(n),
                    "{gauge}"
                );
            }
        }
    }
    app.stop().await;
}
