//! `ha-node`: the HA replication node binary.
//!
//! `ha-node run` is the service; `certs` and `check-config` prepare it;
//! `status [--watch]`, `events [--follow]`, `kv`, `promote`, `switchover`, `pause-failover` and
//! `resume-failover` are its client; `demo` shows it all on one machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ha_node::certs::{self, NodeArg};
use ha_node::cli::{self, DEFAULT_API};
use ha_node::config::{Checked, ConfigFileError, NodeFile, TransportKind};
use ha_node::watch;

/// The HA replication node.
#[derive(Parser, Debug)]
#[command(name = "ha-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the cluster CA and one certificate per node (PEM; keys mode 0600).
    ///
    /// Reuses the CA already in DIR (ca.pem, ca-key.pem) if there is one, so a
    /// replaced or added node gets a certificate from the same CA.
    ///
    /// Example: ha-node certs --out certs --node 1=db1.example,10.0.0.1 --node 2=db2.example --node 3
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A node: its id, then optionally `=` and the host names and IP
        /// addresses it is reached at, comma-separated. Repeat per node.
        #[arg(long = "node", value_name = "ID[=HOST_OR_IP,...]", required = true)]
        nodes: Vec<NodeArg>,
        /// Validity in days (of a new CA and of the node certificates).
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Check a config file as a node would at start, and say what it describes.
    CheckConfig {
        /// The node's TOML config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the node in the foreground until SIGTERM or SIGINT.
    ///
    /// Logs go to stderr (text or JSON, `[log]` in the config; RUST_LOG
    /// overrides the level). A second process on the same data directory is
    /// refused.
    Run {
        /// The node's TOML config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the whole cluster: each member's role, term, indexes, lag, health.
    Status {
        /// Any member's API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print the members' status JSON instead of a table.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw the table in place once a second, with a lag bar per
        /// standby, until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Print a member's event history: role changes, elections and their
    /// votes, fences, degraded-sync periods, switchovers, snapshots, operator
    /// requests, starts and stops (kept across restarts).
    Events {
        /// The member's API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Then print each new event as it happens, until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Read and write keys (writes go to the primary; a standby's answer is
    /// followed there).
    Kv {
        /// Any member's API.
        #[arg(long, default_value = DEFAULT_API, global = true)]
        api: String,
        #[command(subcommand)]
        op: KvOp,
    },
    /// Ask a standby to become primary (`--force`: without a quorum; writes the
    /// old primary acknowledged may be lost).
    Promote {
        /// The standby's API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Promote without a quorum.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        auth: Auth,
    },
    /// Hand over from the primary to the standby without losing a write.
    Switchover {
        /// The primary's API (another member's answer is followed).
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Stop automatic failover on every member (planned maintenance).
    PauseFailover {
        /// Any member's API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Undo pause-failover on every member.
    ResumeFailover {
        /// Any member's API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Start a primary, a standby and a witness on loopback as separate
    /// processes, kill the primary with SIGKILL, show the failover, the rejoin
    /// and a switchover, check every acknowledged write; exit 0 if all held.
    Demo {
        /// The peer transport.
        #[arg(long, value_enum, default_value_t = DemoTransport::Quic)]
        transport: DemoTransport,
        /// Keys written before the kill.
        #[arg(long, default_value_t = 500)]
        keys: usize,
        /// Keep the working directory (configs, data, logs).
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DemoTransport {
    Quic,
    Tcp,
}

/// The admin token: `--token`, else `HA_NODE_TOKEN`, else `--token-file`.
#[derive(clap::Args, Debug)]
struct Auth {
    /// The admin token.
    #[arg(long)]
    token: Option<String>,
    /// A file holding the admin token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum KvOp {
    /// Write a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Compare-and-set: the key's current mod_index (0: must not exist).
        #[arg(long)]
        if_mod_index: Option<u64>,
    },
    /// Read a key (linearizable on the primary; `--stale` on any data node).
    Get {
        /// The key.
        key: String,
        /// Read this node's possibly stale state.
        #[arg(long)]
        stale: bool,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
        /// Compare-and-set, as for put.
        #[arg(long)]
        if_mod_index: Option<u64>,
    },
    /// List keys with a prefix.
    List {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only keys after this one.
        #[arg(long)]
        start_after: Option<String>,
        /// Read this node's possibly stale state.
        #[arg(long)]
        stale: bool,
    },
}

fn load(config: &std::path::Path) -> Result<Checked, ConfigFileError> {
    let base = config.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    NodeFile::load(config)
        .and_then(|f| f.check(&base))
        .map_err(|e| ConfigFileError {
            file: e.file.clone().or(Some(config.to_path_buf())),
            ..e
        })
}

fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(config: &std::path::Path) -> ExitCode {
    let checked = match load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&checked.file.log.level, checked.file.log.format == "json");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ha-node run: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(ha_node::service::run(checked));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ha-node run failed");
            eprintln!("ha-node run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints an API answer: its body, and exit 0 only for a 2xx.
fn answer(r: Result<ha_node::client::Reply, String>) -> ExitCode {
    match r {
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Ok(r) => {
            let text = r.text();
            if (200..300).contains(&r.status) {
                println!("{text}");
                ExitCode::SUCCESS
            } else {
                eprintln!("{} {text}", r.status);
                ExitCode::FAILURE
            }
        }
    }
}

fn kv(api: &str, op: KvOp) -> ExitCode {
    let c = cli::client(None);
    match op {
        KvOp::Put {
            key,
            value,
            if_mod_index,
        } => {
            let q = if_mod_index.map_or(String::new(), |n| format!("?if_mod_index={n}"));
            let path = format!("/v1/kv/{}{q}", cli::encode_key(&key));
            answer(cli::kv_call(&c, api, "PUT", &path, Some(value.as_bytes())))
        }
        KvOp::Del { key, if_mod_index } => {
            let q = if_mod_index.map_or(String::new(), |n| format!("?if_mod_index={n}"));
            let path = format!("/v1/kv/{}{q}", cli::encode_key(&key));
            answer(cli::kv_call(&c, api, "DELETE", &path, None))
        }
        KvOp::Get { key, stale } => {
            let q = if stale { "?stale=true" } else { "" };
            let path = format!("/v1/kv/{}{q}", cli::encode_key(&key));
            match cli::kv_call(&c, api, "GET", &path, None) {
                Ok(r) if r.status == 200 => {
                    println!("{}", r.text());
                    eprintln!(
                        "(mod_index {}, term {})",
                        r.header("x-mod-index").unwrap_or("?"),
                        r.header("x-term").unwrap_or("?")
                    );
                    ExitCode::SUCCESS
                }
                other => answer(other),
            }
        }
        KvOp::List {
            prefix,
            limit,
            start_after,
            stale,
        } => {
            let mut path = format!("/v1/kv?prefix={}&limit={limit}", cli::encode_key(&prefix));
            if let Some(a) = start_after {
                path.push_str(&format!("&start_after={}", cli::encode_key(&a)));
            }
            if stale {
                path.push_str("&stale=true");
            }
            match cli::kv_call(&c, api, "GET", &path, None) {
                Ok(r) if r.status == 200 => match cli::list_lines(&r.body) {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::FAILURE
                    }
                },
                other => answer(other),
            }
        }
    }
}

fn admin(api: &str, what: &str, auth: Auth) -> ExitCode {
    let token = match cli::token(auth.token, auth.token_file.as_deref()) {
        Ok(Some(t)) => t,
        Ok(None) => {
            eprintln!("an admin token is needed: --token, HA_NODE_TOKEN or --token-file");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let c = cli::client(Some(token));
    answer(cli::kv_call(
        &c,
        api,
        "POST",
        &format!("/v1/admin/{what}"),
        None,
    ))
}

fn demo(transport: DemoTransport, keys: usize, keep: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ha-node demo: cannot find this binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = ha_node::demo::DemoOptions {
        transport: match transport {
            DemoTransport::Quic => TransportKind::Quic,
            DemoTransport::Tcp => TransportKind::Tcp,
        },
        keys: keys.max(1),
        keep,
    };
    // Ctrl-C: stop every member this demo started and remove its directory.
    let cleanup = ha_node::local::CleanupSlot::default();
    {
        let cleanup = cleanup.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
                ha_node::local::clean_up(&cleanup);
                eprintln!("interrupted: stopped the demo's nodes and removed its directory");
                std::process::exit(130);
            }
        });
    }
    let result = ha_node::demo::run(&exe, &opts, &cleanup);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Certs { out, nodes, days } => {
            if days < 1 {
                eprintln!("--days: at least 1");
                return ExitCode::FAILURE;
            }
            match certs::write(&out, &nodes, days) {
                Ok(w) => {
                    let how = if w.new_ca {
                        "wrote a new"
                    } else {
                        "reused the"
                    };
                    println!("{how} cluster CA: {}", w.ca.display());
                    for (id, cert, key) in &w.nodes {
                        println!("{id}: {} (key {})", cert.display(), key.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ha-node certs: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => run(&config),
        Command::Status {
            api, watch: true, ..
        } => watch::watch_status(&cli::client(None), &api),
        Command::Events {
            api,
            since,
            follow,
            json,
        } => {
            let opts = watch::EventsOptions {
                since,
                follow,
                json,
            };
            match watch::print_events(&cli::client(None), &api, opts, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { api, json, .. } => {
            let c = cli::client(None);
            match cli::cluster(&c, &api) {
                Ok(rows) => {
                    if json {
                        let all: Vec<serde_json::Value> = rows
                            .iter()
                            .map(|(api, s)| match s {
                                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                                Err(e) => serde_json::json!({"api": api, "error": e}),
                            })
                            .collect();
                        println!("{}", serde_json::Value::Array(all));
                    } else {
                        print!("{}", cli::table(&rows));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Kv { api, op } => kv(&api, op),
        Command::Promote { api, force, auth } => {
            let what = if force {
                "promote?force=true"
            } else {
                "promote"
            };
            admin(&api, what, auth)
        }
        Command::Switchover { api, auth } => admin(&api, "switchover", auth),
        Command::PauseFailover { api, auth } => admin(&api, "pause-failover", auth),
        Command::ResumeFailover { api, auth } => admin(&api, "resume-failover", auth),
        Command::Demo {
            transport,
            keys,
            keep,
        } => demo(transport, keys, keep),
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: node {} ({:?}), {} members, {:?} transport, commit mode {:?}, API on {}",
                    config.display(),
                    c.config.node_id.0,
                    c.file.role,
                    c.file.members.len(),
                    c.file.transport,
                    c.config.commit_mode,
                    c.api_listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
