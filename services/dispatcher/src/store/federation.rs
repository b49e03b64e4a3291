//! The statements of federated placement: productions that name a group of
//! installations (or `any`), the room each installation has, its health,
//! and the jobs placement hands to one installation.

use std::collections::{BTreeMap, BTreeSet};

use prodsys_core::JobState;
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::tokio_postgres::Row;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};

use super::{JOB_COLUMN_COUNT, JOB_COLUMNS, job_row};
use crate::domain::JobRow;

/// The advisory lock under which one scheduler at a time places federated jobs.
const PLACEMENT_LOCK: i64 = 0x7072_6f64_706c_6163;

/// A production that names a group of installations or `any`.
pub struct Federated {
    pub production_id: String,
    pub backend: String,
    pub vo: String,
}

/// Waits for the placement lock, held until `tx` ends.
pub async fn lock_placement(tx: &Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_cached("SELECT pg_advisory_xact_lock($1)", &[&PLACEMENT_LOCK])
        .await?;
    Ok(())
}

/// The productions in `state` whose backend is one of `backends` (group
/// names and `any`), highest priority first, then the oldest.
pub async fn federated_productions<C: GenericClient + Sync>(
    client: &C,
    backends: &[String],
    state: &str,
) -> anyhow::Result<Vec<Federated>> {
    Ok(client
        .query_cached(
            "SELECT production_id, backend, vo FROM productions
             WHERE backend = ANY($1) AND state = $2
             ORDER BY priority DESC, created_at, production_id",
            &[&backends, &state],
        )
        .await?
        .iter()
        .map(|r| Federated {
            production_id: r.get(0),
            backend: r.get(1),
            vo: r.get(2),
        })
        .collect())
}

/// A RUNNING production an installation may take jobs of.
pub struct Candidate {
    pub production_id: String,
    pub backend: String,
    pub vo: String,
    pub priority: i32,
    /// Its first forwarding destination, if any.
    pub output_destination: Option<String>,
}

/// The RUNNING productions whose backend is one of `backends` (an
/// installation's name, the groups that include it, `any`), highest
/// priority first, then the oldest.
pub async fn candidates(
    tx: &Transaction<'_>,
    backends: &[String],
) -> anyhow::Result<Vec<Candidate>> {
    Ok(tx
        .query_cached(
            "SELECT production_id, backend, vo, priority, output_destination FROM productions
             WHERE backend = ANY($1) AND state = 'RUNNING'
             ORDER BY priority DESC, created_at, production_id",
            &[&backends],
        )
        .await?
        .iter()
        .map(|r| Candidate {
            production_id: r.get(0),
            backend: r.get(1),
            vo: r.get(2),
            priority: r.get(3),
            output_destination: r.get(4),
        })
        .collect())
}

/// Per production of `ids`: its jobs ready and placed nowhere (counting up
/// to `cap` each), and its jobs in flight on any installation. One
/// statement, however many productions.
pub async fn ready_and_in_flight(
    tx: &Transaction<'_>,
    ids: &[&str],
    cap: i64,
) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    Ok(tx
        .query_cached(
            "SELECT u.id,
                    (SELECT count(*) FROM (SELECT 1 FROM jobs j
                                           WHERE j.production_id = u.id AND j.state = 'CREATED'
                                             AND j.installation IS NULL LIMIT $2) ready),
                    (SELECT count(*) FROM jobs j
                     WHERE j.production_id = u.id
                       AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING'))
             FROM unnest($1::text[]) AS u(id)",
            &[&ids, &cap],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                (
                    r.get::<_, i64>(1).max(0) as u64,
                    r.get::<_, i64>(2).max(0) as u64,
                ),
            )
        })
        .collect())
}

/// Rows of a name and a count, as a map (a negative count as none).
fn counts(rows: &[Row]) -> BTreeMap<String, u64> {
    rows.iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64))
        .collect()
}

