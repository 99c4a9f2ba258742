//! The deterministic simulator: two data nodes and a witness, each running the
//! real [`Engine`] inside the same [`Executor`] the tokio driver uses, over a
//! virtual network, disk, clock and client workload, all decided by one seed.
//!
//! Each node's executor is a future the simulator polls (with a no-op waker) after
//! every event; its host, log store and state machine are views of the simulated
//! world (`host`). Durable disk operations take simulated time, so a crash can
//! fall between an action and the durability it depends on; the executor may be
//! descheduled before any action (briefly, paused, or killed). After every event
//! the simulator checks the invariants of protocol.md, "Invariants" (`checker`).
//!
//! `run(seed, &config)` replays exactly; a failing seed is reproduced alone with
//! `cargo xtask sim --seed S` (plus the same mode flags).
//!
//! Files: `config` (what a run does), `world` (time, events, nodes),
//! `network`, `faults`, `workload`, `checker`, `host` (the executor's
//! view of the world), `model` (the disk and state-machine models).

mod checker;
mod config;
mod faults;
mod host;
mod model;
mod network;
mod workload;
mod world;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

pub use self::config::{FaultConfig, Scripted, SimConfig, Timing};
use self::host::{Incarnation, Shared, SimHost, SimSm, SimStore};
pub use self::workload::Availability;
use self::world::{idx, Ev, World, ALL};
use crate::engine::Engine;
use crate::error::StorageError;
use crate::executor::{Executor, Input};
use crate::types::{CommitMode, NodeId};

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
    /// Crashes (kills) of a node.
    pub crashes: u64,
    /// Crashes that also lost the disk.
    pub wipes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Pauses injected between steps.
    pub pauses: u64,
    /// Switchovers that completed.
    pub switchovers: u64,
    /// Snapshots installed on a lagging node.
    pub snapshots_installed: u64,
    /// Reads of a primary's durable log that served a lagging standby.
    pub catch_up_reads: u64,
    /// Acknowledged writes discarded by async failovers.
    pub discarded: u64,
    /// Client writes answered, and acknowledged, during faults and after healing.
    pub availability: Availability,
}

/// How often each fault class and protocol path occurred: a zero shows a blind
/// spot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Kills that fell in the middle of a step (between two actions, or before
    /// an issued durable operation completed).
    pub crashes_mid_step: u64,
    /// Pauses that fell between two actions of a step.
    pub pauses_mid_step: u64,
    /// Restarts well within one election timeout.
    pub fast_restarts: u64,
    /// Witness restarts within an election timeout while the standby was cut off
    /// from the primary.
    pub witness_restarts_during_partition: u64,
    /// Witness restarts between a vote request's send and its arrival.
    pub restarts_before_vote: u64,
    /// Clock-rate changes (edge clocks).
    pub clock_changes: u64,
    /// Primaries cut off right after a lease renewal.
    pub isolations_after_renewal: u64,
    /// Engine steps of a primary committing through witness floors.
    pub degraded_steps: u64,
    /// Floor raises the witness accepted.
    pub floor_raises: u64,
    /// Floor raises the witness refused for a stale term.
    pub stale_floor_raises_refused: u64,
    /// New primaries elected after the previous term raised a floor.
    pub primary_changes_after_degraded: u64,
    /// Floor raises and TimeoutNow messages delayed by a spike.
    pub late_control_messages: u64,
    /// Floor raises and TimeoutNow messages delivered twice.
    pub duplicated_control_messages: u64,
    /// Switchovers an operator asked for.
    pub switchovers_asked: u64,
    /// Truncations of a log suffix.
    pub truncations: u64,
    /// Async failovers that lost acknowledged writes (within the bound).
    pub async_failovers_losing_writes: u64,
    /// Snapshot chunks sent after a transfer's first (chunked transfers).
    pub later_snapshot_chunks: u64,
    /// Snapshot chunks the network lost or delivered twice.
    pub snapshot_chunks_lost_or_duplicated: u64,
}

