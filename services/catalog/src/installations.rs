//! Where a finished production's jobs ran: the jobs per WMS installation
//! that `production.completed` tells, kept beside the production's record
//! and added to it when it is asked for.

use anyhow::Context;
use prodsys_core::JobCounts;
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_proto as pb;

/// Records the jobs per installation a `production.completed` tells (the
/// same event again changes nothing).
pub async fn record(
    tx: &Transaction<'_>,
    completed: &pb::ProductionCompleted,
) -> anyhow::Result<()> {
    let mut installations = Vec::new();
    let mut states = Vec::new();
    let mut counts = Vec::new();
    for i in &completed.installations {
        let by_state = JobCounts::from(i.counts.unwrap_or_default());
        for (state, n) in by_state.by_state() {
            if n > 0 {
                installations.push(i.installation.as_str());
                states.push(state.as_str());
                counts.push(n as i64);
            }
        }
    }
    if installations.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "INSERT INTO record_installations (production_id, installation, state, n)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (production_id, installation, state) DO UPDATE SET n = EXCLUDED.n",
        &[&completed.production_id, &installations, &states, &counts],
    )
    .await
    .context("recording jobs per installation")?;
    Ok(())
}

/// Fills `installations` of a production's record.
pub async fn attach<C: GenericClient + Sync>(
    client: &C,
    record: &mut pb::ProductionRecord,
) -> anyhow::Result<()> {
    let rows = client
        .query_cached(
            "SELECT installation, state, n FROM record_installations
             WHERE production_id = $1 ORDER BY installation, state",
            &[&record.production_id],
        )
        .await
        .context("reading jobs per installation")?;
    let mut by: std::collections::BTreeMap<String, JobCounts> = Default::default();
    for row in &rows {
        if let Ok(state) = row.get::<_, &str>(1).parse() {
            by.entry(row.get(0))
                .or_default()
                .add(state, row.get::<_, i64>(2).max(0) as u64);
        }
    }
    record.installations = by
        .into_iter()
        .map(|(installation, counts)| pb::InstallationJobs {
            installation,
            counts: Some(counts.into()),
        })
        .collect();
    Ok(())
}
