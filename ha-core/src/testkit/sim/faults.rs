//! Faults: crashes (also in the middle of a step, also losing the disk), fast
//! restarts, partitions, pauses, preemption between two actions, a primary cut
//! off right after its lease was renewed, operator switchovers; and booting a
//! node from what its disk holds.

use std::task::Poll;

use rand::Rng;

use super::model::SimMachine;
use super::world::{idx, Ev, World, ALL, DATA, MS, WITNESS};
use crate::engine::{Admin, Engine, InitialState};
use crate::executor::Input;
use crate::types::{HardState, LogIndex, NodeId, Position};

impl World {
    pub(super) fn fault_gap(&mut self) -> u64 {
        let mean = self.cfg.faults.mean_fault_interval_ms as f64;
        let x: f64 = self.rng.random::<f64>().max(1e-9);
        ((-x.ln() * mean) * MS as f64) as u64 + MS
    }

    /// Starts a new incarnation of `id` from its disk; the caller builds its
    /// executor around the engine returned.
    pub(super) fn boot(&mut self, id: NodeId) -> Engine {
        let seed = self.seed;
        let now = self.now;
        let persistent = self.cfg.persistent_state_machine;
        let mutations = self.cfg.mutations;
        let n = &mut self.nodes[idx(id)];
        n.incarnation += 1;
        n.alive = true;
        n.inbox.clear();
        n.preempted_until = None;
        n.paused_until = None;
        n.observed = Default::default();
        let snapshot_index = n
            .disk
            .snapshot
            .as_ref()
            .map(|s| s.last_included.index)
            .unwrap_or(LogIndex::ZERO);
        // A persistent state machine keeps what it applied across the crash (it is
        // only brought up to the snapshot if behind it); the engine must go on after
        // it, never applying an entry twice (`SimMachine::apply` refuses).
        if !persistent || n.sm.applied_index() < snapshot_index {
            n.sm = n.disk.snapshot_machine().unwrap_or_default();
        }
        let init = InitialState {
            hard_state: n
                .disk
                .hard_state
                .clone()
                .unwrap_or_else(HardState::bootstrap),
            snapshot: n.disk.snapshot,
            entries: n.disk.entries.clone(),
            applied: n.sm.applied_index(),
        };
        let mut engine = Engine::new(
            n.cfg.clone(),
            init,
            n.local(now),
            seed ^ (id.0 << 32) ^ n.incarnation,
        );
        engine.set_mutations(mutations);
        let inc = n.incarnation;
        if id == WITNESS {
            self.check_witness_boot();
        }
        self.state_restored(id);
        let first_tick = self.rng.random_range(0..5 * MS);
        self.schedule(first_tick, Ev::Tick(id, inc));
        engine
    }

    /// Kills `id` as SIGKILL would: what its disk had not made durable is lost,
    /// except a random prefix of it that reached the platter first.
    pub(super) fn kill(&mut self, id: NodeId) {
        if !self.live(id) {
            return;
        }
        self.stats.crashes += 1;
        self.trace(|| format!("CRASH {id}"));
        let pending = self.node(id).disk.pending.len();
        let survive = if pending == 0 {
            0
        } else {
            self.rng.random_range(0..=pending)
        };
        let made_it = self.nodes[idx(id)].disk.crash(survive);
        for op in &made_it {
            self.disk_op_durable(id, op);
        }
        let alarms = self.node(id).observed.alarms;
        self.checker.alarms_of_dead += alarms;
        let n = &mut self.nodes[idx(id)];
        n.alive = false;
        n.inbox.clear();
        n.paused_until = None;
        n.preempted_until = None;
        n.observed = Default::default();
    }

    /// A crash, then a restart after a downtime: a share of them well within one
    /// election timeout (what the start-up window exists for).
    fn crash_and_restart(&mut self, victim: NodeId) {
        self.kill(victim);
        if self.rng.random_bool(self.cfg.faults.wipe) && self.may_wipe(victim) {
            self.wipe(victim);
        }
        let timeout = self.cfg.timing.failover_timeout.as_nanos() as u64;
        let down = if self.rng.random_bool(self.cfg.faults.fast_restart) {
            self.paths.fast_restarts += 1;
            self.rng.random_range(MS / 10..=(timeout / 3).max(MS))
        } else {
            self.rng.random_range(50..1_500) * MS
        };
        self.schedule(down, Ev::Restart(victim));
    }

