//! The simulated world every node's executor runs in: virtual time and its event
//! queue, each node's disk, state machine, clock and inbox, and the counters.
//! The network, faults, workload and checker are `impl World` blocks of their own
//! files.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::checker::Checker;
use super::config::SimConfig;
use super::model::{SimDisk, SimMachine};
use super::network::Msg;
use super::workload::Workload;
use super::{PathCounts, SimStats};
use crate::config::{Config, Member};
use crate::executor::Input;
use crate::types::{HardState, Instant, MemberKind, NodeId, Role, Term};

pub(super) const MS: u64 = 1_000_000;
pub(super) const DATA: [NodeId; 2] = [NodeId(1), NodeId(2)];
pub(super) const WITNESS: NodeId = NodeId(3);
pub(super) const ALL: [NodeId; 3] = [DATA[0], DATA[1], WITNESS];

/// Something scheduled at a simulated time.
#[derive(Clone, Debug)]
pub(super) enum Ev {
    Tick(NodeId, u64),
    Deliver(Msg),
    /// The oldest pending disk operation of the node's incarnation completes.
    DiskDone(NodeId, u64),
    /// A preempted or paused node may run again.
    Resume,
    /// The node's incarnation is killed (SIGKILL), wherever it is in a step.
    Crash(NodeId, u64),
    ClientOp,
    Fault,
    Restart(NodeId),
    LinkUp(NodeId, NodeId),
    /// A clock switches to another rate (edge clocks).
    ClockChange,
    Heal,
    Quiesce,
    Script(super::config::Scripted),
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A node's clock: continuous and monotonic, its rate may change during the run.
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    base_real: u64,
    base_local: u64,
    pub(super) rate: f64,
}

impl Clock {
    pub(super) fn local(&self, real: u64) -> Instant {
        let since = real.saturating_sub(self.base_real) as f64 * self.rate;
        Instant(self.base_local + since as u64)
    }

    /// Switches to `rate` from `real` on, without a jump.
    pub(super) fn set_rate(&mut self, real: u64, rate: f64) {
        self.base_local = self.local(real).0;
        self.base_real = real;
        self.rate = rate;
    }
}

/// What the checker last saw of a node's engine (published after every step).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Observed {
    pub(super) role: Option<Role>,
    pub(super) term: Term,
    pub(super) lease_expiry: Option<Instant>,
    /// While primary: when the rules make it step down for want of a lease.
    pub(super) step_down_at: Option<Instant>,
    /// The node's clock at its last engine step (what its actions were decided at).
    pub(super) stepped_at: Instant,
    pub(super) alarms: u64,
}

/// One node of the world.
pub(super) struct NodeState {
    pub(super) id: NodeId,
    pub(super) cfg: Config,
    /// Bumped at every boot; operations of an older incarnation are void.
    pub(super) incarnation: u64,
    pub(super) alive: bool,
    pub(super) disk: SimDisk,
    pub(super) sm: SimMachine,
    pub(super) clock: Clock,
    pub(super) paused_until: Option<u64>,
    pub(super) inbox: VecDeque<Input>,
    /// Suspended before an action until this time.
    pub(super) preempted_until: Option<u64>,
    pub(super) observed: Observed,
}

impl NodeState {
    pub(super) fn local(&self, real: u64) -> Instant {
        self.clock.local(real)
    }

    pub(super) fn paused(&self, now: u64) -> bool {
        self.paused_until.is_some_and(|t| t > now)
    }

    pub(super) fn has_lease(&self, now: u64) -> bool {
        self.alive
            && self
                .observed
                .lease_expiry
                .is_some_and(|end| self.local(now) < end)
    }
}

/// The whole simulated world.
pub(super) struct World {
    pub(super) cfg: SimConfig,
    pub(super) rng: SmallRng,
    pub(super) seed: u64,
    pub(super) now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    pub(super) nodes: Vec<NodeState>,
    pub(super) links_down: BTreeSet<(NodeId, NodeId)>,
    pub(super) healing: bool,
    pub(super) quiet: bool,
    pub(super) heal_at: u64,
    pub(super) end_at: u64,
    pub(super) workload: Workload,
    pub(super) checker: Checker,
    pub(super) stats: SimStats,
    pub(super) paths: PathCounts,
    pub(super) timeline: Vec<(u64, String)>,
    pub(super) recovery_ns: Vec<u64>,
    pub(super) disrupted_at: Option<u64>,
    pub(super) violations: Vec<String>,
}

fn member(id: NodeId) -> Member {
    let kind = if id == WITNESS {
        MemberKind::Witness
    } else {
        MemberKind::Data
    };
    Member {
        id,
        addr: format!("sim-{}", id.0),
        kind,
    }
}

pub(super) fn idx(id: NodeId) -> usize {
    (id.0 - 1) as usize
}

