//! The client workload: writes and linearizable reads sent to the node believed
//! to lead, and what their answers must satisfy.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::Rng;

use super::model::{SimReadAnswer, SimWrite};
use super::world::{Ev, World, DATA};
use crate::engine::ClientId;
use crate::error::Error;
use crate::executor::Input;
use crate::replicator::{ReadConsistency, WriteAck};
use crate::types::{LogIndex, NodeId, Position};

#[derive(Clone, Debug)]
enum OpKind {
    Write(SimWrite),
    /// A read of `key`; `acked_before` writes were acknowledged when it began.
    Read {
        acked_before: usize,
    },
}

#[derive(Clone, Debug)]
struct Op {
    kind: OpKind,
    invoked: u64,
}

/// Availability: write attempts and successes, by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Availability {
    /// Writes answered (either way) while faults were active.
    pub fault_attempts: u64,
    /// Of those, acknowledged.
    pub fault_acked: u64,
    /// Writes answered by a primary after healing settled.
    pub healed_attempts: u64,
    /// Of those, acknowledged.
    pub healed_acked: u64,
}

/// The clients' state.
#[derive(Default)]
pub(super) struct Workload {
    ops: HashMap<u64, Op>,
    admin_ops: BTreeSet<u64>,
    next_op: u64,
    pub(super) leader_hint: Option<NodeId>,
    /// Every acknowledged write's position, in acknowledgement order.
    pub(super) acked: Vec<Position>,
    acked_ids: BTreeMap<u64, Position>,
    pub(super) progress_acked: bool,
    pub(super) availability: Availability,
}

impl Workload {
    fn next_id(&mut self) -> ClientId {
        self.next_op += 1;
        self.next_op
    }

    /// An id for an operator request.
    pub(super) fn admin_op(&mut self) -> ClientId {
        let op = self.next_id();
        self.admin_ops.insert(op);
        op
    }
}

impl World {
    pub(super) fn client_op(&mut self) {
        let gap = self.rng.random_range(1..=2 * self.cfg.mean_op_interval_us) * 1_000;
        self.schedule(gap, Ev::ClientOp);
        if self.quiet {
            return;
        }
        let target = match self.workload.leader_hint {
            Some(l) if self.rng.random_bool(0.9) => l,
            _ => DATA[self.rng.random_range(0..2)],
        };
        if !self.live(target) || self.node(target).paused(self.now) {
            self.workload.leader_hint = None;
            return;
        }
        let op = self.workload.next_id();
        let key = self.rng.random_range(0..4u8);
        let invoked = self.now;
        if self.rng.random_bool(0.8) {
            let w = SimWrite { id: op, key };
            self.workload.ops.insert(
                op,
                Op {
                    kind: OpKind::Write(w),
                    invoked,
                },
            );
            self.push_input(target, Input::Writes(vec![(op, w.command())]));
        } else {
            let acked_before = self.workload.acked.len();
            self.workload.ops.insert(
                op,
                Op {
                    kind: OpKind::Read { acked_before },
                    invoked,
                },
            );
            self.push_input(
                target,
                Input::Read {
                    id: op,
                    query: vec![key],
                    consistency: ReadConsistency::Linearizable,
                },
            );
        }
    }

    pub(super) fn write_done(&mut self, id: NodeId, op: u64, result: Result<WriteAck, Error>) {
        let Some(o) = self.workload.ops.remove(&op) else {
            return;
        };
        let OpKind::Write(w) = o.kind else { return };
        let settled = self.healing && o.invoked >= self.heal_at + self.settle();
        let not_leader = matches!(result, Err(Error::NotLeader { .. }));
        let a = &mut self.workload.availability;
        if self.healing {
            if settled && !not_leader {
                a.healed_attempts += 1;
                a.healed_acked += u64::from(result.is_ok());
            }
        } else {
            a.fault_attempts += 1;
            a.fault_acked += u64::from(result.is_ok());
        }
        match result {
            Ok(ack) => {
                let pos = ack.position;
                self.lease_checked(id, "a write acknowledgement");
                self.check_sync_apply_ack(id, pos);
                self.stats.writes_acked += 1;
                self.workload.acked.push(pos);
                self.workload.acked_ids.insert(w.id, pos);
                if let Some(t) = self.disrupted_at.take() {
                    let gap = self.now - t;
                    self.recovery_ns.push(gap);
                    self.note(format!(
                        "first write after the disruption acknowledged by {id} at {pos}: {:.1} ms later",
                        gap as f64 / 1e6
                    ));
                }
                if settled {
                    self.workload.progress_acked = true;
                }
            }
            Err(Error::NotLeader { leader, .. }) => self.workload.leader_hint = leader,
            Err(_) => {}
        }
    }

    /// Invariant 6: a linearizable read sees every write acknowledged before it
    /// was invoked (the log order is the linearization), except writes an async
    /// failover was allowed to lose; and it reflects the no-op of its term.
    pub(super) fn read_done(&mut self, id: NodeId, op: u64, result: Result<Vec<u8>, Error>) {
        let Some(o) = self.workload.ops.remove(&op) else {
            return;
        };
        let OpKind::Read { acked_before, .. } = o.kind else {
            return;
        };
        match result {
            Ok(bytes) => {
                self.lease_checked(id, "a read");
                self.stats.reads_served += 1;
                let Ok(answer) = postcard::from_bytes::<SimReadAnswer>(&bytes) else {
                    self.violation(format!("{id} answered a read with undecodable bytes"));
                    return;
                };
                self.check_read(id, answer, acked_before);
            }
            Err(Error::NotLeader { leader, .. }) => self.workload.leader_hint = leader,
            Err(_) => {}
        }
    }

    fn check_read(&mut self, id: NodeId, answer: SimReadAnswer, acked_before: usize) {
        let term = self.node(id).observed.term;
        if answer.last_term != term {
            self.violation(format!(
                "read on {id} in term {term} served from state whose last entry is of term {} (its no-op is not applied)",
                answer.last_term
            ));
        }
        let must_see = self.workload.acked[..acked_before]
            .iter()
            .filter(|p| !self.checker.lost.contains(p))
            .map(|p| p.index)
            .max()
            .unwrap_or(LogIndex::ZERO);
        if answer.applied < must_see {
            self.violation(format!(
                "stale read on {id}: state at {} but a write at {must_see} was acknowledged before the read began",
                answer.applied
            ));
        }
        if let Some(v) = answer.value {
            if let Some(p) = self.workload.acked_ids.get(&v) {
                if p.index > answer.applied {
                    self.violation(format!(
                        "read on {id} returned a value written after its state"
                    ));
                }
            }
        }
    }

    pub(super) fn admin_done(&mut self, op: u64, result: Result<(), Error>) {
        if self.workload.admin_ops.remove(&op) && result.is_ok() {
            self.stats.switchovers += 1;
        }
    }
}
