//! `ha-node`: the node binary's library side.
//!
//! - [`config`]: the TOML config file, refused with the key (and line) at fault,
//!   turned into the replication config.
//! - [`certs`]: `ha-node certs`, the cluster CA and node certificates.
//! - [`kv`] and [`store`]: the key-value commands and the redb state machine
//!   (its snapshots streamed in `snapshot`'s format).
//! - [`service`]: `ha-node run`, the node as a foreground service; [`api`] and
//!   [`http`] its HTTP API.
//! - [`metrics`] (`GET /metrics`) and [`events`] (`GET /v1/events`, the
//!   persisted event history): what the node tells its operator.
//! - [`client`] and [`json`]: the API's client side (the CLI, the demo, tests);
//!   [`cli`] and [`watch`] the command line's tables and live views.

mod admin;
pub mod api;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod events;
pub mod http;
pub mod json;
pub mod kv;
pub mod local;
pub mod metrics;
mod procstat;
pub mod service;
mod snapshot;
pub mod store;
pub mod watch;
