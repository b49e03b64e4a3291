//! One reader per production, however many follow it.
//!
//! A `WatchProduction` stream or a dashboard's event stream wants a fresh
//! snapshot each time a production changes. Read once per follower, a
//! thousand followers turn one committed change into a thousand reads of
//! the same rows, and the reads crowd out the projection that makes the
//! changes. Here each followed production has one reader task: a change
//! marks it stale, the task reads the snapshot once (changes that arrive
//! while it reads are folded into the next read) and hands the result to
//! every follower through a `watch` channel. The dashboards' stream of every
//! production's changes has one reader likewise, sharing its snapshots
//! through a broadcast channel; each follower sees only its VO's.
//!
//! Readers read as the service (every VO): followers check visibility once,
//! with their first snapshot, which they read as their caller.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prodsys_db::Db;
use prodsys_proto as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Failure;

/// What a production's reader last read: a snapshot, or why there is none
/// (the production is not, or no longer, there), and which of its reads it
/// was (they are numbered as they start). A failure that may pass
/// (PostgreSQL unreachable) is not handed on: the reader tries again.
#[derive(Debug, Clone)]
pub struct Read {
    pub started: u64,
    pub result: Result<Arc<pb::Production>, tonic::Status>,
}

pub type Latest = Option<Read>;

/// One follower of a production: its reader's reads, from the first that
/// began after the follower's own first snapshot ([`Follower::read_from_now`]).
pub struct Follower {
    latest: watch::Receiver<Latest>,
    reads: Arc<AtomicU64>,
    stale: Arc<Notify>,
    after: u64,
}

impl Follower {
    /// Called once the follower holds its own first snapshot: reads that
    /// began before now may be older than it and are not handed on; one
    /// read begins after now (changes committed while the follower read
    /// its first snapshot are in it).
    pub fn read_from_now(&mut self) {
        self.after = self.reads.load(Ordering::SeqCst);
        self.latest.mark_unchanged();
        self.stale.notify_one();
    }

    /// The next read that began after [`Follower::read_from_now`] and read
    /// something other than the one before; `Err` once the reader is gone.
    pub async fn next(
        &mut self,
    ) -> Result<Result<Arc<pb::Production>, tonic::Status>, watch::error::RecvError> {
        loop {
            self.latest.changed().await?;
            if let Some(read) = self.latest.borrow_and_update().clone()
                && read.started > self.after
            {
                return Ok(read.result);
            }
        }
    }
}

/// How often a followed production is read again with no change announced
/// (a change missed while the service was not listening still shows).
const REREAD: Duration = Duration::from_secs(5);

/// The least time between two reads of one followed production (and
/// between two rounds of the dashboards' reader): at most five snapshots a
/// second reach a follower however fast the production changes, and a
/// flood of changes costs the followers (and their connections) no more.
const MIN_READ_GAP: Duration = Duration::from_millis(200);

/// How long a reader waits before it reads again after a failure that may pass.
const RETRY: Duration = Duration::from_secs(1);

/// What the stream of every production's changes carries.
#[derive(Clone, Debug)]
pub enum Change {
    /// A production's snapshot after a change.
    Production(Arc<pb::Production>),
    /// Changes may have been missed: followers read their list again.
    Resync,
}

struct Followed {
    latest: watch::Sender<Latest>,
    stale: Arc<Notify>,
    /// Reads begun so far.
    reads: Arc<AtomicU64>,
}

struct Inner {
    db: Db,
    figures: Figures,
    followed: Mutex<HashMap<String, Followed>>,
    /// Productions changed since the every-production reader last read.
    pending: Mutex<Pending>,
    pending_stale: Notify,
    every: broadcast::Sender<Change>,
}

#[derive(Default)]
struct Pending {
    ids: HashSet<String>,
    resync: bool,
}

/// What the readers did, for `/metrics`.
#[derive(Default)]
struct Figures {
    /// Snapshot reads by reader: `production` (one production's followers),
    /// `events` (the stream of every production's changes).
    reads: Family<ReaderLabel, Counter>,
    followed: Gauge,
    followers: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReaderLabel {
    reader: &'static str,
}

/// The status service's shared readers of production snapshots.
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Inner>,
}

