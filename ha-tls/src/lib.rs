//! `ha-tls`: the one home of the TLS code the transports and `ha-node` share, so
//! a TCP-only build never links quinn and `ha-core` links no TLS stack.
//!
//! - [`certs`]: a cluster CA and node certificates (rcgen), PEM files, loading
//!   them with clear errors ([`certs::Identity`]), and the canonical
//!   `node-<id>` identity a certificate carries.
//! - [`config`]: rustls configurations (TLS 1.3 only, the ring provider passed
//!   explicitly, ALPN naming the wire version, no session resumption) whose
//!   verifiers accept only leaf certificates signed directly by the cluster CA
//!   that name a configured member, checked afresh on every handshake.
//! - [`connections`]: the connections each peer opened, by direction, as
//!   both transports count them for metrics.
//! - [`refusals`]: refused handshakes logged without letting a flood of them
//!   flood the log.
//! - `testkit` (feature `testkit`): a test cluster CA and a clock that
//!   certificate checks can be moved along with.

pub mod certs;
pub mod config;
pub mod connections;
pub mod refusals;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use certs::{CertError, CertificateAuthority, Identity, NodeCertSpec};
pub use config::{client_config, server_config, Clock, Members};
pub use connections::{ConnectionTally, Direction, PeerConnections};
pub use refusals::{Reason as RefusalReason, RefusalLog};