/// Per production of `ids` with any: its jobs in flight on any
/// installation (one statement through the index of jobs in flight).
pub async fn in_flight_of(
    tx: &Transaction<'_>,
    ids: &[&str],
) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(tx
        .query_cached(
            "SELECT production_id, count(*) FROM jobs
             WHERE production_id = ANY($1) AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
             GROUP BY production_id",
            &[&ids],
        )
        .await
        .map(|rows| counts(&rows))?)
}

/// Per production of `ids`: its jobs ready and placed nowhere, counting up
/// to `cap` each.
pub async fn ready_of(
    tx: &Transaction<'_>,
    ids: &[&str],
    cap: i64,
) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(tx
        .query_cached(
            "SELECT u.id,
                    (SELECT count(*) FROM (SELECT 1 FROM jobs j
                                           WHERE j.production_id = u.id AND j.state = 'CREATED'
                                             AND j.installation IS NULL LIMIT $2) ready)
             FROM unnest($1::text[]) AS u(id)",
            &[&ids, &cap],
        )
        .await
        .map(|rows| counts(&rows))?)
}

/// Jobs each installation holds (reserved, queued or running).
pub async fn in_flight_per_installation(
    tx: &Transaction<'_>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(tx
        .query_cached(
            "SELECT COALESCE(j.installation, p.backend), count(*)
             FROM jobs j JOIN productions p USING (production_id)
             WHERE j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
             GROUP BY 1",
            &[],
        )
        .await
        .map(|rows| counts(&rows))?)
}

/// The installations that may be given jobs: scheduled by a dispatcher
/// (their lease is live) and not announced failing.
pub async fn available(tx: &Transaction<'_>) -> anyhow::Result<BTreeSet<String>> {
    Ok(tx
        .query_cached(
            "SELECT l.installation FROM installation_leases l
             LEFT JOIN installation_health h USING (installation)
             WHERE l.expires_at > now() AND COALESCE(h.healthy, true)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Up to `wanted` of a production's ready jobs for `installation`, by job
/// index, locked: those placed on it already (`placed`), or those placed
/// nowhere. Rows another scheduler holds are skipped.
pub async fn lock_jobs_for(
    tx: &Transaction<'_>,
    production_id: &str,
    installation: &str,
    placed: bool,
    wanted: i64,
) -> anyhow::Result<Vec<JobRow>> {
    let placement = if placed {
        "j.installation = $3"
    } else {
        "j.installation IS NULL AND $3::text IS NOT NULL"
    };
    tx.query_cached(
        &format!(
            "SELECT {JOB_COLUMNS} FROM jobs j JOIN productions p USING (production_id)
             WHERE j.production_id = $1 AND j.state = 'CREATED' AND {placement}
             ORDER BY j.job_index LIMIT $2
             FOR UPDATE OF j SKIP LOCKED"
        ),
        &[&production_id, &wanted, &installation],
    )
    .await?
    .iter()
    .map(job_row)
    .collect()
}

/// Of each production of `wanted` (in order, with how many), up to that many
/// ready jobs placed nowhere, by job index, locked, in one statement. Rows
/// another scheduler holds are skipped.
pub async fn lock_unplaced_jobs(
    tx: &Transaction<'_>,
    wanted: &[(&str, i64)],
) -> anyhow::Result<Vec<JobRow>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, counts): (Vec<&str>, Vec<i64>) = wanted.iter().copied().unzip();
    tx.query_cached(
        &format!(
            "SELECT {JOB_COLUMNS}
             FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS w(id, wanted, n)
             CROSS JOIN LATERAL (
                 SELECT * FROM jobs r
                 WHERE r.production_id = w.id AND r.state = 'CREATED' AND r.installation IS NULL
                 ORDER BY r.job_index LIMIT w.wanted
                 FOR UPDATE SKIP LOCKED) j
             JOIN productions p ON p.production_id = j.production_id
             ORDER BY w.n, j.job_index"
        ),
        &[&ids, &counts],
    )
    .await?
    .iter()
    .map(job_row)
    .collect()
}

/// Ready jobs placed on `installation`, of any production (retries that may not move).
pub async fn placed_on<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query_cached(
            "SELECT DISTINCT production_id FROM jobs
             WHERE state = 'CREATED' AND installation = $1",
            &[&installation],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A job's retry placed nowhere again: any installation of its group may take it.
pub async fn unplace(tx: &Transaction<'_>, job: &JobRow) -> anyhow::Result<()> {
    tx.execute_cached(
        "UPDATE jobs SET installation = NULL WHERE production_id = $1 AND job_index = $2",
        &[&job.production_id, &job.job_index],
    )
    .await?;
    Ok(())
}

/// Records the health an installation's scheduler announces.
pub async fn record_health(
    tx: &Transaction<'_>,
    installation: &str,
    healthy: bool,
    reason: &str,
) -> anyhow::Result<()> {
    tx.execute_cached(
        "INSERT INTO installation_health (installation, healthy, reason, since)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (installation) DO UPDATE
         SET healthy = EXCLUDED.healthy, reason = EXCLUDED.reason, since = EXCLUDED.since",
        &[&installation, &healthy, &reason],
    )
    .await?;
    Ok(())
}

/// Whether a production still has jobs in flight on some installation.
pub async fn in_flight_anywhere(tx: &Transaction<'_>, production_id: &str) -> anyhow::Result<bool> {
    Ok(tx
        .query_one_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE production_id = $1
                            AND state IN ('SUBMITTED', 'QUEUED', 'RUNNING'))",
            &[&production_id],
        )
        .await?
        .get(0))
}

