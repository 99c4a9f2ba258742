//! [`RefusalLog`]: refused handshakes are logged without letting a flood of
//! them (spoofable garbage, a misconfigured node retrying) flood the log.
//!
//! At most `burst` refusals per `interval` are logged at WARN; the rest are
//! counted and logged at DEBUG, and the next WARN line says how many were
//! suppressed since the last one. The totals are kept for metrics.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What [`RefusalLog::admit`] decided for one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it at WARN, with the count of refusals suppressed before it.
    Log {
        /// Refusals not logged at WARN since the last one that was.
        suppressed: u64,
    },
    /// Over the rate: count it only.
    Suppress,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// A rate limit on the WARN lines of refused connections.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    burst: u32,
    window: Mutex<Window>,
    refused: AtomicU64,
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
            interval,
            burst: burst.max(1),
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
            refused: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            counted: parking_lot::Condvar::new(),
        }
    }

    /// Counts one refusal at `now` and says whether to log it.
    pub fn admit(&self, now: Instant) -> Verdict {
        let mut w = self.window.lock();
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.counted.notify_all();
        let fresh = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.interval);
        if fresh {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            Verdict::Suppress
        }
    }

    /// Logs one refused connection from `remote` (rate-limited).
    pub fn refused(&self, remote: &dyn Display, why: &dyn Display) {
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

    /// Refusals counted since start.
    pub fn total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Blocks until at least `n` refusals were counted or `timeout` passed;
    /// true in the first case (for tests: an explicit signal, no polling).
    pub fn wait_for(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut w = self.window.lock();
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
