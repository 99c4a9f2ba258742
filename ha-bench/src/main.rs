//! `ha-bench`: the end-to-end library benchmark (`cargo xtask bench`).
//!
//! Three members in one process (data nodes n1 and n2, witness n3, a new cluster,
//! default `Config` but for what the flags set), over QUIC or TCP on loopback or
//! the in-memory network, each with a write-ahead log in a fresh temporary directory
//! (default `WalConfig`: fsync on) or the in-memory log store. Closed-loop clients
//! write 100-byte values through the primary's `Node::apply` and wait for each
//! ack. After a warm-up, a measured window gives writes/s and latency percentiles,
//! and the nodes' counters give batching (entries per append and per fsync),
//! leadership changes and tick lateness. One Markdown row per run goes to stdout;
//! progress goes to stderr.
//!
//! `--soak-secs N` runs one long run (QUIC + WAL, sync, 64 clients) and reports it
//! in 30-second intervals. `--transports` prints the transport table instead:
//! QUIC and TCP side by side from one run (WAL throughput, control RPC round
//! trip idle, heartbeat round trip under a saturated WAL stream).

mod cluster;
mod kv;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ha_core::CommitMode;

use crate::cluster::{BoxError, Settings};
use crate::report::{Row, Table};
use crate::run::{Outcome, Plan};

/// The network between the members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Net {
    /// `QuicTransport` on loopback, mutual TLS with a fresh cluster CA.
    Quic,
    /// `TcpTransport` on loopback, mutual TLS with a fresh cluster CA.
    Tcp,
    /// ha-core's in-memory network (testkit).
    Mem,
}

/// The log store of every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Store {
    /// `ha_wal::Wal` in a fresh temporary directory, fsync on.
    Wal,
    /// ha-core's in-memory log store (testkit).
    Mem,
}

/// `Config::commit_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Acked once on both data nodes' disks.
    Sync,
    /// As sync, and applied on the standby.
    SyncApply,
    /// Acked after the primary's own fsync (lag bounded by `--max-lag`).
    Async,
}

impl Mode {
    fn commit_mode(self) -> CommitMode {
        match self {
            Mode::Sync => CommitMode::Sync,
            Mode::SyncApply => CommitMode::SyncApply,
            Mode::Async => CommitMode::Async,
        }
    }
}

fn name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if v.is_finite() && v > 0.0 && v < 1e7 {
        Ok(v)
    } else {
        Err(format!("{s:?}: expected a positive number of seconds"))
    }
}

fn nonneg_secs(s: &str) -> Result<f64, String> {
    if s.parse::<f64>().is_ok_and(|v| v == 0.0) {
        return Ok(0.0);
    }
    positive_secs(s)
}

/// End-to-end library benchmark: one row per (network, store, mode, clients).
#[derive(Parser, Debug)]
#[command(name = "ha-bench")]
struct Cli {
    /// Networks to run over (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Net::Quic, Net::Mem])]
    net: Vec<Net>,
    /// Log stores to run on (comma-separated; the witness uses the same).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Store::Wal, Store::Mem])]
    store: Vec<Store>,
    /// Commit modes (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Mode::Sync, Mode::SyncApply, Mode::Async])]
    mode: Vec<Mode>,
    /// Closed-loop client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64, 256])]
    clients: Vec<usize>,
    /// Warm-up before each measured window, seconds (not measured).
    #[arg(long, default_value_t = 1.0, value_parser = nonneg_secs)]
    warmup_secs: f64,
    /// Measured window of each run, seconds.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    secs: f64,
    /// Distinct keys the clients write (they overwrite them in turn, so the
    /// state machine holds at most this many).
    #[arg(long, default_value_t = 200_000)]
    keys: u64,
    /// `Config::snapshot_every` (default: the `Config` default).
    #[arg(long, value_name = "N")]
    snapshot_every: Option<u64>,
    /// `Config::max_lag_on_failover` in async mode (default: unset, the `Config`
    /// default lag); not set in the sync modes.
    #[arg(long, value_name = "N")]
    max_lag: Option<u64>,
    /// Run the soak instead of the matrix: QUIC + WAL, sync, 64 clients for N
    /// seconds, reported per 30-second interval.
    #[arg(long, value_name = "N")]
    soak_secs: Option<u64>,
    /// Print the transport table instead (QUIC and TCP side by side, one run:
    /// WAL throughput, control RPC round trip idle, heartbeat round trip under a
    /// saturated WAL stream); `--secs` is each throughput figure's duration.
    #[arg(long)]
    transports: bool,
    /// Where the runs' temporary WAL directories go (default: the system's).
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
}

