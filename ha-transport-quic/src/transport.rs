//! [`QuicTransport`] and [`QuicConnection`]: the [`Transport`] and
//! [`PeerConnection`] of ha-core over QUIC with mutual TLS.
//!
//! # Streams
//! Every stream starts with one byte naming its kind, then carries
//! [`framing`](crate::framing) frames:
//! - [`STREAM_WAL`]: one long-lived, ordered bidirectional stream per connection
//!   and direction. WAL-channel requests are queued when `call` is invoked and
//!   written in that order; the receiver hands them to its handler one after the
//!   other (reading ahead up to [`WAL_WINDOW`] requests) and answers in order.
//! - [`STREAM_CONTROL`]: one bidirectional stream per control request (heartbeats,
//!   votes, fences, floors, promote), so they never wait behind WAL data.
//!
//! # Connections
//! A connection is used both ways: the dialer's and the acceptor's requests share
//! it (one connection per peer pair, reused by [`Transport::connect`] when one is
//! open). A [`QuicConnection`] whose connection dropped redials on its next call,
//! with exponential backoff and jitter between the configured reconnect interval
//! and maximum. A garbage, truncated or oversized frame closes that connection
//! with a logged error; other peers are unaffected.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::{Config, Member};
use ha_core::error::TransportError;
use ha_core::message::{Channel, Envelope, Request, Response, RpcError};
use ha_core::transport::{PeerConnection, RequestHandler, Transport};
use ha_core::types::NodeId;
use parking_lot::{Mutex, RwLock};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};

use ha_core::latch::Latch;
use tokio::time::Instant;

use crate::certs::{node_dns_name, Identity};
use crate::framing::{self, FrameError};
use crate::tls::{self, Members};

/// First byte of the WAL stream.
pub const STREAM_WAL: u8 = 1;
/// First byte of a control stream.
pub const STREAM_CONTROL: u8 = 2;
/// How many WAL requests a receiver reads ahead of its handler.
pub const WAL_WINDOW: usize = 64;

/// Application close code: orderly shutdown.
const CODE_SHUTDOWN: u32 = 0;
/// Application close code: the peer violated the protocol.
const CODE_PROTOCOL: u32 = 1;
/// Application close code: the connection was closed by its user.
const CODE_CLOSED: u32 = 2;

/// Tuning of a [`QuicTransport`].
#[derive(Clone, Debug)]
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
    /// Once a frame's length arrived, its body must arrive within this.
    pub frame_timeout: Duration,
    /// Bound on waiting for connections to drain at [`Transport::close`].
    pub close_timeout: Duration,
}

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
            max_frame: framing::MAX_FRAME_BYTES,
            frame_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_millis(500),
        }
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
            ..QuicOptions::new(bind, members)
        }
    }
}

/// A WAL request queued on a link.
struct WalJob {
    frame: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
}

/// One QUIC connection to an authenticated peer.
struct Link {
    peer: NodeId,
    conn: quinn::Connection,
    wal_tx: mpsc::UnboundedSender<WalJob>,
}

impl Link {
    fn new(shared: &Arc<Shared>, peer: NodeId, conn: quinn::Connection) -> Arc<Link> {
        let (wal_tx, wal_rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link { peer, conn, wal_tx });
        tokio::spawn(wal_writer(shared.clone(), link.clone(), wal_rx));
        tokio::spawn(serve_conn(shared.clone(), link.clone()));
        link
    }

    fn is_live(&self) -> bool {
        self.conn.close_reason().is_none() && !self.wal_tx.is_closed()
    }

    fn protocol_close(&self, why: &str) {
        tracing::warn!(peer = %self.peer, "closing connection: {why}");
        self.conn
            .close(VarInt::from_u32(CODE_PROTOCOL), why.as_bytes());
    }
}

struct Shared {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    server_cfg: quinn::ServerConfig,
    opts: QuicOptions,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    links: Mutex<HashMap<NodeId, Arc<Link>>>,
    closed: Latch,
    accepting: AtomicBool,
}

/// One node's QUIC endpoint; implements [`Transport`].
///
/// Clones share the endpoint. The UDP socket is bound at construction, so
/// [`local_addr`](Self::local_addr) is known before [`Transport::listen`]; until
/// then incoming connections are refused.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Shared>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("node", &self.inner.me)
            .field("addr", &self.local_addr().ok())
            .field("closed", &self.inner.closed.is_set())
            .finish()
    }
}

