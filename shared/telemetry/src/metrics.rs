//! The process's own figures, through `prometheus-client`: what each
//! service's consumer takes and decides, how long its handler takes, how
//! many messages wait in its queue (consumer lag), how long an event waits in
//! its outbox before the broker confirms it (relay latency) and how many
//! wait there (outbox depth). Every figure carries the service's name, so a
//! process running several services tells them apart. Each service serves
//! them at `/metrics` on its gRPC port (HTTP/1.1), in the OpenMetrics text
//! format; status adds its read model's gauges.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub service: String,
    /// ack, dead_letter, requeue, republish.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstallationLabel {
    pub installation: String,
}

/// Every figure of the process.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<OutcomeLabels, Counter>,
    batch_size: Family<ServiceLabel, Histogram>,
    handle_seconds: Family<ServiceLabel, Histogram>,
    held_batches: Family<ServiceLabel, Counter>,
    queue_ready: Family<ServiceLabel, Gauge>,
    queue_consumers: Family<ServiceLabel, Gauge>,
    published: Family<ServiceLabel, Counter>,
    relay_latency: Family<ServiceLabel, Histogram>,
    outbox_depth: Family<ServiceLabel, Gauge>,
    scheduler_rounds: Family<InstallationLabel, Counter>,
}

fn batch_buckets() -> Histogram {
    // 1, 2, 4, … 2048 messages.
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn seconds_buckets() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "prodsys_consumer_deliveries",
            "Deliveries a service's consumer settled, by outcome",
            deliveries.clone(),
        );
        let batch_size = Family::<ServiceLabel, Histogram>::new_with_constructor(
            batch_buckets as fn() -> Histogram,
        );
        registry.register(
            "prodsys_consumer_batch_size",
            "Deliveries per batch handed to a service's handler",
            batch_size.clone(),
        );
        let handle_seconds = Family::<ServiceLabel, Histogram>::new_with_constructor(
            seconds_buckets as fn() -> Histogram,
        );
        registry.register(
            "prodsys_consumer_handle_seconds",
            "Time a service's handler took per batch (one transaction, usually)",
            handle_seconds.clone(),
        );
        let held_batches = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "prodsys_consumer_held_batches",
            "Batches held through a transient failure of a dependency",
            held_batches.clone(),
        );
        let queue_ready = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "prodsys_queue_ready_messages",
            "Messages waiting in the service's queue (consumer lag), sampled every few seconds",
            queue_ready.clone(),
        );
        let queue_consumers = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "prodsys_queue_consumers",
            "Consumers of the service's queue, every replica's, sampled every few seconds",
            queue_consumers.clone(),
        );
        let published = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "prodsys_outbox_published_events",
            "Outbox events the relay published and the broker confirmed",
            published.clone(),
        );
        let relay_latency = Family::<ServiceLabel, Histogram>::new_with_constructor(
            seconds_buckets as fn() -> Histogram,
        );
        registry.register(
            "prodsys_outbox_relay_latency_seconds",
            "From an event's commit in the outbox to the broker's confirm",
            relay_latency.clone(),
        );
        let outbox_depth = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "prodsys_outbox_depth",
            "Events committed in the service's outbox and not yet confirmed by the broker, sampled every few seconds",
            outbox_depth.clone(),
        );
        let scheduler_rounds = Family::<InstallationLabel, Counter>::default();
        registry.register(
            "prodsys_dispatcher_scheduler_rounds",
            "Rounds (in-flight poll, cancels, submission) the dispatcher's scheduler of an installation ran",
            scheduler_rounds.clone(),
        );
        Self {
            registry,
            deliveries,
            batch_size,
            handle_seconds,
            held_batches,
            queue_ready,
            queue_consumers,
            published,
            relay_latency,
            outbox_depth,
            scheduler_rounds,
        }
    }

    fn service(service: &str) -> ServiceLabel {
        ServiceLabel {
            service: service.to_string(),
        }
    }

    /// A batch of `size` deliveries was handled in `seconds`.
    pub fn batch_handled(&self, service: &str, size: usize, seconds: f64) {
        let label = Self::service(service);
        self.batch_size.get_or_create(&label).observe(size as f64);
        self.handle_seconds.get_or_create(&label).observe(seconds);
    }

    /// `count` deliveries were settled with `outcome`.
    pub fn settled(&self, service: &str, outcome: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.deliveries
            .get_or_create(&OutcomeLabels {
                service: service.to_string(),
                outcome: outcome.to_string(),
            })
            .inc_by(count);
    }

    /// A batch was held through a transient failure.
    pub fn batch_held(&self, service: &str) {
        self.held_batches
            .get_or_create(&Self::service(service))
            .inc();
    }

    /// The service's queue, as the broker counts it.
    pub fn queue(&self, service: &str, ready: u32, consumers: u32) {
        let label = Self::service(service);
        self.queue_ready.get_or_create(&label).set(ready as i64);
        self.queue_consumers
            .get_or_create(&label)
            .set(consumers as i64);
    }

    /// Events confirmed by the broker, each with its time in the outbox.
    pub fn relayed(&self, service: &str, waits_seconds: impl IntoIterator<Item = f64>) {
        let label = Self::service(service);
        let histogram = self.relay_latency.get_or_create(&label);
        let mut n = 0;
        for wait in waits_seconds {
            histogram.observe(wait.max(0.0));
            n += 1;
        }
        self.published.get_or_create(&label).inc_by(n);
    }

    /// Events waiting in the service's outbox.
    pub fn outbox(&self, service: &str, depth: i64) {
        self.outbox_depth
            .get_or_create(&Self::service(service))
            .set(depth);
    }

    /// The scheduler of `installation` ran a round.
    pub fn scheduler_round(&self, installation: &str) {
        self.scheduler_rounds
            .get_or_create(&InstallationLabel {
                installation: installation.to_string(),
            })
            .inc();
    }

    /// The process's figures, without the end-of-exposition marker, so a
    /// caller may add its own families (see [`finish`]).
    pub fn encode_families(&self, out: &mut String) -> std::fmt::Result {
        encode_registry(out, &self.registry)
    }

    /// The whole exposition: the process's figures and the end marker.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = self.encode_families(&mut out);
        let _ = finish(&mut out);
        out
    }
}

/// Encodes `registry` (a caller's own families, a read model's gauges built
/// for one scrape) into `out`, without the end marker.
pub fn encode_families(out: &mut String, registry: &Registry) -> std::fmt::Result {
    encode_registry(out, registry)
}

/// Ends an exposition.
pub fn finish(out: &mut String) -> std::fmt::Result {
    encode_eof(out)
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_kept_per_service_and_encoded_as_openmetrics() {
        let m = Metrics::new();
        m.batch_handled("intake", 3, 0.002);
        m.settled("intake", "ack", 3);
        m.settled("checker", "dead_letter", 1);
        m.queue("checker", 42, 2);
        m.relayed("intake", [0.01, 0.02]);
        m.outbox("intake", 7);
        let text = m.encode();
        for line in [
            "prodsys_consumer_deliveries_total{service=\"intake\",outcome=\"ack\"} 3",
            "prodsys_consumer_deliveries_total{service=\"checker\",outcome=\"dead_letter\"} 1",
            "prodsys_consumer_batch_size_count{service=\"intake\"} 1",
            "prodsys_queue_ready_messages{service=\"checker\"} 42",
            "prodsys_queue_consumers{service=\"checker\"} 2",
            "prodsys_outbox_published_events_total{service=\"intake\"} 2",
            "prodsys_outbox_relay_latency_seconds_count{service=\"intake\"} 2",
            "prodsys_outbox_depth{service=\"intake\"} 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
