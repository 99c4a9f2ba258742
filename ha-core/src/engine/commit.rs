//! The commit rule and witness floors (protocol.md, "Replication and commit",
//! "Witness floors: degraded sync and async lag").

use super::Engine;
use crate::message::{RaiseFloor, Request};
use crate::types::{CommitMode, Instant, LogIndex, NodeId};

impl Engine {
    /// A witness that joined empty gets its whole record rewritten: floors at the
    /// commit position for both data nodes (safe: too high only delays an election).
    pub(super) fn rewrite_witness(&mut self, witness: NodeId) {
        let Some(pos) = self.log.position_at(self.commit) else {
            return;
        };
        let mut floors = vec![(self.id, pos)];
        if let Some(peer) = self.cfg.data_peer() {
            floors.push((peer.id, pos));
        }
        let req = RaiseFloor {
            floors,
            commit: self.commit,
            rewrite: true,
        };
        self.send(witness, Request::RaiseFloor(req));
    }

    /// The commit rule (docs/protocol.md): an entry of this term commits once the
    /// primary holds it durably and the standby durably acked it, or the witness
    /// recorded a standby floor at most `allowed_lag` entries below it.
    pub(super) fn advance_commit(&mut self) {
        let Some(ls) = self.leader_state.as_ref() else {
            return;
        };
        let own = self.durable;
        let lag = self.cfg.allowed_lag();
        let matched = ls
            .peer
            .as_ref()
            .map(|p| p.matched)
            .unwrap_or(LogIndex::ZERO);
        let floor = if self.cfg.strict_sync && self.cfg.commit_mode != CommitMode::Async {
            LogIndex::ZERO
        } else {
            ls.floor.index
        };
        let covered = LogIndex(matched.max(floor).0.saturating_add(lag));
        let no_floor =
            self.mutations.async_commit_without_floor && self.cfg.commit_mode == CommitMode::Async;
        let c = if self.mutations.ack_before_standby_persists || ls.forced || no_floor {
            own
        } else {
            own.min(covered)
        };
        // Earlier terms' entries commit only through this term's no-op.
        if c >= ls.noop_index && c > self.commit {
            self.commit = c;
        }
    }

    /// Degraded sync / async lag: record a standby floor at the witness so the
    /// primary can commit what the standby has not acked.
    pub(super) fn maybe_raise_floor(&mut self) {
        let now = self.now;
        let own = self.durable;
        let lag = self.cfg.allowed_lag();
        let is_async = self.cfg.commit_mode == CommitMode::Async;
        if self.cfg.strict_sync && !is_async {
            return;
        }
        let Some(ls) = self.leader_state.as_ref() else {
            return;
        };
        let (Some(witness), Some(p)) = (ls.witness, ls.peer.as_ref()) else {
            return;
        };
        if ls.forced || ls.floor_inflight.is_some() {
            return;
        }
        // sync-apply also needs the standby to have applied what it holds.
        let standby_cover = if self.cfg.commit_mode == CommitMode::SyncApply {
            p.matched.min(p.applied)
        } else {
            p.matched
        };
        let covered = standby_cover.max(ls.floor.index).0.saturating_add(lag);
        if own.0 <= covered {
            return;
        }
        let old =
            |since: Option<Instant>| since.is_some_and(|t| now >= t.plus(self.cfg.degrade_timeout));
        let waited_long = old(ls.unacked.front().map(|(_, t)| *t)) || old(ls.apply_wait_since);
        if !is_async && !waited_long {
            return;
        }
        let target = LogIndex(own.0.saturating_sub(lag));
        let Some(pos) = self.log.position_at(target) else {
            return;
        };
        if pos <= ls.floor {
            return;
        }
        let peer = p.id;
        if !is_async && !ls.degraded {
            tracing::warn!(node = %self.id, standby = %peer, "standby lagging; committing through witness floors (degraded sync)");
        }
        let commit = self.commit;
        self.send(
            witness,
            Request::RaiseFloor(RaiseFloor {
                floors: vec![(peer, pos)],
                commit,
                rewrite: false,
            }),
        );
        if let Some(ls) = self.leader_state.as_mut() {
            ls.floor_inflight = Some(now);
            ls.degraded = !is_async;
        }
    }
}
