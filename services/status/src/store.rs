//! Every SQL statement of the status service, and the NOTIFY channel that
//! tells watchers (on any replica) which production changed.

use std::time::Duration;

use anyhow::Context;
use prodsys_core::ProductionState;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_db::tokio_postgres::Row;
use prodsys_db::{Cached, Db};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::domain::{self, Changes, Failing, FinalCounts, InstallationHealth, JobTransition};
use crate::domain::{Production, ProductionUpdate};

/// The NOTIFY channel of committed changes: the payload is a production ID.
pub const CHANGES_CHANNEL: &str = "status_changes";

/// A production's job counts by state: the final ones once its
/// `production.completed` arrived, else those its jobs' transitions made.
const COUNTS_SQL: &str = "SELECT state, n FROM final_counts WHERE production_id = $1
     UNION ALL
     SELECT state, n FROM job_counts WHERE production_id = $1
       AND NOT EXISTS (SELECT 1 FROM final_counts WHERE production_id = $1)";

/// Writes one batch's changes and tells watchers which productions changed.
pub async fn project(tx: &Transaction<'_>, changes: Changes) -> anyhow::Result<()> {
    for report in &changes.health {
        record_health(tx, report).await?;
    }
    // No lock per production: consumers project concurrently. A job row
    // is changed under its row lock and re-checked against the newest
    // version (so a late transition still never moves it backwards);
    // when two consumers insert the first transition of one job at once,
    // the second insert becomes that same guarded update (ON CONFLICT),
    // so a race costs no retry.
    upsert_productions(tx, changes.productions).await?;
    write_members(tx, &changes.members).await?;
    write_inputs(tx, &changes.inputs).await?;
    write_final_counts(tx, &changes.finals).await?;
    if !changes.transitions.is_empty() {
        upsert_jobs(tx, &changes.transitions).await?;
    }
    if !changes.touched.is_empty() {
        tx.execute_cached(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            &[&CHANGES_CHANNEL, &changes.touched],
        )
        .await?;
    }
    Ok(())
}

/// The installations federated productions may run on.
async fn write_members(tx: &Transaction<'_>, members: &[(String, String)]) -> anyhow::Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    let (ids, installations): (Vec<&str>, Vec<&str>) = members
        .iter()
        .map(|(p, i)| (p.as_str(), i.as_str()))
        .unzip();
    tx.execute_cached(
        "INSERT INTO production_members (production_id, installation)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT DO NOTHING",
        &[&ids, &installations],
    )
    .await
    .context("recording a federated production's installations")?;
    Ok(())
}

/// Chained productions' inputs used (never fewer than already known) and,
/// for those that ended, their note.
async fn write_inputs(
    tx: &Transaction<'_>,
    inputs: &std::collections::BTreeMap<String, (u64, Option<String>)>,
) -> anyhow::Result<()> {
    if inputs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = inputs.keys().map(String::as_str).collect();
    let used: Vec<i64> = inputs.values().map(|(u, _)| *u as i64).collect();
    let notes: Vec<Option<&str>> = inputs.values().map(|(_, n)| n.as_deref()).collect();
    tx.execute_cached(
        "UPDATE productions p SET inputs_used = GREATEST(p.inputs_used, u.used),
                                  inputs_note = COALESCE(u.note, p.inputs_note)
         FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(id, used, note)
         WHERE p.production_id = u.id",
        &[&ids, &used, &notes],
    )
    .await?;
    Ok(())
}

/// An installation's health; an older report never overrides a newer one.
async fn record_health(tx: &Transaction<'_>, m: &InstallationHealth) -> anyhow::Result<()> {
    tx.execute_cached(
        "INSERT INTO installations (name, healthy, reason, since_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET healthy = EXCLUDED.healthy,
             reason = EXCLUDED.reason, since_ms = EXCLUDED.since_ms
         WHERE installations.since_ms <= EXCLUDED.since_ms",
        &[&m.installation, &m.healthy, &m.reason, &m.since_unix_ms],
    )
    .await?;
    Ok(())
}

async fn write_final_counts(tx: &Transaction<'_>, finals: &FinalCounts) -> anyhow::Result<()> {
    if finals.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "INSERT INTO final_counts (production_id, state, n)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
         ON CONFLICT (production_id, state) DO UPDATE SET n = EXCLUDED.n",
        &[&finals.productions, &finals.states, &finals.counts],
    )
    .await
    .context("recording final job counts")?;
    Ok(())
}

