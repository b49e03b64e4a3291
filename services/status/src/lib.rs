//! Status: the read model of every production, built only from events. It
//! keeps each production's state and each job's latest state, answers
//! `GetProduction` / `ListProductions` with job counts that always sum to the
//! job total, and streams `WatchProduction` snapshots as changes commit
//! (PostgreSQL NOTIFY carries the change, so any replica can serve a watcher).

mod forwarding;
mod http;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use prodsys_core::events::{
    FORWARDING_PROGRESS, INSTALLATION_HEALTH, JOB_STATUS, PRODUCTION_COMPLETED,
    PRODUCTION_DISPATCHED, PRODUCTION_FORWARDED, REQUEST_ACCEPTED,
};
use prodsys_core::state::count_job;
use prodsys_core::{JobState, ProductionState, Violation};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "status";
const CHANGES_CHANNEL: &str = "status_changes";
/// Consumers of the status queue, each its own transaction: the database
/// projects two batches at once (see `Projector::handle` for why that is safe).
const CONSUMERS: usize = 2;

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_production_and_job_read_models.sql",
    "0002_job_counters.sql",
    "0003_resource_estimates.sql",
    "0004_batched_upserts_in_place_job_updates.sql",
    "0005_installation_health.sql",
    "0006_previous_job_state.sql",
    "0040_final_job_counts.sql",
    "0100_forwarding_progress.sql",
];

/// A production's job counts by state: the final ones once its
/// `production.completed` arrived, else those its jobs' transitions made.
const COUNTS_SQL: &str = "SELECT state, n FROM final_counts WHERE production_id = $1
     UNION ALL
     SELECT state, n FROM job_counts WHERE production_id = $1
       AND NOT EXISTS (SELECT 1 FROM final_counts WHERE production_id = $1)";

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[
            REQUEST_ACCEPTED,
            PRODUCTION_DISPATCHED,
            JOB_STATUS,
            PRODUCTION_COMPLETED,
            INSTALLATION_HEALTH,
            FORWARDING_PROGRESS,
            PRODUCTION_FORWARDED,
        ],
        &[],
        &shutdown,
    )
    .await?;
    foundation.consume_concurrently(
        settings,
        Projector {
            db: foundation.db.clone(),
        },
        CONSUMERS,
        &shutdown,
    );
    let (changes, _) = broadcast::channel(1024);
    tokio::spawn(forward_changes(
        foundation.db.clone(),
        changes.clone(),
        shutdown.clone(),
    ));
    let api = StatusApi {
        db: foundation.db.clone(),
        changes,
    };
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::status_service_server::StatusServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    // The dashboard, JSON and /metrics share the gRPC port (HTTP/1.1 and 2).
    let routes = tonic::service::Routes::from(routes.into_axum_router().merge(http::router(api)));
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.status.port,
            routes,
            reporter,
            &["prodsys.v1.StatusService"],
            &shutdown,
        )
        .await
}

