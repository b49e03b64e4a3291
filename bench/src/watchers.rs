//! Watchers of one production while the status scenario feeds it:
//! `WatchProduction` gRPC streams and dashboard SSE clients
//! (`GET /api/events`, a `resync` answered with `GET /api/productions/{id}`
//! as the dashboard does), each timing how long after an event was published
//! it learned of the event's effect.
//!
//! The status scenario publishes `job.status` messages in a known order; the
//! transitions applied after message `k` number [`Feed::threshold`]`(k)`,
//! and a watcher that sees counts holding at least that many transitions has
//! learned of message `k` (and of every one before it). The lag of message
//! `k` for that watcher is then the moment it saw them less the moment
//! message `k` was handed to the broker.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prodsys_proto as pb;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Streams per HTTP/2 connection of the gRPC watchers.
const STREAMS_PER_CONNECTION: usize = 100;

/// The messages of one status measurement, and when each was published.
pub struct Feed {
    pub jobs: u64,
    pub per_message: u64,
    /// Messages per phase (SUBMITTED, RUNNING, DONE).
    pub chunks: u64,
    published: Mutex<Vec<Instant>>,
}

impl Feed {
    pub fn new(jobs: u64, per_message: u64) -> Arc<Self> {
        Arc::new(Self {
            jobs,
            per_message,
            chunks: jobs.div_ceil(per_message),
            published: Mutex::new(Vec::new()),
        })
    }

    pub fn messages(&self) -> u64 {
        self.chunks * 3
    }

    /// Message `k` is being published now (called in publish order).
    pub fn publishing(&self) {
        self.published
            .lock()
            .expect("feed lock")
            .push(Instant::now());
    }

    fn published(&self, k: u64) -> Option<Instant> {
        self.published
            .lock()
            .expect("feed lock")
            .get(k as usize)
            .copied()
    }

    /// Transitions applied once messages 0..=k are.
    fn threshold(&self, k: u64) -> u64 {
        let phase = k / self.chunks;
        let chunk = k % self.chunks;
        phase * self.jobs + ((chunk + 1) * self.per_message).min(self.jobs)
    }

    /// Transitions counts show: a job SUBMITTED has had one, RUNNING two, DONE three.
    fn applied(submitted: u64, running: u64, done: u64) -> u64 {
        submitted + 2 * running + 3 * done
    }
}

/// What one watcher saw.
#[derive(Default)]
struct Seen {
    lags: Vec<Duration>,
    updates: u64,
    /// Whether it saw every job DONE.
    complete: bool,
}

/// Follows the feed for one watcher: the next message not yet seen.
struct Cursor {
    feed: Arc<Feed>,
    next: u64,
    seen: Seen,
}

impl Cursor {
    fn new(feed: Arc<Feed>) -> Self {
        Self {
            feed,
            next: 0,
            seen: Seen::default(),
        }
    }

