//! `ha-node`: the HA replication node binary.
//!
//! This release ships the operator's first two steps: `ha-node certs` (the
//! cluster's certificates) and `ha-node check-config` (a config file checked
//! exactly as a node would at start). Running the replicated service lands with
//! the rest of issue 12.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ha_node::certs::{self, NodeArg};
use ha_node::config::{ConfigFileError, NodeFile};

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
        Command::CheckConfig { config } => {
            let base = config.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            match NodeFile::load(&config).and_then(|f| f.check(&base)) {
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
                    let e = ConfigFileError {
                        file: e.file.clone().or(Some(config.clone())),
                        ..e
                    };
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