/// Feeds committed changes (production IDs) from NOTIFY into the watchers' channel.
async fn forward_changes(db: Db, changes: broadcast::Sender<String>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match db.listen(CHANGES_CHANNEL).await {
            Ok(mut listener) => {
                // Changes made while not listening were missed: every watcher looks again.
                let _ = changes.send(String::new());
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        note = listener.notifications.recv() => match note {
                            Some(id) => { let _ = changes.send(id); }
                            None => break,
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot LISTEN for status changes"
            ),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Builds the read model from events.
struct Projector {
    db: Db,
}

enum Update {
    Accepted(pb::RequestAccepted),
    Dispatched(pb::ProductionDispatched),
    Jobs(pb::JobStatusBatch),
    Completed(pb::ProductionCompleted),
    Health(pb::InstallationHealth),
    Progress(pb::ForwardingProgress),
    Forwarded(pb::ProductionForwarded),
}

fn decode(incoming: &Incoming) -> Result<(Uuid, Update), String> {
    match incoming.routing_key.as_str() {
        REQUEST_ACCEPTED => decode_event(incoming).map(|(id, m)| (id, Update::Accepted(m))),
        PRODUCTION_DISPATCHED => decode_event(incoming).map(|(id, m)| (id, Update::Dispatched(m))),
        JOB_STATUS => decode_event(incoming).map(|(id, m)| (id, Update::Jobs(m))),
        PRODUCTION_COMPLETED => decode_event(incoming).map(|(id, m)| (id, Update::Completed(m))),
        INSTALLATION_HEALTH => decode_event(incoming).map(|(id, m)| (id, Update::Health(m))),
        FORWARDING_PROGRESS => decode_event(incoming).map(|(id, m)| (id, Update::Progress(m))),
        PRODUCTION_FORWARDED => decode_event(incoming).map(|(id, m)| (id, Update::Forwarded(m))),
        other => Err(format!("status does not handle {other:?}")),
    }
}

impl BatchHandler for Projector {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut updates = Vec::new();
        for incoming in batch {
            match decode(incoming) {
                Ok(u) => {
                    updates.push(u);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<Uuid> = updates.iter().map(|(id, _)| *id).collect();
        let mut fresh = prodsys_db::claim(&tx, &ids).await?;
        // Everything the batch says about each production, merged first: one
        // statement then writes them all (a row may change once per statement).
        let mut productions: BTreeMap<String, ProductionUpdate> = BTreeMap::new();
        // Latest transition per job across the batch: one row can change once per statement.
        let mut latest: HashMap<(String, u64), pb::JobTransition> = HashMap::new();
        let mut finals = FinalCounts::default();
        let mut touched_by_forwarding = BTreeSet::new();
        for (id, update) in updates {
            // Taken once: the same event twice in one batch takes effect once.
            if !fresh.remove(&id) {
                continue;
            }
            match update {
                Update::Accepted(m) => {
                    forwarding::plan(&tx, &m).await?;
                    let p = productions.entry(m.production_id).or_default();
                    p.advance(ProductionState::Accepted);
                    p.request_id = Uuid::parse_str(&m.request_id).ok();
                    p.profile = Some(m.profile);
                    p.vo = Some(m.vo);
                    p.backend = Some(m.backend);
                }
                Update::Progress(m) => {
                    forwarding::progress(&tx, &m).await?;
                    touched_by_forwarding.insert(m.production_id);
                }
                Update::Forwarded(m) => {
                    forwarding::forwarded(&tx, &m).await?;
                    touched_by_forwarding.insert(m.production_id);
                }
                Update::Dispatched(m) => {
                    let p = productions.entry(m.production_id).or_default();
                    p.advance(ProductionState::Running);
                    p.job_total = Some(m.job_total as i64);
                    if let Some(estimate) = &m.estimate {
                        p.estimate = Some(prost::Message::encode_to_vec(estimate));
                    }
                }
                Update::Health(m) => {
                    // Rare: one statement each. An older report never overrides a newer one.
                    tx.execute_cached(
                        "INSERT INTO installations (name, healthy, reason, since_ms) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (name) DO UPDATE SET healthy = EXCLUDED.healthy,
                             reason = EXCLUDED.reason, since_ms = EXCLUDED.since_ms
                         WHERE installations.since_ms <= EXCLUDED.since_ms",
                        &[&m.installation, &m.healthy, &m.reason, &m.since_unix_ms],
                    )
                    .await?;
                }
                Update::Completed(m) => {
                    let state = ProductionState::from_proto(m.state)
                        .context("production.completed without a state")?;
                    if let Some(counts) = &m.counts {
                        finals.push(&m.production_id, counts);
                    }
                    productions
                        .entry(m.production_id)
                        .or_default()
                        .advance(state);
                }
                Update::Jobs(m) => {
                    for t in m.transitions {
                        let key = (t.production_id.clone(), t.job_index);
                        let newer = match latest.get(&key) {
                            Some(old) => job_order(&t) > job_order(old),
                            None => true,
                        };
                        if newer {
                            latest.insert(key, t);
                        }
                    }
                }
            }
        }
        let transitions: Vec<pb::JobTransition> = latest.into_values().collect();
        let mut touched: BTreeSet<String> = productions.keys().cloned().collect();
        touched.extend(transitions.iter().map(|t| t.production_id.clone()));
        touched.extend(touched_by_forwarding);
        // No lock per production: consumers project concurrently. A job row
        // is changed under its row lock and re-checked against the newest
        // version (so a late transition still never moves it backwards);
        // when two consumers insert the first transition of one job at once,
        // the second insert becomes that same guarded update (ON CONFLICT),
        // so a race costs no retry.
        upsert_productions(&tx, productions).await?;
        finals.write(&tx).await?;
        if !transitions.is_empty() {
            upsert_jobs(&tx, &transitions).await?;
        }
        if !touched.is_empty() {
            let touched: Vec<String> = touched.into_iter().collect();
            tx.execute_cached(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                &[&CHANGES_CHANNEL, &touched],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// The final job counts of the productions a batch saw end, one row per state.
#[derive(Default)]
struct FinalCounts {
    productions: Vec<String>,
    states: Vec<&'static str>,
    counts: Vec<i64>,
}

impl FinalCounts {
    fn push(&mut self, production_id: &str, c: &pb::JobCounts) {
        for (state, n) in [
            (JobState::Created, c.created),
            (JobState::Submitted, c.submitted),
            (JobState::Queued, c.queued),
            (JobState::Running, c.running),
            (JobState::Done, c.done),
            (JobState::Failed, c.failed),
            (JobState::Cancelled, c.cancelled),
            (JobState::Exhausted, c.exhausted),
        ] {
            if n > 0 {
                self.productions.push(production_id.to_string());
                self.states.push(state.as_str());
                self.counts.push(n as i64);
            }
        }
    }

    async fn write(&self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.productions.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO final_counts (production_id, state, n)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
             ON CONFLICT (production_id, state) DO UPDATE SET n = EXCLUDED.n",
            &[&self.productions, &self.states, &self.counts],
        )
        .await
        .context("recording final job counts")?;
        Ok(())
    }
}

/// What one batch says about one production.
#[derive(Default)]
struct ProductionUpdate {
    state: Option<ProductionState>,
    job_total: Option<i64>,
    request_id: Option<Uuid>,
    profile: Option<String>,
    vo: Option<String>,
    backend: Option<String>,
    estimate: Option<Vec<u8>>,
}

impl ProductionUpdate {
    /// Keeps the furthest state (events may arrive late or out of order).
    fn advance(&mut self, state: ProductionState) {
        if self.state.is_none_or(|s| state.rank() > s.rank()) {
            self.state = Some(state);
        }
    }
}

/// Moves productions forward (never backwards: events may arrive late) and
/// fills in what the batch learned about them, in one statement.
async fn upsert_productions(
    tx: &Transaction<'_>,
    updates: BTreeMap<String, ProductionUpdate>,
) -> anyhow::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let n = updates.len();
    let mut ids = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut ranks = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut profiles = Vec::with_capacity(n);
    let mut vos = Vec::with_capacity(n);
    let mut backends = Vec::with_capacity(n);
    let mut estimates = Vec::with_capacity(n);
    for (id, u) in updates {
        let state = u.state.unwrap_or(ProductionState::Accepted);
        ids.push(id);
        states.push(state.as_str());
        ranks.push(i32::from(state.rank()));
        totals.push(u.job_total);
        request_ids.push(u.request_id);
        profiles.push(u.profile);
        vos.push(u.vo);
        backends.push(u.backend);
        estimates.push(u.estimate);
    }
    tx.execute_cached(
        "INSERT INTO productions AS p (production_id, state, state_rank, job_total, request_id,
                                       profile, vo, backend, estimate)
         SELECT u.id, u.state, u.rank, u.total, u.request_id,
                COALESCE(u.profile, ''), COALESCE(u.vo, ''), COALESCE(u.backend, ''), u.estimate
         FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::uuid[], $6::text[],
                     $7::text[], $8::text[], $9::bytea[])
              AS u(id, state, rank, total, request_id, profile, vo, backend, estimate)
         ON CONFLICT (production_id) DO UPDATE SET
             state      = CASE WHEN EXCLUDED.state_rank > p.state_rank
                               THEN EXCLUDED.state ELSE p.state END,
             state_rank = GREATEST(EXCLUDED.state_rank, p.state_rank),
             job_total  = COALESCE(EXCLUDED.job_total, p.job_total),
             request_id = COALESCE(EXCLUDED.request_id, p.request_id),
             profile    = CASE WHEN EXCLUDED.profile = '' THEN p.profile ELSE EXCLUDED.profile END,
             vo         = CASE WHEN EXCLUDED.vo = '' THEN p.vo ELSE EXCLUDED.vo END,
             backend    = CASE WHEN EXCLUDED.backend = '' THEN p.backend ELSE EXCLUDED.backend END,
             estimate   = COALESCE(EXCLUDED.estimate, p.estimate),
             updated_at = now()",
        &[
            &ids,
            &states,
            &ranks,
            &totals,
            &request_ids,
            &profiles,
            &vos,
            &backends,
            &estimates,
        ],
    )
    .await?;
    Ok(())
}

fn job_order(t: &pb::JobTransition) -> (u32, u8) {
    let rank = JobState::from_proto(t.state).map_or(0, JobState::rank);
    (t.attempt, rank)
}

/// Records each job's latest transition and keeps the per-state job counts
/// in step, so a snapshot reads a handful of counters however large the
/// production. `transitions` holds at most one per job. One statement: known
/// jobs are updated only by a newer transition (the read model never moves
/// backwards), new ones inserted (or, when another consumer inserted the
/// job meanwhile, updated as a known one), and the counters moved by what changed —
/// no row travels back to the service.
async fn upsert_jobs(
    tx: &Transaction<'_>,
    transitions: &[pb::JobTransition],
) -> anyhow::Result<()> {
    let mut columns = JobColumns::default();
    for t in transitions {
        if let Some(state) = JobState::from_proto(t.state) {
            columns.push(t, (t.attempt as i32, i32::from(state.rank())), state);
        }
    }
    if columns.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "WITH u AS (
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[], $5::int[], $6::text[])
                 AS u(production_id, job_index, attempt, state, state_rank, raw_status)),
         updated AS (
             UPDATE jobs j SET prev_state = j.state, attempt = u.attempt, state = u.state,
                               state_rank = u.state_rank, raw_status = u.raw_status, updated_at = now()
             FROM u
             WHERE j.production_id = u.production_id AND j.job_index = u.job_index
               AND (j.attempt, j.state_rank) < (u.attempt, u.state_rank)
             RETURNING j.production_id, j.prev_state, j.state),
         inserted AS (
             INSERT INTO jobs AS j (production_id, job_index, attempt, state, state_rank, raw_status)
             SELECT u.production_id, u.job_index, u.attempt, u.state, u.state_rank, u.raw_status FROM u
             WHERE NOT EXISTS (SELECT 1 FROM jobs j
                               WHERE j.production_id = u.production_id AND j.job_index = u.job_index)
             ON CONFLICT (production_id, job_index) DO UPDATE
                 SET prev_state = j.state, attempt = EXCLUDED.attempt, state = EXCLUDED.state,
                     state_rank = EXCLUDED.state_rank, raw_status = EXCLUDED.raw_status,
                     updated_at = now()
                 WHERE (j.attempt, j.state_rank) < (EXCLUDED.attempt, EXCLUDED.state_rank)
             RETURNING j.production_id, j.prev_state, j.state),
         deltas AS (
             SELECT production_id, state, 1 AS d FROM updated
             UNION ALL SELECT production_id, prev_state, -1 FROM updated
             UNION ALL SELECT production_id, state, 1 FROM inserted
             UNION ALL SELECT production_id, prev_state, -1 FROM inserted
                 WHERE prev_state IS NOT NULL)
         INSERT INTO job_counts (production_id, state, n)
         SELECT production_id, state, sum(d) FROM deltas
         GROUP BY production_id, state HAVING sum(d) <> 0
         ORDER BY production_id, state
         ON CONFLICT (production_id, state) DO UPDATE SET n = job_counts.n + EXCLUDED.n",
        &columns.params(),
    )
    .await
    .context("recording job transitions")?;
    Ok(())
}

/// Job rows for one statement, column by column.
#[derive(Default)]
struct JobColumns<'a> {
    productions: Vec<&'a str>,
    indexes: Vec<i64>,
    attempts: Vec<i32>,
    states: Vec<&'static str>,
    ranks: Vec<i32>,
    raws: Vec<&'a str>,
}

impl<'a> JobColumns<'a> {
    fn push(&mut self, t: &'a pb::JobTransition, order: (i32, i32), state: JobState) {
        self.productions.push(t.production_id.as_str());
        self.indexes.push(t.job_index as i64);
        self.attempts.push(order.0);
        self.states.push(state.as_str());
        self.ranks.push(order.1);
        self.raws.push(t.raw_status.as_str());
    }

    fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    fn params(&self) -> [&(dyn prodsys_db::tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.productions,
            &self.indexes,
            &self.attempts,
            &self.states,
            &self.ranks,
            &self.raws,
        ]
    }
}

#[derive(Clone)]
struct StatusApi {
    db: Db,
    changes: broadcast::Sender<String>,
}

impl StatusApi {
    async fn snapshot(&self, production_id: &str) -> Result<pb::Production, ServiceError> {
        if production_id.is_empty() {
            return Err(ServiceError::Validation(vec![Violation::new(
                "production_id",
                "is required",
            )]));
        }
        let client = self.db.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT p.request_id, p.profile, p.vo, p.backend, p.state, COALESCE(p.job_total, 0),
                        p.updated_at, p.estimate, p.production_id, i.reason, i.since_ms
                 FROM productions p LEFT JOIN installations i ON i.name = p.backend AND NOT i.healthy
                 WHERE p.production_id = $1",
                &[&production_id],
            )
            .await
            .context("reading the production")?
            .ok_or_else(|| ServiceError::NotFound(format!("no production {production_id}")))?;
        let counts = client
            .query_cached(COUNTS_SQL, &[&production_id])
            .await
            .context("counting jobs")?;
        let mut production = production_from_row(
            production_id,
            &row,
            counts
                .iter()
                .map(|c| (c.get::<_, &str>(0), c.get::<_, i64>(1))),
        );
        forwarding::attach(&client, std::slice::from_mut(&mut production)).await?;
        Ok(production)
    }
}

