//! The consumer runner. Business code sees batches of [`Incoming`] messages
//! and answers with an [`Outcome`] each; only this module acks, nacks and
//! dead-letters. What a failure does to a message depends on its kind:
//!
//! - **transient** (see [`crate::error::is_transient`]: a dependency down or
//!   timing out): the batch is *held* — kept unacknowledged, retried in
//!   process with backoff, the service reported NOT_SERVING through
//!   [`Holding`] — until it succeeds. A hold never spends the queue's delivery
//!   limit. After `hold_limit` (to stay well under the broker's
//!   `consumer_timeout`) the held messages are republished to the queue as
//!   fresh copies (with confirms) and the originals acknowledged; the inbox
//!   makes a copy of something that took effect harmless.
//! - **permanent** (the handler answers [`Outcome::DeadLetter`] for the
//!   message, or fails with [`HandlerError::Permanent`]; a batch failing so is
//!   split to find the message): dead-lettered at once, with the reason in a header.
//! - **anything else**: a batch that fails as a whole is retried one message
//!   at a time, so one poison message cannot hold back the others; a single
//!   message that still fails is requeued, and the queue's delivery limit
//!   dead-letters it in the end.
//!
//! On shutdown a consumer cancels its subscription, finishes the deliveries
//! it already holds (a held batch is republished instead of waited out) and
//! closes its channel.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, message::Delivery};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::envelope::{self, DEAD_LETTER_REASON, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY};
use crate::error::{HandlerError, is_transient};
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
    /// The publisher's broker user, when it said (AMQP `user_id`, which
    /// RabbitMQ refuses unless it is the publishing connection's user).
    pub user_id: Option<String>,
    pub headers: FieldTable,
    pub body: Vec<u8>,
    /// The CloudEvents attributes from the headers (binary mode), or why they are unusable.
    pub event: Result<CloudEvent, String>,
}

impl Incoming {
    fn from_delivery(delivery: Delivery) -> Self {
        let event = CloudEvent::from_properties(&delivery.properties);
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut exchange = delivery.exchange.as_str().to_string();
        let mut routing_key = delivery.routing_key.as_str().to_string();
        // A copy republished straight to the queue (after a hold, or a
        // replayed dead letter) names where it was first published.
        if exchange.is_empty() {
            let original = |name: &str| headers.inner().get(name).and_then(envelope::value_text);
            if let Some(key) = original(ORIGINAL_ROUTING_KEY) {
                routing_key = key;
                exchange = original(ORIGINAL_EXCHANGE).unwrap_or_default();
            }
        }
        Self {
            delivery_tag: delivery.delivery_tag,
            exchange,
            routing_key,
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
            user_id: delivery
                .properties
                .user_id()
                .as_ref()
                .map(|s| s.as_str().to_string()),
            headers,
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
    /// It failed for an unexpected reason: requeue (the delivery limit bounds
    /// retries). A failure known to pass is an error the classifier
    /// recognises, which holds the batch instead.
    Retry(String),
}

pub trait BatchHandler: Send + Sync + 'static {
    /// Handles `batch`, typically in one transaction; returns one outcome per
    /// delivery, in order. A transient error (a dependency down: see
    /// [`crate::error::is_transient`], or mark it with [`crate::Transient`])
    /// holds the batch and retries it; any other error retries the
    /// deliveries one by one.
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

/// How many consumers of a process hold a batch through a transient
/// failure right now. Health reports NOT_SERVING while any does.
#[derive(Clone, Debug)]
pub struct Holding(Arc<watch::Sender<usize>>);

impl Default for Holding {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Holding {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many consumers hold now.
    pub fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Follows the count.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.0.subscribe()
    }
}

/// One consumer's part in [`Holding`]: on from the first transient failure
/// until a batch succeeds again (not between two held batches, so health
/// does not flap while a dependency stays down).
struct HoldFlag {
    holding: Holding,
    on: bool,
}

impl HoldFlag {
    fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            self.holding
                .0
                .send_modify(|n| *n = if on { *n + 1 } else { n.saturating_sub(1) });
        }
    }
}

