//! [`QuicTransport`] and [`QuicConnection`]: the [`Transport`] and
//! [`PeerConnection`] of ha-core over QUIC with mutual TLS.
//!
//! # Streams
//! Every stream starts with one byte naming its kind, then carries
//! [`framing`] frames:
//! - [`STREAM_WAL`]: one long-lived, ordered bidirectional stream per connection
//!   and direction (a second one from the peer closes the connection).
//!   WAL-channel requests are queued when `call` is invoked and
//!   written in that order (several queued requests in one write); the receiver
//!   hands them to its handler one after the other (reading ahead up to
//!   [`WAL_WINDOW`] requests) and answers in order.
//! - [`STREAM_CONTROL`]: one bidirectional stream per control request (heartbeats,
//!   votes, fences, floors, promote), so they never wait behind WAL data.
//! - [`STREAM_RETIRE`]: "I will send no more requests on this connection and have
//!   every answer I waited for" (see below); no frames follow.
//!
//! # One connection per peer pair
//! A connection is used both ways: the dialer's and the acceptor's requests share
//! it. When both nodes dial at once, two connections exist for a moment; both
//! nodes then keep the same one, deterministically: the one dialed by the lower
//! node id (among several from the same dialer, the newest). The other is
//! *retired*: no new request goes on it and requests already on it finish
//! normally. WAL requests on the kept connection wait until every connection
//! kept before it has answered all of its own or closed, so WAL order holds
//! across any number of switches. Once each side has told the other it is done
//! ([`STREAM_RETIRE`]), the retired connection is closed with the application
//! code [`CODE_SUPERSEDED`]; winding down is bounded by
//! [`QuicOptions::drain_timeout`], after which it is closed anyway and requests
//! still on it fail.
//!
//! Normally no request fails because of this. A control request that does fail
//! on a retired connection (it died, the request may have run) is retried once
//! on the kept one only if running it twice is harmless (heartbeats, votes,
//! pre-votes, fences); a promote or raise-floor, like any WAL request, fails
//! with the error and the engine decides.
//!
//! If the peer retires the connection this node keeps and no connection the
//! peer would prefer arrives within `NetOptions::connect_timeout` (their
//! views of which connections are open differed), this node logs it and retires
//! it too; the reconnect task or the next call dials anew, so the pair settles
//! on one connection. A peer may hold at most [`MAX_CONNECTIONS_PER_PEER`] open
//! connections; one it opens beyond that is closed as a protocol error.
//!
//! # Reconnecting
//! While a [`QuicConnection`] to a peer is open, a background task re-dials that
//! peer whenever its connection drops, with exponential backoff and jitter
//! between the configured reconnect interval and maximum, so the next call
//! finds a live connection. A call that finds no live connection dials itself
//! (sharing the backoff; one dial at a time per peer). [`Transport::close`]
//! stops these tasks and waits for them.
//!
//! # Backpressure
//! At most `NetOptions::wal_window` WAL requests per peer are queued or
//! awaiting their answer. A WAL call beyond that waits, in call order, until one
//! is answered, or fails with [`TransportError::Timeout`] at its deadline;
//! nothing is buffered without limit.
//!
//! A garbage, truncated or oversized frame closes that connection with a logged
//! error; other peers are unaffected. So does a WAL stream that fails or ends
//! while its connection is open (for example when the peer cannot serve it
//! yet): a connection is never left open without its WAL stream, so "open" is
//! all that makes a connection usable, and both nodes see the same.
//!
//! [`Transport`]: ha_core::transport::Transport
//! [`Transport::close`]: ha_core::transport::Transport::close
//! [`PeerConnection`]: ha_core::transport::PeerConnection
//! [`TransportError::Timeout`]: ha_core::error::TransportError::Timeout
//! [`framing`]: ha_core::wire

// This node's calls: `QuicConnection`, control calls, the retry rule.
mod client;
// Dialing a peer (one dial at a time, a bounded number of them).
mod dial;
// One QUIC connection and the counts of this node's requests on it.
mod link;
// `QuicOptions`.
mod options;
// One connection per peer pair: which one is kept, retiring the others.
mod pair;
// A peer's links, window and dial state.
mod peer;
// The reconnect task and its backoff.
mod reconnect;
// Accepting connections and streams, answering requests.
mod server;
// `QuicTransport` and the state its tasks share.
mod shared;
// The WAL stream, both ways.
mod wal_stream;

pub use client::QuicConnection;
pub use options::{QuicOptions, MAX_CONTROL_STREAMS};
pub use shared::QuicTransport;

/// First byte of the WAL stream.
pub const STREAM_WAL: u8 = 1;
/// First byte of a control stream.
pub const STREAM_CONTROL: u8 = 2;
/// First byte of a retire stream: its sender retired this connection (it is
/// superseded by the pair's kept one), sends no more requests on it and has
/// every answer it waited for.
pub const STREAM_RETIRE: u8 = 3;
/// How many WAL requests a receiver reads ahead of its handler; also the default
/// WAL window (`NetOptions::wal_window`).
pub use ha_core::transport::WAL_WINDOW;

/// Application close code: orderly shutdown.
const CODE_SHUTDOWN: u32 = 0;
/// Application close code: the peer violated the protocol.
const CODE_PROTOCOL: u32 = 1;
/// Application close code: the connection was closed by its user.
const CODE_CLOSED: u32 = 2;
/// Application close code: a duplicate connection of a peer pair, closed once
/// both sides finished with it; the pair's kept connection carries on.
pub const CODE_SUPERSEDED: u32 = 3;

/// At most this many open connections per peer (the kept one and those being
/// retired); a connection the peer opens beyond that is closed as a protocol
/// error.
pub const MAX_CONNECTIONS_PER_PEER: usize = 3;