fn production_from_row<'a>(
    production_id: &str,
    row: &prodsys_db::tokio_postgres::Row,
    counts: impl IntoIterator<Item = (&'a str, i64)>,
) -> pb::Production {
    let job_total = row.get::<_, i64>(5) as u64;
    let mut tally = pb::JobCounts::default();
    let mut seen = 0;
    for (state, n) in counts {
        if let Ok(state) = state.parse::<JobState>() {
            let n = n as u64;
            count_job(&mut tally, state, n);
            seen += n;
        }
    }
    // Jobs no event has mentioned yet are still CREATED.
    tally.created += job_total.saturating_sub(seen);
    let state = row
        .get::<_, &str>(4)
        .parse::<ProductionState>()
        .map_or(pb::ProductionState::Unspecified, ProductionState::to_proto);
    let updated: chrono::DateTime<chrono::Utc> = row.get(6);
    pb::Production {
        production_id: production_id.to_string(),
        request_id: row
            .get::<_, Option<Uuid>>(0)
            .map(|u| u.to_string())
            .unwrap_or_default(),
        profile: row.get(1),
        vo: row.get(2),
        state: state as i32,
        job_total,
        counts: Some(tally),
        backend: row.get(3),
        updated_unix_ms: updated.timestamp_millis(),
        estimate: row.get::<_, Option<Vec<u8>>>(7).and_then(|bytes| {
            <pb::ResourceEstimate as prost::Message>::decode(bytes.as_slice()).ok()
        }),
        held_reason: held_reason(
            state,
            row.get(3),
            row.get::<_, Option<&str>>(9),
            row.get::<_, Option<i64>>(10),
        ),
        // Filled by `forwarding::attach`.
        forwarding: Vec::new(),
        finished: false,
    }
}

