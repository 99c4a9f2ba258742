//! The primary's view of its data peer's replication, as a state machine:
//! where the peer's log stands (`matched`, `next`) and what flows to it now.
//!
//! ```text
//!            durable ack                 next entries older than the in-memory log
//!   Probe ───────────────▶ Replicate ───────────────────────────▶ Reading
//!     ▲  ◀───────────────────  │  ◀──────── batch read, sent ──────  │
//!     │   mismatch, timeout,   │                                     │ log cannot
//!     │   peer rejoined empty  │                                     ▼ serve it
//!     └──── ack or timeout ─────────────────────────────────────── Snapshot
//! ```
//!
//! - **Probe**: where the peer's log matches is not confirmed since the last reset;
//!   batches go out optimistically from `next` (up to the window, as when
//!   replicating: a probe that misses costs one mismatch), until a durable ack
//!   confirms the match.
//! - **Replicate**: the match is confirmed; batches are pipelined up to the window.
//! - **Reading**: the batch the peer needs is older than the in-memory log and is
//!   being read from the durable log; nothing else is sent meanwhile.
//! - **Snapshot**: the log no longer holds what the peer needs; the snapshot goes
//!   out one chunk at a time, each sent once the answer to the one before asks
//!   for it, and only the answer to the last moves the peer on. A transfer cut
//!   short resumes where the peer's staging stood.
//!
//! Only a durable ack of a batch in flight, or of the snapshot in flight, raises
//! `matched` (protocol.md, "Replication and commit").

use std::collections::VecDeque;

use crate::log_store::Snapshot;
use crate::message::SnapshotAck;
use crate::types::{Instant, LogIndex, NodeId, Position};

/// What flows to the peer now. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    /// Sending from `next` until a durable ack confirms where the logs match.
    Probe,
    /// Batches pipelined up to the window.
    Replicate,
    /// A catch-up read of the durable log is running.
    Reading {
        /// Echoed by the read's answer.
        read_id: u64,
        /// The peer's next index the read serves.
        next: LogIndex,
        /// When it was issued.
        since: Instant,
        /// Whether to pipeline again once the read's batch is sent.
        replicating: bool,
    },
    /// A snapshot chunk is being read from the log store.
    ReadingSnapshot {
        /// Echoed by the read's answer.
        read_id: u64,
        /// The snapshot.
        snapshot: Snapshot,
        /// The chunk's offset.
        offset: u64,
        /// When it was issued.
        since: Instant,
    },
    /// A snapshot chunk is in flight.
    Snapshot {
        /// The request id of the chunk's `InstallSnapshot`.
        rid: u64,
        /// The snapshot it belongs to.
        snapshot: Snapshot,
        /// When it was sent.
        since: Instant,
    },
}

/// A batch in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct InFlight {
    pub(super) rid: u64,
    pub(super) last: Position,
    pub(super) sent: Instant,
    /// The batch's entries' size ([`crate::types::WalEntry::approx_size`]).
    pub(super) bytes: usize,
}

/// Replication progress of the data peer.
#[derive(Clone, Debug)]
pub(super) struct Progress {
    pub(super) id: NodeId,
    /// The last index the peer durably holds, as acked.
    pub(super) matched: LogIndex,
    /// The next index to send.
    pub(super) next: LogIndex,
    /// The peer's applied index, as reported.
    pub(super) applied: LogIndex,
    flow: Flow,
    inflight: VecDeque<InFlight>,
    /// Mismatch replies to requests older than this are stale.
    reset_after: u64,
    /// Where the peer's staging of a snapshot stands (the offset it asked for
    /// next): a transfer cut short (a timeout, a lost connection) resumes there.
    snapshot_resume: Option<(Position, u64)>,
    /// When the peer last asked for a snapshot's next chunk.
    snapshot_progress: Option<Instant>,
}

/// What the answer to a snapshot chunk asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SnapshotNext {
    /// Not the answer to the chunk in flight.
    Ignored,
    /// The peer staged what it has and wants this snapshot's chunk from this
    /// offset.
    Chunk(Snapshot, u64),
    /// The transfer ended (installed, held already, or refused).
    Finished,
}

