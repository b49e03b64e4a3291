//! Where a finished production's jobs ran: the jobs per WMS installation
//! that `production.completed` tells, kept beside the production's record
//! and read into it (its JSON, Markdown and RO-Crate, and the API's field).

use prodsys_core::JobCounts;
use prodsys_db::deadpool_postgres::{GenericClient, Transaction};
use prodsys_proto as pb;

use crate::domain::record::{JobRange, Placement};
use crate::store;

/// Records the jobs per installation a `production.completed` tells (the
/// same event again changes nothing).
pub async fn record(
    tx: &Transaction<'_>,
    completed: &pb::ProductionCompleted,
) -> anyhow::Result<()> {
    let mut placed = Vec::new();
    for i in &completed.installations {
        let by_state = JobCounts::from(i.counts.unwrap_or_default());
        for (state, n) in by_state.by_state() {
            if n > 0 {
                placed.push(store::PlacedJobs {
                    installation: &i.installation,
                    state,
                    n,
                });
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
    store::record_job_ranges(tx, &completed.production_id, &ranges).await?;
    store::record_installations(tx, &completed.production_id, &placed).await
}

/// Where a production's jobs ran, as `production.completed` told it: per
/// installation (in name order), its jobs by final state and which jobs.
pub async fn read<C: GenericClient + Sync>(
    client: &C,
    production_id: &str,
) -> anyhow::Result<Vec<Placement>> {
    let counted = store::installations(client, production_id).await?;
    let mut ranges = store::job_ranges(client, production_id).await?;
    let mut by: std::collections::BTreeMap<String, JobCounts> = Default::default();
    for (installation, state, n) in counted {
        by.entry(installation).or_default().add(state, n);
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
