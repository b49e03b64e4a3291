//! Every SQL statement of the checker.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context;
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use uuid::Uuid;

use prodsys_core::container::ResolvedTemplate;

use crate::domain::{Accepted, Known, Lookups, Neighbourhood, Recorded};

/// Takes the locks under which decisions for the given ID prefixes' keys
/// (see [`crate::domain::decide_lock_key`]) are taken, until `tx` ends; in
/// the order given, which callers sort, so two batches cannot each hold what
/// the other wants.
pub async fn lock_prefixes(tx: &Transaction<'_>, keys: &[i64]) -> anyhow::Result<()> {
    if !keys.is_empty() {
        tx.execute_cached(
            "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k",
            &[&keys],
        )
        .await?;
    }
    Ok(())
}

/// The productions that share a fingerprint, a base fingerprint or a
/// file-base fingerprint with `lookups`, read with one statement.
pub async fn neighbourhood(
    tx: &Transaction<'_>,
    lookups: &Lookups,
) -> anyhow::Result<Neighbourhood> {
    let mut known = Neighbourhood::default();
    if lookups.is_empty() {
        return Ok(known);
    }
    // Two index scans, not one OR: a generic plan for an OR of two
    // ANY(array) conditions scans the whole table once it has grown.
    // Until the table is first analysed, the planner takes each base
    // fingerprint to match half a percent of it, and a batch's hundred
    // of them most of it: a whole-table scan (50 ms a batch at 40,000
    // productions). Both lookups are only ever index probes.
    tx.batch_execute("SET LOCAL enable_seqscan = off").await?;
    let mut seen = HashSet::new();
    let rows = tx
        .query_cached(
            "SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
             FROM productions WHERE fingerprint = ANY($1)
             UNION ALL
             SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
             FROM productions WHERE base_fingerprint = ANY($2)
             UNION ALL
             SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
             FROM productions WHERE file_base = ANY($3)",
            &[&lookups.fingerprints, &lookups.bases, &lookups.file_bases],
        )
        .await?;
    tx.batch_execute("RESET enable_seqscan").await?;
    if !lookups.parents.is_empty() {
        for row in tx
            .query_cached(
                "SELECT production_id, profile, parameters FROM productions
                 WHERE production_id = ANY($1)",
                &[&lookups.parents],
            )
            .await?
        {
            known.add_parent(row.get(0), row.get(1), row.get(2));
        }
    }
    for row in rows {
        if !seen.insert(row.get::<_, String>(0)) {
            continue;
        }
        let file_base: String = row.get(5);
        known.add(
            row.get(2),
            (!file_base.is_empty()).then_some(file_base),
            Known {
                production_id: row.get(0),
                fingerprint: row.get(1),
                parameters: row.get(3),
                last_run: row.get(4),
            },
        );
    }
    Ok(known)
}

