//! The counters a node keeps about itself ([`Metrics`]), bumped by the engine
//! task and read by any handle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::histogram::{Histogram, HistogramReading};
use crate::observe::Observation;
use crate::types::NodeId;

/// Counters a node keeps about itself, read with [`Node::metrics`](super::Node::metrics).
#[derive(Clone, Debug, Default, PartialEq)]
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
    /// What the node saw of elections, fences and the like.
    pub cluster: ClusterCounters,
    /// Bytes of WAL entries sent to peers (by their approximate encoded size).
    pub wal_bytes_sent: u64,
    /// Snapshot chunk bytes sent to peers.
    pub snapshot_bytes_sent: u64,
    /// Snapshot transfers whose last chunk was sent.
    pub snapshots_sent: u64,
    /// Round trips of answered heartbeats, per peer.
    pub heartbeat_rtt: Vec<(NodeId, HistogramReading)>,
    /// Durations of snapshot transfers received, first chunk to last.
    pub snapshot_transfer: Option<HistogramReading>,
}

/// Counts of cluster events (see [`Observation`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCounters {
    /// Pre-vote rounds this node started.
    pub pre_votes_started: u64,
    /// Real elections (vote rounds) this node started.
    pub elections_started: u64,
    /// Elections this node won.
    pub elections_won: u64,
    /// Campaigns of this node that ran out of time (either round).
    pub elections_lost: u64,
    /// Promotions without votes.
    pub forced_promotions: u64,
    /// Pre-vote answers this node's campaigns got refused.
    pub pre_votes_refused: u64,
    /// Votes (real round) this node granted to candidates.
    pub votes_granted: u64,
    /// Votes (real round) this node refused.
    pub votes_refused: u64,
    /// Pre-votes this node refused to candidates.
    pub pre_votes_denied: u64,
    /// Changes of the primary this node knows to another node.
    pub leader_changes: u64,
    /// Fences this primary sent.
    pub fences_sent: u64,
    /// Fences this node obeyed.
    pub fences_received: u64,
    /// Periods of degraded sync this primary entered.
    pub degraded_periods: u64,
    /// Switchovers this primary started.
    pub switchovers: u64,
}

impl ClusterCounters {
    /// Counts one observation.
    pub fn count(&mut self, o: &Observation) {
        match o {
            Observation::ElectionStarted { pre_vote: true, .. } => self.pre_votes_started += 1,
            Observation::ElectionStarted {
                pre_vote: false, ..
            } => self.elections_started += 1,
            Observation::ElectionWon { .. } => self.elections_won += 1,
            Observation::ElectionLost { .. } => self.elections_lost += 1,
            Observation::ForcedPromotion { .. } => self.forced_promotions += 1,
            Observation::VoteReceived {
                pre_vote: true,
                granted: false,
                ..
            } => self.pre_votes_refused += 1,
            Observation::VoteCast {
                pre_vote, granted, ..
            } => match (pre_vote, granted) {
                (false, true) => self.votes_granted += 1,
                (false, false) => self.votes_refused += 1,
                (true, false) => self.pre_votes_denied += 1,
                (true, true) => {}
            },
            Observation::FenceSent { .. } => self.fences_sent += 1,
            Observation::FenceReceived { .. } => self.fences_received += 1,
            Observation::DegradedEntered { .. } => self.degraded_periods += 1,
            Observation::SwitchoverStarted { .. } => self.switchovers += 1,
            _ => {}
        }
    }
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
    /// Counted on the engine task only; read by any handle.
    cluster: parking_lot::Mutex<ClusterCounters>,
    wal_bytes_sent: AtomicU64,
    snapshot_bytes_sent: AtomicU64,
    snapshots_sent: AtomicU64,
    heartbeat_rtt: Vec<(NodeId, Histogram)>,
    snapshot_transfer: Option<Histogram>,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Counters for a node with these peers.
    pub(super) fn new(peers: impl IntoIterator<Item = NodeId>) -> Self {
        Counters {
            heartbeat_rtt: peers
                .into_iter()
                .map(|p| (p, Histogram::durations()))
                .collect(),
            snapshot_transfer: Some(Histogram::durations()),
            ..Counters::default()
        }
    }
    pub(super) fn observed(&self, o: &Observation) {
        self.cluster.lock().count(o);
        if let (Observation::SnapshotInstalled { took_ms, .. }, Some(h)) =
            (o, &self.snapshot_transfer)
        {
            h.record_duration(Duration::from_millis(*took_ms));
        }
    }
    pub(super) fn leader_changed(&self) {
        self.cluster.lock().leader_changes += 1;
    }
    pub(super) fn add_wal_bytes_sent(&self, n: u64) {
        bump(&self.wal_bytes_sent, n)
    }
    pub(super) fn add_snapshot_chunk_sent(&self, bytes: u64, last: bool) {
        bump(&self.snapshot_bytes_sent, bytes);
        if last {
            bump(&self.snapshots_sent, 1)
        }
    }
    pub(super) fn record_heartbeat_rtt(&self, peer: NodeId, rtt: Duration) {
        if let Some((_, h)) = self.heartbeat_rtt.iter().find(|(p, _)| *p == peer) {
            h.record_duration(rtt);
        }
    }
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
            cluster: *self.cluster.lock(),
            wal_bytes_sent: r(&self.wal_bytes_sent),
            snapshot_bytes_sent: r(&self.snapshot_bytes_sent),
            snapshots_sent: r(&self.snapshots_sent),
            heartbeat_rtt: self
                .heartbeat_rtt
                .iter()
                .map(|(p, h)| (*p, h.read()))
                .collect(),
            snapshot_transfer: self.snapshot_transfer.as_ref().map(Histogram::read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Term;

    #[test]
    fn observations_are_counted_by_kind_and_round() {
        let c = Counters::new([NodeId(2)]);
        let term = Term::ZERO;
        for o in [
            Observation::ElectionStarted {
                term,
                pre_vote: true,
                cause: crate::observe::ElectionCause::Timer,
            },
            Observation::VoteReceived {
                term,
                from: NodeId(2),
                pre_vote: true,
                granted: false,
            },
            Observation::VoteCast {
                term,
                candidate: NodeId(2),
                pre_vote: false,
                granted: true,
            },
            Observation::FenceReceived {
                from: NodeId(2),
                term,
            },
        ] {
            c.observed(&o);
        }
        c.record_heartbeat_rtt(NodeId(2), Duration::from_millis(1));
        c.record_heartbeat_rtt(NodeId(9), Duration::from_millis(1));
        let m = c.read();
        assert_eq!(m.cluster.pre_votes_started, 1);
        assert_eq!(m.cluster.elections_started, 0);
        assert_eq!(m.cluster.pre_votes_refused, 1);
        assert_eq!(m.cluster.votes_granted, 1);
        assert_eq!(m.cluster.fences_received, 1);
        assert_eq!(m.heartbeat_rtt.len(), 1, "only configured peers");
        assert_eq!(m.heartbeat_rtt[0].1.count(), 1);
    }

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
