//! The invariants of protocol.md, "Invariants", checked as the run goes (after every
//! event, at every apply, acknowledgement, read and election) and at the end, and
//! the counters that show which protocol paths a run exercised.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::DiskOp;
use super::world::{idx, World, ALL, DATA, WITNESS};
use crate::engine::Engine;
use crate::executor::Notice;
use crate::message::{Envelope, Response};
use crate::types::{CommitMode, HardState, LogIndex, NodeId, Position, Role, Term};

/// What the checker remembers across the run.
#[derive(Default)]
pub(super) struct Checker {
    /// Sync modes: the term applied at each index, first come.
    canonical: Vec<Term>,
    /// The highest floors the witness ever recorded durably (a wiped witness
    /// forgets them, but commits made on their strength stay justified).
    ghost_floors: HardState,
    /// The floors on the witness's current disk, as last made durable.
    durable_floors: HardState,
    /// The highest floor per data node the witness reported in an accepted
    /// `FloorAck` since its disk was last lost.
    acked_floors: BTreeMap<NodeId, Position>,
    /// What wiped disks held: acks they sent before the wipe still justify commits.
    pub(super) wiped_durable: HashMap<NodeId, BTreeSet<Position>>,
    /// The highest index each data node ever held durably in its log.
    pub(super) durable_high: [LogIndex; 2],
    /// The highest index each data node ever applied (sync modes).
    max_applied: [LogIndex; 2],
    term_leaders: HashMap<Term, NodeId>,
    /// Acknowledged writes an async failover lost, within its bound.
    pub(super) lost: BTreeSet<Position>,
    /// Safety alarms of incarnations that are gone.
    pub(super) alarms_of_dead: u64,
    /// Async mode: positions whose commit was checked already.
    justified: BTreeSet<Position>,
    /// The term in which the witness last accepted a floor raise.
    last_floor_term: Option<Term>,
    last_holders: Vec<NodeId>,
}

impl Checker {
    /// The witness's disk is gone: it no longer owes the floors it reported.
    pub(super) fn witness_wiped(&mut self) {
        self.durable_floors = HardState::default();
        self.acked_floors.clear();
    }
}

impl World {
    /// After every engine step: what the checker needs of the engine, and the
    /// election checks when it just became primary.
    pub(super) fn observe(&mut self, id: NodeId, engine: &Engine) {
        self.stats.steps += 1;
        let was = self.node(id).observed.role;
        let role = engine.role();
        let local = self.node(id).local(self.now);
        let o = &mut self.node_mut(id).observed;
        o.role = Some(role);
        o.term = engine.term();
        o.lease_expiry = engine.lease_expiry();
        o.alarms = engine.safety_alarms();
        o.stepped_at = local;
        o.step_down_at = engine.step_down_at();
        if engine.degraded() {
            self.paths.degraded_steps += 1;
        }
        if role == Role::Primary && was != Some(Role::Primary) {
            self.on_new_primary(id, engine);
        }
    }

