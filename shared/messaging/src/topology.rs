//! Exchange and queue names, and their declaration.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

/// Names of the shared exchanges and of a service's queues, under a prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// Topic exchange of every prodsys event; routing key = short event type.
    pub fn events(&self) -> String {
        format!("{}prodsys.events", self.prefix)
    }

    /// Exchange where other ESFRI systems publish request CloudEvents.
    pub fn ingest(&self) -> String {
        format!("{}prodsys.ingest", self.prefix)
    }

    /// Direct exchange of dead letters; routing key = service name.
    pub fn dlx(&self) -> String {
        format!("{}prodsys.dlx", self.prefix)
    }

    /// Where events no queue is bound for go (the events exchange's
    /// alternate exchange), so they are kept for an operator instead of
    /// returned to the publisher and retried forever.
    pub fn unroutable(&self) -> String {
        format!("{}prodsys.unroutable", self.prefix)
    }

    pub fn queue(&self, service: &str) -> String {
        format!("{}prodsys.{service}", self.prefix)
    }

    pub fn dead_letter_queue(&self, service: &str) -> String {
        format!("{}prodsys.{service}.dlq", self.prefix)
    }
}

/// What one service declares: its queue, bound to the events it consumes.
#[derive(Debug, Clone)]
pub struct Topology {
    pub names: Names,
    pub service: String,
    /// Routing keys on `prodsys.events` the service's queue receives.
    pub bindings: Vec<String>,
    /// Routing keys on `prodsys.ingest` the service's queue receives.
    pub ingest_bindings: Vec<String>,
    pub delivery_limit: u32,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    for (key, value) in extra {
        args.insert((*key).into(), value.clone());
    }
    args
}

impl Topology {
    /// Declares exchanges, the service queue (quorum, delivery limit, dead-lettering)
    /// and its dead-letter queue. Idempotent: run after every (re)connect.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let names = &self.names;
        let queue_options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                names.unroutable().as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                names.unroutable().as_str().into(),
                queue_options,
                quorum_args(&[]),
            )
            .await?;
        channel
            .queue_bind(
                names.unroutable().as_str().into(),
                names.unroutable().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut events_args = FieldTable::default();
        events_args.insert("alternate-exchange".into(), text(&names.unroutable()));
        channel
            .exchange_declare(
                names.events().as_str().into(),
                ExchangeKind::Topic,
                durable,
                events_args,
            )
            .await?;
        channel
            .exchange_declare(
                names.ingest().as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                names.dlx().as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let dlq = names.dead_letter_queue(&self.service);
        channel
            .queue_declare(dlq.as_str().into(), queue_options, quorum_args(&[]))
            .await?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                names.dlx().as_str().into(),
                self.service.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let queue = names.queue(&self.service);
        let args = quorum_args(&[
            (
                "x-delivery-limit",
                AMQPValue::LongInt(self.delivery_limit as i32),
            ),
            ("x-dead-letter-exchange", text(&names.dlx())),
            ("x-dead-letter-routing-key", text(&self.service)),
        ]);
        channel
            .queue_declare(queue.as_str().into(), queue_options, args)
            .await?;
        let routes = self
            .bindings
            .iter()
            .map(|key| (names.events(), key))
            .chain(self.ingest_bindings.iter().map(|key| (names.ingest(), key)));
        for (exchange, key) in routes {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}
