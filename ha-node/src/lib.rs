//! `ha-node`: the node binary's library side.
//!
//! - [`config`]: the TOML config file, refused with the key (and line) at fault,
//!   turned into the replication config.
//! - [`certs`]: `ha-node certs`, the cluster CA and node certificates.

pub mod certs;
pub mod config;
pub mod kv;
pub mod store;