/// The VO of each of `production_ids` this checker gave (the others are
/// not in the answer).
pub async fn production_vos(
    tx: &Transaction<'_>,
    production_ids: &[String],
) -> anyhow::Result<HashMap<String, String>> {
    if production_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query_cached(
            "SELECT production_id, vo FROM productions WHERE production_id = ANY($1)",
            &[&production_ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Takes `wanted` numbers from each ID prefix's sequence; returns the first
/// of each prefix's numbers.
pub async fn take_numbers(
    tx: &Transaction<'_>,
    wanted: BTreeMap<&str, i64>,
) -> anyhow::Result<HashMap<String, i64>> {
    let mut next = HashMap::new();
    if wanted.is_empty() {
        return Ok(next);
    }
    let (prefixes, counts): (Vec<&str>, Vec<i64>) = wanted.into_iter().unzip();
    for row in tx
        .query_cached(
            "INSERT INTO id_prefix_sequences (id_prefix, last)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (id_prefix) DO UPDATE SET last = id_prefix_sequences.last + EXCLUDED.last
             RETURNING id_prefix, last",
            &[&prefixes, &counts],
        )
        .await?
    {
        let prefix: String = row.get(0);
        let last: i64 = row.get(1);
        let count = counts[prefixes
            .iter()
            .position(|p| *p == prefix)
            .expect("asked for")];
        next.insert(prefix, last - count + 1);
    }
    Ok(next)
}

/// Accepted productions of one batch, column by column for one insert.
#[derive(Default)]
pub struct NewProductions {
    ids: Vec<String>,
    fingerprints: Vec<String>,
    request_ids: Vec<Uuid>,
    profiles: Vec<String>,
    vos: Vec<String>,
    parameters: Vec<serde_json::Value>,
    backends: Vec<String>,
    offsets: Vec<i64>,
    bases: Vec<String>,
    last_runs: Vec<i64>,
    file_bases: Vec<String>,
}

/// One accepted production, as stored.
pub struct NewProduction<'a> {
    pub production_id: &'a str,
    pub fingerprint: &'a str,
    pub request_id: Uuid,
    pub profile: &'a str,
    pub vo: &'a str,
    pub backend: &'a str,
}

impl NewProductions {
    pub fn push(&mut self, p: NewProduction<'_>, accepted: Accepted<'_>) {
        self.ids.push(p.production_id.to_string());
        self.fingerprints.push(p.fingerprint.to_string());
        self.request_ids.push(p.request_id);
        self.profiles.push(p.profile.to_string());
        self.vos.push(p.vo.to_string());
        self.backends.push(p.backend.to_string());
        self.offsets.push(accepted.run_number_offset);
        self.bases.push(accepted.base_fingerprint);
        self.file_bases.push(accepted.file_base.unwrap_or_default());
        self.last_runs.push(accepted.last_run);
        self.parameters.push(accepted.parameters);
    }

    pub async fn insert(self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO productions
                 (production_id, fingerprint, request_id, profile, vo, parameters, backend,
                  run_number_offset, base_fingerprint, last_run, file_base)
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                                  $6::jsonb[], $7::text[], $8::bigint[], $9::text[], $10::bigint[],
                                  $11::text[])",
            &[
                &self.ids,
                &self.fingerprints,
                &self.request_ids,
                &self.profiles,
                &self.vos,
                &self.parameters,
                &self.backends,
                &self.offsets,
                &self.bases,
                &self.last_runs,
                &self.file_bases,
            ],
        )
        .await
        .context("storing the productions")?;
        Ok(())
    }
}

/// The recorded derivations of these names.
pub async fn recorded_templates(db: &prodsys_db::Db, names: &[String]) -> anyhow::Result<Recorded> {
    let mut recorded = Recorded::new();
    if names.is_empty() {
        return Ok(recorded);
    }
    let client = db.client().await?;
    let rows = client
        .query_cached(
            "SELECT name, definition FROM derived_templates WHERE name = ANY($1)",
            &[&names],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        match serde_json::from_value(row.get(1)) {
            Ok(template) => {
                recorded.insert(name, template);
            }
            Err(error) => tracing::warn!(%name, %error, "a recorded template cannot be read"),
        }
    }
    Ok(recorded)
}

/// Name → version of the recorded derivations of these names, read inside
/// the decision's transaction.
pub async fn taken_template_names(
    tx: &Transaction<'_>,
    names: &[&str],
) -> anyhow::Result<HashMap<String, String>> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(tx
        .query_cached(
            "SELECT name, version FROM derived_templates WHERE name = ANY($1)",
            &[&names],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

/// Records derivations under their names (template, profile, the production
/// that recorded it); a name recorded already keeps its first definition.
pub async fn record_derivations(
    tx: &Transaction<'_>,
    derivations: &[(ResolvedTemplate, String, String)],
) -> anyhow::Result<()> {
    for (template, profile, production_id) in derivations {
        tx.execute_cached(
            "INSERT INTO derived_templates (name, profile, version, definition, recorded_by)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
            &[
                &template.name,
                profile,
                &template.version,
                &serde_json::to_value(template)?,
                production_id,
            ],
        )
        .await
        .context("recording a derived template")?;
    }
    Ok(())
}

/// The recorded derivations (of `profile` and named `name` when not empty),
/// with their profile and when they were recorded (Unix ms).
pub async fn derived_templates(
    db: &prodsys_db::Db,
    profile: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, ResolvedTemplate, i64)>> {
    let client = db.client().await?;
    let rows = client
        .query_cached(
            "SELECT profile, definition, recorded_at FROM derived_templates
             WHERE ($1 = '' OR profile = $1) AND ($2 = '' OR name = $2) ORDER BY name",
            &[&profile, &name],
        )
        .await?;
    let mut templates = Vec::new();
    for row in rows {
        let Ok(template) = serde_json::from_value::<ResolvedTemplate>(row.get(1)) else {
            continue;
        };
        let at: chrono::DateTime<chrono::Utc> = row.get(2);
        templates.push((row.get(0), template, at.timestamp_millis()));
    }
    Ok(templates)
}
