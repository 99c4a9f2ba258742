//! What one simulated run does: commit mode, timing, and the faults, drawn per
//! seed over a wide range so that no single mix or timing hides a bug.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::engine::Mutations;
use crate::executor::ExecutorMutations;
use crate::types::CommitMode;

/// What the network, disks, processes and clocks may do wrong.
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
    /// Floor raises and TimeoutNow (the witness and switchover paths): extra
    /// probability of a duplicate or a delay spike on top of the above.
    pub control_path_faults: f64,
    /// Mean time between injected faults (crash, partition, pause), in ms.
    pub mean_fault_interval_ms: u64,
    /// Relative clock-rate bound in ppm: each clock runs within ±this of real time.
    pub clock_drift_ppm: u32,
    /// Clocks sit at the edges of the bound (one fast, one slow) and switch between
    /// them during the run, instead of a random constant rate each.
    pub edge_clocks: bool,
    /// Probability, each time the witness acknowledges a primary's heartbeat, that
    /// the primary is cut off from everyone at that instant (the lease's worst case:
    /// its last renewal, then silence).
    pub isolate_after_renewal: f64,
    /// Probability, each time a data node asks the witness for a (pre-)vote, that
    /// the witness is killed at that instant and back before the request arrives:
    /// a voter that restarted well within an election timeout.
    pub restart_before_vote: f64,
    /// Probability that a crash also loses the node's disk (it rejoins empty).
    pub wipe: f64,
    /// Share of crashes whose node comes back well within one election timeout.
    pub fast_restart: f64,
    /// Probability, before each action the executor runs, that the process is
    /// descheduled there (briefly, for a long pause, or killed).
    pub preempt: f64,
    /// Disk latency range for a durable operation, in microseconds.
    pub disk_us: (u64, u64),
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            drop: 0.02,
            duplicate: 0.01,
            delay_us: (50, 2_000),
            delay_spike: 0.01,
            control_path_faults: 0.0,
            mean_fault_interval_ms: 400,
            clock_drift_ppm: 10_000,
            edge_clocks: false,
            isolate_after_renewal: 0.0,
            restart_before_vote: 0.02,
            wipe: 0.1,
            fast_restart: 0.3,
            preempt: 0.005,
            disk_us: (50, 1_000),
        }
    }
}

/// The engine's timing in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `Config::failover_timeout`.
    pub failover_timeout: Duration,
    /// `Config::failover_jitter`.
    pub failover_jitter: Duration,
    /// `Config::heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// `Config::tick_interval`.
    pub tick_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            failover_timeout: Duration::from_millis(150),
            failover_jitter: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(50),
            tick_interval: Duration::from_millis(5),
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
    /// The engine's timing.
    pub timing: Timing,
    /// Snapshot and compact every this many applied entries.
    pub snapshot_every: u64,
    /// Bytes per snapshot chunk (small, so transfers take many chunks that the
    /// network loses, duplicates and reorders).
    pub snapshot_chunk_bytes: usize,
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
    /// Engine rules switched off (mutation tests).
    pub mutations: Mutations,
    /// Executor rules switched off (mutation tests).
    pub executor_mutations: ExecutorMutations,
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
            timing: Timing::default(),
            snapshot_every: 64,
            snapshot_chunk_bytes: 64,
            retain_entries: 256,
            read_failure: 0.05,
            persistent_state_machine: false,
            mean_op_interval_us: 4_000,
            mutations: Mutations::default(),
            executor_mutations: ExecutorMutations::default(),
            switchover: 0.1,
            trace: false,
            script: Vec::new(),
        }
    }
}

fn pick<T: Copy>(rng: &mut SmallRng, choices: &[T]) -> T {
    choices[rng.random_range(0..choices.len())]
}

impl SimConfig {
    /// The config mix `cargo xtask sim --seeds N` and `cargo test` use: seed `s`
    /// picks a commit mode so every mode is covered, and draws its fault intensity
    /// and timing from a wide range (from a generator of its own, so the run's
    /// events stay a function of the seed alone).
    pub fn for_seed(seed: u64) -> SimConfig {
        let mut c = SimConfig {
            // Retention: none (snapshots only), a short tail, a long one.
            retain_entries: [0, 48, 256][((seed / 6) % 3) as usize],
            persistent_state_machine: (seed / 18) % 2 == 1,
            snapshot_chunk_bytes: [64, 256, 1 << 20][((seed / 36) % 3) as usize],
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
        c.draw(seed);
        c
    }

    /// Draws fault intensity and timing for `seed` (see [`Self::for_seed`]).
    pub fn draw(&mut self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5EED_F00D_CAFE_D00D);
        let f = &mut self.faults;
        // One seed in eight keeps the gentle default mix.
        if rng.random_bool(0.125) {
            return;
        }
        f.drop = pick(&mut rng, &[0.0, 0.005, 0.02, 0.05, 0.1, 0.2]);
        f.duplicate = pick(&mut rng, &[0.0, 0.01, 0.05, 0.2]);
        f.delay_spike = pick(&mut rng, &[0.0, 0.01, 0.05, 0.2]);
        f.delay_us = pick(&mut rng, &[(50, 2_000), (1, 100), (200, 5_000), (20, 500)]);
        f.control_path_faults = pick(&mut rng, &[0.0, 0.1, 0.3]);
        f.mean_fault_interval_ms = pick(&mut rng, &[100, 250, 400, 800]);
        f.preempt = pick(&mut rng, &[0.0, 0.002, 0.01, 0.03]);
        f.disk_us = pick(&mut rng, &[(50, 1_000), (0, 100), (200, 5_000)]);
        f.fast_restart = pick(&mut rng, &[0.2, 0.5]);
        f.restart_before_vote = pick(&mut rng, &[0.0, 0.02, 0.1]);
        self.timing = pick(
            &mut rng,
            &[
                Timing::default(),
                Timing {
                    failover_timeout: Duration::from_millis(60),
                    failover_jitter: Duration::from_millis(40),
                    heartbeat_interval: Duration::from_millis(15),
                    tick_interval: Duration::from_millis(1),
                },
                Timing {
                    failover_timeout: Duration::from_millis(300),
                    failover_jitter: Duration::from_millis(200),
                    heartbeat_interval: Duration::from_millis(100),
                    tick_interval: Duration::from_millis(10),
                },
                Timing {
                    failover_timeout: Duration::from_millis(100),
                    failover_jitter: Duration::from_millis(20),
                    heartbeat_interval: Duration::from_millis(20),
                    tick_interval: Duration::from_millis(2),
                },
            ],
        );
        // One seed in four presses on the lease's bound: clocks at the edges of
        // the drift bound, near-zero delays, candidates at the earliest moment,
        // and primaries cut off right after a renewal.
        if rng.random_bool(0.25) {
            f.edge_clocks = true;
            f.delay_us = (1, 30);
            f.isolate_after_renewal = pick(&mut rng, &[0.002, 0.01, 0.05]);
            self.timing.failover_jitter = Duration::ZERO;
        }
    }
}
