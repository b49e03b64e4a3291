//! Every SQL statement of the catalog.

use anyhow::Context;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_db::{Cached, Db};
use prodsys_proto as pb;

use crate::domain::{self, FileQuery, KeyTypes};

/// The replicas of a file as `files_page` aggregates them.
fn replicas_of(json: serde_json::Value) -> Vec<pb::Replica> {
    let serde_json::Value::Array(rows) = json else {
        return Vec::new();
    };
    rows.iter()
        .map(|r| {
            let text = |i: usize| r[i].as_str().unwrap_or_default().to_string();
            pb::Replica {
                destination: text(0),
                state: domain::replica_state(&text(1)) as i32,
                url: text(2),
                reason: text(3),
                attempts: r[4].as_u64().unwrap_or_default() as u32,
            }
        })
        .collect()
}

/// Takes the per-production forwarding locks a transaction needs before
/// it adds files or forwarding plans: shared for registrations (they
/// commute), exclusive for a plan, in one order so no two transactions wait
/// on each other. A plan and the files of its production are thus never
/// written side by side unseen: whichever commits second sees the other's
/// rows and adds their replicas.
pub async fn lock_forwarding(
    tx: &Transaction<'_>,
    registering: &[&str],
    planning: &[&str],
) -> anyhow::Result<()> {
    let mut keys: Vec<(i64, bool)> = planning
        .iter()
        .map(|p| (domain::forwarding_lock_key(p), true))
        .chain(
            registering
                .iter()
                .map(|p| (domain::forwarding_lock_key(p), false)),
        )
        .collect();
    // Exclusive before shared for one key, then each key once.
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.dedup_by_key(|k| k.0);
    if keys.is_empty() {
        return Ok(());
    }
    let exclusive: Vec<i64> = keys.iter().filter(|k| k.1).map(|k| k.0).collect();
    let shared: Vec<i64> = keys.iter().filter(|k| !k.1).map(|k| k.0).collect();
    tx.execute_cached(
        "SELECT count(*) FROM (
             SELECT CASE WHEN k = ANY($1) THEN pg_advisory_xact_lock(k)
                         ELSE pg_advisory_xact_lock_shared(k) END
             FROM (SELECT DISTINCT unnest($1::bigint[] || $2::bigint[]) AS k ORDER BY k) AS keys
         ) AS locked",
        &[&exclusive, &shared],
    )
    .await
    .context("taking forwarding locks")?;
    Ok(())
}

/// Records where a production's outputs go, and a pending replica on each
/// destination for every file it already has; the forwarders are woken.
pub async fn plan_forwarding(
    tx: &Transaction<'_>,
    production_id: &str,
    destinations: &[String],
) -> anyhow::Result<()> {
    if destinations.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        // A plan handled after its production ended (its request.accepted
        // redelivered late) replaces the empty one the end made.
        "INSERT INTO forwarding (production_id, destinations) VALUES ($1, $2)
         ON CONFLICT (production_id) DO UPDATE
             SET destinations = EXCLUDED.destinations, progress_dirty = true, finished_at = NULL
             WHERE forwarding.destinations = '{}'",
        &[&production_id, &destinations],
    )
    .await
    .context("recording the forwarding plan")?;
    tx.execute_cached(
        "INSERT INTO replicas (lfn, destination, production_id)
         SELECT f.lfn, d, f.production_id FROM files f, unnest($2::text[]) AS d
         WHERE f.production_id = $1
         ON CONFLICT DO NOTHING",
        &[&production_id, &destinations],
    )
    .await
    .context("adding replicas of files registered before the plan")?;
    wake_forwarders(tx).await
}

/// The NOTIFY channel that wakes forwarders when replicas are due.
pub fn forward_channel(db: &Db) -> String {
    format!("{}_forward", db.schema())
}

async fn wake_forwarders(tx: &Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_cached("SELECT pg_notify(current_schema() || '_forward', '')", &[])
        .await?;
    Ok(())
}

/// Marks the forwarding progress of `productions` as changed (it is
/// announced, and its end checked, by the next sweep).
pub async fn forwarding_changed(tx: &Transaction<'_>, productions: &[&str]) -> anyhow::Result<()> {
    if productions.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "UPDATE forwarding f SET progress_dirty = true
         FROM (SELECT production_id FROM forwarding
               WHERE production_id = ANY($1) AND finished_at IS NULL
               ORDER BY production_id FOR UPDATE) AS o
         WHERE f.production_id = o.production_id",
        &[&productions],
    )
    .await
    .context("marking forwarding progress")?;
    Ok(())
}

/// A replica claimed for copying: the file and where it goes.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub lfn: String,
    pub destination: String,
    pub production_id: String,
    pub size: u64,
    pub adler32: String,
    pub source_url: String,
    /// Copies tried before this one (a resumed or retried copy checks the
    /// destination first).
    pub attempts: u32,
}

/// Commits `tx` without waiting for its WAL to reach the disk
/// (`synchronous_commit = off` for this transaction only). For claims and
/// recorded copies only: one lost in a crash of the database is claimed, or
/// copied and verified, again (a copy is idempotent and only recorded once it
/// verifies), and whatever announces them (the sweep, its events in the
/// outbox) commits synchronously, which flushes every earlier commit's WAL
/// first. A forwarder's commits otherwise wait on the flush of a WAL that
/// shares the disk with the files landing on a local storage.
async fn unflushed(tx: &Transaction<'_>) -> anyhow::Result<()> {
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .context("setting synchronous_commit")
}

/// Claims up to `limit` due replicas for `claimer` until `ttl` from now;
/// other catalog processes skip them (and take them over only when the
/// claim runs out unrenewed). Replicas due at the same time (a plan's) come
/// in LFN order, so a claim holds the files of a directory together.
pub async fn claim_replicas(
    db: &Db,
    claimer: uuid::Uuid,
    limit: i64,
    ttl: std::time::Duration,
) -> anyhow::Result<Vec<Claimed>> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    unflushed(&tx).await?;
    let ttl_ms = ttl.as_millis() as f64;
    let rows = tx
        .query_cached(
            "WITH due AS (
                 SELECT lfn, destination FROM replicas
                 WHERE state NOT IN ('verified', 'registered') AND next_try_at <= now()
                 ORDER BY next_try_at, lfn LIMIT $1 FOR UPDATE SKIP LOCKED)
             UPDATE replicas r SET state = 'copying', claimed_by = $2,
                    next_try_at = now() + $3 * interval '1 millisecond', updated_at = now()
             FROM due, files f
             WHERE r.lfn = due.lfn AND r.destination = due.destination AND f.lfn = r.lfn
             RETURNING r.lfn, r.destination, r.production_id, f.size, f.adler32, f.url, r.attempts",
            &[&limit, &claimer, &ttl_ms],
        )
        .await
        .context("claiming replicas")?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|row| Claimed {
            lfn: row.get(0),
            destination: row.get(1),
            production_id: row.get(2),
            size: row.get::<_, i64>(3) as u64,
            adler32: row.get(4),
            source_url: row.get(5),
            attempts: row.get::<_, i32>(6) as u32,
        })
        .collect())
}

/// Keeps `claimer`'s claims alive for another `ttl` while it copies.
pub async fn renew_claims(
    db: &Db,
    claimer: uuid::Uuid,
    ttl: std::time::Duration,
) -> anyhow::Result<u64> {
    let client = db.client().await?;
    let ttl_ms = ttl.as_millis() as f64;
    client
        .execute_cached(
            "UPDATE replicas SET next_try_at = now() + $2 * interval '1 millisecond'
             WHERE claimed_by = $1",
            &[&claimer, &ttl_ms],
        )
        .await
        .context("renewing claims")
}

/// How a copy ended.
#[derive(Debug, Clone)]
pub enum CopyResult {
    /// On the destination at `url` with the catalogued adler32.
    Verified { url: String },
    /// Registered on a Rucio destination, its PFN `url` verified on the
    /// storage.
    Registered { url: String },
    /// Not tried yet for a reason outside this replica (the copy it
    /// registers is still being made): due again after `retry_in`, no
    /// attempt counted.
    Waiting {
        reason: String,
        retry_in: std::time::Duration,
    },
    /// Tried again after `retry_in`.
    Failed {
        reason: String,
        retry_in: std::time::Duration,
    },
}

/// The statement [`record_copies`] runs (public so that its plan can be
/// checked). Each result's replica is found by its key, one index probe
/// each, and updated while the claim is still this process's (joins other
/// than nested loops are off for it). The claim is checked against each
/// result's own claimer, a join condition, not a condition on `replicas`
/// alone: the statistics are taken before anything is claimed (`claimed_by`
/// all NULL, no row `copying`), so a condition on the table alone is
/// expected to match one row, and the planner scanned every claimed replica
/// (its index on `state`) and compared each with every result: 2 million
/// comparisons and 2 s for a batch of 500 with 4,000 claimed. The claimer
/// is compared with `IS NOT DISTINCT FROM` (the same here: a result's
/// claimer is never NULL), which no index serves, so the replica is probed
/// by its key and not through the index of claims (`replicas_claimed`, for
/// renewals), which the same statistics make look as selective. `claimed_by`
/// is set only while the replica is `copying` (a constraint), so the claim
/// check is the state check too. Updated through the join, not by a row
/// address found first: a claim renewed between the statement's snapshot
/// and its lock made a new row version the address no longer named, and
/// the result was dropped while the renewals kept the claim alive forever.
pub const RECORD_COPIES: &str = "WITH v AS (
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::float8[], $7::uuid[])
             AS v (lfn, destination, state, url, reason, retry_ms, claimer))
     UPDATE replicas r SET state = m.state, url = m.url, reason = m.reason,
            attempts = r.attempts + (m.state <> 'pending')::int, claimed_by = NULL,
            updated_at = now(),
            next_try_at = now() + m.retry_ms * interval '1 millisecond',
            verified_at = CASE WHEN m.state IN ('verified', 'registered') THEN now() END
     FROM v m
     WHERE r.lfn = m.lfn AND r.destination = m.destination
       AND r.claimed_by IS NOT DISTINCT FROM m.claimer
     RETURNING r.production_id";

