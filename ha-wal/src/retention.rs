//! [`Retention`]: how much log to keep behind the snapshot for a lagging standby.
//!
//! A primary may purge the log up to its latest snapshot, but a standby that lags
//! behind then needs the whole snapshot instead of a few entries. The policy keeps
//! what a standby still needs (like a replication slot), plus a configurable tail,
//! and caps both with a hard maximum so that a dead standby cannot fill the disk
//! (like `max_slot_wal_keep_size`).

use ha_core::types::LogIndex;

/// What the retention policy needs to know about a log.
pub trait RetainedLog {
    /// The index of the first entry the log holds (the compacted prefix plus one).
    fn first_index(&self) -> LogIndex;
    /// The index of the last entry (`first_index - 1` if the log is empty).
    fn last_index(&self) -> LogIndex;
    /// The bytes held by the entries with an index greater than `index` (all of
    /// them for an index below the first one, zero at or past the last). It never
    /// grows as `index` grows.
    fn bytes_after(&self, index: LogIndex) -> u64;
}

/// How far `purge_prefix` may go.
///
/// The limit is computed in three steps:
/// 1. *Soft limit*: the snapshot index, lowered so that at least `keep_entries`
///    entries and `keep_bytes` bytes stay in the log, and lowered to the standby's
///    match index (the entries it does not hold yet stay).
/// 2. *Hard limit*: whatever the soft limit says, the log after purging holds at
///    most `max_entries` entries and `max_bytes` bytes; a standby that lags more
///    than that will need a snapshot.
/// 3. Never past the snapshot (entries no snapshot covers are never purged, even
///    if that exceeds the maximum) and never past the last entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Keep at least this many of the latest entries (0: none).
    pub keep_entries: u64,
    /// Keep at least this many bytes of the latest entries (0: none).
    pub keep_bytes: u64,
    /// Keep at most this many entries for the sake of a lagging standby.
    pub max_entries: u64,
    /// Keep at most this many bytes for the sake of a lagging standby.
    pub max_bytes: u64,
}

impl Default for Retention {
    /// Keeps 10,000 entries or 64 MiB, whichever is more, and whatever the standby
    /// still needs up to 1,000,000 entries or 4 GiB.
    fn default() -> Self {
        Retention {
            keep_entries: 10_000,
            keep_bytes: 64 << 20,
            max_entries: 1_000_000,
            max_bytes: 4 << 30,
        }
    }
}

impl Retention {
    /// The index up to which `purge_prefix` may go, or `None` if nothing should be
    /// purged now.
    ///
    /// `snapshot` is the index of the latest durable snapshot; `standby_match` the
    /// highest index the standby is known to hold (`None` if there is no standby to
    /// keep entries for).
    pub fn purge_upto(
        &self,
        snapshot: LogIndex,
        standby_match: Option<LogIndex>,
        log: &impl RetainedLog,
    ) -> Option<LogIndex> {
        let base = log.first_index().0.saturating_sub(1);
        let last = log.last_index().0.max(base);

        // Soft limit: keep a tail, and what the standby does not hold yet.
        let mut soft = snapshot.0;
        soft = soft.min(last.saturating_sub(self.keep_entries));
        if self.keep_bytes > 0 {
            // The largest index whose following entries hold at least keep_bytes.
            let i = largest_at_least(base, last, self.keep_bytes, log);
            soft = soft.min(i);
        }
        if let Some(m) = standby_match {
            soft = soft.min(m.0);
        }

        // Hard limit: the most the log may keep after purging.
        let by_entries = last.saturating_sub(self.max_entries);
        let by_bytes = smallest_at_most(base, last, self.max_bytes, log);
        let hard = by_entries.max(by_bytes);

        let upto = soft.max(hard).min(snapshot.0).min(last);
        (upto > base).then_some(LogIndex(upto))
    }
}

