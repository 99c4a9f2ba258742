//! `ha-transport-tcp`: the replication and Raft RPCs over mutually
//! authenticated TCP with TLS 1.3 (tokio + rustls), for deployments that cannot
//! use UDP. The same contract, certificates, node-identity rules and frames as
//! `ha-transport-quic`; this crate links no quinn.
//!
//! # Connections
//! A node sends its requests to a peer on connections it dialed, two per peer:
//! a **control** connection and a **WAL** connection, so heartbeats, votes,
//! fences and the rest never wait behind WAL bytes (not even in the kernel's
//! socket buffers). The peer answers on the same connection. After the TLS
//! handshake the dialer sends a hello: one byte naming the connection's kind
//! ([`KIND_CONTROL`] or [`KIND_WAL`]), its incarnation (a random `u64` per
//! transport) and the connection's number among its connections of that kind
//! to that peer (both big-endian `u64`). Then both directions carry
//! `ha_core::wire` frames: `Envelope<Request>` up, `Envelope<Response>` down.
//! An empty frame is a keep-alive: each side sends one whenever it wrote
//! nothing for the keep-alive interval (so a handler slower than the idle
//! timeout never looks like a dead peer), and a connection on which nothing
//! arrived for the idle timeout is closed by either side.
//!
//! - On a control connection requests are answered as they finish, in any
//!   order; the dialer matches answers by request id. At most
//!   [`TcpOptions::max_control_inflight`] are in progress per connection.
//! - On the WAL connection requests are handed to the node as they arrive, in
//!   order, without waiting for earlier answers, and answered in order. At most
//!   `NetOptions::wal_window` WAL requests per peer are queued or awaiting an
//!   answer; a WAL call beyond that waits, in call order, until one is answered
//!   or its deadline passes. An error response is an answer like any other.
//!
//! # One connection per peer pair, channel and direction
//! The duplicate-connection rule: a newer connection of the same kind from the
//! same dialer replaces the older one (newer: a higher number of the same
//! incarnation, or another incarnation, a restarted dialer; an older one that
//! finishes its handshake late is refused). The acceptor stops reading the older
//! connection, and for a WAL connection waits until the older one has handed
//! the node its last request, before it reads the newer, so WAL requests reach
//! the node in call order across any number of reconnects (a request still
//! unread on the older connection is dropped, and its caller already saw the
//! connection fail). A dialer has at most one live connection of each kind per
//! peer (it dials only when the last one is dead), and an acceptor holds at most
//! [`MAX_CONNECTIONS_PER_PEER`] per peer and kind; beyond that, new ones are
//! refused.
//!
//! # Reconnecting
//! While a [`TcpConnection`] to a peer is open, a background task re-dials the
//! peer's control connection whenever it drops, paced by the peer's
//! exponential backoff with jitter (`ha_core::backoff`); a call that finds no
//! live connection dials itself, sharing that backoff (one dial at a time per
//! peer and kind).
//!
//! # Bounds
//! Every read is bounded in size (`NetOptions::max_frame`), in memory (each
//! peer's `ha_core::wire::ReadBudget` per kind, shared by its successive
//! connections, taken before a frame is allocated and held until its request is
//! answered; the requests in progress are bounded the same way) and in time
//! (the handshake, the hello and each started frame have deadlines; an idle
//! connection is closed). At most [`TcpOptions::max_handshakes`] handshakes run
//! at once, and at most 8 from one source address; the place is freed once the
//! peer is authenticated. A garbage, truncated or oversized frame closes only
//! its connection.
//!
//! Its tests run the scaffold both transports share (`ha-transport-testkit`):
//! ha-core's conformance suite, the rejection suite and the end-to-end
//! failover cluster.

mod client;
mod link;
mod options;
mod server;
mod socket;
#[cfg(feature = "testkit")]
pub mod testkit;
mod transport;

pub use client::TcpConnection;
pub use options::{TcpOptions, MAX_CONTROL_INFLIGHT, MAX_HANDSHAKES};
pub use transport::TcpTransport;

/// First byte of a control connection after the handshake.
pub const KIND_CONTROL: u8 = 2;
/// First byte of a WAL connection after the handshake.
pub const KIND_WAL: u8 = 1;
/// How many WAL requests may be queued or awaiting an answer per peer by
/// default; also how far an acceptor reads ahead of its handler.
pub use ha_core::transport::WAL_WINDOW;
/// At most this many open inbound connections per peer and kind (the current
/// one and those being replaced); one beyond that is closed at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 3;
