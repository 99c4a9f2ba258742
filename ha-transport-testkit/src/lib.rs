//! `ha-transport-testkit`: the scaffold the QUIC and TCP transports' tests
//! share, so each check is written once and runs over both.
//!
//! - [`TlsStack`]: what a TLS transport tells the scaffold (how to build it on
//!   loopback, from a node config, and how to open a raw connection to it as an
//!   attacker would).
//! - [`StackHarness`]: ha-core's conformance harness over any stack.
//! - [`cluster`]: the three-node end-to-end failover test (driver, real `Wal`
//!   on disk, the stack's transport).
//! - [`mod@bench`]: the transport benchmark (throughput and round trips), the same
//!   figures for every stack.
//! - [`probe`]: the rejection suite (certificates, identities, frames, silent
//!   connections, expiry across reconnects); [`rejection_tests!`] expands it
//!   into one `#[tokio::test]` per check.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::{Config, Member};
use ha_core::error::TransportError;
use ha_core::message::{Envelope, Heartbeat, Request, Response};
use ha_core::testkit::conformance::{HarnessNode, TransportHarness};
use ha_core::transport::{BoxFuture, NetOptions, RequestHandler, Transport};
use ha_core::types::{LogIndex, MemberKind, NodeId, Position, Term};
use ha_tls::testkit::TestCluster;
use ha_tls::{Clock, Identity};

pub mod bench;
pub mod cluster;
pub mod probe;

/// The counting allocator [`memory_test!`] installs.
pub use cap;

/// `127.0.0.1:0`: a free loopback port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Which kind of raw connection (or stream) to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// One control request's path (QUIC: a control stream; TCP: a control
    /// connection).
    Control,
    /// The WAL path.
    Wal,
}

/// A raw connection to a transport, after the TLS handshake and the kind
/// marker: bytes in, frames out, as an attacker (or a broken peer) has it.
pub trait RawConn: Send {
    /// Writes raw bytes.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = Result<(), String>> + Send;
    /// Reads one frame body the server sent.
    fn recv(&mut self) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
    /// Resolves once the server has closed the connection.
    fn closed(&mut self) -> impl Future<Output = ()> + Send;
}

/// A TLS network transport as the scaffold drives it.
pub trait TlsStack: Send + Sync + 'static {
    /// The transport.
    type Transport: Transport + Clone;
    /// Its options.
    type Options: Clone + Send + Sync + 'static;
    /// A raw connection to it.
    type Raw: RawConn;

    /// Default options on a loopback port for `members`.
    fn options(members: &[NodeId]) -> Self::Options;
    /// Options from a node's config, bound to `bind`.
    fn from_config(config: &Config, bind: SocketAddr) -> Self::Options;
    /// Checks certificates against `clock`.
    fn set_clock(opts: &mut Self::Options, clock: Clock);
    /// The tuning every network transport shares, in `opts`.
    fn net(opts: &mut Self::Options) -> &mut NetOptions;
    /// Tightens the bounds on silent peers: `idle` (nothing received on a
    /// connection; keep-alives at a third of it) and `frame` (a started frame,
    /// or a control request).
    fn set_timeouts(opts: &mut Self::Options, idle: Duration, frame: Duration) {
        let net = Self::net(opts);
        net.idle_timeout = idle;
        net.keep_alive = idle / 3;
        net.frame_timeout = frame;
    }
    /// A transport for `identity` and its bound address.
    fn build(
        identity: &Identity,
        opts: Self::Options,
    ) -> Result<(Self::Transport, SocketAddr), TransportError>;
    /// The log of `transport`'s refused handshakes (counts, and a signal).
    fn refusals(transport: &Self::Transport) -> &ha_tls::RefusalLog;
    /// `transport`'s connections per peer: open now and opened since start.
    fn connections(transport: &Self::Transport) -> Vec<ha_tls::PeerConnections>;
    /// `n` distinct free loopback addresses of the kind the transport binds
    /// (UDP or TCP), found by binding them all at once and releasing them.
    fn free_addresses(n: usize) -> Vec<SocketAddr>;
    /// Opens a raw connection to `addr` with `tls` under the name of `server`,
    /// and starts a path of `kind` on it.
    fn raw(
        addr: SocketAddr,
        server: NodeId,
        tls: rustls::ClientConfig,
        kind: RawKind,
    ) -> impl Future<Output = Result<Self::Raw, String>> + Send;
}