/// Why a production's jobs are not moving: its installation is failing.
fn held_reason(
    state: pb::ProductionState,
    installation: &str,
    reason: Option<&str>,
    since_ms: Option<i64>,
) -> String {
    let waiting = matches!(
        state,
        pb::ProductionState::Accepted
            | pb::ProductionState::Dispatching
            | pb::ProductionState::Running
            | pb::ProductionState::Cancelling
    );
    match (waiting, reason, since_ms) {
        (true, Some(reason), Some(since)) => {
            let since = chrono::DateTime::from_timestamp_millis(since)
                .map_or_else(String::new, |t| {
                    format!(" since {}", t.format("%Y-%m-%d %H:%M:%S UTC"))
                });
            format!(
                "held: WMS installation {installation} is failing{since} ({reason}); its jobs wait until it answers"
            )
        }
        _ => String::new(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Production, Status>> + Send>>;

#[tonic::async_trait]
impl pb::status_service_server::StatusService for StatusApi {
    #[tracing::instrument(skip_all, fields(production_id = %request.get_ref().production_id))]
    async fn get_production(
        &self,
        request: Request<pb::GetProductionRequest>,
    ) -> Result<Response<pb::Production>, Status> {
        Ok(Response::new(
            self.snapshot(&request.get_ref().production_id).await?,
        ))
    }

    async fn list_productions(
        &self,
        request: Request<pb::ListProductionsRequest>,
    ) -> Result<Response<pb::ListProductionsResponse>, Status> {
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => 100,
            n => n.min(1000),
        } as i64;
        let state = ProductionState::from_proto(r.state).map(|s| s.as_str());
        let client = self.db.client().await.map_err(ServiceError::from)?;
        let rows = client
            .query_cached(
                "SELECT p.request_id, p.profile, p.vo, p.backend, p.state, COALESCE(p.job_total, 0),
                        p.updated_at, p.estimate, p.production_id, i.reason, i.since_ms,
                        c.states, c.ns
                 FROM productions p LEFT JOIN installations i ON i.name = p.backend AND NOT i.healthy
                 LEFT JOIN LATERAL (
                     SELECT array_agg(state) AS states, array_agg(n) AS ns FROM (
                         SELECT state, n FROM final_counts f WHERE f.production_id = p.production_id
                         UNION ALL
                         SELECT state, n FROM job_counts j WHERE j.production_id = p.production_id
                           AND NOT EXISTS (SELECT 1 FROM final_counts f
                                           WHERE f.production_id = p.production_id)) counts
                 ) c ON true
                 WHERE ($1 = '' OR p.vo = $1) AND ($2::text IS NULL OR p.state = $2)
                   AND ($3 = '' OR p.profile = $3) AND p.production_id > $4
                 ORDER BY p.production_id LIMIT $5",
                &[&r.vo, &state, &r.profile, &r.page_token, &(page_size + 1)],
            )
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let more = rows.len() as i64 > page_size;
        // The page and its job counts in one statement, not one more per production.
        let mut productions: Vec<pb::Production> = rows
            .iter()
            .take(page_size as usize)
            .map(|row| {
                let id: String = row.get(8);
                let states: Vec<String> = row.get::<_, Option<_>>(11).unwrap_or_default();
                let ns: Vec<i64> = row.get::<_, Option<_>>(12).unwrap_or_default();
                production_from_row(&id, row, states.iter().map(String::as_str).zip(ns))
            })
            .collect();
        forwarding::attach(&client, &mut productions)
            .await
            .map_err(ServiceError::from)?;
        let next_page_token = if more {
            productions
                .last()
                .map(|p| p.production_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProductionsResponse {
            productions,
            next_page_token,
        }))
    }

    type WatchProductionStream = WatchStream;

    async fn watch_production(
        &self,
        request: Request<pb::GetProductionRequest>,
    ) -> Result<Response<Self::WatchProductionStream>, Status> {
        let production_id = request.into_inner().production_id;
        // Subscribe before the first snapshot so no change falls between them.
        let mut changes = self.changes.subscribe();
        let first = self.snapshot(&production_id).await?;
        let api = self.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut ended_at: Option<std::time::Instant> = None;
            loop {
                // Ended, and its outputs where it asked.
                if last.finished {
                    let ended = *ended_at.get_or_insert_with(std::time::Instant::now);
                    if is_settled(&last) || ended.elapsed() >= SETTLE_WAIT {
                        return;
                    }
                }
                let changed = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
                match changed {
                    // An empty id means "anything may have changed".
                    Ok(Ok(id)) if !id.is_empty() && id != production_id => continue,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return,
                    _ => {}
                }
                match api.snapshot(&production_id).await {
                    Ok(snapshot) => {
                        if snapshot != last {
                            last = snapshot;
                            if tx.send(Ok(last.clone())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Every job of the production counted in a final state. Consumers project
/// concurrently, so a production's end may be recorded a moment before the
/// last transitions of its jobs; a watch ends once both are in.
fn is_settled(p: &pb::Production) -> bool {
    let c = p.counts.unwrap_or_default();
    c.created + c.submitted + c.queued + c.running + c.failed == 0
}

/// How long a watch waits for a finished production's counts to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Production, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
