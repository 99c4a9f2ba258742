//! `ha-node`: the node binary's library side.
//!
//! - [`config`]: the TOML config file, refused with the key (and line) at fault,
//!   turned into the replication config.
//! - [`certs`]: `ha-node certs`, the cluster CA and node certificates.
//! - [`kv`] and [`store`]: the key-value commands and the redb state machine
//!   (its snapshots streamed in `snapshot`'s format).
//! - [`service`]: `ha-node run`, the node as a foreground service; [`api`] and
//!   [`http`] its HTTP API.
//! - [`client`] and [`json`]: the API's client side (the CLI, the demo, tests).

pub mod api;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod http;
pub mod json;
pub mod kv;
pub mod local;
pub mod service;
mod snapshot;
pub mod store;
