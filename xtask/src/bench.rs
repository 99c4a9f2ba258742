//! `cargo xtask bench [flags]`: the end-to-end library benchmark. It only shells
//! out to `cargo run --release -p ha-bench -- <flags>` (so xtask never depends on
//! the transports). With no flags, the full matrix runs: net quic,mem × store
//! wal,mem × modes sync,sync-apply,async × 1,16,64,256 clients, 1 s warm-up and
//! 5 s measured per run (ha-bench's defaults). `--soak` stands for
//! `--soak-secs 600`: QUIC + WAL, sync, 64 clients for ten minutes, reported per
//! 30-second interval. Every other flag passes through (`cargo xtask bench --help`
//! lists them).

use std::process::ExitCode;

use clap::Args;

/// Seconds of `cargo xtask bench --soak`.
const SOAK_SECS: &str = "600";

/// Arguments of `cargo xtask bench`: passed through to `ha-bench`, except
/// `--soak`.
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Flags for ha-bench (`--net`, `--store`, `--mode`, `--clients`,
    /// `--warmup-secs`, `--secs`, `--snapshot-every`, `--soak-secs`, ...); `--soak`
    /// means `--soak-secs 600`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// The ha-bench command line for `args`: `--soak` expanded.
fn bench_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 1);
    for a in args {
        if a == "--soak" {
            out.push("--soak-secs".to_owned());
            out.push(SOAK_SECS.to_owned());
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// Builds and runs ha-bench in release mode.
pub fn run(args: BenchArgs) -> ExitCode {
    let mut cmd: Vec<String> = ["run", "--release", "-p", "ha-bench", "--"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    cmd.extend(bench_args(&args.args));
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    if super::cargo(&refs) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_expands_and_the_rest_passes_through() {
        let args: Vec<String> = ["--net", "quic", "--soak", "--secs", "3"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            bench_args(&args),
            ["--net", "quic", "--soak-secs", "600", "--secs", "3"]
        );
    }
}