impl Snapshots {
    /// Starts routing `changes` (production IDs as they commit; an empty ID
    /// when any may have changed) to the readers until `shutdown`.
    pub fn start(db: Db, changes: &broadcast::Sender<String>, shutdown: CancellationToken) -> Self {
        let (every, _) = broadcast::channel(4096);
        let snapshots = Self {
            inner: Arc::new(Inner {
                db,
                figures: Figures::default(),
                followed: Mutex::new(HashMap::new()),
                pending: Mutex::new(Pending::default()),
                pending_stale: Notify::new(),
                every,
            }),
        };
        let mut rx = changes.subscribe();
        let router = snapshots.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = stop.cancelled() => return,
                    change = rx.recv() => change,
                };
                match change {
                    Ok(id) if !id.is_empty() => router.changed(id),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => router.all_changed(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        tokio::spawn(snapshots.clone().read_every(shutdown));
        snapshots
    }

    fn count_read(&self, reader: &'static str) {
        self.inner
            .figures
            .reads
            .get_or_create(&ReaderLabel { reader })
            .inc();
    }

    fn changed(&self, id: String) {
        if let Some(followed) = self.inner.followed.lock().expect("followed").get(&id) {
            followed.stale.notify_one();
        }
        if self.inner.every.receiver_count() > 0 {
            self.inner.pending.lock().expect("pending").ids.insert(id);
            self.inner.pending_stale.notify_one();
        }
    }

    fn all_changed(&self) {
        for followed in self.inner.followed.lock().expect("followed").values() {
            followed.stale.notify_one();
        }
        if self.inner.every.receiver_count() > 0 {
            self.inner.pending.lock().expect("pending").resync = true;
            self.inner.pending_stale.notify_one();
        }
    }

    /// Follows one production: each read of its shared reader that found it
    /// changed, from the first that began after the caller's own first
    /// snapshot (the caller reads that after this call, then says so with
    /// [`Follower::read_from_now`]).
    pub fn follow(&self, production_id: &str) -> Follower {
        let mut followed = self.inner.followed.lock().expect("followed");
        let f = followed
            .entry(production_id.to_string())
            .or_insert_with(|| {
                let (latest, _) = watch::channel(None);
                let f = Followed {
                    latest,
                    stale: Arc::new(Notify::new()),
                    reads: Arc::default(),
                };
                tokio::spawn(self.clone().read_one(
                    production_id.to_string(),
                    f.latest.clone(),
                    f.stale.clone(),
                    f.reads.clone(),
                ));
                f
            });
        Follower {
            latest: f.latest.subscribe(),
            reads: f.reads.clone(),
            stale: f.stale.clone(),
            after: u64::MAX,
        }
    }

    /// The readers' figures: snapshot reads by reader, productions followed
    /// and their followers.
    pub fn encode_figures(&self, out: &mut String) -> std::fmt::Result {
        let figures = &self.inner.figures;
        let (followed, followers) = {
            let map = self.inner.followed.lock().expect("followed");
            let followers: usize = map.values().map(|f| f.latest.receiver_count()).sum();
            (map.len(), followers + self.inner.every.receiver_count())
        };
        figures.followed.set(followed as i64);
        figures.followers.set(followers as i64);
        let mut registry = Registry::default();
        registry.register(
            "prodsys_status_snapshot_reads",
            "Snapshots read for the streams that follow productions, by reader (one per followed production, one for the dashboards' stream of every change) however many follow.",
            figures.reads.clone(),
        );
        registry.register(
            "prodsys_status_followed_productions",
            "Productions with a WatchProduction stream open.",
            figures.followed.clone(),
        );
        registry.register(
            "prodsys_status_followers",
            "WatchProduction streams and dashboard event streams open.",
            figures.followers.clone(),
        );
        prodsys_telemetry::metrics::encode_families(out, &registry)
    }

    /// Every production's changes, each read once however many follow.
    pub fn every(&self) -> broadcast::Receiver<Change> {
        self.inner.every.subscribe()
    }

    /// The one reader of a followed production; ends when nobody follows.
    async fn read_one(
        self,
        id: String,
        latest: watch::Sender<Latest>,
        stale: Arc<Notify>,
        reads: Arc<AtomicU64>,
    ) {
        let now = tokio::time::Instant::now();
        let mut last_read = now.checked_sub(MIN_READ_GAP).unwrap_or(now);
        loop {
            tokio::select! {
                _ = stale.notified() => {}
                _ = tokio::time::sleep(REREAD) => {}
                _ = latest.closed() => {
                    let mut followed = self.inner.followed.lock().expect("followed");
                    // A follower may have come since: then go on reading.
                    if latest.receiver_count() == 0 {
                        followed.remove(&id);
                        return;
                    }
                    continue;
                }
            }
            // At most one read per MIN_READ_GAP: what changes meanwhile is
            // in the next one.
            tokio::select! {
                _ = tokio::time::sleep_until(last_read + MIN_READ_GAP) => {}
                _ = latest.closed() => continue,
            }
            last_read = tokio::time::Instant::now();
            self.count_read("production");
            let started = reads.fetch_add(1, Ordering::SeqCst) + 1;
            let result = match crate::api::snapshot(&self.inner.db, &id).await {
                Ok(snapshot) => Ok(Arc::new(snapshot)),
                Err(error @ (Failure::Transient(_) | Failure::Unexpected(_))) => {
                    tracing::warn!(
                        production_id = %id,
                        error = %error,
                        "cannot read a followed production; reading again"
                    );
                    tokio::time::sleep(RETRY).await;
                    stale.notify_one();
                    continue;
                }
                Err(error) => Err(tonic::Status::from(error)),
            };
            latest.send_if_modified(|held| {
                let same = match (held.as_ref().map(|h| &h.result), &result) {
                    (Some(Ok(a)), Ok(b)) => a == b,
                    (Some(Err(a)), Err(b)) => a.code() == b.code() && a.message() == b.message(),
                    _ => false,
                };
                if !same {
                    *held = Some(Read { started, result });
                }
                !same
            });
        }
    }

    /// The one reader of every production's changes while anyone follows them.
    async fn read_every(self, shutdown: CancellationToken) {
        let now = tokio::time::Instant::now();
        let mut last_read = now.checked_sub(MIN_READ_GAP).unwrap_or(now);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.pending_stale.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(last_read + MIN_READ_GAP) => {}
            }
            last_read = tokio::time::Instant::now();
            let Pending { ids, resync } =
                std::mem::take(&mut *self.inner.pending.lock().expect("pending"));
            if resync {
                let _ = self.inner.every.send(Change::Resync);
            }
            for id in ids {
                if self.inner.every.receiver_count() == 0 {
                    break;
                }
                self.count_read("events");
                match crate::api::snapshot(&self.inner.db, &id).await {
                    Ok(p) => {
                        let _ = self.inner.every.send(Change::Production(Arc::new(p)));
                    }
                    Err(error) => tracing::debug!(
                        production_id = %id,
                        error = %error,
                        "cannot read a changed production for the event stream"
                    ),
                }
            }
        }
    }
}
