//! The outbox relay against real PostgreSQL and RabbitMQ: what a rolled-back
//! transaction wrote is never published; what a committed one wrote is
//! published exactly once, promptly (woken by NOTIFY, not by its timer).

use std::time::{Duration, Instant};

use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use prodsys_db::{Db, OutboxEvent};
use prodsys_messaging::envelope::header_text;
use prodsys_messaging::{Broker, Names, Publisher, Topology};
use prodsys_testkit::{TestEnv, wait_for};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SERVICE: &str = "relaytest";

/// A relay on a fresh test database and prefix, its service queue bound to
/// `bindings`, asleep on LISTEN after draining its empty outbox.
struct Relay {
    env: TestEnv,
    db: Db,
    names: Names,
    shutdown: CancellationToken,
}

impl Relay {
    async fn start(bindings: &[&str]) -> Self {
        let env = TestEnv::new().await.unwrap();
        let settings = &env.settings;
        let db = Db::new(settings.database.url(), SERVICE, 4).unwrap();
        db.migrate(&[]).await.unwrap();
        let names = Names::new(&env.prefix);
        let topology = Topology {
            names: names.clone(),
            service: SERVICE.into(),
            bindings: bindings.iter().map(|b| b.to_string()).collect(),
            ingest_bindings: vec![],
            delivery_limit: 3,
        };
        let shutdown = CancellationToken::new();
        let broker = Broker::start(settings.amqp.url(), topology, shutdown.clone())
            .await
            .unwrap();
        let publisher = Publisher::new(broker.clone(), Duration::from_secs(5));
        tokio::spawn(prodsys_messaging::relay::run_relay(
            db.clone(),
            publisher,
            names.clone(),
            "/tests/relay".into(),
            shutdown.clone(),
        ));
        // Let the relay drain its (empty) outbox and go to sleep on LISTEN.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Self {
            env,
            db,
            names,
            shutdown,
        }
    }

    /// Rows left in the outbox.
    async fn outbox_rows(&self) -> i64 {
        let client = self.db.client().await.unwrap();
        client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Stops the relay and removes its queues and database.
    async fn stop(self, connection: lapin::Connection, channel: lapin::Channel) {
        self.shutdown.cancel();
        for name in [
            self.names.queue(SERVICE),
            self.names.dead_letter_queue(SERVICE),
            self.names.unroutable(),
        ] {
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "done".into()).await;
        drop(self.db);
        self.env.cleanup().await;
    }
}

/// An event of `kind` about `subject`, as a service writes it to its outbox.
fn event(kind: &str, subject: &str, payload: &[u8]) -> OutboxEvent {
    OutboxEvent {
        event_id: Uuid::now_v7(),
        event_type: kind.into(),
        subject: subject.into(),
        payload: payload.to_vec(),
        reply_to: None,
        content_type: "application/protobuf".into(),
    }
}

