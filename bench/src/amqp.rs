//! Publishing as prodsys does (persistent, mandatory, CloudEvents headers in
//! binary mode, publisher confirms), with a sliding window of outstanding
//! confirms, and reading queue depths.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use prodsys_messaging::CloudEvent;
use prodsys_messaging::envelope::SPEC_VERSION;

pub const CONTENT_TYPE: &str = "application/protobuf";
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, properties),
    )
    .await
    .context("connecting to RabbitMQ timed out")?
    .context("connecting to RabbitMQ")
}

pub async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// A prodsys event: the CloudEvents attributes as `envelope.rs` writes them,
/// and the AMQP properties the prodsys publisher sets.
pub fn event(exchange: &str, short_type: &str, subject: &str, body: Vec<u8>) -> Message {
    let id = uuid::Uuid::now_v7().to_string();
    let ce = CloudEvent {
        id: id.clone(),
        event_type: prodsys_core::events::cloudevent_type(short_type),
        source: "/prodsys/bench".into(),
        specversion: SPEC_VERSION.into(),
        time: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        subject: Some(subject.to_string()),
    };
    Message {
        exchange: exchange.to_string(),
        routing_key: short_type.to_string(),
        properties: properties(&id, ce.to_headers()),
        body,
    }
}

pub fn properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_headers(headers)
}

/// Publishes `messages` keeping at most `window` unconfirmed; returns once all
/// are confirmed. A nack or a returned (unroutable) message is an error.
pub async fn publish_all(
    channel: &Channel,
    messages: impl IntoIterator<Item = Message>,
    window: usize,
) -> anyhow::Result<u64> {
    let mut pending = VecDeque::with_capacity(window);
    let mut sent = 0u64;
    for message in messages {
        if pending.len() >= window {
            settle(pending.pop_front()).await?;
        }
        let confirm = channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message.body,
                message.properties,
            )
            .await
            .context("publishing")?;
        pending.push_back(confirm);
        sent += 1;
    }
    while let Some(confirm) = pending.pop_front() {
        settle(Some(confirm)).await?;
    }
    Ok(sent)
}

pub async fn settle(confirm: Option<lapin::PublisherConfirm>) -> anyhow::Result<()> {
    let Some(confirm) = confirm else {
        return Ok(());
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .context("no broker confirm within 30 s")?
        .context("waiting for a confirm")?
    {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a message was unroutable"),
        Confirmation::Nack(_) => bail!("the broker refused a message"),
        Confirmation::NotRequested => bail!("confirms are not enabled"),
    }
}

/// Ready messages in `queue` (a passive declare; the queue must exist).
pub async fn depth(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// What a [`Tap`] saw.
#[derive(Debug, Clone, Default)]
pub struct TapResult {
    pub messages: u64,
    pub bytes: u64,
    /// The largest body seen, and its exchange and routing key.
    pub largest: u64,
    pub largest_key: String,
}

/// A copy of every message published to the prefix's topic exchanges
/// (`prodsys.events` and `prodsys.ingest`): an exclusive queue of the
/// bench's own bound with `#`, consumed without acks, keeping only the
/// count and the sizes of the bodies.
pub struct Tap {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<TapResult>,
}

impl Tap {
    pub async fn start(connection: &Connection, prefix: &str) -> anyhow::Result<Self> {
        use futures::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
        let channel = connection.create_channel().await?;
        let queue = format!("{prefix}bench.tap.{}", uuid::Uuid::new_v4().simple());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for exchange in ["prodsys.events", "prodsys.ingest"] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    format!("{prefix}{exchange}").as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = TapResult::default();
            let mut drained = false;
            loop {
                let next = if drained {
                    // Told to stop: what is already queued still counts.
                    match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                } else {
                    tokio::select! {
                        _ = token.cancelled() => { drained = true; continue; }
                        next = consumer.next() => next,
                    }
                };
                let Some(Ok(delivery)) = next else { break };
                let size = delivery.data.len() as u64;
                seen.messages += 1;
                seen.bytes += size;
                if size > seen.largest {
                    seen.largest = size;
                    seen.largest_key = format!(
                        "{} {}",
                        delivery.exchange.as_str(),
                        delivery.routing_key.as_str()
                    );
                }
            }
            let _ = channel.close(200, "done".into()).await;
            seen
        });
        Ok(Self { stop, task })
    }

    /// Stops after what is already queued has been read.
    pub async fn finish(self) -> TapResult {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}