/// A transport of stack `S` for `identity` with `opts`, and the member record
/// peers dial.
pub fn harness_node<S: TlsStack>(
    identity: &Identity,
    opts: S::Options,
) -> Result<HarnessNode<S::Transport>, TransportError> {
    let (transport, addr) = S::build(identity, opts)?;
    Ok(HarnessNode {
        member: Member {
            id: identity.node,
            addr: addr.to_string(),
            kind: MemberKind::Data,
        },
        transport,
    })
}

/// A transport of stack `S` for member `node` of `cluster` with `opts`.
pub fn node_with<S: TlsStack>(
    cluster: &TestCluster,
    node: NodeId,
    opts: S::Options,
) -> Result<HarnessNode<S::Transport>, TransportError> {
    let identity = cluster
        .identity(node)
        .map_err(|e| TransportError::Local(e.to_string()))?;
    harness_node::<S>(&identity, opts)
}

/// ha-core's [`TransportHarness`] over stack `S` on loopback: nodes `1..=n`,
/// all members, certificates from a fresh CA per call.
///
/// # Panics
/// If certificates cannot be generated or a loopback socket cannot be bound
/// (the harness has no way to report an error).
#[derive(Debug, Default)]
pub struct StackHarness<S>(std::marker::PhantomData<S>);

impl<S> StackHarness<S> {
    /// The harness.
    pub fn new() -> Self {
        StackHarness(std::marker::PhantomData)
    }
}

impl<S: TlsStack> TransportHarness for StackHarness<S> {
    type Transport = S::Transport;

    #[allow(clippy::expect_used)]
    fn nodes(&self, n: usize) -> impl Future<Output = Vec<HarnessNode<S::Transport>>> + Send {
        let cluster = TestCluster::new(n as u64).expect("generate test certificates");
        let members = cluster.members().to_vec();
        let nodes = members
            .iter()
            .map(|&id| {
                node_with::<S>(&cluster, id, S::options(&members))
                    .expect("bind a loopback transport")
            })
            .collect();
        std::future::ready(nodes)
    }
}

/// Answers heartbeats and WAL batches (acknowledging them), anything else with
/// an error.
#[derive(Debug)]
pub struct Echo(pub NodeId);

impl RequestHandler for Echo {
    fn handle(&self, _peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        let body = match &req.body {
            Request::Heartbeat(h) => Response::HeartbeatAck(ha_core::message::HeartbeatAck {
                accepted: true,
                last: h.last,
                applied: h.commit,
                voter: true,
            }),
            Request::WalBatch(b) => Response::WalAck(ha_core::message::WalAck {
                batch_term: req.term,
                result: ha_core::message::AckResult::Durable(
                    b.entries.last().map(|e| e.position).unwrap_or(b.prev),
                ),
                applied: b.commit,
            }),
            _ => Response::Error(ha_core::message::RpcError::Malformed("echo".into())),
        };
        Box::pin(std::future::ready(Envelope {
            from: self.0,
            to: req.from,
            term: req.term,
            request_id: req.request_id,
            body,
        }))
    }
}

/// An [`Echo`] handler for `id`.
pub fn echo(id: NodeId) -> Arc<dyn RequestHandler> {
    Arc::new(Echo(id))
}

/// An envelope from `from` to `to` in term 1 of `from`, with request id `id`.
pub fn envelope(from: NodeId, to: NodeId, id: u64, body: Request) -> Envelope<Request> {
    Envelope {
        from,
        to,
        term: Term {
            number: 1,
            node: from,
        },
        request_id: id,
        body,
    }
}

/// A heartbeat from `from` to `to` with request id `id`.
pub fn heartbeat(from: NodeId, to: NodeId, id: u64) -> Envelope<Request> {
    let last = Position::new(
        Term {
            number: 1,
            node: from,
        },
        LogIndex(1),
    );
    envelope(
        from,
        to,
        id,
        Request::Heartbeat(Heartbeat {
            commit: LogIndex(1),
            last,
        }),
    )
}

/// A WAL batch from `from` to `to` with request id `id`, carrying entry
/// `id + 1` (its 8 bytes are `id`).
pub fn wal_batch(from: NodeId, to: NodeId, id: u64) -> Envelope<Request> {
    let term = Term {
        number: 1,
        node: from,
    };
    envelope(
        from,
        to,
        id,
        Request::WalBatch(ha_core::message::WalBatch {
            prev: Position::new(term, LogIndex(id)),
            entries: vec![ha_core::types::WalEntry::new(
                Position::new(term, LogIndex(id + 1)),
                ha_core::types::Payload::Command(ha_core::types::Command(
                    id.to_le_bytes().to_vec(),
                )),
            )],
            commit: LogIndex(id),
        }),
    )
}
