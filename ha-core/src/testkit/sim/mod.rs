//! The deterministic simulator: two data nodes and a witness running the real
//! [`Engine`], a client workload, a faulty network, crashing disks, pausing
//! processes and drifting clocks, all decided by one seed. After every step it
//! checks the invariants of DESIGN.md section 4.
//!
//! `run(seed, &config)` replays exactly; a failing seed is reproduced alone with
//! `cargo xtask sim --seed S` (plus the same mode flags).

mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use self::model::{SimDisk, SimMachine, SimWrite};
use crate::config::{Config, Member};
use crate::engine::{Action, Admin, Engine, Event, InitialState, Mutations};
use crate::error::{Error, StorageError};
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::message::{Envelope, Request, Response};
use crate::testkit::memory::retention_point;
use crate::types::{
    CommitMode, HardState, Instant, LogIndex, MemberKind, NodeId, Position, Role, Term,
};

const MS: u64 = 1_000_000;

/// What the network, disks and processes may do wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Probability a message is lost.
    pub drop: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Delivery delay range in microseconds (random within, so messages reorder).
    pub delay_us: (u64, u64),
    /// Probability a message is held back much longer (reordering spikes).
    pub delay_spike: f64,
    /// Mean time between injected faults (crash, partition, pause), in ms.
    pub mean_fault_interval_ms: u64,
    /// Relative clock rate bound in ppm (each node drifts within ±half of it).
    pub clock_drift_ppm: u32,
    /// Probability that a crash also loses the node's disk (it rejoins empty).
    pub wipe: f64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            drop: 0.02,
            duplicate: 0.01,
            delay_us: (50, 2_000),
            delay_spike: 0.01,
            mean_fault_interval_ms: 400,
            clock_drift_ppm: 10_000,
            wipe: 0.1,
        }
    }
}

/// One simulated run's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Commit mode every data node runs.
    pub commit_mode: CommitMode,
    /// Strict sync (never commit without the standby).
    pub strict_sync: bool,
    /// Async mode's bound on lost acknowledged writes per failover.
    pub max_lag_on_failover: u64,
    /// Simulated time with faults.
    pub fault_time: Duration,
    /// Simulated time after every fault healed; writes stop for its last second.
    pub heal_time: Duration,
    /// Faults.
    pub faults: FaultConfig,
    /// Snapshot and compact every this many applied entries.
    pub snapshot_every: u64,
    /// The disks' retention policy: entries kept behind the snapshot for a lagging
    /// standby, at most (0: purge all a snapshot covers, so a lagging standby
    /// always gets the snapshot).
    pub retain_entries: u64,
    /// Probability that a read of the durable log fails (an I/O error), so the
    /// primary falls back to sending the snapshot.
    pub read_failure: f64,
    /// The state machine persists its own state (as an on-disk store does): it
    /// survives a crash with everything it applied, instead of being rebuilt from
    /// the snapshot, and the engine must not apply anything twice.
    pub persistent_state_machine: bool,
    /// Mean time between client operations, in microseconds.
    pub mean_op_interval_us: u64,
    /// Rules switched off (mutation tests).
    pub mutations: Mutations,
    /// Probability per fault slot of an operator switchover instead of a fault.
    pub switchover: f64,
    /// Print a readable timeline (faults, role changes, leases) to stderr.
    pub trace: bool,
    /// Scripted operator and fault steps, at simulated times (the demo uses these;
    /// set `faults.mean_fault_interval_ms` to 0 for a run without random faults).
    pub script: Vec<(Duration, Scripted)>,
}

/// A scripted step for a demonstration run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scripted {
    /// Kill the current primary (as SIGKILL: unsynced data is lost).
    CrashPrimary,
    /// Restart every crashed node.
    RestartAll,
    /// Ask the current primary for a planned switchover.
    Switchover,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            commit_mode: CommitMode::Sync,
            strict_sync: false,
            max_lag_on_failover: 0,
            fault_time: Duration::from_secs(4),
            heal_time: Duration::from_secs(4),
            faults: FaultConfig::default(),
            snapshot_every: 64,
            retain_entries: 256,
            read_failure: 0.05,
            persistent_state_machine: false,
            mean_op_interval_us: 4_000,
            mutations: Mutations::default(),
            switchover: 0.1,
            trace: false,
            script: Vec::new(),
        }
    }
}

impl SimConfig {
    /// The config mix `cargo xtask sim --seeds N` and `cargo test` use: seed `s`
    /// picks a commit mode so every mode is covered.
    pub fn for_seed(seed: u64) -> SimConfig {
        let mut c = SimConfig {
            // Retention: none (snapshots only), a short tail, a long one.
            retain_entries: [0, 48, 256][((seed / 6) % 3) as usize],
            persistent_state_machine: (seed / 18) % 2 == 1,
            ..SimConfig::default()
        };
        match seed % 6 {
            0..=2 => {}
            3 => c.commit_mode = CommitMode::SyncApply,
            4 => c.strict_sync = true,
            _ => {
                c.commit_mode = CommitMode::Async;
                c.max_lag_on_failover = 8;
            }
        }
        c
    }
}

