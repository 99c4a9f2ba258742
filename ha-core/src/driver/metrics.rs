//! The counters a node keeps about itself ([`Metrics`]), bumped by the engine
//! task and read by any handle.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a node keeps about itself, read with [`Node::metrics`](super::Node::metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Client writes acknowledged.
    pub writes_acked: u64,
    /// Client writes the engine failed (not leader, fenced, ...).
    pub writes_failed: u64,
    /// Linearizable reads served.
    pub reads_served: u64,
    /// Stale reads served from the local state machine.
    pub stale_reads_served: u64,
    /// Changes of role, term or known primary.
    pub role_changes: u64,
    /// Acknowledged writes discarded by a failover (async commit mode only).
    pub discarded: u64,
    /// State-machine snapshots taken and saved.
    pub snapshots_taken: u64,
    /// Requests received from peers.
    pub peer_requests: u64,
    /// Requests to peers that failed in the transport (the engine retries).
    pub send_failures: u64,
    /// Snapshots received from the primary and installed (the log could not
    /// serve this node's catch-up).
    pub snapshots_installed: u64,
    /// Reads of this node's durable log that served a lagging standby's catch-up
    /// (entries older than the in-memory log).
    pub catch_up_reads: u64,
    /// Appends issued to the log store (each made durable as one operation; the
    /// store may group several into one fsync).
    pub appends: u64,
    /// Entries in those appends: `entries_appended / appends` is how well client
    /// writes (on the primary) and WAL batches (on the standby) are batched.
    pub entries_appended: u64,
    /// How late the engine's ticks ran: nothing slow may hold up the timers that
    /// detect a dead primary and keep the lease.
    pub tick_lateness: TickLateness,
}

/// A histogram of how late each engine tick ran after its scheduled time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickLateness {
    /// Ticks per bucket; bucket `k` counts lateness up to
    /// [`TickLateness::BOUNDS_US`]`[k]` microseconds, the last bucket the rest.
    pub buckets: [u64; 7],
    /// The latest tick, in microseconds.
    pub max_us: u64,
}

impl TickLateness {
    /// Upper bounds of the buckets but the last, in microseconds.
    pub const BOUNDS_US: [u64; 6] = [100, 1_000, 5_000, 10_000, 50_000, 100_000];

    /// The bucket a lateness of `us` microseconds falls in.
    pub fn bucket(us: u64) -> usize {
        Self::BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(Self::BOUNDS_US.len())
    }

    /// Ticks recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    writes_acked: AtomicU64,
    writes_failed: AtomicU64,
    reads_served: AtomicU64,
    stale_reads_served: AtomicU64,
    role_changes: AtomicU64,
    discarded: AtomicU64,
    snapshots_taken: AtomicU64,
    peer_requests: AtomicU64,
    send_failures: AtomicU64,
    snapshots_installed: AtomicU64,
    catch_up_reads: AtomicU64,
    appends: AtomicU64,
    entries_appended: AtomicU64,
    tick_buckets: [AtomicU64; 7],
    tick_max_us: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn bump_write_acked(&self) {
        bump(&self.writes_acked, 1)
    }
    pub(super) fn bump_write_failed(&self) {
        bump(&self.writes_failed, 1)
    }
    pub(super) fn bump_read(&self) {
        bump(&self.reads_served, 1)
    }
    pub(super) fn bump_stale_read(&self) {
        bump(&self.stale_reads_served, 1)
    }
    pub(super) fn bump_role_change(&self) {
        bump(&self.role_changes, 1)
    }
    pub(super) fn add_discarded(&self, n: u64) {
        bump(&self.discarded, n)
    }
    pub(super) fn bump_snapshot(&self) {
        bump(&self.snapshots_taken, 1)
    }
    pub(super) fn bump_peer_request(&self) {
        bump(&self.peer_requests, 1)
    }
    pub(super) fn bump_send_failure(&self) {
        bump(&self.send_failures, 1)
    }
    pub(super) fn bump_snapshot_installed(&self) {
        bump(&self.snapshots_installed, 1)
    }
    pub(super) fn bump_catch_up_read(&self) {
        bump(&self.catch_up_reads, 1)
    }
    pub(super) fn add_append(&self, entries: u64) {
        bump(&self.appends, 1);
        bump(&self.entries_appended, entries)
    }
    pub(super) fn record_tick_lateness(&self, late: std::time::Duration) {
        let us = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        bump(&self.tick_buckets[TickLateness::bucket(us)], 1);
        self.tick_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(super) fn read(&self) -> Metrics {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            writes_acked: r(&self.writes_acked),
            writes_failed: r(&self.writes_failed),
            reads_served: r(&self.reads_served),
            stale_reads_served: r(&self.stale_reads_served),
            role_changes: r(&self.role_changes),
            discarded: r(&self.discarded),
            snapshots_taken: r(&self.snapshots_taken),
            peer_requests: r(&self.peer_requests),
            send_failures: r(&self.send_failures),
            snapshots_installed: r(&self.snapshots_installed),
            catch_up_reads: r(&self.catch_up_reads),
            appends: r(&self.appends),
            entries_appended: r(&self.entries_appended),
            tick_lateness: TickLateness {
                buckets: std::array::from_fn(|k| r(&self.tick_buckets[k])),
                max_us: r(&self.tick_max_us),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tick_lateness_falls_in_the_bucket_of_its_bound() {
        assert_eq!(TickLateness::bucket(0), 0);
        assert_eq!(TickLateness::bucket(100), 0);
        assert_eq!(TickLateness::bucket(101), 1);
        assert_eq!(TickLateness::bucket(10_000), 3);
        assert_eq!(TickLateness::bucket(100_001), 6);
        let c = Counters::default();
        c.record_tick_lateness(Duration::from_micros(50));
        c.record_tick_lateness(Duration::from_millis(20));
        c.record_tick_lateness(Duration::from_secs(1));
        let t = c.read().tick_lateness;
        assert_eq!(t.buckets, [1, 0, 0, 0, 1, 0, 1]);
        assert_eq!(t.count(), 3);
        assert_eq!(t.max_us, 1_000_000);
    }
}
