//! The primary's side of replication: pipelined WAL batches from the in-memory
//! log, catch-up reads of the durable log, snapshots, and the standby's answers
//! (protocol.md, "Replication and commit", "Fencing, rejoin, catch-up").

use super::{Action, Engine};
use crate::error::StorageError;
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::message::{InstallSnapshot, Request, WalBatch};
use crate::types::{NodeId, Position, WalEntry};

impl Engine {
    /// Sends batches to the data peer while its window has room: from the
    /// in-memory log, or, for entries older than it, from the durable log (read
    /// with [`Action::ReadEntries`], sent in [`Self::on_entries_read`]).
    pub(super) fn replicate(&mut self) {
        let now = self.now;
        let (max_inflight, max_bytes) =
            (self.cfg.max_inflight_batches, self.cfg.max_inflight_bytes);
        let (batch_size, batch_bytes) = (self.cfg.wal_batch_size, self.cfg.wal_batch_bytes);
        loop {
            let Some(ls) = self.leader_state.as_ref() else {
                return;
            };
            let Some(p) = ls.peer.as_ref() else {
                return;
            };
            if !p.may_send(max_inflight, max_bytes) {
                return;
            }
            let holding_back = p.batches_in_flight();
            let (peer, next) = (p.id, p.next);
            if next <= self.log.snapshot().index {
                let read_id = self.next_request_id();
                self.emit(Action::ReadEntries {
                    read_id,
                    next,
                    max_entries: batch_size,
                    max_bytes: batch_bytes,
                });
                if let Some(p) = self.leader_state.as_mut().and_then(|ls| ls.peer.as_mut()) {
                    p.start_read(read_id, now);
                }
                return;
            }
            let entries = self.log.slice(next, batch_size, batch_bytes);
            let Some(last) = entries.last().map(|e| e.position) else {
                return;
            };
            // Batching: while a batch is in flight, a batch that is not full
            // waits (its entries join the next one) until the window frees up
            // or its oldest entry has waited `wal_batch_timeout`.
            let full = entries.len() >= batch_size || last.index < self.log.last().index;
            if holding_back && !full && !ls.waited_since(next, now, self.cfg.wal_batch_timeout) {
                return;
            }
            let Some(prev) = self.log.position_at(next.prev()) else {
                return;
            };
            self.send_batch(peer, prev, entries, last);
        }
    }

    /// Entries read from the durable log for the peer: send them as a batch, or
    /// the snapshot if the log could not provide them (purged by its retention
    /// policy, or a read error).
    pub(super) fn on_entries_read(
        &mut self,
        read_id: u64,
        result: Result<CatchUpBatch, StorageError>,
    ) {
        let Some(p) = self.leader_state.as_mut().and_then(|ls| ls.peer.as_mut()) else {
            return;
        };
        let Some(next) = p.finish_read(read_id) else {
            return;
        };
        let peer = p.id;
        if p.next != next {
            // An ack or a mismatch moved the peer while the read ran.
            self.replicate();
            return;
        }
        match result {
            Ok(CatchUpBatch { prev, entries })
                if entries.first().map(|e| e.index()) == Some(next) =>
            {
                let last = entries.last().map(|e| e.position).unwrap_or(prev);
                self.send_batch(peer, prev, entries, last);
                self.replicate();
            }
            Ok(_) => {
                tracing::warn!(node = %self.id, %peer, %next, "the durable log answered a catch-up read with other entries; sending the snapshot");
                self.send_snapshot(peer);
            }
            Err(e) => {
                tracing::info!(node = %self.id, %peer, %next, error = %e, "the durable log cannot serve the standby's catch-up; sending the snapshot");
                self.send_snapshot(peer);
            }
        }
    }

    /// Starts sending the latest snapshot to the peer (it needs entries the log
    /// no longer holds): from where its staging of it stood, if a transfer of
    /// it was cut short, else from the start.
    pub(super) fn send_snapshot(&mut self, peer: NodeId) {
        let (Some(snap), Some(p)) = (
            self.snapshot,
            self.leader_state.as_ref().and_then(|ls| ls.peer.as_ref()),
        ) else {
            return;
        };
        let offset = p.snapshot_offset(snap.last_included);
        self.send_snapshot_chunk(peer, snap, offset);
    }

