//! Where a finished production's jobs ran: the jobs per WMS installation
//! that `production.completed` tells, kept beside the production's record
//! and read into it (its JSON, Markdown and RO-Crate, and the API's field).

use anyhow::Context;
use prodsys_core::JobCounts;
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_proto as pb;

use crate::domain::record::{JobRange, Placement};

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
    let ranges: Vec<(String, serde_json::Value, bool)> = completed
        .installations
        .iter()
        .filter(|i| !i.jobs.is_empty())
        .map(|i| {
            let jobs: Vec<JobRange> = i
                .jobs
                .iter()
                .map(|r| JobRange {
                    first: r.first,
                    last: r.last,
                })
                .collect();
            Ok((
                i.installation.clone(),
                serde_json::to_value(jobs)?,
                i.jobs_truncated,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    crate::store::record_job_ranges(tx, &completed.production_id, &ranges).await?;
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

/// Where a production's jobs ran, as `production.completed` told it: per
/// installation (in name order), its jobs by final state.
pub async fn read<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<Vec<Placement>> {
    let rows = client
        .query_cached(
            "SELECT installation, state, n FROM record_installations
             WHERE production_id = $1 ORDER BY installation, state",
            &[&production_id],
        )
        .await
        .context("reading jobs per installation")?;
    let mut ranges = crate::store::job_ranges(client, production_id).await?;
    let mut by: std::collections::BTreeMap<String, JobCounts> = Default::default();
    for row in &rows {
        if let Ok(state) = row.get::<_, &str>(1).parse() {
            by.entry(row.get(0))
                .or_default()
                .add(state, row.get::<_, i64>(2).max(0) as u64);
        }
    }
    Ok(by
        .into_iter()
        .map(|(installation, counts)| {
            let (jobs, jobs_truncated) = ranges.remove(&installation).unwrap_or_default();
            Placement {
                installation,
                counts,
                jobs,
                jobs_truncated,
            }
        })
        .collect())
}

/// A record's jobs per installation as the API answers them.
pub fn to_proto(installations: &[Placement]) -> Vec<pb::InstallationJobs> {
    installations
        .iter()
        .map(|p| pb::InstallationJobs {
            installation: p.installation.clone(),
            counts: Some(p.counts.into()),
            jobs: p
                .jobs
                .iter()
                .map(|r| pb::JobRange {
                    first: r.first,
                    last: r.last,
                })
                .collect(),
            jobs_truncated: p.jobs_truncated,
        })
        .collect()
}
