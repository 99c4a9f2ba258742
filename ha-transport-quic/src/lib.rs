//! `ha-transport-quic`: the replication and Raft RPCs over mutually authenticated
//! QUIC (quinn + rustls, TLS 1.3 only).
//!
//! - [`certs`]: a cluster CA and node certificates (rcgen), PEM files, loading
//!   them with clear errors ([`certs::Identity`]).
//! - [`tls`]: rustls configurations whose verifiers accept only certificates that
//!   chain to the cluster CA and name a configured member.
//! - [`framing`]: length-prefixed postcard frames with a size limit.
//!
//! These three modules are shared with the TCP transport. With the `testkit`
//! feature, [`testkit`] builds test clusters and runs ha-core's transport
//! conformance harness over QUIC.

pub mod certs;
pub mod framing;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod transport;

pub use transport::{QuicConnection, QuicOptions, QuicTransport};
