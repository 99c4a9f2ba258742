//! [`TcpOptions`]: the tuning of a [`TcpTransport`](crate::TcpTransport).

use std::net::SocketAddr;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::transport::NetOptions;
use ha_core::types::NodeId;
use ha_tls::config::{system_clock, Clock};

/// Control requests in progress at once on one inbound connection by default.
pub const MAX_CONTROL_INFLIGHT: usize = 32;

/// Handshakes in progress at once by default (connections beyond that are
/// closed at once).
pub const MAX_HANDSHAKES: usize = 64;

/// Tuning of a [`TcpTransport`](crate::TcpTransport): what every network
/// transport shares ([`NetOptions`]: a connection on which nothing arrived for
/// its idle timeout is declared dead, the dialer pings every keep-alive
/// interval when idle and the acceptor answers every ping; the idle timeout is
/// also the kernel's bound on unacknowledged data, `TCP_USER_TIMEOUT`, and the
/// keep-alive the kernel's probe interval) and what is TCP's own.
#[derive(Clone)]
pub struct TcpOptions {
    /// Local TCP address to listen on.
    pub bind: SocketAddr,
    /// The shared tuning.
    pub net: NetOptions,
    /// Control requests one inbound connection may have in progress at once;
    /// the connection is not read further until one is answered.
    pub max_control_inflight: usize,
    /// TLS handshakes in progress at once; connections beyond that are closed.
    pub max_handshakes: usize,
    /// The clock certificates are checked against (the system clock; tests
    /// move a manual one along).
    pub tls_clock: Clock,
}

impl std::fmt::Debug for TcpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOptions")
            .field("bind", &self.bind)
            .field("net", &self.net)
            .field("max_control_inflight", &self.max_control_inflight)
            .field("max_handshakes", &self.max_handshakes)
            .finish_non_exhaustive()
    }
}

impl TcpOptions {
    /// Options for `bind` and `members` with defaults for a LAN.
    pub fn new(bind: SocketAddr, members: Vec<NodeId>) -> Self {
        TcpOptions {
            bind,
            net: NetOptions::new(members),
            max_control_inflight: MAX_CONTROL_INFLIGHT,
            max_handshakes: MAX_HANDSHAKES,
            tls_clock: system_clock(),
        }
    }

    /// Options from a node's config alone: as [`TcpOptions::from_config`],
    /// listening on the config's `bind_addr`, which must be an IP address and
    /// port.
    pub fn for_node(config: &Config) -> Result<Self, TransportError> {
        Ok(Self::from_config(config, NetOptions::bind_addr(config)?))
    }

    /// Options from a node's config ([`NetOptions::from_config`]), listening on
    /// `bind`.
    pub fn from_config(config: &Config, bind: SocketAddr) -> Self {
        TcpOptions {
            net: NetOptions::from_config(config),
            ..TcpOptions::new(bind, Vec::new())
        }
    }
}
