//! Every SQL statement of the dispatcher, typed in and out: its scheduler,
//! consumer, planning task, installation leases and `JobService` here, its
//! federation's placement in [`federation`]. Callers own the transactions: a
//! function taking a [`Transaction`] runs inside one, a [`GenericClient`]
//! may be either.

use std::collections::{HashMap, HashSet};

use prodsys_core::{JobState, ProductionState};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};

use crate::domain::{JobRow, NewProduction};

pub mod federation;

/// Columns of a job with what its templates need, in [`job_row`]'s order.
const JOB_COLUMNS: &str =
    "j.production_id, j.job_index, j.run_number, j.seed, j.units, j.attempt, j.state,
                           j.workdir, p.profile, p.vo, p.parameters, p.output_destination,
                           j.attempts_moved";

/// How many [`JOB_COLUMNS`] there are: the index of a column selected after them.
const JOB_COLUMN_COUNT: usize = 13;

fn job_row(row: &prodsys_db::tokio_postgres::Row) -> anyhow::Result<JobRow> {
    Ok(JobRow {
        production_id: row.get(0),
        job_index: row.get(1),
        run_number: row.get(2),
        seed: row.get(3),
        units: row.get(4),
        attempt: row.get(5),
        state: row.get::<_, &str>(6).parse()?,
        workdir: row.get(7),
        profile: row.get(8),
        vo: row.get(9),
        parameters: row.get(10),
        output_destination: row.get(11),
        moved: row.get(12),
    })
}

/// The deployment's tag, the prefix of every backend job name.
pub async fn deployment_tag<C: GenericClient + Sync>(client: &C) -> anyhow::Result<String> {
    Ok(client
        .query_one_cached("SELECT tag FROM deployment", &[])
        .await?
        .get(0))
}

/// Backend IDs of an installation's jobs that are queued or running, at most `limit`.
pub async fn in_flight<C: GenericClient + Sync>(
    client: &C,
    backend: &str,
    limit: i64,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query_cached(
            // In-flight jobs first, through their small partial index, whatever
            // the size of the productions they belong to; then each one's
            // production by its key. A plain join lets the planner, before
            // the tables are analysed, read every production of the
            // installation to hash them (3 ms a round with a few thousand).
            "WITH flying AS MATERIALIZED (
                 SELECT production_id, backend_job_id, installation FROM jobs
                 WHERE state IN ('SUBMITTED', 'QUEUED', 'RUNNING') AND backend_job_id IS NOT NULL)
             SELECT f.backend_job_id FROM flying f
             CROSS JOIN LATERAL (
                 SELECT 1 FROM productions p
                 WHERE p.production_id = f.production_id
                   AND COALESCE(f.installation, p.backend) = $1 LIMIT 1) p
             LIMIT $2",
            &[&backend, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Jobs of an installation reserved (SUBMITTED) without a backend ID: a
/// submission whose outcome a crash lost. At most 1,000, in order.
pub async fn reserved_without_id<C: GenericClient + Sync>(
    client: &C,
    backend: &str,
) -> anyhow::Result<Vec<JobRow>> {
    client
        .query_cached(
            &format!(
                "WITH reserved AS MATERIALIZED (
                     SELECT production_id, job_index FROM jobs
                     WHERE state = 'SUBMITTED' AND backend_job_id IS NULL)
                 SELECT {JOB_COLUMNS} FROM reserved r
                 JOIN jobs j USING (production_id, job_index)
                 JOIN productions p ON p.production_id = j.production_id
                 WHERE COALESCE(j.installation, p.backend) = $1
                 ORDER BY j.production_id, j.job_index LIMIT 1000"
            ),
            &[&backend],
        )
        .await?
        .iter()
        .map(job_row)
        .collect()
}

/// Reserves jobs on `installation`: SUBMITTED without a backend ID, each in
/// its attempt's directory (`(job, workdir)`), in one statement.
pub async fn reserve(
    tx: &Transaction<'_>,
    jobs: &[(&JobRow, String)],
    installation: &str,
) -> anyhow::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = jobs.iter().map(|(j, _)| j.production_id.as_str()).collect();
    let indexes: Vec<i64> = jobs.iter().map(|(j, _)| j.job_index).collect();
    let workdirs: Vec<&str> = jobs.iter().map(|(_, w)| w.as_str()).collect();
    tx.execute_cached(
        "UPDATE jobs j SET state = 'SUBMITTED', backend_job_id = NULL, workdir = u.workdir,
                           raw_status = 'reserved', attempts_submitted = attempts_submitted + 1,
                           installation = $4, updated_at = now()
         FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(production_id, job_index, workdir)
         WHERE j.production_id = u.production_id AND j.job_index = u.job_index",
        &[&ids, &indexes, &workdirs, &installation],
    )
    .await?;
    Ok(())
}

/// Records the backend's IDs of reserved jobs (`(job, id, raw)`), in one statement.
pub async fn set_backend_ids(
    tx: &Transaction<'_>,
    jobs: &[(&JobRow, &str, &str)],
) -> anyhow::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = jobs
        .iter()
        .map(|(j, _, _)| j.production_id.as_str())
        .collect();
    let indexes: Vec<i64> = jobs.iter().map(|(j, _, _)| j.job_index).collect();
    let backend_ids: Vec<&str> = jobs.iter().map(|(_, id, _)| *id).collect();
    let raws: Vec<&str> = jobs.iter().map(|(_, _, raw)| *raw).collect();
    tx.execute_cached(
        "UPDATE jobs j SET backend_job_id = u.backend_job_id, raw_status = u.raw, updated_at = now()
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
              AS u(production_id, job_index, backend_job_id, raw)
         WHERE j.production_id = u.production_id AND j.job_index = u.job_index",
        &[&ids, &indexes, &backend_ids, &raws],
    )
    .await?;
    Ok(())
}

