//! The consumer against real RabbitMQ: a batch failing transiently is held
//! (and republished after the hold limit) without spending the delivery
//! limit, and resumes when the failure passes; a message that can never
//! succeed is found in its batch and dead-lettered alone; one failing for an
//! unexpected reason is retried until the delivery limit dead-letters it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use prodsys_messaging::consumer::ConsumerSettings;
use prodsys_messaging::envelope::{dead_letter_reason, original_destination};
use prodsys_messaging::{
    BatchHandler, Broker, HandlerError, Holding, Incoming, Names, Outcome, Topology, Transient,
};
use prodsys_testkit::{TestEnv, wait_for};
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "consumertest";

/// Down (transiently) until `up_at`; then handles each body once, and
/// refuses any batch holding "poison" without saying which message it is.
struct Flaky {
    up_at: Instant,
    handled: Arc<Mutex<BTreeMap<String, String>>>,
    tries: Arc<Mutex<u32>>,
}

impl BatchHandler for Flaky {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        *self.tries.lock().unwrap() += 1;
        if Instant::now() < self.up_at {
            return Err(Transient::wrap(anyhow::anyhow!("the dependency is down")));
        }
        if batch.iter().any(|i| i.body == b"bug") {
            anyhow::bail!("a bug nobody classified");
        }
        if batch.iter().any(|i| i.body == b"poison") {
            return Err(HandlerError::Permanent("poison is not work".into()).into());
        }
        let mut handled = self.handled.lock().unwrap();
        for incoming in batch {
            handled.insert(
                String::from_utf8_lossy(&incoming.body).into_owned(),
                incoming.routing_key.clone(),
            );
        }
        Ok(vec![Outcome::Ack; batch.len()])
    }
}

