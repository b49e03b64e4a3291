//! The forwarding part of the read model: where each production's outputs
//! go, how far the catalog got (per destination), and whether they are all
//! catalogued and there — a production is finished only then.

use anyhow::Context;
use prodsys_core::ProductionState;
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_proto as pb;
use prodsys_proto::StateProto;

/// `production.forwarded` carries the final counts; they outrank every progress report.
const FINAL: i64 = i64::MAX;

/// Records the destinations an accepted production asked for.
pub async fn plan(tx: &Transaction<'_>, m: &pb::RequestAccepted) -> anyhow::Result<()> {
    if m.forward.is_empty() {
        return Ok(());
    }
    tx.execute_cached(
        "INSERT INTO forward_plans (production_id, destinations) VALUES ($1, $2)
         ON CONFLICT (production_id) DO NOTHING",
        &[&m.production_id, &m.forward],
    )
    .await
    .context("recording a forwarding plan")?;
    Ok(())
}

/// Records the counts of a progress report (or, `at_ms` = FINAL, of the end).
async fn counts(
    tx: &Transaction<'_>,
    production_id: &str,
    destinations: &[pb::DestinationProgress],
    at_ms: i64,
) -> anyhow::Result<()> {
    for d in destinations {
        tx.execute_cached(
            "INSERT INTO forwarding (production_id, destination, forwarded, total, failing,
                                     held_reason, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (production_id, destination) DO UPDATE SET
                 forwarded = EXCLUDED.forwarded, total = EXCLUDED.total,
                 failing = EXCLUDED.failing, held_reason = EXCLUDED.held_reason,
                 at_ms = EXCLUDED.at_ms
             WHERE forwarding.at_ms <= EXCLUDED.at_ms",
            &[
                &production_id,
                &d.destination,
                &(d.forwarded as i64),
                &(d.total as i64),
                &(d.failing as i64),
                &d.held_reason,
                &at_ms,
            ],
        )
        .await
        .context("recording forwarding progress")?;
    }
    Ok(())
}

pub async fn progress(tx: &Transaction<'_>, m: &pb::ForwardingProgress) -> anyhow::Result<()> {
    counts(tx, &m.production_id, &m.destinations, m.at_unix_ms).await
}

pub async fn forwarded(tx: &Transaction<'_>, m: &pb::ProductionForwarded) -> anyhow::Result<()> {
    counts(tx, &m.production_id, &m.destinations, FINAL).await?;
    tx.execute_cached(
        "INSERT INTO forwarded (production_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&m.production_id],
    )
    .await
    .context("recording a forwarded production")?;
    Ok(())
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
    let rows = client
        .query_cached(
            // A row per destination of each production, or one with no
            // destination for a production without any.
            "SELECT i.id, u.d, COALESCE(f.forwarded, 0), COALESCE(f.total, 0),
                    COALESCE(f.failing, 0), COALESCE(f.held_reason, ''),
                    EXISTS (SELECT FROM forwarded x WHERE x.production_id = i.id)
             FROM unnest($1::text[]) AS i (id)
             LEFT JOIN forward_plans p ON p.production_id = i.id
             LEFT JOIN LATERAL unnest(p.destinations) WITH ORDINALITY AS u (d, n) ON true
             LEFT JOIN forwarding f ON f.production_id = i.id AND f.destination = u.d
             ORDER BY i.id, u.n",
            &[&ids],
        )
        .await
        .context("reading forwarding progress")?;
    for p in productions.iter_mut() {
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.get::<_, &str>(0) == p.production_id)
            .collect();
        p.forwarding = mine
            .iter()
            .filter(|r| r.get::<_, Option<&str>>(1).is_some())
            .map(|r| pb::DestinationProgress {
                destination: r.get(1),
                forwarded: r.get::<_, i64>(2) as u64,
                total: r.get::<_, i64>(3) as u64,
                failing: r.get::<_, i64>(4) as u64,
                held_reason: r.get(5),
            })
            .collect();
        // Announced by the catalog once every output is catalogued and on
        // every destination (a production without any included).
        let forwarded = mine.first().is_some_and(|r| r.get::<_, bool>(6));
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