/// A production's jobs that were submitted at least once, per installation
/// their last attempt was placed on and state.
pub async fn jobs_per_installation(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<Vec<(String, JobState, u64)>> {
    tx.query_cached(
        "SELECT COALESCE(j.installation, p.backend), j.state, count(*)
         FROM jobs j JOIN productions p USING (production_id)
         WHERE j.production_id = $1 AND j.attempts_submitted > 0
         GROUP BY 1, 2 ORDER BY 1, 2",
        &[&production_id],
    )
    .await?
    .iter()
    .map(|r| {
        Ok((
            r.get(0),
            r.get::<_, &str>(1).parse()?,
            r.get::<_, i64>(2).max(0) as u64,
        ))
    })
    .collect()
}

/// The jobs of a finished production per installation their last attempt
/// was placed on, as ranges of job indexes (installation, first, last; in
/// installation and job order), at most `limit` + 1 ranges an installation
/// (one more than kept says some were left out).
pub async fn job_ranges_per_installation(
    tx: &Transaction<'_>,
    production_id: &str,
    limit: i64,
) -> anyhow::Result<Vec<(String, u64, u64)>> {
    tx.query_cached(
        "SELECT installation, first, last FROM (
             SELECT installation, min(job_index) AS first, max(job_index) AS last,
                    row_number() OVER (PARTITION BY installation ORDER BY min(job_index)) AS n
             FROM (SELECT COALESCE(j.installation, p.backend) AS installation, j.job_index,
                          j.job_index - row_number() OVER (
                              PARTITION BY COALESCE(j.installation, p.backend)
                              ORDER BY j.job_index) AS island
                   FROM jobs j JOIN productions p USING (production_id)
                   WHERE j.production_id = $1 AND j.attempts_submitted > 0) AS j
             GROUP BY installation, island) AS r
         WHERE n <= $2::bigint + 1
         ORDER BY installation, first",
        &[&production_id, &limit],
    )
    .await?
    .iter()
    .map(|r| {
        Ok((
            r.get(0),
            r.get::<_, i64>(1).max(0) as u64,
            r.get::<_, i64>(2).max(0) as u64,
        ))
    })
    .collect()
}

