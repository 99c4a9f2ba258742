//! [`QuicOptions`]: the tuning of a [`QuicTransport`](super::QuicTransport).

use std::net::SocketAddr;
use std::time::Duration;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::types::NodeId;

use super::WAL_WINDOW;
use ha_core::wire;
use ha_tls::config::{system_clock, Clock};

/// Tuning of a [`QuicTransport`](super::QuicTransport).
#[derive(Clone)]
pub struct QuicOptions {
    /// Local UDP address to bind.
    pub bind: SocketAddr,
    /// The node ids a peer certificate may name.
    pub members: Vec<NodeId>,
    /// First reconnect delay after a lost connection.
    pub reconnect_interval: Duration,
    /// Maximum reconnect delay.
    pub max_reconnect_backoff: Duration,
    /// Bound on a handshake (dial or accept).
    pub connect_timeout: Duration,
    /// QUIC idle timeout: a silent peer is declared gone after this.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval (a third of the idle timeout by default).
    pub keep_alive: Duration,
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// Once a frame's first byte arrived, the rest must arrive within this; a
    /// control stream's whole request (and its kind byte) too.
    pub frame_timeout: Duration,
    /// Bound on waiting for connections to drain at [`Transport::close`].
    ///
    /// [`Transport::close`]: ha_core::transport::Transport::close
    pub close_timeout: Duration,
    /// At most this many WAL requests per peer are queued or awaiting their
    /// answer; further WAL calls wait (until their deadline) for one to be
    /// answered. At least 1; [`WAL_WINDOW`] by default.
    pub wal_window: usize,
    /// Bound on winding down a retired duplicate connection (this node's
    /// requests on it answered, the peer's retire received); then it is closed
    /// anyway and requests still on it fail.
    pub drain_timeout: Duration,
    /// Bytes of frames one connection may hold at once (requests read and not
    /// yet answered, responses being read); at least `max_frame`.
    pub read_budget: usize,
    /// Control requests one peer may have in progress at once on a connection
    /// (each on its own stream); further streams wait for QUIC stream credit.
    pub max_control_streams: u32,
    /// Seed of the reconnect jitter (mixed with the node pair); a node's
    /// configured seed.
    pub seed: u64,
    /// The clock certificates are checked against (the system clock; tests
    /// move a manual one along).
    pub tls_clock: Clock,
}

impl std::fmt::Debug for QuicOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicOptions")
            .field("bind", &self.bind)
            .field("members", &self.members)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_frame", &self.max_frame)
            .field("read_budget", &self.read_budget)
            .field("max_control_streams", &self.max_control_streams)
            .finish_non_exhaustive()
    }
}

/// Control streams a peer may have open at once by default.
pub const MAX_CONTROL_STREAMS: u32 = 32;

impl QuicOptions {
    /// Options for `bind` and `members` with defaults for a LAN.
    pub fn new(bind: SocketAddr, members: Vec<NodeId>) -> Self {
        let idle = Duration::from_secs(1);
        QuicOptions {
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
            drain_timeout: Duration::from_secs(10),
            read_budget: wire::DEFAULT_READ_BUDGET,
            max_control_streams: MAX_CONTROL_STREAMS,
            seed: 0,
            tls_clock: system_clock(),
        }
    }

    /// Options from a node's config alone: as [`QuicOptions::from_config`], bound
    /// to the config's `bind_addr`, which must be an IP address and port.
    pub fn for_node(config: &Config) -> Result<Self, TransportError> {
        let bind: SocketAddr = config.bind_addr.parse().map_err(|e| {
            TransportError::Local(format!(
                "bind_addr {:?} is not an IP address and port: {e}",
                config.bind_addr
            ))
        })?;
        Ok(Self::from_config(config, bind))
    }

    /// Options from a node's config: its members (itself and its peers), reconnect
    /// backoff, and an idle timeout of twice the failover timeout (at least
    /// 300 ms) with keep-alives at a third of it.
    pub fn from_config(config: &Config, bind: SocketAddr) -> Self {
        let mut members: Vec<NodeId> = config.peers.iter().map(|m| m.id).collect();
        members.push(config.node_id);
        let idle = (config.failover_timeout * 2).max(Duration::from_millis(300));
        QuicOptions {
            reconnect_interval: config.reconnect_interval,
            max_reconnect_backoff: config.max_reconnect_backoff,
            connect_timeout: config.rpc_timeout.max(Duration::from_secs(1)),
            idle_timeout: idle,
            keep_alive: idle / 3,
            seed: config.node_id.0,
            ..QuicOptions::new(bind, members)
        }
    }
}
