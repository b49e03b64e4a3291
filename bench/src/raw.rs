//! The raw limits of this machine's broker and database, with the client
//! libraries and message size prodsys uses, and nothing of prodsys between.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use prodsys_testkit::TestEnv;
use tokio_postgres::types::ToSql;

use crate::amqp;
use crate::sys;

/// Sizes of the raw measurements.
#[derive(Debug, Clone, Copy)]
pub struct RawPlan {
    pub duration: Duration,
    pub publish_window: usize,
    pub prefetch: u16,
    pub connections: usize,
    pub batch_rows: usize,
}

#[derive(Debug, Clone, Default)]
pub struct BrokerResult {
    pub messages: u64,
    pub seconds: f64,
    pub round_trip_per_s: f64,
    pub publish_confirmed_per_s: f64,
    pub message_bytes: usize,
    pub cpu: sys::CpuUse,
}

#[derive(Debug, Clone, Default)]
pub struct DbResult {
    pub single_commits: u64,
    pub single_seconds: f64,
    pub single_per_s: f64,
    pub single_p50_ms: f64,
    pub single_p99_ms: f64,
    pub single_cpu: sys::CpuUse,
    pub batch_rows: u64,
    pub batch_seconds: f64,
    pub batch_rows_per_s: f64,
    pub batch_cpu: sys::CpuUse,
    pub row_bytes: usize,
    pub server_version: String,
    pub settings: String,
}

/// A `request.received` as intake publishes it for the shipped CTA example:
/// the message size of prodsys's own events.
pub fn request_received_body() -> Vec<u8> {
    let path = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let parameters = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .map(|v| v["parameters"].to_string())
        .unwrap_or_else(|| "{}".into());
    let received = prodsys_proto::RequestReceived {
        request_id: uuid::Uuid::now_v7().to_string(),
        profile: "cta-irf-mc".into(),
        vo: "vo.cta.in2p3.fr".into(),
        parameters_json: parameters,
        backend: "local".into(),
        submitter: "bench".into(),
        // No correlation, no extension: the defaults.
        ..Default::default()
    };
    prost::Message::encode_to_vec(&received)
}

/// Persistent publish with confirms → consume with ack, through one durable
/// quorum queue under `prefix`, for `plan.duration` of publishing.
pub async fn broker(url: &str, prefix: &str, plan: RawPlan) -> anyhow::Result<BrokerResult> {
    let queue = format!("{prefix}bench.raw");
    let publisher_conn = amqp::connect(url, "prodsys-bench-raw-publish").await?;
    let consumer_conn = amqp::connect(url, "prodsys-bench-raw-consume").await?;
    let admin = publisher_conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".as_bytes().to_vec())),
    );
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .context("declaring the bench quorum queue")?;
    let result = broker_run(&publisher_conn, &consumer_conn, &queue, plan).await;
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publisher_conn.close(200, "bench done".into()).await;
    let _ = consumer_conn.close(200, "bench done".into()).await;
    result
}

async fn broker_run(
    publisher_conn: &lapin::Connection,
    consumer_conn: &lapin::Connection,
    queue: &str,
    plan: RawPlan,
) -> anyhow::Result<BrokerResult> {
    let body = request_received_body();
    let message_bytes = body.len();
    let publish_done = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));

    // Consumer: prefetch, take what has arrived (up to 128, as the prodsys
    // consumer does), ack them with one multiple-ack.
    let channel = consumer_conn.create_channel().await?;
    channel
        .basic_qos(plan.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let consume_task = {
        let consumed = consumed.clone();
        let publish_done = publish_done.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + plan.duration + Duration::from_secs(120);
            let mut last_ack = Instant::now();
            loop {
                if publish_done.load(Ordering::SeqCst)
                    && consumed.load(Ordering::SeqCst) >= published.load(Ordering::SeqCst)
                {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!("the raw consumer did not catch up within its deadline");
                }
                let first =
                    match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                        Ok(Some(Ok(d))) => d,
                        Ok(Some(Err(e))) => return Err(e).context("consuming"),
                        Ok(None) => anyhow::bail!("consumer cancelled"),
                        Err(_) => continue,
                    };
                let mut last_tag = first.delivery_tag;
                let mut n = 1u64;
                while n < 128 {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => {
                            last_tag = d.delivery_tag;
                            n += 1;
                        }
                        _ => break,
                    }
                }
                channel
                    .basic_ack(last_tag, BasicAckOptions { multiple: true })
                    .await?;
                last_ack = Instant::now();
                consumed.fetch_add(n, Ordering::SeqCst);
            }
            let _ = channel.close(200, "done".into()).await;
            Ok(last_ack)
        })
    };

    let channel = amqp::confirm_channel(publisher_conn).await?;
    let meter = sys::CpuMeter::start();
    let start = Instant::now();
    let stop_at = start + plan.duration;
    let mut pending = std::collections::VecDeque::with_capacity(plan.publish_window);
    let mut n = 0u64;
    while Instant::now() < stop_at {
        if pending.len() >= plan.publish_window {
            amqp::settle(pending.pop_front()).await?;
        }
        let id = uuid::Uuid::now_v7().to_string();
        let ce = prodsys_messaging::CloudEvent {
            id: id.clone(),
            event_type: prodsys_core::events::cloudevent_type("request.received"),
            source: "/prodsys/bench".into(),
            specversion: "1.0".into(),
            time: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            subject: Some(id.clone()),
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                amqp::properties(&id, ce.to_headers()),
            )
            .await?;
        pending.push_back(confirm);
        n += 1;
        published.store(n, Ordering::SeqCst);
    }
    while let Some(c) = pending.pop_front() {
        amqp::settle(Some(c)).await?;
    }
    let confirmed_at = start.elapsed().as_secs_f64();
    publish_done.store(true, Ordering::SeqCst);
    let last_ack = consume_task.await.context("consumer task")??;
    let cpu = meter.stop();
    let _ = channel.close(200, "done".into()).await;
    let seconds = last_ack.duration_since(start).as_secs_f64();
    Ok(BrokerResult {
        messages: n,
        seconds,
        round_trip_per_s: n as f64 / seconds,
        publish_confirmed_per_s: n as f64 / confirmed_at,
        message_bytes,
        cpu,
    })
}