fn local(e: impl fmt::Display) -> TransportError {
    TransportError::Local(e.to_string())
}

/// The stateless-reset key: HMAC-SHA256 keyed by a hash of the node's private key,
/// so it survives restarts without being stored.
fn reset_key(identity: &Identity) -> ring::hmac::Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"ha-transport-quic stateless reset key v1\0");
    ctx.update(identity.key.secret_der());
    let digest = ctx.finish();
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref())
}

impl QuicTransport {
    /// A transport speaking for `identity.node`, bound to `opts.bind`. Must be
    /// called within a tokio runtime.
    pub fn new(identity: &Identity, opts: QuicOptions) -> Result<Self, TransportError> {
        let members: Members = Arc::new(opts.members.iter().copied().collect());
        if !members.contains(&identity.node) {
            return Err(TransportError::Local(format!(
                "{} is not among the configured members",
                identity.node
            )));
        }
        let mut tc = quinn::TransportConfig::default();
        tc.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(opts.idle_timeout).map_err(local)?,
        ));
        tc.keep_alive_interval(Some(opts.keep_alive));
        tc.max_concurrent_bidi_streams(VarInt::from_u32(1024));
        tc.max_concurrent_uni_streams(VarInt::from_u32(0));
        tc.stream_receive_window(VarInt::from_u32(16 * 1024 * 1024));
        tc.receive_window(VarInt::from_u32(64 * 1024 * 1024));
        tc.send_window(64 * 1024 * 1024);
        let tc = Arc::new(tc);

        let client_tls = tls::client_config(identity, members.clone()).map_err(local)?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(local)?,
        ));
        client_cfg.transport_config(tc.clone());
        let server_tls = tls::server_config(identity, members).map_err(local)?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(local)?,
        ));
        server_cfg.transport_config(tc);

        let endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key(identity)));
        let socket = std::net::UdpSocket::bind(opts.bind)
            .map_err(|e| TransportError::Local(format!("cannot bind {}: {e}", opts.bind)))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Local("no async runtime".into()))?;
        let endpoint = quinn::Endpoint::new(endpoint_cfg, None, socket, runtime).map_err(local)?;
        Ok(QuicTransport {
            inner: Arc::new(Shared {
                me: identity.node,
                endpoint,
                client_cfg,
                server_cfg,
                opts,
                handler: RwLock::new(None),
                links: Mutex::new(HashMap::new()),
                closed: Latch::new(),
                accepting: AtomicBool::new(false),
            }),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner.endpoint.local_addr().map_err(local)
    }

    /// The node this transport speaks for.
    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }
}

impl Shared {
    /// A live link to `peer`: an open one, or a new dial.
    async fn link_to(self: &Arc<Self>, peer: &Member) -> Result<Arc<Link>, TransportError> {
        if self.closed.is_set() {
            return Err(TransportError::Closed);
        }
        if let Some(l) = self.links.lock().get(&peer.id) {
            if l.is_live() {
                return Ok(l.clone());
            }
        }
        let closed = self.closed.wait();
        tokio::select! {
            r = self.dial(peer) => r,
            () = closed => Err(TransportError::Closed),
        }
    }

    async fn dial(self: &Arc<Self>, peer: &Member) -> Result<Arc<Link>, TransportError> {
        let to = peer.id;
        let unreachable = |why: String| TransportError::Unreachable(to, why);
        let attempt = async {
            let addr = tokio::net::lookup_host(peer.addr.as_str())
                .await
                .map_err(|e| unreachable(format!("cannot resolve {}: {e}", peer.addr)))?
                .next()
                .ok_or_else(|| unreachable(format!("{} resolves to nothing", peer.addr)))?;
            let connecting = self
                .endpoint
                .connect_with(self.client_cfg.clone(), addr, &node_dns_name(to))
                .map_err(|e| unreachable(e.to_string()))?;
            connecting.await.map_err(|e| unreachable(e.to_string()))
        };
        let conn = match tokio::time::timeout(self.opts.connect_timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => return Err(unreachable("handshake timed out".into())),
        };
        let proven = peer_id(&conn).map_err(TransportError::Unauthorised)?;
        if proven != to {
            conn.close(VarInt::from_u32(CODE_PROTOCOL), b"wrong peer");
            return Err(TransportError::Unauthorised(format!(
                "dialed {to}, certificate names {proven}"
            )));
        }
        if self.closed.is_set() {
            conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
            return Err(TransportError::Closed);
        }
        let link = Link::new(self, to, conn);
        self.links.lock().insert(to, link.clone());
        Ok(link)
    }