impl Drop for HoldFlag {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub queue: String,
    pub prefetch: u16,
    pub batch_size: usize,
    /// A batch closes once its bodies reach this many bytes (or at
    /// `batch_size` deliveries), whichever comes first.
    pub batch_bytes: usize,
    pub confirm_timeout: Duration,
    /// Longest a batch is held through a transient failure before its
    /// messages are republished as fresh copies (keep it well under the
    /// broker's `consumer_timeout`, 30 min by default).
    pub hold_limit: Duration,
    /// First and longest pause between two tries of a held batch.
    pub retry_start: Duration,
    pub retry_max: Duration,
    /// What the queue is bound to receive: anything else (a message put
    /// straight into the queue under another type, say) is dead-lettered
    /// before the handler sees it. `None` takes everything.
    pub accepts: Option<Accepts>,
}

/// The deliveries a queue is meant to receive: events of `event_types` from
/// `events_exchange`, and anything from `other_exchanges` (ingest, whose
/// handler checks the CloudEvents type itself).
#[derive(Debug, Clone, Default)]
pub struct Accepts {
    pub events_exchange: String,
    pub event_types: Vec<String>,
    pub other_exchanges: Vec<String>,
}

impl Accepts {
    /// Why `incoming` is not for this queue, if it is not.
    pub fn refusal(&self, incoming: &Incoming) -> Option<String> {
        if self.other_exchanges.contains(&incoming.exchange) {
            return None;
        }
        if incoming.exchange == self.events_exchange
            && self.event_types.contains(&incoming.routing_key)
        {
            return None;
        }
        Some(format!(
            "this queue takes {} events from {:?}, not {:?} from {:?}",
            self.event_types.join(", "),
            self.events_exchange,
            incoming.routing_key,
            incoming.exchange
        ))
    }
}

impl ConsumerSettings {
    pub fn new(queue: String, prefetch: u16, batch_size: usize, confirm_timeout: Duration) -> Self {
        Self {
            queue,
            prefetch,
            batch_size,
            batch_bytes: usize::MAX,
            confirm_timeout,
            hold_limit: Duration::from_secs(300),
            retry_start: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            accepts: None,
        }
    }
}

/// What is done with one delivery once decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Ack,
    DeadLetter(String),
    Requeue,
    /// Held too long (or held at shutdown): publish a fresh copy to the
    /// queue, then acknowledge this delivery.
    Republish,
}

impl From<Outcome> for Verdict {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Ack => Verdict::Ack,
            Outcome::DeadLetter(reason) => Verdict::DeadLetter(reason),
            Outcome::Retry(_) => Verdict::Requeue,
        }
    }
}

/// How a held batch ended.
enum Held {
    Done(Vec<Outcome>),
    Republish,
    /// A non-transient error after all: the caller's ordinary path decides.
    Failed(anyhow::Error),
    /// The channel went away: the broker has requeued the deliveries.
    Lost,
}

/// One consumer's state.
struct Runner<'a, H> {
    broker: &'a Broker,
    settings: &'a ConsumerSettings,
    handler: &'a H,
    publisher: Publisher,
    service: String,
    flag: HoldFlag,
    shutdown: &'a CancellationToken,
}