impl Progress {
    /// A peer whose log is unknown: probe from `next`.
    pub(super) fn new(id: NodeId, next: LogIndex) -> Progress {
        Progress {
            id,
            matched: LogIndex::ZERO,
            next,
            applied: LogIndex::ZERO,
            flow: Flow::Probe,
            inflight: VecDeque::new(),
            reset_after: 0,
            snapshot_resume: None,
            snapshot_progress: None,
        }
    }

    #[cfg(test)]
    pub(super) fn flow(&self) -> Flow {
        self.flow
    }

    /// True if another batch may be sent now: fewer than `window` batches and
    /// fewer than `max_bytes` bytes are in flight (one batch may always go).
    pub(super) fn may_send(&self, window: usize, max_bytes: usize) -> bool {
        match self.flow {
            Flow::Probe | Flow::Replicate => {
                self.inflight.is_empty()
                    || (self.inflight.len() < window.max(1) && self.inflight_bytes() < max_bytes)
            }
            Flow::Reading { .. } | Flow::ReadingSnapshot { .. } | Flow::Snapshot { .. } => false,
        }
    }

    /// Bytes of the batches in flight.
    pub(super) fn inflight_bytes(&self) -> usize {
        self.inflight.iter().map(|b| b.bytes).sum()
    }

    /// True if at least one batch is in flight.
    pub(super) fn batches_in_flight(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// True if nothing is in flight (no batch, read or snapshot).
    pub(super) fn idle(&self) -> bool {
        self.inflight.is_empty() && matches!(self.flow, Flow::Probe | Flow::Replicate)
    }

    /// A batch of `bytes` ending at `last` was sent under `rid`.
    pub(super) fn sent_batch(&mut self, rid: u64, last: Position, bytes: usize, now: Instant) {
        self.inflight.push_back(InFlight {
            rid,
            last,
            sent: now,
            bytes,
        });
        self.next = last.index.next();
    }

    /// True if `rid` is a batch in flight ending at `last`.
    pub(super) fn in_flight_ending_at(&self, rid: u64, last: Position) -> bool {
        self.inflight.iter().any(|b| b.rid == rid && b.last == last)
    }

    /// The peer durably holds up to `pos` (`held`: this log holds `pos` too, so
    /// the logs match up to there), acked for the batch `rid`.
    pub(super) fn acked(&mut self, rid: u64, pos: Position, held: bool) {
        if held && pos.index > self.matched {
            self.matched = pos.index;
        }
        self.inflight.retain(|b| b.rid > rid);
        if self.next <= self.matched {
            self.next = self.matched.next();
        }
        if held && self.flow == Flow::Probe {
            self.flow = Flow::Replicate;
        }
    }

    /// The peer refused the batch `rid` and needs `next` on (its log ends or
    /// conflicts before it). Ignored if `rid` is no longer in flight: a later ack
    /// covered it, or the window was reset since (a reordered answer must not
    /// lower what the peer durably acked). Returns false if ignored.
    pub(super) fn refused(
        &mut self,
        rid: u64,
        next: LogIndex,
        last: LogIndex,
        reset_id: u64,
    ) -> bool {
        if rid < self.reset_after || !self.inflight.iter().any(|b| b.rid == rid) {
            return false;
        }
        if next <= self.matched {
            // A peer never loses what it acked durably, unless its disk was wiped
            // and it rejoined empty (as a non-voter): start over.
            self.matched = next.prev();
        }
        self.next = next
            .max(self.matched.next())
            .min(last.next())
            .max(LogIndex(1));
        self.reset(reset_id);
        true
    }

    /// Back to probing from the match index: nothing answered in time.
    pub(super) fn timed_out(&mut self, reset_id: u64) {
        self.next = self.matched.next();
        self.reset(reset_id);
    }

    /// The peer rejoined with a wiped disk holding only up to `last`.
    pub(super) fn rejoined_empty(&mut self, last: LogIndex, reset_id: u64) {
        self.matched = last;
        self.next = last.next();
        self.reset(reset_id);
    }

    fn reset(&mut self, reset_id: u64) {
        self.inflight.clear();
        self.reset_after = reset_id;
        self.flow = Flow::Probe;
    }

    /// The oldest batch in flight was sent at or before `before`.
    pub(super) fn oldest_sent_before(&self, before: Instant) -> bool {
        self.inflight.front().is_some_and(|b| b.sent <= before)
    }

    /// A catch-up read `read_id` for `next` was issued.
    pub(super) fn start_read(&mut self, read_id: u64, now: Instant) {
        let replicating = self.flow == Flow::Replicate;
        self.flow = Flow::Reading {
            read_id,
            next: self.next,
            since: now,
            replicating,
        };
    }

    /// The read `read_id` finished: the index it served if it is the read in
    /// flight (the flow goes back to what it was), `None` otherwise.
    pub(super) fn finish_read(&mut self, read_id: u64) -> Option<LogIndex> {
        match self.flow {
            Flow::Reading {
                read_id: id,
                next,
                replicating,
                ..
            } if id == read_id => {
                self.flow = if replicating {
                    Flow::Replicate
                } else {
                    Flow::Probe
                };
                Some(next)
            }
            _ => None,
        }
    }

    /// A chunk of `snapshot` from `offset` is being read under `read_id`.
    pub(super) fn start_snapshot_read(
        &mut self,
        read_id: u64,
        snapshot: Snapshot,
        offset: u64,
        now: Instant,
    ) {
        self.flow = Flow::ReadingSnapshot {
            read_id,
            snapshot,
            offset,
            since: now,
        };
    }

    /// The snapshot and offset the read `read_id` is for, if it is the one
    /// running (the flow stays until the chunk is sent, or expires).
    pub(super) fn snapshot_read(&self, read_id: u64) -> Option<(Snapshot, u64)> {
        match self.flow {
            Flow::ReadingSnapshot {
                read_id: id,
                snapshot,
                offset,
                ..
            } if id == read_id => Some((snapshot, offset)),
            _ => None,
        }
    }

    /// A chunk of `snapshot` was sent under `rid`.
    pub(super) fn sent_snapshot(&mut self, rid: u64, snapshot: Snapshot, now: Instant) {
        self.flow = Flow::Snapshot {
            rid,
            snapshot,
            since: now,
        };
    }

    /// True while a snapshot transfer to the peer makes progress: it asked
    /// for a chunk since `since` and one is being read or in flight. The
    /// primary takes no new snapshot meanwhile, or a transfer longer than two
    /// snapshot intervals would lose the one it sends and start over for ever.
    pub(super) fn snapshot_transfer_active(&self, since: Instant) -> bool {
        matches!(
            self.flow,
            Flow::ReadingSnapshot { .. } | Flow::Snapshot { .. }
        ) && self.snapshot_progress.is_some_and(|t| t >= since)
    }

    /// The offset to send the snapshot at `at` from: where the peer's staging of
    /// it stood at its last answer, else its start.
    pub(super) fn snapshot_offset(&self, at: Position) -> u64 {
        match self.snapshot_resume {
            Some((p, offset)) if p == at => offset,
            _ => 0,
        }
    }

    /// The answer to the snapshot chunk `rid`: staged (it wants the chunk from
    /// `next_offset`), installed up to `last`, or kept (its own log or snapshot
    /// reaches `last`, unconfirmed). Ignored unless it answers the chunk in
    /// flight.
    pub(super) fn snapshot_answered(
        &mut self,
        rid: u64,
        ack: &SnapshotAck,
        own_last: LogIndex,
        reset_id: u64,
        now: Instant,
    ) -> SnapshotNext {
        let snapshot = match self.flow {
            Flow::Snapshot {
                rid: r, snapshot, ..
            } if r == rid => snapshot,
            _ => return SnapshotNext::Ignored,
        };
        let (installed, last) = (ack.installed, ack.last);
        if let (false, Some(offset)) = (installed, ack.next_offset) {
            self.snapshot_resume = Some((snapshot.last_included, offset));
            self.snapshot_progress = Some(now);
            return SnapshotNext::Chunk(snapshot, offset);
        }
        self.snapshot_resume = None;
        self.snapshot_progress = None;
        if installed && last.index > self.matched {
            // Installed durably: the peer's log starts after the snapshot.
            self.matched = last.index;
            self.next = self.matched.next();
        } else if !installed && last.index > self.matched && last.index <= own_last {
            // It kept a newer state of its own: probe from its last position;
            // log matching decides whether it agrees with ours.
            self.next = last.index.next();
        }
        self.reset(reset_id);
        SnapshotNext::Finished
    }

    /// Gives up on a read or snapshot that has not answered since `before`.
    pub(super) fn expire(&mut self, before: Instant) {
        match self.flow {
            Flow::Reading { since, .. }
            | Flow::ReadingSnapshot { since, .. }
            | Flow::Snapshot { since, .. }
                if since <= before =>
            {
                self.flow = Flow::Probe;
            }
            _ => {}
        }
    }

    /// How many batches are in flight.
    #[cfg(test)]
    fn inflight_len(&self) -> usize {
        self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Term;

    fn pos(i: u64) -> Position {
        Position::new(Term::ZERO, LogIndex(i))
    }

    fn ms(n: u64) -> Instant {
        Instant(n * 1_000_000)
    }

    fn peer() -> Progress {
        Progress::new(NodeId(2), LogIndex(11))
    }

    #[test]
    fn a_new_peer_is_probed_until_a_durable_ack_confirms_the_match() {
        let mut p = peer();
        assert_eq!(p.flow(), Flow::Probe);
        assert!(p.may_send(8, 1 << 20));
        p.sent_batch(1, pos(12), 100, ms(0));
        assert_eq!(p.flow(), Flow::Probe, "sent, not yet confirmed");
        assert_eq!(p.next, LogIndex(13));
        p.acked(1, pos(12), true);
        assert_eq!(p.flow(), Flow::Replicate);
        assert_eq!(p.matched, LogIndex(12));
        for rid in 2..10 {
            assert!(p.may_send(8, 1 << 20));
            p.sent_batch(rid, pos(12 + rid), 100, ms(1));
        }
        assert!(!p.may_send(8, 1 << 20), "replicate: the window is full");
        assert_eq!(p.inflight_len(), 8);
    }

    #[test]
    fn an_ack_of_a_position_this_log_does_not_hold_does_not_raise_the_match() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), false);
        assert_eq!(p.matched, LogIndex::ZERO);
        assert_eq!(p.flow(), Flow::Probe);
    }

    #[test]
    fn a_mismatch_resets_to_probe_and_a_stale_one_is_ignored() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), true);
        p.sent_batch(2, pos(13), 100, ms(1));
        p.sent_batch(3, pos(14), 100, ms(1));
        // The answer to batch 2 arrives after batch 3's ack: batch 2 is no longer
        // in flight, so its mismatch is stale.
        p.acked(3, pos(14), true);
        assert!(!p.refused(2, LogIndex(13), LogIndex(20), 100));
        assert_eq!(p.matched, LogIndex(14));
        // A real mismatch: back to probing from the hint.
        p.sent_batch(4, pos(15), 100, ms(2));
        assert!(p.refused(4, LogIndex(15), LogIndex(20), 100));
        assert_eq!(p.flow(), Flow::Probe);
        assert_eq!(p.next, LogIndex(15));
        // Answers to requests from before the reset are stale.
        assert!(!p.refused(5, LogIndex(3), LogIndex(20), 100));
    }

    #[test]
    fn a_refusal_below_the_match_means_the_peer_lost_its_disk() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), true);
        p.sent_batch(2, pos(13), 100, ms(1));
        assert!(p.refused(2, LogIndex(1), LogIndex(20), 50));
        assert_eq!(p.matched, LogIndex::ZERO);
        assert_eq!(p.next, LogIndex(1));
    }

    #[test]
    fn a_read_pauses_sending_and_resumes_the_flow_it_interrupted() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), true);
        p.start_read(7, ms(1));
        assert!(!p.may_send(8, 1 << 20));
        assert_eq!(p.finish_read(8), None, "another read's answer");
        assert_eq!(p.finish_read(7), Some(LogIndex(13)));
        assert_eq!(p.flow(), Flow::Replicate);
        // A read that never answers is given up.
        p.start_read(9, ms(2));
        p.expire(ms(1));
        assert!(matches!(p.flow(), Flow::Reading { .. }));
        p.expire(ms(2));
        assert_eq!(p.flow(), Flow::Probe);
    }

    fn snap(i: u64) -> Snapshot {
        Snapshot {
            last_included: pos(i),
            size: 1 << 20,
        }
    }

    fn snap_ack(installed: bool, last: u64, next_offset: Option<u64>) -> SnapshotAck {
        SnapshotAck {
            snapshot_term: Term::ZERO,
            installed,
            last: pos(last),
            next_offset,
        }
    }

    #[test]
    fn only_the_answer_to_the_snapshot_in_flight_moves_the_peer() {
        let mut p = peer();
        p.sent_snapshot(5, snap(50), ms(0));
        assert!(!p.may_send(8, 1 << 20));
        // An answer to an older snapshot request is stale.
        let done = snap_ack(true, 50, None);
        assert_eq!(
            p.snapshot_answered(4, &done, LogIndex(60), 10, ms(0)),
            SnapshotNext::Ignored
        );
        assert_eq!(p.matched, LogIndex::ZERO);
        assert_eq!(
            p.snapshot_answered(5, &done, LogIndex(60), 10, ms(0)),
            SnapshotNext::Finished
        );
        assert_eq!(p.matched, LogIndex(50));
        assert_eq!(p.next, LogIndex(51));
        assert_eq!(p.flow(), Flow::Probe);
        // Kept its own newer state: probe from there, without raising the match.
        p.sent_snapshot(6, snap(50), ms(1));
        assert_eq!(
            p.snapshot_answered(6, &snap_ack(false, 55, None), LogIndex(60), 11, ms(1)),
            SnapshotNext::Finished
        );
        assert_eq!(p.matched, LogIndex(50));
        assert_eq!(p.next, LogIndex(56));
    }

    #[test]
    fn a_snapshot_transfer_cut_short_resumes_where_the_peer_staging_stood() {
        let mut p = peer();
        assert_eq!(p.snapshot_offset(pos(50)), 0);
        p.sent_snapshot(5, snap(50), ms(0));
        let staged = snap_ack(false, 10, Some(4096));
        assert_eq!(
            p.snapshot_answered(5, &staged, LogIndex(60), 10, ms(0)),
            SnapshotNext::Chunk(snap(50), 4096)
        );
        assert_eq!(p.matched, LogIndex::ZERO, "staging raises nothing");
        // The next chunk times out: the transfer starts over from the staging.
        p.sent_snapshot(6, snap(50), ms(1));
        assert!(p.snapshot_transfer_active(ms(0)), "it made progress at 0");
        assert!(!p.snapshot_transfer_active(ms(1)), "not since 1");
        p.expire(ms(1));
        assert!(!p.snapshot_transfer_active(ms(0)), "nothing in flight");
        assert_eq!(p.flow(), Flow::Probe);
        assert_eq!(p.snapshot_offset(pos(50)), 4096);
        // Another snapshot starts from its beginning.
        assert_eq!(p.snapshot_offset(pos(70)), 0);
        // The end of a transfer forgets where it stood.
        p.sent_snapshot(7, snap(50), ms(2));
        p.snapshot_answered(7, &snap_ack(true, 50, None), LogIndex(60), 12, ms(2));
        assert_eq!(p.snapshot_offset(pos(50)), 0);
    }

    #[test]
    fn a_timeout_resends_from_the_match() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), true);
        p.sent_batch(2, pos(20), 100, ms(1));
        assert!(p.oldest_sent_before(ms(1)));
        assert!(!p.oldest_sent_before(ms(0)));
        p.timed_out(9);
        assert_eq!(p.next, LogIndex(13));
        assert_eq!(p.flow(), Flow::Probe);
        assert!(p.may_send(8, 1 << 20));
    }

    #[test]
    fn a_peer_that_rejoined_empty_is_resent_from_what_it_holds() {
        let mut p = peer();
        p.sent_batch(1, pos(12), 100, ms(0));
        p.acked(1, pos(12), true);
        p.rejoined_empty(LogIndex(3), 9);
        assert_eq!((p.matched, p.next), (LogIndex(3), LogIndex(4)));
        assert_eq!(p.flow(), Flow::Probe);
    }
}
