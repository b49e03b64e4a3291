//! The consumer runner. Business code sees batches of [`Incoming`] messages
//! and answers with an [`Outcome`] each; only this module acks, nacks and
//! dead-letters. A batch that fails as a whole is retried one message at a
//! time, so one poison message cannot hold back the others.

use std::future::Future;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, message::Delivery};
use tokio_util::sync::CancellationToken;

use crate::envelope::{self, DEAD_LETTER_REASON, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY};
use crate::{Broker, CloudEvent, Outgoing, Publisher};

/// A delivery as business code sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub delivery_tag: u64,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    /// The caller's queue for an answer (AMQP `reply_to`).
    pub reply_to: Option<String>,
    pub headers: FieldTable,
    pub body: Vec<u8>,
    /// The CloudEvents attributes from the headers (binary mode), or why they are unusable.
    pub event: Result<CloudEvent, String>,
}

impl Incoming {
    fn from_delivery(delivery: Delivery) -> Self {
        let event = CloudEvent::from_properties(&delivery.properties);
        Self {
            delivery_tag: delivery.delivery_tag,
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            redelivered: delivery.redelivered,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            reply_to: delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            headers: delivery.properties.headers().clone().unwrap_or_default(),
            body: delivery.data,
            event,
        }
    }

    /// A header's text value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .inner()
            .get(name)
            .and_then(envelope::value_text)
    }
}

/// What to do with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect is committed (or it was a duplicate): acknowledge.
    Ack,
    /// It can never succeed: move it to the dead-letter queue with the reason.
    DeadLetter(String),
    /// It failed for a reason that may pass: requeue (the delivery limit bounds retries).
    Retry(String),
}

pub trait BatchHandler: Send + Sync + 'static {
    /// Handles `batch`, typically in one transaction; returns one outcome per
    /// delivery, in order. An error retries the deliveries one by one.
    fn handle(
        &self,
        batch: &[Incoming],
    ) -> impl Future<Output = anyhow::Result<Vec<Outcome>>> + Send;
}

/// One handler shared by several consumers of the same queue.
impl<H: BatchHandler> BatchHandler for std::sync::Arc<H> {
    fn handle(
        &self,
        batch: &[Incoming],
    ) -> impl Future<Output = anyhow::Result<Vec<Outcome>>> + Send {
        H::handle(self, batch)
    }
}

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub queue: String,
    pub prefetch: u16,
    pub batch_size: usize,
    pub confirm_timeout: Duration,
}

/// Consumes `settings.queue` until `shutdown`, surviving broker restarts.
pub async fn run_consumer<H: BatchHandler>(
    broker: Broker,
    settings: ConsumerSettings,
    handler: H,
    shutdown: CancellationToken,
) {
    let dead_letters = Publisher::new(broker.clone(), settings.confirm_timeout);
    let service = broker.topology().service.clone();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let channel = match open(&broker, &settings).await {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(queue = %settings.queue, error = format!("{error:#}"), "cannot consume; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let (channel, mut consumer) = channel;
        tracing::info!(queue = %settings.queue, "consuming");
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = consumer.next() => next,
            };
            let first = match first {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(queue = %settings.queue, %error, "consumer failed; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!(queue = %settings.queue, "consumer cancelled; reconnecting");
                    break;
                }
            };
            let mut batch = vec![Incoming::from_delivery(first)];
            // Take what has already arrived, without waiting for more.
            while batch.len() < settings.batch_size {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(Incoming::from_delivery(delivery)),
                    _ => break,
                }
            }
            let outcomes = decide(&handler, &batch).await;
            if let Err(error) =
                settle(&channel, &dead_letters, &broker, &service, &batch, outcomes).await
            {
                tracing::warn!(queue = %settings.queue, error = format!("{error:#}"), "settling deliveries failed; they will be redelivered");
                break;
            }
        }
        let _ = channel.close(200, "consumer restarting".into()).await;
    }
}

async fn open(
    broker: &Broker,
    settings: &ConsumerSettings,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let channel = broker.channel().await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            settings.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

async fn decide<H: BatchHandler>(handler: &H, batch: &[Incoming]) -> Vec<Outcome> {
    match handler.handle(batch).await {
        Ok(outcomes) if outcomes.len() == batch.len() => return outcomes,
        Ok(outcomes) => tracing::error!(
            expected = batch.len(),
            got = outcomes.len(),
            "handler answered the wrong number of outcomes"
        ),
        Err(error) if batch.len() > 1 => {
            tracing::warn!(
                error = format!("{error:#}"),
                size = batch.len(),
                "batch failed; retrying one by one"
            )
        }
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "delivery failed; requeueing after a pause"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            return vec![Outcome::Retry(format!("{error:#}"))];
        }
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    for one in batch.chunks(1) {
        let outcome = match handler.handle(one).await {
            Ok(mut single) if single.len() == 1 => single.remove(0),
            Ok(_) => Outcome::Retry("handler answered the wrong number of outcomes".into()),
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "delivery failed; requeueing after a pause"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
                Outcome::Retry(format!("{error:#}"))
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

async fn settle(
    channel: &Channel,
    dead_letters: &Publisher,
    broker: &Broker,
    service: &str,
    batch: &[Incoming],
    outcomes: Vec<Outcome>,
) -> anyhow::Result<()> {
    let mut settled = Vec::with_capacity(batch.len());
    for (incoming, outcome) in batch.iter().zip(outcomes) {
        let outcome = match outcome {
            Outcome::DeadLetter(reason) => {
                tracing::warn!(routing_key = %incoming.routing_key, %reason, "dead-lettering");
                let letter = dead_letter(broker, service, incoming, &reason);
                match dead_letters.publish(std::slice::from_ref(&letter)).await {
                    Ok(()) => Outcome::Ack,
                    Err(error) => Outcome::Retry(format!("dead-lettering failed: {error:#}")),
                }
            }
            other => other,
        };
        settled.push(outcome);
    }
    if settled.iter().all(|o| *o == Outcome::Ack) {
        let last = batch.last().map(|i| i.delivery_tag).unwrap_or_default();
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
        return Ok(());
    }
    for (incoming, outcome) in batch.iter().zip(settled) {
        match outcome {
            Outcome::Ack => {
                channel
                    .basic_ack(incoming.delivery_tag, BasicAckOptions::default())
                    .await?
            }
            _ => {
                channel
                    .basic_nack(
                        incoming.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await?
            }
        }
    }
    Ok(())
}

fn dead_letter(broker: &Broker, service: &str, incoming: &Incoming, reason: &str) -> Outgoing {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut headers = incoming.headers.clone();
    headers.insert(DEAD_LETTER_REASON.into(), text(reason));
    headers.insert(ORIGINAL_ROUTING_KEY.into(), text(&incoming.routing_key));
    headers.insert(ORIGINAL_EXCHANGE.into(), text(&incoming.exchange));
    Outgoing {
        exchange: broker.topology().names.dlx(),
        routing_key: service.to_string(),
        message_id: incoming.message_id.clone().unwrap_or_default(),
        content_type: incoming
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
        headers,
        body: incoming.body.clone(),
        mandatory: true,
    }
}
