//! Conformance suites that every implementation of the core traits runs, in the
//! manner of openraft's storage suite.
//!
//! - [`log_store_suite`] checks a [`LogStore`](crate::log_store::LogStore) against
//!   the contract in [`crate::log_store`]; each check is also a public function.
//! - [`transport_suite`] checks a [`Transport`](crate::transport::Transport) built by
//!   a [`TransportHarness`] against the contract in [`crate::transport`]; each check
//!   is also a public function.
//!
//! A failing check panics with a message that starts with the suite and check name,
//! for example `[log_store_suite::purge_prefix] ...`.

mod log_store;
mod transport;

pub use log_store::*;
pub use transport::*;