/// Moves productions forward (never backwards: events may arrive late) and
/// fills in what the batch learned about them, in one statement.
async fn upsert_productions(
    tx: &Transaction<'_>,
    updates: std::collections::BTreeMap<String, ProductionUpdate>,
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
    let mut periods = Vec::with_capacity(n);
    let mut pointings = Vec::with_capacity(n);
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
        periods.push(u.period);
        pointings.push(u.pointing);
    }
    tx.execute_cached(
        "INSERT INTO productions AS p (production_id, state, state_rank, job_total, request_id,
                                       profile, vo, backend, estimate, period, pointing)
         SELECT u.id, u.state, u.rank, u.total, u.request_id,
                COALESCE(u.profile, ''), COALESCE(u.vo, ''), COALESCE(u.backend, ''), u.estimate,
                COALESCE(u.period, ''), COALESCE(u.pointing, '')
         FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::uuid[], $6::text[],
                     $7::text[], $8::text[], $9::bytea[], $10::text[], $11::text[])
              AS u(id, state, rank, total, request_id, profile, vo, backend, estimate, period,
                   pointing)
         ON CONFLICT (production_id) DO UPDATE SET
             state      = CASE WHEN EXCLUDED.state_rank > p.state_rank
                               THEN EXCLUDED.state ELSE p.state END,
             state_rank = GREATEST(EXCLUDED.state_rank, p.state_rank),
             -- A chained production's total grows as its inputs arrive; events may come out of order.
             job_total  = GREATEST(EXCLUDED.job_total, p.job_total),
             request_id = COALESCE(EXCLUDED.request_id, p.request_id),
             profile    = CASE WHEN EXCLUDED.profile = '' THEN p.profile ELSE EXCLUDED.profile END,
             vo         = CASE WHEN EXCLUDED.vo = '' THEN p.vo ELSE EXCLUDED.vo END,
             backend    = CASE WHEN EXCLUDED.backend = '' THEN p.backend ELSE EXCLUDED.backend END,
             estimate   = COALESCE(EXCLUDED.estimate, p.estimate),
             period     = CASE WHEN EXCLUDED.period = '' THEN p.period ELSE EXCLUDED.period END,
             pointing   = CASE WHEN EXCLUDED.pointing = '' THEN p.pointing ELSE EXCLUDED.pointing END,
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
            &periods,
            &pointings,
        ],
    )
    .await?;
    Ok(())
}

