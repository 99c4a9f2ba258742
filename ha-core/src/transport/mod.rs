//! The contract between the replication driver and a network transport, and
//! the pieces every network transport shares: [`bounded_call`] (a call's
//! deadline and close rules), [`inbound::Inbound`] (checking and handing
//! requests to the handler) and [`window::WalWindow`] (the bounded, ordered
//! WAL window).

pub mod inbound;
pub mod window;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Member;
use crate::error::TransportError;
use crate::message::{Envelope, Request, Response};
#[cfg(feature = "testkit")]
use crate::message::{
    Fence, FenceAck, FloorAck, Heartbeat, HeartbeatAck, InstallSnapshot, Promote, PromoteAck,
    RaiseFloor, SnapshotAck, VoteRequest, VoteResponse, WalAck, WalBatch,
};
use crate::types::NodeId;

/// A boxed future, for the object-safe handler.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Checks that a decoded response answers the request: it must echo `request_id`
/// and come from `peer` (the peer the request went to). Every transport runs this
/// on every response, so a confused or malicious peer cannot answer for another
/// request or another node.
pub fn check_response(
    peer: NodeId,
    request_id: u64,
    response: Envelope<Response>,
) -> Result<Envelope<Response>, TransportError> {
    if response.request_id != request_id {
        return Err(TransportError::Protocol(
            peer,
            format!(
                "response echoes request id {} instead of {request_id}",
                response.request_id
            ),
        ));
    }
    if response.from != peer {
        return Err(TransportError::Protocol(
            peer,
            format!("response claims to come from {}", response.from),
        ));
    }
    Ok(response)
}

/// Runs one call's `outcome` under the rules of [`PeerConnection::call`] that
/// every transport shares: it ends with [`TransportError::Closed`] as soon as
/// `closed` resolves (the connection or its transport was closed), with
/// [`TransportError::Timeout`] once `deadline` has passed, and a connection
/// lost because it was being closed (`is_closed()` holds afterwards) is
/// reported as closed rather than unreachable.
pub async fn bounded_call<F, C>(
    peer: NodeId,
    deadline: Duration,
    outcome: F,
    closed: C,
    is_closed: impl Fn() -> bool,
) -> Result<Envelope<Response>, TransportError>
where
    F: Future<Output = Result<Envelope<Response>, TransportError>>,
    C: Future<Output = ()>,
{
    let guarded = async {
        tokio::select! {
            r = outcome => r,
            () = closed => Err(TransportError::Closed),
        }
    };
    match tokio::time::timeout(deadline, guarded).await {
        Ok(Err(TransportError::Unreachable(..))) if is_closed() => Err(TransportError::Closed),
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout(peer)),
    }
}

/// The tuning every network transport shares (each transport's options carry
/// one, next to what is its own): who may connect, reconnect pacing, how fast
/// a silent peer is declared gone, and the bounds on frames and the WAL window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The node ids a peer certificate may name.
    pub members: Vec<NodeId>,
    /// First reconnect delay after a lost connection.
    pub reconnect_interval: Duration,
    /// Maximum reconnect delay.
    pub max_reconnect_backoff: Duration,
    /// Bound on a dial or handshake.
    pub connect_timeout: Duration,
    /// A silent connection is declared dead after this.
    pub idle_timeout: Duration,
    /// Keep-alive interval of an idle connection (a third of the idle timeout
    /// by default).
    pub keep_alive: Duration,
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// Once a frame's first byte arrived, the rest must arrive within this; so
    /// must a request that travels alone (a control stream's, a kind byte).
    pub frame_timeout: Duration,
    /// Bound on closing connections and stopping tasks at [`Transport::close`].
    pub close_timeout: Duration,
    /// At most this many WAL requests per peer are queued or awaiting their
    /// answer; further WAL calls wait (until their deadline) for one to be
    /// answered. At least 1.
    pub wal_window: usize,
    /// Bytes of frames one connection may hold at once (requests read and not
    /// yet answered, responses being read); at least `max_frame`.
    pub read_budget: usize,
    /// Seed of the reconnect jitter (mixed with the node pair).
    pub seed: u64,
}