/// Counters from one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Engine steps executed.
    pub steps: u64,
    /// Writes the clients saw acknowledged.
    pub writes_acked: u64,
    /// Linearizable reads served.
    pub reads_served: u64,
    /// Times a node became primary.
    pub elections: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Crashes that also lost the disk.
    pub wipes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Pauses injected.
    pub pauses: u64,
    /// Switchovers that completed.
    pub switchovers: u64,
    /// Snapshots installed on a lagging node.
    pub snapshots_installed: u64,
    /// Reads of a primary's durable log that served a lagging standby.
    pub catch_up_reads: u64,
    /// Acknowledged writes discarded by async failovers.
    pub discarded: u64,
}

/// The outcome of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Invariant violations, each with the simulated time it was seen.
    pub violations: Vec<String>,
    /// Counters.
    pub stats: SimStats,
    /// Notable moments (primary changes, crashes, first write after a disruption),
    /// with their simulated time in nanoseconds.
    pub timeline: Vec<(u64, String)>,
    /// For each scripted disruption: time from it until the next write was
    /// acknowledged, in nanoseconds.
    pub recovery_ns: Vec<u64>,
}

/// Runs one seed to the end and reports.
pub fn run(seed: u64, config: &SimConfig) -> SimReport {
    let mut sim = Sim::new(seed, config.clone());
    sim.run();
    SimReport {
        seed,
        violations: sim.violations,
        stats: sim.stats,
        timeline: sim.timeline,
        recovery_ns: sim.recovery_ns,
    }
}

const DATA: [NodeId; 2] = [NodeId(1), NodeId(2)];
const WITNESS: NodeId = NodeId(3);

#[derive(Clone, Debug)]
enum Msg {
    Req(Envelope<Request>),
    Resp(Envelope<Response>),
}

impl Msg {
    fn route(&self) -> (NodeId, NodeId) {
        match self {
            Msg::Req(e) => (e.from, e.to),
            Msg::Resp(e) => (e.from, e.to),
        }
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Tick(NodeId, u64),
    Deliver(Msg),
    DiskDone(NodeId, u64),
    Persisted(NodeId, u64, Position),
    SnapshotTaken(NodeId, u64, Snapshot),
    EntriesRead(NodeId, u64, u64, Result<CatchUpBatch, StorageError>),
    ClientOp,
    Fault,
    Undo(Undo),
    Heal,
    Quiesce,
    Script(Scripted),
}

#[derive(Clone, Debug)]
enum Undo {
    Restart(NodeId),
    Link(NodeId, NodeId),
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

struct Node {
    id: NodeId,
    cfg: Config,
    engine: Option<Engine>,
    incarnation: u64,
    disk: SimDisk,
    sm: SimMachine,
    rate: f64,
    offset: u64,
    paused_until: Option<u64>,
    applied_since_snapshot: u64,
}

impl Node {
    fn local(&self, real: u64) -> Instant {
        Instant(self.offset + (real as f64 * self.rate) as u64)
    }
}

#[derive(Clone, Debug)]
enum OpKind {
    Write(SimWrite),
    Read { key: u8, must_see: LogIndex },
}

#[derive(Clone, Debug)]
struct Op {
    kind: OpKind,
    invoked: u64,
}

struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    seed: u64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<Node>,
    links_down: BTreeSet<(NodeId, NodeId)>,
    healing: bool,
    quiet: bool,
    heal_at: u64,
    end_at: u64,
    ops: HashMap<u64, Op>,
    admin_ops: BTreeSet<u64>,
    next_op: u64,
    leader_hint: Option<NodeId>,
    acked: Vec<Position>,
    acked_ids: BTreeMap<u64, Position>,
    max_acked: LogIndex,
    canonical: Vec<Term>,
    /// The highest floors the witness ever recorded (a wiped witness forgets them,
    /// but commits made on their strength stay justified).
    ghost_floors: HardState,
    /// What wiped disks held: acks they sent before the wipe still justify commits.
    wiped_durable: HashMap<NodeId, BTreeSet<Position>>,
    term_leaders: HashMap<Term, NodeId>,
    progress_acked: bool,
    last_holders: Vec<NodeId>,
    timeline: Vec<(u64, String)>,
    recovery_ns: Vec<u64>,
    disrupted_at: Option<u64>,
    violations: Vec<String>,
    stats: SimStats,
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

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let rho = f64::from(cfg.faults.clock_drift_ppm) / 1_000_000.0;
        let mut nodes = Vec::new();
        for id in [DATA[0], DATA[1], WITNESS] {
            let kind = if id == WITNESS {
                MemberKind::Witness
            } else {
                MemberKind::Data
            };
            let peers = [DATA[0], DATA[1], WITNESS]
                .into_iter()
                .filter(|p| *p != id)
                .map(member)
                .collect();
            let mut c = Config::new(id, kind, format!("sim-{}", id.0), peers);
            c.commit_mode = cfg.commit_mode;
            c.strict_sync = cfg.strict_sync;
            c.max_lag_on_failover = cfg.max_lag_on_failover;
            c.clock_drift_ppm = cfg.faults.clock_drift_ppm;
            c.snapshot_every = cfg.snapshot_every;
            c.wal_batch_size = 64;
            let rate = 1.0 + rho * (rng.random::<f64>() - 0.5);
            let offset = rng.random_range(0..1_000_000_000u64);
            nodes.push(Node {
                id,
                cfg: c,
                engine: None,
                incarnation: 0,
                disk: SimDisk {
                    hard_state: Some(HardState::bootstrap()),
                    ..SimDisk::default()
                },
                sm: SimMachine::default(),
                rate,
                offset,
                paused_until: None,
                applied_since_snapshot: 0,
            });
        }
        let heal_at = cfg.fault_time.as_nanos() as u64;
        let end_at = heal_at + cfg.heal_time.as_nanos() as u64;
        let mut sim = Sim {
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
            ops: HashMap::new(),
            admin_ops: BTreeSet::new(),
            next_op: 1,
            leader_hint: None,
            acked: Vec::new(),
            acked_ids: BTreeMap::new(),
            max_acked: LogIndex::ZERO,
            canonical: Vec::new(),
            ghost_floors: HardState::default(),
            wiped_durable: HashMap::new(),
            term_leaders: HashMap::new(),
            progress_acked: false,
            last_holders: Vec::new(),
            timeline: Vec::new(),
            recovery_ns: Vec::new(),
            disrupted_at: None,
            violations: Vec::new(),
            stats: SimStats::default(),
        };
        for id in [DATA[0], DATA[1], WITNESS] {
            sim.boot(id);
        }
        sim.schedule(0, Ev::ClientOp);
        if sim.cfg.faults.mean_fault_interval_ms > 0 {
            let first_fault = sim.fault_gap();
            sim.schedule(first_fault, Ev::Fault);
        }
        for (at, step) in sim.cfg.script.clone() {
            sim.schedule(at.as_nanos() as u64, Ev::Script(step));
        }
        sim.schedule(heal_at, Ev::Heal);
        sim.schedule(end_at.saturating_sub(1_000 * MS), Ev::Quiesce);
        sim
    }

