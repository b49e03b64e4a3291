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