/// Records each job's latest transition and keeps the per-state job counts
/// in step, so a snapshot reads a handful of counters however large the
/// production. `transitions` holds at most one per job. One statement: known
/// jobs are updated only by a newer transition (the read model never moves
/// backwards), new ones inserted (or, when another consumer inserted the
/// job meanwhile, updated as a known one), and the counters moved by what changed —
/// no row travels back to the service.
async fn upsert_jobs(tx: &Transaction<'_>, transitions: &[JobTransition]) -> anyhow::Result<()> {
    let mut columns = JobColumns::default();
    for t in transitions {
        columns.push(t);
    }
    if columns.is_empty() {
        return Ok(());
    }
    prodsys_db::plan_by_key(tx).await?;
    tx.execute_cached(
        "WITH u AS (
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[], $5::int[], $6::text[],
                                  $7::text[])
                 AS u(production_id, job_index, attempt, state, state_rank, raw_status, installation)),
         -- Each known job's row found by its key and updated, only by a
         -- newer transition: one index probe a transition, in key order so
         -- concurrent batches lock alike (joins other than nested loops over
         -- indexes are off for this statement; left to the planner, a join
         -- hashed the whole table on every batch once it outgrew its
         -- statistics). A row another batch updated after this statement's
         -- snapshot is waited for and the whole condition checked again on
         -- its new version, so an older transition never overwrites a newer
         -- one. (The row used to be locked first by a separate probe: that
         -- wrote each row twice, the lock and then the update.)
         updated AS (
             UPDATE jobs j SET prev_state = j.state, attempt = k.attempt, state = k.state,
                               state_rank = k.state_rank, raw_status = k.raw_status, updated_at = now(),
                               prev_installation = j.installation, installation = k.installation
             FROM (SELECT * FROM u ORDER BY production_id, job_index) k
             WHERE j.production_id = k.production_id AND j.job_index = k.job_index
               AND (j.attempt, j.state_rank) < (k.attempt, k.state_rank)
             RETURNING j.production_id, j.prev_state, j.state, j.prev_installation, j.installation),
         inserted AS (
             INSERT INTO jobs AS j (production_id, job_index, attempt, state, state_rank, raw_status,
                                    installation)
             SELECT u.production_id, u.job_index, u.attempt, u.state, u.state_rank, u.raw_status,
                    u.installation FROM u
             WHERE NOT EXISTS (SELECT 1 FROM jobs j
                               WHERE j.production_id = u.production_id AND j.job_index = u.job_index)
             ON CONFLICT (production_id, job_index) DO UPDATE
                 SET prev_state = j.state, attempt = EXCLUDED.attempt, state = EXCLUDED.state,
                     state_rank = EXCLUDED.state_rank, raw_status = EXCLUDED.raw_status,
                     updated_at = now(), prev_installation = j.installation,
                     installation = EXCLUDED.installation
                 WHERE (j.attempt, j.state_rank) < (EXCLUDED.attempt, EXCLUDED.state_rank)
             RETURNING j.production_id, j.prev_state, j.state, j.prev_installation, j.installation),
         -- The same moves, per installation (a job waiting to be placed is on none).
         per_installation AS (
             INSERT INTO installation_job_counts (production_id, installation, state, n)
             SELECT production_id, installation, state, sum(d) FROM (
                 SELECT production_id, installation, state, 1 AS d FROM updated
                 UNION ALL SELECT production_id, prev_installation, prev_state, -1 FROM updated
                 UNION ALL SELECT production_id, installation, state, 1 FROM inserted
                 UNION ALL SELECT production_id, prev_installation, prev_state, -1 FROM inserted
                     WHERE prev_state IS NOT NULL) moves
             WHERE installation <> ''
             GROUP BY production_id, installation, state HAVING sum(d) <> 0
             ORDER BY production_id, installation, state
             ON CONFLICT (production_id, installation, state)
                 DO UPDATE SET n = installation_job_counts.n + EXCLUDED.n),
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
    prodsys_db::plan_freely(tx).await?;
    Ok(())
}

/// Job rows for one statement, column by column; transitions to a state
/// this version does not know are left out.
#[derive(Default)]
struct JobColumns<'a> {
    productions: Vec<&'a str>,
    indexes: Vec<i64>,
    attempts: Vec<i32>,
    states: Vec<&'static str>,
    ranks: Vec<i32>,
    raws: Vec<&'a str>,
    installations: Vec<&'a str>,
}

impl<'a> JobColumns<'a> {
    fn push(&mut self, t: &'a JobTransition) {
        let Some(state) = t.state else {
            return;
        };
        self.productions.push(t.production_id.as_str());
        self.indexes.push(t.job_index as i64);
        self.attempts.push(t.attempt as i32);
        self.states.push(state.as_str());
        self.ranks.push(i32::from(state.rank()));
        self.raws.push(t.raw_status.as_str());
        self.installations.push(t.installation.as_str());
    }

    fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    fn params(&self) -> [&(dyn prodsys_db::tokio_postgres::types::ToSql + Sync); 7] {
        [
            &self.productions,
            &self.indexes,
            &self.attempts,
            &self.states,
            &self.ranks,
            &self.raws,
            &self.installations,
        ]
    }
}

