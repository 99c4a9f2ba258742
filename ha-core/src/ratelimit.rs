//! [`Burst`]: a rate limit on repeated log lines. A burst of the same error (a
//! refused connection, a failing accept, a client hammering a refused
//! endpoint) logs its first few lines per interval; the rest are counted, and
//! the next line logged says how many were suppressed before it.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What [`Burst::admit`] decided for one occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, with the count of occurrences suppressed before it.
    Log {
        /// Occurrences not logged since the last one that was.
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

/// At most `burst` lines per `interval`; the rest counted.
#[derive(Debug)]
pub struct Burst {
    interval: Duration,
    burst: u32,
    window: Mutex<Window>,
}

impl Default for Burst {
    /// Five lines per second.
    fn default() -> Self {
        Burst::new(Duration::from_secs(1), 5)
    }
}

impl Burst {
    /// At most `burst` (at least 1) lines per `interval`.
    pub fn new(interval: Duration, burst: u32) -> Self {
        Burst {
            interval,
            burst: burst.max(1),
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Counts one occurrence at `now` and says whether to log it.
    pub fn admit(&self, now: Instant) -> Verdict {
        let mut w = self.window.lock();
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
            Verdict::Suppress
        }
    }

    /// [`admit`](Self::admit) now.
    pub fn admit_now(&self) -> Verdict {
        self.admit(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_its_first_lines_then_reports_what_it_suppressed() {
        let b = Burst::new(Duration::from_secs(1), 2);
        let t = Instant::now();
        assert_eq!(b.admit(t), Verdict::Log { suppressed: 0 });
        assert_eq!(b.admit(t), Verdict::Log { suppressed: 0 });
        assert_eq!(b.admit(t), Verdict::Suppress);
        assert_eq!(b.admit(t + Duration::from_millis(999)), Verdict::Suppress);
        // A new window: the first line carries the count.
        assert_eq!(
            b.admit(t + Duration::from_secs(1)),
            Verdict::Log { suppressed: 2 }
        );
        assert_eq!(
            b.admit(t + Duration::from_secs(1)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
