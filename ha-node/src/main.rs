//! `ha-node`: the node binary (config file, embedded key-value store, HTTP API,
//! metrics, CLI). Lands with its own issue; until then it says so and exits.

fn main() {
    eprintln!("ha-node is not built yet; run `cargo xtask demo` for a simulated failover");
    std::process::exit(2);
}