    /// The disk is lost: the node rejoins empty, as a non-voter.
    fn wipe(&mut self, victim: NodeId) {
        self.stats.wipes += 1;
        self.trace(|| format!("WIPE {victim}"));
        let lost = &self.node(victim).disk;
        let mut held: Vec<Position> = lost.entries.iter().map(|e| e.position).collect();
        held.extend(
            lost.snapshot_terms
                .iter()
                .enumerate()
                .map(|(k, t)| Position::new(*t, LogIndex(k as u64 + 1))),
        );
        self.checker
            .wiped_durable
            .entry(victim)
            .or_default()
            .extend(held);
        if victim == WITNESS {
            self.checker.witness_wiped();
        }
        let n = &mut self.nodes[idx(victim)];
        n.disk = super::model::SimDisk {
            hard_state: Some(HardState::joining()),
            ..Default::default()
        };
        // A persistent state machine lives on the lost disk too.
        n.sm = SimMachine::default();
    }

    /// Called before every action a node's executor runs: the process may be
    /// descheduled there, for a moment or a long pause, or killed.
    pub(super) fn preempt_point(&mut self, id: NodeId, inc: u64) -> Poll<()> {
        let now = self.now;
        if let Some(until) = self.node(id).preempted_until {
            if now < until {
                return Poll::Pending;
            }
            self.node_mut(id).preempted_until = None;
            return Poll::Ready(());
        }
        let p = if self.healing {
            0.0
        } else {
            self.cfg.faults.preempt
        };
        if p == 0.0 || !self.rng.random_bool(p) {
            return Poll::Ready(());
        }
        let r: f64 = self.rng.random();
        let until = if r < 0.2 {
            // Killed between two actions of one step.
            let at = self.rng.random_range(0..50_000u64);
            self.crash_mid_step(id, inc, at);
            u64::MAX
        } else if r < 0.45 {
            // Stopped (SIGSTOP, a long GC) between deciding and answering.
            self.paths.pauses_mid_step += 1;
            let d = self.rng.random_range(5..600) * MS;
            let n = self.node_mut(id);
            n.paused_until = Some(n.paused_until.map_or(now + d, |u| u.max(now + d)));
            now + d
        } else {
            self.rng.random_range(1..200_000u64) + now
        };
        self.node_mut(id).preempted_until = Some(until);
        if until != u64::MAX {
            self.schedule(until - now, Ev::Resume);
        }
        Poll::Pending
    }

    /// Called when a durable operation is issued: now and then the node dies
    /// before it is durable (the sends it depends on must not have left yet).
    pub(super) fn maybe_crash_during_disk_op(&mut self, id: NodeId, inc: u64, latency: u64) {
        let p = if self.healing {
            0.0
        } else {
            self.cfg.faults.preempt / 2.0
        };
        if latency == 0 || p == 0.0 || !self.rng.random_bool(p) {
            return;
        }
        let at = self.rng.random_range(0..latency);
        self.crash_mid_step(id, inc, at);
    }

    /// Kills `id`'s incarnation `inc` in `at` (while it is inside a step) and
    /// restarts it within about an election timeout.
    fn crash_mid_step(&mut self, id: NodeId, inc: u64, at: u64) {
        self.paths.crashes_mid_step += 1;
        self.schedule(at, Ev::Crash(id, inc));
        let timeout = self.cfg.timing.failover_timeout.as_nanos() as u64;
        let down = self.rng.random_range(MS / 10..=timeout.max(MS));
        self.schedule(at + down, Ev::Restart(id));
    }

    /// The witness answered a primary's heartbeat: with the configured
    /// probability the primary is cut off from everyone at this instant, the
    /// lease's worst case.
    pub(super) fn maybe_isolate_after_renewal(&mut self, primary: NodeId) {
        let p = self.cfg.faults.isolate_after_renewal;
        if self.healing || p == 0.0 || !self.rng.random_bool(p) {
            return;
        }
        self.paths.isolations_after_renewal += 1;
        let d = self.rng.random_range(200..1_500) * MS;
        for o in ALL {
            if o != primary {
                self.cut_for(primary, o, true, d);
            }
        }
    }

    pub(super) fn inject_fault(&mut self) {
        if self.healing {
            return;
        }
        let gap = self.fault_gap();
        self.schedule(gap, Ev::Fault);
        let r: f64 = self.rng.random();
        let victim = ALL[self.rng.random_range(0..3)];
        if r < self.cfg.switchover {
            if let Some(p) = self.primary() {
                self.switchover(p);
            }
        } else if r < 0.35 {
            if victim == WITNESS && self.rng.random_bool(0.4) {
                self.witness_restart_during_partition();
            } else if self.live(victim) {
                self.crash_and_restart(victim);
            }
        } else if r < 0.75 {
            self.stats.partitions += 1;
            let other = ALL[self.rng.random_range(0..3)];
            if other == victim {
                // Isolate the victim from everyone.
                for o in ALL {
                    if o != victim {
                        self.cut(victim, o, true);
                    }
                }
            } else {
                let symmetric = self.rng.random_bool(0.6);
                self.cut(victim, other, symmetric);
            }
        } else if self.live(victim) {
            self.stats.pauses += 1;
            let d = self.rng.random_range(20..600) * MS;
            let until = self.now + d;
            self.trace(|| format!("PAUSE {victim} for {}ms", d / MS));
            let n = self.node_mut(victim);
            n.paused_until = Some(n.paused_until.map_or(until, |u| u.max(until)));
            self.schedule(d, Ev::Resume);
        }
    }

