//! The receiving side: WAL batches, heartbeats, fences, snapshots and, on the
//! witness, floors (protocol.md, "Replication and commit", "Witness floors",
//! "Fencing, rejoin, catch-up").

use super::staging::{Staged, Staging};
use super::{Action, Engine, PendingAck};
use crate::log_store::Snapshot;
use crate::message::{
    AckResult, Fence, FenceAck, FloorAck, Heartbeat, HeartbeatAck, InstallSnapshot, RaiseFloor,
    Response, RpcError, SnapshotAck, WalAck, WalBatch,
};
use crate::observe::Observation;
use crate::types::{CommitMode, LogIndex, MemberKind, NodeId, Position, Role, Term};

/// What became of a conflicting suffix.
enum Truncated {
    /// Removed; append the primary's entries.
    Yes,
    /// Refused: it would remove committed entries (sync modes).
    Refused,
    /// Async rewind impossible locally: the node dropped everything to resync.
    Resynced,
}

/// A request's sender, its term, its id, and what the term rule made of it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub(super) from: NodeId,
    pub(super) term: Term,
    pub(super) rid: u64,
    pub(super) standing: Standing,
}

/// What the term rule ([`Engine::term_rule`]) made of a request: every handler
/// decides on this alone, never on the term itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Standing {
    /// Of this node's current term (adopted first if it was newer).
    Current,
    /// Of an older term: refused (the answer carries this node's term, so the
    /// sender learns it is behind).
    Stale,
    /// A vote this node drops without adopting its term: it heard a live primary
    /// within its election timeout (leader stickiness), or it is starting up.
    Dropped,
    /// A vote for the target of this node's own switchover: the handover's
    /// exception to leader stickiness and the log check (protocol.md, "Switchover").
    Handover,
}

impl Engine {
    /// Accepts `from` as the primary of the current term: resets the election timer
    /// and remembers the contact (which makes this voter refuse votes for a while).
    fn accept_leader(&mut self, from: NodeId) {
        if let Some(c) = self.campaign.take() {
            if let Some(id) = c.admin {
                self.emit(Action::AdminDone(
                    id,
                    Err(crate::error::Error::Rejected("a primary exists".into())),
                ));
            }
        }
        self.last_leader_contact = Some(self.now);
        self.reset_election_deadline();
        let role = Role::follower(self.kind, self.hs.voter);
        if self.leader != Some(from) {
            self.leader_verified = LogIndex::ZERO;
        }
        self.set_role(role, Some(from));
    }

