//! Every SQL statement of intake, and the outbox rows it writes.

use anyhow::Context;
use prodsys_core::Violation;
use prodsys_core::events::{PRODUCTION_CANCEL, REQUEST_RECEIVED};
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Cached, Db, OutboxEvent};
use prodsys_proto as pb;
use prodsys_server::outbox_event;
use uuid::Uuid;

use crate::domain::{self, Earlier, NewRequest, Stored, Submission, Verdicts};
use crate::error::{IntakeError, Result};

/// One submission's answer from a group commit.
pub type Answer = Result<Stored>;

/// Stores a group of submissions (the group commit's writer); every one
/// fails alike when the transaction does.
pub async fn write_group(db: &Db, group: Vec<Submission>) -> Vec<Answer> {
    match store_submissions(db, &group).await {
        Ok(answers) => answers,
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                requests = group.len(),
                "storing submitted requests failed"
            );
            group
                .iter()
                .map(|_| {
                    Err(IntakeError::Unexpected(anyhow::anyhow!(
                        "storing the request failed: {error:#}"
                    )))
                })
                .collect()
        }
    }
}

/// Stores a group of checked submissions in one transaction; one answer per
/// submission, in order, once the transaction committed.
pub async fn store_submissions(db: &Db, submissions: &[Submission]) -> anyhow::Result<Vec<Answer>> {
    let mut client = db.client().await?;
    let tx = client.transaction().await.context("begin")?;
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(submissions.len());
    let mut events = Vec::new();
    // Requests without an idempotency key cannot meet an earlier one: all of
    // them go in with one statement. Those with a key, one by one below.
    let mut keyless = KeylessRequests::default();
    for s in submissions {
        if !s.idempotency_key.is_empty() {
            answers.push(None);
            continue;
        }
        let new = NewRequest::from_submission(s, Uuid::now_v7());
        let request_id = new.request_id;
        events.push(received_event(&new));
        keyless.push(&new);
        tracing::info!(%request_id, profile = %s.profile, vo = %s.vo, "request received");
        answers.push(Some(Ok(Stored {
            request_id,
            replayed: false,
        })));
    }
    keyless.insert(&tx).await?;
    for (s, answer) in submissions.iter().zip(answers.iter_mut()) {
        if answer.is_some() {
            continue;
        }
        let new = NewRequest::from_submission(s, Uuid::now_v7());
        // A key used earlier in this group is found too: the transaction sees its own rows.
        if !insert_request(&tx, &new).await? {
            let earlier = earlier_request(&tx, &s.idempotency_key).await?;
            *answer = Some(domain::replay(s, &earlier).map_err(IntakeError::Conflict));
            continue;
        }
        events.push(received_event(&new));
        tracing::info!(request_id = %new.request_id, profile = %s.profile, vo = %s.vo, "request received");
        *answer = Some(Ok(Stored {
            request_id: new.request_id,
            replayed: false,
        }));
    }
    prodsys_db::enqueue(&tx, db, &events).await?;
    tx.commit().await.context("commit")?;
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every submission answered"))
        .collect())
}

/// The request stored under an idempotency key.
async fn earlier_request(tx: &Transaction<'_>, key: &str) -> anyhow::Result<Earlier> {
    let row = tx
        .query_one_cached(
            "SELECT request_id, profile, parameters FROM requests WHERE idempotency_key = $1",
            &[&key],
        )
        .await
        .context("reading the earlier request")?;
    Ok(Earlier {
        request_id: row.get(0),
        profile: row.get(1),
        parameters: row.get(2),
    })
}

/// Requests without an idempotency key, column by column for one insert.
#[derive(Default)]
struct KeylessRequests<'a> {
    ids: Vec<Uuid>,
    profiles: Vec<&'a str>,
    vos: Vec<&'a str>,
    parameters: Vec<&'a serde_json::Value>,
    backends: Vec<&'a str>,
    submitters: Vec<&'a str>,
    owners: Vec<Option<&'a str>>,
    extend: Vec<bool>,
    reuse_existing: Vec<bool>,
    priorities: Vec<i32>,
    forward: Vec<String>,
    forward_replace: Vec<bool>,
}

impl<'a> KeylessRequests<'a> {
    fn push(&mut self, r: &NewRequest<'a>) {
        self.ids.push(r.request_id);
        self.profiles.push(r.profile);
        self.vos.push(r.vo);
        self.parameters.push(r.parameters);
        self.backends.push(r.backend);
        self.submitters.push(r.submitter);
        self.owners.push(r.owner);
        self.extend.push(r.extend);
        self.reuse_existing.push(r.reuse_existing);
        self.priorities.push(r.priority);
        // As a text array literal: unnest cannot take an array of arrays of
        // different lengths.
        self.forward.push(text_array(r.forward));
        self.forward_replace.push(r.forward_replace);
    }

