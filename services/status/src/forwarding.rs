//! The forwarding part of the read model: where each production's outputs
//! go, how far the catalog got (per destination), and whether they are all
//! catalogued and there — a production is finished only then.

use prodsys_core::ProductionState;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_proto as pb;
use prodsys_proto::StateProto;

use crate::store;

/// `production.forwarded` carries the final counts; they outrank every progress report.
const FINAL: i64 = i64::MAX;

/// Records the destinations an accepted production asked for.
pub async fn plan(tx: &Transaction<'_>, m: &pb::RequestAccepted) -> anyhow::Result<()> {
    if m.forward.is_empty() {
        return Ok(());
    }
    store::plan_forwarding(tx, &m.production_id, &m.forward).await
}

/// Records the counts of a progress report (or, `at_ms` = FINAL, of the end).
async fn counts(
    tx: &Transaction<'_>,
    production_id: &str,
    destinations: &[pb::DestinationProgress],
    at_ms: i64,
) -> anyhow::Result<()> {
    let destinations: Vec<store::DestinationCounts<'_>> = destinations
        .iter()
        .map(|d| store::DestinationCounts {
            destination: &d.destination,
            forwarded: d.forwarded,
            total: d.total,
            failing: d.failing,
            held_reason: &d.held_reason,
        })
        .collect();
    store::record_forwarding(tx, production_id, &destinations, at_ms).await
}

pub async fn progress(tx: &Transaction<'_>, m: &pb::ForwardingProgress) -> anyhow::Result<()> {
    counts(tx, &m.production_id, &m.destinations, m.at_unix_ms).await
}

pub async fn forwarded(tx: &Transaction<'_>, m: &pb::ProductionForwarded) -> anyhow::Result<()> {
    counts(tx, &m.production_id, &m.destinations, FINAL).await?;
    store::record_forwarded(tx, &m.production_id).await
}

/// Fills `forwarding`, `finished` and (while a destination fails) the held
/// reason of `productions` from the read model.
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
    let rows = store::forwarding(client, &ids).await?;
    for p in productions.iter_mut() {
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.production_id == p.production_id)
            .collect();
        p.forwarding = mine
            .iter()
            .filter_map(|r| {
                Some(pb::DestinationProgress {
                    destination: r.destination.clone()?,
                    forwarded: r.forwarded,
                    total: r.total,
                    failing: r.failing,
                    held_reason: r.held_reason.clone(),
                })
            })
            .collect();
        // Announced by the catalog once every output is catalogued and on
        // every destination (a production without any included).
        let forwarded = mine.first().is_some_and(|r| r.all_forwarded);
        let ended = ProductionState::from_proto(p.state).is_some_and(ProductionState::is_terminal);
        p.finished = ended && forwarded;
        if p.held_reason.is_empty()
            && let Some(failing) = p.forwarding.iter().find(|d| d.failing > 0)
        {
            p.held_reason = format!(
                "held: forwarding to {} is failing for {} file(s) ({}); retried until it succeeds",
                failing.destination, failing.failing, failing.held_reason
            );
        }
    }
    Ok(())
}