/// The largest `i` in `[base, last]` with `bytes_after(i) >= want`, or `base` if
/// there is none.
fn largest_at_least(base: u64, last: u64, want: u64, log: &impl RetainedLog) -> u64 {
    if log.bytes_after(LogIndex(base)) < want {
        return base;
    }
    // Invariant: bytes_after(lo) >= want; hi is past the answer.
    let (mut lo, mut hi) = (base, last.saturating_add(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if log.bytes_after(LogIndex(mid)) >= want {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The smallest `i` in `[base, last]` with `bytes_after(i) <= limit` (`last` always
/// qualifies).
fn smallest_at_most(base: u64, last: u64, limit: u64, log: &impl RetainedLog) -> u64 {
    if log.bytes_after(LogIndex(base)) <= limit {
        return base;
    }
    // Invariant: bytes_after(lo) > limit, bytes_after(hi) <= limit.
    let (mut lo, mut hi) = (base, last);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if log.bytes_after(LogIndex(mid)) <= limit {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Entries `first..=last`, each `size` bytes.
    struct Uniform {
        first: u64,
        last: u64,
        size: u64,
    }

    impl RetainedLog for Uniform {
        fn first_index(&self) -> LogIndex {
            LogIndex(self.first)
        }
        fn last_index(&self) -> LogIndex {
            LogIndex(self.last)
        }
        fn bytes_after(&self, index: LogIndex) -> u64 {
            let from = index.0.max(self.first - 1);
            self.last.saturating_sub(from) * self.size
        }
    }

    fn policy(keep_entries: u64, keep_bytes: u64, max_entries: u64, max_bytes: u64) -> Retention {
        Retention {
            keep_entries,
            keep_bytes,
            max_entries,
            max_bytes,
        }
    }

    const LOG: Uniform = Uniform {
        first: 1,
        last: 1000,
        size: 10,
    };

    #[test]
    fn never_past_the_snapshot() {
        let r = policy(0, 0, u64::MAX, u64::MAX);
        assert_eq!(r.purge_upto(LogIndex(500), None, &LOG), Some(LogIndex(500)));
        // Even when the maximum says the log is too big.
        let r = policy(0, 0, 10, 100);
        assert_eq!(r.purge_upto(LogIndex(500), None, &LOG), Some(LogIndex(500)));
        assert_eq!(r.purge_upto(LogIndex(0), None, &LOG), None);
    }

    #[test]
    fn keeps_a_tail_of_entries_and_bytes() {
        let r = policy(100, 0, u64::MAX, u64::MAX);
        assert_eq!(
            r.purge_upto(LogIndex(1000), None, &LOG),
            Some(LogIndex(900))
        );
        // 2,000 bytes are the last 200 entries.
        let r = policy(100, 2000, u64::MAX, u64::MAX);
        assert_eq!(
            r.purge_upto(LogIndex(1000), None, &LOG),
            Some(LogIndex(800))
        );
        // A log smaller than the tail is not purged.
        let r = policy(5000, 0, u64::MAX, u64::MAX);
        assert_eq!(r.purge_upto(LogIndex(1000), None, &LOG), None);
        let r = policy(0, 1 << 20, u64::MAX, u64::MAX);
        assert_eq!(r.purge_upto(LogIndex(1000), None, &LOG), None);
    }

    #[test]
    fn keeps_what_a_lagging_standby_needs() {
        let r = policy(10, 0, u64::MAX, u64::MAX);
        assert_eq!(
            r.purge_upto(LogIndex(900), Some(LogIndex(300)), &LOG),
            Some(LogIndex(300))
        );
        // A standby ahead of the snapshot does not let the purge pass the snapshot.
        assert_eq!(
            r.purge_upto(LogIndex(900), Some(LogIndex(1000)), &LOG),
            Some(LogIndex(900))
        );
    }

    #[test]
    fn a_dead_standby_cannot_hold_more_than_the_maximum() {
        // The standby is stuck at 0; at most 400 entries (and 5,000 bytes = 500
        // entries) may be kept for it: the entry cap binds.
        let r = policy(10, 0, 400, 5000);
        assert_eq!(
            r.purge_upto(LogIndex(900), Some(LogIndex(0)), &LOG),
            Some(LogIndex(600))
        );
        // Now the byte cap binds: 3,000 bytes = 300 entries.
        let r = policy(10, 0, 400, 3000);
        assert_eq!(
            r.purge_upto(LogIndex(900), Some(LogIndex(0)), &LOG),
            Some(LogIndex(700))
        );
        // The cap also wins over the tail to keep.
        let r = policy(900, 0, 400, u64::MAX);
        assert_eq!(
            r.purge_upto(LogIndex(900), Some(LogIndex(0)), &LOG),
            Some(LogIndex(600))
        );
        // But never past the snapshot.
        assert_eq!(
            r.purge_upto(LogIndex(100), Some(LogIndex(0)), &LOG),
            Some(LogIndex(100))
        );
    }

    #[test]
    fn nothing_below_the_log_start() {
        let log = Uniform {
            first: 501,
            last: 1000,
            size: 10,
        };
        let r = policy(0, 0, u64::MAX, u64::MAX);
        assert_eq!(r.purge_upto(LogIndex(400), None, &log), None);
        assert_eq!(r.purge_upto(LogIndex(500), None, &log), None);
        assert_eq!(r.purge_upto(LogIndex(501), None, &log), Some(LogIndex(501)));
        let empty = Uniform {
            first: 1,
            last: 0,
            size: 10,
        };
        assert_eq!(r.purge_upto(LogIndex(0), None, &empty), None);
        // Never past the last entry, even with a snapshot beyond it.
        assert_eq!(r.purge_upto(LogIndex(7), None, &empty), None);
        assert_eq!(
            r.purge_upto(LogIndex(2000), None, &LOG),
            Some(LogIndex(1000))
        );
    }

    #[test]
    fn matches_a_linear_scan() {
        // Brute force over small logs and policies.
        for last in [0u64, 1, 7, 40] {
            let log = Uniform {
                first: 1,
                last,
                size: 3,
            };
            for keep_entries in [0, 1, 5, 50] {
                for keep_bytes in [0, 1, 10, 200] {
                    for max_entries in [0, 3, 100] {
                        for max_bytes in [0, 4, 30, 1000] {
                            for snap in [0, 3, last] {
                                for standby in [None, Some(0), Some(2), Some(last)] {
                                    let r =
                                        policy(keep_entries, keep_bytes, max_entries, max_bytes);
                                    let got =
                                        r.purge_upto(LogIndex(snap), standby.map(LogIndex), &log);
                                    let want = brute(&r, snap, standby, &log);
                                    assert_eq!(
                                        got, want,
                                        "{r:?} snap {snap} standby {standby:?} last {last}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The policy's definition, by brute force.
    fn brute(r: &Retention, snap: u64, standby: Option<u64>, log: &Uniform) -> Option<LogIndex> {
        let base = log.first - 1;
        let last = log.last.max(base);
        let soft = (base..=last)
            .filter(|&i| {
                i <= snap
                    && last - i >= r.keep_entries
                    && (r.keep_bytes == 0 || log.bytes_after(LogIndex(i)) >= r.keep_bytes)
                    && standby.is_none_or(|m| i <= m)
            })
            .max()
            .unwrap_or(base);
        let hard = (base..=last)
            .find(|&i| last - i <= r.max_entries && log.bytes_after(LogIndex(i)) <= r.max_bytes)
            .unwrap_or(last);
        let upto = soft.max(hard).min(snap).min(last);
        (upto > base).then_some(LogIndex(upto))
    }
}