/// Records the copies `claimer` made, each only if its claim is still
/// `claimer`'s (a copy another process took over is that one's to record);
/// marks the productions' progress as changed. Returns how many were recorded.
pub async fn record_copies(
    db: &Db,
    claimer: uuid::Uuid,
    results: &[(Claimed, CopyResult)],
) -> anyhow::Result<u64> {
    if results.is_empty() {
        return Ok(0);
    }
    let mut lfns = Vec::with_capacity(results.len());
    let mut destinations = Vec::with_capacity(results.len());
    let mut states = Vec::with_capacity(results.len());
    let mut urls = Vec::with_capacity(results.len());
    let mut reasons = Vec::with_capacity(results.len());
    let mut retry_ms = Vec::with_capacity(results.len());
    for (claimed, result) in results {
        lfns.push(claimed.lfn.as_str());
        destinations.push(claimed.destination.as_str());
        match result {
            CopyResult::Verified { url } => {
                states.push("verified");
                urls.push(url.as_str());
                reasons.push("");
                retry_ms.push(0f64);
            }
            CopyResult::Registered { url } => {
                states.push("registered");
                urls.push(url.as_str());
                reasons.push("");
                retry_ms.push(0f64);
            }
            CopyResult::Waiting { reason, retry_in } => {
                states.push("pending");
                urls.push("");
                reasons.push(reason.as_str());
                retry_ms.push(retry_in.as_millis() as f64);
            }
            CopyResult::Failed { reason, retry_in } => {
                states.push("failed");
                urls.push("");
                reasons.push(reason.as_str());
                retry_ms.push(retry_in.as_millis() as f64);
            }
        }
    }
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    unflushed(&tx).await?;
    prodsys_db::plan_by_key(&tx).await?;
    let claimers = vec![claimer; results.len()];
    let rows = tx
        .query_cached(
            RECORD_COPIES,
            &[
                &lfns,
                &destinations,
                &states,
                &urls,
                &reasons,
                &retry_ms,
                &claimers,
            ],
        )
        .await
        .context("recording copies")?;
    prodsys_db::plan_freely(&tx).await?;
    let mut productions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    productions.sort();
    productions.dedup();
    let productions: Vec<&str> = productions.iter().map(String::as_str).collect();
    forwarding_changed(&tx, &productions).await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Forwarding progress of one production, destination by destination.
pub struct Progress {
    pub production_id: String,
    pub destinations: Vec<pb::DestinationProgress>,
    /// Its production record exists, the outputs of every job it counts as
    /// DONE are catalogued, and every file is verified everywhere:
    /// announced once, then the row is closed.
    pub finished: bool,
}

/// Takes up to `limit` productions whose forwarding progress changed,
/// reads their counts, closes those that finished, and returns what to
/// announce, inside `tx` (the caller writes the events and commits).
///
/// With `records` (this deployment writes production records), a production
/// is finished only once its record is catalogued too, so the record is
/// among the files forwarded before `production.forwarded` says so.
pub async fn sweep_forwarding(
    tx: &Transaction<'_>,
    limit: i64,
    records: bool,
) -> anyhow::Result<Vec<Progress>> {
    let dirty = tx
        .query_cached(
            "SELECT production_id, destinations FROM forwarding
             WHERE finished_at IS NULL AND progress_dirty
             ORDER BY production_id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await
        .context("finding changed forwarding")?;
    // A production is judged only while no transaction registers its files
    // or records its end (they hold its forwarding lock shared until they
    // commit), and from what had committed once the lock was taken: a
    // registration running beside the sweep may not have found the row to
    // mark (its production.completed, which makes the row, committing
    // meanwhile), so its outputs must be seen here or the row left dirty for
    // the next sweep. One that cannot be locked now stays dirty.
    let (ids, keys): (Vec<String>, Vec<i64>) = dirty
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            let key = domain::forwarding_lock_key(&id);
            (id, key)
        })
        .unzip();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let held: std::collections::HashSet<String> = tx
        .query_cached(
            "SELECT id FROM unnest($1::text[], $2::bigint[]) AS u(id, k)
             WHERE pg_try_advisory_xact_lock(k)",
            &[&ids, &keys],
        )
        .await
        .context("taking forwarding locks")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let judged: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| held.contains(*id))
        .collect();
    // Ended, and every DONE job's outputs taken: production.completed may
    // have come before the last job.output. A statement of its own, so its
    // snapshot follows the locks.
    let taken: std::collections::HashMap<String, bool> = tx
        .query_cached(
            "SELECT u.id,
                    COALESCE((SELECT (p.jobs_done IS NULL
                                      OR p.jobs_done <= (SELECT count(*) FROM job_outputs j
                                                         WHERE j.production_id = u.id))
                                     AND (NOT $2 OR p.record_lfn IS NOT NULL)
                              FROM productions p WHERE p.production_id = u.id),
                             false)
             FROM unnest($1::text[]) AS u(id)",
            &[&judged, &records],
        )
        .await
        .context("judging changed forwarding")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rows: Vec<(String, Vec<String>, bool)> = dirty
        .iter()
        .filter_map(|r| {
            let production_id: String = r.get(0);
            let all_taken = *taken.get(&production_id)?;
            Some((production_id, r.get(1), all_taken))
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for (production_id, destinations, all_taken) in rows {
        let counts = tx
            .query_cached(
                "SELECT d, count(r.lfn), count(r.lfn) FILTER (WHERE r.state IN ('verified', 'registered')),
                        count(r.lfn) FILTER (WHERE r.state = 'failed'),
                        COALESCE(max(r.reason) FILTER (WHERE r.state = 'failed'), '')
                 FROM unnest($2::text[]) WITH ORDINALITY AS u (d, n)
                 LEFT JOIN replicas r ON r.production_id = $1 AND r.destination = u.d
                 GROUP BY d, n ORDER BY n",
                &[&production_id, &destinations],
            )
            .await
            .context("counting replicas")?;
        let destinations: Vec<pb::DestinationProgress> = counts
            .iter()
            .map(|c| pb::DestinationProgress {
                destination: c.get(0),
                total: c.get::<_, i64>(1) as u64,
                forwarded: c.get::<_, i64>(2) as u64,
                failing: c.get::<_, i64>(3) as u64,
                held_reason: c.get(4),
            })
            .collect();
        let finished = all_taken && destinations.iter().all(|d| d.forwarded == d.total);
        tx.execute_cached(
            "UPDATE forwarding SET progress_dirty = false,
                    finished_at = CASE WHEN $2 THEN now() END
             WHERE production_id = $1",
            &[&production_id, &finished],
        )
        .await?;
        out.push(Progress {
            production_id,
            destinations,
            finished,
        });
    }
    Ok(out)
}

/// What a registration added.
#[derive(Debug, Default)]
pub struct Registered {
    /// Files new to the catalog.
    pub added: u64,
    /// Productions (in order) whose new files got replicas to forward: the
    /// caller marks their progress changed once it has written everything
    /// else ([`forwarding_changed`], one call, so row locks come in order).
    pub forwarding: Vec<String>,
}

/// The class of each file (production and the metadata its files share),
/// made where new: `classes[i]` is the ID of `(productions[i], metadata[i])`.
/// Rows are taken in the order of the classes' key, so that concurrent
/// registrations lock them alike. The server sees each distinct pair once
/// (a batch of thousands of files holds a few classes): parsing and
/// comparing every file's metadata there cost as much as registering the
/// files; pairs of different text that are the same JSON meet there.
async fn classes_of(
    tx: &Transaction<'_>,
    productions: &[&str],
    metadata: &[String],
) -> anyhow::Result<Vec<i64>> {
    let mut seen: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
    let (mut pairs_p, mut pairs_m) = (Vec::new(), Vec::new());
    let slots: Vec<usize> = productions
        .iter()
        .zip(metadata)
        .map(|(p, m)| {
            *seen.entry((*p, m.as_str())).or_insert_with(|| {
                pairs_p.push(*p);
                pairs_m.push(m.as_str());
                pairs_p.len() - 1
            })
        })
        .collect();
    // Every class of the batch is upserted, known ones too: the upsert locks
    // them in the order of their key, before the registration updates their
    // figures, so two consumers sharing classes never lock them in opposite
    // orders (a deadlock).
    let rows = tx
        .query_cached(
            "WITH wanted AS (
                 SELECT p, m::jsonb AS m, n
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w (p, m, n)),
             classes AS (
                 INSERT INTO file_classes (production_id, metadata)
                 SELECT p, m FROM (SELECT DISTINCT p, m FROM wanted) AS d
                 ORDER BY p, md5(m::text)
                 ON CONFLICT (production_id, md5(metadata::text))
                     DO UPDATE SET file_count = file_classes.file_count
                 RETURNING class_id, production_id, metadata)
             SELECT c.class_id FROM wanted w
             JOIN classes c ON c.production_id = w.p AND c.metadata = w.m
             ORDER BY w.n",
            &[&pairs_p, &pairs_m],
        )
        .await
        .context("finding the files' classes")?;
    anyhow::ensure!(
        rows.len() == pairs_p.len(),
        "{} classes for {} distinct classes of files",
        rows.len(),
        pairs_p.len()
    );
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(slots.into_iter().map(|i| ids[i]).collect())
}