/// Consumes `settings.queue` until `shutdown`, surviving broker restarts.
/// `holding` learns when this consumer holds a batch through an outage.
pub async fn run_consumer<H: BatchHandler>(
    broker: Broker,
    settings: ConsumerSettings,
    handler: H,
    holding: Holding,
    shutdown: CancellationToken,
) {
    let mut runner = Runner {
        broker: &broker,
        settings: &settings,
        handler: &handler,
        publisher: Publisher::new(broker.clone(), settings.confirm_timeout),
        service: broker.topology().service.clone(),
        flag: HoldFlag { holding, on: false },
        shutdown: &shutdown,
    };
    let mut reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        let (channel, mut consumer) = match open(&broker, &settings).await {
            Ok(pair) => pair,
            Err(error) => {
                let wait = reconnect.next_wait();
                tracing::warn!(queue = %settings.queue, error = format!("{error:#}"), retry_in_ms = wait.as_millis() as u64, "cannot consume; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
        };
        reconnect.reset();
        tracing::info!(queue = %settings.queue, "consuming");
        let mut stopping = false;
        loop {
            let first = if stopping {
                // Everything sent before the cancel-ok has arrived by now.
                match consumer.next().now_or_never() {
                    Some(Some(next)) => Some(next),
                    _ => break,
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Stop the broker sending more; finish what has arrived.
                        stopping = true;
                        let tag = consumer.tag();
                        if let Err(error) = channel
                            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                            .await
                        {
                            tracing::warn!(queue = %settings.queue, %error, "cancelling the subscription failed");
                            break;
                        }
                        continue;
                    }
                    next = consumer.next() => next,
                }
            };
            let first = match first {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(queue = %settings.queue, %error, "consumer failed; reconnecting");
                    break;
                }
                None => {
                    if !stopping {
                        tracing::warn!(queue = %settings.queue, "consumer cancelled; reconnecting");
                    }
                    break;
                }
            };
            let mut batch = vec![Incoming::from_delivery(first)];
            let mut bytes = batch[0].body.len();
            // Take what has already arrived, without waiting for more, up
            // to the batch's count and bytes.
            while batch.len() < settings.batch_size && bytes < settings.batch_bytes {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => {
                        bytes += delivery.data.len();
                        batch.push(Incoming::from_delivery(delivery));
                    }
                    _ => break,
                }
            }
            let Some(verdicts) = runner.decide_accepted(&channel, &batch).await else {
                tracing::warn!(queue = %settings.queue, "channel lost while holding; reconnecting");
                break;
            };
            if let Err(error) = runner.settle(&channel, &batch, verdicts).await {
                tracing::warn!(queue = %settings.queue, error = format!("{error:#}"), "settling deliveries failed; they will be redelivered");
                break;
            }
        }
        let _ = channel.close(200, "consumer stopping".into()).await;
    }
    tracing::info!(queue = %settings.queue, "consumer stopped");
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

