//! [`RefusalLog`]: refused handshakes are logged without letting a flood of
//! them (spoofable garbage, a misconfigured node retrying) flood the log.
//!
//! At most `burst` refusals per `interval` are logged at WARN; the rest are
//! counted and logged at DEBUG, and the next WARN line says how many were
//! suppressed since the last one. The totals are kept for metrics.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ha_core::ratelimit::Burst;
pub use ha_core::ratelimit::Verdict;
use parking_lot::Mutex;

/// Why a connection was refused, as counted for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The TLS handshake failed (a certificate not from the cluster CA,
    /// expired, not a member's, no certificate, a protocol error).
    Handshake,
    /// It authenticated but names no member (or no node at all).
    Identity,
    /// The handshake did not finish in time.
    Timeout,
    /// Too many handshakes in progress, or the address did not validate.
    Overload,
}

impl Reason {
    /// Every reason, in the order [`RefusalLog::by_reason`] reports them.
    pub const ALL: [Reason; 4] = [
        Reason::Handshake,
        Reason::Identity,
        Reason::Timeout,
        Reason::Overload,
    ];

    /// Its name as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Handshake => "handshake",
            Reason::Identity => "identity",
            Reason::Timeout => "timeout",
            Reason::Overload => "overload",
        }
    }
}

/// A rate limit on the WARN lines of refused connections.
#[derive(Debug)]
pub struct RefusalLog {
    burst: Burst,
    /// Guards nothing but [`wait_for`](Self::wait_for)'s condition variable.
    waiters: Mutex<()>,
    refused: AtomicU64,
    by_reason: [AtomicU64; 4],
    suppressed: AtomicU64,
    /// Woken on every refusal (for [`wait_for`](Self::wait_for)).
    counted: parking_lot::Condvar,
}

impl Default for RefusalLog {
    /// Five WARN lines per second.
    fn default() -> Self {
        RefusalLog::new(Duration::from_secs(1), 5)
    }
}

impl RefusalLog {
    /// At most `burst` WARN lines per `interval`.
    pub fn new(interval: Duration, burst: u32) -> Self {
        RefusalLog {
            burst: Burst::new(interval, burst),
            waiters: Mutex::new(()),
            refused: AtomicU64::new(0),
            by_reason: Default::default(),
            suppressed: AtomicU64::new(0),
            counted: parking_lot::Condvar::new(),
        }
    }

    /// Counts one refusal at `now` and says whether to log it.
    pub fn admit(&self, now: Instant) -> Verdict {
        let verdict = self.burst.admit(now);
        if verdict == Verdict::Suppress {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        {
            let _w = self.waiters.lock();
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.counted.notify_all();
        verdict
    }

    /// Logs one refused connection from `remote` (rate-limited) and counts it
    /// under `reason`.
    pub fn refused(&self, remote: &dyn Display, reason: Reason, why: &dyn Display) {
        let k = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.by_reason[k].fetch_add(1, Ordering::Relaxed);
        match self.admit(Instant::now()) {
            Verdict::Log { suppressed: 0 } => {
                tracing::warn!(%remote, "refused a connection: {why}");
            }
            Verdict::Log { suppressed } => {
                tracing::warn!(%remote, suppressed, "refused a connection: {why} ({suppressed} similar refusals not logged)");
            }
            Verdict::Suppress => tracing::debug!(%remote, "refused a connection: {why}"),
        }
    }

    /// Refusals by reason since start (those counted through
    /// [`refused`](Self::refused)).
    pub fn by_reason(&self) -> [(Reason, u64); 4] {
        std::array::from_fn(|k| (Reason::ALL[k], self.by_reason[k].load(Ordering::Relaxed)))
    }

    /// Refusals counted since start.
    pub fn total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Blocks until at least `n` refusals were counted or `timeout` passed;
    /// true in the first case (for tests: an explicit signal, no polling).
    pub fn wait_for(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut w = self.waiters.lock();
        while self.refused.load(Ordering::Relaxed) < n {
            if self.counted.wait_until(&mut w, deadline).timed_out() {
                return self.refused.load(Ordering::Relaxed) >= n;
            }
        }
        true
    }

    /// Refusals not logged at WARN since start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_a_burst_per_interval_and_reports_what_it_suppressed() {
        let log = RefusalLog::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..1000).map(|_| log.admit(t0)).collect();
        let logged = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Log { .. }))
            .count();
        assert_eq!(
            logged, 3,
            "a thousand refusals in one instant log three lines"
        );
        assert_eq!(log.suppressed(), 997);
        // Within the interval still suppressed; after it, logged with the count.
        assert_eq!(
            log.admit(t0 + Duration::from_millis(999)),
            Verdict::Suppress
        );
        assert_eq!(
            log.admit(t0 + Duration::from_secs(1)),
            Verdict::Log { suppressed: 998 }
        );
        assert_eq!(
            log.admit(t0 + Duration::from_secs(1)),
            Verdict::Log { suppressed: 0 }
        );
        assert_eq!(log.total(), 1003);
    }
}
