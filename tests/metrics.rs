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

/// Reads a dashboard event stream (`GET /api/events`) until it carries a
/// production COMPLETED; returns how many `production` events it carried.
async fn events_until_completed(mut response: reqwest::Response) -> usize {
    let mut text = String::new();
    let mut seen = 0;
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), response.chunk())
            .await
            .expect("an event within 60 s")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if !event.contains("event: production") {
                continue;
            }
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a data line");
            let p: serde_json::Value = serde_json::from_str(data).unwrap();
            seen += 1;
            if p["state"] == "COMPLETED" {
                return seen;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_watchers_of_one_production_share_one_reader_of_its_changes() {
    const STREAMS: usize = 40;
    const SSE: usize = 5;
    let app = spawn_app_with(|_| {}).await;
    let addr = app.stack.addr(Service::Status).unwrap();
    let http = reqwest::Client::new();
    // The dashboards' streams follow every production from before it exists.
    let mut dashboards = Vec::new();
    for _ in 0..SSE {
        let response = http
            .get(format!("http://{addr}/api/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        dashboards.push(tokio::spawn(events_until_completed(response)));
    }
    // Twelve jobs: long enough to change while the streams follow it.
    let production = app
        .accepted(support::cta_with(|p| {
            p["n_showers"] = serde_json::json!(12000)
        }))
        .await;
    let started = std::time::Instant::now();
    let mut watchers = Vec::new();
    for _ in 0..STREAMS {
        let app_status = app.status.clone();
        let production = production.clone();
        watchers.push(tokio::spawn(async move {
            let mut stream = app_status
                .clone()
                .watch_production(pb::GetProductionRequest {
                    production_id: production,
                })
                .await
                .unwrap()
                .into_inner();
            let mut snapshots = Vec::new();
            while let Some(p) = tokio::time::timeout(Duration::from_secs(60), stream.message())
                .await
                .expect("an update within 60 s")
                .unwrap()
            {
                snapshots.push(p);
            }
            snapshots
        }));
    }
    let mut most = 0;
    for watcher in watchers {
        let snapshots = watcher.await.unwrap();
        let last = snapshots.last().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
        assert_eq!(last.counts.unwrap().done, last.job_total, "{last:?}");
        // Never back in time.
        for pair in snapshots.windows(2) {
            assert!(
                pair[0].updated_unix_ms <= pair[1].updated_unix_ms,
                "{pair:?}"
            );
        }
        most = most.max(snapshots.len());
    }
    for dashboard in dashboards {
        assert!(dashboard.await.unwrap() >= 1);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Once every stream has ended, nothing is followed any more.
    let samples = wait_for(
        "the status service to stop reading for closed streams",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            async move {
                let text = http
                    .get(format!("http://{addr}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let samples = parse(&text);
                (value(&samples, "prodsys_status_followed_productions", &[])? == 0.0)
                    .then_some(samples)
            }
        },
    )
    .await
    .unwrap();
    // One read per committed change (changes that come during a read fold
    // into the next one), and one every 5 s with none: not one per follower.
    let bound = 2.0 * most as f64 + elapsed / 5.0 + 5.0;
    let reads = value(
        &samples,
        "prodsys_status_snapshot_reads_total",
        &[("reader", "production")],
    )
    .expect("reads for WatchProduction streams");
    assert!(
        reads >= 1.0 && reads <= bound && reads < STREAMS as f64,
        "{reads} reads for {STREAMS} streams that saw at most {most} snapshots in {elapsed:.1} s"
    );
    let for_dashboards = value(
        &samples,
        "prodsys_status_snapshot_reads_total",
        &[("reader", "events")],
    )
    .expect("reads for dashboard event streams");
    assert!(
        for_dashboards >= 1.0 && for_dashboards <= bound,
        "{for_dashboards} reads for {SSE} dashboards"
    );
    app.stop().await;
}
