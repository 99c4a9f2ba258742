//! The primary's side: becoming primary, heartbeats and the lease, client writes,
//! acks and reads (protocol.md, "Lease", "Reads"). Replication to the standby is
//! in `replication.rs`, the commit rule and witness floors in `commit.rs`, the
//! switchover in `transfer.rs`.

use std::collections::VecDeque;

use super::election::{Mandate, StandbySeen};
use super::progress::Progress;
use super::{Action, ClientId, Engine, Mutations};
use crate::config::Config;
use crate::error::Error;
use crate::message::{Fence, Heartbeat, Request};
use crate::observe::Observation;
use crate::types::{
    Command, CommitMode, Instant, LogIndex, NodeId, Payload, Position, Role, WalEntry,
};

/// How many heartbeat send times the primary remembers, to match acks.
const HEARTBEAT_HISTORY: usize = 64;

/// The lease's length: [`Config::lease_duration`], or under the
/// `lease_overshoot_ppm` mutation the bound it must stay below
/// (`failover_timeout × (1 − ρ)/(1 + ρ)`, without the tick) stretched by that much.
fn lease_duration(cfg: &Config, m: Mutations) -> std::time::Duration {
    if m.lease_overshoot_ppm == 0 {
        return cfg.lease_duration();
    }
    let rho = f64::from(cfg.clock_drift_ppm) / 1_000_000.0;
    let bound = cfg.failover_timeout.as_secs_f64() * (1.0 - rho) / (1.0 + rho);
    std::time::Duration::from_secs_f64(bound * (1.0 + f64::from(m.lease_overshoot_ppm) / 1e6))
}

/// An ongoing switchover.
#[derive(Clone, Debug)]
pub(super) struct Transfer {
    pub(super) target: NodeId,
    pub(super) admin: ClientId,
    pub(super) deadline: Instant,
    pub(super) promote_sent: bool,
}

/// Everything only a primary has; dropped when it steps down.
#[derive(Clone, Debug)]
pub(super) struct LeaderState {
    pub(super) forced: bool,
    pub(super) noop_index: LogIndex,
    pub(super) since: Instant,
    pub(super) peer: Option<Progress>,
    pub(super) witness: Option<NodeId>,
    pub(super) heartbeats: VecDeque<(u64, Instant)>,
    pub(super) last_heartbeat: Option<Instant>,
    pub(super) lease_start: Option<Instant>,
    pub(super) pending_writes: VecDeque<(ClientId, LogIndex)>,
    pub(super) pending_reads: Vec<(ClientId, LogIndex)>,
    /// The standby's floor the witness confirmed in this term.
    pub(super) floor: Position,
    pub(super) floor_inflight: Option<Instant>,
    /// (last index, appended at) of this term's appends not yet acked by the standby.
    pub(super) unacked: VecDeque<(LogIndex, Instant)>,
    pub(super) degraded: bool,
    /// sync-apply: since when the oldest acknowledgement waits for the standby to
    /// apply an entry it holds.
    pub(super) apply_wait_since: Option<Instant>,
    pub(super) transfer: Option<Transfer>,
    pub(super) commit_notified: LogIndex,
    pub(super) witness_rewrite_sent: Option<Instant>,
}

impl LeaderState {
    /// The lease rule (protocol.md, "Lease"): when the lease runs out on
    /// this node's clock (valid while `now` is before it), or `None` without one.
    pub(super) fn lease_expiry(&self, cfg: &Config, m: Mutations) -> Option<Instant> {
        // A primary handing over gives up its lease once it has told the target to
        // campaign: the target may be elected before the lease would have run out.
        // Before that no one else can win (the witness still hears this primary),
        // so writes already accepted are still acknowledged under the lease.
        if self.transfer.as_ref().is_some_and(|t| t.promote_sent) {
            return None;
        }
        if m.no_lease || self.forced {
            return Some(Instant(u64::MAX));
        }
        self.lease_start.map(|s| s.plus(lease_duration(cfg, m)))
    }

    /// When a primary without a lease for a whole election timeout steps down
    /// (protocol.md, "Lease"): `None` for a forced primary.
    pub(super) fn step_down_at(&self, cfg: &Config, m: Mutations) -> Option<Instant> {
        if self.forced || m.no_lease {
            return None;
        }
        let lease_end = self
            .lease_start
            .map(|s| s.plus(lease_duration(cfg, m)))
            .unwrap_or(self.since);
        Some(lease_end.plus(cfg.failover_timeout))
    }

    /// True if the entry at `index` (not yet acked by the standby) was appended
    /// at least `wait` before `now`, or its append time is unknown.
    pub(super) fn waited_since(
        &self,
        index: LogIndex,
        now: Instant,
        wait: std::time::Duration,
    ) -> bool {
        self.unacked
            .iter()
            .find(|(last, _)| *last >= index)
            .is_none_or(|(_, at)| now.since(*at) >= wait)
    }