    pub(super) fn on_wal_batch(&mut self, meta: Meta, b: WalBatch) {
        let Meta {
            from, term, rid, ..
        } = meta;
        let stale_ack = |e: &Engine| WalAck {
            batch_term: term,
            result: AckResult::StaleTerm,
            applied: e.applied,
        };
        if meta.standing != Standing::Current {
            let ack = stale_ack(self);
            self.respond(from, rid, Response::WalAck(ack));
            return;
        }
        self.accept_leader(from);

        let mut prev = b.prev;
        let snap = self.log.snapshot();
        let mut entries = b.entries;
        let below_snapshot_conflict =
            (prev.index == snap.index && prev.term != snap.term && snap.index > LogIndex::ZERO)
                || entries.iter().any(|e| {
                    e.index() == snap.index && e.term() != snap.term && snap.index > LogIndex::ZERO
                });
        if below_snapshot_conflict {
            // Only possible in async mode: a failover discarded entries this node's
            // snapshot already holds. Start over from the primary's state.
            if self.cfg.commit_mode == CommitMode::Async {
                self.full_resync();
                self.reply_mismatch(from, term, rid, LogIndex(1), None);
            } else {
                self.safety_alarms += 1;
                tracing::error!(node = %self.id, "primary's log conflicts with a committed snapshot");
                self.respond(
                    from,
                    rid,
                    Response::Error(RpcError::Malformed(
                        "conflicts with a committed snapshot".into(),
                    )),
                );
            }
            return;
        }
        if prev.index < snap.index {
            // Entries up to the snapshot are committed, so they match the primary's.
            entries.retain(|e| e.index() > snap.index);
            prev = snap;
        }
        let last = self.log.last();
        if prev.index > last.index {
            self.reply_mismatch(from, term, rid, last.index.next(), None);
            return;
        }
        if !self.log.holds(prev) {
            let conflict_term = self.log.term_at(prev.index);
            // In sync modes the divergence lies above the commit index; in async
            // mode committed entries may be the divergent ones.
            let run_start = self.log.first_index_of_term_run(prev.index);
            let next = if self.cfg.commit_mode == CommitMode::Async {
                run_start
            } else {
                run_start.max(self.commit.next())
            };
            self.reply_mismatch(from, term, rid, next, conflict_term);
            return;
        }
        if let Some(bad) = entries.iter().find(|e| !e.verify()) {
            let msg = format!("entry {} failed its checksum", bad.position);
            self.respond(from, rid, Response::Error(RpcError::Malformed(msg)));
            return;
        }
        if entries
            .windows(2)
            .any(|w| w[1].index() != w[0].index().next())
            || entries
                .first()
                .is_some_and(|e| e.index() != prev.index.next())
        {
            self.respond(
                from,
                rid,
                Response::Error(RpcError::Malformed("entries are not contiguous".into())),
            );
            return;
        }
        let batch_last = entries.last().map(|e| e.position).unwrap_or(prev);
        let mut fresh = Vec::new();
        for entry in entries {
            match self.log.term_at(entry.index()) {
                Some(t) if t == entry.term() => continue,
                Some(_) if self.mutations.no_truncate_on_conflict => continue,
                Some(_) => match self.truncate_conflict(entry.index()) {
                    Truncated::Yes => {
                        self.log.push(entry.clone());
                        fresh.push(entry);
                    }
                    Truncated::Resynced => {
                        self.reply_mismatch(from, term, rid, LogIndex(1), None);
                        return;
                    }
                    Truncated::Refused => {
                        self.respond(
                            from,
                            rid,
                            Response::Error(RpcError::Malformed(
                                "batch would truncate committed entries".into(),
                            )),
                        );
                        return;
                    }
                },
                None => {
                    self.log.push(entry.clone());
                    fresh.push(entry);
                }
            }
        }
        if !fresh.is_empty() {
            self.emit(Action::Append(fresh));
        }
        if self.log.holds(batch_last) {
            self.leader_verified = self.leader_verified.max(batch_last.index);
        }
        self.learn_commit(b.commit);
        self.pending_acks.push(PendingAck {
            to: from,
            request_id: rid,
            batch_term: term,
            last: batch_last,
        });
    }

    fn reply_mismatch(
        &mut self,
        to: NodeId,
        term: Term,
        rid: u64,
        next: LogIndex,
        conflict_term: Option<Term>,
    ) {
        let ack = WalAck {
            batch_term: term,
            result: AckResult::Mismatch {
                next,
                conflict_term,
            },
            applied: self.applied,
        };
        self.respond(to, rid, Response::WalAck(ack));
    }

    /// Removes a conflicting suffix from `from` on. Never at or below the commit
    /// index in sync modes (docs/protocol.md: assert it); in async mode a rewind of
    /// applied entries restores a snapshot and reports what was discarded.
    fn truncate_conflict(&mut self, from: LogIndex) -> Truncated {
        if from <= self.commit && self.cfg.commit_mode != CommitMode::Async {
            self.safety_alarms += 1;
            tracing::error!(node = %self.id, %from, commit = %self.commit, "refused to truncate committed entries");
            return Truncated::Refused;
        }
        if from <= self.applied && !self.rewind_state_machine(from) {
            // No local snapshot before the divergence point: start over.
            self.full_resync();
            return Truncated::Resynced;
        }
        self.log.truncate_from(from);
        self.emit(Action::Truncate(from));
        self.durable = self.durable.min(from.prev());
        self.commit = self.commit.min(from.prev());
        self.leader_verified = self.leader_verified.min(from.prev());
        Truncated::Yes
    }