/// What the files added to each class add to its running figures:
/// `(SELECT lfn, size, class_id, run FROM …) AS a` joined in SQL.
const CLASS_FIGURES: &str = "UPDATE file_classes c SET
        file_count = c.file_count + a.n,
        total_bytes = c.total_bytes + a.bytes,
        max_run = greatest(c.max_run, a.max_run),
        min_lfn = least(c.min_lfn, a.min_lfn),
        max_lfn = greatest(c.max_lfn, a.max_lfn),
        first_lfns = ARRAY(SELECT l FROM unnest(c.first_lfns || a.first_lfns) AS l ORDER BY l LIMIT 3)
    FROM (SELECT class_id, count(*) AS n, sum(size) AS bytes, max(run) AS max_run,
                 min(lfn) AS min_lfn, max(lfn) AS max_lfn,
                 (array_agg(lfn ORDER BY lfn))[1:3] AS first_lfns
          FROM added_runs GROUP BY class_id) AS a
    WHERE c.class_id = a.class_id";

/// Registers `files` (with the attempt that wrote them), their metadata
/// typed as the profiles declare, each in its class, and a pending replica
/// of each new file on each destination its production goes to.
pub async fn register_files(
    tx: &Transaction<'_>,
    types: &KeyTypes,
    files: &[(u32, pb::OutputFile)],
) -> anyhow::Result<Registered> {
    if files.is_empty() {
        return Ok(Registered::default());
    }
    let lfns: Vec<&str> = files.iter().map(|(_, f)| f.lfn.as_str()).collect();
    let productions: Vec<&str> = files
        .iter()
        .map(|(_, f)| f.production_id.as_str())
        .collect();
    let mut distinct = productions.clone();
    distinct.sort_unstable();
    distinct.dedup();
    lock_forwarding(tx, &distinct, &[]).await?;
    let jobs: Vec<i64> = files.iter().map(|(_, f)| f.job_index as i64).collect();
    let attempts: Vec<i32> = files.iter().map(|(a, _)| *a as i32).collect();
    let sizes: Vec<i64> = files.iter().map(|(_, f)| f.size as i64).collect();
    let sums: Vec<&str> = files.iter().map(|(_, f)| f.adler32.as_str()).collect();
    let urls: Vec<&str> = files.iter().map(|(_, f)| f.url.as_str()).collect();
    // As JSON text, cast by the server: one string per file instead of a
    // tree of values (a batch holds tens of thousands of files).
    let (mut metadata, mut shared, mut owns, mut runs) = (
        Vec::with_capacity(files.len()),
        Vec::with_capacity(files.len()),
        Vec::with_capacity(files.len()),
        Vec::with_capacity(files.len()),
    );
    for (_, f) in files {
        let typed = types.lenient(&f.metadata);
        metadata.push(serde_json::to_string(&typed)?);
        let (class, own) = types.split(typed);
        runs.push(domain::run_of(&own));
        shared.push(serde_json::to_string(&class)?);
        owns.push(serde_json::to_string(&own)?);
    }
    let classes = classes_of(tx, &productions, &shared).await?;
    let stmt = tx
        .prepare_cached(&format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::bigint[],
                                      $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[],
                                      $11::bigint[])
                      AS f(lfn, production_id, job_index, attempt, size, adler32, url, metadata,
                           class_id, own, run)),
             added AS (
                 INSERT INTO files (lfn, production_id, job_index, attempt, size, adler32, url, metadata,
                                    class_id, own)
                 SELECT lfn, production_id, job_index, attempt, size, adler32, url, metadata::jsonb,
                        class_id, own::jsonb
                 FROM input
                 ON CONFLICT (lfn) DO NOTHING
                 RETURNING lfn, production_id, size, class_id),
             added_runs AS (
                 SELECT a.lfn, a.size, a.class_id, i.run FROM added a JOIN input i USING (lfn)),
             classed AS ({CLASS_FIGURES}),
             -- A pending replica on each destination its production goes to.
             forwarded AS (
                 INSERT INTO replicas (lfn, destination, production_id)
                 SELECT a.lfn, d, a.production_id
                 FROM added a JOIN forwarding fw USING (production_id), unnest(fw.destinations) AS d
                 ON CONFLICT DO NOTHING
                 RETURNING production_id),
             -- In production order: concurrent batches lock totals rows alike.
             counted AS (
                 INSERT INTO totals (production_id, file_count, total_bytes)
                 SELECT production_id, count(*), sum(size) FROM added GROUP BY production_id
                 ORDER BY production_id
                 ON CONFLICT (production_id) DO UPDATE SET
                     file_count = totals.file_count + EXCLUDED.file_count,
                     total_bytes = totals.total_bytes + EXCLUDED.total_bytes)
             SELECT (SELECT count(*) FROM added),
                    (SELECT COALESCE(array_agg(DISTINCT production_id ORDER BY production_id), '{{}}')
                     FROM forwarded)"
        ))
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &lfns,
                &productions,
                &jobs,
                &attempts,
                &sizes,
                &sums,
                &urls,
                &metadata,
                &classes,
                &owns,
                &runs,
            ],
        )
        .await
        .context("registering files")?;
    let added: i64 = row.get(0);
    let forwarding: Vec<String> = row.get(1);
    tracing::debug!(files = files.len(), added, "files registered");
    if !forwarding.is_empty() {
        wake_forwarders(tx).await?;
    }
    Ok(Registered {
        added: added as u64,
        forwarding,
    })
}

/// Writes the record of a finished production (once) with its running
/// totals, how many of its jobs ended DONE (`jobs_done`: each sent one
/// `job.output`, which may not have been taken yet), and the job accounting
/// the dispatcher sent; `completed_at` is when it ended (its event's time).
pub async fn record_completed(
    tx: &Transaction<'_>,
    completed: &pb::ProductionCompleted,
    state: &str,
    completed_at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let counts = completed.counts.unwrap_or_default();
    let jobs_done = counts.done as i64;
    let counts = serde_json::to_value(prodsys_core::JobCounts::from(counts))?;
    let at = |ms: i64| {
        (ms > 0)
            .then(|| chrono::DateTime::from_timestamp_millis(ms))
            .flatten()
    };
    let big = |n: u64| n.min(i64::MAX as u64) as i64;
    tx.execute_cached(
        "INSERT INTO productions (production_id, state, file_count, total_bytes, jobs_done,
                                  completed_at, counts, attempts, retries, cpu_seconds,
                                  cpu_measured_attempts, first_job_started_at, last_job_ended_at,
                                  first_run, last_run)
         SELECT $1, $2, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0), $3,
                $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
         FROM (SELECT) AS one LEFT JOIN totals t ON t.production_id = $1
         ON CONFLICT (production_id) DO NOTHING",
        &[
            &completed.production_id,
            &state,
            &jobs_done,
            &completed_at,
            &counts,
            &big(completed.attempts),
            &big(completed.retries),
            &completed.cpu_seconds,
            &big(completed.cpu_measured_attempts),
            &at(completed.first_job_started_unix_ms),
            &at(completed.last_job_ended_unix_ms),
            &big(completed.first_run),
            &big(completed.last_run),
        ],
    )
    .await?;
    // A production without destinations is followed too: it is announced
    // forwarded (to none) once every DONE job's outputs are catalogued.
    tx.execute_cached(
        "INSERT INTO forwarding (production_id, destinations) VALUES ($1, '{}')
         ON CONFLICT (production_id) DO NOTHING",
        &[&completed.production_id],
    )
    .await
    .context("following a production's outputs")?;
    Ok(())
}

/// What a `request.accepted` tells of its production, for the record.
pub struct Accepted<'a> {
    pub accepted: &'a pb::RequestAccepted,
    pub parameters: serde_json::Value,
    pub submitted_at: Option<chrono::DateTime<chrono::Utc>>,
    pub accepted_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Keeps what each `request.accepted` tells of its production, for the
