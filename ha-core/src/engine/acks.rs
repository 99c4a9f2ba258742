//! A primary's handling of its peers' answers (WAL, snapshot, heartbeat and floor
//! acks). The term rule (`term.rs`) has already dropped answers of other terms;
//! [`Engine::on_leader_response`] checks once that this node still leads and hands
//! the answer to the [`LeaderState`] with what it needs of the rest of the engine,
//! so no handler re-checks either.

use super::leader::LeaderState;
use super::log::Log;
use super::progress::SnapshotNext;
use super::Engine;
use crate::config::Config;
use crate::log_store::Snapshot;
use crate::message::{AckResult, FloorAck, HeartbeatAck, Response, SnapshotAck, WalAck};
use crate::types::{Instant, LogIndex, MemberKind, NodeId, Position, Term};

/// What of the engine an answer's handler reads (never writes).
pub(super) struct AckContext<'a> {
    pub(super) id: NodeId,
    pub(super) term: Term,
    pub(super) now: Instant,
    pub(super) commit: LogIndex,
    /// The next request id: a window reset ignores answers to requests before it.
    pub(super) reset_id: u64,
    pub(super) log: &'a Log,
    pub(super) cfg: &'a Config,
}

/// What the engine does after an answer was handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FollowUp {
    Nothing,
    /// Rewrite the witness's floors (it restarted and lost none, but must be told
    /// this term's commit).
    RewriteWitness(NodeId),
    /// Send the peer this snapshot's chunk from this offset.
    SnapshotChunk(NodeId, Snapshot, u64),
}

impl Engine {
    /// An answer only a primary uses: ignored unless this node leads.
    pub(super) fn on_leader_response(&mut self, from: NodeId, rid: u64, body: Response) {
        let ctx = AckContext {
            id: self.id,
            term: self.hs.current_term,
            now: self.now,
            commit: self.commit,
            reset_id: self.next_request_id,
            log: &self.log,
            cfg: &self.cfg,
        };
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        let follow_up = match body {
            Response::WalAck(a) => ls.wal_acked(&ctx, from, rid, a),
            Response::SnapshotAck(a) => ls.snapshot_acked(&ctx, from, rid, a),
            Response::HeartbeatAck(a) => ls.heartbeat_acked(&ctx, from, rid, a),
            Response::FloorAck(a) => ls.floor_acked(&ctx, from, a),
            Response::Vote(_)
            | Response::FenceAck(_)
            | Response::PromoteAck(_)
            | Response::Error(_) => FollowUp::Nothing,
        };
        match follow_up {
            FollowUp::Nothing => {}
            FollowUp::RewriteWitness(w) => self.rewrite_witness(w),
            FollowUp::SnapshotChunk(peer, snapshot, offset) => {
                self.send_snapshot_chunk(peer, snapshot, offset)
            }
        }
    }
}

impl LeaderState {
    /// A batch ack: the only answer that raises the standby's match index.
    fn wal_acked(&mut self, ctx: &AckContext<'_>, from: NodeId, rid: u64, ack: WalAck) -> FollowUp {
        let last = ctx.log.last().index;
        let Some(p) = self.peer.as_mut().filter(|p| p.id == from) else {
            return FollowUp::Nothing;
        };
        // The primary ignores replies that do not carry its own term.
        if ack.batch_term != ctx.term {
            return FollowUp::Nothing;
        }
        p.applied = p.applied.max(ack.applied);
        match ack.result {
            AckResult::Durable(pos) => {
                // The standby holds the position it acks; this primary's log holds
                // it too if its in-memory log does, or if it is the end of the batch
                // acked (sent from the durable log, below the in-memory log).
                let held = ctx.log.holds(pos) || p.in_flight_ending_at(rid, pos);
                p.acked(rid, pos, held);
                let matched = p.matched;
                while self.unacked.front().is_some_and(|(i, _)| *i <= matched) {
                    self.unacked.pop_front();
                }
                if self.unacked.is_empty() {
                    self.degraded = false;
                }
                if self.forced && matched >= self.noop_index {
                    // The standby followed the forced primary: from here on it is an
                    // ordinary primary (lease from acks, commit rule, floors).
                    tracing::info!(node = %ctx.id, "standby caught up with the forced primary; ordinary rules resume");
                    self.forced = false;
                    self.since = ctx.now;
                }
            }
            AckResult::Mismatch { next, .. } => {
                let matched = p.matched;
                if p.refused(rid, next, last, ctx.reset_id) && next <= matched {
                    tracing::warn!(standby = %from, %matched, %next, "standby lost acknowledged entries; resending");
                }
            }
            AckResult::StaleTerm => {}
        }
        FollowUp::Nothing
    }

