//! The deterministic simulator over many seeds (DESIGN.md section 4), and mutation
//! tests proving that its checker catches each broken rule.

use ha_core::engine::Mutations;
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

/// Runs seeds with a rule switched off until the checker reports a violation.
fn first_violation(m: Mutations, mode: CommitMode, max_seeds: u64) -> Option<String> {
    (0..max_seeds).find_map(|seed| {
        let mut c = SimConfig {
            commit_mode: mode,
            mutations: m,
            ..SimConfig::default()
        };
        if mode == CommitMode::Async {
            c.max_lag_on_failover = 8;
        }
        run(seed, &c).violations.into_iter().next()
    })
}

fn assert_caught(name: &str, m: Mutations) {
    match first_violation(m, CommitMode::Sync, 300) {
        Some(v) => eprintln!("{name}: caught: {v}"),
        None => panic!("mutation {name} survived 300 seeds: the checker cannot see it"),
    }
}

#[test]
fn mutation_no_lease_is_caught() {
    assert_caught(
        "no_lease",
        Mutations {
            no_lease: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_witness_votes_without_floor_check_is_caught() {
    assert_caught(
        "witness_skips_floor_check",
        Mutations {
            witness_skips_floor_check: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_stale_terms_accepted_is_caught() {
    assert_caught(
        "accept_stale_terms",
        Mutations {
            accept_stale_terms: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_ack_before_standby_persists_is_caught() {
    assert_caught(
        "ack_before_standby_persists",
        Mutations {
            ack_before_standby_persists: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_no_truncation_on_conflict_is_caught() {
    assert_caught(
        "no_truncate_on_conflict",
        Mutations {
            no_truncate_on_conflict: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_vote_without_log_check_is_caught() {
    assert_caught(
        "vote_without_log_check",
        Mutations {
            vote_without_log_check: true,
            ..Default::default()
        },
    );
}