/// The next message of `queue`, if there is one, taken without an ack.
async fn take(channel: &lapin::Channel, queue: &str) -> Option<BasicGetMessage> {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_events_never_leave_and_committed_ones_leave_exactly_once() {
    let relay = Relay::start(&["test.committed", "test.rolled_back"]).await;
    let (db, names) = (relay.db.clone(), relay.names.clone());

    let event = |kind: &str| event(kind, "CTA-000007", &[1, 2, 3]);
    let rolled_back = event("test.rolled_back");
    let committed = event("test.committed");
    // Nobody is bound for this one: it must not block those behind it.
    let unroutable = event("test.nobody");
    let mut client = db.client().await.unwrap();
    {
        let tx = client.transaction().await.unwrap();
        prodsys_db::enqueue(&tx, &db, std::slice::from_ref(&rolled_back))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    let committed_at = Instant::now();
    {
        let tx = client.transaction().await.unwrap();
        prodsys_db::enqueue(&tx, &db, &[unroutable.clone(), committed.clone()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    let (connection, channel) = relay.env.amqp().await.unwrap();
    let queue = names.queue(SERVICE);
    let get = || take(&channel, queue.as_str());
    let first = wait_for("the committed event", Duration::from_secs(10), get)
        .await
        .unwrap();
    assert!(
        committed_at.elapsed() < Duration::from_millis(2500),
        "the relay was not woken by NOTIFY: {:?}",
        committed_at.elapsed()
    );
    let properties = &first.delivery.properties;
    assert_eq!(
        properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string()),
        Some(committed.event_id.to_string())
    );
    let headers = properties.headers().clone().unwrap();
    assert_eq!(
        header_text(&headers, "type").as_deref(),
        Some("org.prodsys.test.committed.v1")
    );
    assert_eq!(
        header_text(&headers, "subject").as_deref(),
        Some("CTA-000007")
    );
    assert_eq!(
        header_text(&headers, "source").as_deref(),
        Some("/tests/relay")
    );
    assert_eq!(first.delivery.data, vec![1, 2, 3]);

    // Nothing else arrives: neither the rolled-back event nor a second copy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(get().await.is_none(), "an extra message was published");
    let kept = take(&channel, names.unroutable().as_str())
        .await
        .expect("the unroutable event is kept for an operator");
    assert_eq!(
        kept.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string()),
        Some(unroutable.event_id.to_string())
    );
    assert_eq!(
        relay.outbox_rows().await,
        0,
        "a confirmed event stays in the outbox"
    );

    drop(client);
    relay.stop(connection, channel).await;
}

/// Commits that land while the relay publishes: single events committed
/// back to back, then a transaction of more rows than one batch. Every event
/// leaves once, in commit order, each promptly (its NOTIFY wakes the relay;
/// none waits for the relay's five-second safety net).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_the_relay_publishes_leave_promptly_in_order() {
    let relay = Relay::start(&["test.stream"]).await;
    let (db, names) = (relay.db.clone(), relay.names.clone());

    let event = || event("test.stream", "CTA-000008", &[4]);
    let mut sent = Vec::new();
    let mut client = db.client().await.unwrap();
    // One event a transaction, the relay publishing while they commit.
    for _ in 0..60 {
        let one = event();
        sent.push(one.event_id);
        let tx = client.transaction().await.unwrap();
        prodsys_db::enqueue(&tx, &db, std::slice::from_ref(&one))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // Last, more than two of the relay's batches in one transaction: one
    // NOTIFY for all of them, so the relay must go on while its batches are full.
    let big: Vec<OutboxEvent> = (0..1_200).map(|_| event()).collect();
    sent.extend(big.iter().map(|e| e.event_id));
    let tx = client.transaction().await.unwrap();
    prodsys_db::enqueue(&tx, &db, &big).await.unwrap();
    tx.commit().await.unwrap();
    let last_commit = Instant::now();

    let (connection, channel) = relay.env.amqp().await.unwrap();
    let queue = names.queue(SERVICE);
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < sent.len() && Instant::now() < deadline {
        match take(&channel, queue.as_str()).await {
            Some(message) => received.push(
                message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_string())
                    .unwrap_or_default(),
            ),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let took = last_commit.elapsed();
    let expected: Vec<String> = sent.iter().map(|id| id.to_string()).collect();
    assert_eq!(
        received.len(),
        expected.len(),
        "events published of {} committed",
        expected.len()
    );
    assert!(received == expected, "events left out of commit order");
    assert!(
        took < Duration::from_millis(4_500),
        "the last events waited for the relay's safety net, not its NOTIFY: {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        take(&channel, queue.as_str()).await.is_none(),
        "an event was published twice"
    );
    assert_eq!(
        relay.outbox_rows().await,
        0,
        "a confirmed event stays in the outbox"
    );

    drop(client);
    relay.stop(connection, channel).await;
}

/// Two replicas of a service share its outbox. A relay looks when its own
/// replica's commits notify, and leaves another replica's commits to that
/// replica's relay (which would otherwise take a transaction to find them
/// taken). When that relay is gone, what its replica committed still
/// leaves, by the safety net's look, however often that replica notifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_publishes_its_own_replicas_commits_at_once_and_another_replicas_by_its_safety_net()
{
    let relay = Relay::start(&["test.own", "test.other"]).await;
    // The other replica: a pool of its own on the same schema, whose relay
    // is not running.
    let other = Db::new(relay.env.settings.database.url(), SERVICE, 2).unwrap();
    assert_ne!(other.notifier(), relay.db.notifier());
    let commit = |db: Db, kind: &'static str| {
        let one = event(kind, "CTA-000008", &[4, 5, 6]);
        async move {
            let mut client = db.client().await.unwrap();
            let tx = client.transaction().await.unwrap();
            prodsys_db::enqueue(&tx, &db, std::slice::from_ref(&one))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            one.event_id
        }
    };
    let (connection, channel) = relay.env.amqp().await.unwrap();
    let queue = relay.names.queue(SERVICE);
    let get = || async {
        take(&channel, queue.as_str())
            .await
            .and_then(|m| m.delivery.properties.message_id().clone())
            .map(|id| id.as_str().to_string())
    };

    // The other replica commits every 200 ms: each commit notifies, none
    // wakes this relay.
    let committed = Instant::now();
    let mut others = Vec::new();
    let mut published = Vec::new();
    while committed.elapsed() < Duration::from_secs(8) {
        others.push(commit(other.clone(), "test.other").await.to_string());
        while let Some(id) = get().await {
            published.push((id, committed.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = published.first().map(|(id, at)| (id.clone(), *at));
    let Some((first_id, first_at)) = first else {
        panic!("nothing published in 8 s: the safety net did not look");
    };
    assert!(
        first_at >= Duration::from_secs(1),
        "another replica's commit woke this relay: {first_id} published after {first_at:?}"
    );
    assert!(
        others.contains(&first_id),
        "{first_id} is not one of the other replica's events"
    );

    // This replica's own commit leaves at once.
    let own_at = Instant::now();
    let own = commit(relay.db.clone(), "test.own").await.to_string();
    let seen = wait_for("this replica's event", Duration::from_secs(10), || async {
        let mut found = None;
        while let Some(id) = get().await {
            if id == own {
                found = Some(());
            }
        }
        found
    })
    .await;
    assert!(seen.is_ok(), "this replica's event was not published");
    assert!(
        own_at.elapsed() < Duration::from_millis(2500),
        "the relay was not woken by its own replica's NOTIFY: {:?}",
        own_at.elapsed()
    );
    drop(other);
    relay.stop(connection, channel).await;
}