    fn idx(id: NodeId) -> usize {
        (id.0 - 1) as usize
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            ev,
        }));
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            eprintln!("[{:>8.3}ms] {}", self.now as f64 / 1e6, what());
        }
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!(
                "t={:.3}s seed={}: {what}",
                self.now as f64 / 1e9,
                self.seed
            ));
        }
    }

    fn fault_gap(&mut self) -> u64 {
        let mean = self.cfg.faults.mean_fault_interval_ms as f64;
        let x: f64 = self.rng.random::<f64>().max(1e-9);
        ((-x.ln() * mean) * MS as f64) as u64 + MS
    }

    fn boot(&mut self, id: NodeId) {
        let seed = self.seed;
        let now = self.now;
        let n = &mut self.nodes[Self::idx(id)];
        n.incarnation += 1;
        n.disk.pending.clear();
        let init = InitialState {
            hard_state: n
                .disk
                .hard_state
                .clone()
                .unwrap_or_else(HardState::bootstrap),
            snapshot: n.disk.snapshot.clone(),
            entries: n.disk.entries.clone(),
            applied: LogIndex::ZERO,
        };
        let snapshot_index = n
            .disk
            .snapshot
            .as_ref()
            .map(|s| s.last_included.index)
            .unwrap_or(LogIndex::ZERO);
        // A persistent state machine keeps what it applied across the crash (it is
        // only brought up to the snapshot if behind it); the engine must go on after
        // it, never applying an entry twice (`SimMachine::apply` refuses).
        if !self.cfg.persistent_state_machine || n.sm.applied_index() < snapshot_index {
            n.sm = n
                .disk
                .snapshot
                .as_ref()
                .and_then(|s| SimMachine::decode(&s.data))
                .unwrap_or_default();
        }
        let init = InitialState {
            applied: n.sm.applied_index(),
            ..init
        };
        n.applied_since_snapshot = 0;
        let mut engine = Engine::new(
            n.cfg.clone(),
            init,
            n.local(now),
            seed ^ (id.0 << 32) ^ n.incarnation,
        );
        engine.set_mutations(self.cfg.mutations);
        n.engine = Some(engine);
        let inc = n.incarnation;
        let first_tick = self.rng.random_range(0..5 * MS);
        self.schedule(first_tick, Ev::Tick(id, inc));
    }

    fn run(&mut self) {
        let mut guard = 0u64;
        while let Some(Reverse(s)) = self.queue.pop() {
            if s.at > self.end_at {
                break;
            }
            guard += 1;
            if guard > 5_000_000 {
                self.violation("event budget exhausted (livelock?)".into());
                break;
            }
            self.now = s.at;
            self.handle(s.ev);
            self.check_leases();
        }
        self.now = self.end_at;
        self.final_checks();
    }

    fn live(&self, id: NodeId) -> bool {
        self.nodes[Self::idx(id)].engine.is_some()
    }

    /// Defers an event aimed at a paused node to its resume time.
    fn deferred(&mut self, id: NodeId, ev: &Ev) -> bool {
        if let Some(until) = self.nodes[Self::idx(id)].paused_until {
            if until > self.now {
                let delay = until - self.now;
                self.schedule(delay, ev.clone());
                return true;
            }
        }
        false
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick(id, inc) => {
                if self.nodes[Self::idx(id)].incarnation != inc || !self.live(id) {
                    return;
                }
                if self.deferred(id, &Ev::Tick(id, inc)) {
                    return;
                }
                self.step(id, Event::Tick);
                let n = &self.nodes[Self::idx(id)];
                let gap = (n.cfg.tick_interval.as_nanos() as f64 / n.rate) as u64;
                self.schedule(gap.max(1), Ev::Tick(id, inc));
            }
            Ev::Deliver(msg) => {
                let (from, to) = msg.route();
                if self.links_down.contains(&(from, to)) || !self.live(to) {
                    return;
                }
                if self.deferred(to, &Ev::Deliver(msg.clone())) {
                    return;
                }
                let event = match msg {
                    Msg::Req(e) => Event::Request(e),
                    Msg::Resp(e) => Event::Response(e),
                };
                self.step(to, event);
            }
            Ev::DiskDone(id, inc) => {
                if self.nodes[Self::idx(id)].incarnation != inc || !self.live(id) {
                    return;
                }
                if self.deferred(id, &Ev::DiskDone(id, inc)) {
                    return;
                }
                if let Some(pos) = self.nodes[Self::idx(id)].disk.complete_one() {
                    self.step(id, Event::Persisted(pos));
                }
            }
            Ev::Persisted(id, inc, pos) => {
                if self.nodes[Self::idx(id)].incarnation == inc && self.live(id) {
                    if self.deferred(id, &Ev::Persisted(id, inc, pos)) {
                        return;
                    }
                    self.step(id, Event::Persisted(pos));
                }
            }
            Ev::SnapshotTaken(id, inc, snap) => {
                if self.nodes[Self::idx(id)].incarnation == inc && self.live(id) {
                    if self.deferred(id, &Ev::SnapshotTaken(id, inc, snap.clone())) {
                        return;
                    }
                    self.step(id, Event::SnapshotTaken(snap));
                }
            }
            Ev::EntriesRead(id, inc, read_id, result) => {
                if self.nodes[Self::idx(id)].incarnation == inc && self.live(id) {
                    let ev = Ev::EntriesRead(id, inc, read_id, result.clone());
                    if self.deferred(id, &ev) {
                        return;
                    }
                    self.step(id, Event::EntriesRead { read_id, result });
                }
            }
            Ev::ClientOp => self.client_op(),
            Ev::Fault => self.inject_fault(),
            Ev::Undo(u) => self.undo(u),
            Ev::Heal => self.heal(),
            Ev::Quiesce => self.quiet = true,
            Ev::Script(step) => self.scripted(step),
        }
    }

    /// How long after healing a write must succeed (invariant 5): half of the heal
    /// phase before writes stop.
    fn settle(&self) -> u64 {
        (self.cfg.heal_time.as_nanos() as u64).saturating_sub(1_000 * MS) / 2
    }

    fn note(&mut self, what: String) {
        self.timeline.push((self.now, what));
    }

    fn primary(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.engine.as_ref().is_some_and(|e| e.role() == Role::Primary))
            .map(|n| n.id)
    }

    fn scripted(&mut self, step: Scripted) {
        match step {
            Scripted::CrashPrimary => {
                let Some(p) = self.primary() else { return };
                let i = Self::idx(p);
                self.nodes[i].engine = None;
                self.nodes[i].disk.pending.clear();
                self.stats.crashes += 1;
                let acked = self.stats.writes_acked;
                self.note(format!("primary {p} killed (SIGKILL: unsynced data lost); {acked} writes acknowledged so far"));
                self.disrupted_at = Some(self.now);
            }
            Scripted::RestartAll => {
                for id in [DATA[0], DATA[1], WITNESS] {
                    if !self.live(id) {
                        self.note(format!("{id} restarts from its disk"));
                        self.boot(id);
                    }
                }
            }
            Scripted::Switchover => {
                let Some(p) = self.primary() else { return };
                let op = self.next_op;
                self.next_op += 1;
                self.admin_ops.insert(op);
                self.note(format!(
                    "operator asks primary {p} for a planned switchover"
                ));
                self.disrupted_at = Some(self.now);
                self.step(p, Event::Admin(op, Admin::Switchover));
            }
        }
    }

    fn step(&mut self, id: NodeId, event: Event) {
        let i = Self::idx(id);
        let now = self.nodes[i].local(self.now);
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return;
        };
        engine.step(now, event);
        let actions = engine.take_actions();
        self.stats.steps += 1;
        for a in actions {
            self.execute(id, a);
        }
    }

    fn send(&mut self, msg: Msg) {
        let (from, to) = msg.route();
        if self.links_down.contains(&(from, to)) {
            return;
        }
        let f = self.cfg.faults.clone();
        let (drop, dup) = if self.healing {
            (0.0, 0.0)
        } else {
            (f.drop, f.duplicate)
        };
        if self.rng.random_bool(drop) {
            return;
        }
        let copies = if self.rng.random_bool(dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut delay = self.rng.random_range(f.delay_us.0..=f.delay_us.1) * 1_000;
            if !self.healing && self.rng.random_bool(f.delay_spike) {
                delay += self.rng.random_range(10..80) * MS;
            }
            self.schedule(delay, Ev::Deliver(msg.clone()));
        }
    }

    fn flush_disk(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let done = self.nodes[i].disk.flush();
        let inc = self.nodes[i].incarnation;
        for pos in done {
            self.schedule(0, Ev::Persisted(id, inc, pos));
        }
    }

    fn execute(&mut self, id: NodeId, action: Action) {
        let i = Self::idx(id);
        match action {
            Action::PersistHardState(hs) => {
                if id == WITNESS {
                    for (node, floor) in &hs.floors {
                        self.ghost_floors.raise_floor(*node, *floor);
                    }
                }
                self.nodes[i].disk.hard_state = Some(hs);
            }
            Action::Append(entries) => {
                let delay = self.rng.random_range(100..1_000u64) * 1_000;
                let inc = self.nodes[i].incarnation;
                self.nodes[i]
                    .disk
                    .pending
                    .push_back((self.now + delay, entries));
                self.schedule(delay, Ev::DiskDone(id, inc));
            }
            Action::Truncate(from) => {
                self.flush_disk(id);
                self.nodes[i].disk.truncate(from);
            }
            Action::Compact { upto, keep_from } => {
                self.flush_disk(id);
                let to = retention_point(upto, keep_from, self.cfg.retain_entries);
                self.nodes[i].disk.compact(to);
            }
            Action::ReadEntries {
                read_id,
                next,
                max_entries,
                max_bytes,
            } => {
                // Ordered after every earlier operation, as a real store does.
                self.flush_disk(id);
                let result = if self.rng.random_bool(self.cfg.read_failure) {
                    Err(StorageError::Io("simulated read error".into()))
                } else {
                    let disk = &self.nodes[i].disk;
                    let to = LogIndex(next.0.saturating_add(max_entries as u64));
                    let before = (next.0 > 1).then(|| disk.read(next.prev(), next, usize::MAX));
                    match before.transpose() {
                        Ok(before) => disk
                            .read(next, to, max_bytes)
                            .and_then(|entries| CatchUpBatch::from_reads(next, before, entries)),
                        Err(e) => Err(e),
                    }
                };
                if result.is_ok() {
                    self.stats.catch_up_reads += 1;
                }
                let delay = self.rng.random_range(50..500u64) * 1_000;
                let inc = self.nodes[i].incarnation;
                self.schedule(delay, Ev::EntriesRead(id, inc, read_id, result));
            }
            Action::InstallSnapshot(snap) => {
                self.flush_disk(id);
                let Some(m) = SimMachine::decode(&snap.data) else {
                    self.violation(format!("{id} received an undecodable snapshot"));
                    return;
                };
                self.stats.snapshots_installed += 1;
                self.check_snapshot_prefix(id, &m);
                self.nodes[i].sm = m;
                self.nodes[i].disk.install(snap);
            }
            Action::RestoreStateMachine(snap) => {
                self.nodes[i].sm = SimMachine::decode(&snap.data).unwrap_or_default();
            }
            Action::ResetStateMachine => self.nodes[i].sm = SimMachine::default(),
            Action::ResetLog => {
                self.flush_disk(id);
                let empty = Snapshot {
                    last_included: Position::ZERO,
                    data: SimMachine::default().encode(),
                };
                self.nodes[i].disk.entries.clear();
                self.nodes[i].disk.save_snapshot(empty);
            }
            Action::Send(env) => self.send(Msg::Req(env)),
            Action::Respond(env) => self.send(Msg::Resp(env)),
            Action::Apply(entries) => {
                for e in entries {
                    self.check_apply(id, e.position);
                    if let Err(err) = self.nodes[i].sm.apply(&e) {
                        self.violation(format!("{id}: {err}"));
                    }
                    self.nodes[i].applied_since_snapshot += 1;
                }
                if self.nodes[i].applied_since_snapshot >= self.cfg.snapshot_every {
                    self.take_snapshot(id);
                }
            }
            Action::WriteDone(op, result) => self.write_done(id, op, result),
            Action::ReadReady(op, result) => self.read_ready(id, op, result),
            Action::AdminDone(op, result) => {
                if self.admin_ops.remove(&op) && result.is_ok() {
                    self.stats.switchovers += 1;
                }
            }
            Action::Discarded(positions) => {
                self.stats.discarded += positions.len() as u64;
                if self.cfg.commit_mode != CommitMode::Async {
                    self.violation(format!(
                        "{id} discarded {} applied entries in a sync mode",
                        positions.len()
                    ));
                }
            }
            Action::RoleChanged { role, term, leader } => {
                self.trace(|| format!("{id} is {role} in term {term}, leader {leader:?}"));
                if role == Role::Primary {
                    self.note(format!("{id} becomes primary in term {term}"));
                    self.on_new_primary(id, term);
                }
                if leader.is_some() && DATA.contains(&id) {
                    self.leader_hint = leader;
                }
            }
        }
    }

    fn take_snapshot(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let n = &mut self.nodes[i];
        let applied = n.sm.applied_index();
        let Some(term) = n.sm.term_at(applied) else {
            return;
        };
        let snap = Snapshot {
            last_included: Position::new(term, applied),
            data: n.sm.encode(),
        };
        n.applied_since_snapshot = 0;
        n.disk.save_snapshot(snap.clone());
        let inc = n.incarnation;
        self.schedule(0, Ev::SnapshotTaken(id, inc, snap));
    }

    // ----- invariants ----------------------------------------------------------

    fn sync_mode(&self) -> bool {
        self.cfg.commit_mode != CommitMode::Async
    }

    /// Invariant 2: at no instant do two nodes hold a lease.
    fn check_leases(&mut self) {
        let mut holders = Vec::new();
        for n in &self.nodes {
            if let Some(e) = &n.engine {
                if e.has_lease(n.local(self.now)) {
                    holders.push(n.id);
                }
            }
        }
        if self.cfg.trace && holders != self.last_holders {
            self.trace(|| format!("lease holders now {holders:?}"));
            self.last_holders = holders.clone();
        }
        if holders.len() > 1 {
            self.violation(format!("split brain: {holders:?} hold a lease at once"));
        }
    }

    /// Invariant 1 and 3: one primary per term, and a new primary holds every
    /// acknowledged write.
    fn on_new_primary(&mut self, id: NodeId, term: Term) {
        self.stats.elections += 1;
        if term.node != id {
            self.violation(format!("{id} leads term {term} which names another node"));
        }
        if let Some(prev) = self.term_leaders.insert(term, id) {
            if prev != id {
                self.violation(format!("two primaries in term {term}: {prev} and {id}"));
            }
        }
        if !self.sync_mode() {
            return;
        }
        let n = &self.nodes[Self::idx(id)];
        let Some(e) = &n.engine else { return };
        let missing: Vec<Position> = self
            .acked
            .iter()
            // Raft's guarantee is for primaries of later terms; one elected late in an
            // older term can never commit (its term is refused everywhere).
            .filter(|p| p.term < term)
            .filter(|p| {
                let in_log = e.term_at(p.index) == Some(p.term);
                let in_snapshot =
                    p.index <= e.snapshot_position().index && n.sm.term_at(p.index) == Some(p.term);
                !in_log && !in_snapshot
            })
            .copied()
            .collect();
        if let Some(p) = missing.first() {
            self.violation(format!(
                "new primary {id} (term {term}) lacks {} acknowledged writes, first {p}",
                missing.len()
            ));
        }
    }

    /// Invariant 4 (and the commit rule): applied sequences agree, and an applied
    /// entry is durable on both data nodes or covered by a witness floor.
    fn check_apply(&mut self, id: NodeId, pos: Position) {
        if !self.sync_mode() {
            return;
        }
        let i = (pos.index.0 - 1) as usize;
        if i < self.canonical.len() {
            if self.canonical[i] != pos.term {
                self.violation(format!(
                    "{id} applied {pos} but index {} was applied elsewhere with term {}",
                    pos.index, self.canonical[i]
                ));
            }
            return;
        }
        let n = &self.nodes[Self::idx(id)];
        while self.canonical.len() < i {
            let k = self.canonical.len();
            match n.sm.applied.get(k) {
                Some(t) => self.canonical.push(*t),
                None => break,
            }
        }
        if self.canonical.len() == i {
            self.canonical.push(pos.term);
        }
        // The first time an index is applied anywhere its commit must have been
        // justified: durable on both data nodes, or above a witness floor.
        for d in DATA {
            let holds = self.nodes[Self::idx(d)].disk.holds(pos)
                || self.wiped_durable.get(&d).is_some_and(|w| w.contains(&pos));
            if !holds && self.ghost_floors.floor(d) < pos {
                self.violation(format!(
                    "{id} applied {pos} which is neither durable on {d} nor covered by its witness floor"
                ));
                break;
            }
        }
    }

    fn check_snapshot_prefix(&mut self, id: NodeId, m: &SimMachine) {
        if !self.sync_mode() {
            return;
        }
        for (k, t) in m.applied.iter().enumerate() {
            match self.canonical.get(k) {
                Some(c) if c != t => {
                    self.violation(format!(
                        "{id} installed a snapshot disagreeing at index {}",
                        k + 1
                    ));
                    return;
                }
                Some(_) => {}
                None => self.canonical.push(*t),
            }
        }
    }

    fn lease_checked(&mut self, id: NodeId, what: &str) {
        let n = &self.nodes[Self::idx(id)];
        let ok = n
            .engine
            .as_ref()
            .is_some_and(|e| e.has_lease(n.local(self.now)));
        if !ok {
            self.violation(format!("{id} emitted {what} without a lease"));
        }
    }

    fn write_done(&mut self, id: NodeId, op: u64, result: Result<Position, Error>) {
        let Some(o) = self.ops.remove(&op) else {
            return;
        };
        let OpKind::Write(w) = o.kind else { return };
        match result {
            Ok(pos) => {
                self.lease_checked(id, "a write acknowledgement");
                self.stats.writes_acked += 1;
                self.acked.push(pos);
                self.acked_ids.insert(w.id, pos);
                self.max_acked = self.max_acked.max(pos.index);
                if let Some(t) = self.disrupted_at.take() {
                    let gap = self.now - t;
                    self.recovery_ns.push(gap);
                    self.note(format!(
                        "first write after the disruption acknowledged by {id} at {pos}: {:.1} ms later",
                        gap as f64 / 1e6
                    ));
                }
                if self.healing && o.invoked >= self.heal_at + self.settle() {
                    self.progress_acked = true;
                }
            }
            Err(Error::NotLeader { leader, .. }) => self.leader_hint = leader,
            Err(_) => {}
        }
    }

    /// Invariant 6: a linearizable read sees every write acknowledged before it
    /// was invoked (the log order is the linearization).
    fn read_ready(&mut self, id: NodeId, op: u64, result: Result<Term, Error>) {
        let Some(o) = self.ops.remove(&op) else {
            return;
        };
        let OpKind::Read { key, must_see } = o.kind else {
            return;
        };
        match result {
            Ok(_) => {
                self.lease_checked(id, "a read");
                self.stats.reads_served += 1;
                let n = &self.nodes[Self::idx(id)];
                let seen = n.sm.applied_index();
                let value = n.sm.registers.get(&key).copied();
                if self.sync_mode() && seen < must_see {
                    self.violation(format!(
                        "stale read on {id}: state at {seen} but a write at {must_see} was acknowledged before the read began"
                    ));
                }
                if let Some(v) = value {
                    if let Some(p) = self.acked_ids.get(&v) {
                        if p.index > seen {
                            self.violation(format!(
                                "read on {id} returned a value written after its state"
                            ));
                        }
                    }
                }
            }
            Err(Error::NotLeader { leader, .. }) => self.leader_hint = leader,
            Err(_) => {}
        }
    }

    fn final_checks(&mut self) {
        let states: Vec<(NodeId, Vec<Term>)> = DATA
            .iter()
            .map(|d| (*d, self.nodes[Self::idx(*d)].sm.applied.clone()))
            .collect();
        let alarms: Vec<(NodeId, u64)> = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref().map(|e| (n.id, e.safety_alarms())))
            .filter(|(_, a)| *a > 0)
            .collect();
        if !alarms.is_empty() {
            self.violation(format!("engine safety alarms fired: {alarms:?}"));
        }
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
            .acked
            .iter()
            .filter(|p| longest.get((p.index.0 - 1) as usize) != Some(&p.term))
            .copied()
            .collect();
        if self.sync_mode() {
            if let Some(p) = lost.first() {
                self.violation(format!(
                    "{} acknowledged writes lost, first {p}",
                    lost.len()
                ));
            }
            for (d, s) in &states {
                let behind = self
                    .acked
                    .iter()
                    .filter(|p| s.get((p.index.0 - 1) as usize) != Some(&p.term))
                    .count();
                if behind > 0 && self.live(*d) {
                    self.violation(format!(
                        "{d} ends without {behind} acknowledged writes after healing"
                    ));
                }
            }
        } else {
            let bound = self.cfg.max_lag_on_failover * self.stats.elections.max(1);
            if lost.len() as u64 > bound {
                self.violation(format!(
                    "async mode lost {} acknowledged writes, bound {bound}",
                    lost.len()
                ));
            }
        }
        // Invariant 5: after healing, a primary appears and writes succeed.
        if !self.progress_acked {
            self.violation("no write succeeded in the second after healing settled".into());
        }
        let leaders = self
            .nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.has_lease(n.local(self.now)))
            })
            .count();
        if leaders == 0 {
            self.violation("no primary holds a lease at the end".into());
        }
    }

    // ----- workload and faults -------------------------------------------------

    fn client_op(&mut self) {
        let gap = self.rng.random_range(1..=2 * self.cfg.mean_op_interval_us) * 1_000;
        self.schedule(gap, Ev::ClientOp);
        if self.quiet {
            return;
        }
        let target = match self.leader_hint {
            Some(l) if self.rng.random_bool(0.9) => l,
            _ => DATA[self.rng.random_range(0..2)],
        };
        if !self.live(target)
            || self.nodes[Self::idx(target)]
                .paused_until
                .is_some_and(|t| t > self.now)
        {
            self.leader_hint = None;
            return;
        }
        let op = self.next_op;
        self.next_op += 1;
        let key = self.rng.random_range(0..4u8);
        if self.rng.random_bool(0.8) {
            let w = SimWrite { id: op, key };
            self.ops.insert(
                op,
                Op {
                    kind: OpKind::Write(w),
                    invoked: self.now,
                },
            );
            self.step(target, Event::ClientWrites(vec![(op, w.command())]));
        } else {
            let must_see = self.max_acked;
            self.ops.insert(
                op,
                Op {
                    kind: OpKind::Read { key, must_see },
                    invoked: self.now,
                },
            );
            self.step(target, Event::ClientRead(op));
        }
    }

    fn inject_fault(&mut self) {
        if self.healing {
            return;
        }
        let gap = self.fault_gap();
        self.schedule(gap, Ev::Fault);
        let r: f64 = self.rng.random();
        let victim = [DATA[0], DATA[1], WITNESS][self.rng.random_range(0..3)];
        if r < self.cfg.switchover {
            if let Some(l) = self
                .nodes
                .iter()
                .find(|n| n.engine.as_ref().is_some_and(|e| e.role() == Role::Primary))
            {
                let id = l.id;
                let op = self.next_op;
                self.next_op += 1;
                self.admin_ops.insert(op);
                self.step(id, Event::Admin(op, Admin::Switchover));
            }
        } else if r < 0.35 {
            if self.live(victim) {
                self.stats.crashes += 1;
                self.trace(|| format!("CRASH {victim}"));
                let i = Self::idx(victim);
                self.nodes[i].engine = None;
                self.nodes[i].disk.pending.clear();
                self.nodes[i].paused_until = None;
                if self.rng.random_bool(self.cfg.faults.wipe) && self.may_wipe(victim) {
                    // The disk is lost: the node rejoins empty, as a non-voter.
                    self.stats.wipes += 1;
                    self.trace(|| format!("WIPE {victim}"));
                    let lost = &self.nodes[i].disk;
                    let mut held: Vec<Position> = lost.entries.iter().map(|e| e.position).collect();
                    held.extend(
                        lost.snapshot_terms
                            .iter()
                            .enumerate()
                            .map(|(k, t)| Position::new(*t, LogIndex(k as u64 + 1))),
                    );
                    self.wiped_durable.entry(victim).or_default().extend(held);
                    self.nodes[i].disk = SimDisk {
                        hard_state: Some(HardState::joining()),
                        ..SimDisk::default()
                    };
                    // A persistent state machine lives on the lost disk too.
                    self.nodes[i].sm = SimMachine::default();
                }
                let down = self.rng.random_range(50..1_500) * MS;
                self.schedule(down, Ev::Undo(Undo::Restart(victim)));
            }
        } else if r < 0.75 {
            self.stats.partitions += 1;
            let other = [DATA[0], DATA[1], WITNESS][self.rng.random_range(0..3)];
            if other == victim {
                // Isolate the victim from everyone.
                for o in [DATA[0], DATA[1], WITNESS] {
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
            let i = Self::idx(victim);
            let until = self.now + d;
            self.trace(|| format!("PAUSE {victim} for {}ms", d / MS));
            self.nodes[i].paused_until =
                Some(self.nodes[i].paused_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Losing a disk is survivable only while another copy of every acknowledged
    /// write exists: a data node's disk may go only if the other data node is a
    /// voter holding every acknowledged write durably.
    fn may_wipe(&self, victim: NodeId) -> bool {
        // Losing the state of two of three members at once is not survivable (as in
        // any majority protocol): wipe only while every other member votes.
        let others_vote = [DATA[0], DATA[1], WITNESS]
            .into_iter()
            .filter(|n| *n != victim)
            .all(|n| {
                self.nodes[Self::idx(n)]
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
        let o = &self.nodes[Self::idx(other)];
        let voter = o.disk.hard_state.as_ref().is_some_and(|h| h.voter);
        // Degraded sync's documented trade-off: a standby below its witness floor
        // cannot be elected; if the primary's disk is then lost, an operator must
        // force a promotion. Not a fault the cluster can ride out alone.
        let witness = &self.nodes[Self::idx(WITNESS)].disk;
        let floor = witness
            .hard_state
            .as_ref()
            .map(|h| h.floor(other))
            .unwrap_or_default();
        let last = o
            .disk
            .entries
            .last()
            .map(|e| e.position)
            .or(o.disk.snapshot.as_ref().map(|s| s.last_included))
            .unwrap_or_default();
        // Nor may it take the only copy of something it acked: the other node holds
        // the victim's last durable entry (and so, by log matching, all before it).
        let v = &self.nodes[Self::idx(victim)].disk;
        let victim_last = v
            .entries
            .last()
            .map(|e| e.position)
            .or(v.snapshot.as_ref().map(|s| s.last_included));
        let covered = victim_last.is_none_or(|p| {
            o.disk.holds(p) || p.index <= o.disk.last_index() && p.term < last.term
        });
        voter && covered && last >= floor && self.acked.iter().all(|p| o.disk.holds(*p))
    }

    fn cut(&mut self, a: NodeId, b: NodeId, symmetric: bool) {
        let d = self.rng.random_range(50..2_000) * MS;
        self.trace(|| format!("CUT {a}->{b} symmetric={symmetric} for {}ms", d / MS));
        self.links_down.insert((a, b));
        self.schedule(d, Ev::Undo(Undo::Link(a, b)));
        if symmetric {
            self.links_down.insert((b, a));
            self.schedule(d, Ev::Undo(Undo::Link(b, a)));
        }
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::Restart(id) => {
                self.trace(|| format!("RESTART {id}"));
                if !self.live(id) {
                    self.boot(id);
                }
            }
            Undo::Link(a, b) => {
                self.trace(|| format!("HEAL {a}->{b}"));
                self.links_down.remove(&(a, b));
            }
        }
    }

    fn heal(&mut self) {
        self.healing = true;
        self.links_down.clear();
        for id in [DATA[0], DATA[1], WITNESS] {
            if !self.live(id) {
                self.boot(id);
            }
        }
    }
}
