//! Publishing with confirms: persistent, mandatory, many messages in flight,
//! then every confirm awaited under one timeout. Success means the broker
//! stored every message in at least one queue.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::Mutex;

use crate::{Broker, CloudEvent};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub content_type: String,
    pub headers: FieldTable,
    pub body: Vec<u8>,
    /// Refuse the publish when no queue takes it. Events are mandatory;
    /// replies to a caller's queue are not (the caller may have gone).
    pub mandatory: bool,
    /// The queue an answer should go to (AMQP `reply_to`), kept when a
    /// message is republished or dead-lettered.
    pub reply_to: Option<String>,
}

impl Outgoing {
    /// A CloudEvent in binary mode: attributes in headers, payload as body.
    pub fn event(
        exchange: String,
        routing_key: &str,
        event: &CloudEvent,
        content_type: &str,
        body: Vec<u8>,
    ) -> Self {
        Self {
            exchange,
            routing_key: routing_key.to_string(),
            message_id: event.id.clone(),
            content_type: content_type.to_string(),
            headers: event.to_headers(),
            body,
            mandatory: true,
            reply_to: None,
        }
    }
}

pub struct Publisher {
    broker: Broker,
    channel: Mutex<Option<Channel>>,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(broker: Broker, confirm_timeout: Duration) -> Self {
        Self {
            broker,
            channel: Mutex::new(None),
            confirm_timeout,
        }
    }

    /// Publishes all `messages` and returns once each is confirmed; any nack,
    /// unroutable return or timeout fails the whole call (callers retry, and
    /// consumers are idempotent, so a repeat is harmless).
    pub async fn publish(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut slot = self.channel.lock().await;
        let result = self.publish_on(&mut slot, messages).await;
        if result.is_err() {
            // A channel that failed a publish is not trusted again.
            if let Some(channel) = slot.take() {
                let _ = channel.close(200, "publish failed".into()).await;
            }
        }
        result
    }

    async fn publish_on(
        &self,
        slot: &mut Option<Channel>,
        messages: &[Outgoing],
    ) -> anyhow::Result<()> {
        if slot.as_ref().is_none_or(|c| !c.status().connected()) {
            let channel = self.broker.channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("enabling publisher confirms")?;
            *slot = Some(channel);
        }
        let channel = slot.as_ref().context("no channel")?;
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(message.content_type.as_str().into())
                .with_message_id(message.message_id.as_str().into())
                .with_timestamp(chrono::Utc::now().timestamp() as u64)
                .with_headers(message.headers.clone());
            if let Some(reply_to) = &message.reply_to {
                properties = properties.with_reply_to(reply_to.as_str().into());
            }
            let confirm = channel
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..Default::default()
                    },
                    &message.body,
                    properties,
                )
                .await
                .with_context(|| format!("publishing {}", message.routing_key))?;
            confirms.push(confirm);
        }
        let all = futures::future::join_all(confirms);
        let results = tokio::time::timeout(self.confirm_timeout, all)
            .await
            .with_context(|| format!("no broker confirm within {:?}", self.confirm_timeout))?;
        for (result, message) in results.into_iter().zip(messages) {
            match result.context("waiting for the broker confirm")? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => bail!(
                    "{} to {} was unroutable: no queue is bound",
                    message.routing_key,
                    message.exchange
                ),
                Confirmation::Nack(_) => bail!("broker refused {}", message.routing_key),
                Confirmation::NotRequested => bail!("confirms are not enabled on the channel"),
            }
        }
        Ok(())
    }
}
