//! The outbox relay: publishes committed outbox rows in order; their
//! deletion commits only after the broker confirmed them. Woken by LISTEN/NOTIFY when a
//! transaction of its own replica commits an event; a slow timer is the
//! safety net for a lost LISTEN connection and for what a replica that died
//! left behind. Several replicas may run: rows are locked with SKIP LOCKED,
//! so each is published by one relay.

use std::time::Duration;

use prodsys_core::events::cloudevent_type;
use prodsys_db::{Db, Listener};
use tokio_util::sync::CancellationToken;

use crate::envelope::SPEC_VERSION;
use crate::{Backoff, CloudEvent, Names, Outgoing, Publisher};

pub const CONTENT_TYPE_PROTOBUF: &str = "application/protobuf";
const BATCH: i64 = 500;
const SAFETY_NET: Duration = Duration::from_secs(5);

/// Runs until `shutdown`, then publishes what is still committed (a last
/// drain, so a service stopping gracefully leaves no unsent outbox rows) and
/// returns. `source` is the CloudEvents source (`/prodsys/intake`).
pub async fn run_relay(
    db: Db,
    publisher: Publisher,
    names: Names,
    source: String,
    shutdown: CancellationToken,
) {
    let channel = db.outbox_channel();
    let mut listener: Option<Listener> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        if listener.is_none() {
            match db.listen(&channel).await {
                Ok(l) => listener = Some(l),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "outbox relay cannot LISTEN; polling"
                ),
            }
        }
        // Drain everything committed so far. A batch short of BATCH took
        // every row there was: what commits after it notifies again, so no
        // empty look (a transaction of its own) follows it.
        let mut failed = false;
        loop {
            match publish_batch(&db, &publisher, &names, &source).await {
                Ok(0) => break,
                Ok(n) => {
                    tracing::debug!(events = n, "outbox batch published");
                    if (n as i64) < BATCH && listener.is_some() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "outbox relay failed");
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed {
            backoff.next_wait()
        } else {
            backoff.reset();
            SAFETY_NET
        };
        // Waits for a commit of this replica (or of a writer that sends no
        // mark), the connection's loss or the wait's end. Another replica's
        // commits are that replica's relay's to publish: looking for them
        // would cost a transaction that finds them taken. Rows a replica
        // left when it died are found by the next look, at the latest the
        // safety net's, however often the others notify.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.notifications.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                payload = notified => {
                    let Some(payload) = payload else {
                        listener = None;
                        break;
                    };
                    let mut ours = wakes(&payload, db.notifier());
                    if let Some(l) = listener.as_mut() {
                        while let Ok(payload) = l.notifications.try_recv() {
                            ours |= wakes(&payload, db.notifier());
                        }
                    }
                    if !ours {
                        continue;
                    }
                    if failed {
                        tokio::time::sleep_until(deadline).await;
                    }
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
    // Stopping: what the service committed until now still goes out.
    let mut sent = 0;
    loop {
        match publish_batch(&db, &publisher, &names, &source).await {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "outbox relay could not flush before stopping; the rows stay for the next start"
                );
                break;
            }
        }
    }
    tracing::info!(events = sent, "outbox relay flushed and stopped");
}

/// Whether a NOTIFY on the outbox channel calls for a look: one sent by this
/// replica's own commits (`own`, [`Db::notifier`]), or one without a mark
/// (a writer that is not a prodsys service, or an older one).
fn wakes(payload: &str, own: &str) -> bool {
    payload.is_empty() || payload == own
}

/// Publishes one batch of pending rows; returns how many were sent.
pub async fn publish_batch(
    db: &Db,
    publisher: &Publisher,
    names: &Names,
    source: &str,
) -> anyhow::Result<usize> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    // Taken (deleted) in this transaction, which commits once the broker
    // confirmed them all; on any failure it rolls back and they stay.
    let rows = prodsys_db::take_pending(&tx, BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let messages: Vec<Outgoing> = rows
        .iter()
        .map(|row| {
            let event = CloudEvent {
                id: row.event.event_id.to_string(),
                event_type: cloudevent_type(&row.event.event_type),
                source: source.to_string(),
                specversion: SPEC_VERSION.to_string(),
                time: Some(
                    row.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                ),
                subject: Some(row.event.subject.clone()),
            };
            match &row.event.reply_to {
                // A reply goes straight to the caller's queue through the default exchange.
                Some(queue) => Outgoing {
                    mandatory: false,
                    ..Outgoing::event(
                        String::new(),
                        queue,
                        &event,
                        &row.event.content_type,
                        row.event.payload.clone(),
                    )
                },
                None => Outgoing::event(
                    names.events(),
                    &row.event.event_type,
                    &event,
                    &row.event.content_type,
                    row.event.payload.clone(),
                ),
            }
        })
        .collect();
    publisher.publish(&messages).await?;
    tx.commit().await?;
    let confirmed = chrono::Utc::now();
    prodsys_telemetry::metrics::metrics().relayed(
        source.rsplit('/').next().unwrap_or(source),
        rows.iter().map(|row| {
            (confirmed - row.created_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        }),
    );
    Ok(rows.len())
}
