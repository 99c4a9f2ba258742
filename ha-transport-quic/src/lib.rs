//! `ha-transport-quic`: the replication and Raft RPCs over mutually authenticated
//! QUIC (quinn + rustls, TLS 1.3 only).
//!
//! Certificates, TLS configuration and identity come from `ha-tls`, frames
//! from `ha_core::wire`: the TCP transport shares both. With the `testkit`
//! feature, [`testkit`] builds test transports and runs ha-core's transport
//! conformance harness over QUIC.

#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;

pub use transport::{QuicConnection, QuicOptions, QuicTransport};