    /// Registers an accepted connection unless a live one to that peer exists
    /// (then the new one only serves the peer's requests).
    fn register(&self, link: &Arc<Link>) {
        let mut links = self.links.lock();
        match links.get(&link.peer) {
            Some(l) if l.is_live() => {}
            _ => {
                links.insert(link.peer, link.clone());
            }
        }
    }

    fn forget(&self, link: &Arc<Link>) {
        let mut links = self.links.lock();
        if links.get(&link.peer).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(&link.peer);
        }
    }

    /// The response to a request from `peer`, or `None` if nobody may answer
    /// (not listening, or closed): the stream is then dropped unanswered.
    async fn respond(
        &self,
        peer: NodeId,
        request: Envelope<Request>,
    ) -> Option<Envelope<Response>> {
        if self.closed.is_set() {
            return None;
        }
        let handler = self.handler.read().clone()?;
        let refusal = |error| Envelope {
            from: self.me,
            to: peer,
            term: request.term,
            request_id: request.request_id,
            body: Response::Error(error),
        };
        if request.from != peer {
            tracing::warn!(%peer, claimed = %request.from, "refusing a request that claims another sender");
            return Some(refusal(RpcError::NotAMember));
        }
        if request.to != self.me {
            return Some(refusal(RpcError::Malformed(format!(
                "request addressed to {} reached {}",
                request.to, self.me
            ))));
        }
        let closed = self.closed.wait();
        let response = tokio::select! {
            r = handler.handle(peer, request) => r,
            () = closed => return None,
        };
        if self.closed.is_set() {
            return None;
        }
        Some(response)
    }

    /// Encodes a response, replacing one that is too large by an error response.
    fn encode_response(&self, response: &Envelope<Response>) -> Result<Vec<u8>, FrameError> {
        match framing::encode(response, self.opts.max_frame) {
            Err(FrameError::TooLarge { len, max }) => {
                tracing::warn!(len, max, "response too large");
                let error = Envelope {
                    from: response.from,
                    to: response.to,
                    term: response.term,
                    request_id: response.request_id,
                    body: Response::Error(RpcError::Malformed(format!(
                        "response of {len} bytes exceeds the {max} byte limit"
                    ))),
                };
                framing::encode(&error, self.opts.max_frame)
            }
            other => other,
        }
    }
}

/// The member a connection's certificate proves.
fn peer_id(conn: &quinn::Connection) -> Result<NodeId, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_string())?;
    tls::peer_node(&chain).map_err(|e| e.to_string())
}

/// Writes queued WAL requests of one link, in queue order, on its WAL stream.
async fn wal_writer(shared: Arc<Shared>, link: Arc<Link>, mut rx: mpsc::UnboundedReceiver<WalJob>) {
    let Some(first) = rx.recv().await else {
        return;
    };
    let (mut send, recv) = match link.conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(peer = %link.peer, "cannot open the WAL stream: {e}");
            return;
        }
    };
    if let Err(e) = framing::write_frame(&mut send, &[STREAM_WAL]).await {
        tracing::debug!(peer = %link.peer, "cannot start the WAL stream: {e}");
        return;
    }
    let pending: Arc<Mutex<VecDeque<oneshot::Sender<Vec<u8>>>>> = Arc::default();
    tokio::spawn(wal_reader(
        shared.clone(),
        link.clone(),
        recv,
        pending.clone(),
    ));
    let mut next = Some(first);
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => break,
            },
        };
        pending.lock().push_back(job.reply);
        if let Err(e) = framing::write_frame(&mut send, &job.frame).await {
            tracing::debug!(peer = %link.peer, "WAL stream write failed: {e}");
            pending.lock().clear();
            return;
        }
    }
    let _ = send.finish();
}

