//! `cargo xtask`: the one entry point for project chores.
//!
//! - `cargo xtask ci`: what CI runs (fmt check, clippy, tests, the library example,
//!   20,000 simulator seeds).
//! - `cargo xtask sim --seeds N` / `--seed S`: the deterministic simulator.
//! - `cargo xtask demo [--transport tcp]`: the real local cluster (`ha-node demo`,
//!   release build); `cargo xtask demo --sim`: the simulated failover.
//! - `cargo xtask bench [flags]`: the end-to-end library benchmark (`ha-bench`, in
//!   release mode); `--soak` for the ten-minute soak.

mod bench;
mod demo;
mod sim;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Project chores for the HA replication workspace"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run what CI runs: cargo fmt --check, clippy -D warnings, the test suite.
    Ci,
    /// Run the deterministic simulator.
    Sim(sim::SimArgs),
    /// Run `ha-node demo` (release build): a real three-process cluster on
    /// loopback, SIGKILL failover, rejoin, switchover. `--sim`: the simulated
    /// failover instead. Other flags pass through (`--transport tcp`).
    Demo(DemoArgs),
    /// Run the end-to-end library benchmark (ha-bench; flags pass through, `--soak`
    /// = `--soak-secs 600`; `cargo xtask bench --help` shows ha-bench's flags).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Show the failover in the deterministic simulator instead.
    #[arg(long)]
    sim: bool,
    /// Flags for `ha-node demo` (e.g. `--transport tcp`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ci => ci(),
        Cmd::Sim(args) => sim::run(args),
        Cmd::Demo(args) if args.sim => demo::run_demo(),
        Cmd::Demo(args) => {
            let mut a = vec!["run", "-q", "--release", "-p", "ha-node", "--", "demo"];
            a.extend(args.rest.iter().map(String::as_str));
            if cargo(&a) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Bench(args) => bench::run(args),
    }
}

fn cargo(args: &[&str]) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    match Command::new(cargo).args(args).status() {
        Ok(s) => s.success(),
        Err(e) => {
            eprintln!("could not run cargo: {e}");
            false
        }
    }
}

fn ci() -> ExitCode {
    let steps: [&[&str]; 4] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace", "--all-features"],
        // The library consumer's path (README, "Using it as a library") runs.
        &[
            "run",
            "-q",
            "-p",
            "ha-transport-quic",
            "--example",
            "failover",
        ],
    ];
    for step in steps {
        if !cargo(step) {
            return ExitCode::FAILURE;
        }
    }
    eprintln!("$ cargo xtask sim --seeds 20000");
    sim::run(sim::SimArgs::many(20_000))
}