/// The in-flight jobs of `installation` with these backend IDs, by backend
/// ID (two installations may give the same ID); locked when `lock`.
pub async fn in_flight_jobs<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
    ids: &[&str],
    lock: bool,
) -> anyhow::Result<HashMap<String, JobRow>> {
    let sql = format!(
        "SELECT {JOB_COLUMNS}, j.backend_job_id FROM jobs j JOIN productions p USING (production_id)
         WHERE j.backend_job_id = ANY($1) AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
           AND COALESCE(j.installation, p.backend) = $2{}",
        if lock { " FOR UPDATE OF j" } else { "" }
    );
    let mut jobs = HashMap::new();
    for row in client.query_cached(&sql, &[&ids, &installation]).await? {
        jobs.insert(row.get(JOB_COLUMN_COUNT), job_row(&row)?);
    }
    Ok(jobs)
}

/// A job's new state and attempt, with the backend's word and exit code,
/// and an ended attempt's CPU time where the WMS reported it.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    pub production_id: String,
    pub job_index: i64,
    pub state: JobState,
    pub attempt: i32,
    pub raw: String,
    pub exit_code: Option<i32>,
    pub cpu_ms: Option<u64>,
}

/// Applies `updates` in one statement, in their order: a job updated twice
/// ends as its last update says, with the CPU time of both counted. The job
/// started once it left the queue; it ended once final.
pub async fn set_jobs(tx: &Transaction<'_>, updates: &[JobUpdate]) -> anyhow::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    // The last update of each job, with every update's CPU time added up.
    let mut last: HashMap<(&str, i64), (usize, i64, i32)> = HashMap::new();
    for (at, u) in updates.iter().enumerate() {
        let cpu = u.cpu_ms.map(|ms| ms.min(i64::MAX as u64) as i64);
        let entry = last
            .entry((u.production_id.as_str(), u.job_index))
            .or_insert((at, 0, 0));
        entry.0 = at;
        if let Some(cpu) = cpu {
            entry.1 = entry.1.saturating_add(cpu);
            entry.2 += 1;
        }
    }
    let mut kept: Vec<(usize, i64, i32)> = last.into_values().collect();
    kept.sort_by_key(|(at, _, _)| {
        let u = &updates[*at];
        (u.production_id.as_str(), u.job_index)
    });
    let n = kept.len();
    let (mut ids, mut indexes, mut states, mut attempts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut raws, mut exits, mut cpus, mut measured) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (at, cpu, counted) in kept {
        let u = &updates[at];
        ids.push(u.production_id.as_str());
        indexes.push(u.job_index);
        states.push(u.state.as_str());
        attempts.push(u.attempt);
        raws.push(u.raw.as_str());
        exits.push(u.exit_code);
        cpus.push(cpu);
        measured.push(counted);
    }
    tx.execute_cached(
        "UPDATE jobs j SET state = u.state, attempt = u.attempt, raw_status = u.raw,
                           exit_code = u.exit_code, cpu_ms = j.cpu_ms + u.cpu_ms,
                           cpu_measured = j.cpu_measured + u.measured,
                           started_at = CASE WHEN u.state IN ('SUBMITTED', 'QUEUED') THEN j.started_at
                                             ELSE COALESCE(j.started_at, now()) END,
                           ended_at = CASE WHEN u.state IN ('DONE', 'EXHAUSTED', 'CANCELLED') THEN now()
                                           ELSE j.ended_at END,
                           updated_at = now()
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[], $5::text[], $6::int[],
                     $7::bigint[], $8::int[])
              AS u(production_id, job_index, state, attempt, raw, exit_code, cpu_ms, measured)
         WHERE j.production_id = u.production_id AND j.job_index = u.job_index",
        &[
            &ids, &indexes, &states, &attempts, &raws, &exits, &cpus, &measured,
        ],
    )
    .await?;
    Ok(())
}

