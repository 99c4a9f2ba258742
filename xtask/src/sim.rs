//! `cargo xtask sim`: many seeds in parallel, or one seed replayed in detail.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clap::{Args, ValueEnum};
use ha_core::testkit::sim::{run as run_seed, PathCounts, SimConfig};
use ha_core::CommitMode;

/// Which commit modes the seeds run.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// Seed `s` picks the mode (sync, sync-apply, strict sync, async).
    Mixed,
    /// Sync (degraded through the witness).
    Sync,
    /// Sync-apply.
    SyncApply,
    /// Strict sync.
    Strict,
    /// Async with max lag 8.
    Async,
}

/// Arguments of `cargo xtask sim`.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Run this many seeds (from --start).
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replay one seed alone and print its report.
    #[arg(long)]
    seed: Option<u64>,
    /// Commit mode(s).
    #[arg(long, value_enum, default_value_t = Mode::Mixed)]
    mode: Mode,
    /// With --seed: print the timeline.
    #[arg(long)]
    trace: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

impl SimArgs {
    /// `--seeds n` with every other flag at its default.
    pub fn many(n: u64) -> SimArgs {
        SimArgs {
            seeds: n,
            start: 0,
            seed: None,
            mode: Mode::Mixed,
            trace: false,
            threads: 2,
        }
    }
}

/// The seed's config (its retention, state-machine kind, faults), in `mode`.
fn config(mode: Mode, seed: u64) -> SimConfig {
    let mut c = SimConfig::for_seed(seed);
    let (commit_mode, strict_sync, max_lag) = match mode {
        Mode::Mixed => return c,
        Mode::Sync => (CommitMode::Sync, false, 0),
        Mode::SyncApply => (CommitMode::SyncApply, false, 0),
        Mode::Strict => (CommitMode::Sync, true, 0),
        Mode::Async => (CommitMode::Async, false, 8),
    };
    c.commit_mode = commit_mode;
    c.strict_sync = strict_sync;
    c.max_lag_on_failover = max_lag;
    c
}

fn mode_flag(mode: Mode) -> &'static str {
    match mode {
        Mode::Mixed => "",
        Mode::Sync => " --mode sync",
        Mode::SyncApply => " --mode sync-apply",
        Mode::Strict => " --mode strict",
        Mode::Async => " --mode async",
    }
}

pub fn run(args: SimArgs) -> ExitCode {
    if let Some(seed) = args.seed {
        let mut c = config(args.mode, seed);
        c.trace = args.trace;
        let r = run_seed(seed, &c);
        println!("seed {seed} {:?}", c.commit_mode);
        println!("{:#?}", r.stats);
        print_paths(&r.paths, args.mode);
        for v in &r.violations {
            println!("violation: {v}");
        }
        println!(
            "seeds=1 violations={}",
            usize::from(!r.violations.is_empty())
        );
        return if r.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let next = AtomicU64::new(args.start);
    let end = args.start + args.seeds;
    let failed = Mutex::new(Vec::new());
    let acked = AtomicU64::new(0);
    let elections = AtomicU64::new(0);
    let snapshots = AtomicU64::new(0);
    let catch_ups = AtomicU64::new(0);
    let paths = Mutex::new(PathCounts::default());
    std::thread::scope(|s| {
        for _ in 0..args.threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let r = run_seed(seed, &config(args.mode, seed));
                acked.fetch_add(r.stats.writes_acked, Ordering::Relaxed);
                elections.fetch_add(r.stats.elections, Ordering::Relaxed);
                snapshots.fetch_add(r.stats.snapshots_installed, Ordering::Relaxed);
                catch_ups.fetch_add(r.stats.catch_up_reads, Ordering::Relaxed);
                if let Ok(mut p) = paths.lock() {
                    p.add(&r.paths);
                }
                if !r.violations.is_empty() {
                    eprintln!("seed {seed} FAILED: {}", r.violations[0]);
                    eprintln!(
                        "  replay: cargo xtask sim --seed {seed}{}",
                        mode_flag(args.mode)
                    );
                    if let Ok(mut f) = failed.lock() {
                        f.push(seed);
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_default();
    println!(
        "writes_acked={} elections={} snapshots_installed={} catch_up_reads={}",
        acked.load(Ordering::Relaxed),
        elections.load(Ordering::Relaxed),
        snapshots.load(Ordering::Relaxed),
        catch_ups.load(Ordering::Relaxed)
    );
    print_paths(&paths.into_inner().unwrap_or_default(), args.mode);
    println!("seeds={} violations={}", args.seeds, failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints how often each fault class and protocol path occurred; a zero among
/// those the mode can take is a blind spot of the run.
fn print_paths(p: &PathCounts, mode: Mode) {
    let line: Vec<String> = p.named().iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("paths: {}", line.join(" "));
    let applicable = match mode {
        Mode::Mixed => p.named(),
        Mode::Sync => p.applicable(CommitMode::Sync, false),
        Mode::SyncApply => p.applicable(CommitMode::SyncApply, false),
        Mode::Strict => p.applicable(CommitMode::Sync, true),
        Mode::Async => p.applicable(CommitMode::Async, false),
    };
    let zeros: Vec<&str> = applicable
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(n, _)| *n)
        .collect();
    if !zeros.is_empty() {
        println!("paths never taken: {}", zeros.join(", "));
    }
}
