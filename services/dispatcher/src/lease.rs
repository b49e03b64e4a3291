//! One scheduler per installation at a time, however many dispatcher
//! replicas run: a lease row per installation (`installation_leases`), held
//! by one owner (a dispatcher process) until it expires. The holder renews it
//! every third of its time to live; another replica takes it only once it has
//! expired, by PostgreSQL's clock. Every scheduler transaction that changes
//! jobs first checks, under a share lock on the row, that the lease is still
//! its own ([`Lease::fence`]): a replica that lost it changes nothing, and
//! the new owner cannot take it while such a transaction is open.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prodsys_db::Db;
use prodsys_db::deadpool_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::store;

/// Why a scheduler transaction was refused: the lease is no longer this replica's.
#[derive(Debug)]
pub struct LeaseLost {
    pub installation: String,
}

impl std::fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this dispatcher no longer holds the lease of installation {}",
            self.installation
        )
    }
}

impl std::error::Error for LeaseLost {}

/// How a renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// Another owner holds it.
    Refused,
    /// The database did not answer.
    Failed,
}

/// Until when the holder may act after a renewal sent at `sent` ended as
/// `renewal`, or `None` if it must stop now. A renewal the database did not
/// answer keeps the lease only while a third of its time to live remains, so
/// a holder cut off from the database stops well before another may take over.
pub fn held_until(
    renewal: Renewal,
    sent: Instant,
    valid_until: Instant,
    ttl: Duration,
    now: Instant,
) -> Option<Instant> {
    match renewal {
        Renewal::Renewed => Some(sent + ttl),
        Renewal::Refused => None,
        Renewal::Failed => (now + ttl / 3 < valid_until).then_some(valid_until),
    }
}

/// The lease of one installation, as one owner sees it.
pub struct Lease {
    db: Db,
    installation: String,
    owner: String,
    ttl: Duration,
    /// Cancelled when the lease is lost; replaced when it is taken again.
    held: Mutex<CancellationToken>,
}

impl Lease {
    pub fn new(db: Db, installation: &str, owner: &str, ttl: Duration) -> Self {
        let lost = CancellationToken::new();
        lost.cancel();
        Self {
            db,
            installation: installation.to_string(),
            owner: owner.to_string(),
            ttl: ttl.max(Duration::from_millis(30)),
            held: Mutex::new(lost),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Takes the lease if it is free, expired, or already ours (then renews
    /// it). `Some(previous owner)` when it is ours now.
    pub async fn acquire(&self) -> anyhow::Result<Option<Option<String>>> {
        let client = self.db.client().await?;
        store::acquire_lease(
            &client,
            &self.installation,
            &self.owner,
            self.ttl.as_secs_f64(),
        )
        .await
    }

    /// Gives the lease up (graceful shutdown), so a successor takes over at once.
    pub async fn release(&self) -> anyhow::Result<()> {
        self.held_token().cancel();
        let client = self.db.client().await?;
        store::release_lease(&client, &self.installation, &self.owner).await
    }

    /// Fails with [`LeaseLost`] unless the lease is ours and unexpired; holds
    /// a share lock on it until `tx` ends, so nobody takes it meanwhile.
    pub async fn fence(&self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if store::hold_lease(tx, &self.installation, &self.owner).await? {
            return Ok(());
        }
        self.held_token().cancel();
        Err(LeaseLost {
            installation: self.installation.clone(),
        }
        .into())
    }

    fn held_token(&self) -> CancellationToken {
        self.held
            .lock()
            .map(|t| t.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Whether the lease was lost (or never taken) since [`Lease::hold`].
    pub fn lost(&self) -> bool {
        self.held_token().is_cancelled()
    }

    /// Marks the lease taken: a token cancelled when it is lost or when
    /// `shutdown` is cancelled, kept alive by [`Lease::heartbeat`].
    pub fn hold(&self, shutdown: &CancellationToken) -> CancellationToken {
        let token = shutdown.child_token();
        match self.held.lock() {
            Ok(mut held) => *held = token.clone(),
            Err(poisoned) => *poisoned.into_inner() = token.clone(),
        }
        token
    }

    /// Renews the lease every third of its time to live until `held` is
    /// cancelled; cancels `held` as soon as the lease is lost.
    pub async fn heartbeat(&self, held: CancellationToken, taken_at: Instant) {
        let mut valid_until = taken_at + self.ttl;
        loop {
            tokio::select! {
                _ = held.cancelled() => return,
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
            let sent = Instant::now();
            let renewal = match self.acquire().await {
                Ok(Some(_)) => Renewal::Renewed,
                Ok(None) => Renewal::Refused,
                Err(error) => {
                    tracing::warn!(installation = %self.installation, error = format!("{error:#}"),
                        "renewing the installation's lease failed");
                    Renewal::Failed
                }
            };
            match held_until(renewal, sent, valid_until, self.ttl, Instant::now()) {
                Some(until) => valid_until = until,
                None => {
                    tracing::warn!(installation = %self.installation, owner = %self.owner, ?renewal,
                        "lost the installation's lease; its scheduler stops");
                    held.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_lease_lasts_its_ttl_from_when_the_renewal_was_sent() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(9);
        let sent = t0 + Duration::from_secs(3);
        let until = held_until(
            Renewal::Renewed,
            sent,
            t0 + ttl,
            ttl,
            sent + Duration::from_secs(1),
        );
        assert_eq!(until, Some(sent + ttl), "from the send, not the answer");
    }

    #[test]
    fn a_lease_another_owner_holds_is_given_up_at_once() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(9);
        assert_eq!(held_until(Renewal::Refused, t0, t0 + ttl, ttl, t0), None);
    }

    #[test]
    fn a_holder_cut_off_from_the_database_stops_before_its_lease_can_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(9);
        let valid = t0 + ttl;
        // One missed renewal: still held, no longer than before.
        assert_eq!(
            held_until(
                Renewal::Failed,
                t0 + Duration::from_secs(3),
                valid,
                ttl,
                t0 + Duration::from_secs(3)
            ),
            Some(valid)
        );
        // Two: a third of the ttl left is too little; stop.
        assert_eq!(
            held_until(
                Renewal::Failed,
                t0 + Duration::from_secs(6),
                valid,
                ttl,
                t0 + Duration::from_secs(6)
            ),
            None
        );
    }
}