    /// The node this primary told to campaign (a switchover past its Promote):
    /// only that campaign is the handover the term rule lets through.
    pub(super) fn promoted_target(&self) -> Option<NodeId> {
        self.transfer
            .as_ref()
            .filter(|t| t.promote_sent)
            .map(|t| t.target)
    }

    pub(super) fn accepting_writes(&self) -> bool {
        self.transfer.is_none()
    }

    pub(super) fn data_peer_match(&self) -> Option<LogIndex> {
        self.peer.as_ref().map(|p| p.matched)
    }

    pub(super) fn match_index(&self, id: NodeId) -> Option<LogIndex> {
        self.peer.as_ref().filter(|p| p.id == id).map(|p| p.matched)
    }
}

impl Engine {
    /// `StandbySeen::Silent`: the standby answered no part of the election, so it is most
    /// likely down; degraded sync starts at once instead of after
    /// `degrade_timeout` (only the timing changes: floors are always safe).
    pub(super) fn become_leader(&mut self, mandate: Mandate, standby: StandbySeen) {
        let forced = mandate == Mandate::Forced;
        let peer_silent = standby == StandbySeen::Silent;
        self.campaign = None;
        let before = self.log.last();
        let noop = WalEntry::noop(Position::new(self.hs.current_term, before.index.next()));
        let noop_index = noop.index();
        self.log.push(noop.clone());
        self.emit(Action::Append(vec![noop]));
        let peer = self
            .cfg
            .data_peer()
            .map(|m| Progress::new(m.id, before.index.next()));
        self.leader_state = Some(LeaderState {
            forced,
            noop_index,
            since: self.now,
            peer,
            witness: self.cfg.witness().map(|m| m.id),
            heartbeats: VecDeque::new(),
            last_heartbeat: None,
            lease_start: None,
            pending_writes: VecDeque::new(),
            pending_reads: Vec::new(),
            floor: Position::ZERO,
            floor_inflight: None,
            unacked: VecDeque::from([(
                noop_index,
                if peer_silent {
                    Instant(
                        self.now
                            .0
                            .saturating_sub(self.cfg.degrade_timeout.as_nanos() as u64),
                    )
                } else {
                    self.now
                },
            )]),
            degraded: false,
            apply_wait_since: None,
            transfer: None,
            commit_notified: self.commit,
            witness_rewrite_sent: None,
        });
        tracing::info!(node = %self.id, term = %self.hs.current_term, forced, "became primary");
        self.set_role(Role::Primary, Some(self.id));
        if let Some(peer) = self.cfg.data_peer().map(|m| m.id) {
            self.emit(Action::Observe(Observation::FenceSent {
                to: peer,
                term: self.hs.current_term,
            }));
            self.send(
                peer,
                Request::Fence(Fence {
                    reason: "new primary elected".into(),
                }),
            );
        }
        self.send_heartbeats();
        self.replicate();
    }

    fn send_heartbeats(&mut self) {
        let hb = Heartbeat {
            commit: self.commit,
            last: self.log.last(),
        };
        let peers: Vec<NodeId> = self.cfg.peers.iter().map(|m| m.id).collect();
        let now = self.now;
        for p in peers {
            let rid = self.send(p, Request::Heartbeat(hb.clone()));
            if let Some(ls) = self.leader_state.as_mut() {
                ls.heartbeats.push_back((rid, now));
                while ls.heartbeats.len() > HEARTBEAT_HISTORY {
                    ls.heartbeats.pop_front();
                }
            }
        }
        if let Some(ls) = self.leader_state.as_mut() {
            ls.last_heartbeat = Some(now);
        }
    }

    pub(super) fn leader_tick(&mut self) {
        let now = self.now;
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        // Without a lease for a whole election timeout, step down and stop
        // heartbeating: an isolated primary stops before anyone else is elected.
        let step_down_at = ls.step_down_at(&self.cfg, self.mutations);
        if !self.mutations.never_step_down && step_down_at.is_some_and(|t| now >= t) {
            tracing::warn!(node = %self.id, term = %self.hs.current_term, "lost the lease for an election timeout; stepping down");
            self.become_follower(None);
            self.reset_election_deadline();
            return;
        }
        if let Some(t) = ls.transfer.as_ref() {
            if now >= t.deadline {
                // The switchover failed; writes stay stopped for the rest of this
                // term, so step down and let an ordinary election follow.
                tracing::warn!(node = %self.id, "switchover timed out; stepping down");
                self.become_follower(None);
                self.reset_election_deadline();
                return;
            }
        }
        let retransmit = self.cfg.heartbeat_interval * 2;
        if let Some(p) = ls.peer.as_mut() {
            if p.oldest_sent_before(Instant(now.0.saturating_sub(retransmit.as_nanos() as u64))) {
                p.timed_out(self.next_request_id);
            }
            // The driver always answers a read; this only bounds a lost answer
            // (and a lost snapshot).
            p.expire(Instant(
                now.0.saturating_sub(self.cfg.rpc_timeout.as_nanos() as u64),
            ));
        }
        if ls
            .floor_inflight
            .is_some_and(|t| now >= t.plus(self.cfg.rpc_timeout))
        {
            ls.floor_inflight = None;
        }
        if ls
            .last_heartbeat
            .is_none_or(|t| now >= t.plus(self.cfg.heartbeat_interval))
        {
            self.send_heartbeats();
        }
    }