/// The default WAL window: WAL requests per peer queued or awaiting an answer.
pub const WAL_WINDOW: usize = 64;

impl NetOptions {
    /// Defaults for a LAN, for `members`.
    pub fn new(members: Vec<NodeId>) -> Self {
        let idle = Duration::from_secs(1);
        NetOptions {
            members,
            reconnect_interval: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: idle,
            keep_alive: idle / 3,
            max_frame: crate::wire::MAX_FRAME_BYTES,
            frame_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_millis(500),
            wal_window: WAL_WINDOW,
            read_budget: crate::wire::DEFAULT_READ_BUDGET,
            seed: 0,
        }
    }

    /// From a node's config: its members (itself and its peers), its reconnect
    /// backoff, a connect timeout of the RPC timeout (at least a second), an
    /// idle timeout of twice the failover timeout (at least 300 ms) with
    /// keep-alives at a third of it, and the node id as the jitter seed.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let mut members: Vec<NodeId> = config.peers.iter().map(|m| m.id).collect();
        members.push(config.node_id);
        let idle = (config.failover_timeout * 2).max(Duration::from_millis(300));
        NetOptions {
            reconnect_interval: config.reconnect_interval,
            max_reconnect_backoff: config.max_reconnect_backoff,
            connect_timeout: config.rpc_timeout.max(Duration::from_secs(1)),
            idle_timeout: idle,
            keep_alive: idle / 3,
            seed: config.node_id.0,
            ..NetOptions::new(members)
        }
    }

    /// The config's `bind_addr` as a socket address (it must be an IP address
    /// and port).
    pub fn bind_addr(
        config: &crate::config::Config,
    ) -> Result<std::net::SocketAddr, TransportError> {
        config.bind_addr.parse().map_err(|e| {
            TransportError::Local(format!(
                "bind_addr {:?} is not an IP address and port: {e}",
                config.bind_addr
            ))
        })
    }
}

/// Answers requests that arrive from peers.
///
/// The transport has already authenticated the peer: `peer` is the identity proven
/// by the connection (a certificate, in TLS transports), and the transport has
/// refused any request whose envelope claims another sender. The handler always
/// produces a response, [`Response::Error`] if it cannot do better.
///
/// A transport hands WAL requests of one connection to `handle` in the order they
/// were sent, as they arrive, without waiting for the answers to earlier ones
/// (so batches that arrive together are made durable together); it sends the
/// answers back in the same order. A handler takes the request in (queues it)
/// within `handle`, so that order is the order the node sees.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, peer: NodeId, request: Envelope<Request>) -> BoxFuture<Envelope<Response>>;
}

/// A connection to one peer.
///
/// # Contract
/// - `call` sends one request and resolves with the response that echoes its
///   request id, or an error; it never waits longer than `deadline`.
/// - Requests of [`crate::message::Channel::Control`] never queue behind those of
///   [`crate::message::Channel::Wal`].
/// - Requests on the WAL channel are delivered in the order `call` was invoked.
/// - A response whose envelope names another sender or request id is a protocol
///   violation, reported as [`TransportError::Protocol`].
pub trait PeerConnection: Send + Sync + 'static {
    /// Sends `request` and waits for its response, at most `deadline`.
    fn call(
        &self,
        request: Envelope<Request>,
        deadline: Duration,
    ) -> impl Future<Output = Result<Envelope<Response>, TransportError>> + Send;

    /// True while the underlying connection is open.
    fn is_connected(&self) -> bool;

    /// Closes the connection; idempotent.
    fn close(&self);
}