/// One run's layers and plan.
#[derive(Clone, Copy, Debug)]
struct Case {
    net: Net,
    store: Store,
    mode: Mode,
    plan: Plan,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.clients.contains(&0) {
        eprintln!("--clients: every count must be at least 1");
        return ExitCode::FAILURE;
    }
    if cli.snapshot_every == Some(0) {
        eprintln!("--snapshot-every: must be at least 1");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("could not build the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tmp = cli.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    report::print_header(&tmp, &cli_line());
    let warmup = Duration::from_secs_f64(cli.warmup_secs);
    let failed = match cli.soak_secs {
        _ if cli.transports => transports(&rt, Duration::from_secs_f64(cli.secs)),
        Some(secs) => soak(&rt, &cli, &tmp, warmup, secs),
        None => matrix(&rt, &cli, &tmp, warmup),
    };
    if failed > 0 {
        eprintln!("{failed} run(s) failed");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn cli_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        "ha-bench (defaults)".to_owned()
    } else {
        format!("ha-bench {}", args.join(" "))
    }
}

/// The transport table: both TLS transports measured one after the other in
/// this process (`ha_transport_testkit::bench`, the figures the transports'
/// `cargo bench` prints). Returns 0 (a failed call panics: it is a benchmark).
fn transports(rt: &tokio::runtime::Runtime, secs: Duration) -> usize {
    use ha_transport_testkit::bench::{header, measure, row};
    eprintln!("measuring quic ...");
    let quic = rt.block_on(measure::<ha_transport_quic::testkit::Quic>(secs));
    eprintln!("measuring tcp ...");
    let tcp = rt.block_on(measure::<ha_transport_tcp::testkit::Tcp>(secs));
    println!("{}", header());
    println!("{}", row("quic", &quic));
    println!("{}", row("tcp", &tcp));
    0
}

/// Runs every combination; returns how many runs failed.
fn matrix(
    rt: &tokio::runtime::Runtime,
    cli: &Cli,
    tmp: &std::path::Path,
    warmup: Duration,
) -> usize {
    let window = Duration::from_secs_f64(cli.secs);
    let mut table = Table::new(report::MAIN_COLUMNS);
    let mut failed = 0;
    for &net in &cli.net {
        for &store in &cli.store {
            for &mode in &cli.mode {
                for &clients in &cli.clients {
                    let case = Case {
                        net,
                        store,
                        mode,
                        plan: Plan {
                            clients,
                            warmup,
                            window,
                            interval: window,
                            keys: cli.keys,
                        },
                    };
                    let result = run_case(rt, cli, tmp, case);
                    if result.is_err() {
                        failed += 1;
                    }
                    table.row(main_row(case, &result));
                    table.notes(notes(case, &result));
                }
            }
        }
    }
    table.finish();
    failed
}

/// The soak; returns 1 if it failed.
fn soak(
    rt: &tokio::runtime::Runtime,
    cli: &Cli,
    tmp: &std::path::Path,
    warmup: Duration,
    secs: u64,
) -> usize {
    let window = Duration::from_secs(secs.max(1));
    let case = Case {
        net: Net::Quic,
        store: Store::Wal,
        mode: Mode::Sync,
        plan: Plan {
            clients: 64,
            warmup,
            window,
            interval: Duration::from_secs(30).min(window),
            keys: cli.keys,
        },
    };
    let result = run_case(rt, cli, tmp, case);
    let mut table = Table::new(report::MAIN_COLUMNS);
    table.row(main_row(case, &result));
    table.notes(notes(case, &result));
    table.finish();
    if let Ok(o) = &result {
        println!();
        println!("Soak intervals ({} s each):", case.plan.interval.as_secs());
        println!();
        let mut intervals = Table::new(report::SOAK_COLUMNS);
        for (k, s) in o.slices.iter().enumerate() {
            intervals.row(report::soak_row(k, s));
        }
        intervals.finish();
        println!();
        println!(
            "Total leadership changes (term changes on the data nodes): {}; role changes: primary {}, standby {}",
            o.total.term_changes, o.primary.role_changes, o.standby.role_changes
        );
    }
    usize::from(result.is_err())
}

fn main_row(case: Case, result: &Result<Outcome, String>) -> Row {
    let layers = [
        name(&case.net),
        name(&case.store),
        name(&case.mode),
        case.plan.clients.to_string(),
    ];
    match result {
        Ok(o) => report::main_row(layers, o),
        Err(e) => report::failed_row(layers, e),
    }
}

fn notes(case: Case, result: &Result<Outcome, String>) -> Vec<String> {
    let what = format!(
        "{} + {}, {}, {} clients",
        name(&case.net),
        name(&case.store),
        name(&case.mode),
        case.plan.clients
    );
    match result {
        Err(e) => vec![format!("{what}: FAILED: {e}")],
        Ok(o) => {
            let mut out = Vec::new();
            if o.errors > 0 {
                out.push(format!(
                    "{what}: {} write(s) failed (first: {})",
                    o.errors,
                    o.first_error.as_deref().unwrap_or("?")
                ));
            }
            for e in &o.shutdown_errors {
                out.push(format!("{what}: {e}"));
            }
            out
        }
    }
}

/// Builds a fresh cluster for `case`, runs it, and reports errors as text.
fn run_case(
    rt: &tokio::runtime::Runtime,
    cli: &Cli,
    tmp: &std::path::Path,
    case: Case,
) -> Result<Outcome, String> {
    eprintln!(
        "run: net {} store {} mode {} clients {} (warm-up {:?}, window {:?})",
        name(&case.net),
        name(&case.store),
        name(&case.mode),
        case.plan.clients,
        case.plan.warmup,
        case.plan.window
    );
    let settings = Settings {
        commit_mode: case.mode.commit_mode(),
        max_lag: cli.max_lag,
        snapshot_every: cli.snapshot_every,
    };
    let result = rt
        .block_on(run_layers(case, settings, tmp))
        .map_err(|e| report::one_line(&e.to_string()));
    match &result {
        Ok(o) => eprintln!(
            "  {:.0} writes/s, {} write errors",
            o.total.writes_per_sec(),
            o.errors
        ),
        Err(e) => eprintln!("  FAILED: {e}"),
    }
    result
}

async fn run_layers(
    case: Case,
    settings: Settings,
    tmp: &std::path::Path,
) -> Result<Outcome, BoxError> {
    use cluster::{mem_transports, quic_transports, tcp_transports};
    let addrs = match case.net {
        Net::Quic => cluster::loopback_addresses()?,
        Net::Tcp => cluster::tcp_loopback_addresses()?,
        Net::Mem => cluster::mem_addresses(),
    };
    let configs = cluster::configs(&addrs, settings);
    for c in &configs {
        c.validate()?;
    }
    match case.net {
        Net::Quic => run_on(case, &configs, quic_transports(&configs)?, tmp).await,
        Net::Tcp => run_on(case, &configs, tcp_transports(&configs)?, tmp).await,
        Net::Mem => run_on(case, &configs, mem_transports(&configs), tmp).await,
    }
}

/// Runs `case` over `transports` on the case's log store.
async fn run_on<T: ha_core::Transport>(
    case: Case,
    configs: &[ha_core::Config],
    transports: Vec<T>,
    tmp: &std::path::Path,
) -> Result<Outcome, BoxError> {
    use cluster::{build, mem_stores, wal_stores};
    match case.store {
        Store::Wal => {
            // Kept until the run is over (its nodes are shut down and dropped).
            let dir = tempfile::Builder::new()
                .prefix("ha-bench-")
                .tempdir_in(tmp)
                .map_err(|e| format!("temporary directory in {}: {e}", tmp.display()))?;
            let nodes = build(configs, transports, wal_stores(configs, dir.path())?)?;
            run::run(nodes, case.plan).await
        }
        Store::Mem => run::run(build(configs, transports, mem_stores(configs))?, case.plan).await,
    }
}