    pub(super) fn leader_append(&mut self, writes: Vec<(ClientId, Command)>) {
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        if let Some(t) = ls.transfer.as_ref() {
            let target = t.target;
            let addr = self.cfg.member(target).map(|m| m.addr.clone());
            for (id, _) in writes {
                let err = Error::NotLeader {
                    leader: Some(target),
                    leader_addr: addr.clone(),
                };
                self.actions.push(Action::WriteDone(id, Err(err)));
            }
            return;
        }
        let uncommitted = self.log.last().index.0.saturating_sub(self.commit.0);
        if uncommitted.saturating_add(writes.len() as u64) > self.cfg.max_uncommitted_entries {
            for (id, _) in writes {
                let err = Error::Busy {
                    waiting: uncommitted,
                };
                self.actions.push(Action::WriteDone(id, Err(err)));
            }
            return;
        }
        let term = self.hs.current_term;
        let mut fresh = Vec::with_capacity(writes.len());
        for (id, cmd) in writes {
            let pos = Position::new(term, self.log.last().index.next());
            let entry = WalEntry::new(pos, Payload::Command(cmd));
            self.log.push(entry.clone());
            ls.pending_writes.push_back((id, pos.index));
            fresh.push(entry);
        }
        if let Some(last) = fresh.last() {
            ls.unacked.push_back((last.index(), self.now));
            self.emit(Action::Append(fresh));
        }
    }

    pub(super) fn leader_read(&mut self, id: ClientId) {
        let commit = self.commit;
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        if ls.transfer.is_some() {
            self.actions.push(Action::ReadReady(
                id,
                Err(Error::NotLeader {
                    leader: None,
                    leader_addr: None,
                }),
            ));
            return;
        }
        ls.pending_reads.push((id, commit));
    }

    /// After applying: acknowledge writes and serve reads that became possible, ask
    /// the witness for floors when the standby lags, drive a switchover, send.
    pub(super) fn leader_after_apply(&mut self) {
        let now = self.now;
        let lease = self.has_lease(now);
        let (commit, applied, term) = (self.commit, self.applied, self.hs.current_term);
        let sync_apply = self.cfg.commit_mode == CommitMode::SyncApply
            && !self.mutations.sync_apply_skips_apply_wait;
        let read_before_noop = self.mutations.read_before_noop;
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        // Acks leave under the lease; the Promote that gives the lease up waits for
        // a step that acknowledged nothing, so no ack follows it out of this step.
        let had_pending = !ls.pending_writes.is_empty();
        // The lease is checked where a write is acknowledged (docs/protocol.md).
        if lease {
            let peer_applied = ls.peer.as_ref().map(|p| p.applied);
            let mut blocked = false;
            while let Some(&(id, idx)) = ls.pending_writes.front() {
                if idx > commit || idx > applied {
                    break;
                }
                // sync-apply also waits for the standby to apply, unless the entry
                // committed through a witness floor without it (degraded: the
                // standby is away, so it is treated as for sync). Whatever the
                // standby's match index says now: it can drop after the commit (a
                // standby that rejoined empty).
                if sync_apply
                    && !ls.forced
                    && peer_applied.is_some_and(|a| idx > a)
                    && ls.floor.index < idx
                {
                    ls.apply_wait_since.get_or_insert(now);
                    blocked = true;
                    break;
                }
                ls.pending_writes.pop_front();
                self.actions
                    .push(Action::WriteDone(id, Ok(Position::new(term, idx))));
            }
            if !blocked {
                ls.apply_wait_since = None;
            }
            let noop = if read_before_noop {
                LogIndex::ZERO
            } else {
                ls.noop_index
            };
            let mut i = 0;
            while i < ls.pending_reads.len() {
                let (id, read_index) = ls.pending_reads[i];
                if applied >= read_index.max(noop) {
                    ls.pending_reads.swap_remove(i);
                    self.actions.push(Action::ReadReady(id, Ok(term)));
                } else {
                    i += 1;
                }
            }
        }
        self.maybe_raise_floor();
        if !had_pending {
            self.drive_transfer();
        }
        self.replicate();
        self.notify_commit();
    }

    /// Fails what a stepping-down primary still owes; a switchover to the node that
    /// now leads succeeded.
    pub(super) fn fail_leader_requests(&mut self, ls: LeaderState, err: Error) {
        for (id, _) in ls.pending_writes {
            self.emit(Action::WriteDone(id, Err(err.clone())));
        }
        for (id, _) in ls.pending_reads {
            self.emit(Action::ReadReady(id, Err(err.clone())));
        }
        if let Some(t) = ls.transfer {
            let result = if self.hs.current_term.node == t.target {
                Ok(())
            } else {
                Err(err)
            };
            self.emit(Action::AdminDone(t.admin, result));
        }
    }
}