impl PathCounts {
    /// Every counter with its name, in declaration order.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("crashes_mid_step", self.crashes_mid_step),
            ("pauses_mid_step", self.pauses_mid_step),
            ("fast_restarts", self.fast_restarts),
            ("restarts_before_vote", self.restarts_before_vote),
            (
                "witness_restarts_during_partition",
                self.witness_restarts_during_partition,
            ),
            ("clock_changes", self.clock_changes),
            ("isolations_after_renewal", self.isolations_after_renewal),
            ("degraded_steps", self.degraded_steps),
            ("floor_raises", self.floor_raises),
            (
                "stale_floor_raises_refused",
                self.stale_floor_raises_refused,
            ),
            (
                "primary_changes_after_degraded",
                self.primary_changes_after_degraded,
            ),
            ("late_control_messages", self.late_control_messages),
            (
                "duplicated_control_messages",
                self.duplicated_control_messages,
            ),
            ("switchovers_asked", self.switchovers_asked),
            ("truncations", self.truncations),
            (
                "async_failovers_losing_writes",
                self.async_failovers_losing_writes,
            ),
            ("later_snapshot_chunks", self.later_snapshot_chunks),
            (
                "snapshot_chunks_lost_or_duplicated",
                self.snapshot_chunks_lost_or_duplicated,
            ),
        ]
    }

    /// The counters that can be nonzero in runs of `mode` (with `strict` sync):
    /// strict sync never commits through the witness, sync modes lose nothing,
    /// and async mode never degrades (it always commits within its lag).
    pub fn applicable(&self, mode: CommitMode, strict: bool) -> Vec<(&'static str, u64)> {
        let is_async = mode == CommitMode::Async;
        self.named()
            .into_iter()
            .filter(|(name, _)| match *name {
                "async_failovers_losing_writes" => is_async,
                "degraded_steps" => !is_async && !strict,
                "floor_raises"
                | "stale_floor_raises_refused"
                | "primary_changes_after_degraded" => is_async || !strict,
                _ => true,
            })
            .collect()
    }

    /// Adds another run's counts to these.
    pub fn add(&mut self, o: &PathCounts) {
        self.crashes_mid_step += o.crashes_mid_step;
        self.pauses_mid_step += o.pauses_mid_step;
        self.fast_restarts += o.fast_restarts;
        self.restarts_before_vote += o.restarts_before_vote;
        self.witness_restarts_during_partition += o.witness_restarts_during_partition;
        self.clock_changes += o.clock_changes;
        self.isolations_after_renewal += o.isolations_after_renewal;
        self.degraded_steps += o.degraded_steps;
        self.floor_raises += o.floor_raises;
        self.stale_floor_raises_refused += o.stale_floor_raises_refused;
        self.primary_changes_after_degraded += o.primary_changes_after_degraded;
        self.late_control_messages += o.late_control_messages;
        self.duplicated_control_messages += o.duplicated_control_messages;
        self.switchovers_asked += o.switchovers_asked;
        self.truncations += o.truncations;
        self.async_failovers_losing_writes += o.async_failovers_losing_writes;
        self.later_snapshot_chunks += o.later_snapshot_chunks;
        self.snapshot_chunks_lost_or_duplicated += o.snapshot_chunks_lost_or_duplicated;
    }
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
    /// Which fault classes and protocol paths occurred.
    pub paths: PathCounts,
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
    let mut w = sim.world.lock();
    w.stats.availability = w.workload.availability;
    SimReport {
        seed,
        violations: std::mem::take(&mut w.violations),
        stats: w.stats.clone(),
        paths: w.paths.clone(),
        timeline: std::mem::take(&mut w.timeline),
        recovery_ns: std::mem::take(&mut w.recovery_ns),
    }
}

type Task = Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send>>;

