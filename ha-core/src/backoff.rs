//! [`Backoff`]: reconnect pacing, exponential with jitter, shared by the driver
//! and every transport.
//!
//! The jitter comes from a seeded generator (never from the wall clock or an
//! address), so a run is reproducible from its seeds; [`Backoff::seed_for`]
//! derives a seed per node pair, so two nodes that lost each other at the same
//! moment do not retry in lockstep.

use std::time::Duration;

use tokio::time::Instant;

use crate::types::NodeId;

/// Reconnect pacing for one peer.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// The current step; zero while the last attempt succeeded.
    step: Duration,
    /// No new attempt before this instant.
    retry_at: Option<Instant>,
    /// xorshift state for the jitter (never zero).
    rng: u64,
}

impl Backoff {
    /// Pacing between `base` and `max` (raised to `base` if smaller), with
    /// jitter drawn from `seed`.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            base,
            max: max.max(base),
            step: Duration::ZERO,
            retry_at: None,
            rng: seed | 1,
        }
    }

    /// A seed for the pacing of `local`'s attempts to reach `peer`, mixed with
    /// `salt` (a node's configured seed).
    pub fn seed_for(local: NodeId, peer: NodeId, salt: u64) -> u64 {
        salt ^ peer.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ local.0.rotate_left(32)
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Records a failed attempt at `now`: the step doubles from `base` up to
    /// `max`, and the next attempt waits a random time in `[step / 2, step]`
    /// (never below `base`). Returns that wait.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.step = if self.step.is_zero() {
            self.base
        } else {
            self.step.saturating_mul(2).min(self.max)
        };
        let half = self.step / 2;
        let span = u64::try_from(half.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let jitter = Duration::from_nanos(self.random() % span);
        let wait = (half + jitter).clamp(self.base, self.max);
        self.retry_at = Some(now.checked_add(wait).unwrap_or(now));
        wait
    }

    /// Records a successful attempt: the next failure starts from `base`.
    pub fn succeeded(&mut self) {
        self.step = Duration::ZERO;
        self.retry_at = None;
    }

    /// How long an attempt at `now` must still wait, if at all.
    pub fn wait_left(&self, now: Instant) -> Option<Duration> {
        self.retry_at
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// The delay before the next attempt of a task that re-dials a lost
    /// connection: what is left of the wait after a failure, else `base`.
    pub fn delay(&self, now: Instant) -> Duration {
        self.wait_left(now).unwrap_or(self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_maximum_and_reset_on_success() {
        let (base, max) = (Duration::from_millis(20), Duration::from_secs(1));
        let mut b = Backoff::new(base, max, 7);
        let now = Instant::now();
        let mut ceiling = base;
        for _ in 0..12 {
            let w = b.failed(now);
            assert!(
                w >= base && w <= ceiling,
                "{w:?} outside [{base:?}, {ceiling:?}]"
            );
            assert_eq!(b.wait_left(now), Some(w));
            ceiling = (ceiling * 2).min(max);
        }
        assert!(b.failed(now) >= max / 2);
        b.succeeded();
        assert_eq!(b.wait_left(now), None);
        assert_eq!(b.delay(now), base);
        assert_eq!(
            b.failed(now),
            base,
            "the first failure after a success waits base"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_waits_and_pairs_differ() {
        let (base, max) = (Duration::from_millis(10), Duration::from_secs(5));
        let now = Instant::now();
        let waits = |seed| {
            let mut b = Backoff::new(base, max, seed);
            (0..10).map(|_| b.failed(now)).collect::<Vec<_>>()
        };
        let a = Backoff::seed_for(NodeId(1), NodeId(2), 0);
        let b = Backoff::seed_for(NodeId(2), NodeId(1), 0);
        assert_eq!(waits(a), waits(a));
        assert_ne!(
            waits(a),
            waits(b),
            "the two ends of a pair do not retry in lockstep"
        );
    }
}