/// record (once per production; `submitted_at` and `accepted_at` from the
/// request's and the event's UUIDv7s), and links it to every production it
/// names: a batch in two statements, however many it holds.
pub async fn record_accepted(tx: &Transaction<'_>, batch: &[Accepted<'_>]) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&pb::RequestAccepted) -> &str| -> Vec<&str> {
        batch.iter().map(|a| f(a.accepted)).collect()
    };
    let parameters: Vec<&serde_json::Value> = batch.iter().map(|a| &a.parameters).collect();
    // Each row's destinations as one JSON array (unnest cannot take arrays
    // of different lengths).
    let destinations: Vec<serde_json::Value> = batch
        .iter()
        .map(|a| serde_json::Value::from(a.accepted.forward.clone()))
        .collect();
    let submitted: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        batch.iter().map(|a| a.submitted_at).collect();
    let accepted_at: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        batch.iter().map(|a| a.accepted_at).collect();
    tx.execute_cached(
        "INSERT INTO accepted_requests (production_id, request_id, submitter, vo, profile,
                                        profile_sha256, fingerprint, parameters, backend,
                                        destinations, submitted_at, accepted_at)
         SELECT a.production_id, a.request_id, a.submitter, a.vo, a.profile, a.profile_sha256,
                a.fingerprint, a.parameters, a.backend,
                ARRAY(SELECT jsonb_array_elements_text(a.destinations)), a.submitted_at,
                a.accepted_at
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::jsonb[], $9::text[], $10::jsonb[], $11::timestamptz[],
                     $12::timestamptz[])
             AS a(production_id, request_id, submitter, vo, profile, profile_sha256, fingerprint,
                  parameters, backend, destinations, submitted_at, accepted_at)
         ON CONFLICT (production_id) DO NOTHING",
        &[
            &column(|a| &a.production_id),
            &column(|a| &a.request_id),
            &column(|a| &a.submitter),
            &column(|a| &a.vo),
            &column(|a| &a.profile),
            &column(|a| &a.profile_sha256),
            &column(|a| &a.fingerprint),
            &parameters,
            &column(|a| &a.backend),
            &destinations,
            &submitted,
            &accepted_at,
        ],
    )
    .await
    .context("keeping the accepted requests")?;
    // A parameter naming a production it knows: the production it takes
    // its inputs from (a chained production's `input_production`). Only a
    // string of an ID's shape can name one (its profile's prefix and a
    // number; no statement for a batch without any); each is looked up by
    // the key, so the statement costs the same however many productions are
    // known.
    let mut children = Vec::new();
    let mut values = Vec::new();
    for a in batch {
        let Some(parameters) = a.parameters.as_object() else {
            continue;
        };
        for value in parameters.values().filter_map(serde_json::Value::as_str) {
            if value != a.accepted.production_id && prodsys_core::is_production_id(value) {
                children.push(a.accepted.production_id.as_str());
                values.push(value);
            }
        }
    }
    if values.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "INSERT INTO production_links (parent_id, child_id)
         SELECT DISTINCT p.production_id, v.child
         FROM unnest($1::text[], $2::text[]) AS v(child, value)
         JOIN accepted_requests p ON p.production_id = v.value
         ON CONFLICT DO NOTHING",
        &[&children, &values],
    )
    .await
    .context("linking the productions to their parents")?;
    Ok(())
}

/// Keeps what each `production.dispatched` tells of its production (its
/// plan's size, installation and resource estimate), a batch in one
/// statement. A chained production sends one each time its jobs grow with
/// arriving inputs: the largest plan is kept, whatever order they come in
/// (within the batch too).
pub async fn record_dispatched(
    tx: &Transaction<'_>,
    dispatched: &[pb::ProductionDispatched],
) -> anyhow::Result<()> {
    // One row a production (a statement may not update a row twice): its largest plan.
    let mut largest: std::collections::BTreeMap<&str, &pb::ProductionDispatched> =
        std::collections::BTreeMap::new();
    for d in dispatched {
        let kept = largest.entry(d.production_id.as_str()).or_insert(d);
        if d.job_total > kept.job_total {
            *kept = d;
        }
    }
    if largest.is_empty() {
        return Ok(());
    }
    let rows: Vec<&pb::ProductionDispatched> = largest.into_values().collect();
    let ids: Vec<&str> = rows.iter().map(|d| d.production_id.as_str()).collect();
    let totals: Vec<i64> = rows
        .iter()
        .map(|d| d.job_total.min(i64::MAX as u64) as i64)
        .collect();
    let backends: Vec<&str> = rows.iter().map(|d| d.backend.as_str()).collect();
    let estimate = |f: fn(&pb::ResourceEstimate) -> f64| -> Vec<Option<f64>> {
        rows.iter().map(|d| d.estimate.as_ref().map(f)).collect()
    };
    let memory: Vec<Option<i64>> = rows
        .iter()
        .map(|d| d.estimate.map(|e| e.memory_mb.min(i64::MAX as u64) as i64))
        .collect();
    tx.execute_cached(
        "INSERT INTO dispatches (production_id, job_total, backend, cpu_seconds_per_job,
                                 cpu_hours_total, memory_mb, disk_mb_per_job, disk_gb_total)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::float8[], $5::float8[],
                              $6::bigint[], $7::float8[], $8::float8[])
         ORDER BY 1
         ON CONFLICT (production_id) DO UPDATE SET
             job_total = EXCLUDED.job_total,
             cpu_seconds_per_job = EXCLUDED.cpu_seconds_per_job,
             cpu_hours_total = EXCLUDED.cpu_hours_total,
             memory_mb = EXCLUDED.memory_mb,
             disk_mb_per_job = EXCLUDED.disk_mb_per_job,
             disk_gb_total = EXCLUDED.disk_gb_total
         WHERE EXCLUDED.job_total > dispatches.job_total",
        &[
            &ids,
            &totals,
            &backends,
            &estimate(|e| e.cpu_seconds_per_job),
            &estimate(|e| e.cpu_hours_total),
            &memory,
            &estimate(|e| e.disk_mb_per_job),
            &estimate(|e| e.disk_gb_total),
        ],
    )
    .await
    .context("keeping the dispatched plans")?;
    Ok(())
}

/// Notes the jobs (production, job index) whose `job.output` was taken, so
/// a production's forwarding waits for every one its record expects.
pub async fn record_job_outputs(tx: &Transaction<'_>, jobs: &[(&str, i64)]) -> anyhow::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut jobs = jobs.to_vec();
    // In key order: concurrent batches take the index entries alike.
    jobs.sort_unstable();
    jobs.dedup();
    let productions: Vec<&str> = jobs.iter().map(|j| j.0).collect();
    let indexes: Vec<i64> = jobs.iter().map(|j| j.1).collect();
    tx.execute_cached(
        "INSERT INTO job_outputs (production_id, job_index)
         SELECT * FROM unnest($1::text[], $2::bigint[])
         ON CONFLICT DO NOTHING",
        &[&productions, &indexes],
    )
    .await
    .context("noting the jobs whose outputs were taken")?;
    Ok(())
}

/// A file row's replicas as one JSON array of `[destination, state, url,
/// reason, attempts]`.
const REPLICAS: &str = "(SELECT COALESCE(jsonb_agg(jsonb_build_array(r.destination, r.state, r.url,
                                                                 r.reason, r.attempts)
                                               ORDER BY r.destination), '[]')
                     FROM replicas r WHERE r.lfn = f.lfn)";

/// The conditions of `query` on each file's own values, numbered after
/// `first - 1`, with their parameters.
fn own_conditions(query: &FileQuery, first: usize, extra: &mut Vec<String>) -> String {
    let mut sql = String::new();
    if query.file_equal.as_object().is_some_and(|m| !m.is_empty()) {
        extra.push(query.file_equal.to_string());
        sql.push_str(&format!(
            " AND f.own @> ${}::text::jsonb",
            first + extra.len() - 1
        ));
    }
    if let Some(path) = &query.file_path {
        extra.push(path.clone());
        sql.push_str(&format!(
            " AND f.own @@ ${}::text::jsonpath",
            first + extra.len() - 1
        ));
    }
    sql
}

/// The statement of `query`'s classes whose files may follow LFN `$1` and
/// begin with the prefix `$2`, in the order of their first LFN after `$3`
/// (`limited`: the first `$4` of them), and its parameters after those
/// four. Each answers with its ID, first and last LFN, file count, metadata
/// and production. A page reads a few classes at a time (planned for all of
/// them, the classes of a particle and NSB level were read from a bitmap
/// of thousands and sorted, 100 ms cold, where the index in first-LFN order
/// gives the first few); a stream reads all of them once, from a portal.
fn classes_statement(query: &FileQuery, limited: bool) -> (String, Vec<String>) {
    let mut sql = "SELECT class_id, min_lfn, max_lfn, file_count, metadata, production_id
                   FROM file_classes
                   WHERE max_lfn > $1 AND max_lfn >= $2 AND min_lfn > $3"
        .to_string();
    let mut extra = Vec::new();
    let param = |extra: &mut Vec<String>, value: String| {
        extra.push(value);
        4 + extra.len()
    };
    if !query.production_id.is_empty() {
        let n = param(&mut extra, query.production_id.clone());
        sql.push_str(&format!(" AND production_id = ${n}"));
    }
    if query.equal.as_object().is_some_and(|m| !m.is_empty()) {
        let n = param(&mut extra, query.equal.to_string());
        sql.push_str(&format!(" AND metadata @> ${n}::text::jsonb"));
    }
    // One statement per shape: a path of `true` would lead the planner to a
    // scan of the whole index, so a query without a path has none.
    if let Some(path) = &query.path {
        let n = param(&mut extra, path.clone());
        sql.push_str(&format!(" AND metadata @@ ${n}::text::jsonpath"));
    }
    for (key, value) in &query.ordered {
        // As the index of the keys' values and the first LFN is written
        // (`ordered_keys`), so the planner reads it in LFN order.
        let n = param(&mut extra, value.to_string());
        sql.push_str(&format!(
            " AND (metadata -> {}) = ${n}::text::jsonb",
            sql_literal(key)
        ));
    }
    sql.push_str(if limited {
        " ORDER BY min_lfn LIMIT $4"
    } else {
        // $4 unused: the same parameters either way.
        " AND $4::bigint IS NULL ORDER BY min_lfn"
    });
    (sql, extra)
}