/// The world and, per node, its live incarnation's executor.
struct Sim {
    world: Shared,
    tasks: Vec<Option<(u64, Task)>>,
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let world = Arc::new(Mutex::new(World::new(seed, cfg)));
        let mut sim = Sim {
            world,
            tasks: ALL.iter().map(|_| None).collect(),
        };
        for id in ALL {
            let engine = sim.world.lock().boot(id);
            sim.start(id, engine);
        }
        sim
    }

    /// Builds the executor of `id`'s new incarnation around `engine`.
    fn start(&mut self, id: NodeId, engine: Engine) {
        let (inc, exec_mutations) = {
            let w = self.world.lock();
            (w.node(id).incarnation, w.cfg.executor_mutations)
        };
        let who = Incarnation {
            world: Arc::clone(&self.world),
            id,
            inc,
        };
        let mut exec = Executor::new(
            engine,
            SimSm(who.clone()),
            Arc::new(SimStore(who.clone())),
            SimHost(who),
        );
        exec.set_mutations(exec_mutations);
        let task: Task = Box::pin(async move {
            exec.publish();
            exec.run().await
        });
        self.tasks[idx(id)] = Some((inc, task));
    }

    fn run(&mut self) {
        let mut budget = 10_000_000u64;
        loop {
            let Some(ev) = self.world.lock().next_event() else {
                break;
            };
            budget -= 1;
            if budget == 0 {
                self.world
                    .lock()
                    .violation("event budget exhausted (livelock?)".into());
                break;
            }
            let boots = self.handle(ev);
            for id in boots {
                let engine = self.world.lock().boot(id);
                self.start(id, engine);
            }
            self.reap();
            self.poll_all();
            self.world.lock().check_leases();
        }
        let mut w = self.world.lock();
        w.now = w.end_at;
        w.final_checks();
    }

    /// Drops the executors of nodes that died (as a killed process stops).
    fn reap(&mut self) {
        let w = self.world.lock();
        for id in ALL {
            let slot = &mut self.tasks[idx(id)];
            if slot.as_ref().is_some_and(|(inc, _)| !w.current(id, *inc)) {
                *slot = None;
            }
        }
    }

    /// Polls every running, unpaused node until it waits for something.
    fn poll_all(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for id in ALL {
            let runnable = {
                let w = self.world.lock();
                w.live(id) && !w.node(id).paused(w.now)
            };
            if !runnable {
                continue;
            }
            let Some((_, task)) = self.tasks[idx(id)].as_mut() else {
                continue;
            };
            if let Poll::Ready(result) = task.as_mut().poll(&mut cx) {
                self.tasks[idx(id)] = None;
                let mut w = self.world.lock();
                match result {
                    Ok(()) => w.violation(format!("{id}'s executor stopped")),
                    Err(e) => w.violation(format!("{id}'s executor failed: {e}")),
                }
                w.kill(id);
            }
        }
    }

    /// Handles one event; returns the nodes to boot.
    fn handle(&mut self, ev: Ev) -> Vec<NodeId> {
        let mut w = self.world.lock();
        match ev {
            Ev::Tick(id, inc) => {
                if !w.current(id, inc) {
                    return Vec::new();
                }
                let now = w.now;
                let n = w.node(id);
                if let Some(until) = n.paused_until.filter(|u| *u > now) {
                    // A stopped process sees one tick when it resumes.
                    w.schedule(until - now, Ev::Tick(id, inc));
                    return Vec::new();
                }
                let gap = (n.cfg.tick_interval.as_nanos() as f64 / n.clock.rate) as u64;
                w.push_input(id, Input::Tick);
                w.schedule(gap.max(1), Ev::Tick(id, inc));
            }
            Ev::Deliver(msg) => w.deliver(msg),
            Ev::DiskDone(id, inc) => {
                if !w.current(id, inc) {
                    return Vec::new();
                }
                if let Some(op) = w.node_mut(id).disk.complete_one() {
                    w.disk_op_durable(id, &op);
                }
            }
            // Nothing to do here: every live, unpaused node is polled after each
            // event, so the node goes on from where it was suspended.
            Ev::Resume => {}
            Ev::Crash(id, inc) => {
                if w.current(id, inc) {
                    w.kill(id);
                }
            }
            Ev::Restart(id) => {
                if !w.live(id) {
                    w.trace(|| format!("RESTART {id}"));
                    return vec![id];
                }
            }
            Ev::ClientOp => w.client_op(),
            Ev::Fault => w.inject_fault(),
            Ev::LinkUp(a, b) => w.link_up(a, b),
            Ev::ClockChange => w.clock_change(),
            Ev::Heal => return w.heal(),
            Ev::Quiesce => w.quiet = true,
            Ev::Script(step) => return w.scripted(step),
        }
        Vec::new()
    }
}

impl World {
    fn scripted(&mut self, step: Scripted) -> Vec<NodeId> {
        match step {
            Scripted::CrashPrimary => {
                let Some(p) = self.primary() else {
                    return Vec::new();
                };
                self.kill(p);
                let acked = self.stats.writes_acked;
                self.note(format!("primary {p} killed (SIGKILL: unsynced data lost); {acked} writes acknowledged so far"));
                self.disrupted_at = Some(self.now);
                Vec::new()
            }
            Scripted::RestartAll => {
                let down: Vec<_> = ALL.into_iter().filter(|id| !self.live(*id)).collect();
                for id in &down {
                    self.note(format!("{id} restarts from its disk"));
                }
                down
            }
            Scripted::Switchover => {
                let Some(p) = self.primary() else {
                    return Vec::new();
                };
                self.note(format!(
                    "operator asks primary {p} for a planned switchover"
                ));
                self.disrupted_at = Some(self.now);
                self.switchover(p);
                Vec::new()
            }
        }
    }
}