impl World {
    pub(super) fn new(seed: u64, cfg: SimConfig) -> World {
        let mut rng = SmallRng::seed_from_u64(seed);
        let rho = f64::from(cfg.faults.clock_drift_ppm) / 1_000_000.0;
        let mut nodes = Vec::new();
        for id in ALL {
            let kind = if id == WITNESS {
                MemberKind::Witness
            } else {
                MemberKind::Data
            };
            let peers = ALL.into_iter().filter(|p| *p != id).map(member).collect();
            let mut c = Config::new(id, kind, format!("sim-{}", id.0), peers);
            c.commit_mode = cfg.commit_mode;
            c.strict_sync = cfg.strict_sync;
            c.max_lag_on_failover = (cfg.commit_mode == crate::types::CommitMode::Async)
                .then_some(cfg.max_lag_on_failover);
            c.clock_drift_ppm = cfg.faults.clock_drift_ppm;
            c.snapshot_every = cfg.snapshot_every;
            c.snapshot_chunk_bytes = cfg.snapshot_chunk_bytes;
            c.wal_batch_size = 64;
            let t = cfg.timing;
            c.failover_timeout = t.failover_timeout;
            c.failover_jitter = t.failover_jitter;
            c.heartbeat_interval = t.heartbeat_interval;
            c.tick_interval = t.tick_interval;
            c.degrade_timeout = t.failover_timeout.mul_f64(2.0 / 3.0);
            let rate = if cfg.faults.edge_clocks {
                if rng.random_bool(0.5) {
                    1.0 + rho
                } else {
                    1.0 - rho
                }
            } else {
                1.0 + rho * (2.0 * rng.random::<f64>() - 1.0)
            };
            let offset = rng.random_range(0..1_000_000_000u64);
            nodes.push(NodeState {
                id,
                cfg: c,
                incarnation: 0,
                alive: false,
                disk: SimDisk {
                    hard_state: Some(HardState::bootstrap()),
                    ..SimDisk::default()
                },
                sm: SimMachine::default(),
                clock: Clock {
                    base_real: 0,
                    base_local: offset,
                    rate,
                },
                paused_until: None,
                inbox: VecDeque::new(),
                preempted_until: None,
                observed: Observed::default(),
            });
        }
        let heal_at = cfg.fault_time.as_nanos() as u64;
        let end_at = heal_at + cfg.heal_time.as_nanos() as u64;
        let mut w = World {
            cfg,
            rng,
            seed,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            links_down: BTreeSet::new(),
            healing: false,
            quiet: false,
            heal_at,
            end_at,
            workload: Workload::default(),
            checker: Checker::default(),
            stats: SimStats::default(),
            paths: PathCounts::default(),
            timeline: Vec::new(),
            recovery_ns: Vec::new(),
            disrupted_at: None,
            violations: Vec::new(),
        };
        w.schedule(0, Ev::ClientOp);
        if w.cfg.faults.mean_fault_interval_ms > 0 {
            let first_fault = w.fault_gap();
            w.schedule(first_fault, Ev::Fault);
        }
        if w.cfg.faults.edge_clocks {
            let gap = w.rng.random_range(100..1_000) * MS;
            w.schedule(gap, Ev::ClockChange);
        }
        for (at, step) in w.cfg.script.clone() {
            w.schedule(at.as_nanos() as u64, Ev::Script(step));
        }
        w.schedule(heal_at, Ev::Heal);
        w.schedule(end_at.saturating_sub(1_000 * MS), Ev::Quiesce);
        w
    }

    pub(super) fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            ev,
        }));
    }

    /// The next event before the end, advancing the clock to it.
    pub(super) fn next_event(&mut self) -> Option<Ev> {
        let Reverse(s) = self.queue.pop()?;
        if s.at > self.end_at {
            return None;
        }
        self.now = s.at;
        Some(s.ev)
    }

    pub(super) fn node(&self, id: NodeId) -> &NodeState {
        &self.nodes[idx(id)]
    }

    pub(super) fn node_mut(&mut self, id: NodeId) -> &mut NodeState {
        &mut self.nodes[idx(id)]
    }

    pub(super) fn live(&self, id: NodeId) -> bool {
        self.node(id).alive
    }

    /// True if `inc` is the node's live incarnation.
    pub(super) fn current(&self, id: NodeId, inc: u64) -> bool {
        let n = self.node(id);
        n.alive && n.incarnation == inc
    }

    pub(super) fn trace(&self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            eprintln!("[{:>8.3}ms] {}", self.now as f64 / 1e6, what());
        }
    }

    pub(super) fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!(
                "t={:.3}s seed={}: {what}",
                self.now as f64 / 1e9,
                self.seed
            ));
        }
    }

    pub(super) fn note(&mut self, what: String) {
        self.timeline.push((self.now, what));
    }

    /// The node whose engine is primary, if any.
    pub(super) fn primary(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.alive && n.observed.role == Some(Role::Primary))
            .map(|n| n.id)
    }

    /// Queues an input for a node's executor (it runs when next polled).
    pub(super) fn push_input(&mut self, id: NodeId, input: Input) {
        self.node_mut(id).inbox.push_back(input);
    }

    /// The latency of one durable disk operation.
    pub(super) fn disk_latency(&mut self) -> u64 {
        let (lo, hi) = self.cfg.faults.disk_us;
        self.rng.random_range(lo..=hi.max(lo)) * 1_000
    }

    /// How long after healing a write must succeed (invariant 5): half of the heal
    /// phase before writes stop.
    pub(super) fn settle(&self) -> u64 {
        (self.cfg.heal_time.as_nanos() as u64).saturating_sub(1_000 * MS) / 2
    }

    pub(super) fn sync_mode(&self) -> bool {
        self.cfg.commit_mode != crate::types::CommitMode::Async
    }

    /// Switches one clock to the other edge of the drift bound.
    pub(super) fn clock_change(&mut self) {
        let rho = f64::from(self.cfg.faults.clock_drift_ppm) / 1_000_000.0;
        let k = self.rng.random_range(0..ALL.len());
        let now = self.now;
        let clock = &mut self.nodes[k].clock;
        let rate = if clock.rate > 1.0 {
            1.0 - rho
        } else {
            1.0 + rho
        };
        clock.set_rate(now, rate);
        self.paths.clock_changes += 1;
        let gap = self.rng.random_range(100..1_000) * MS;
        self.schedule(gap, Ev::ClockChange);
    }
}