/// The statement of the files of the classes `$1` after LFN `$2` with the
/// prefix `$3`, in LFN order, and its parameters after those three: read
/// from the covering index of each class's files.
/// Without `replicated` (no production of the classes has a replica), the
/// files' replicas are not looked up: a look-up per file was a third of a
/// stream's time in the database.
fn class_files_statement(query: &FileQuery, replicated: bool) -> (String, Vec<String>) {
    let mut extra = Vec::new();
    let own = own_conditions(query, 4, &mut extra);
    let replicas = if replicated { REPLICAS } else { "NULL::jsonb" };
    let sql = format!(
        "SELECT f.lfn, f.size, f.adler32, f.url, f.own, f.job_index, f.class_id, {replicas}
         FROM files f
         WHERE f.class_id = ANY($1) AND f.lfn > $2 AND f.lfn >= $3 AND starts_with(f.lfn, $3){own}
         ORDER BY f.lfn"
    );
    (sql, extra)
}

/// The statement of every file after LFN `$1` with the prefix `$2`, in LFN
/// order (a query that names no class), and its parameters after those two.
fn all_files_statement(query: &FileQuery) -> (String, Vec<String>) {
    let mut extra = Vec::new();
    let own = own_conditions(query, 3, &mut extra);
    let sql = format!(
        "SELECT f.lfn, f.size, f.adler32, f.url, f.own, f.job_index, f.class_id, {REPLICAS}
         FROM files f
         WHERE f.lfn > $1 AND f.lfn >= $2 AND starts_with(f.lfn, $2){own}
         ORDER BY f.lfn"
    );
    (sql, extra)
}

type Param<'a> = &'a (dyn prodsys_db::deadpool_postgres::tokio_postgres::types::ToSql + Sync);
type Row = prodsys_db::deadpool_postgres::tokio_postgres::Row;
type Portal = prodsys_db::deadpool_postgres::tokio_postgres::Portal;

/// What the files of a class share, as the API gives it.
struct Shared {
    production_id: String,
    metadata: std::collections::HashMap<String, String>,
}

/// A class as a walk reads it.
struct Class {
    id: i64,
    min_lfn: String,
    max_lfn: String,
    file_count: i64,
}

/// Classes read at first, then at a time: a first page needs a few dozen.
const FIRST_CLASSES: i64 = 32;
/// Most classes' shared metadata a walk keeps at once.
const MAX_SHARED: usize = 4096;
const MORE_CLASSES: i64 = 512;

/// A walk over `query`'s files in LFN order, within one read-only snapshot.
///
/// A query that selects classes reads them in the order of their first
/// LFN and takes them in batches: a batch ends where the next class begins
/// after every file of the batch (their LFN ranges do not meet), so the
/// files of a batch, sorted, all come before those of the next. A batch
/// holds at least as many files as are still wanted, and its files are read
/// from the covering index of each class's files (not from the table, where
/// the files of one class lie among those of every production that was
/// writing beside it). A query that selects no class reads files by LFN.
struct Walk<'a> {
    tx: &'a Transaction<'a>,
    query: &'a FileQuery,
    after: &'a str,
    /// The statement of the query's classes (a few at a time, after the
    /// last read) and its parameters after the first four, if it selects
    /// classes.
    classes: Option<(String, Vec<String>)>,
    /// A stream's statement of every class after the first few: one portal
    /// over the rest, once the first page is on its way (its sort of every
    /// matching class does not delay the first page).
    rest: Option<String>,
    class_portal: Option<Portal>,
    /// The first LFN of the last class read.
    last_class: String,
    classes_read: usize,
    classes_done: bool,
    pending: std::collections::VecDeque<Class>,
    shared: std::collections::HashMap<i64, Shared>,
    files: Option<Portal>,
    /// The walk over all files has begun (it is one portal).
    all_started: bool,
}