/// One production and its job counts; `None` when the read model has none.
pub async fn production(db: &Db, production_id: &str) -> anyhow::Result<Option<Production>> {
    let client = db.client().await?;
    let Some(row) = client
        .query_opt_cached(
            "SELECT p.request_id, p.profile, p.vo, p.backend, p.state, COALESCE(p.job_total, 0),
                    p.updated_at, p.estimate, p.production_id, h.names, h.sinces,
                    p.period, p.pointing, NULL::text[], NULL::bigint[], p.inputs_used, p.inputs_note,
                    h.reasons
             FROM productions p LEFT JOIN LATERAL (
                 -- Held: its installation failing, or every one of its group's.
                 SELECT array_agg(i.name ORDER BY i.name) AS names,
                        array_agg(i.since_ms ORDER BY i.name) AS sinces,
                        array_agg(i.reason ORDER BY i.name) AS reasons
                 FROM installations i
                 WHERE NOT i.healthy
                   AND (i.name = p.backend
                        OR i.name IN (SELECT m.installation FROM production_members m
                                      WHERE m.production_id = p.production_id))
                 HAVING count(*) >= GREATEST(1, (SELECT count(*) FROM production_members m
                                                 WHERE m.production_id = p.production_id))
             ) h ON true
             WHERE p.production_id = $1",
            &[&production_id],
        )
        .await
        .context("reading the production")?
    else {
        return Ok(None);
    };
    let counts = client
        .query_cached(COUNTS_SQL, &[&production_id])
        .await
        .context("counting jobs")?;
    Ok(Some(production_from_row(
        production_id,
        &row,
        counts
            .iter()
            .map(|c| (c.get::<_, &str>(0), c.get::<_, i64>(1))),
    )))
}

/// Which productions a page lists.
pub struct ListFilter<'a> {
    /// Empty for any.
    pub vo: &'a str,
    pub state: Option<ProductionState>,
    /// Empty for any.
    pub profile: &'a str,
    /// The page starts after this production ID.
    pub after: &'a str,
    /// Only this request's productions.
    pub request_id: Option<uuid::Uuid>,
    pub page_size: u32,
    /// Only productions of these VOs (the caller's); `None` for all.
    pub visible_vos: Option<Vec<String>>,
}

/// One page of productions in ID order, with their job counts (one
/// statement, not one more per production), and whether more follow.
pub async fn list_productions(
    client: &prodsys_db::deadpool_postgres::Object,
    filter: &ListFilter<'_>,
) -> anyhow::Result<(Vec<Production>, bool)> {
    let state = filter.state.map(ProductionState::as_str);
    let page_size = i64::from(filter.page_size);
    let rows = client
        .query_cached(
            "SELECT p.request_id, p.profile, p.vo, p.backend, p.state, COALESCE(p.job_total, 0),
                    p.updated_at, p.estimate, p.production_id, h.names, h.sinces,
                    p.period, p.pointing, c.states, c.ns, p.inputs_used, p.inputs_note,
                    h.reasons
             FROM productions p LEFT JOIN LATERAL (
                 -- Held: its installation failing, or every one of its group's.
                 SELECT array_agg(i.name ORDER BY i.name) AS names,
                        array_agg(i.since_ms ORDER BY i.name) AS sinces,
                        array_agg(i.reason ORDER BY i.name) AS reasons
                 FROM installations i
                 WHERE NOT i.healthy
                   AND (i.name = p.backend
                        OR i.name IN (SELECT m.installation FROM production_members m
                                      WHERE m.production_id = p.production_id))
                 HAVING count(*) >= GREATEST(1, (SELECT count(*) FROM production_members m
                                                 WHERE m.production_id = p.production_id))
             ) h ON true
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
               AND ($6::uuid IS NULL OR p.request_id = $6)
               AND ($7::text[] IS NULL OR p.vo = ANY($7))
             ORDER BY p.production_id LIMIT $5",
            &[
                &filter.vo,
                &state,
                &filter.profile,
                &filter.after,
                &(page_size + 1),
                &filter.request_id,
                &filter.visible_vos,
            ],
        )
        .await?;
    let more = rows.len() as i64 > page_size;
    let productions = rows
        .iter()
        .take(page_size as usize)
        .map(|row| {
            let id: String = row.get(8);
            let states: Vec<String> = row.get::<_, Option<_>>(13).unwrap_or_default();
            let ns: Vec<i64> = row.get::<_, Option<_>>(14).unwrap_or_default();
            production_from_row(&id, row, states.iter().map(String::as_str).zip(ns))
        })
        .collect();
    Ok((productions, more))
}

