//! [`QuicOptions`]: the tuning of a [`QuicTransport`](super::QuicTransport).

use std::net::SocketAddr;
use std::time::Duration;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::transport::NetOptions;
use ha_core::types::NodeId;
use ha_tls::config::{system_clock, Clock};

/// Control streams a peer may have open at once by default.
pub const MAX_CONTROL_STREAMS: u32 = 32;

/// Tuning of a [`QuicTransport`](super::QuicTransport): what every network
/// transport shares ([`NetOptions`]; its idle timeout is QUIC's, its
/// keep-alive QUIC's keep-alive interval) and what is QUIC's own.
#[derive(Clone)]
pub struct QuicOptions {
    /// Local UDP address to bind.
    pub bind: SocketAddr,
    /// The shared tuning.
    pub net: NetOptions,
    /// Bound on winding down a retired duplicate connection (this node's
    /// requests on it answered, the peer's retire received); then it is closed
    /// anyway and requests still on it fail.
    pub drain_timeout: Duration,
    /// Control requests one peer may have in progress at once on a connection
    /// (each on its own stream); further streams wait for QUIC stream credit.
    pub max_control_streams: u32,
    /// The clock certificates are checked against (the system clock; tests
    /// move a manual one along).
    pub tls_clock: Clock,
}

impl std::fmt::Debug for QuicOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicOptions")
            .field("bind", &self.bind)
            .field("net", &self.net)
            .field("max_control_streams", &self.max_control_streams)
            .finish_non_exhaustive()
    }
}

impl QuicOptions {
    /// Options for `bind` and `members` with defaults for a LAN.
    pub fn new(bind: SocketAddr, members: Vec<NodeId>) -> Self {
        QuicOptions {
            bind,
            net: NetOptions::new(members),
            drain_timeout: Duration::from_secs(10),
            max_control_streams: MAX_CONTROL_STREAMS,
            tls_clock: system_clock(),
        }
    }

    /// Options from a node's config alone: as [`QuicOptions::from_config`],
    /// bound to the config's `bind_addr`, which must be an IP address and port.
    pub fn for_node(config: &Config) -> Result<Self, TransportError> {
        Ok(Self::from_config(config, NetOptions::bind_addr(config)?))
    }

    /// Options from a node's config ([`NetOptions::from_config`]), bound to
    /// `bind`.
    pub fn from_config(config: &Config, bind: SocketAddr) -> Self {
        QuicOptions {
            net: NetOptions::from_config(config),
            ..QuicOptions::new(bind, Vec::new())
        }
    }
}