/// Connects to peers and accepts their connections.
///
/// Implementations are checked by `ha_core::testkit::transport_suite`.
pub trait Transport: Send + Sync + 'static {
    /// A connection this transport opens.
    type Conn: PeerConnection;

    /// The node this transport speaks for: the identity its peers authenticate
    /// (for a TLS transport, the node its certificate names). A node refuses to
    /// start with a transport whose identity is not its configured id.
    fn local_id(&self) -> NodeId;

    /// A connection handle to `peer`. The transport owns reconnecting: the
    /// handle stays usable for as long as it is open, whatever happens to the
    /// connections under it (a lost one is re-dialed by the transport, in the
    /// background and on demand, paced by [`crate::backoff::Backoff`]); while
    /// the peer is unreachable, calls fail with [`TransportError::Unreachable`]
    /// or [`TransportError::Timeout`]. So a caller keeps one handle per peer.
    /// `connect` itself fails only for local reasons (the transport is closed,
    /// the address is unusable); it need not reach the peer.
    fn connect(
        &self,
        peer: &Member,
    ) -> impl Future<Output = Result<Self::Conn, TransportError>> + Send;

    /// Starts accepting peers; returns once listening. Requests go to `handler`.
    fn listen(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Stops accepting and closes every connection; idempotent and prompt.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

#[cfg(feature = "testkit")]
macro_rules! typed_rpc {
    ($(#[$doc:meta])* $name:ident, $req:ident, $resp:ident, $req_ty:ty, $resp_ty:ty) => {
        $(#[$doc])*
        fn $name(
            &self,
            request: Envelope<$req_ty>,
            deadline: Duration,
        ) -> impl Future<Output = Result<Envelope<$resp_ty>, TransportError>> + Send {
            let peer = request.to;
            let fut = self.call(map_body(request, Request::$req), deadline);
            async move {
                let resp = fut.await?;
                match resp.body {
                    Response::$resp(body) => Ok(Envelope {
                        from: resp.from,
                        to: resp.to,
                        term: resp.term,
                        request_id: resp.request_id,
                        body,
                    }),
                    other => Err(TransportError::Protocol(peer, format!("unexpected response {other:?}"))),
                }
            }
        }
    };
}

#[cfg(feature = "testkit")]
fn map_body<A, B>(e: Envelope<A>, f: impl FnOnce(A) -> B) -> Envelope<B> {
    Envelope {
        from: e.from,
        to: e.to,
        term: e.term,
        request_id: e.request_id,
        body: f(e.body),
    }
}

/// The seed's typed RPCs, on top of [`PeerConnection::call`] (`testkit` only: the
/// driver and the transports speak in [`Request`] and [`Response`]).
#[cfg(feature = "testkit")]
pub trait PeerConnectionExt: PeerConnection {
    typed_rpc!(
        /// Sends a WAL batch (Raft AppendEntries).
        send_wal_batch, WalBatch, WalAck, WalBatch, WalAck
    );
    typed_rpc!(
        /// Sends a heartbeat.
        send_heartbeat, Heartbeat, HeartbeatAck, Heartbeat, HeartbeatAck
    );
    typed_rpc!(
        /// Sends a term-carrying fence.
        send_fence, Fence, FenceAck, Fence, FenceAck
    );
    typed_rpc!(
        /// Sends a leadership-transfer request (the seed's promote).
        send_promote, Promote, PromoteAck, Promote, PromoteAck
    );
    typed_rpc!(
        /// Sends a pre-vote or Raft RequestVote.
        send_vote, Vote, Vote, VoteRequest, VoteResponse
    );
    typed_rpc!(
        /// Asks the witness to raise a floor.
        send_raise_floor, RaiseFloor, FloorAck, RaiseFloor, FloorAck
    );
    typed_rpc!(
        /// Sends a snapshot.
        send_snapshot, InstallSnapshot, SnapshotAck, InstallSnapshot, SnapshotAck
    );
}

#[cfg(feature = "testkit")]
impl<T: PeerConnection + ?Sized> PeerConnectionExt for T {}