    /// Reads `snap`'s chunk from `offset` (from its start if `offset` is past
    /// its end: the peer asked for another snapshot's), to send once read
    /// ([`Self::on_snapshot_read`]). A transfer goes on with the snapshot it
    /// started with while the store keeps it.
    pub(super) fn send_snapshot_chunk(&mut self, peer: NodeId, snap: Snapshot, offset: u64) {
        let offset = if offset <= snap.size { offset } else { 0 };
        let read_id = self.next_request_id();
        let now = self.now;
        let Some(p) = self
            .leader_state
            .as_mut()
            .and_then(|ls| ls.peer.as_mut())
            .filter(|p| p.id == peer)
        else {
            return;
        };
        p.start_snapshot_read(read_id, snap, offset, now);
        self.emit(Action::ReadSnapshot {
            read_id,
            snapshot: snap,
            offset,
            max_bytes: self.cfg.snapshot_chunk_bytes,
        });
    }

    /// A snapshot chunk was read for the peer: send it. A failed read (the
    /// snapshot was replaced meanwhile, or I/O) is retried once the flow
    /// expires.
    pub(super) fn on_snapshot_read(&mut self, read_id: u64, result: Result<Vec<u8>, StorageError>) {
        let Some(p) = self.leader_state.as_ref().and_then(|ls| ls.peer.as_ref()) else {
            return;
        };
        let Some((snap, offset)) = p.snapshot_read(read_id) else {
            return;
        };
        let (peer, at) = (p.id, snap.last_included);
        let want = usize::try_from(snap.size - offset)
            .unwrap_or(usize::MAX)
            .min(self.cfg.snapshot_chunk_bytes);
        let data = match result {
            Ok(data) if data.len() == want => data,
            Ok(data) => {
                tracing::warn!(node = %self.id, %peer, snapshot = %at, offset, read = data.len(), want, "the log store returned a snapshot chunk of the wrong size");
                return;
            }
            Err(e) => {
                if let Some(latest) = self.snapshot.filter(|s| *s != snap) {
                    // The store dropped it for newer ones: send the latest.
                    tracing::info!(node = %self.id, %peer, snapshot = %at, latest = %latest.last_included, "the snapshot being sent was replaced; sending the latest");
                    self.send_snapshot_chunk(peer, latest, 0);
                } else {
                    tracing::warn!(node = %self.id, %peer, snapshot = %at, offset, error = %e, "cannot read the snapshot for the standby");
                }
                return;
            }
        };
        let end = offset + data.len() as u64;
        let req = InstallSnapshot {
            last_included: at,
            size: snap.size,
            offset,
            data,
            done: end == snap.size,
            commit: self.commit,
            leader_last: self.log.last(),
        };
        let rid = self.send(peer, Request::InstallSnapshot(req));
        let now = self.now;
        if let Some(p) = self.leader_state.as_mut().and_then(|ls| ls.peer.as_mut()) {
            p.sent_snapshot(rid, snap, now);
        }
    }

    /// Sends one batch (possibly empty, to carry the commit index) and records it in
    /// flight; the standby's next expected index becomes `last + 1`.
    pub(super) fn send_batch(
        &mut self,
        peer: NodeId,
        prev: Position,
        entries: Vec<WalEntry>,
        last: Position,
    ) {
        let (commit, now) = (self.commit, self.now);
        let bytes = entries.iter().map(WalEntry::approx_size).sum();
        let rid = self.send(
            peer,
            Request::WalBatch(WalBatch {
                prev,
                entries,
                commit,
            }),
        );
        if let Some(ls) = self.leader_state.as_mut() {
            ls.commit_notified = ls.commit_notified.max(commit);
            if let Some(p) = ls.peer.as_mut() {
                p.sent_batch(rid, last, bytes, now);
            }
        }
    }

    /// An empty batch carrying the commit index, when the standby is idle and the
    /// commit moved (so it applies promptly; `sync-apply` waits on that).
    pub(super) fn notify_commit(&mut self) {
        let commit = self.commit;
        let Some(ls) = self.leader_state.as_ref() else {
            return;
        };
        let Some(p) = ls.peer.as_ref() else { return };
        if commit <= ls.commit_notified || !p.idle() {
            return;
        }
        let (peer, next) = (p.id, p.next);
        if next <= self.log.snapshot().index || next <= self.log.last().index {
            return;
        }
        let Some(prev) = self.log.position_at(next.prev()) else {
            return;
        };
        self.send_batch(peer, prev, Vec::new(), prev);
    }
}
