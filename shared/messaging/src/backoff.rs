//! The one backoff of the workspace: exponential, capped, with jitter, so
//! replicas that lost the same dependency at the same moment do not retry in
//! step. Used by the broker supervisor, the consumers (reconnecting, and
//! retrying a batch held through an outage) and the outbox relay.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits starting near `start`, doubling up to `max`.
    pub fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            next: start,
        }
    }

    /// The next wait: the current step with "equal jitter" (between half of
    /// it and all of it); the step then doubles, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        self.next_wait_with(unit_random())
    }

    /// [`Backoff::next_wait`] with the jitter given: `unit`, in [0, 1],
    /// places the wait between half the step (0) and all of it (1). For
    /// callers that draw the randomness themselves (pure functions, tests).
    pub fn next_wait_with(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.next = self.start;
    }
}

/// A number in [0, 1), from the standard library's randomly keyed hasher
/// (good enough to spread retries; not for anything secret): the jitter
/// [`Backoff::next_wait`] draws.
pub fn unit_random() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps = [100u64, 200, 400, 800, 800, 800];
        for step in steps {
            let wait = backoff.next_wait();
            let step = Duration::from_millis(step);
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn a_given_jitter_places_the_wait_within_its_step() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        assert_eq!(backoff.next_wait_with(0.0), Duration::from_millis(50));
        assert_eq!(backoff.next_wait_with(0.5), Duration::from_millis(150));
        assert_eq!(backoff.next_wait_with(1.0), Duration::from_millis(400));
        assert_eq!(backoff.next_wait_with(7.0), Duration::from_millis(400));
    }

    #[test]
    fn jitter_spreads_waits() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_wait());
        }
        assert!(seen.len() > 5, "{seen:?}");
    }
}