fn production_from_row<'a>(
    production_id: &str,
    row: &Row,
    counts: impl IntoIterator<Item = (&'a str, i64)>,
) -> Production {
    let job_total = row.get::<_, i64>(5) as u64;
    let state = row.get::<_, &str>(4).parse::<ProductionState>().ok();
    let backend: String = row.get(3);
    let names: Vec<&str> = row.get::<_, Option<_>>(9).unwrap_or_default();
    let sinces: Vec<i64> = row.get::<_, Option<_>>(10).unwrap_or_default();
    let reasons: Vec<&str> = row.get::<_, Option<_>>(17).unwrap_or_default();
    let failing: Vec<Failing<'_>> = names
        .into_iter()
        .zip(sinces)
        .zip(reasons)
        .map(|((installation, since_unix_ms), reason)| Failing {
            installation,
            reason,
            since_unix_ms,
        })
        .collect();
    let updated: chrono::DateTime<chrono::Utc> = row.get(6);
    Production {
        production_id: production_id.to_string(),
        request_id: row.get(0),
        profile: row.get(1),
        vo: row.get(2),
        held_reason: domain::held_reason(state, &backend, &failing),
        backend,
        state,
        job_total,
        counts: domain::tally(job_total, counts),
        updated_unix_ms: updated.timestamp_millis(),
        estimate: row.get(7),
        period: row.get(11),
        pointing: row.get(12),
        inputs_used: row.get::<_, i64>(15) as u64,
        inputs_note: row.get(16),
    }
}

/// Records the destinations an accepted production asked for (the first
/// time it is told).
pub async fn plan_forwarding(
    tx: &Transaction<'_>,
    production_id: &str,
    destinations: &[String],
) -> anyhow::Result<()> {
    tx.execute_cached(
        "INSERT INTO forward_plans (production_id, destinations) VALUES ($1, $2)
         ON CONFLICT (production_id) DO NOTHING",
        &[&production_id, &destinations],
    )
    .await
    .context("recording a forwarding plan")?;
    Ok(())
}

/// How far forwarding to one destination got, as the catalog reports it.
pub struct DestinationCounts<'a> {
    pub destination: &'a str,
    pub forwarded: u64,
    pub total: u64,
    pub failing: u64,
    pub held_reason: &'a str,
}

