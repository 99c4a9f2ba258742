//! [`TcpOptions`]: the tuning of a [`TcpTransport`](crate::TcpTransport).

use std::net::SocketAddr;
use std::time::Duration;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::types::NodeId;
use ha_core::wire;
use ha_tls::config::{system_clock, Clock};

use crate::WAL_WINDOW;

/// Control requests in progress at once on one inbound connection by default.
pub const MAX_CONTROL_INFLIGHT: usize = 32;

/// Handshakes in progress at once by default (connections beyond that are
/// closed at once).
pub const MAX_HANDSHAKES: usize = 64;

/// Tuning of a [`TcpTransport`](crate::TcpTransport).
#[derive(Clone)]
pub struct TcpOptions {
    /// Local TCP address to listen on.
    pub bind: SocketAddr,
    /// The node ids a peer certificate may name.
    pub members: Vec<NodeId>,
    /// First reconnect delay after a lost connection.
    pub reconnect_interval: Duration,
    /// Maximum reconnect delay.
    pub max_reconnect_backoff: Duration,
    /// Bound on connecting plus the TLS handshake (dial or accept).
    pub connect_timeout: Duration,
    /// A connection on which nothing arrived for this long is declared dead
    /// (the dialer pings every [`keep_alive`](Self::keep_alive) when idle, the
    /// acceptor answers every ping); also the kernel's bound on unacknowledged
    /// data (`TCP_USER_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Ping interval of an idle connection (a third of the idle timeout by
    /// default); also the kernel keep-alive probe interval.
    pub keep_alive: Duration,
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// Once a frame's first byte arrived, the rest must arrive within this; the
    /// kind byte after the handshake too.
    pub frame_timeout: Duration,
    /// Bound on closing connections and stopping tasks at
    /// [`Transport::close`](ha_core::transport::Transport::close).
    pub close_timeout: Duration,
    /// At most this many WAL requests per peer are queued or awaiting their
    /// answer; further WAL calls wait (until their deadline). At least 1.
    pub wal_window: usize,
    /// Bytes of frames one connection may hold at once (requests read and not
    /// yet answered, or responses being read); at least `max_frame`.
    pub read_budget: usize,
    /// Control requests one inbound connection may have in progress at once;
    /// the connection is not read further until one is answered.
    pub max_control_inflight: usize,
    /// TLS handshakes in progress at once; connections beyond that are closed.
    pub max_handshakes: usize,
    /// Seed of the reconnect jitter (mixed with the node pair).
    pub seed: u64,
    /// The clock certificates are checked against (the system clock; tests
    /// move a manual one along).
    pub tls_clock: Clock,
}

impl std::fmt::Debug for TcpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOptions")
            .field("bind", &self.bind)
            .field("members", &self.members)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_frame", &self.max_frame)
            .field("read_budget", &self.read_budget)
            .field("wal_window", &self.wal_window)
            .finish_non_exhaustive()
    }
}

impl TcpOptions {
    /// Options for `bind` and `members` with defaults for a LAN.
    pub fn new(bind: SocketAddr, members: Vec<NodeId>) -> Self {
        let idle = Duration::from_secs(1);
        TcpOptions {
            bind,
            members,
            reconnect_interval: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: idle,
            keep_alive: idle / 3,
            max_frame: wire::MAX_FRAME_BYTES,
            frame_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_millis(500),
            wal_window: WAL_WINDOW,
            read_budget: wire::DEFAULT_READ_BUDGET,
            max_control_inflight: MAX_CONTROL_INFLIGHT,
            max_handshakes: MAX_HANDSHAKES,
            seed: 0,
            tls_clock: system_clock(),
        }
    }

    /// Options from a node's config alone: as [`TcpOptions::from_config`],
    /// listening on the config's `bind_addr`, which must be an IP address and
    /// port.
    pub fn for_node(config: &Config) -> Result<Self, TransportError> {
        let bind: SocketAddr = config.bind_addr.parse().map_err(|e| {
            TransportError::Local(format!(
                "bind_addr {:?} is not an IP address and port: {e}",
                config.bind_addr
            ))
        })?;
        Ok(Self::from_config(config, bind))
    }

    /// Options from a node's config: its members (itself and its peers),
    /// reconnect backoff, and an idle timeout of twice the failover timeout (at
    /// least 300 ms) with pings at a third of it.
    pub fn from_config(config: &Config, bind: SocketAddr) -> Self {
        let mut members: Vec<NodeId> = config.peers.iter().map(|m| m.id).collect();
        members.push(config.node_id);
        let idle = (config.failover_timeout * 2).max(Duration::from_millis(300));
        TcpOptions {
            reconnect_interval: config.reconnect_interval,
            max_reconnect_backoff: config.max_reconnect_backoff,
            connect_timeout: config.rpc_timeout.max(Duration::from_secs(1)),
            idle_timeout: idle,
            keep_alive: idle / 3,
            seed: config.node_id.0,
            ..TcpOptions::new(bind, members)
        }
    }
}