/// Reads WAL responses in order and hands each to the oldest waiting request.
async fn wal_reader(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut recv: quinn::RecvStream,
    pending: Arc<Mutex<VecDeque<oneshot::Sender<Vec<u8>>>>>,
) {
    loop {
        match framing::read_frame(&mut recv, shared.opts.max_frame, shared.opts.frame_timeout).await
        {
            Ok(Some(body)) => {
                let waiting = pending.lock().pop_front();
                match waiting {
                    // The caller may have given up; the order is kept regardless.
                    Some(tx) => {
                        let _ = tx.send(body);
                    }
                    None => {
                        link.protocol_close("unsolicited WAL response");
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(FrameError::Io(e)) => {
                tracing::debug!(peer = %link.peer, "WAL stream ended: {e}");
                break;
            }
            Err(e) => {
                link.protocol_close(&format!("bad WAL response frame: {e}"));
                break;
            }
        }
    }
    pending.lock().clear();
}

/// Accepts the peer's streams on one link and serves them.
async fn serve_conn(shared: Arc<Shared>, link: Arc<Link>) {
    loop {
        let accepted = tokio::select! {
            s = link.conn.accept_bi() => s,
            () = shared.closed.wait() => break,
        };
        match accepted {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(shared.clone(), link.clone(), send, recv));
            }
            Err(e) => {
                tracing::debug!(peer = %link.peer, "connection ended: {e}");
                break;
            }
        }
    }
    shared.forget(&link);
}

async fn serve_stream(
    shared: Arc<Shared>,
    link: Arc<Link>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut kind = [0u8; 1];
    match tokio::time::timeout(shared.opts.frame_timeout, recv.read_exact(&mut kind)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(peer = %link.peer, "stream ended before its kind: {e}");
            return;
        }
        Err(_) => {
            link.protocol_close("stream kind not received in time");
            return;
        }
    }
    match kind[0] {
        STREAM_WAL => serve_wal(shared, link, send, recv).await,
        STREAM_CONTROL => serve_control(shared, link, send, recv).await,
        other => link.protocol_close(&format!("unknown stream kind {other}")),
    }
}

/// Reads one request frame, closing the connection on garbage.
async fn read_request(
    shared: &Shared,
    link: &Link,
    recv: &mut quinn::RecvStream,
) -> Option<Envelope<Request>> {
    match framing::read_frame(recv, shared.opts.max_frame, shared.opts.frame_timeout).await {
        Ok(Some(body)) => match framing::decode::<Envelope<Request>>(&body) {
            Ok(r) => Some(r),
            Err(e) => {
                link.protocol_close(&format!("bad request frame: {e}"));
                None
            }
        },
        Ok(None) => None,
        Err(FrameError::Io(e)) => {
            tracing::debug!(peer = %link.peer, "request stream ended: {e}");
            None
        }
        Err(e) => {
            link.protocol_close(&format!("bad request frame: {e}"));
            None
        }
    }
}