/// Records a production's forwarding counts reported at `at_ms`; a report
/// older than the one kept for a destination changes nothing there.
pub async fn record_forwarding(
    tx: &Transaction<'_>,
    production_id: &str,
    destinations: &[DestinationCounts<'_>],
    at_ms: i64,
) -> anyhow::Result<()> {
    for d in destinations {
        tx.execute_cached(
            "INSERT INTO forwarding (production_id, destination, forwarded, total, failing,
                                     held_reason, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (production_id, destination) DO UPDATE SET
                 forwarded = EXCLUDED.forwarded, total = EXCLUDED.total,
                 failing = EXCLUDED.failing, held_reason = EXCLUDED.held_reason,
                 at_ms = EXCLUDED.at_ms
             WHERE forwarding.at_ms <= EXCLUDED.at_ms",
            &[
                &production_id,
                &d.destination,
                &(d.forwarded as i64),
                &(d.total as i64),
                &(d.failing as i64),
                &d.held_reason,
                &at_ms,
            ],
        )
        .await
        .context("recording forwarding progress")?;
    }
    Ok(())
}

/// Records that every output of a production is catalogued and on every destination.
pub async fn record_forwarded(tx: &Transaction<'_>, production_id: &str) -> anyhow::Result<()> {
    tx.execute_cached(
        "INSERT INTO forwarded (production_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&production_id],
    )
    .await
    .context("recording a forwarded production")?;
    Ok(())
}

/// One destination of a production's forwarding, as the read model has it.
pub struct ForwardingRow {
    pub production_id: String,
    /// `None` on the one row of a production without any destination.
    pub destination: Option<String>,
    pub forwarded: u64,
    pub total: u64,
    pub failing: u64,
    pub held_reason: String,
    /// Whether the production was announced forwarded (the same on each of its rows).
    pub all_forwarded: bool,
}

/// The forwarding of these productions: a row per destination of each, in
/// the order the production asked for them, or one without a destination
/// for a production without any; in production ID order.
pub async fn forwarding<C: GenericClient + Sync>(
    client: &C,
    production_ids: &[&str],
) -> anyhow::Result<Vec<ForwardingRow>> {
    Ok(client
        .query_cached(
            "SELECT i.id, u.d, COALESCE(f.forwarded, 0), COALESCE(f.total, 0),
                    COALESCE(f.failing, 0), COALESCE(f.held_reason, ''),
                    EXISTS (SELECT FROM forwarded x WHERE x.production_id = i.id)
             FROM unnest($1::text[]) AS i (id)
             LEFT JOIN forward_plans p ON p.production_id = i.id
             LEFT JOIN LATERAL unnest(p.destinations) WITH ORDINALITY AS u (d, n) ON true
             LEFT JOIN forwarding f ON f.production_id = i.id AND f.destination = u.d
             ORDER BY i.id, u.n",
            &[&production_ids],
        )
        .await
        .context("reading forwarding progress")?
        .iter()
        .map(|r| ForwardingRow {
            production_id: r.get(0),
            destination: r.get(1),
            forwarded: r.get::<_, i64>(2) as u64,
            total: r.get::<_, i64>(3) as u64,
            failing: r.get::<_, i64>(4) as u64,
            held_reason: r.get(5),
            all_forwarded: r.get(6),
        })
        .collect())
}

/// A production's jobs on one installation in one state.
pub struct InstallationCount {
    pub production_id: String,
    pub installation: String,
    pub state: String,
    pub n: i64,
}

/// The jobs per installation and state of these productions (none where
/// there are none), by production, installation and state.
pub async fn installation_counts<C: GenericClient + Sync>(
    client: &C,
    production_ids: &[&str],
) -> anyhow::Result<Vec<InstallationCount>> {
    Ok(client
        .query_cached(
            "SELECT production_id, installation, state, n FROM installation_job_counts
             WHERE production_id = ANY($1) AND n > 0
             ORDER BY production_id, installation, state",
            &[&production_ids],
        )
        .await
        .context("reading jobs per installation")?
        .iter()
        .map(|r| InstallationCount {
            production_id: r.get(0),
            installation: r.get(1),
            state: r.get(2),
            n: r.get(3),
        })
        .collect())
}

/// The read model's figures for `/metrics`.
#[derive(Debug)]
pub struct Figures {
    /// Productions per state name.
    pub productions: Vec<(String, i64)>,
    /// Jobs per state name, as counted (CREATED only where an event mentioned it).
    pub jobs: Vec<(String, i64)>,
    /// Jobs of every production that no event has mentioned yet.
    pub unmentioned: i64,
    /// Each installation and whether it answers.
    pub installations: Vec<(String, bool)>,
    /// Each forwarding destination: files forwarded there, files of its
    /// productions catalogued so far, files failing (over every production,
    /// as the catalog last announced them).
    pub destinations: Vec<DestinationFigures>,
}

#[derive(Debug)]
pub struct DestinationFigures {
    pub destination: String,
    pub forwarded: i64,
    pub total: i64,
    pub failing: i64,
}

/// Every production's job counts: final ones where a production ended, else projected.
const COUNTED: &str = "(SELECT state, n FROM final_counts
     UNION ALL
     SELECT state, n FROM job_counts j
     WHERE NOT EXISTS (SELECT 1 FROM final_counts f WHERE f.production_id = j.production_id)) AS c";

pub async fn figures(db: &Db) -> anyhow::Result<Figures> {
    let client = db.client().await?;
    let productions = client
        .query_cached(
            "SELECT state, count(*) FROM productions GROUP BY state ORDER BY state",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let unmentioned = client
        .query_one_cached(
            &format!(
                "SELECT COALESCE(sum(job_total), 0)::bigint - (SELECT COALESCE(sum(n), 0)::bigint FROM {COUNTED})
                 FROM productions"
            ),
            &[],
        )
        .await?
        .get(0);
    let jobs = client
        .query_cached(
            &format!("SELECT state, sum(n)::bigint FROM {COUNTED} GROUP BY state ORDER BY state"),
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let installations = client
        .query_cached("SELECT name, healthy FROM installations ORDER BY name", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let destinations = client
        .query_cached(
            "SELECT destination, sum(forwarded)::bigint, sum(total)::bigint, sum(failing)::bigint
             FROM forwarding GROUP BY destination ORDER BY destination",
            &[],
        )
        .await?
        .iter()
        .map(|row| DestinationFigures {
            destination: row.get(0),
            forwarded: row.get(1),
            total: row.get(2),
            failing: row.get(3),
        })
        .collect();
    Ok(Figures {
        productions,
        jobs,
        unmentioned,
        installations,
        destinations,
    })
}

/// Feeds committed changes (production IDs) from NOTIFY into the watchers' channel.
pub async fn forward_changes(
    db: Db,
    changes: broadcast::Sender<String>,
    shutdown: CancellationToken,
) {
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
