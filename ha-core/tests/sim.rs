//! The deterministic simulator over many seeds (protocol.md, "Invariants"), and mutation
//! tests proving that its checker catches each broken rule: one or more per class
//! of blind spot it was built to close (crashes inside a step, fast restarts,
//! timing at the lease's edge, witness floors and switchover, the invariants of
//! sync-apply, reads and async mode).

use ha_core::engine::Mutations;
use ha_core::executor::ExecutorMutations;
use ha_core::testkit::sim::{run, SimConfig};
use ha_core::CommitMode;

/// Seeds `cargo test` runs; `cargo xtask sim --seeds N` runs more.
const SEEDS: u64 = 600;

#[test]
fn simulator_finds_no_violation_over_many_seeds() {
    let mut failed = Vec::new();
    let mut acked = 0;
    let mut elections = 0;
    for seed in 0..SEEDS {
        let r = run(seed, &SimConfig::for_seed(seed));
        acked += r.stats.writes_acked;
        elections += r.stats.elections;
        if let Some(v) = r.violations.first() {
            eprintln!("{v}\n  replay: cargo xtask sim --seed {seed}");
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "violations in seeds {failed:?}");
    // The runs must exercise something: writes and failovers happened.
    assert!(acked > SEEDS * 100, "only {acked} writes acknowledged");
    assert!(elections > SEEDS * 2, "only {elections} elections");
}

#[test]
fn one_seed_replays_identically() {
    let c = SimConfig::for_seed(17);
    assert_eq!(run(17, &c), run(17, &c));
}

/// `cargo xtask sim --seed 71474 --mode async` lost 77 acknowledged writes: a new
/// primary's older snapshot made the standby discard applied entries both held.
#[test]
fn async_seed_71474_loses_no_more_than_failovers_may() {
    let mut c = SimConfig::for_seed(71474);
    c.commit_mode = CommitMode::Async;
    c.strict_sync = false;
    c.max_lag_on_failover = 8;
    let r = run(71474, &c);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

/// Found by 200,000 seeds (with 134033 and 180689): an async standby that
/// resynced from scratch (its snapshot held entries a failover discarded) kept
/// voting with an empty log, was elected after the primary died, and lost every
/// write the primary had acknowledged. It now records what it held as its own
/// floor and neither campaigns nor votes below it until it has caught up. (A
/// first fix made it a non-voter, which seed 49361 showed can leave the cluster
/// with one voter after a witness loses its disk: no primary, ever.)
#[test]
fn async_seed_168047_a_resyncing_standby_is_not_elected_and_the_cluster_recovers() {
    for seed in [168047, 134033, 180689, 49361] {
        let r = run(seed, &SimConfig::for_seed(seed));
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
}

/// Every class of fault and protocol path the simulator exists to exercise
/// happens over a modest number of seeds: none of the counters is zero.
#[test]
fn every_fault_class_and_protocol_path_occurs() {
    let mut total = ha_core::testkit::sim::PathCounts::default();
    for seed in 0..120 {
        total.add(&run(seed, &SimConfig::for_seed(seed)).paths);
    }
    let zeros: Vec<&str> = total
        .named()
        .into_iter()
        .filter(|(_, v)| *v == 0)
        .map(|(n, _)| n)
        .collect();
    assert!(zeros.is_empty(), "never happened: {zeros:?}");
}

/// What a mutation test runs: each seed's drawn faults and timing, in `mode`,
/// with the rules switched off.
struct Mutant {
    mode: CommitMode,
    engine: Mutations,
    executor: ExecutorMutations,
    /// Only seeds that press on the lease's edge.
    edge_only: bool,
    /// Strict sync (no degraded commits through the witness).
    strict: bool,
}

impl Mutant {
    fn engine(m: Mutations) -> Mutant {
        Mutant {
            mode: CommitMode::Sync,
            engine: m,
            executor: ExecutorMutations::default(),
            edge_only: false,
            strict: false,
        }
    }

    fn executor(m: ExecutorMutations) -> Mutant {
        Mutant {
            executor: m,
            ..Mutant::engine(Mutations::default())
        }
    }

    fn in_mode(self, mode: CommitMode) -> Mutant {
        Mutant { mode, ..self }
    }

    fn config(&self, seed: u64) -> SimConfig {
        let mut c = SimConfig::for_seed(seed);
        c.commit_mode = self.mode;
        c.strict_sync = self.strict;
        c.max_lag_on_failover = if self.mode == CommitMode::Async { 8 } else { 0 };
        c.mutations = self.engine;
        c.executor_mutations = self.executor;
        c
    }

    /// The first violation within `max_seeds` seeds, with its seed.
    fn first_violation(&self, max_seeds: u64) -> Option<(u64, String)> {
        (0..)
            .map(|seed| (seed, self.config(seed)))
            .filter(|(_, c)| !self.edge_only || c.faults.edge_clocks)
            .take(max_seeds as usize)
            .find_map(|(seed, c)| {
                run(seed, &c)
                    .violations
                    .into_iter()
                    .next()
                    .map(|v| (seed, v))
            })
    }
}

fn assert_caught(name: &str, mutant: Mutant, max_seeds: u64) {
    match mutant.first_violation(max_seeds) {
        Some((seed, v)) => eprintln!("{name}: caught at seed {seed}: {v}"),
        None => panic!("mutation {name} survived {max_seeds} seeds: the checker cannot see it"),
    }
}

// ----- the engine's rules ----------------------------------------------------

#[test]
fn mutation_no_lease_is_caught() {
    let m = Mutations {
        no_lease: true,
        ..Default::default()
    };
    assert_caught("no_lease", Mutant::engine(m), 300);
}

#[test]
fn mutation_witness_votes_without_floor_check_is_caught() {
    let m = Mutations {
        witness_skips_floor_check: true,
        ..Default::default()
    };
    assert_caught("witness_skips_floor_check", Mutant::engine(m), 300);
}

#[test]
fn mutation_stale_terms_accepted_is_caught() {
    let m = Mutations {
        accept_stale_terms: true,
        ..Default::default()
    };
    assert_caught("accept_stale_terms", Mutant::engine(m), 600);
}

#[test]
fn mutation_ack_before_standby_persists_is_caught() {
    let m = Mutations {
        ack_before_standby_persists: true,
        ..Default::default()
    };
    assert_caught("ack_before_standby_persists", Mutant::engine(m), 300);
}

#[test]
fn mutation_no_truncation_on_conflict_is_caught() {
    let m = Mutations {
        no_truncate_on_conflict: true,
        ..Default::default()
    };
    assert_caught("no_truncate_on_conflict", Mutant::engine(m), 300);
}

#[test]
fn mutation_vote_without_log_check_is_caught() {
    let m = Mutations {
        vote_without_log_check: true,
        ..Default::default()
    };
    assert_caught("vote_without_log_check", Mutant::engine(m), 300);
}

// ----- crashes inside a step: the executor's ordering ------------------------

#[test]
fn mutation_send_before_durable_in_the_executor_is_caught() {
    let m = ExecutorMutations {
        send_before_durable: true,
        ..Default::default()
    };
    assert_caught("send_before_durable", Mutant::executor(m), 300);
}

#[test]
fn mutation_no_lease_recheck_in_the_executor_is_caught() {
    let m = ExecutorMutations {
        no_lease_recheck: true,
        ..Default::default()
    };
    assert_caught("no_lease_recheck", Mutant::executor(m), 300);
}

// ----- fast restarts ----------------------------------------------------------

#[test]
fn mutation_no_startup_window_is_caught() {
    let m = Mutations {
        no_startup_window: true,
        ..Default::default()
    };
    // Strict sync: no witness floor keeps the standby from winning, so only the
    // start-up window stops a witness that restarted within an election timeout
    // from voting while the primary's lease still runs.
    let mutant = Mutant {
        strict: true,
        ..Mutant::engine(m)
    };
    assert_caught("no_startup_window", mutant, 300);
}

// ----- timing at the lease's edge ---------------------------------------------

/// The smallest lease overshoot the simulator is pinned to catch: the bound
/// `failover_timeout × (1 − ρ)/(1 + ρ)` (without the tick) stretched by this many
/// parts per million. Two leases can overlap once the overshoot exceeds the time
/// a new primary needs to be elected and acked with near-zero delays, which is
/// at least the candidate's tick (its timer is only read on ticks: 1–10 ms of
/// 60–300 ms timeouts here, so about 2 %). A lease of exactly
/// `failover_timeout` at ρ = 1 % overshoots by 2.02 % and is caught; 1 % is not.
/// It is rare at this size: since the primary holds back partial batches while
/// one is in flight, the first catch is at seed 5,369 (edge seed ~1,340).
const SMALLEST_CAUGHT_OVERSHOOT_PPM: u32 = 20_000;

#[test]
fn a_lease_overshooting_its_bound_is_caught() {
    let m = Mutations {
        lease_overshoot_ppm: SMALLEST_CAUGHT_OVERSHOOT_PPM,
        ..Default::default()
    };
    let mutant = Mutant {
        edge_only: true,
        ..Mutant::engine(m)
    };
    assert_caught("lease_overshoot", mutant, 1500);
}

// ----- witness floors and switchover -------------------------------------------

#[test]
fn mutation_witness_floor_may_decrease_is_caught() {
    let m = Mutations {
        witness_floor_may_decrease: true,
        ..Default::default()
    };
    assert_caught("witness_floor_may_decrease", Mutant::engine(m), 300);
}

#[test]
fn mutation_transfer_without_catch_up_is_caught() {
    let m = Mutations {
        transfer_without_catch_up: true,
        ..Default::default()
    };
    assert_caught("transfer_without_catch_up", Mutant::engine(m), 600);
}

// ----- invariants of sync-apply and reads ---------------------------------------

#[test]
fn mutation_sync_apply_skips_the_apply_wait_is_caught() {
    let m = Mutations {
        sync_apply_skips_apply_wait: true,
        ..Default::default()
    };
    assert_caught(
        "sync_apply_skips_apply_wait",
        Mutant::engine(m).in_mode(CommitMode::SyncApply),
        300,
    );
}

#[test]
fn mutation_read_before_noop_is_caught() {
    let m = Mutations {
        read_before_noop: true,
        ..Default::default()
    };
    assert_caught("read_before_noop", Mutant::engine(m), 300);
}

// ----- alarms and availability ------------------------------------------------

#[test]
fn mutation_never_step_down_is_caught() {
    let m = Mutations {
        never_step_down: true,
        ..Default::default()
    };
    assert_caught("never_step_down", Mutant::engine(m), 300);
}

// ----- what async mode promises ---------------------------------------------------

#[test]
fn mutation_async_commit_without_floor_is_caught() {
    let m = Mutations {
        async_commit_without_floor: true,
        ..Default::default()
    };
    assert_caught(
        "async_commit_without_floor",
        Mutant::engine(m).in_mode(CommitMode::Async),
        300,
    );
}