    /// Async mode only: drops log, snapshot and state; the primary then resends
    /// everything (or its snapshot).
    fn full_resync(&mut self) {
        let mut discarded = vec![self.log.snapshot()];
        discarded.extend(
            (self.log.snapshot().index.0 + 1..=self.applied.0)
                .filter_map(|i| self.log.position_at(LogIndex(i))),
        );
        tracing::warn!(node = %self.id, "async failover discarded entries held in the local snapshot; resyncing");
        // With its log gone this node must not be elected (the witness's floor for
        // it may be far below what the primary acked), nor vote for a candidate
        // behind what it held: it records what it held as its own floor, durable
        // before the log is dropped, and neither campaigns nor grants a vote below
        // it until its log has passed it again (`follower_tick`,
        // `candidate_up_to_date`).
        let held = self.log.last();
        if self.hs.raise_floor(self.id, held) {
            self.persist_hard_state();
        }
        self.emit(Action::Discarded(discarded));
        self.log.reset_to(Position::ZERO);
        self.snapshot = None;
        self.durable = LogIndex::ZERO;
        self.commit = LogIndex::ZERO;
        self.applied = LogIndex::ZERO;
        self.leader_verified = LogIndex::ZERO;
        self.emit(Action::ResetStateMachine);
        self.emit(Action::ResetLog);
        self.flush_pending_acks();
    }

    /// Async mode only: entries `from..=applied` are being discarded.
    fn rewind_state_machine(&mut self, from: LogIndex) -> bool {
        let restore_to = match &self.snapshot {
            Some(s) if s.last_included.index < from => Some(*s),
            Some(_) => return false,
            None if self.log.snapshot().index == LogIndex::ZERO => None,
            None => return false,
        };
        let discarded: Vec<Position> = (from.0..=self.applied.0)
            .filter_map(|i| self.log.position_at(LogIndex(i)))
            .collect();
        tracing::warn!(node = %self.id, count = discarded.len(), "async failover discarded acknowledged writes");
        self.emit(Action::Discarded(discarded));
        match restore_to {
            Some(s) => {
                self.applied = s.last_included.index;
                self.emit(Action::RestoreStateMachine(s));
            }
            None => {
                self.applied = LogIndex::ZERO;
                self.emit(Action::ResetStateMachine);
            }
        }
        true
    }

    /// Learns the primary's commit index, bounded by what is known to match its log.
    fn learn_commit(&mut self, leader_commit: LogIndex) {
        let c = leader_commit.min(self.leader_verified);
        if c > self.commit {
            self.commit = c;
        }
        // The primary's commit index covers every earlier commit only once an entry
        // of its own term (its no-op) is committed.
        let covers_all = self.leader_verified >= leader_commit
            && self.log.term_at(leader_commit) == Some(self.hs.current_term)
            && self.leader == Some(self.hs.current_term.node);
        if !self.hs.voter && self.kind == MemberKind::Data && covers_all {
            // Caught up after joining with an empty directory: vote from now on.
            self.hs.voter = true;
            self.persist_hard_state();
            let leader = self.leader;
            self.set_role(Role::Standby, leader);
        }
    }