    async fn insert(&self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO requests (request_id, profile, vo, parameters, backend, submitter,
                                   extend, reuse_existing, priority, forward, forward_replace,
                                   state, owner)
             SELECT i, p, v, params, b, s, e, r, pr, f::text[], fr, 'RECEIVED', o
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[], $6::text[],
                         $7::bool[], $8::bool[], $9::int4[], $10::text[], $11::bool[], $12::text[])
                  AS u (i, p, v, params, b, s, e, r, pr, f, fr, o)",
            &[
                &self.ids,
                &self.profiles,
                &self.vos,
                &self.parameters,
                &self.backends,
                &self.submitters,
                &self.extend,
                &self.reuse_existing,
                &self.priorities,
                &self.forward,
                &self.forward_replace,
                &self.owners,
            ],
        )
        .await
        .context("storing the requests")?;
        Ok(())
    }
}

/// Stores `r` unless its idempotency key is known; false when it was.
pub async fn insert_request(tx: &Transaction<'_>, r: &NewRequest<'_>) -> anyhow::Result<bool> {
    let state = r.state();
    let inserted = tx
        .query_opt_cached(
            "INSERT INTO requests (request_id, idempotency_key, profile, vo, parameters, backend, submitter,
                                   extend, correlation_id, reply_to, state, violations, reuse_existing,
                                   priority, forward, forward_replace, owner)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING request_id",
            &[
                &r.request_id,
                &r.idempotency_key,
                &r.profile,
                &r.vo,
                r.parameters,
                &r.backend,
                &r.submitter,
                &r.extend,
                &r.correlation_id,
                &r.reply_to,
                &state,
                &serde_json::to_value(r.violations)?,
                &r.reuse_existing,
                &r.priority,
                &r.forward,
                &r.forward_replace,
                &r.owner,
            ],
        )
        .await
        .context("storing the request")?;
    Ok(inserted.is_some())
}

/// A stored request as `GetRequest` shows it.
pub struct RequestRow {
    pub profile: String,
    pub vo: String,
    pub parameters: serde_json::Value,
    pub backend: String,
    pub state: String,
    pub production_id: Option<String>,
    pub violations: Vec<Violation>,
    pub existing_production_id: Option<String>,
    pub created: chrono::DateTime<chrono::Utc>,
    /// A period's request: what became of each of its pointings.
    pub productions: Vec<domain::PointingOutcome>,
}

/// The request `id`, if there is one.
pub async fn request(db: &Db, id: Uuid) -> anyhow::Result<Option<RequestRow>> {
    let client = db.client().await?;
    let row = client
        .query_opt_cached(
            "SELECT profile, vo, parameters, backend, state, production_id, violations,
                    existing_production_id, created_at, productions
             FROM requests WHERE request_id = $1",
            &[&id],
        )
        .await
        .context("reading the request")?;
    Ok(row.map(|row| RequestRow {
        profile: row.get(0),
        vo: row.get(1),
        parameters: row.get(2),
        backend: row.get(3),
        state: row.get(4),
        production_id: row.get(5),
        violations: serde_json::from_value(row.get(6)).unwrap_or_default(),
        existing_production_id: row.get(7),
        created: row.get(8),
        productions: serde_json::from_value(row.get(9)).unwrap_or_default(),
    }))
}