/// Which of `jobs`' productions name a group of installations or `any`
/// (their backend is not `installation`).
pub async fn federated_of<C: GenericClient + Sync>(
    client: &C,
    jobs: &[JobRow],
    installation: &str,
) -> anyhow::Result<BTreeSet<String>> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.production_id.as_str()).collect();
    Ok(client
        .query_cached(
            "SELECT production_id FROM productions WHERE production_id = ANY($1) AND backend <> $2",
            &[&ids, &installation],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A job reserved here that the backend never got, back to wait as its
/// next attempt, placed nowhere. The attempt never started: it is not
/// counted as submitted, and costs the job no retry.
pub async fn release(tx: &Transaction<'_>, job: &JobRow, raw: &str) -> anyhow::Result<()> {
    tx.execute_cached(
        "UPDATE jobs SET state = 'CREATED', attempt = attempt + 1, installation = NULL,
                         attempts_moved = attempts_moved + 1,
                         attempts_submitted = GREATEST(attempts_submitted - 1, 0),
                         backend_job_id = NULL, raw_status = $3, updated_at = now()
         WHERE production_id = $1 AND job_index = $2 AND state = 'SUBMITTED'
           AND backend_job_id IS NULL",
        &[&job.production_id, &job.job_index, &raw],
    )
    .await?;
    Ok(())
}

/// The jobs in flight on `installation` of productions naming a group or
/// `any`, with their backend IDs, locked.
pub async fn federated_in_flight(
    tx: &Transaction<'_>,
    installation: &str,
) -> anyhow::Result<Vec<(JobRow, Option<String>)>> {
    tx.query_cached(
        &format!(
            "SELECT {JOB_COLUMNS}, j.backend_job_id FROM jobs j JOIN productions p USING (production_id)
             WHERE j.installation = $1 AND p.backend <> $1
               AND j.state IN ('SUBMITTED', 'QUEUED', 'RUNNING')
             FOR UPDATE OF j"
        ),
        &[&installation],
    )
    .await?
    .iter()
    .map(|r| Ok((job_row(r)?, r.get(JOB_COLUMN_COUNT))))
    .collect()
}

/// Gives a job's attempt on `installation` up: the job waits again as its
/// next attempt, placed nowhere; the attempt is remembered for cancelling.
/// One that never left the queue there (SUBMITTED or QUEUED) costs the job
/// no retry; one seen RUNNING does, as any attempt lost while running.
pub async fn abandon(
    tx: &Transaction<'_>,
    job: &JobRow,
    installation: &str,
    backend_job_id: Option<&str>,
    raw: &str,
) -> anyhow::Result<()> {
    tx.execute_cached(
        "UPDATE jobs SET state = 'CREATED', attempt = attempt + 1, installation = NULL,
                         attempts_moved = attempts_moved
                             + (state IN ('SUBMITTED', 'QUEUED'))::int,
                         backend_job_id = NULL, raw_status = $3, updated_at = now()
         WHERE production_id = $1 AND job_index = $2",
        &[&job.production_id, &job.job_index, &raw],
    )
    .await?;
    if let Some(id) = backend_job_id {
        tx.execute_cached(
            "INSERT INTO abandoned_attempts (installation, backend_job_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
            &[&installation, &id],
        )
        .await?;
    }
    Ok(())
}

/// Backend IDs of the attempts given up on `installation`.
pub async fn abandoned<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query_cached(
            "SELECT backend_job_id FROM abandoned_attempts WHERE installation = $1",
            &[&installation],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Forgets given-up attempts once cancelled.
pub async fn forget_abandoned<C: GenericClient + Sync>(
    client: &C,
    installation: &str,
    ids: &[String],
) -> anyhow::Result<()> {
    client
        .execute_cached(
            "DELETE FROM abandoned_attempts WHERE installation = $1 AND backend_job_id = ANY($2)",
            &[&installation, &ids],
        )
        .await?;
    Ok(())
}