/// The installation's productions asked to stop.
pub async fn cancelling_productions<C: GenericClient + Sync>(
    client: &C,
    backend: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query_cached(
            "SELECT production_id FROM productions WHERE state = 'CANCELLING' AND backend = $1",
            &[&backend],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Backend IDs of these productions' jobs in flight on `installation`.
pub async fn flying_ids<C: GenericClient + Sync>(
    client: &C,
    productions: &[String],
    installation: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query_cached(
            "SELECT j.backend_job_id FROM jobs j JOIN productions p USING (production_id)
             WHERE j.production_id = ANY($1) AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
               AND j.backend_job_id IS NOT NULL AND COALESCE(j.installation, p.backend) = $2",
            &[&productions, &installation],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Those of `productions` still CANCELLING, locked; the ones another replica
/// is closing are skipped.
pub async fn lock_cancelling(
    tx: &Transaction<'_>,
    productions: &[String],
) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            "SELECT production_id FROM productions
             WHERE production_id = ANY($1) AND state = 'CANCELLING'
             FOR UPDATE SKIP LOCKED",
            &[&productions],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A job stopped by a cancel.
pub struct Stopped {
    pub production_id: String,
    pub job_index: i64,
    pub attempt: i32,
    pub backend_job_id: Option<String>,
}

/// What a cancel did to its productions' jobs.
pub struct Cancelled {
    /// In flight, now CANCELLED (each a transition for status).
    pub stopped: Vec<Stopped>,
    /// Never started: removed (a delete costs a fraction of an update).
    pub never_started: u64,
    /// Waiting for a retry: CANCELLED.
    pub retrying: u64,
}

/// Cancels every job of `productions` that has not ended, set-based; of
/// those in flight, only the ones on `installation` (a federated
/// production's others are cancelled by their own installation's scheduler).
pub async fn cancel_jobs(
    tx: &Transaction<'_>,
    productions: &[String],
    installation: &str,
) -> anyhow::Result<Cancelled> {
    let stopped = tx
        .query_cached(
            "UPDATE jobs j SET state = 'CANCELLED', raw_status = 'cancelled', ended_at = now(),
                               updated_at = now()
             FROM productions p
             WHERE p.production_id = j.production_id
               AND j.production_id = ANY($1) AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
               AND COALESCE(j.installation, p.backend) = $2
             RETURNING j.production_id, j.job_index, j.attempt, j.backend_job_id",
            &[&productions, &installation],
        )
        .await?
        .iter()
        .map(|row| Stopped {
            production_id: row.get(0),
            job_index: row.get(1),
            attempt: row.get(2),
            backend_job_id: row.get(3),
        })
        .collect();
    let never_started = tx
        .execute_cached(
            "DELETE FROM jobs WHERE production_id = ANY($1) AND state = 'CREATED' AND attempt = 1",
            &[&productions],
        )
        .await?;
    let retrying = tx
        .execute_cached(
            "UPDATE jobs SET state = 'CANCELLED', raw_status = 'cancelled', updated_at = now()
             WHERE production_id = ANY($1) AND state = 'CREATED'",
            &[&productions],
        )
        .await?;
    Ok(Cancelled {
        stopped,
        never_started,
        retrying,
    })
}

/// Whether a production has jobs that can still change, or jobs still to be
/// planned (through the partial indexes of ready and in-flight jobs: cheap
/// however large).
pub async fn unfinished(tx: &Transaction<'_>, production_id: &str) -> anyhow::Result<bool> {
    Ok(tx
        .query_one_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE production_id = $1 AND state = 'CREATED')
                 OR EXISTS (SELECT 1 FROM jobs WHERE production_id = $1
                            AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING'))
                 OR EXISTS (SELECT 1 FROM productions WHERE production_id = $1
                            AND (planned_jobs < job_total OR NOT inputs_complete))",
            &[&production_id],
        )
        .await?
        .get(0))
}

/// Of `ids`, the productions none of whose jobs can still change (as
/// [`unfinished`] says of one), in one statement.
pub async fn finished_of(tx: &Transaction<'_>, ids: &[&str]) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            "SELECT u.id FROM unnest($1::text[]) AS u(id)
             WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE production_id = u.id AND state = 'CREATED')
               AND NOT EXISTS (SELECT 1 FROM jobs WHERE production_id = u.id
                               AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING'))
               AND NOT EXISTS (SELECT 1 FROM productions WHERE production_id = u.id
                               AND (planned_jobs < job_total OR NOT inputs_complete))
             ORDER BY u.id",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A production's job rows per state.
pub async fn job_states(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<Vec<(JobState, u64)>> {
    tx.query_cached(
        "SELECT state, count(*) FROM jobs WHERE production_id = $1 GROUP BY state",
        &[&production_id],
    )
    .await?
    .iter()
    .map(|row| Ok((row.get::<_, &str>(0).parse()?, row.get::<_, i64>(1) as u64)))
    .collect()
}

/// What a finished production's jobs add up to, for its record.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accounting {
    pub attempts: u64,
    /// Jobs submitted at least once (retries are the attempts beyond them).
    pub jobs_submitted: u64,
    pub cpu_ms: u64,
    pub cpu_measured: u64,
    pub first_started: Option<chrono::DateTime<chrono::Utc>>,
    pub last_ended: Option<chrono::DateTime<chrono::Utc>>,
    pub first_run: u64,
    pub last_run: u64,
}

/// A production's job accounting, summed over its jobs.
pub async fn accounting(tx: &Transaction<'_>, production_id: &str) -> anyhow::Result<Accounting> {
    let row = tx
        .query_one_cached(
            "SELECT COALESCE(sum(attempts_submitted), 0)::bigint,
                    count(*) FILTER (WHERE attempts_submitted > 0),
                    COALESCE(sum(cpu_ms), 0)::bigint, COALESCE(sum(cpu_measured), 0)::bigint,
                    min(started_at), max(ended_at),
                    COALESCE(min(run_number), 0), COALESCE(max(run_number), 0)
             FROM jobs WHERE production_id = $1",
            &[&production_id],
        )
        .await?;
    let count = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    Ok(Accounting {
        attempts: count(0),
        jobs_submitted: count(1),
        cpu_ms: count(2),
        cpu_measured: count(3),
        first_started: row.get(4),
        last_ended: row.get(5),
        first_run: count(6),
        last_run: count(7),
    })
}

/// Moves a production from `from` to `state`; its planned job total, or
/// `None` if it was not in `from`.
pub async fn close(
    tx: &Transaction<'_>,
    production_id: &str,
    state: ProductionState,
    from: &str,
) -> anyhow::Result<Option<u64>> {
    Ok(tx
        .query_opt_cached(
            "UPDATE productions SET state = $2, updated_at = now() WHERE production_id = $1 AND state = $3
             RETURNING job_total",
            &[&production_id, &state.as_str(), &from],
        )
        .await?
        .map(|row| row.get::<_, i64>(0) as u64))
}

/// Moves a production from `from` to `to`; whether it was in `from`.
pub async fn move_production(
    tx: &Transaction<'_>,
    production_id: &str,
    from: ProductionState,
    to: ProductionState,
) -> anyhow::Result<bool> {
    Ok(tx
        .execute_cached(
            "UPDATE productions SET state = $2, updated_at = now() WHERE production_id = $1 AND state = $3",
            &[&production_id, &to.as_str(), &from.as_str()],
        )
        .await?
        == 1)
}

/// Remembers a cancel for a production not recorded yet; whether it was new.
pub async fn remember_cancel(
    tx: &Transaction<'_>,
    production_id: &str,
    reason: &str,
    requested_at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<bool> {
    Ok(tx
        .execute_cached(
            "INSERT INTO pending_cancels (production_id, reason, requested_at)
             SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM productions WHERE production_id = $1)
             ON CONFLICT (production_id) DO NOTHING",
            &[&production_id, &reason, &requested_at],
        )
        .await?
        == 1)
}

/// The remembered cancels of these productions, with when each was asked for.
pub async fn pending_cancels(
    tx: &Transaction<'_>,
    ids: &[&str],
) -> anyhow::Result<HashMap<String, chrono::DateTime<chrono::Utc>>> {
    Ok(tx
        .query_cached(
            "SELECT production_id, requested_at FROM pending_cancels WHERE production_id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Forgets the remembered cancels of these productions.
pub async fn forget_cancels(tx: &Transaction<'_>, ids: &[&str]) -> anyhow::Result<()> {
    if !ids.is_empty() {
        tx.execute_cached(
            "DELETE FROM pending_cancels WHERE production_id = ANY($1)",
            &[&ids],
        )
        .await?;
    }
    Ok(())
}

/// Forgets remembered cancels older than `older_than` whose production never
/// came: a cancel of an ID never issued, or of a production rejected after
/// all, is not kept forever. How many were dropped.
pub async fn expire_pending_cancels<C: GenericClient + Sync>(
    client: &C,
    older_than: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<u64> {
    Ok(client
        .execute_cached(
            "DELETE FROM pending_cancels WHERE requested_at < $1",
            &[&older_than],
        )
        .await?)
}

/// Records productions (one insert for the batch); the IDs inserted now (a
/// production recorded before, by a replayed event under another ID, is not).
pub async fn insert_productions(
    tx: &Transaction<'_>,
    productions: &[NewProduction<'_>],
) -> anyhow::Result<HashSet<String>> {
    let n = productions.len();
    let mut ids = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut profiles = Vec::with_capacity(n);
    let mut vos = Vec::with_capacity(n);
    let mut parameters = Vec::with_capacity(n);
    let mut fingerprints = Vec::with_capacity(n);
    let mut backends = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut planned = Vec::with_capacity(n);
    let mut accepted_ats = Vec::with_capacity(n);
    let mut destinations = Vec::with_capacity(n);
    for p in productions {
        destinations.push(p.output_destination);
        ids.push(p.production_id);
        request_ids.push(p.request_id);
        profiles.push(p.profile);
        vos.push(p.vo);
        parameters.push(p.parameters);
        fingerprints.push(p.fingerprint);
        backends.push(p.backend);
        offsets.push(p.run_number_offset as i64);
        totals.push(p.job_total as i64);
        priorities.push(p.priority);
        states.push(p.state.as_str());
        planned.push(p.planned_jobs as i64);
        accepted_ats.push(p.accepted_at);
    }
    Ok(tx
        .query_cached(
            "INSERT INTO productions (production_id, request_id, profile, vo, parameters, fingerprint,
                                      backend, run_number_offset, job_total, priority, state, planned_jobs,
                                      accepted_at, output_destination)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[],
                                  $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::int[],
                                  $11::text[], $12::bigint[], $13::timestamptz[], $14::text[])
             ON CONFLICT (production_id) DO NOTHING RETURNING production_id",
            &[
                &ids,
                &request_ids,
                &profiles,
                &vos,
                &parameters,
                &fingerprints,
                &backends,
                &offsets,
                &totals,
                &priorities,
                &states,
                &planned,
                &accepted_ats,
                &destinations,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

// Chained productions (see `chain`).

/// Serialises, per producing production, the transactions that offer its
/// files to chained productions and those that link a chained production to
/// it, so a file delivered while a child is being linked reaches it once,
/// through one or the other. `ids` are locked in order (no deadlock).
pub async fn lock_sources(tx: &Transaction<'_>, ids: &[String]) -> anyhow::Result<()> {
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return Ok(());
    }
    // One statement, the locks taken row by row in the order of the IDs.
    tx.query_one_cached(
        "SELECT count(pg_advisory_xact_lock(hashtextextended('prodsys.chain:' || id, 0)))
         FROM (SELECT id FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n) ORDER BY n) ordered",
        &[&sorted],
    )
    .await?;
    Ok(())
}

/// Which of `producers` (sorted) are productions whose files a chained
/// production may take: held here, and of one of the `sources` profiles
/// (any profile when `None`); sorted.
pub async fn taking_producers(
    tx: &Transaction<'_>,
    producers: &[String],
    sources: Option<&[String]>,
) -> anyhow::Result<Vec<String>> {
    let sources: Option<Vec<&str>> = sources.map(|s| s.iter().map(String::as_str).collect());
    let mut takers: Vec<String> = tx
        .query_cached(
            "SELECT production_id FROM productions
             WHERE production_id = ANY($1) AND ($2::text[] IS NULL OR profile = ANY($2))",
            &[&producers, &sources],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    takers.sort();
    Ok(takers)
}

/// Output files of finished jobs, column by column.
#[derive(Default)]
pub struct DeliveredFiles {
    pub productions: Vec<String>,
    pub lfns: Vec<String>,
    pub urls: Vec<String>,
    pub metadata: Vec<serde_json::Value>,
}

/// Records the jobs whose outputs were delivered and their files, all of
/// productions a chained production may take ([`taking_producers`]); how
/// many files were new. A file is stored once however often it comes, and the
/// chained productions linked to its producer take it from here in arrival
/// order (`waiting_inputs`). The caller holds the producers' source locks:
/// a producer's files are stored one transaction at a time, so the files of
/// it that are visible are always a prefix of its arrival order.
pub async fn record_deliveries(
    tx: &Transaction<'_>,
    jobs: &[(String, i64)],
    files: &DeliveredFiles,
) -> anyhow::Result<u64> {
    let (productions, indexes): (Vec<&str>, Vec<i64>) =
        jobs.iter().map(|(p, i)| (p.as_str(), *i)).unzip();
    tx.execute_cached(
        "INSERT INTO delivered_jobs (production_id, job_index)
         SELECT * FROM unnest($1::text[], $2::bigint[])
         ON CONFLICT DO NOTHING",
        &[&productions, &indexes],
    )
    .await?;
    if files.lfns.is_empty() {
        return Ok(0);
    }
    Ok(tx
        .execute_cached(
            "INSERT INTO delivered_files (production_id, lfn, url, metadata)
             SELECT f.production_id, f.lfn, f.url, f.metadata
             FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
                 WITH ORDINALITY AS f(production_id, lfn, url, metadata, n)
             ORDER BY f.n
             ON CONFLICT DO NOTHING",
            &[
                &files.productions,
                &files.lfns,
                &files.urls,
                &files.metadata,
            ],
        )
        .await?)
}

/// The chained productions linked to any of `parents`, in ID order.
pub async fn children_of(tx: &Transaction<'_>, parents: &[String]) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            "SELECT DISTINCT child FROM chain_links WHERE parent = ANY($1) ORDER BY child",
            &[&parents],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Every production of `profile` but `except`: the parents of a chained
/// production that queries by profile.
pub async fn productions_of_profile(
    tx: &Transaction<'_>,
    profile: &str,
    except: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            "SELECT production_id FROM productions WHERE profile = $1 AND production_id <> $2
             ORDER BY production_id",
            &[&profile, &except],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Links a chained production to its parents (with its conditions on their
/// files) and marks it waiting for input; how many qualifying files they
/// delivered before it came (it takes them as it takes later ones).
pub async fn link_chained(
    tx: &Transaction<'_>,
    child: &str,
    parents: &[String],
    conditions: &serde_json::Value,
) -> anyhow::Result<u64> {
    tx.execute_cached(
        "INSERT INTO chain_links (child, parent, conditions)
         SELECT $1, unnest($2::text[]), $3 ON CONFLICT DO NOTHING",
        &[&child, &parents, conditions],
    )
    .await?;
    tx.execute_cached(
        "UPDATE productions SET inputs_complete = false WHERE production_id = $1",
        &[&child],
    )
    .await?;
    let row = tx
        .query_one_cached(
            "SELECT count(*) FROM delivered_files d
             WHERE d.production_id = ANY($1) AND d.metadata @> $2",
            &[&parents, conditions],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// A chained production still taking inputs, its row locked.
pub struct Chained {
    pub profile: String,
    pub fingerprint: String,
    pub run_number_offset: i64,
    pub job_total: i64,
    pub backend: String,
}

pub async fn lock_chained(tx: &Transaction<'_>, child: &str) -> anyhow::Result<Option<Chained>> {
    Ok(tx
        .query_opt_cached(
            "SELECT profile, fingerprint, run_number_offset, job_total, backend
             FROM productions WHERE production_id = $1 AND state = 'RUNNING' AND NOT inputs_complete
             FOR NO KEY UPDATE",
            &[&child],
        )
        .await?
        .map(|r| Chained {
            profile: r.get(0),
            fingerprint: r.get(1),
            run_number_offset: r.get(2),
            job_total: r.get(3),
            backend: r.get(4),
        }))
}

/// Each parent of a chained production: its state (`None`: not recorded
/// here yet), and whether it ended and every one of its DONE jobs'
/// outputs was delivered.
pub async fn parents(
    tx: &Transaction<'_>,
    child: &str,
) -> anyhow::Result<Vec<(String, Option<ProductionState>, bool)>> {
    tx.query_cached(
        "SELECT l.parent, p.state,
                p.state IN ('COMPLETED', 'PARTIALLY_COMPLETED', 'FAILED', 'CANCELLED')
                AND (SELECT count(*) FROM jobs j WHERE j.production_id = l.parent AND j.state = 'DONE')
                    <= (SELECT count(*) FROM delivered_jobs d WHERE d.production_id = l.parent)
         FROM chain_links l LEFT JOIN productions p ON p.production_id = l.parent
         WHERE l.child = $1 ORDER BY l.parent",
        &[&child],
    )
    .await?
    .iter()
    .map(|r| {
        let state = r
            .get::<_, Option<&str>>(1)
            .map(str::parse::<ProductionState>)
            .transpose()?;
        Ok((r.get(0), state, r.get::<_, Option<bool>>(2).unwrap_or(false)))
    })
    .collect()
}

/// The input files no job of a chained production took yet, in arrival
/// order: each file (as grouping reads it) and, at the same index, where it
/// came from (its parent and its place in that parent's arrival order).
#[derive(Default)]
pub struct Waiting {
    pub inputs: Vec<prodsys_core::inputs::PendingInput>,
    pub origins: Vec<(String, i64)>,
}

/// The input files of a chained production no job took yet, in arrival
/// order: the files each parent delivered after the last one taken from it
/// that meet the link's conditions.
pub async fn waiting_inputs(
    tx: &Transaction<'_>,
    child: &str,
    with_metadata: bool,
) -> anyhow::Result<Waiting> {
    // The metadata only where the profile groups by a key of it.
    let rows = tx
        .query_cached(
            "SELECT d.lfn, CASE WHEN $2 THEN d.metadata END, d.production_id, d.seq
             FROM chain_links l
             JOIN delivered_files d ON d.production_id = l.parent AND d.seq > l.taken_seq
             WHERE l.child = $1 AND d.metadata @> l.conditions
             ORDER BY d.seq",
            &[&child, &with_metadata],
        )
        .await?;
    let mut waiting = Waiting {
        inputs: Vec::with_capacity(rows.len()),
        origins: Vec::with_capacity(rows.len()),
    };
    for r in &rows {
        let metadata: Option<serde_json::Value> = r.get(1);
        waiting.inputs.push(prodsys_core::inputs::PendingInput {
            lfn: r.get(0),
            metadata: match metadata {
                Some(m) => serde_json::from_value(m)?,
                None => Default::default(),
            },
        });
        waiting.origins.push((r.get(2), r.get(3)));
    }
    Ok(waiting)
}

/// Marks taken, for each of `parents`, its files up to the matching `last`
/// seq (what a chained production takes of a parent is a prefix of that
/// parent's arrival order).
pub async fn mark_taken(
    tx: &Transaction<'_>,
    child: &str,
    parents: &[&str],
    last: &[i64],
) -> anyhow::Result<()> {
    if parents.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "UPDATE chain_links l SET taken_seq = t.last
         FROM unnest($2::text[], $3::bigint[]) AS t(parent, last)
         WHERE l.child = $1 AND l.parent = t.parent AND l.taken_seq < t.last",
        &[&child, &parents, &last],
    )
    .await?;
    Ok(())
}

/// A chained production's new job total (all planned), and once every
/// parent ended, its inputs complete with what it says of them.
pub async fn update_chained(
    tx: &Transaction<'_>,
    child: &str,
    job_total: i64,
    complete: bool,
    note: &str,
    taken: u64,
) -> anyhow::Result<()> {
    tx.execute_cached(
        "UPDATE productions SET job_total = $2, planned_jobs = $2, inputs_complete = $3,
                                inputs_note = $4, inputs_used = inputs_used + $5,
                                updated_at = now()
         WHERE production_id = $1",
        &[&child, &job_total, &complete, &note, &(taken as i64)],
    )
    .await?;
    Ok(())
}

/// What a production says of its inputs and how many its jobs took (empty
/// and 0 for one that is not chained).
pub async fn inputs_summary(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<(String, u64)> {
    let row = tx
        .query_one_cached(
            "SELECT (SELECT inputs_note FROM productions WHERE production_id = $1),
                    (SELECT inputs_used FROM productions WHERE production_id = $1)",
            &[&production_id],
        )
        .await?;
    Ok((
        row.get::<_, Option<String>>(0).unwrap_or_default(),
        row.get::<_, Option<i64>>(1).unwrap_or(0) as u64,
    ))
}

/// The input URLs of each of `jobs` (production, job index) that has any, in arrival order.
pub async fn job_inputs<C: GenericClient + Sync>(
    client: &C,
    jobs: &[(&str, i64)],
) -> anyhow::Result<HashMap<(String, i64), Vec<String>>> {
    let (productions, indexes): (Vec<&str>, Vec<i64>) = jobs.iter().copied().unzip();
    let mut inputs: HashMap<(String, i64), Vec<String>> = HashMap::new();
    for row in client
        .query_cached(
            "SELECT j.production_id, j.job_index, d.url
             FROM unnest($1::text[], $2::bigint[]) AS u(child, job_index)
             JOIN jobs j ON j.production_id = u.child AND j.job_index = u.job_index
             CROSS JOIN LATERAL jsonb_array_elements_text(j.inputs) WITH ORDINALITY AS i(lfn, n)
             JOIN chain_links l ON l.child = j.production_id
             JOIN delivered_files d ON d.production_id = l.parent AND d.lfn = i.lfn
             WHERE j.inputs IS NOT NULL
             ORDER BY j.production_id, j.job_index, i.n",
            &[&productions, &indexes],
        )
        .await?
    {
        inputs
            .entry((row.get(0), row.get(1)))
            .or_default()
            .push(row.get(2));
    }
    Ok(inputs)
}

/// Chained productions still taking inputs.
pub async fn waiting_for_input<C: GenericClient + Sync>(client: &C) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query_cached(
            "SELECT production_id FROM productions WHERE NOT inputs_complete AND state = 'RUNNING'
             ORDER BY production_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Marks CANCELLING every running production chained, directly or through
/// others, after `parent`; their IDs.
pub async fn cancel_chained_after(
    tx: &Transaction<'_>,
    parent: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            "WITH RECURSIVE after(id) AS (
                 SELECT child FROM chain_links WHERE parent = $1
                 UNION SELECT l.child FROM chain_links l JOIN after a ON l.parent = a.id)
             UPDATE productions SET state = 'CANCELLING', updated_at = now()
             WHERE production_id IN (SELECT id FROM after) AND state = 'RUNNING'
             RETURNING production_id",
            &[&parent],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Holds a production's row until the transaction ends: whoever closes it
/// sees what a concurrent transaction that holds it committed. `NO KEY
/// UPDATE`, not `UPDATE`: inserting a job takes a key-share lock on its
/// production through the foreign key, and a full update lock would conflict
/// with it (two installations' rounds closing the same federated production
/// deadlocked that way).
pub async fn lock_production(tx: &Transaction<'_>, production_id: &str) -> anyhow::Result<()> {
    tx.execute_cached(
        "SELECT 1 FROM productions WHERE production_id = $1 FOR NO KEY UPDATE",
        &[&production_id],
    )
    .await?;
    Ok(())
}

/// Holds the rows of these productions, in the order of their IDs (so two
/// transactions never wait on each other in a circle).
pub async fn lock_productions(tx: &Transaction<'_>, ids: &[&str]) -> anyhow::Result<()> {
    tx.execute_cached(
        "SELECT 1 FROM productions WHERE production_id = ANY($1)
         ORDER BY production_id FOR NO KEY UPDATE",
        &[&ids],
    )
    .await?;
    Ok(())
}

// Incremental planning (`planning`).

/// A production still being planned, with its plan's inputs and how far
/// planning got.
pub struct Unplanned {
    pub production_id: String,
    pub profile: String,
    pub parameters: serde_json::Value,
    pub fingerprint: String,
    pub run_number_offset: u64,
    /// Jobs created so far.
    pub planned_jobs: u64,
    pub job_total: u64,
}

/// Up to `limit` RUNNING productions with jobs still to create (highest
/// priority first, then the one with least left), each row held until the
/// transaction ends; rows another transaction holds are skipped, so
/// replicas never plan the same jobs twice.
pub async fn lock_unplanned(tx: &Transaction<'_>, limit: i64) -> anyhow::Result<Vec<Unplanned>> {
    Ok(tx
        .query_cached(
            "SELECT production_id, profile, parameters, fingerprint, run_number_offset,
                    planned_jobs, job_total
             FROM productions WHERE planned_jobs < job_total AND state = 'RUNNING'
             ORDER BY priority DESC, job_total - planned_jobs, created_at, production_id
             LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?
        .iter()
        .map(|row| Unplanned {
            production_id: row.get(0),
            profile: row.get(1),
            parameters: row.get(2),
            fingerprint: row.get(3),
            run_number_offset: row.get::<_, i64>(4) as u64,
            planned_jobs: row.get::<_, i64>(5) as u64,
            job_total: row.get::<_, i64>(6) as u64,
        })
        .collect())
}

/// Records how many jobs of each production exist now (`ids[i]` has `planned[i]`).
pub async fn set_planned(
    tx: &Transaction<'_>,
    ids: &[String],
    planned: &[i64],
) -> anyhow::Result<()> {
    tx.execute_cached(
        "UPDATE productions p SET planned_jobs = u.planned, updated_at = now()
         FROM unnest($1::text[], $2::bigint[]) AS u(id, planned)
         WHERE p.production_id = u.id",
        &[&ids, &planned],
    )
    .await?;
    Ok(())
}

/// A remembered cancel applied to its production.
pub struct AppliedCancel {
    pub production_id: String,
    pub reason: String,
}

/// Applies the remembered cancels whose production now exists (all of them,
/// or those of `only`): a production in state `from`, accepted before the
/// cancel was asked for, moves to `to`; the remembered cancel is dropped
/// whatever the production's state. The cancels applied.
pub async fn apply_pending_cancels<C: GenericClient + Sync>(
    client: &C,
    only: Option<&[String]>,
    from: ProductionState,
    to: ProductionState,
) -> anyhow::Result<Vec<AppliedCancel>> {
    Ok(client
        .query_cached(
            "WITH found AS (
                 DELETE FROM pending_cancels c USING productions p
                 WHERE p.production_id = c.production_id
                   AND ($1::text[] IS NULL OR c.production_id = ANY($1))
                 RETURNING c.production_id, c.reason, c.requested_at >= p.accepted_at AS applies)
             UPDATE productions p SET state = $2, updated_at = now()
             FROM found WHERE p.production_id = found.production_id AND found.applies AND p.state = $3
             RETURNING p.production_id, found.reason",
            &[&only, &to.as_str(), &from.as_str()],
        )
        .await?
        .iter()
        .map(|row| AppliedCancel {
            production_id: row.get(0),
            reason: row.get(1),
        })
        .collect())
}

/// Job rows waiting for one insert, column by column.
#[derive(Default)]
pub struct JobRows {
    productions: Vec<String>,
    indexes: Vec<i64>,
    run_numbers: Vec<i64>,
    seeds: Vec<i64>,
    units: Vec<i64>,
    /// The LFNs a chained production's job takes (a JSON array).
    inputs: Vec<Option<serde_json::Value>>,
}

impl JobRows {
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    pub fn push(&mut self, production_id: &str, job: &prodsys_core::PlannedJob) {
        self.productions.push(production_id.to_string());
        self.indexes.push(job.index as i64);
        self.run_numbers.push(job.run_number as i64);
        self.seeds.push(job.seed as i64);
        self.units.push(job.units as i64);
        self.inputs.push(None);
    }

    /// A chained production's job, with the input files it takes.
    pub fn push_taking(
        &mut self,
        production_id: &str,
        job: &prodsys_core::PlannedJob,
        lfns: &[&str],
    ) {
        self.push(production_id, job);
        if let Some(last) = self.inputs.last_mut() {
            *last = Some(serde_json::Value::from(lfns.to_vec()));
        }
    }

    /// Inserts the rows (one statement) and empties the buffer.
    pub async fn flush(&mut self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.indexes.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO jobs (production_id, job_index, run_number, seed, units, inputs)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                                  $6::jsonb[])",
            &[
                &self.productions,
                &self.indexes,
                &self.run_numbers,
                &self.seeds,
                &self.units,
                &self.inputs,
            ],
        )
        .await?;
        *self = JobRows::default();
        Ok(())
    }
}

// Installation leases (`lease`).

/// Takes the lease of `installation` for `owner` if it is free, expired, or
/// already `owner`'s (then renews it), for `ttl_s` seconds by the database's
/// clock. `Some(previous owner)` when it is `owner`'s now.
pub async fn acquire_lease<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
    owner: &str,
    ttl_s: f64,
) -> anyhow::Result<Option<Option<String>>> {
    let row = client
        .query_opt_cached(
            "WITH previous AS (SELECT owner FROM installation_leases WHERE installation = $1)
             INSERT INTO installation_leases AS l (installation, owner, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (installation) DO UPDATE
                 SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, renewed_at = now(),
                     acquired_at = CASE WHEN l.owner = EXCLUDED.owner THEN l.acquired_at ELSE now() END
                 WHERE l.owner = EXCLUDED.owner OR l.expires_at < now()
             RETURNING (SELECT owner FROM previous)",
            &[&installation, &owner, &ttl_s],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, Option<String>>(0)))
}

/// Gives up `owner`'s lease of `installation` (if it still holds it).
pub async fn release_lease<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
    owner: &str,
) -> anyhow::Result<()> {
    client
        .execute_cached(
            "DELETE FROM installation_leases WHERE installation = $1 AND owner = $2",
            &[&installation, &owner],
        )
        .await?;
    Ok(())
}

/// Whether `owner` holds the unexpired lease of `installation`; if so, a
/// share lock on it is held until `tx` ends, so nobody takes it meanwhile.
pub async fn hold_lease(
    tx: &Transaction<'_>,
    installation: &str,
    owner: &str,
) -> anyhow::Result<bool> {
    Ok(tx
        .query_opt_cached(
            "SELECT 1 FROM installation_leases
             WHERE installation = $1 AND owner = $2 AND expires_at > now() FOR SHARE",
            &[&installation, &owner],
        )
        .await?
        .is_some())
}

// The `JobService` API (`api`).

/// A production as the job API sees it: where it runs and whose it is.
pub struct ProductionOwner {
    pub backend: String,
    pub vo: String,
}

/// The installation a production was placed on and its VO; `None` when the
/// dispatcher does not know it.
pub async fn production_owner<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<Option<ProductionOwner>> {
    Ok(client
        .query_opt_cached(
            "SELECT backend, vo FROM productions WHERE production_id = $1",
            &[&production_id],
        )
        .await?
        .map(|row| ProductionOwner {
            backend: row.get(0),
            vo: row.get(1),
        }))
}

/// A job as `ListJobs` shows it.
pub struct ListedJob {
    pub job_index: i64,
    pub state: String,
    pub attempt: i32,
    pub attempts_submitted: i32,
    /// `None` for a job not placed yet, or reserved before placement was recorded.
    pub installation: Option<String>,
    pub backend_job_id: Option<String>,
    pub raw_status: Option<String>,
    pub exit_code: Option<i32>,
    pub run_number: i64,
    pub updated_unix_ms: i64,
}

/// Up to `limit` jobs of a production with an index above `after`, in index order.
pub async fn jobs_page<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<ListedJob>> {
    Ok(client
        .query_cached(
            "SELECT job_index, state, attempt, attempts_submitted, installation,
                    backend_job_id, raw_status, exit_code, run_number,
                    (extract(epoch FROM updated_at) * 1000)::bigint
             FROM jobs WHERE production_id = $1 AND job_index > $2
             ORDER BY job_index LIMIT $3",
            &[&production_id, &after, &limit],
        )
        .await?
        .iter()
        .map(|row| ListedJob {
            job_index: row.get(0),
            state: row.get(1),
            attempt: row.get(2),
            attempts_submitted: row.get(3),
            installation: row.get(4),
            backend_job_id: row.get(5),
            raw_status: row.get(6),
            exit_code: row.get(7),
            run_number: row.get(8),
            updated_unix_ms: row.get(9),
        })
        .collect())
}

/// Where a job's latest attempt runs, as `GetJobLog` needs it.
pub struct JobPlace {
    pub attempt: i32,
    /// Its installation, or its production's for a job reserved before
    /// placement was recorded.
    pub installation: String,
    pub workdir: Option<String>,
    pub vo: String,
}

pub async fn job_place<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
    job_index: i64,
) -> anyhow::Result<Option<JobPlace>> {
    Ok(client
        .query_opt_cached(
            "SELECT j.attempt, COALESCE(j.installation, p.backend), j.workdir, p.vo
             FROM jobs j JOIN productions p USING (production_id)
             WHERE j.production_id = $1 AND j.job_index = $2",
            &[&production_id, &job_index],
        )
        .await?
        .map(|row| JobPlace {
            attempt: row.get(0),
            installation: row.get(1),
            workdir: row.get(2),
            vo: row.get(3),
        }))
}