/// The VO of the request that made `production_id` (its own, or one of a
/// period's pointings) and the owner recorded with it, if intake knows it.
pub async fn production_owner(
    db: &Db,
    production_id: &str,
) -> anyhow::Result<Option<(String, Option<String>)>> {
    let client = db.client().await?;
    let row = client
        .query_opt_cached(
            "SELECT vo, owner FROM requests
             WHERE production_id = $1
                OR productions @> jsonb_build_array(jsonb_build_object('production_id', $1::text))
             LIMIT 1",
            &[&production_id],
        )
        .await
        .context("reading the owner of the production")?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// Announces a cancellation of `production_id` through the outbox.
pub async fn request_cancel(db: &Db, production_id: &str, reason: String) -> Result<()> {
    let event = pb::ProductionCancel {
        production_id: production_id.to_string(),
        reason,
    };
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(anyhow::Error::from)?;
    prodsys_db::enqueue(
        &tx,
        db,
        &[outbox_event(PRODUCTION_CANCEL, production_id, &event)],
    )
    .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    Ok(())
}

/// A verdict recorded on a request whose publisher asked for an answer.
pub struct Recorded {
    pub request_id: Uuid,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// Records every verdict on a request still waiting for one, with one
/// statement; returns the requests it changed.
pub async fn record_verdicts(
    tx: &Transaction<'_>,
    verdicts: &Verdicts<'_>,
) -> anyhow::Result<Vec<Recorded>> {
    if verdicts.is_empty() {
        return Ok(Vec::new());
    }
    let states = verdicts.states();
    let violations = verdicts
        .violations
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let rows = tx
        .query_cached(
            "UPDATE requests r SET state = v.state, production_id = NULLIF(v.production_id, ''),
                    violations = v.violations, existing_production_id = NULLIF(v.existing, ''),
                    productions = v.productions, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[], $6::jsonb[])
                  AS v (request_id, state, production_id, violations, existing, productions)
             WHERE r.request_id = v.request_id AND r.state = 'RECEIVED'
             RETURNING r.request_id, r.reply_to, r.correlation_id",
            &[
                &verdicts.request_ids,
                &states,
                &verdicts.production_ids,
                &violations,
                &verdicts.existing,
                &verdicts.productions,
            ],
        )
        .await
        .context("recording verdicts")?;
    Ok(rows
        .into_iter()
        .map(|row| Recorded {
            request_id: row.get(0),
            reply_to: row.get(1),
            correlation_id: row.get(2),
        })
        .collect())
}

/// The event announcing a stored request.
pub fn received_event(r: &NewRequest<'_>) -> OutboxEvent {
    let event = pb::RequestReceived {
        request_id: r.request_id.to_string(),
        profile: r.profile.to_string(),
        vo: r.vo.to_string(),
        parameters_json: r.parameters.to_string(),
        backend: r.backend.to_string(),
        submitter: r.submitter.to_string(),
        correlation_id: r.correlation_id.unwrap_or_default().to_string(),
        extend: r.extend,
        reuse_existing: r.reuse_existing,
        priority: r.priority,
        forward: r.forward.to_vec(),
        forward_replace: r.forward_replace,
    };
    outbox_event(REQUEST_RECEIVED, &r.request_id.to_string(), &event)
}

/// A JSON answer (see [`domain::reply_body`]) to the queue an event publisher
/// named in `reply_to`.
pub fn reply(
    reply_to: &str,
    request_id: Uuid,
    body: serde_json::Value,
) -> anyhow::Result<OutboxEvent> {
    let outcome = body["outcome"].as_str().unwrap_or_default().to_string();
    Ok(OutboxEvent {
        event_id: Uuid::now_v7(),
        event_type: format!("request.{outcome}"),
        subject: request_id.to_string(),
        payload: serde_json::to_vec(&body)?,
        reply_to: Some(reply_to.to_string()),
        content_type: "application/json".into(),
    })
}

/// `names` as a PostgreSQL array literal (`{"a","b"}`).
fn text_array(names: &[String]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// Marks the requests of productions that ended: they no longer count
/// against their VO's limits.
pub async fn productions_ended(
    tx: &Transaction<'_>,
    production_ids: &[&str],
) -> anyhow::Result<()> {
    if production_ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "UPDATE requests SET ended_at = now()
         WHERE production_id = ANY($1) AND ended_at IS NULL",
        &[&production_ids],
    )
    .await
    .context("marking ended productions")?;
    Ok(())
}

/// What a VO has admitted and not yet finished: requests, and their jobs
/// as each profile splits them (`splits`: profile, total field, per-job field).
pub async fn vo_load(
    db: &Db,
    vo: &str,
    splits: &[(String, String, String)],
) -> anyhow::Result<domain::VoLoad> {
    let profiles: Vec<&str> = splits.iter().map(|s| s.0.as_str()).collect();
    let totals: Vec<&str> = splits.iter().map(|s| s.1.as_str()).collect();
    let per_job: Vec<&str> = splits.iter().map(|s| s.2.as_str()).collect();
    let client = db.client().await?;
    let row = client
        .query_one(
            "SELECT count(*),
                    coalesce(sum(CASE
                        WHEN jsonb_typeof(r.parameters -> s.total) = 'number'
                         AND jsonb_typeof(r.parameters -> s.per_job) = 'number'
                         AND (r.parameters ->> s.per_job)::numeric > 0
                        THEN ceil((r.parameters ->> s.total)::numeric
                                  / (r.parameters ->> s.per_job)::numeric)
                        ELSE 0 END), 0)::bigint
             FROM requests r
             LEFT JOIN unnest($2::text[], $3::text[], $4::text[]) AS s(profile, total, per_job)
                    ON s.profile = r.profile
             WHERE r.vo = $1 AND r.ended_at IS NULL AND r.state IN ('RECEIVED', 'ACCEPTED')
               AND coalesce(r.existing_production_id, '') = ''",
            &[&vo, &profiles, &totals, &per_job],
        )
        .await
        .context("reading the VO's admitted requests")?;
    Ok(domain::VoLoad {
        productions: row.get::<_, i64>(0) as u64,
        jobs: row.get::<_, i64>(1) as u64,
    })
}