    /// Invariant 2: at no instant do two nodes hold a lease.
    pub(super) fn check_leases(&mut self) {
        let now = self.now;
        let holders: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.has_lease(now))
            .map(|n| n.id)
            .collect();
        if self.cfg.trace && holders != self.checker.last_holders {
            self.trace(|| format!("lease holders now {holders:?}"));
            self.checker.last_holders = holders.clone();
        }
        if holders.len() > 1 {
            self.violation(format!("split brain: {holders:?} hold a lease at once"));
        }
    }

    /// Invariant 2, second half: no acknowledgement or read leaves without a lease.
    pub(super) fn lease_checked(&mut self, id: NodeId, what: &str) {
        if !self.node(id).has_lease(self.now) {
            self.violation(format!("{id} emitted {what} without a lease"));
        }
    }

    /// A primary without a lease for a whole election timeout steps down and
    /// stops heartbeating (protocol.md, "Lease"), so its standby can take
    /// over: checked at every heartbeat it sends, against the time the step that
    /// decided to send it ran (a pause may fall between the two).
    pub(super) fn check_heartbeat_sender(&mut self, from: NodeId) {
        let n = self.node(from);
        if n.observed.role != Some(Role::Primary) {
            return;
        }
        let Some(end) = n.observed.step_down_at else {
            return;
        };
        let bound = end.plus(self.cfg.timing.tick_interval * 2);
        if n.observed.stepped_at > bound {
            self.violation(format!(
                "{from} still heartbeats as primary an election timeout after its lease ran out"
            ));
        }
    }

    /// Invariants 1 and 3: one primary per term, and a new primary holds every
    /// acknowledged write (in async mode: all but at most `max_lag_on_failover`,
    /// which are then lost).
    fn on_new_primary(&mut self, id: NodeId, engine: &Engine) {
        let term = engine.term();
        self.stats.elections += 1;
        if self.checker.last_floor_term.is_some_and(|t| t < term) {
            self.paths.primary_changes_after_degraded += 1;
            self.checker.last_floor_term = None;
        }
        if term.node != id {
            self.violation(format!("{id} leads term {term} which names another node"));
        }
        if let Some(prev) = self.checker.term_leaders.insert(term, id) {
            if prev != id {
                self.violation(format!("two primaries in term {term}: {prev} and {id}"));
            }
        }
        let sm = &self.node(id).sm;
        let missing: Vec<Position> = self
            .workload
            .acked
            .iter()
            // Raft's guarantee is for primaries of later terms; one elected late in an
            // older term can never commit (its term is refused everywhere).
            .filter(|p| p.term < term && !self.checker.lost.contains(p))
            .filter(|p| {
                let in_log = engine.term_at(p.index) == Some(p.term);
                let in_snapshot = p.index <= engine.snapshot_position().index
                    && sm.term_at(p.index) == Some(p.term);
                !in_log && !in_snapshot
            })
            .copied()
            .collect();
        let Some(first) = missing.first().copied() else {
            return;
        };
        if self.sync_mode() {
            self.violation(format!(
                "new primary {id} (term {term}) lacks {} acknowledged writes, first {first}",
                missing.len()
            ));
        } else if missing.len() as u64 > self.cfg.max_lag_on_failover {
            self.violation(format!(
                "async failover to {id} (term {term}) loses {} acknowledged writes, bound {}",
                missing.len(),
                self.cfg.max_lag_on_failover
            ));
        } else {
            self.paths.async_failovers_losing_writes += 1;
            self.checker.lost.extend(missing);
        }
    }

    /// Invariant 4 and the commit rule, at the moment an entry is applied.
    /// Sync modes: applied sequences agree (first come is canonical). Every mode:
    /// the first time an index is applied its commit was justified: durable on
    /// both data nodes, or covered by the witness floor of the one lacking it
    /// (within `max_lag_on_failover` in async mode, where nodes may apply entries
    /// a failover later discards).
    pub(super) fn check_apply(&mut self, id: NodeId, pos: Position) {
        let i = (pos.index.0 - 1) as usize;
        if self.sync_mode() {
            let k = idx(id);
            self.checker.max_applied[k] = self.checker.max_applied[k].max(pos.index);
            if i < self.checker.canonical.len() {
                if self.checker.canonical[i] != pos.term {
                    self.violation(format!(
                        "{id} applied {pos} but index {} was applied elsewhere with term {}",
                        pos.index, self.checker.canonical[i]
                    ));
                }
                return;
            }
            while self.checker.canonical.len() < i {
                let k = self.checker.canonical.len();
                match self.node(id).sm.applied.get(k) {
                    Some(t) => self.checker.canonical.push(*t),
                    None => break,
                }
            }
            if self.checker.canonical.len() == i {
                self.checker.canonical.push(pos.term);
            }
        }
        let lag = self.cfg.max_lag_on_failover;
        let is_async = self.cfg.commit_mode == CommitMode::Async;
        if is_async && !self.checker.justified.insert(pos) {
            return;
        }
        for d in DATA {
            let holds = self.node(d).disk.holds(pos)
                || self
                    .checker
                    .wiped_durable
                    .get(&d)
                    .is_some_and(|w| w.contains(&pos));
            let floor = self.checker.ghost_floors.floor(d);
            let covered = if is_async {
                // Async commits up to `lag` entries past what the standby holds
                // or its floor.
                let held = self.checker.durable_high[idx(d)].max(floor.index);
                held.0.saturating_add(lag) >= pos.index.0
            } else {
                floor >= pos
            };
            if !holds && !covered {
                let (high, floor) = (
                    self.checker.durable_high[idx(d)],
                    self.checker.ghost_floors.floor(d),
                );
                self.violation(format!(
                    "{id} applied {pos} which is neither durable on {d} nor covered by its witness floor (it held up to {high} durably; floor {floor})"
                ));
                break;
            }
        }
    }

    /// The node's state machine holds a snapshot's state: it applied what the
    /// snapshot holds.
    pub(super) fn state_restored(&mut self, id: NodeId) {
        if DATA.contains(&id) {
            let k = idx(id);
            let applied = self.node(id).sm.applied_index();
            self.checker.max_applied[k] = self.checker.max_applied[k].max(applied);
        }
    }

    /// `sync-apply`: an acknowledged write is applied on the standby already,
    /// unless it committed through the standby's witness floor (degraded).
    pub(super) fn check_sync_apply_ack(&mut self, primary: NodeId, pos: Position) {
        if self.cfg.commit_mode != CommitMode::SyncApply {
            return;
        }
        let Some(standby) = DATA.into_iter().find(|d| *d != primary) else {
            return;
        };
        let applied = self.checker.max_applied[idx(standby)] >= pos.index;
        if !applied && self.checker.ghost_floors.floor(standby) < pos {
            self.violation(format!(
                "sync-apply acknowledged {pos} before {standby} applied it (and no witness floor covers it; it applied up to {}, floor {})",
                self.checker.max_applied[idx(standby)],
                self.checker.ghost_floors.floor(standby)
            ));
        }
    }

    /// A snapshot from the primary was installed: it agrees with what was applied
    /// elsewhere (sync modes) and holds every acknowledged write up to its index
    /// that no failover lost.
    fn check_snapshot_prefix(&mut self, id: NodeId) {
        let applied = self.node(id).sm.applied.clone();
        if self.sync_mode() {
            for (k, t) in applied.iter().enumerate() {
                match self.checker.canonical.get(k) {
                    Some(c) if c != t => {
                        self.violation(format!(
                            "{id} installed a snapshot disagreeing at index {}",
                            k + 1
                        ));
                        return;
                    }
                    Some(_) => {}
                    None => self.checker.canonical.push(*t),
                }
            }
        }
        let term = self.node(id).observed.term;
        let upto = applied.len() as u64;
        let missing = self
            .workload
            .acked
            .iter()
            .filter(|p| p.index.0 <= upto && p.term < term && !self.checker.lost.contains(p))
            .find(|p| applied.get((p.index.0 - 1) as usize) != Some(&p.term))
            .copied();
        if let Some(p) = missing {
            self.violation(format!(
                "{id} installed a snapshot without the acknowledged write {p}"
            ));
        }
    }

    /// A disk operation became durable (completed, or reached the disk before a
    /// crash).
    pub(super) fn disk_op_durable(&mut self, id: NodeId, op: &DiskOp) {
        let high = match op {
            DiskOp::HardState(hs) if id == WITNESS => {
                self.witness_floors_durable(hs);
                return;
            }
            DiskOp::Truncate(_) => {
                self.paths.truncations += 1;
                return;
            }
            DiskOp::Append(entries) => entries.last().map(|e| e.index()),
            DiskOp::Install(snap) => Some(snap.last_included.index),
            _ => None,
        };
        if let (Some(high), true) = (high, DATA.contains(&id)) {
            let h = &mut self.checker.durable_high[idx(id)];
            *h = (*h).max(high);
        }
    }

    /// A hard state of the witness became durable: its floors never go down
    /// (protocol.md, "Witness floors").
    pub(super) fn witness_floors_durable(&mut self, hs: &HardState) {
        for d in DATA {
            let (old, new) = (self.checker.durable_floors.floor(d), hs.floor(d));
            if new < old {
                self.violation(format!(
                    "the witness's floor for {d} went down from {old} to {new}"
                ));
            }
            self.checker.ghost_floors.raise_floor(d, new);
        }
        self.checker.durable_floors = hs.clone();
    }

    /// The witness booted: it still holds every floor it acknowledged.
    pub(super) fn check_witness_boot(&mut self) {
        let hs = self
            .node(WITNESS)
            .disk
            .hard_state
            .clone()
            .unwrap_or_default();
        let forgotten: Vec<(NodeId, Position)> = self
            .checker
            .acked_floors
            .iter()
            .filter(|(d, p)| hs.floor(**d) < **p)
            .map(|(d, p)| (*d, *p))
            .collect();
        if let Some((d, p)) = forgotten.first() {
            self.violation(format!(
                "the witness restarted without the floor {p} for {d} it had acknowledged"
            ));
        }
    }

    /// A node answered a peer: floors acknowledged by the witness, refused stale
    /// raises, and the witness's heartbeat acks (after which the primary may be
    /// cut off: the lease's worst case).
    pub(super) fn responded(&mut self, id: NodeId, response: &Envelope<Response>) {
        if self.cfg.trace {
            let applied = self.node(id).sm.applied_index();
            self.trace(|| {
                format!(
                    "{id} answers {} {:?} (its state machine applied {applied})",
                    response.to, response.body
                )
            });
        }
        if id != WITNESS {
            return;
        }
        match &response.body {
            Response::FloorAck(ack) if ack.accepted => {
                self.paths.floor_raises += 1;
                self.checker.last_floor_term = Some(response.term);
                for (d, p) in &ack.floors {
                    let e = self.checker.acked_floors.entry(*d).or_default();
                    *e = (*e).max(*p);
                }
            }
            Response::FloorAck(_) => self.paths.stale_floor_raises_refused += 1,
            Response::HeartbeatAck(a) if a.accepted => {
                let to = response.to;
                if self.node(to).observed.role == Some(Role::Primary) {
                    self.maybe_isolate_after_renewal(to);
                }
            }
            _ => {}
        }
    }

    /// What the executor reported.
    pub(super) fn notice(&mut self, id: NodeId, notice: Notice<'_>) {
        match notice {
            Notice::RoleChanged { role, term, leader } => {
                self.trace(|| format!("{id} is {role} in term {term}, leader {leader:?}"));
                if role == Role::Primary {
                    self.note(format!("{id} becomes primary in term {term}"));
                }
                if leader.is_some() && DATA.contains(&id) {
                    self.workload.leader_hint = leader;
                }
            }
            Notice::Discarded(positions) => {
                self.stats.discarded += positions.len() as u64;
                if self.sync_mode() {
                    self.violation(format!(
                        "{id} discarded {} applied entries in a sync mode",
                        positions.len()
                    ));
                }
            }
            Notice::SnapshotInstalled(_) => {
                self.stats.snapshots_installed += 1;
                self.state_restored(id);
                self.check_snapshot_prefix(id);
            }
            Notice::Observed(o) => {
                self.trace(|| format!("{id} observed {o:?}"));
                if let crate::observe::Observation::ElectionWon { term, votes } = o {
                    // Two of the three voters (the winner included).
                    if votes.len() < 2 || !votes.contains(&id) {
                        self.violation(format!("{id} won term {term} with the votes of {votes:?}"));
                    }
                }
            }
            Notice::CatchUpRead(Ok(())) => self.stats.catch_up_reads += 1,
            Notice::CatchUpRead(Err(_)) | Notice::SnapshotSaved(_) | Notice::Appended(_) => {}
        }
    }

    /// Invariants 3, 4 and 5 at the end, and every incarnation's safety alarms.
    pub(super) fn final_checks(&mut self) {
        let alarms: u64 = self.checker.alarms_of_dead
            + self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.observed.alarms)
                .sum::<u64>();
        if alarms > 0 {
            self.violation(format!("engine safety alarms fired: {alarms}"));
        }
        let states: Vec<(NodeId, Vec<Term>)> = DATA
            .iter()
            .map(|d| (*d, self.node(*d).sm.applied.clone()))
            .collect();
        let (a, b) = (&states[0].1, &states[1].1);
        let common = a.len().min(b.len());
        if a[..common] != b[..common] {
            let k = (0..common).find(|k| a[*k] != b[*k]).unwrap_or(0);
            self.violation(format!(
                "final applied sequences of n1 and n2 diverge at index {} ({} vs {}; lengths {} and {})",
                k + 1,
                a[k],
                b[k],
                a.len(),
                b.len()
            ));
        }
        let longest = if a.len() >= b.len() {
            a.clone()
        } else {
            b.clone()
        };
        let lost: Vec<Position> = self
            .workload
            .acked
            .iter()
            .filter(|p| longest.get((p.index.0 - 1) as usize) != Some(&p.term))
            .filter(|p| !self.checker.lost.contains(p))
            .copied()
            .collect();
        if let Some(p) = lost.first() {
            self.violation(format!(
                "{} acknowledged writes lost outside what failovers may lose, first {p}",
                lost.len()
            ));
        }
        for (d, s) in &states {
            let behind = self
                .workload
                .acked
                .iter()
                .filter(|p| !self.checker.lost.contains(p))
                .filter(|p| s.get((p.index.0 - 1) as usize) != Some(&p.term))
                .count();
            if behind > 0 && self.live(*d) {
                self.violation(format!(
                    "{d} ends without {behind} acknowledged writes after healing"
                ));
            }
        }
        // Invariant 5: after healing, a primary appears and writes succeed.
        if !self.workload.progress_acked {
            self.violation("no write succeeded in the second after healing settled".into());
        }
        let av = self.workload.availability;
        if av.healed_attempts >= 20 && av.healed_acked * 2 < av.healed_attempts {
            self.violation(format!(
                "after healing only {} of {} writes to a primary succeeded",
                av.healed_acked, av.healed_attempts
            ));
        }
        let now = self.now;
        if !ALL.iter().any(|n| self.node(*n).has_lease(now)) {
            self.violation("no primary holds a lease at the end".into());
        }
    }
}