    fn observe(&mut self, submitted: u64, running: u64, done: u64) {
        let now = Instant::now();
        self.seen.updates += 1;
        let applied = Feed::applied(submitted, running, done);
        while self.next < self.feed.messages() && self.feed.threshold(self.next) <= applied {
            let lag = self
                .feed
                .published(self.next)
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
            self.seen.lags.push(lag);
            self.next += 1;
        }
        if done >= self.feed.jobs {
            self.seen.complete = true;
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WatcherStats {
    pub grpc: usize,
    pub sse: usize,
    /// Watchers that saw every job DONE before the measurement ended.
    pub complete: usize,
    pub updates: u64,
    /// Lag samples (one per watcher and message it learned of).
    pub samples: u64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// The same split by kind of watcher.
    pub grpc_p99_ms: f64,
    pub sse_p99_ms: f64,
    /// Snapshots the status service read for them during the measurement
    /// (`prodsys_status_snapshot_reads_total`, every reader).
    pub snapshot_reads: f64,
    /// Failures opening or reading a watch.
    pub errors: u64,
    pub first_error: Option<String>,
}

pub struct Watchers {
    stop: CancellationToken,
    grpc: Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>,
    sse: Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>,
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connecting to the status service")
}

impl Watchers {
    /// Opens `grpc` WatchProduction streams and `sse` dashboard clients on
    /// the status service at `addr`, each following `production`; returns
    /// once every one has its first answer (so the measurement that follows
    /// carries all of them).
    pub async fn start(
        addr: SocketAddr,
        production: &str,
        feed: Arc<Feed>,
        grpc: usize,
        sse: usize,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let ready = Arc::new(tokio::sync::Semaphore::new(0));
        let mut channels = Vec::new();
        for _ in 0..grpc.div_ceil(STREAMS_PER_CONNECTION) {
            channels.push(channel(addr).await?);
        }
        let mut grpc_tasks = Vec::with_capacity(grpc);
        for i in 0..grpc {
            let mut client = pb::status_service_client::StatusServiceClient::new(
                channels[i / STREAMS_PER_CONNECTION].clone(),
            );
            let production = production.to_string();
            let mut cursor = Cursor::new(feed.clone());
            let stop = stop.clone();
            let ready = ready.clone();
            grpc_tasks.push(tokio::spawn(async move {
                let opened = client
                    .watch_production(pb::GetProductionRequest {
                        production_id: production,
                    })
                    .await;
                ready.add_permits(1);
                let mut stream = opened.context("WatchProduction")?.into_inner();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => break,
                        next = stream.message() => next,
                    };
                    match next.context("reading WatchProduction")? {
                        Some(p) => {
                            let c = p.counts.unwrap_or_default();
                            cursor.observe(c.submitted, c.running, c.done);
                            if cursor.seen.complete {
                                break;
                            }
                        }
                        None => break,
                    }
                }
                Ok(cursor.seen)
            }));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let mut sse_tasks = Vec::with_capacity(sse);
        for _ in 0..sse {
            let http = http.clone();
            let production = production.to_string();
            let cursor = Cursor::new(feed.clone());
            let stop = stop.clone();
            let ready = ready.clone();
            sse_tasks.push(tokio::spawn(async move {
                sse_client(http, addr, production, cursor, stop, ready).await
            }));
        }
        let all = (grpc + sse) as u32;
        tokio::time::timeout(Duration::from_secs(60), ready.acquire_many(all))
            .await
            .context("the watchers did not all open within 60 s")??
            .forget();
        Ok(Self {
            stop,
            grpc: grpc_tasks,
            sse: sse_tasks,
        })
    }

    /// Waits up to `grace` for every watcher to see the last message, then
    /// stops the rest; what they saw.
    pub async fn finish(self, grace: Duration) -> WatcherStats {
        let deadline = tokio::time::Instant::now() + grace;
        let mut stats = WatcherStats {
            grpc: self.grpc.len(),
            sse: self.sse.len(),
            ..Default::default()
        };
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            stop.cancel();
        });
        let mut all: Vec<Duration> = Vec::new();
        for (kind, tasks) in [("grpc", self.grpc), ("sse", self.sse)] {
            let mut lags: Vec<Duration> = Vec::new();
            for task in tasks {
                match task.await {
                    Ok(Ok(seen)) => {
                        stats.updates += seen.updates;
                        stats.complete += usize::from(seen.complete);
                        lags.extend(seen.lags);
                    }
                    Ok(Err(e)) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    Err(e) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            lags.sort_unstable();
            let p99 = crate::percentile_ms(&lags, 0.99);
            if kind == "grpc" {
                stats.grpc_p99_ms = p99;
            } else {
                stats.sse_p99_ms = p99;
            }
            all.extend(lags);
        }
        self.stop.cancel();
        all.sort_unstable();
        stats.samples = all.len() as u64;
        stats.lag_p50_ms = crate::percentile_ms(&all, 0.5);
        stats.lag_p99_ms = crate::percentile_ms(&all, 0.99);
        stats.lag_max_ms = crate::percentile_ms(&all, 1.0);
        stats
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Counts {
    submitted: u64,
    running: u64,
    done: u64,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct View {
    production_id: String,
    counts: Counts,
}

/// One dashboard client: the event stream, each `production` event of ours
/// observed, each `resync` answered with the production's page.
async fn sse_client(
    http: reqwest::Client,
    addr: SocketAddr,
    production: String,
    mut cursor: Cursor,
    stop: CancellationToken,
    ready: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<Seen> {
    let opened = http
        .get(format!("http://{addr}/api/events"))
        .header("accept", "text/event-stream")
        .send()
        .await;
    ready.add_permits(1);
    let mut response = opened
        .context("GET /api/events")?
        .error_for_status()
        .context("GET /api/events")?;
    let page = format!("http://{addr}/api/productions/{production}");
    let mut buffer: Vec<u8> = Vec::new();
    let mut event = String::new();
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => break,
            chunk = response.chunk() => chunk,
        };
        let Some(chunk) = chunk.context("reading /api/events")? else {
            break;
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                if event == "production" {
                    if let Ok(view) = serde_json::from_str::<View>(data.trim())
                        && view.production_id == production
                    {
                        let c = view.counts;
                        cursor.observe(c.submitted, c.running, c.done);
                    }
                } else if event == "resync"
                    && let Ok(answer) = http.get(&page).send().await
                    && let Ok(view) = answer.json::<View>().await
                {
                    let c = view.counts;
                    cursor.observe(c.submitted, c.running, c.done);
                }
            } else if line.is_empty() {
                event.clear();
            }
        }
        if cursor.seen.complete {
            break;
        }
    }
    Ok(cursor.seen)
}

/// The status service's snapshot reads so far, every reader's
/// (`prodsys_status_snapshot_reads_total` at `/metrics`); 0 when unreadable.
pub async fn snapshot_reads(addr: SocketAddr) -> f64 {
    let text = match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| l.starts_with("prodsys_status_snapshot_reads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thresholds count each phase's transitions, the last chunk of a phase short.
    #[test]
    fn thresholds_follow_the_publish_order() {
        let feed = Feed::new(1_100, 500);
        assert_eq!(feed.chunks, 3);
        assert_eq!(feed.messages(), 9);
        let t: Vec<u64> = (0..9).map(|k| feed.threshold(k)).collect();
        assert_eq!(
            t,
            vec![500, 1_000, 1_100, 1_600, 2_100, 2_200, 2_700, 3_200, 3_300]
        );
    }

    /// A watcher that sees counts holding several messages learns of each of
    /// them then, once; its lags are measured from each message's publish.
    #[test]
    fn a_watcher_learns_of_every_message_once() {
        let feed = Feed::new(1_000, 500);
        for _ in 0..feed.messages() {
            feed.publishing();
        }
        let mut cursor = Cursor::new(feed.clone());
        cursor.observe(0, 0, 0);
        assert!(cursor.seen.lags.is_empty());
        // Every job SUBMITTED, half of them RUNNING: three messages applied.
        cursor.observe(500, 500, 0);
        assert_eq!(cursor.seen.lags.len(), 3);
        cursor.observe(500, 500, 0);
        assert_eq!(cursor.seen.lags.len(), 3);
        assert!(!cursor.seen.complete);
        cursor.observe(0, 0, 1_000);
        assert_eq!(cursor.seen.lags.len(), 6);
        assert!(cursor.seen.complete);
        assert_eq!(cursor.seen.updates, 4);
    }
}