async fn serve_control(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(request) = read_request(&shared, &link, &mut recv).await else {
        return;
    };
    let Some(response) = shared.respond(link.peer, request).await else {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    };
    match shared.encode_response(&response) {
        Ok(frame) => {
            if framing::write_frame(&mut send, &frame).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => tracing::warn!(peer = %link.peer, "cannot encode a response: {e}"),
    }
}

async fn serve_wal(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (tx, mut rx) = mpsc::channel::<Envelope<Request>>(WAL_WINDOW);
    let (rshared, rlink) = (shared.clone(), link.clone());
    let reader = tokio::spawn(async move {
        while let Some(request) = read_request(&rshared, &rlink, &mut recv).await {
            if tx.send(request).await.is_err() {
                break;
            }
        }
    });
    while let Some(request) = rx.recv().await {
        let Some(response) = shared.respond(link.peer, request).await else {
            let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
            break;
        };
        let frame = match shared.encode_response(&response) {
            Ok(f) => f,
            Err(e) => {
                link.protocol_close(&format!("cannot encode a response: {e}"));
                break;
            }
        };
        if let Err(e) = framing::write_frame(&mut send, &frame).await {
            tracing::debug!(peer = %link.peer, "WAL response write failed: {e}");
            break;
        }
    }
    reader.abort();
}

/// Sends one control request on its own stream and reads the response body.
async fn control_call(
    shared: &Shared,
    link: &Link,
    frame: &[u8],
) -> Result<Vec<u8>, TransportError> {
    let peer = link.peer;
    let lost = |e: String| TransportError::Unreachable(peer, e);
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    framing::write_frame(&mut send, &[STREAM_CONTROL])
        .await
        .map_err(|e| lost(e.to_string()))?;
    framing::write_frame(&mut send, frame)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let _ = send.finish();
    match framing::read_frame(&mut recv, shared.opts.max_frame, shared.opts.frame_timeout).await {
        Ok(Some(body)) => Ok(body),
        Ok(None) => Err(lost("the peer closed the stream without answering".into())),
        Err(FrameError::Io(e)) => Err(lost(e)),
        Err(e) => {
            link.protocol_close(&format!("bad response frame: {e}"));
            Err(TransportError::Protocol(peer, e.to_string()))
        }
    }
}

/// Decodes a response body and checks it answers `request_id` from `peer`.
fn check_response(
    peer: NodeId,
    request_id: u64,
    body: &[u8],
) -> Result<Envelope<Response>, TransportError> {
    let response: Envelope<Response> = framing::decode(body)
        .map_err(|e| TransportError::Protocol(peer, format!("undecodable response: {e}")))?;
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

impl Transport for QuicTransport {
    type Conn = QuicConnection;

    fn connect(
        &self,
        peer: &Member,
    ) -> impl Future<Output = Result<QuicConnection, TransportError>> + Send {
        let shared = self.inner.clone();
        let peer = peer.clone();
        async move {
            let link = shared.link_to(&peer).await?;
            Ok(QuicConnection {
                inner: Arc::new(ConnInner {
                    backoff: Mutex::new(Backoff::new(
                        shared.opts.reconnect_interval,
                        shared.opts.max_reconnect_backoff,
                    )),
                    shared,
                    peer,
                    link: Mutex::new(Some(link)),
                    closed: Latch::new(),
                }),
            })
        }
    }

    fn listen(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let shared = self.inner.clone();
        let result = if shared.closed.is_set() {
            Err(TransportError::Closed)
        } else {
            *shared.handler.write() = Some(handler);
            shared
                .endpoint
                .set_server_config(Some(shared.server_cfg.clone()));
            if !shared.accepting.swap(true, Ordering::SeqCst) {
                tokio::spawn(accept_loop(shared.clone()));
            }
            Ok(())
        };
        std::future::ready(result)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        let shared = self.inner.clone();
        let first = !shared.closed.is_set();
        shared.closed.set();
        *shared.handler.write() = None;
        shared.endpoint.set_server_config(None);
        shared
            .endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
        shared.links.lock().clear();
        async move {
            if first {
                let _ =
                    tokio::time::timeout(shared.opts.close_timeout, shared.endpoint.wait_idle())
                        .await;
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            () = shared.closed.wait() => return,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(shared.opts.connect_timeout, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "handshake timed out");
                    return;
                }
            };
            let peer = match peer_id(&conn) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    conn.close(VarInt::from_u32(CODE_PROTOCOL), b"no identity");
                    return;
                }
            };
            if shared.closed.is_set() {
                conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
                return;
            }
            let link = Link::new(&shared, peer, conn);
            shared.register(&link);
        });
    }
}