impl<'a> Walk<'a> {
    /// A walk for a page (`whole` false: classes a few at a time) or a
    /// stream (every class once, from a portal).
    async fn start(
        tx: &'a Transaction<'a>,
        query: &'a FileQuery,
        after: &'a str,
        whole: bool,
    ) -> anyhow::Result<Walk<'a>> {
        let classes = query
            .selects_classes()
            .then(|| classes_statement(query, true));
        let rest = (whole && classes.is_some()).then(|| classes_statement(query, false).0);
        Ok(Walk {
            tx,
            query,
            after,
            classes,
            rest,
            class_portal: None,
            last_class: String::new(),
            classes_read: 0,
            classes_done: false,
            pending: Default::default(),
            shared: Default::default(),
            files: None,
            all_started: false,
        })
    }

    /// The next classes to read files of: at least `want` files' worth and
    /// every class whose files interleave with theirs; none at the end.
    async fn next_batch(&mut self, want: i64) -> anyhow::Result<Vec<i64>> {
        // A stream of many classes keeps only those still to come (a page
        // held back from an earlier batch looks its classes up again).
        if self.shared.len() > MAX_SHARED {
            let pending: std::collections::HashSet<i64> =
                self.pending.iter().map(|c| c.id).collect();
            self.shared.retain(|id, _| pending.contains(id));
        }
        let mut ids = Vec::new();
        let (mut files, mut last) = (0i64, String::new());
        loop {
            if self.pending.is_empty() && !self.classes_done {
                let Some((sql, extra)) = &self.classes else {
                    break;
                };
                let n: i64 = if self.classes_read == 0 {
                    FIRST_CLASSES
                } else {
                    MORE_CLASSES
                };
                if self.classes_read > 0
                    && self.class_portal.is_none()
                    && let Some(rest) = &self.rest
                {
                    let none: Option<i64> = None;
                    let mut params: Vec<Param<'_>> =
                        vec![&self.after, &self.query.lfn_prefix, &self.last_class, &none];
                    params.extend(extra.iter().map(|e| e as Param<'_>));
                    let statement = self.tx.prepare_cached(rest).await?;
                    self.class_portal = Some(self.tx.bind(&statement, &params).await?);
                }
                let rows = match &self.class_portal {
                    Some(portal) => self.tx.query_portal(portal, n as i32).await?,
                    None => {
                        let mut params: Vec<Param<'_>> =
                            vec![&self.after, &self.query.lfn_prefix, &self.last_class, &n];
                        params.extend(extra.iter().map(|e| e as Param<'_>));
                        self.tx.query_cached(sql, &params).await?
                    }
                };
                self.classes_done = rows.len() < n as usize;
                self.classes_read += rows.len();
                if let Some(last) = rows.last() {
                    self.last_class = last.get(1);
                }
                for row in rows {
                    let id: i64 = row.get(0);
                    self.shared.insert(
                        id,
                        Shared {
                            production_id: row.get(5),
                            metadata: domain::as_text(row.get(4)),
                        },
                    );
                    self.pending.push_back(Class {
                        id,
                        min_lfn: row.get(1),
                        max_lfn: row.get(2),
                        file_count: row.get(3),
                    });
                }
            }
            let Some(next) = self.pending.front() else {
                break;
            };
            if !ids.is_empty() && files >= want && next.min_lfn > last {
                break;
            }
            let class = self.pending.pop_front().expect("a class is pending");
            files += class.file_count;
            if class.max_lfn > last {
                last = class.max_lfn;
            }
            ids.push(class.id);
        }
        Ok(ids)
    }

    /// Up to `max` more files (fewer only at the end), as rows.
    async fn rows(&mut self, max: usize) -> anyhow::Result<Vec<Row>> {
        let mut out: Vec<Row> = Vec::new();
        while out.len() < max {
            let want = max - out.len();
            if let Some(portal) = &self.files {
                let rows = self.tx.query_portal(portal, want as i32).await?;
                if rows.len() < want {
                    self.files = None;
                }
                out.extend(rows);
                continue;
            }
            if self.classes.is_some() {
                let batch = self.next_batch(want as i64).await?;
                if batch.is_empty() {
                    break;
                }
                let mut productions: Vec<&str> = batch
                    .iter()
                    .filter_map(|id| self.shared.get(id))
                    .map(|shared| shared.production_id.as_str())
                    .collect();
                productions.sort_unstable();
                productions.dedup();
                let replicated: bool = self
                    .tx
                    .query_one_cached(
                        "SELECT EXISTS (SELECT 1 FROM replicas WHERE production_id = ANY($1))",
                        &[&productions],
                    )
                    .await?
                    .get(0);
                let (sql, extra) = class_files_statement(self.query, replicated);
                let mut params: Vec<Param<'_>> = vec![&batch, &self.after, &self.query.lfn_prefix];
                params.extend(extra.iter().map(|e| e as Param<'_>));
                let statement = self.tx.prepare_cached(&sql).await?;
                self.files = Some(self.tx.bind(&statement, &params).await?);
            } else if !self.all_started {
                self.all_started = true;
                let (sql, extra) = all_files_statement(self.query);
                let mut params: Vec<Param<'_>> = vec![&self.after, &self.query.lfn_prefix];
                params.extend(extra.iter().map(|e| e as Param<'_>));
                let statement = self.tx.prepare_cached(&sql).await?;
                self.files = Some(self.tx.bind(&statement, &params).await?);
            } else {
                break;
            }
        }
        Ok(out)
    }

    /// Files and their replicas as the API gives them, from [`Walk::rows`]:
    /// each file's metadata is its class's and its own, or (`by_class`: the
    /// classes the answer has named so far) its own and its class's ID,
    /// with the classes not yet named.
    async fn files_of(
        &mut self,
        rows: &[Row],
        by_class: Option<&mut std::collections::HashSet<i64>>,
    ) -> anyhow::Result<Files> {
        let mut unknown: Vec<i64> = rows
            .iter()
            .map(|row| row.get::<_, i64>(6))
            .filter(|id| !self.shared.contains_key(id))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        if !unknown.is_empty() {
            // A walk by LFN keeps only the classes of the page at hand.
            if self.classes.is_none() {
                self.shared.clear();
            }
            for row in self
                .tx
                .query_cached(
                    "SELECT class_id, production_id, metadata FROM file_classes
                     WHERE class_id = ANY($1)",
                    &[&unknown],
                )
                .await?
            {
                self.shared.insert(
                    row.get(0),
                    Shared {
                        production_id: row.get(1),
                        metadata: domain::as_text(row.get(2)),
                    },
                );
            }
        }
        let mut named = by_class;
        let mut found = Files {
            files: Vec::with_capacity(rows.len()),
            ..Default::default()
        };
        for row in rows {
            let class_id: i64 = row.get(6);
            let shared = self.shared.get(&class_id);
            let own = domain::as_text(row.get(4));
            let lfn: String = row.get(0);
            let on = replicas_of(
                row.get::<_, Option<serde_json::Value>>(7)
                    .unwrap_or_default(),
            );
            // By class: each class once, the file its own keys, replicas
            // only where there are some. Else the file's whole metadata and
            // a list of replicas per file.
            let (metadata, class) = match named.as_deref_mut() {
                Some(named) => {
                    if let Some(shared) = shared
                        && named.insert(class_id)
                    {
                        found.classes.push(pb::FileClass {
                            class_id: class_id as u64,
                            production_id: shared.production_id.clone(),
                            metadata: shared.metadata.clone(),
                        });
                    }
                    (own, class_id as u64)
                }
                None => {
                    let mut metadata = shared.map(|s| s.metadata.clone()).unwrap_or_default();
                    metadata.extend(own);
                    (metadata, 0)
                }
            };
            if named.is_none() || !on.is_empty() {
                found.replicas.push(pb::FileReplicas {
                    lfn: lfn.clone(),
                    replicas: on,
                });
            }
            found.files.push(pb::OutputFile {
                lfn,
                size: row.get::<_, i64>(1) as u64,
                adler32: row.get(2),
                url: row.get(3),
                metadata,
                production_id: shared.map(|s| s.production_id.clone()).unwrap_or_default(),
                job_index: row.get::<_, i64>(5) as u64,
                class_id: class,
            });
        }
        Ok(found)
    }
}

/// Files as an answer gives them: the files, their replicas, and the
/// classes they name (when asked by class).
#[derive(Debug, Default)]
pub struct Files {
    pub files: Vec<pb::OutputFile>,
    pub replicas: Vec<pb::FileReplicas>,
    pub classes: Vec<pb::FileClass>,
}

/// A read-only transaction of one snapshot, for a walk.
async fn snapshot(
    client: &mut prodsys_db::deadpool_postgres::Object,
) -> anyhow::Result<Transaction<'_>> {
    Ok(client
        .build_transaction()
        .isolation_level(
            prodsys_db::deadpool_postgres::tokio_postgres::IsolationLevel::RepeatableRead,
        )
        .read_only(true)
        .start()
        .await?)
}

/// Up to `page_size` files of `query` after LFN `after`, in LFN order, with
/// their replicas (and classes, `by_class`), and whether more follow.
pub async fn files_page(
    db: &Db,
    query: &FileQuery,
    after: &str,
    page_size: u32,
    by_class: bool,
) -> anyhow::Result<(Files, bool)> {
    let mut client = db.client().await?;
    let tx = snapshot(&mut client).await?;
    let (files, more) = {
        let mut walk = Walk::start(&tx, query, after, false).await?;
        let mut rows = walk.rows(page_size as usize + 1).await?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let mut named = std::collections::HashSet::new();
        let files = walk.files_of(&rows, by_class.then_some(&mut named)).await?;
        (files, more)
    };
    tx.commit().await?;
    Ok((files, more))
}

/// Every file of `query` after LFN `after`, in LFN order, handed to `send`
/// in pages of `page_size` (with whether more follow) until it answers
/// false. One walk and one snapshot serve the whole answer: the files are
/// searched for once, not again from each page's last LFN, and the answer
/// is consistent however long it runs.
pub async fn stream_files<F, Fut>(
    db: &Db,
    query: &FileQuery,
    after: &str,
    page_size: u32,
    by_class: bool,
    mut send: F,
) -> anyhow::Result<()>
where
    F: FnMut(Files, bool) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut client = db.client().await?;
    let tx = snapshot(&mut client).await?;
    {
        let mut walk = Walk::start(&tx, query, after, true).await?;
        // The classes named so far: each is sent once in a stream.
        let mut named = std::collections::HashSet::new();
        // Each page goes out as soon as it is read (a full page says more
        // may follow: the last may then continue with nothing). An answer
        // of no file is one empty message.
        for first in std::iter::once(true).chain(std::iter::repeat(false)) {
            let rows = walk.rows(page_size as usize).await?;
            let more = rows.len() == page_size as usize;
            if rows.is_empty() && !first {
                break;
            }
            let files = walk.files_of(&rows, by_class.then_some(&mut named)).await?;
            if !send(files, more).await || !more {
                break;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// `text` as a SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The metadata keys of each index of classes by their values and first
/// LFN, as `((metadata -> 'a'), (metadata -> 'b'), min_lfn)` (a migration,
/// or an operator, made it): a query with an `=` condition on each of its
/// keys reads that index in LFN order.
pub async fn ordered_keys(db: &Db) -> anyhow::Result<Vec<Vec<String>>> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT indexdef FROM pg_indexes
             WHERE schemaname = current_schema() AND tablename = 'file_classes'",
            &[],
        )
        .await?;
    let mut keys: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|row| domain::ordered_key(row.get(0)))
        .collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The classes of files holding each identity's required metadata (by
/// identity, in the order given): what the existence check weighs, in the
/// catalog's own code (`domain::existence`). Each class's metadata comes
/// without the identity's required keys, which it holds with the required
/// values.
pub async fn existing_candidates(
    db: &Db,
    required: &[serde_json::Value],
) -> anyhow::Result<Vec<Vec<domain::CandidateClass>>> {
    let client = db.client().await?;
    let rows = client
        .query_cached(
            // A class holds every required pair (the look-up checks it), so
            // only its other keys are sent: what the comparison weighs (a
            // class's metadata whole was about 1 kB, a thousand classes a
            // checker's batch, written out as text and parsed again).
            "SELECT q.n, c.production_id, c.file_count, c.total_bytes, c.max_run, c.first_lfns,
                    c.metadata - q.keys
             FROM (SELECT n, required, ARRAY(SELECT jsonb_object_keys(required)) AS keys
                   FROM unnest($1::jsonb[]) WITH ORDINALITY AS u (required, n)
                   -- Each identity's values read once, not at each use for each class.
                   OFFSET 0) AS q
             CROSS JOIN LATERAL (
                 -- A CTA identity through the index of its keys, any other
                 -- through the GIN index (both of classes).
                 SELECT * FROM file_classes
                 WHERE q.required ?& ARRAY['MCCampaign', 'array_layout', 'particle',
                                           'site', 'thetaP', 'phiP']
                   AND metadata -> 'MCCampaign' = q.required -> 'MCCampaign'
                   AND metadata -> 'array_layout' = q.required -> 'array_layout'
                   AND metadata -> 'particle' = q.required -> 'particle'
                   AND metadata -> 'site' = q.required -> 'site'
                   AND metadata -> 'thetaP' = q.required -> 'thetaP'
                   AND metadata -> 'phiP' = q.required -> 'phiP'
                   -- The function, not the operator: no GIN index scan
                   -- beside the btree's.
                   AND jsonb_contains(metadata, q.required)
                 UNION ALL
                 SELECT * FROM file_classes
                 WHERE NOT q.required ?& ARRAY['MCCampaign', 'array_layout', 'particle',
                                               'site', 'thetaP', 'phiP']
                   AND metadata @> q.required) AS c
             WHERE c.file_count > 0",
            &[&required],
        )
        .await?;
    let mut by: Vec<Vec<domain::CandidateClass>> = vec![Vec::new(); required.len()];
    for row in &rows {
        let n = row.get::<_, i64>(0) as usize;
        let metadata = match row.get::<_, serde_json::Value>(6) {
            serde_json::Value::Object(map) => map,
            _ => Default::default(),
        };
        if let Some(classes) = by.get_mut(n.wrapping_sub(1)) {
            classes.push(domain::CandidateClass {
                production_id: row.get(1),
                file_count: row.get::<_, i64>(2).max(0) as u64,
                total_bytes: row.get::<_, i64>(3).max(0) as u64,
                max_run: row.get(4),
                first_lfns: row.get(5),
                metadata,
            });
        }
    }
    Ok(by)
}

/// A finished production's record is there once every DONE job's outputs
/// are taken (production.completed may overtake its last job.output), so
/// that it counts every file the production reported.
const RECORD_READY: &str = "(p.jobs_done IS NULL
      OR p.jobs_done <= (SELECT count(*) FROM job_outputs j WHERE j.production_id = p.production_id))";

/// Records which jobs of a finished production ran on each installation
/// (installation, ranges, truncated), as `production.completed` tells them
/// (the same event again changes nothing).
pub async fn record_job_ranges(
    tx: &Transaction<'_>,
    production_id: &str,
    ranges: &[(String, serde_json::Value, bool)],
) -> anyhow::Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    let installations: Vec<&str> = ranges.iter().map(|(i, _, _)| i.as_str()).collect();
    let jobs: Vec<&serde_json::Value> = ranges.iter().map(|(_, j, _)| j).collect();
    let truncated: Vec<bool> = ranges.iter().map(|(_, _, t)| *t).collect();
    tx.execute_cached(
        "INSERT INTO record_job_ranges (production_id, installation, jobs, jobs_truncated)
         SELECT $1, * FROM unnest($2::text[], $3::jsonb[], $4::bool[])
         ON CONFLICT (production_id, installation)
         DO UPDATE SET jobs = EXCLUDED.jobs, jobs_truncated = EXCLUDED.jobs_truncated",
        &[&production_id, &installations, &jobs, &truncated],
    )
    .await
    .context("recording where each job ran")?;
    Ok(())
}

/// Which jobs of a finished production ran on each installation:
/// installation → (ranges, truncated).
pub async fn job_ranges<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, (Vec<crate::domain::record::JobRange>, bool)>>
{
    let rows = client
        .query_cached(
            "SELECT installation, jobs, jobs_truncated FROM record_job_ranges
             WHERE production_id = $1",
            &[&production_id],
        )
        .await
        .context("reading where each job ran")?;
    rows.iter()
        .map(|r| {
            Ok((
                r.get(0),
                (serde_json::from_value(r.get(1))?, r.get::<_, bool>(2)),
            ))
        })
        .collect()
}

/// The state of `lfn`'s replica on `destination`, if it has one.
pub async fn replica_state(
    db: &Db,
    lfn: &str,
    destination: &str,
) -> anyhow::Result<Option<String>> {
    let client = db.client().await?;
    let row = client
        .query_opt_cached(
            "SELECT state FROM replicas WHERE lfn = $1 AND destination = $2",
            &[&lfn, &destination],
        )
        .await
        .context("reading the replica on the storage")?;
    Ok(row.map(|r| r.get::<_, String>(0)))
}

/// The catalog metadata of the files `lfns`, by LFN.
pub async fn files_metadata(
    db: &Db,
    lfns: &[&str],
) -> anyhow::Result<std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>> {
    let client = db.client().await?;
    let rows = client
        .query_cached(
            "SELECT lfn, metadata FROM files WHERE lfn = ANY($1)",
            &[&lfns],
        )
        .await
        .context("reading the files' metadata")?;
    Ok(rows
        .iter()
        .map(|row| {
            let meta = match row.get::<_, serde_json::Value>(1) {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            (row.get(0), meta)
        })
        .collect())
}

/// Of `productions`, those whose request was for one of `vos`.
pub async fn productions_of_vos(
    db: &Db,
    productions: &[&str],
    vos: &[String],
) -> anyhow::Result<std::collections::HashSet<String>> {
    let client = db.client().await?;
    let rows = client
        .query_cached(
            "SELECT production_id FROM accepted_requests
             WHERE production_id = ANY($1::text[]) AND vo = ANY($2::text[])",
            &[&productions, &vos],
        )
        .await
        .context("reading the VOs of productions")?;
    Ok(rows.into_iter().map(|row| row.get(0)).collect())
}

/// The record of `production_id`, if it finished (and every file it
/// reported is registered), with everything the catalog knows of it.
pub async fn production_record<C: prodsys_db::deadpool_postgres::GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<Option<domain::record::Record>> {
    use domain::record::{Dataset, Estimate, Record, Replicas};
    let row = client
        .query_opt_cached(
            // The running totals, not the snapshot taken at completion: a
            // file registered after (a late batch, RegisterFiles) counts.
            &format!(
                "SELECT p.state, COALESCE(t.file_count, 0), COALESCE(t.total_bytes, 0), p.completed_at,
                        p.counts, COALESCE(p.attempts, 0), COALESCE(p.retries, 0),
                        COALESCE(p.cpu_seconds, 0), COALESCE(p.cpu_measured_attempts, 0),
                        p.first_job_started_at, p.last_job_ended_at,
                        COALESCE(p.first_run, 0), COALESCE(p.last_run, 0), COALESCE(p.record_lfn, ''),
                        a.request_id, a.submitter, a.vo, a.profile, a.profile_sha256, a.fingerprint,
                        a.parameters, a.backend, a.destinations, a.submitted_at, a.accepted_at,
                        d.job_total, d.backend, d.cpu_seconds_per_job, d.cpu_hours_total, d.memory_mb,
                        d.disk_mb_per_job, d.disk_gb_total
                 FROM productions p LEFT JOIN totals t USING (production_id)
                 LEFT JOIN accepted_requests a USING (production_id)
                 LEFT JOIN dispatches d USING (production_id)
                 WHERE p.production_id = $1 AND {RECORD_READY}"
            ),
            &[&production_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let ms = |i: usize| {
        row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
            .map_or(0, |t| t.timestamp_millis())
    };
    let count = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    let text = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    let counts: prodsys_core::JobCounts = row
        .get::<_, Option<serde_json::Value>>(4)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let record_lfn: String = row.get(13);
    let dispatched_backend = text(26);
    let estimate = row
        .get::<_, Option<f64>>(27)
        .map(|cpu_seconds_per_job| Estimate {
            cpu_seconds_per_job,
            cpu_hours_total: row.get::<_, Option<f64>>(28).unwrap_or_default(),
            memory_mb: row.get::<_, Option<i64>>(29).unwrap_or_default().max(0) as u64,
            disk_mb_per_job: row.get::<_, Option<f64>>(30).unwrap_or_default(),
            disk_gb_total: row.get::<_, Option<f64>>(31).unwrap_or_default(),
        });
    let parameters: serde_json::Value = row
        .get::<_, Option<serde_json::Value>>(20)
        .unwrap_or(serde_json::Value::Null);
    let link_rows = client
        .query_cached(
            "SELECT parent_id, true FROM production_links WHERE child_id = $1
             UNION ALL
             SELECT child_id, false FROM production_links WHERE parent_id = $1
             ORDER BY 1",
            &[&production_id],
        )
        .await
        .context("reading the production's parents and children")?;
    let links: (Vec<String>, Vec<String>) = (
        link_rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect(),
        link_rows
            .iter()
            .filter(|r| !r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect(),
    );
    let datasets = client
        .query_cached(
            "SELECT COALESCE(metadata ->> 'dataset', ''), count(*), COALESCE(sum(size), 0)::bigint
             FROM files WHERE production_id = $1 AND lfn <> $2
             GROUP BY 1 ORDER BY 1",
            &[&production_id, &record_lfn],
        )
        .await?
        .iter()
        .map(|r| Dataset {
            name: r.get(0),
            file_count: r.get::<_, i64>(1) as u64,
            total_bytes: r.get::<_, i64>(2) as u64,
        })
        .collect();
    let replicas = client
        .query_cached(
            "SELECT destination,
                    count(*) FILTER (WHERE state IN ('verified', 'registered')),
                    count(*) FILTER (WHERE state = 'failed'), count(*)
             FROM replicas WHERE production_id = $1 GROUP BY destination ORDER BY destination",
            &[&production_id],
        )
        .await?
        .iter()
        .map(|r| Replicas {
            destination: r.get(0),
            forwarded: r.get::<_, i64>(1) as u64,
            failing: r.get::<_, i64>(2) as u64,
            total: r.get::<_, i64>(3) as u64,
        })
        .collect();
    let installations = crate::installations::read(client, production_id).await?;
    let job_total = row
        .get::<_, Option<i64>>(25)
        .map_or_else(|| counts.total(), |n| n.max(0) as u64);
    Ok(Some(Record {
        production_id: production_id.to_string(),
        state: row.get(0),
        file_count: count(1),
        total_bytes: count(2),
        completed_unix_ms: ms(3),
        counts,
        attempts: count(5),
        retries: count(6),
        cpu_seconds_used: row.get(7),
        cpu_measured_attempts: count(8),
        first_job_started_unix_ms: ms(9),
        last_job_ended_unix_ms: ms(10),
        first_run: count(11),
        last_run: count(12),
        record_lfn,
        request_id: text(14),
        submitter: text(15),
        vo: text(16),
        profile: text(17),
        profile_sha256: text(18),
        fingerprint: text(19),
        software: domain::record::software_versions(&parameters),
        parameters,
        installation: if dispatched_backend.is_empty() {
            text(21)
        } else {
            dispatched_backend
        },
        installations,
        destinations: row.get::<_, Option<Vec<String>>>(22).unwrap_or_default(),
        submitted_unix_ms: ms(23),
        accepted_unix_ms: ms(24),
        job_total,
        estimate,
        datasets,
        replicas,
        parent_production_ids: links.0,
        child_production_ids: links.1,
    }))
}

/// Up to `limit` finished productions whose record is due as a file (ready,
/// with the request known, not written yet), locked; others' are skipped.
pub async fn records_due(tx: &Transaction<'_>, limit: i64) -> anyhow::Result<Vec<String>> {
    Ok(tx
        .query_cached(
            &format!(
                "SELECT p.production_id FROM productions p
                 WHERE p.record_lfn IS NULL AND {RECORD_READY}
                   AND EXISTS (SELECT 1 FROM accepted_requests a WHERE a.production_id = p.production_id)
                 ORDER BY p.production_id LIMIT $1
                 FOR UPDATE OF p SKIP LOCKED"
            ),
            &[&limit],
        )
        .await
        .context("finding records due")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The first output LFN of a production (its record is catalogued beside it).
pub async fn first_output_lfn(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<Option<String>> {
    Ok(tx
        .query_opt_cached(
            "SELECT lfn FROM files WHERE production_id = $1 ORDER BY lfn LIMIT 1",
            &[&production_id],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The metadata every file of a production shares (each key all of them
/// carry with one value): what its record file carries, so that, say, a
/// Rucio destination files it in the same dataset as the outputs.
pub async fn common_metadata(
    tx: &Transaction<'_>,
    production_id: &str,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let row = tx
        .query_one_cached(
            "SELECT COALESCE(jsonb_object_agg(key, value), '{}')
             FROM (SELECT e.key, min(e.value::text)::jsonb AS value
                   FROM files f, jsonb_each(f.metadata) AS e
                   WHERE f.production_id = $1
                   GROUP BY e.key
                   HAVING count(DISTINCT e.value) = 1
                      AND count(*) = (SELECT count(*) FROM files WHERE production_id = $1)) AS common",
            &[&production_id],
        )
        .await
        .context("reading the metadata a production's files share")?;
    Ok(match row.get::<_, serde_json::Value>(0) {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    })
}

/// Registers a production's record file (outside its running totals, which
/// count its outputs), with a pending replica on each destination the
/// production forwards to, and notes it on the production's record.
pub async fn register_record_file(
    tx: &Transaction<'_>,
    file: &pb::OutputFile,
    metadata: &serde_json::Value,
) -> anyhow::Result<()> {
    let size = file.size.min(i64::MAX as u64) as i64;
    // Its own class: a record shares no run with the outputs.
    let class = classes_of(tx, &[file.production_id.as_str()], &[metadata.to_string()]).await?[0];
    tx.execute_cached(
        &format!(
            "WITH added AS (
                 INSERT INTO files (lfn, production_id, job_index, attempt, size, adler32, url,
                                    metadata, class_id)
                 VALUES ($1, $2, 0, 0, $3, $4, $5, $6, $7)
                 ON CONFLICT (lfn) DO NOTHING
                 RETURNING lfn, size, class_id),
             added_runs AS (SELECT lfn, size, class_id, NULL::bigint AS run FROM added)
             {CLASS_FIGURES}"
        ),
        &[
            &file.lfn,
            &file.production_id,
            &size,
            &file.adler32,
            &file.url,
            metadata,
            &class,
        ],
    )
    .await
    .context("registering the record's file")?;
    let forwarded = tx
        .execute_cached(
            "INSERT INTO replicas (lfn, destination, production_id)
             SELECT $1, d, fw.production_id FROM forwarding fw, unnest(fw.destinations) AS d
             WHERE fw.production_id = $2
             ON CONFLICT DO NOTHING",
            &[&file.lfn, &file.production_id],
        )
        .await?;
    tx.execute_cached(
        "UPDATE productions SET record_lfn = $2 WHERE production_id = $1",
        &[&file.production_id, &file.lfn],
    )
    .await?;
    if forwarded > 0 {
        wake_forwarders(tx).await?;
    }
    // A production is finished only with its record catalogued: look again.
    forwarding_changed(tx, &[file.production_id.as_str()]).await?;
    Ok(())
}

/// Moves the files of classes that hold a value the profiles now call each
/// file's own (a run key added since they were registered, or files from
/// before classes whose profiles name another run key) into the classes
/// they belong to, a hundred classes a transaction: until then a condition
/// on that key, asked of each file's own values, would miss them. Returns
/// how many files moved.
pub async fn reclassify(db: &Db, types: &KeyTypes) -> anyhow::Result<u64> {
    let keys: Vec<&str> = types.1.iter().map(String::as_str).collect();
    let mut moved = 0u64;
    if keys.is_empty() {
        return Ok(moved);
    }
    loop {
        let mut client = db.client().await?;
        let tx = client.transaction().await?;
        let stale: Vec<i64> = tx
            .query(
                "SELECT class_id FROM file_classes WHERE metadata ?| $1::text[]
                 ORDER BY class_id LIMIT 100 FOR UPDATE SKIP LOCKED",
                &[&keys],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if stale.is_empty() {
            return Ok(moved);
        }
        let files = tx
            .query(
                "SELECT lfn, production_id, metadata FROM files WHERE class_id = ANY($1)
                 ORDER BY lfn",
                &[&stale],
            )
            .await?;
        let (mut lfns, mut productions, mut shared, mut owns) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in &files {
            let serde_json::Value::Object(metadata) = row.get::<_, serde_json::Value>(2) else {
                continue;
            };
            let (class, own) = types.split(metadata);
            lfns.push(row.get::<_, String>(0));
            productions.push(row.get::<_, String>(1));
            shared.push(serde_json::to_string(&class)?);
            owns.push(serde_json::to_string(&own)?);
        }
        let production_refs: Vec<&str> = productions.iter().map(String::as_str).collect();
        let classes = classes_of(&tx, &production_refs, &shared).await?;
        tx.execute(
            "UPDATE files f SET class_id = u.class_id, own = u.own::jsonb
             FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u (lfn, class_id, own)
             WHERE f.lfn = u.lfn",
            &[&lfns, &classes, &owns],
        )
        .await?;
        // The figures of the classes the files went to, from all their files.
        tx.execute(
            "UPDATE file_classes c SET file_count = a.n, total_bytes = a.bytes, max_run = a.max_run,
                    min_lfn = a.min_lfn, max_lfn = a.max_lfn, first_lfns = a.first_lfns
             FROM (SELECT f.class_id, count(*) AS n, sum(f.size) AS bytes, max(r.run)::bigint AS max_run,
                          min(f.lfn) AS min_lfn, max(f.lfn) AS max_lfn,
                          (array_agg(f.lfn ORDER BY f.lfn))[1:3] AS first_lfns
                   FROM files f
                   LEFT JOIN LATERAL (SELECT max((e.value #>> '{}')::numeric) AS run
                                      FROM jsonb_each(f.own) AS e
                                      WHERE jsonb_typeof(e.value) = 'number') AS r ON true
                   WHERE f.class_id = ANY($1)
                   GROUP BY f.class_id) AS a
             WHERE c.class_id = a.class_id",
            &[&classes],
        )
        .await?;
        tx.execute(
            "DELETE FROM file_classes c WHERE c.class_id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM files f WHERE f.class_id = c.class_id)",
            &[&stale],
        )
        .await?;
        tx.commit().await?;
        moved += lfns.len() as u64;
    }
}

/// A finished production's jobs in one final state on one installation.
pub struct PlacedJobs<'a> {
    pub installation: &'a str,
    pub state: prodsys_core::JobState,
    pub n: u64,
}

/// Records where a production's jobs ran (the same rows again change nothing).
pub async fn record_installations(
    tx: &Transaction<'_>,
    production_id: &str,
    placed: &[PlacedJobs<'_>],
) -> anyhow::Result<()> {
    if placed.is_empty() {
        return Ok(());
    }
    let installations: Vec<&str> = placed.iter().map(|p| p.installation).collect();
    let states: Vec<&str> = placed.iter().map(|p| p.state.as_str()).collect();
    let counts: Vec<i64> = placed.iter().map(|p| p.n as i64).collect();
    tx.execute_cached(
        "INSERT INTO record_installations (production_id, installation, state, n)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (production_id, installation, state) DO UPDATE SET n = EXCLUDED.n",
        &[&production_id, &installations, &states, &counts],
    )
    .await
    .context("recording jobs per installation")?;
    Ok(())
}

/// Where a production's jobs ran: (installation, final state, jobs), by
/// installation and state; rows of a state this version does not know are left out.
pub async fn installations<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<Vec<(String, prodsys_core::JobState, u64)>> {
    Ok(client
        .query_cached(
            "SELECT installation, state, n FROM record_installations
             WHERE production_id = $1 ORDER BY installation, state",
            &[&production_id],
        )
        .await
        .context("reading jobs per installation")?
        .iter()
        .filter_map(|row| {
            let state = row.get::<_, &str>(1).parse().ok()?;
            Some((row.get(0), state, row.get::<_, i64>(2).max(0) as u64))
        })
        .collect())
}
