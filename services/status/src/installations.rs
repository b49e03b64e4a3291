//! Jobs per WMS installation: a production naming a group of installations
//! (or `any`) has its jobs spread over several; its snapshot says how many
//! are on each, in which state, from counters kept with each job's latest
//! transition.

use prodsys_proto as pb;

use crate::{domain, store};

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
    let rows = store::installation_counts(client, &ids).await?;
    for p in productions.iter_mut() {
        let mine = rows
            .iter()
            .filter(|r| r.production_id == p.production_id)
            .map(|r| (r.installation.as_str(), r.state.as_str(), r.n));
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
