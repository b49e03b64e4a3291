//! Jobs per WMS installation: a production naming a group of installations
//! (or `any`) has its jobs spread over several; its snapshot says how many
//! are on each, in which state, from counters kept with each job's latest
//! transition.

use anyhow::Context;
use prodsys_db::Cached;
use prodsys_proto as pb;

use crate::domain;

/// Fills `installations` of `productions` from the read model.
pub async fn attach(
    client: &prodsys_db::deadpool_postgres::Object,
    productions: &mut [pb::Production],
) -> anyhow::Result<()> {
    if productions.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = productions
        .iter()
        .map(|p| p.production_id.as_str())
        .collect();
    let rows = client
        .query_cached(
            "SELECT production_id, installation, state, n FROM installation_job_counts
             WHERE production_id = ANY($1) AND n > 0
             ORDER BY production_id, installation, state",
            &[&ids],
        )
        .await
        .context("reading jobs per installation")?;
    for p in productions.iter_mut() {
        let mine = rows
            .iter()
            .filter(|r| r.get::<_, &str>(0) == p.production_id)
            .map(|r| (r.get::<_, &str>(1), r.get::<_, &str>(2), r.get::<_, i64>(3)));
        p.installations = domain::per_installation(mine)
            .into_iter()
            .map(|(installation, counts)| pb::InstallationJobs {
                installation,
                counts: Some(counts.into()),
                ..Default::default()
            })
            .collect();
    }
    Ok(())
}