    /// Sends the acks whose entries are now durable (after applying, so they carry
    /// the applied index), and refuses those whose entries were truncated.
    pub(super) fn flush_pending_acks(&mut self) {
        if self.pending_acks.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_acks);
        for p in pending {
            if !self.log.holds(p.last) && p.last.index > self.log.snapshot().index {
                let next = self.log.last().index.next();
                self.reply_mismatch(p.to, p.batch_term, p.request_id, next, None);
            } else if p.last.index <= self.durable || p.last.index <= self.log.snapshot().index {
                let ack = WalAck {
                    batch_term: p.batch_term,
                    result: AckResult::Durable(p.last),
                    applied: self.applied,
                };
                self.respond(p.to, p.request_id, Response::WalAck(ack));
            } else {
                self.pending_acks.push(p);
            }
        }
    }

    pub(super) fn on_heartbeat(&mut self, meta: Meta, h: Heartbeat) {
        let Meta { from, rid, .. } = meta;
        let accepted = meta.standing == Standing::Current;
        if accepted {
            self.accept_leader(from);
            self.leader_last = h.last.index;
            match self.kind {
                MemberKind::Data => self.learn_commit(h.commit),
                // Advisory only at the witness (status and metrics).
                MemberKind::Witness => self.commit = self.commit.max(h.commit),
            }
        }
        let ack = HeartbeatAck {
            accepted,
            last: self.log.last(),
            applied: self.applied,
            voter: self.hs.voter,
        };
        self.respond(from, rid, Response::HeartbeatAck(ack));
    }

    pub(super) fn on_fence(&mut self, meta: Meta, f: Fence) {
        let Meta {
            from, term, rid, ..
        } = meta;
        // A fence with a stale term is ignored (protocol.md, "Fencing").
        let fenced = meta.standing == Standing::Current;
        if fenced {
            tracing::info!(node = %self.id, by = %from, %term, reason = %f.reason, "fenced");
            self.emit(Action::Observe(Observation::FenceReceived { from, term }));
            self.accept_leader(from);
        }
        self.respond(from, rid, Response::FenceAck(FenceAck { fenced }));
    }

    pub(super) fn on_install_snapshot(&mut self, meta: Meta, s: InstallSnapshot) {
        let Meta { from, rid, .. } = meta;
        let snap_pos = s.last_included;
        let refuse = |e: &mut Engine, last: Position| {
            let ack = SnapshotAck {
                snapshot_term: snap_pos.term,
                installed: false,
                last,
                next_offset: None,
            };
            e.respond(from, rid, Response::SnapshotAck(ack));
        };
        if meta.standing != Standing::Current {
            refuse(self, self.log.last());
            return;
        }
        self.accept_leader(from);
        let is_async = self.cfg.commit_mode == CommitMode::Async;
        let own_snap = self.log.snapshot();
        // Held already: in the log, or inside our own snapshot (which in sync modes
        // holds only committed, hence matching, entries).
        let held = self.log.holds(snap_pos)
            || (snap_pos.index <= own_snap.index && (!is_async || own_snap == snap_pos));
        if held && snap_pos.index > self.durable && snap_pos.index > own_snap.index {
            // Held in memory but not durable yet: an ack may claim only what is
            // durable (the primary counts it toward commit), so answer with the
            // durable position and let the primary resend from there.
            let last = self.log.position_at(self.durable).unwrap_or(own_snap);
            refuse(self, last);
            return;
        }
        if !held
            && is_async
            && snap_pos.index < own_snap.index
            && own_snap.index <= s.leader_last.index
        {
            // Our own snapshot is newer and the primary's log reaches it: keep it
            // and let the primary probe from our last position. Installing the
            // older snapshot would discard applied entries the primary may hold
            // too; a real divergence shows as a conflict at our snapshot's
            // position and resyncs from there (`on_wal_batch`).
            refuse(self, self.log.last());
            return;
        }
        let leader_commit = s.commit;
        if !held {
            if snap_pos.index <= self.commit && !is_async {
                // The primary's state disagrees with entries this node knows are
                // committed: refuse rather than discard them (docs/protocol.md).
                self.safety_alarms += 1;
                tracing::error!(node = %self.id, snapshot = %snap_pos, commit = %self.commit, "refused a snapshot that conflicts with committed entries");
                refuse(self, self.log.last());
                return;
            }
            let snapshot = Snapshot {
                last_included: snap_pos,
                size: s.size,
            };
            match Staging::take(&mut self.staging, &s) {
                Staged::Take { done } => {
                    let (offset, end) = (s.offset, s.offset + s.data.len() as u64);
                    if offset == 0 {
                        self.staging_began = Some((snap_pos, self.now));
                    }
                    if done {
                        let took = match self.staging_began.take() {
                            Some((at, began)) if at == snap_pos => self.now.since(began),
                            _ => std::time::Duration::ZERO,
                        };
                        self.emit(Action::Observe(Observation::SnapshotInstalled {
                            from,
                            last_included: snap_pos,
                            size: s.size,
                            took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                        }));
                    }
                    self.emit(Action::StageSnapshot {
                        snapshot,
                        offset,
                        data: s.data,
                        done,
                    });
                    if !done {
                        // Installed once its last chunk is.
                        let ack = SnapshotAck {
                            snapshot_term: snap_pos.term,
                            installed: false,
                            last: self.log.last(),
                            next_offset: Some(end),
                        };
                        self.respond(from, rid, Response::SnapshotAck(ack));
                        return;
                    }
                }
                Staged::Wants(offset) => {
                    let ack = SnapshotAck {
                        snapshot_term: snap_pos.term,
                        installed: false,
                        last: self.log.last(),
                        next_offset: Some(offset),
                    };
                    self.respond(from, rid, Response::SnapshotAck(ack));
                    return;
                }
                Staged::Invalid(why) => {
                    tracing::warn!(node = %self.id, from = %from, snapshot = %snap_pos, why, "refused a snapshot chunk");
                    refuse(self, self.log.last());
                    return;
                }
            }
            if snap_pos.index < self.applied {
                // Async mode: the snapshot replaces applied entries a failover
                // discarded.
                let discarded = (snap_pos.index.0 + 1..=self.applied.0)
                    .filter_map(|i| self.log.position_at(LogIndex(i)))
                    .collect();
                self.emit(Action::Discarded(discarded));
            }
            self.log.reset_to(snap_pos);
            self.durable = snap_pos.index;
            self.commit = snap_pos.index;
            self.applied = snap_pos.index;
            self.snapshot = Some(snapshot);
            self.emit(Action::InstallSnapshot(snapshot));
        } else {
            self.staging = None;
        }
        self.leader_verified = self.leader_verified.max(snap_pos.index);
        self.learn_commit(leader_commit);
        let ack = SnapshotAck {
            snapshot_term: snap_pos.term,
            installed: true,
            last: snap_pos,
            next_offset: None,
        };
        self.respond(from, rid, Response::SnapshotAck(ack));
    }

    /// Witness: only the primary of the current term raises floors, which never go
    /// down; the record is persisted before the reply.
    pub(super) fn on_raise_floor(&mut self, meta: Meta, r: RaiseFloor) {
        let Meta { from, rid, .. } = meta;
        let asked: Vec<NodeId> = r.floors.iter().map(|(n, _)| *n).collect();
        let accepted = meta.standing == Standing::Current;
        if accepted {
            self.accept_leader(from);
            let mut changed = false;
            for (node, pos) in &r.floors {
                if self
                    .cfg
                    .member(*node)
                    .is_some_and(|m| m.kind == MemberKind::Data)
                {
                    if self.mutations.witness_floor_may_decrease && self.hs.floor(*node) > *pos {
                        self.hs.floors.retain(|(n, _)| n != node);
                    }
                    changed |= self.hs.raise_floor(*node, *pos);
                }
            }
            if r.rewrite && !self.hs.voter {
                self.hs.voter = true;
                changed = true;
            }
            if changed {
                self.persist_hard_state();
            }
            self.commit = self.commit.max(r.commit);
        }
        let floors = asked.iter().map(|n| (*n, self.hs.floor(*n))).collect();
        self.respond(from, rid, Response::FloorAck(FloorAck { floors, accepted }));
    }
}