    /// The standby loses the primary, and while it campaigns the witness restarts
    /// within an election timeout: what the start-up window exists for (a restarted
    /// voter forgot that it heard a live primary whose lease may still run).
    fn witness_restart_during_partition(&mut self) {
        let Some(p) = self.primary() else { return };
        let Some(s) = DATA.into_iter().find(|d| *d != p) else {
            return;
        };
        if !self.live(WITNESS) || !self.live(s) {
            return;
        }
        self.paths.witness_restarts_during_partition += 1;
        let timeout = self.cfg.timing.failover_timeout.as_nanos() as u64;
        let d = self.rng.random_range(500..1_500) * MS;
        // The standby still reaches the witness (and the primary does too).
        for link in [(s, WITNESS), (WITNESS, s), (p, WITNESS), (WITNESS, p)] {
            self.links_down.remove(&link);
        }
        self.cut_for(p, s, true, d);
        let at = self.rng.random_range(timeout..=2 * timeout);
        let inc = self.node(WITNESS).incarnation;
        self.schedule(at, Ev::Crash(WITNESS, inc));
        let down = self.rng.random_range(MS / 10..=(timeout / 4).max(MS));
        self.schedule(at + down, Ev::Restart(WITNESS));
    }

    /// A vote request to the witness is on its way (`delay` until it arrives): now
    /// and then the witness is killed now and back before it arrives.
    pub(super) fn maybe_restart_before_vote(&mut self, delay: u64) {
        let p = self.cfg.faults.restart_before_vote;
        if self.healing || p == 0.0 || !self.live(WITNESS) || !self.rng.random_bool(p) {
            return;
        }
        self.paths.restarts_before_vote += 1;
        self.kill(WITNESS);
        self.schedule(delay / 2, Ev::Restart(WITNESS));
    }

    /// Asks `primary` for a planned switchover.
    pub(super) fn switchover(&mut self, primary: NodeId) {
        let op = self.workload.admin_op();
        self.paths.switchovers_asked += 1;
        self.push_input(primary, Input::Admin(op, Admin::Switchover));
    }

    /// Losing a disk is survivable only while another copy of every acknowledged
    /// write exists: a data node's disk may go only if the other data node is a
    /// voter holding every acknowledged write durably.
    fn may_wipe(&self, victim: NodeId) -> bool {
        // Losing the state of two of three members at once is not survivable (as in
        // any majority protocol): wipe only while every other member votes.
        let others_vote = ALL.into_iter().filter(|n| *n != victim).all(|n| {
            self.node(n)
                .disk
                .hard_state
                .as_ref()
                .is_some_and(|h| h.voter)
        });
        if !others_vote {
            return false;
        }
        if victim == WITNESS {
            return true;
        }
        let other = if victim == DATA[0] { DATA[1] } else { DATA[0] };
        let o = self.node(other);
        let voter = o.disk.hard_state.as_ref().is_some_and(|h| h.voter);
        // Degraded sync's documented trade-off: a standby below its witness floor
        // cannot be elected; if the primary's disk is then lost, an operator must
        // force a promotion. Not a fault the cluster can ride out alone.
        let floor = self
            .node(WITNESS)
            .disk
            .hard_state
            .as_ref()
            .map(|h| h.floor(other))
            .unwrap_or_default();
        let last = o.disk.last_position();
        // Nor may it take the only copy of something it acked: the other node holds
        // the victim's last durable entry (and so, by log matching, all before it).
        let v = &self.node(victim).disk;
        let victim_last = (v.last_index() > LogIndex::ZERO).then(|| v.last_position());
        let covered = victim_last.is_none_or(|p| {
            o.disk.holds(p) || p.index <= o.disk.last_index() && p.term < last.term
        });
        voter && covered && last >= floor && self.workload.acked.iter().all(|p| o.disk.holds(*p))
    }

    pub(super) fn heal(&mut self) -> Vec<NodeId> {
        self.healing = true;
        self.links_down.clear();
        for n in self.nodes.iter_mut() {
            n.paused_until = None;
        }
        ALL.into_iter().filter(|id| !self.live(*id)).collect()
    }
}