async fn depth(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// A broker for `service` (its queue bound to `binding`) on `env`'s prefix,
/// and a confirming channel of the test's own to publish with.
async fn broker_for(
    env: &TestEnv,
    service: &str,
    binding: &str,
    delivery_limit: u32,
    shutdown: &CancellationToken,
) -> (Names, Broker, lapin::Connection, lapin::Channel) {
    let names = Names::new(&env.prefix);
    let topology = Topology {
        names: names.clone(),
        service: service.into(),
        bindings: vec![binding.into()],
        ingest_bindings: vec![],
        delivery_limit,
    };
    let broker = Broker::start(env.settings.amqp.url(), topology, shutdown.clone())
        .await
        .unwrap();
    let (connection, channel) = env.amqp().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    (names, broker, connection, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_held_without_spending_the_delivery_limit() {
    let env = TestEnv::new().await.unwrap();
    let shutdown = CancellationToken::new();
    // Two deliveries: requeueing would dead-letter everything at once.
    let (names, broker, connection, channel) =
        broker_for(&env, SERVICE, "test.work", 2, &shutdown).await;
    let mut bodies: Vec<String> = (0..10).map(|i| format!("work {i}")).collect();
    bodies.insert(4, "poison".into());
    bodies.insert(7, "bug".into());
    for body in &bodies {
        channel
            .basic_publish(
                names.events().as_str().into(),
                "test.work".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_message_id(body.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let handled = Arc::new(Mutex::new(BTreeMap::new()));
    let tries = Arc::new(Mutex::new(0));
    let flaky = Flaky {
        up_at: Instant::now() + Duration::from_secs(4),
        handled: handled.clone(),
        tries: tries.clone(),
    };
    let mut settings = ConsumerSettings::new(names.queue(SERVICE), 16, 16, Duration::from_secs(5));
    // Held longer than a second: republished, three times or so in the outage.
    settings.hold_limit = Duration::from_secs(1);
    settings.retry_max = Duration::from_millis(300);
    let holding = Holding::new();
    let consumer = tokio::spawn(prodsys_messaging::run_consumer(
        broker.clone(),
        settings,
        flaky,
        holding.clone(),
        shutdown.clone(),
    ));
    wait_for("the consumer to hold", Duration::from_secs(5), || async {
        (holding.count() == 1).then_some(())
    })
    .await
    .unwrap();
    wait_for(
        "the ten messages handled",
        Duration::from_secs(20),
        || async { (handled.lock().unwrap().len() == 10).then_some(()) },
    )
    .await
    .unwrap();
    assert!(*tries.lock().unwrap() > 5, "retried while down");
    for (body, routing_key) in handled.lock().unwrap().iter() {
        assert!(body.starts_with("work "), "{body}");
        assert_eq!(
            routing_key, "test.work",
            "republished copies keep their routing key"
        );
    }
    // The poison at once, by the consumer; the bug after the delivery limit, by the broker.
    let dlq = names.dead_letter_queue(SERVICE);
    wait_for("two dead letters", Duration::from_secs(20), || async {
        (depth(&channel, &dlq).await == 2).then_some(())
    })
    .await
    .unwrap();
    let mut letters = BTreeMap::new();
    while let Some(letter) = channel
        .basic_get(
            dlq.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = letter
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        letters.insert(
            String::from_utf8_lossy(&letter.delivery.data).into_owned(),
            (
                dead_letter_reason(&headers).unwrap(),
                original_destination(&headers).unwrap(),
            ),
        );
    }
    let origin = (names.events(), "test.work".to_string());
    assert_eq!(
        letters.get("poison"),
        Some(&("poison is not work".to_string(), origin.clone()))
    );
    assert_eq!(
        letters.get("bug"),
        Some(&("delivery_limit".to_string(), origin))
    );
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(holding.count(), 0, "serving again");
    assert_eq!(depth(&channel, &names.queue(SERVICE)).await, 0);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the consumer stops")
        .unwrap();
    for queue in [names.queue(SERVICE), dlq] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
    env.cleanup().await;
}

/// Always down.
struct Down;

impl BatchHandler for Down {
    async fn handle(&self, _batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        Err(Transient::wrap(anyhow::anyhow!("the dependency is down")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_at_shutdown_goes_back_to_the_queue_unspent() {
    let env = TestEnv::new().await.unwrap();
    let service = "heldtest";
    let closing = CancellationToken::new();
    let (names, broker, connection, channel) =
        broker_for(&env, service, "test.held", 1, &closing).await;
    for i in 0..5 {
        let body = format!("held {i}");
        channel
            .basic_publish(
                names.events().as_str().into(),
                "test.held".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_message_id(body.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let holding = Holding::new();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(prodsys_messaging::run_consumer(
        broker.clone(),
        ConsumerSettings::new(names.queue(service), 16, 16, Duration::from_secs(5)),
        Down,
        holding.clone(),
        shutdown.clone(),
    ));
    wait_for("the consumer to hold", Duration::from_secs(5), || async {
        (holding.count() == 1).then_some(())
    })
    .await
    .unwrap();
    let queue = names.queue(service);
    assert_eq!(depth(&channel, &queue).await, 0, "all five held");
    let stopping = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), consumer)
        .await
        .expect("a holding consumer stops at once")
        .unwrap();
    println!("held batch released in {:?}", stopping.elapsed());
    assert_eq!(holding.count(), 0);
    // Republished as fresh copies: with a delivery limit of one, a requeue
    // would have dead-lettered them.
    wait_for(
        "the five back in the queue",
        Duration::from_secs(5),
        || async { (depth(&channel, &queue).await == 5).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(depth(&channel, &names.dead_letter_queue(service)).await, 0);
    let copy = channel
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    let headers = copy
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    // The broker's count of returned deliveries starts over on a copy.
    let count = match headers.inner().get("x-delivery-count") {
        None => 0,
        Some(lapin::types::AMQPValue::LongLongInt(n)) => *n,
        Some(lapin::types::AMQPValue::LongInt(n)) => i64::from(*n),
        Some(other) => panic!("x-delivery-count {other:?}"),
    };
    assert_eq!(count, 0, "{headers:?}");
    assert_eq!(
        original_destination(&headers),
        Some((names.events(), "test.held".to_string()))
    );
    closing.cancel();
    for queue in [names.queue(service), names.dead_letter_queue(service)] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
    env.cleanup().await;
}

/// Notes the size of every batch it is handed.
struct Sizes(Arc<Mutex<Vec<(usize, usize)>>>);

impl BatchHandler for Sizes {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let bytes = batch.iter().map(|i| i.body.len()).sum();
        self.0.lock().unwrap().push((batch.len(), bytes));
        Ok(vec![Outcome::Ack; batch.len()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_closes_at_its_byte_limit_as_at_its_count() {
    let env = TestEnv::new().await.unwrap();
    let shutdown = CancellationToken::new();
    let (names, broker, connection, channel) =
        broker_for(&env, SERVICE, "test.work", 5, &shutdown).await;
    // Twelve large messages, then twenty small ones, all waiting before the
    // consumer starts, so each batch could take sixteen.
    let large = vec![b'x'; 300_000];
    let mut bodies: Vec<Vec<u8>> = (0..12).map(|_| large.clone()).collect();
    bodies.extend((0..20).map(|i| format!("small {i}").into_bytes()));
    for body in &bodies {
        channel
            .basic_publish(
                names.events().as_str().into(),
                "test.work".into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let mut settings = ConsumerSettings::new(names.queue(SERVICE), 64, 16, Duration::from_secs(5));
    settings.batch_bytes = 1 << 20;
    let consumer = tokio::spawn(prodsys_messaging::run_consumer(
        broker.clone(),
        settings,
        Sizes(sizes.clone()),
        Holding::new(),
        shutdown.clone(),
    ));
    wait_for("every message handled", Duration::from_secs(20), || async {
        let handled: usize = sizes.lock().unwrap().iter().map(|(n, _)| n).sum();
        (handled == bodies.len()).then_some(())
    })
    .await
    .unwrap();
    let sizes = sizes.lock().unwrap().clone();
    for (n, bytes) in &sizes {
        assert!(*n <= 16, "at most sixteen deliveries a batch: {sizes:?}");
        // A batch stops taking once it reached the limit: at most one
        // message beyond it.
        assert!(
            *bytes < (1 << 20) + large.len(),
            "a batch closes once its bodies reach 1 MiB: {sizes:?}"
        );
    }
    // The large ones went four at a time at most (4 × 300 kB ≥ 1 MiB).
    assert!(
        sizes.iter().all(|(n, bytes)| *bytes < 1_000_000 || *n <= 4),
        "{sizes:?}"
    );
    assert!(
        sizes.len() >= 3,
        "twelve large messages need three batches or more: {sizes:?}"
    );
    shutdown.cancel();
    consumer.await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    env.cleanup().await;
}