    /// Only the answer to the snapshot chunk in flight counts (a stale or
    /// duplicated one is ignored); one that asks for more gets the next chunk.
    fn snapshot_acked(
        &mut self,
        ctx: &AckContext<'_>,
        from: NodeId,
        rid: u64,
        ack: SnapshotAck,
    ) -> FollowUp {
        let last = ctx.log.last().index;
        let Some(p) = self.peer.as_mut().filter(|p| p.id == from) else {
            return FollowUp::Nothing;
        };
        match p.snapshot_answered(rid, &ack, last, ctx.reset_id, ctx.now) {
            SnapshotNext::Chunk(snapshot, offset) => {
                FollowUp::SnapshotChunk(from, snapshot, offset)
            }
            SnapshotNext::Ignored | SnapshotNext::Finished => FollowUp::Nothing,
        }
    }

    /// A heartbeat ack: a voter's extends the lease from the send time of the
    /// heartbeat it echoes; a non-voter's may show a wiped standby or a witness
    /// that needs this term's floors.
    fn heartbeat_acked(
        &mut self,
        ctx: &AckContext<'_>,
        from: NodeId,
        rid: u64,
        ack: HeartbeatAck,
    ) -> FollowUp {
        if !ack.accepted {
            return FollowUp::Nothing;
        }
        if ack.voter {
            if let Some((_, sent)) = self.heartbeats.iter().find(|(id, _)| *id == rid) {
                if self.lease_start.is_none_or(|s| *sent > s) {
                    self.lease_start = Some(*sent);
                }
            }
        }
        if let Some(p) = self.peer.as_mut().filter(|p| p.id == from) {
            p.applied = p.applied.max(ack.applied);
            if !ack.voter && ack.last.index < p.matched {
                // It rejoined with a wiped disk (a non-voter holding less than it
                // once acked): replicate to it from what it holds now.
                tracing::warn!(standby = %from, matched = %p.matched, last = %ack.last.index, "standby rejoined empty; resending");
                p.rejoined_empty(ack.last.index, ctx.reset_id);
            }
        }
        let is_witness = ctx
            .cfg
            .member(from)
            .is_some_and(|m| m.kind == MemberKind::Witness);
        // Only once this term's no-op is committed does the primary's commit index
        // cover everything earlier primaries committed; floors written before
        // that could be too low.
        let noop_committed = ctx.commit >= self.noop_index;
        if is_witness
            && noop_committed
            && !ack.voter
            && self
                .witness_rewrite_sent
                .is_none_or(|t| ctx.now >= t.plus(ctx.cfg.rpc_timeout))
        {
            self.witness_rewrite_sent = Some(ctx.now);
            return FollowUp::RewriteWitness(from);
        }
        FollowUp::Nothing
    }

    /// The witness recorded floors: the standby's one counts toward the commit
    /// rule if this log holds it.
    fn floor_acked(&mut self, ctx: &AckContext<'_>, from: NodeId, ack: FloorAck) -> FollowUp {
        if Some(from) != self.witness || !ack.accepted {
            return FollowUp::Nothing;
        }
        self.floor_inflight = None;
        let peer_id = ctx.cfg.data_peer().map(|m| m.id);
        let floor: Option<Position> = ack
            .floors
            .iter()
            .find(|(n, _)| Some(*n) == peer_id)
            .map(|(_, p)| *p);
        if let Some(f) = floor.filter(|f| ctx.log.holds(*f)) {
            if f > self.floor {
                self.floor = f;
            }
        }
        FollowUp::Nothing
    }
}