/// Exponential reconnect backoff with jitter.
#[derive(Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
            not_before: None,
        }
    }

    /// The delay before the next attempt after `failures` failures: uniform in
    /// `[base, min(max, base × 2^failures)]`.
    fn delay(&self) -> Duration {
        let shift = self.failures.min(20);
        let ceiling = self.base.saturating_mul(1u32 << shift).min(self.max);
        let (lo, hi) = (self.base.as_micros() as u64, ceiling.as_micros() as u64);
        let us = if hi > lo {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default()
                ^ (self as *const Self as u64);
            rand::rngs::SmallRng::seed_from_u64(seed).random_range(lo..=hi)
        } else {
            lo
        };
        Duration::from_micros(us)
    }

    fn wait_left(&self) -> Option<Duration> {
        self.not_before
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(Instant::now() + self.delay());
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

struct ConnInner {
    shared: Arc<Shared>,
    peer: Member,
    link: Mutex<Option<Arc<Link>>>,
    closed: Latch,
    backoff: Mutex<Backoff>,
}

/// A connection to one peer; implements [`PeerConnection`].
///
/// Clones share the connection. If the underlying QUIC connection is lost, the
/// next call redials (within the reconnect backoff) instead of failing forever.
#[derive(Clone)]
pub struct QuicConnection {
    inner: Arc<ConnInner>,
}

impl fmt::Debug for QuicConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConnection")
            .field("from", &self.inner.shared.me)
            .field("to", &self.inner.peer.id)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// How a call proceeds after its synchronous part.
enum Prepared {
    /// Queued on the WAL stream; the response body arrives here.
    Wal(oneshot::Receiver<Vec<u8>>),
    /// A control request over this link.
    Control(Arc<Link>, Vec<u8>),
    /// No live link: redial first.
    Redial(Vec<u8>, Channel),
}

impl ConnInner {
    fn is_closed(&self) -> bool {
        self.closed.is_set() || self.shared.closed.is_set()
    }

    fn live_link(&self) -> Option<Arc<Link>> {
        self.link.lock().clone().filter(|l| l.is_live())
    }

    fn enqueue(link: &Link, frame: Vec<u8>) -> Result<oneshot::Receiver<Vec<u8>>, Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        link.wal_tx
            .send(WalJob { frame, reply })
            .map(|()| rx)
            .map_err(|e| e.0.frame)
    }

    /// Runs when `call` is invoked: checks, encodes and, for the WAL channel on a
    /// live link, queues the request, so WAL requests keep call order.
    fn prepare(&self, request: &Envelope<Request>) -> Result<Prepared, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let peer = self.peer.id;
        let frame = framing::encode(request, self.shared.opts.max_frame).map_err(|e| match e {
            FrameError::TooLarge { .. } => TransportError::Protocol(peer, e.to_string()),
            other => TransportError::Local(other.to_string()),
        })?;
        let channel = request.body.channel();
        match (self.live_link(), channel) {
            (Some(link), Channel::Wal) => match Self::enqueue(&link, frame) {
                Ok(rx) => Ok(Prepared::Wal(rx)),
                Err(frame) => Ok(Prepared::Redial(frame, channel)),
            },
            (Some(link), Channel::Control) => Ok(Prepared::Control(link, frame)),
            (None, _) => Ok(Prepared::Redial(frame, channel)),
        }
    }

    /// A new link after the old one was lost, respecting the backoff.
    async fn redial(&self) -> Result<Arc<Link>, TransportError> {
        let peer = self.peer.id;
        if let Some(left) = self.backoff.lock().wait_left() {
            return Err(TransportError::Unreachable(
                peer,
                format!("connection lost; next reconnect attempt in {left:?}"),
            ));
        }
        match self.shared.link_to(&self.peer).await {
            Ok(link) => {
                self.backoff.lock().succeeded();
                *self.link.lock() = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                self.backoff.lock().failed();
                Err(e)
            }
        }
    }

    async fn run(&self, prepared: Prepared) -> Result<Vec<u8>, TransportError> {
        let peer = self.peer.id;
        let lost = || TransportError::Unreachable(peer, "connection lost".into());
        match prepared {
            Prepared::Wal(rx) => rx.await.map_err(|_| lost()),
            Prepared::Control(link, frame) => control_call(&self.shared, &link, &frame).await,
            Prepared::Redial(frame, channel) => {
                let link = self.redial().await?;
                match channel {
                    Channel::Wal => match Self::enqueue(&link, frame) {
                        Ok(rx) => rx.await.map_err(|_| lost()),
                        Err(_) => Err(lost()),
                    },
                    Channel::Control => control_call(&self.shared, &link, &frame).await,
                }
            }
        }
    }
}

impl PeerConnection for QuicConnection {
    fn call(
        &self,
        request: Envelope<Request>,
        deadline: Duration,
    ) -> impl Future<Output = Result<Envelope<Response>, TransportError>> + Send {
        let inner = self.inner.clone();
        let prepared = inner.prepare(&request);
        let request_id = request.request_id;
        async move {
            let prepared = prepared?;
            let peer = inner.peer.id;
            let conn_closed = inner.closed.wait();
            let transport_closed = inner.shared.closed.wait();
            let outcome = async {
                let body = inner.run(prepared).await?;
                check_response(peer, request_id, &body)
            };
            let guarded = async {
                tokio::select! {
                    r = outcome => r,
                    () = conn_closed => Err(TransportError::Closed),
                    () = transport_closed => Err(TransportError::Closed),
                }
            };
            match tokio::time::timeout(deadline, guarded).await {
                Ok(Err(TransportError::Unreachable(..))) if inner.is_closed() => {
                    Err(TransportError::Closed)
                }
                Ok(r) => r,
                Err(_) => Err(TransportError::Timeout(peer)),
            }
        }
    }

    fn is_connected(&self) -> bool {
        !self.inner.is_closed() && self.inner.live_link().is_some()
    }

    fn close(&self) {
        self.inner.closed.set();
        if let Some(link) = self.inner.link.lock().take() {
            link.conn.close(VarInt::from_u32(CODE_CLOSED), b"closed");
            self.inner.shared.forget(&link);
        }
    }
}
