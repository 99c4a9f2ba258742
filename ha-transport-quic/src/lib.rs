//! `ha-transport-quic`: the replication and Raft RPCs over mutually authenticated
//! QUIC (quinn + rustls, TLS 1.3 only).
//!
//! Certificates, TLS configuration and identity come from `ha-tls`, frames
//! from `ha_core::wire`: the TCP transport shares both, and the tests of both
//! run one scaffold (`ha-transport-testkit`). The `testkit` feature adds
//! accessors tests use to watch the connection machinery.

#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;

pub use transport::{QuicConnection, QuicOptions, QuicTransport};