impl<H: BatchHandler> Runner<'_, H> {
    /// As [`Runner::decide`], after dead-lettering what the queue is not
    /// meant to receive: the handler sees only the rest.
    async fn decide_accepted(
        &mut self,
        channel: &Channel,
        batch: &[Incoming],
    ) -> Option<Vec<Verdict>> {
        let Some(accepts) = self.settings.accepts.as_ref() else {
            return self.decide(channel, batch).await;
        };
        let refusals: Vec<Option<String>> = batch.iter().map(|i| accepts.refusal(i)).collect();
        if refusals.iter().all(Option::is_none) {
            return self.decide(channel, batch).await;
        }
        let taken: Vec<Incoming> = batch
            .iter()
            .zip(&refusals)
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| i.clone())
            .collect();
        let mut decided = if taken.is_empty() {
            Vec::new()
        } else {
            self.decide(channel, &taken).await?
        }
        .into_iter();
        Some(
            refusals
                .into_iter()
                .map(|refusal| match refusal {
                    Some(reason) => Verdict::DeadLetter(reason),
                    None => decided.next().unwrap_or(Verdict::Requeue),
                })
                .collect(),
        )
    }

    /// The verdict on every delivery of `batch`; `None` when the channel was
    /// lost while holding (the broker then has them back).
    async fn decide(&mut self, channel: &Channel, batch: &[Incoming]) -> Option<Vec<Verdict>> {
        let started = Instant::now();
        let handled = self.handler.handle(batch).await;
        prodsys_telemetry::metrics::metrics().batch_handled(
            &self.service,
            batch.len(),
            started.elapsed().as_secs_f64(),
        );
        let error = match handled {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                self.flag.set(false);
                return Some(outcomes.into_iter().map(Verdict::from).collect());
            }
            Ok(outcomes) => {
                tracing::error!(
                    expected = batch.len(),
                    got = outcomes.len(),
                    "handler answered the wrong number of outcomes"
                );
                None
            }
            Err(error) => Some(error),
        };
        let error = match error {
            Some(error) if is_transient(&error) => match self.hold(channel, batch, error).await {
                Held::Done(outcomes) => {
                    return Some(outcomes.into_iter().map(Verdict::from).collect());
                }
                Held::Republish => return Some(vec![Verdict::Republish; batch.len()]),
                Held::Lost => return None,
                Held::Failed(error) => Some(error),
            },
            other => other,
        };
        if batch.len() == 1 {
            return Some(vec![self.failed_alone(error).await]);
        }
        if let Some(error) = &error {
            tracing::warn!(
                error = format!("{error:#}"),
                size = batch.len(),
                "batch failed; retrying one by one"
            );
        }
        let mut verdicts = Vec::with_capacity(batch.len());
        for one in batch.chunks(1) {
            let verdict = match self.handler.handle(one).await {
                Ok(mut single) if single.len() == 1 => {
                    self.flag.set(false);
                    Verdict::from(single.remove(0))
                }
                Ok(_) => self.failed_alone(None).await,
                Err(error) if is_transient(&error) => match self.hold(channel, one, error).await {
                    Held::Done(mut single) if single.len() == 1 => Verdict::from(single.remove(0)),
                    Held::Done(_) => self.failed_alone(None).await,
                    Held::Republish => Verdict::Republish,
                    Held::Lost => return None,
                    Held::Failed(error) => self.failed_alone(Some(error)).await,
                },
                Err(error) => self.failed_alone(Some(error)).await,
            };
            verdicts.push(verdict);
        }
        Some(verdicts)
    }

    /// The verdict on one message whose handling failed (not transiently):
    /// dead-lettered when the handler says it can never succeed
    /// ([`HandlerError::Permanent`]), otherwise requeued after a pause.
    async fn failed_alone(&self, error: Option<anyhow::Error>) -> Verdict {
        if let Some(HandlerError::Permanent(reason)) = error
            .as_ref()
            .and_then(|e| e.downcast_ref::<HandlerError>())
        {
            return Verdict::DeadLetter(reason.clone());
        }
        let reason = match error {
            Some(error) => format!("{error:#}"),
            None => "handler answered the wrong number of outcomes".into(),
        };
        tracing::warn!(error = %reason, "delivery failed; requeueing after a pause");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = self.shutdown.cancelled() => {}
        }
        Verdict::Requeue
    }

    /// Holds `batch` after a transient failure: retries it with backoff
    /// until it succeeds, fails otherwise, the hold limit passes, the
    /// service shuts down or the channel is lost.
    async fn hold(&mut self, channel: &Channel, batch: &[Incoming], error: anyhow::Error) -> Held {
        self.flag.set(true);
        prodsys_telemetry::metrics::metrics().batch_held(&self.service);
        let started = Instant::now();
        let mut backoff = Backoff::new(self.settings.retry_start, self.settings.retry_max);
        let mut tries = 1u32;
        tracing::warn!(queue = %self.settings.queue, size = batch.len(), error = format!("{error:#}"),
            "transient failure; holding the batch and retrying (NOT_SERVING meanwhile)");
        loop {
            let wait = backoff.next_wait();
            if started.elapsed() + wait > self.settings.hold_limit {
                tracing::warn!(queue = %self.settings.queue, size = batch.len(), tries,
                    "held for the hold limit; republishing the batch");
                return Held::Republish;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return Held::Republish,
            }
            if !channel.status().connected() {
                return Held::Lost;
            }
            tries += 1;
            match self.handler.handle(batch).await {
                Ok(outcomes) if outcomes.len() == batch.len() => {
                    self.flag.set(false);
                    tracing::info!(queue = %self.settings.queue, tries,
                        held_ms = started.elapsed().as_millis() as u64, "held batch handled; resuming");
                    return Held::Done(outcomes);
                }
                Ok(_) => {
                    return Held::Failed(anyhow::anyhow!(
                        "handler answered the wrong number of outcomes"
                    ));
                }
                Err(error) if is_transient(&error) => {
                    tracing::debug!(queue = %self.settings.queue, tries, error = format!("{error:#}"), "still failing; holding");
                }
                Err(error) => return Held::Failed(error),
            }
        }
    }

    async fn settle(
        &self,
        channel: &Channel,
        batch: &[Incoming],
        verdicts: Vec<Verdict>,
    ) -> anyhow::Result<()> {
        let copies: Vec<Outgoing> = batch
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Verdict::Republish)
            .map(|(incoming, _)| republished(&self.settings.queue, incoming))
            .collect();
        let republished = match self.publisher.publish(&copies).await {
            Ok(()) => true,
            Err(error) => {
                // Leave them to the broker (closing the channel requeues them).
                tracing::warn!(
                    error = format!("{error:#}"),
                    "republishing held messages failed"
                );
                false
            }
        };
        // What was decided, before dead letters and copies become acks.
        let decided: Vec<&'static str> = verdicts
            .iter()
            .map(|v| match v {
                Verdict::Ack => "ack",
                Verdict::DeadLetter(_) => "dead_letter",
                Verdict::Requeue => "requeue",
                Verdict::Republish => "republish",
            })
            .collect();
        let mut settled = Vec::with_capacity(batch.len());
        for (incoming, verdict) in batch.iter().zip(verdicts) {
            let verdict = match verdict {
                Verdict::DeadLetter(reason) => {
                    tracing::warn!(routing_key = %incoming.routing_key, %reason, "dead-lettering");
                    let letter = dead_letter(self.broker, &self.service, incoming, &reason);
                    match self.publisher.publish(std::slice::from_ref(&letter)).await {
                        Ok(()) => Verdict::Ack,
                        Err(error) => {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "dead-lettering failed; requeueing"
                            );
                            Verdict::Requeue
                        }
                    }
                }
                Verdict::Republish if republished => Verdict::Ack,
                Verdict::Republish => anyhow::bail!("held messages could not be republished"),
                other => other,
            };
            settled.push(verdict);
        }
        // Each delivery under what was decided for it, or "requeue" where
        // a dead letter or a copy could not be published.
        let metrics = prodsys_telemetry::metrics::metrics();
        let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
        for (kind, verdict) in decided.iter().zip(&settled) {
            let kind = if *verdict == Verdict::Ack {
                kind
            } else {
                "requeue"
            };
            *counts.entry(kind).or_default() += 1;
        }
        for (kind, n) in counts {
            metrics.settled(&self.service, kind, n);
        }
        if settled.iter().all(|v| *v == Verdict::Ack) {
            let last = batch.last().map(|i| i.delivery_tag).unwrap_or_default();
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
            return Ok(());
        }
        for (incoming, verdict) in batch.iter().zip(settled) {
            match verdict {
                Verdict::Ack => {
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
}

/// A fresh copy of a held message, straight to `queue` (the default
/// exchange), naming where it was first published so the handler sees the
/// same routing key. A new message starts with a fresh delivery count.
fn republished(queue: &str, incoming: &Incoming) -> Outgoing {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut headers = incoming.headers.clone();
    headers.insert(ORIGINAL_ROUTING_KEY.into(), text(&incoming.routing_key));
    headers.insert(ORIGINAL_EXCHANGE.into(), text(&incoming.exchange));
    // The broker's own count of the original; the copy starts over.
    let mut inner = headers.inner().clone();
    inner.remove("x-delivery-count");
    Outgoing {
        exchange: String::new(),
        routing_key: queue.to_string(),
        message_id: incoming.message_id.clone().unwrap_or_default(),
        content_type: incoming
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
        headers: FieldTable::from(inner),
        body: incoming.body.clone(),
        mandatory: true,
        reply_to: incoming.reply_to.clone(),
    }
}

fn dead_letter(broker: &Broker, service: &str, incoming: &Incoming, reason: &str) -> Outgoing {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    // A bearer token (an ingest event's `authorization` header) is a
    // credential: it is not kept where operators list and show messages.
    let mut kept = incoming.headers.inner().clone();
    kept.retain(|name, _| !name.as_str().eq_ignore_ascii_case("authorization"));
    let mut headers = FieldTable::from(kept);
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
        reply_to: incoming.reply_to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(exchange: &str, routing_key: &str) -> Incoming {
        Incoming {
            delivery_tag: 1,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            redelivered: false,
            message_id: None,
            content_type: None,
            reply_to: None,
            user_id: None,
            headers: FieldTable::default(),
            body: Vec::new(),
            event: Err("none".into()),
        }
    }

    #[test]
    fn a_queue_takes_only_what_it_is_bound_to() {
        let accepts = Accepts {
            events_exchange: "p.prodsys.events".into(),
            event_types: vec!["request.received".into()],
            other_exchanges: vec!["p.prodsys.ingest".into()],
        };
        assert_eq!(
            accepts.refusal(&incoming("p.prodsys.events", "request.received")),
            None
        );
        // Ingest carries any routing key; its handler checks the type.
        assert_eq!(
            accepts.refusal(&incoming("p.prodsys.ingest", "anything")),
            None
        );
        // Another event type, another prefix's exchange, or a message put
        // straight into the queue (default exchange) are refused by name.
        let refused = accepts
            .refusal(&incoming("p.prodsys.events", "job.status"))
            .unwrap();
        assert!(refused.contains("\"job.status\""), "{refused}");
        assert!(
            accepts
                .refusal(&incoming("q.prodsys.events", "request.received"))
                .is_some()
        );
        assert!(
            accepts
                .refusal(&incoming("", "p.prodsys.checker"))
                .is_some()
        );
    }
}