const TABLE: &str = "CREATE TABLE raw_rows (
    id         bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)";

/// Single-row INSERT+COMMIT at `plan.connections` connections, then batched
/// INSERTs of `plan.batch_rows` rows (unnest arrays) on one connection, in
/// the bench's own fresh database.
pub async fn database(env: &TestEnv, plan: RawPlan) -> anyhow::Result<DbResult> {
    let admin = env.db().await?;
    admin.batch_execute(TABLE).await?;
    let server_version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let mut settings = Vec::new();
    for name in [
        "synchronous_commit",
        "fsync",
        "wal_sync_method",
        "shared_buffers",
    ] {
        let row = admin.query_one(&format!("SHOW {name}"), &[]).await?;
        settings.push(format!("{name}={}", row.get::<_, String>(0)));
    }
    let payload = request_received_body();

    // Single-row commits.
    let mut clients = Vec::new();
    for _ in 0..plan.connections {
        clients.push(env.db().await?);
    }
    let meter = sys::CpuMeter::start();
    let start = Instant::now();
    let stop_at = start + plan.duration;
    let tasks = clients.into_iter().map(|mut client| {
        let payload = payload.clone();
        tokio::spawn(async move {
            let insert = client
                .prepare("INSERT INTO raw_rows (event_id, payload) VALUES ($1, $2)")
                .await?;
            let mut latencies = Vec::new();
            while Instant::now() < stop_at {
                let t = Instant::now();
                let tx = client.transaction().await?;
                tx.execute(&insert, &[&uuid::Uuid::now_v7(), &payload])
                    .await?;
                tx.commit().await?;
                latencies.push(t.elapsed());
            }
            // The client goes back too: its backend must outlive the CPU reading.
            anyhow::Ok((latencies, client))
        })
    });
    let mut latencies = Vec::new();
    let mut open = Vec::new();
    for result in futures::future::join_all(tasks).await {
        let (mine, client) = result.context("single-row task")??;
        latencies.extend(mine);
        open.push(client);
    }
    let single_seconds = start.elapsed().as_secs_f64();
    let single_cpu = meter.stop();
    drop(open);
    latencies.sort_unstable();
    let single_commits = latencies.len() as u64;

    // Batched inserts.
    let meter = sys::CpuMeter::start();
    let start = Instant::now();
    let stop_at = start + plan.duration;
    let insert = admin
        .prepare(
            "INSERT INTO raw_rows (event_id, payload)
             SELECT * FROM unnest($1::uuid[], $2::bytea[])",
        )
        .await?;
    let mut rows = 0u64;
    let payloads: Vec<&[u8]> = vec![payload.as_slice(); plan.batch_rows];
    while Instant::now() < stop_at {
        let ids: Vec<uuid::Uuid> = (0..plan.batch_rows).map(|_| uuid::Uuid::now_v7()).collect();
        let params: [&(dyn ToSql + Sync); 2] = [&ids, &payloads];
        rows += admin.execute(&insert, &params).await?;
    }
    let batch_seconds = start.elapsed().as_secs_f64();
    let batch_cpu = meter.stop();
    admin.batch_execute("DROP TABLE raw_rows").await?;

    Ok(DbResult {
        single_commits,
        single_seconds,
        single_per_s: single_commits as f64 / single_seconds,
        single_p50_ms: crate::percentile_ms(&latencies, 0.50),
        single_p99_ms: crate::percentile_ms(&latencies, 0.99),
        single_cpu,
        batch_rows: rows,
        batch_seconds,
        batch_rows_per_s: rows as f64 / batch_seconds,
        batch_cpu,
        row_bytes: payload.len(),
        server_version,
        settings: settings.join(", "),
    })
}
