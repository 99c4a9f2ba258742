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
//! peer would prefer arrives within [`QuicOptions::connect_timeout`] (their
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
//! At most [`QuicOptions::wal_window`] WAL requests per peer are queued or
//! awaiting their answer. A WAL call beyond that waits, in call order, until one
//! is answered, or fails with [`TransportError::Timeout`] at its deadline;
//! nothing is buffered without limit.
//!
//! A garbage, truncated or oversized frame closes that connection with a logged
//! error; other peers are unaffected. So does a WAL stream that fails or ends
//! while its connection is open (for example when the peer cannot serve it
//! yet): a connection is never left open without its WAL stream, so "open" is
//! all that makes a connection usable, and both nodes see the same.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ha_core::config::{Config, Member};
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::message::{Channel, Envelope, Request, Response, RpcError};
use ha_core::transport::{PeerConnection, RequestHandler, Transport};
use ha_core::types::NodeId;
use parking_lot::{Mutex, RwLock};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rand::{Rng, SeedableRng};
use rustls::pki_types::CertificateDer;
use tokio::io::BufReader;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::certs::{node_dns_name, Identity};
use crate::framing::{self, FrameError};
use crate::tls::{self, Members};

/// First byte of the WAL stream.
pub const STREAM_WAL: u8 = 1;
/// First byte of a control stream.
pub const STREAM_CONTROL: u8 = 2;
/// First byte of a retire stream: its sender retired this connection (it is
/// superseded by the pair's kept one), sends no more requests on it and has
/// every answer it waited for.
pub const STREAM_RETIRE: u8 = 3;
/// How many WAL requests a receiver reads ahead of its handler; also the default
/// of [`QuicOptions::wal_window`].
pub const WAL_WINDOW: usize = 64;

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

/// How many dials one caller makes for a connection before giving up (a dial
/// that succeeds normally leaves a kept connection at once).
const MAX_OWN_DIALS: u32 = 4;

/// How many queued WAL requests (or responses) go out in one stream write.
const MAX_COALESCE: usize = 64;
/// Read buffer of a stream that carries many frames.
const READ_BUFFER: usize = 256 * 1024;

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
    /// At most this many WAL requests per peer are queued or awaiting their
    /// answer; further WAL calls wait (until their deadline) for one to be
    /// answered. At least 1; [`WAL_WINDOW`] by default.
    pub wal_window: usize,
    /// Bound on winding down a retired duplicate connection (this node's
    /// requests on it answered, the peer's retire received); then it is closed
    /// anyway and requests still on it fail.
    pub drain_timeout: Duration,
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
            wal_window: WAL_WINDOW,
            drain_timeout: Duration::from_secs(10),
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

// ---------------------------------------------------------------------------
// The WAL window: a per-peer bound on WAL requests, admitted in call order.

/// Bounds the WAL requests of one peer that are queued or awaiting an answer.
/// A call takes a [`Ticket`] when it is invoked; tickets are admitted strictly in
/// order, each when a [`Slot`] is free, so WAL order survives waiting.
struct WalWindow {
    cap: usize,
    state: Mutex<WindowState>,
    changed: Notify,
}

struct WindowState {
    /// Slots taken (requests queued or awaiting an answer).
    used: usize,
    /// The next ticket to hand out.
    next: u64,
    /// The oldest ticket still in line.
    head: u64,
    /// Tickets behind `head` that already left the line.
    gone: BTreeSet<u64>,
}

impl WalWindow {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(WalWindow {
            cap: cap.max(1),
            state: Mutex::new(WindowState {
                used: 0,
                next: 0,
                head: 0,
                gone: BTreeSet::new(),
            }),
            changed: Notify::new(),
        })
    }

    /// A place in line, taken when a WAL call is invoked.
    fn ticket(self: &Arc<Self>) -> Ticket {
        let mut s = self.state.lock();
        let n = s.next;
        s.next += 1;
        Ticket {
            window: self.clone(),
            n,
        }
    }

    fn used(&self) -> usize {
        self.state.lock().used
    }

    fn waiting(&self) -> usize {
        let s = self.state.lock();
        usize::try_from(s.next - s.head).unwrap_or(usize::MAX) - s.gone.len()
    }
}

/// A WAL call's place in line; leaving the line (drop) lets the next one in.
struct Ticket {
    window: Arc<WalWindow>,
    n: u64,
}

impl Ticket {
    /// A slot, if this ticket is first in line and one is free.
    fn try_admit(&self) -> Option<Slot> {
        let mut s = self.window.state.lock();
        if s.head == self.n && s.used < self.window.cap {
            s.used += 1;
            Some(Slot {
                window: self.window.clone(),
            })
        } else {
            None
        }
    }

    /// Waits until [`try_admit`](Self::try_admit) succeeds (bounded by the
    /// caller's deadline).
    async fn admit(&self) -> Slot {
        loop {
            let changed = self.window.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.try_admit() {
                return slot;
            }
            changed.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut s = self.window.state.lock();
            if s.head == self.n {
                s.head += 1;
                loop {
                    let head = s.head;
                    if !s.gone.remove(&head) {
                        break;
                    }
                    s.head += 1;
                }
            } else {
                s.gone.insert(self.n);
            }
        }
        self.window.changed.notify_waiters();
    }
}

/// One WAL request's place in the window, held until it is answered or dropped.
struct Slot {
    window: Arc<WalWindow>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.window.state.lock().used -= 1;
        self.window.changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------
// Links: one QUIC connection each.

/// A WAL request queued on a link.
struct WalJob {
    frame: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
    slot: Slot,
    count: Outstanding,
}

/// A WAL request written on the stream, waiting for its answer.
struct Awaiting {
    reply: oneshot::Sender<Vec<u8>>,
    _slot: Slot,
    _count: Outstanding,
}

/// One QUIC connection to an authenticated peer.
struct Link {
    peer: NodeId,
    /// Who dialed it (this node or the peer).
    dialer: NodeId,
    /// Creation order on this node.
    seq: u64,
    conn: quinn::Connection,
    /// Bounded by the window: every queued job holds a slot.
    wal_tx: mpsc::Sender<WalJob>,
    /// This node sends no new request on it (another connection is kept).
    retired: AtomicBool,
    /// The peer said it sends no more requests on it.
    peer_retired: AtomicBool,
    /// The peer opened its WAL stream on it (at most one is allowed).
    peer_wal_stream: AtomicBool,
    /// This node's WAL requests queued or awaiting an answer on it.
    wal_outstanding: AtomicUsize,
    /// This node's control calls in progress on it.
    calls: AtomicUsize,
    /// Woken when a count reaches zero or the peer retires the link.
    idle: Notify,
    /// The peer's [`PeerState::wal_idle`].
    peer_wal_idle: Arc<Notify>,
    /// When this link became the peer's kept one (from
    /// [`PeerLinks::kept_count`]); 0 if it never was. Requests go only on the
    /// kept link, and a link is kept at most once, so every WAL request on a
    /// link kept earlier was invoked before every one on this link.
    kept_since: AtomicU64,
}

impl Link {
    fn new(
        shared: &Arc<Shared>,
        peer: &Arc<PeerState>,
        dialer: NodeId,
        conn: quinn::Connection,
    ) -> Arc<Link> {
        let (wal_tx, wal_rx) = mpsc::channel(shared.opts.wal_window.max(1));
        let link = Arc::new(Link {
            peer: peer.id,
            dialer,
            seq: shared.next_seq.fetch_add(1, Ordering::Relaxed),
            conn,
            wal_tx,
            retired: AtomicBool::new(false),
            peer_retired: AtomicBool::new(false),
            peer_wal_stream: AtomicBool::new(false),
            wal_outstanding: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            idle: Notify::new(),
            peer_wal_idle: peer.wal_idle.clone(),
            kept_since: AtomicU64::new(0),
        });
        tokio::spawn(wal_writer(
            shared.clone(),
            peer.clone(),
            link.clone(),
            wal_rx,
        ));
        tokio::spawn(serve_conn(shared.clone(), peer.clone(), link.clone()));
        link
    }

    /// Open (not closed by either side). A link whose WAL stream failed is
    /// closed by its writer or reader, so this is the only liveness test.
    fn is_live(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    fn protocol_close(&self, why: &str) {
        tracing::warn!(peer = %self.peer, "closing connection: {why}");
        self.conn
            .close(VarInt::from_u32(CODE_PROTOCOL), why.as_bytes());
    }

    /// Resolves once `cond` holds (re-checked whenever the link's counts or
    /// retire state change).
    async fn wait_until(&self, cond: impl Fn(&Link) -> bool) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if cond(self) {
                return;
            }
            idle.await;
        }
    }
}

#[derive(Clone, Copy)]
enum Count {
    Wal,
    Call,
}

/// Counts one WAL request or control call of this node on a link, so a
/// retired link closes only after they are done.
struct Outstanding {
    link: Arc<Link>,
    kind: Count,
}

impl Outstanding {
    fn new(link: &Arc<Link>, kind: Count) -> Self {
        let o = Outstanding {
            link: link.clone(),
            kind,
        };
        o.counter().fetch_add(1, Ordering::SeqCst);
        o
    }

    fn counter(&self) -> &AtomicUsize {
        match self.kind {
            Count::Wal => &self.link.wal_outstanding,
            Count::Call => &self.link.calls,
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.counter().fetch_sub(1, Ordering::SeqCst) == 1 {
            self.link.idle.notify_waiters();
            if matches!(self.kind, Count::Wal) {
                self.link.peer_wal_idle.notify_waiters();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Peers: the links, dialing and backoff of one peer.

struct PeerState {
    id: NodeId,
    links: Mutex<PeerLinks>,
    window: Arc<WalWindow>,
    /// Woken when the peer's links change or a dial ends.
    changed: Notify,
    /// Woken when a link's WAL requests are all answered or a link ends.
    wal_idle: Arc<Notify>,
}

struct PeerLinks {
    /// Every connection to the peer not yet forgotten (retired ones included).
    all: Vec<Arc<Link>>,
    /// The kept connection, where new requests go.
    current: Option<Arc<Link>>,
    /// Where to dial the peer, once a [`QuicConnection`] to it was made.
    member: Option<Member>,
    /// Open [`QuicConnection`]s to the peer; the reconnect task runs while
    /// there are any.
    users: usize,
    reconnecting: bool,
    dialing: bool,
    backoff: Backoff,
    /// How many times a link became the kept one (see [`Link::kept_since`]).
    kept_count: u64,
}

impl PeerLinks {
    fn live_current(&self) -> Option<&Arc<Link>> {
        self.current.as_ref().filter(|l| l.is_live())
    }
}

struct Shared {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    server_cfg: quinn::ServerConfig,
    opts: QuicOptions,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    peers: Mutex<HashMap<NodeId, Arc<PeerState>>>,
    closed: Latch,
    accepting: AtomicBool,
    next_seq: AtomicU64,
    /// Reconnect tasks, awaited at close.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Reconnect tasks running.
    reconnectors: AtomicUsize,
    /// Duplicate connections retired so far.
    superseded: AtomicUsize,
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
                peers: Mutex::new(HashMap::new()),
                closed: Latch::new(),
                accepting: AtomicBool::new(false),
                next_seq: AtomicU64::new(0),
                tasks: Mutex::new(Vec::new()),
                reconnectors: AtomicUsize::new(0),
                superseded: AtomicUsize::new(0),
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

    /// How many open QUIC connections this node has with `peer` (retired ones
    /// still draining included). Once a simultaneous dial has settled, one.
    pub fn live_connections(&self, peer: NodeId) -> usize {
        self.connection_dialers(peer).len()
    }

    /// Who dialed each open connection with `peer` (for tests of the pair's
    /// choice of connection).
    #[doc(hidden)]
    pub fn connection_dialers(&self, peer: NodeId) -> Vec<NodeId> {
        let Some(p) = self.inner.peers.lock().get(&peer).cloned() else {
            return Vec::new();
        };
        let links = p.links.lock();
        links
            .all
            .iter()
            .filter(|l| l.is_live())
            .map(|l| l.dialer)
            .collect()
    }

    /// WAL requests to `peer` queued or awaiting an answer (at most
    /// [`QuicOptions::wal_window`]).
    pub fn wal_in_flight(&self, peer: NodeId) -> usize {
        self.inner
            .peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.window.used())
    }

    /// WAL calls to `peer` waiting for room in the window (or just admitted).
    #[doc(hidden)]
    pub fn wal_waiting(&self, peer: NodeId) -> usize {
        self.inner
            .peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.window.waiting())
    }

    /// How many duplicate connections this node has retired (superseded by
    /// the pair's kept connection) since it started.
    pub fn superseded_connections(&self) -> usize {
        self.inner.superseded.load(Ordering::SeqCst)
    }

    /// Dials `member` and registers a new connection even if one is open (so
    /// tests can create a duplicate connection deterministically); the pair's
    /// choice of connection then applies as after a simultaneous dial.
    #[doc(hidden)]
    pub async fn dial_new(&self, member: &Member) -> Result<(), TransportError> {
        if self.inner.closed.is_set() {
            return Err(TransportError::Closed);
        }
        let peer = self.inner.peer(member.id);
        self.inner.dial(&peer, member).await
    }

    /// Background reconnect tasks running (none after [`Transport::close`]).
    #[doc(hidden)]
    pub fn reconnect_tasks(&self) -> usize {
        self.inner.reconnectors.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn peer(&self, id: NodeId) -> Arc<PeerState> {
        self.peers
            .lock()
            .entry(id)
            .or_insert_with(|| {
                Arc::new(PeerState {
                    id,
                    links: Mutex::new(PeerLinks {
                        all: Vec::new(),
                        current: None,
                        member: None,
                        users: 0,
                        reconnecting: false,
                        dialing: false,
                        backoff: Backoff::new(
                            self.opts.reconnect_interval,
                            self.opts.max_reconnect_backoff,
                        ),
                        kept_count: 0,
                    }),
                    window: WalWindow::new(self.opts.wal_window),
                    changed: Notify::new(),
                    wal_idle: Arc::new(Notify::new()),
                })
            })
            .clone()
    }

    /// Adds a new connection, chooses the pair's kept one and retires the others.
    /// A connection the peer opened beyond [`MAX_CONNECTIONS_PER_PEER`] is
    /// closed instead.
    fn register(self: &Arc<Self>, peer: &Arc<PeerState>, link: Arc<Link>) {
        let retired = {
            let mut links = peer.links.lock();
            links.all.retain(|l| l.is_live());
            if link.dialer == peer.id && links.all.len() >= MAX_CONNECTIONS_PER_PEER {
                None
            } else {
                links.all.push(link.clone());
                Some(self.elect(peer.id, &mut links))
            }
        };
        let Some(retired) = retired else {
            link.protocol_close(&format!(
                "the peer already has {MAX_CONNECTIONS_PER_PEER} open connections"
            ));
            return;
        };
        self.superseded.fetch_add(retired.len(), Ordering::SeqCst);
        for link in retired {
            tracing::debug!(peer = %peer.id, dialer = %link.dialer, "retiring a duplicate connection");
            tokio::spawn(retire(self.clone(), link));
        }
        peer.changed.notify_waiters();
        if self.closed.is_set() {
            close_links(peer, CODE_SHUTDOWN, b"shutdown");
        }
    }

    /// Makes the best open, unretired connection the kept one and retires the
    /// other unretired ones (returned). Both nodes of a pair choose the same: the
    /// one dialed by the lower node id, and among those the newest.
    fn elect(&self, peer: NodeId, links: &mut PeerLinks) -> Vec<Arc<Link>> {
        let low = self.me.min(peer);
        let best = links
            .all
            .iter()
            .filter(|l| l.is_live() && !l.is_retired())
            .min_by_key(|l| (l.dialer != low, std::cmp::Reverse(l.seq)))
            .cloned();
        let mut retired = Vec::new();
        if let Some(best) = &best {
            for l in &links.all {
                if !Arc::ptr_eq(l, best) && l.is_live() && !l.is_retired() {
                    l.retired.store(true, Ordering::SeqCst);
                    retired.push(l.clone());
                }
            }
        }
        let same = match (&links.current, &best) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            if let Some(best) = &best {
                links.kept_count += 1;
                best.kept_since.store(links.kept_count, Ordering::SeqCst);
            }
            links.current = best;
        }
        retired
    }

    /// The peer retired `link`. Usually this node retires it too on its own
    /// soon: the peer prefers a connection this node is still accepting. If
    /// this node still keeps it after [`QuicOptions::connect_timeout`], the two
    /// nodes chose differently (their views of which connections are open
    /// differed): this node retires it too, and the next call or the reconnect
    /// task settles the pair on a connection both keep.
    async fn peer_retired(self: &Arc<Self>, peer: &Arc<PeerState>, link: &Arc<Link>) {
        let settled = async {
            loop {
                let changed = peer.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if link.is_retired() || !link.is_live() {
                    return;
                }
                changed.await;
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(self.opts.connect_timeout, settled) => {}
            () = self.closed.wait() => return,
        }
        let retired = {
            let mut links = peer.links.lock();
            if link.is_retired() || !link.is_live() {
                return;
            }
            link.retired.store(true, Ordering::SeqCst);
            let mut retired = self.elect(peer.id, &mut links);
            retired.push(link.clone());
            retired
        };
        tracing::warn!(
            peer = %peer.id,
            dialer = %link.dialer,
            "the peer retired the connection this node keeps; retiring it too"
        );
        self.superseded.fetch_add(retired.len(), Ordering::SeqCst);
        for l in retired {
            tokio::spawn(retire(self.clone(), l));
        }
        peer.changed.notify_waiters();
    }

    /// Drops a connection that ended.
    fn forget(&self, peer: &PeerState, link: &Arc<Link>) {
        {
            let mut links = peer.links.lock();
            links.all.retain(|l| !Arc::ptr_eq(l, link));
            if links.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link)) {
                links.current = None;
            }
        }
        peer.changed.notify_waiters();
        peer.wal_idle.notify_waiters();
    }

    /// The peer's kept connection if it is open, else a new dial (one at a time
    /// per peer: a concurrent caller waits for the dial in progress). With
    /// `respect_backoff`, fails at once while a failed dial's backoff runs.
    /// Gives up after [`MAX_OWN_DIALS`] dials of its own that left no kept
    /// connection, or after that many connect timeouts (plus one for another
    /// caller's dial) in all; other callers' activity uses up neither.
    async fn ensure_link(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
        respect_backoff: bool,
    ) -> Result<Arc<Link>, TransportError> {
        let bound = self.opts.connect_timeout.saturating_mul(MAX_OWN_DIALS + 1);
        match tokio::time::timeout(bound, self.settle_link(peer, member, respect_backoff)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Unreachable(
                peer.id,
                format!("no connection within {bound:?}"),
            )),
        }
    }

    async fn settle_link(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
        respect_backoff: bool,
    ) -> Result<Arc<Link>, TransportError> {
        let closed = self.closed.wait();
        tokio::pin!(closed);
        // A dial registers a connection or fails; if the connection it
        // registered is not kept (or closes at once), dial again, a few times.
        // Wake-ups from other callers' dials and link changes do not count.
        let mut dials = 0;
        loop {
            if self.closed.is_set() {
                return Err(TransportError::Closed);
            }
            let changed = peer.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let dial = {
                let mut links = peer.links.lock();
                if let Some(l) = links.live_current() {
                    return Ok(l.clone());
                }
                if links.dialing {
                    false
                } else {
                    if dials >= MAX_OWN_DIALS {
                        return Err(TransportError::Unreachable(
                            peer.id,
                            format!("no connection after {dials} dials"),
                        ));
                    }
                    if respect_backoff {
                        if let Some(left) = links.backoff.wait_left() {
                            return Err(TransportError::Unreachable(
                                peer.id,
                                format!("connection lost; next reconnect attempt in {left:?}"),
                            ));
                        }
                    }
                    links.dialing = true;
                    true
                }
            };
            if !dial {
                tokio::select! {
                    () = &mut changed => continue,
                    () = &mut closed => return Err(TransportError::Closed),
                }
            }
            dials += 1;
            let gate = DialGate { peer };
            let result = tokio::select! {
                r = self.dial(peer, member) => r,
                () = &mut closed => Err(TransportError::Closed),
            };
            {
                let mut links = peer.links.lock();
                match &result {
                    Ok(()) => links.backoff.succeeded(),
                    Err(_) => links.backoff.failed(),
                }
            }
            drop(gate);
            result?;
        }
    }

    /// Dials `member` and registers the connection.
    async fn dial(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
    ) -> Result<(), TransportError> {
        let to = member.id;
        let unreachable = |why: String| TransportError::Unreachable(to, why);
        let attempt = async {
            let addr = tokio::net::lookup_host(member.addr.as_str())
                .await
                .map_err(|e| unreachable(format!("cannot resolve {}: {e}", member.addr)))?
                .next()
                .ok_or_else(|| unreachable(format!("{} resolves to nothing", member.addr)))?;
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
        let link = Link::new(self, peer, self.me, conn);
        self.register(peer, link);
        Ok(())
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

/// Marks a peer's dial as over (also when the dial is cancelled).
struct DialGate<'a> {
    peer: &'a PeerState,
}

impl Drop for DialGate<'_> {
    fn drop(&mut self) {
        self.peer.links.lock().dialing = false;
        self.peer.changed.notify_waiters();
    }
}

/// Closes every connection to `peer` and forgets them.
fn close_links(peer: &PeerState, code: u32, why: &'static [u8]) {
    let links = {
        let mut links = peer.links.lock();
        links.current = None;
        std::mem::take(&mut links.all)
    };
    for l in links {
        l.conn.close(VarInt::from_u32(code), why);
    }
    peer.changed.notify_waiters();
    peer.wal_idle.notify_waiters();
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

/// Writes queued WAL requests of one link, in queue order, on its WAL stream;
/// whatever is queued together goes out in one write. If the stream fails while
/// the connection is open, closes the connection (a link without its WAL stream
/// must not stay open, or the two nodes could disagree on which link to keep).
async fn wal_writer(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    link: Arc<Link>,
    mut rx: mpsc::Receiver<WalJob>,
) {
    let result = write_wal(&shared, &peer, &link, &mut rx).await;
    if let Err(why) = result {
        if link.is_live() && !shared.closed.is_set() {
            link.protocol_close(&why);
        }
    }
    // `rx` is dropped only now, after the connection is closed, so a request
    // never finds the link open with its queue gone.
    drop(rx);
}

async fn write_wal(
    shared: &Arc<Shared>,
    peer: &PeerState,
    link: &Arc<Link>,
    rx: &mut mpsc::Receiver<WalJob>,
) -> Result<(), String> {
    let first = tokio::select! {
        j = rx.recv() => j,
        _ = link.conn.closed() => None,
        () = shared.closed.wait() => None,
    };
    let Some(first) = first else {
        return Ok(());
    };
    // Every link kept before this one must have answered its WAL requests (or
    // ended) first, or the peer could see two WAL streams at once and handle
    // a later request before an earlier one. Once that holds it keeps holding:
    // those links get no new WAL requests (only the kept link does, and a link
    // is kept once), so waiting before the first write covers every later one.
    if !wait_for_earlier_links(shared, peer, link).await {
        return Ok(());
    }
    let (mut send, recv) = link
        .conn
        .open_bi()
        .await
        .map_err(|e| format!("cannot open the WAL stream: {e}"))?;
    send.write_all(&[STREAM_WAL])
        .await
        .map_err(|e| format!("cannot start the WAL stream: {e}"))?;
    let awaiting: Arc<Mutex<VecDeque<Awaiting>>> = Arc::default();
    tokio::spawn(wal_reader(
        shared.clone(),
        link.clone(),
        recv,
        awaiting.clone(),
    ));
    let mut chunks: Vec<Bytes> = Vec::with_capacity(MAX_COALESCE);
    let mut next = Some(first);
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => tokio::select! {
                j = rx.recv() => match j {
                    Some(j) => j,
                    None => break,
                },
                _ = link.conn.closed() => break,
            },
        };
        {
            let mut waiting = awaiting.lock();
            let mut job = Some(job);
            while let Some(j) = job.take() {
                chunks.push(Bytes::from(j.frame));
                waiting.push_back(Awaiting {
                    reply: j.reply,
                    _slot: j.slot,
                    _count: j.count,
                });
                if chunks.len() < MAX_COALESCE {
                    job = rx.try_recv().ok();
                }
            }
        }
        if let Err(e) = send.write_all_chunks(&mut chunks).await {
            awaiting.lock().clear();
            return Err(format!("WAL stream write failed: {e}"));
        }
        chunks.clear();
    }
    let _ = send.finish();
    Ok(())
}

/// Waits until no other open link of `peer` that was kept before `link` has
/// WAL requests of this node queued or awaiting an answer. False if `link` or
/// the transport closed meanwhile.
async fn wait_for_earlier_links(shared: &Shared, peer: &PeerState, link: &Arc<Link>) -> bool {
    let mine = match link.kept_since.load(Ordering::SeqCst) {
        0 => u64::MAX,
        k => k,
    };
    loop {
        let idle = peer.wal_idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        let blocker = {
            let links = peer.links.lock();
            links
                .all
                .iter()
                .find(|l| {
                    let since = l.kept_since.load(Ordering::SeqCst);
                    !Arc::ptr_eq(l, link)
                        && since != 0
                        && since < mine
                        && l.is_live()
                        && l.wal_outstanding.load(Ordering::SeqCst) > 0
                })
                .cloned()
        };
        let Some(blocker) = blocker else {
            return true;
        };
        tokio::select! {
            () = &mut idle => {}
            _ = blocker.conn.closed() => {}
            _ = link.conn.closed() => return false,
            () = shared.closed.wait() => return false,
        }
    }
}

/// Reads WAL responses in order and hands each to the oldest waiting request.
/// The peer ends its side of the WAL stream only when the connection ends, so
/// if it ends (or fails) while the connection is open, closes the connection:
/// later requests would wait for answers that never come.
async fn wal_reader(
    shared: Arc<Shared>,
    link: Arc<Link>,
    recv: quinn::RecvStream,
    awaiting: Arc<Mutex<VecDeque<Awaiting>>>,
) {
    let mut recv = BufReader::with_capacity(READ_BUFFER, recv);
    loop {
        match framing::read_frame(&mut recv, shared.opts.max_frame, shared.opts.frame_timeout).await
        {
            Ok(Some(body)) => {
                let waiting = awaiting.lock().pop_front();
                match waiting {
                    // The caller may have given up; the order is kept regardless.
                    Some(w) => {
                        let _ = w.reply.send(body);
                    }
                    None => {
                        link.protocol_close("unsolicited WAL response");
                        break;
                    }
                }
            }
            Ok(None) => {
                if link.is_live() && !shared.closed.is_set() {
                    link.protocol_close("the peer ended the WAL stream");
                }
                break;
            }
            Err(FrameError::Io(e)) => {
                if link.is_live() && !shared.closed.is_set() {
                    link.protocol_close(&format!("the WAL stream failed: {e}"));
                }
                break;
            }
            Err(e) => {
                link.protocol_close(&format!("bad WAL response frame: {e}"));
                break;
            }
        }
    }
    awaiting.lock().clear();
}

/// Accepts the peer's streams on one link and serves them.
async fn serve_conn(shared: Arc<Shared>, peer: Arc<PeerState>, link: Arc<Link>) {
    loop {
        let accepted = tokio::select! {
            s = link.conn.accept_bi() => s,
            () = shared.closed.wait() => break,
        };
        match accepted {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    shared.clone(),
                    peer.clone(),
                    link.clone(),
                    send,
                    recv,
                ));
            }
            Err(e) => {
                tracing::debug!(peer = %link.peer, "connection ended: {e}");
                break;
            }
        }
    }
    shared.forget(&peer, &link);
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
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
        STREAM_WAL if link.peer_wal_stream.swap(true, Ordering::SeqCst) => {
            link.protocol_close("a second WAL stream on one connection");
        }
        STREAM_WAL => serve_wal(shared, link, send, recv).await,
        STREAM_CONTROL => serve_control(shared, link, send, recv).await,
        STREAM_RETIRE => {
            link.peer_retired.store(true, Ordering::SeqCst);
            link.idle.notify_waiters();
            shared.peer_retired(&peer, &link).await;
        }
        other => link.protocol_close(&format!("unknown stream kind {other}")),
    }
}

/// Reads one request frame, closing the connection on garbage.
async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    shared: &Shared,
    link: &Link,
    recv: &mut R,
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
    recv: quinn::RecvStream,
) {
    let (tx, mut rx) = mpsc::channel::<Envelope<Request>>(WAL_WINDOW);
    let (rshared, rlink) = (shared.clone(), link.clone());
    let reader = tokio::spawn(async move {
        let mut recv = BufReader::with_capacity(READ_BUFFER, recv);
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
        if let Err(e) = send.write_chunk(Bytes::from(frame)).await {
            tracing::debug!(peer = %link.peer, "WAL response write failed: {e}");
            break;
        }
    }
    reader.abort();
}

/// Winds down a retired connection: once this node's calls and WAL requests on
/// it are answered, tells the peer ([`STREAM_RETIRE`]); once the peer said the
/// same, closes it with [`CODE_SUPERSEDED`]. All of this is bounded by
/// [`QuicOptions::drain_timeout`]: then it is closed anyway (requests still on
/// it fail).
async fn retire(shared: Arc<Shared>, link: Arc<Link>) {
    let wind_down = async {
        link.wait_until(|l| {
            l.calls.load(Ordering::SeqCst) == 0 && l.wal_outstanding.load(Ordering::SeqCst) == 0
        })
        .await;
        let announce = async {
            let (mut send, _recv) = link.conn.open_bi().await.ok()?;
            send.write_all(&[STREAM_RETIRE]).await.ok()?;
            send.finish().ok()
        };
        announce.await;
        link.wait_until(|l| l.peer_retired.load(Ordering::SeqCst))
            .await;
    };
    tokio::select! {
        r = tokio::time::timeout(shared.opts.drain_timeout, wind_down) => {
            if r.is_err() {
                tracing::debug!(
                    peer = %link.peer,
                    "a retired duplicate connection did not wind down within the drain timeout; closing it"
                );
            }
        }
        _ = link.conn.closed() => return,
        () = shared.closed.wait() => return,
    }
    link.conn
        .close(VarInt::from_u32(CODE_SUPERSEDED), b"superseded");
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
    let mut chunks = [
        Bytes::from_static(&[STREAM_CONTROL]),
        Bytes::copy_from_slice(frame),
    ];
    send.write_all_chunks(&mut chunks)
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
    ha_core::transport::check_response(peer, request_id, response)
}

impl Transport for QuicTransport {
    type Conn = QuicConnection;

    fn connect(
        &self,
        peer: &Member,
    ) -> impl Future<Output = Result<QuicConnection, TransportError>> + Send {
        let shared = self.inner.clone();
        let member = peer.clone();
        async move {
            if shared.closed.is_set() {
                return Err(TransportError::Closed);
            }
            let peer = shared.peer(member.id);
            shared.ensure_link(&peer, &member, false).await?;
            let spawn = {
                let mut links = peer.links.lock();
                links.member = Some(member.clone());
                links.users += 1;
                !std::mem::replace(&mut links.reconnecting, true)
            };
            if spawn {
                let running = Running::new(&shared);
                let task = tokio::spawn(reconnector(shared.clone(), peer.clone(), running));
                // `close` sets the latch before it takes the tasks, so either it
                // takes this one or this sees the latch (under the lock) and
                // awaits the task itself, which ends at once.
                let late = {
                    let mut tasks = shared.tasks.lock();
                    if shared.closed.is_set() {
                        Some(task)
                    } else {
                        tasks.retain(|t| !t.is_finished());
                        tasks.push(task);
                        None
                    }
                };
                if let Some(mut task) = late {
                    if tokio::time::timeout(shared.opts.close_timeout, &mut task)
                        .await
                        .is_err()
                    {
                        task.abort();
                        let _ = task.await;
                    }
                    return Err(TransportError::Closed);
                }
            }
            Ok(QuicConnection {
                inner: Arc::new(ConnInner {
                    shared,
                    peer,
                    member,
                    closed: Latch::new(),
                    released: AtomicBool::new(false),
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
        let peers: Vec<Arc<PeerState>> = shared.peers.lock().values().cloned().collect();
        for peer in &peers {
            close_links(peer, CODE_SHUTDOWN, b"shutdown");
        }
        let tasks = std::mem::take(&mut *shared.tasks.lock());
        async move {
            // The reconnect tasks watch the closed latch and end at once; all of
            // them together get close_timeout.
            let deadline = Instant::now() + shared.opts.close_timeout;
            for mut task in tasks {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                    let _ = task.await;
                }
            }
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
            let peer = shared.peer(peer);
            let link = Link::new(&shared, &peer, peer.id, conn);
            shared.register(&peer, link);
        });
    }
}

/// Counts a reconnect task from its spawn to its end.
struct Running(Arc<Shared>);

impl Running {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.reconnectors.fetch_add(1, Ordering::SeqCst);
        Running(shared.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.reconnectors.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Re-dials `peer` whenever it has no open connection, after the backoff delay,
/// while a [`QuicConnection`] to it is open and the transport is not closed.
async fn reconnector(shared: Arc<Shared>, peer: Arc<PeerState>, running: Running) {
    let _running = running;
    let closed = shared.closed.wait();
    tokio::pin!(closed);
    loop {
        let changed = peer.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let due = {
            let mut links = peer.links.lock();
            if links.users == 0 || shared.closed.is_set() {
                links.reconnecting = false;
                return;
            }
            match &links.member {
                Some(m) if links.live_current().is_none() && !links.dialing => {
                    Some((m.clone(), links.backoff.delay()))
                }
                _ => None,
            }
        };
        let Some((member, delay)) = due else {
            tokio::select! {
                () = &mut changed => continue,
                () = &mut closed => return,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut closed => return,
        }
        if let Err(e) = shared.ensure_link(&peer, &member, false).await {
            tracing::debug!(peer = %peer.id, "reconnect failed: {e}");
        }
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
    peer: Arc<PeerState>,
    member: Member,
    closed: Latch,
    /// This handle no longer counts among the peer's users.
    released: AtomicBool,
}

impl ConnInner {
    /// Stops counting this handle among the peer's users; true if it was the last.
    fn release(&self) -> bool {
        if self.released.swap(true, Ordering::SeqCst) {
            return false;
        }
        let last = {
            let mut links = self.peer.links.lock();
            links.users = links.users.saturating_sub(1);
            links.users == 0
        };
        // Lets the reconnect task see it.
        self.peer.changed.notify_waiters();
        last
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection to one peer; implements [`PeerConnection`].
///
/// Clones share the connection, and all connections to one peer share its
/// QUIC connection. If it is lost, a background task re-dials (within the
/// reconnect backoff), and a call that finds no connection dials itself instead
/// of failing forever.
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
    /// A WAL request in line for the window (with its slot if it has one) or
    /// for a connection.
    WalPending(Ticket, Option<Slot>, Vec<u8>),
    /// A control request on this link; whether it may be retried (see
    /// [`retry_safe`]).
    Control(Outstanding, Vec<u8>, bool),
    /// A control request, with no open connection.
    ControlRedial(Vec<u8>, bool),
}

/// Whether a control request may be sent once more after the retired
/// connection it was on died with it unanswered (it may have run already):
/// only if running it twice is harmless. Heartbeats, votes and pre-votes (a
/// voter answers the same candidate in the same term alike) and fences are;
/// promote (TimeoutNow) and raise-floor are not retried, the caller gets the
/// error and the engine decides.
fn retry_safe(request: &Request) -> bool {
    matches!(
        request,
        Request::Heartbeat(_) | Request::Vote(_) | Request::Fence(_)
    )
}

impl ConnInner {
    fn is_closed(&self) -> bool {
        self.closed.is_set() || self.shared.closed.is_set()
    }

    fn lost(&self) -> TransportError {
        TransportError::Unreachable(self.peer.id, "connection lost".into())
    }

    /// Queues a WAL request on the kept connection, if it is open.
    #[allow(clippy::result_large_err)]
    fn enqueue(
        &self,
        slot: Slot,
        frame: Vec<u8>,
    ) -> Result<oneshot::Receiver<Vec<u8>>, (Slot, Vec<u8>)> {
        let links = self.peer.links.lock();
        let Some(link) = links.live_current() else {
            return Err((slot, frame));
        };
        let (reply, rx) = oneshot::channel();
        let job = WalJob {
            frame,
            reply,
            slot,
            count: Outstanding::new(link, Count::Wal),
        };
        // The channel holds at most the window's slots, so it is never full.
        link.wal_tx.try_send(job).map(|()| rx).map_err(|e| {
            let job = e.into_inner();
            (job.slot, job.frame)
        })
    }

    /// A control call counted on the kept connection, if it is open.
    fn pick(&self) -> Option<Outstanding> {
        let links = self.peer.links.lock();
        links
            .live_current()
            .map(|l| Outstanding::new(l, Count::Call))
    }

    /// Runs when `call` is invoked: checks, encodes and, for the WAL channel,
    /// takes a place in line (and queues the request if the window has room), so
    /// WAL requests keep call order.
    fn prepare(&self, request: &Envelope<Request>) -> Result<Prepared, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let peer = self.peer.id;
        let frame = framing::encode(request, self.shared.opts.max_frame).map_err(|e| match e {
            FrameError::TooLarge { .. } => TransportError::Protocol(peer, e.to_string()),
            other => TransportError::Local(other.to_string()),
        })?;
        match request.body.channel() {
            Channel::Wal => {
                let ticket = self.peer.window.ticket();
                match ticket.try_admit() {
                    Some(slot) => match self.enqueue(slot, frame) {
                        Ok(rx) => Ok(Prepared::Wal(rx)),
                        Err((slot, frame)) => Ok(Prepared::WalPending(ticket, Some(slot), frame)),
                    },
                    None => Ok(Prepared::WalPending(ticket, None, frame)),
                }
            }
            Channel::Control => {
                let retry = retry_safe(&request.body);
                Ok(match self.pick() {
                    Some(count) => Prepared::Control(count, frame, retry),
                    None => Prepared::ControlRedial(frame, retry),
                })
            }
        }
    }

    /// A connection after the old one was lost, respecting the backoff.
    async fn redial(&self) -> Result<(), TransportError> {
        self.shared
            .ensure_link(&self.peer, &self.member, true)
            .await
            .map(|_| ())
    }

    /// A control call; if it failed because its retired connection died and it
    /// is `retry`-safe, once more on the kept one.
    async fn control(
        &self,
        count: Outstanding,
        frame: Vec<u8>,
        retry: bool,
    ) -> Result<Vec<u8>, TransportError> {
        let result = control_call(&self.shared, &count.link, &frame).await;
        match result {
            Err(TransportError::Unreachable(..))
                if retry && count.link.is_retired() && !count.link.is_live() =>
            {
                drop(count);
                match self.pick() {
                    Some(count) => control_call(&self.shared, &count.link, &frame).await,
                    None => Err(self.lost()),
                }
            }
            other => other,
        }
    }

    async fn run(&self, prepared: Prepared) -> Result<Vec<u8>, TransportError> {
        match prepared {
            Prepared::Wal(rx) => rx.await.map_err(|_| self.lost()),
            Prepared::WalPending(ticket, slot, frame) => {
                let slot = match slot {
                    Some(s) => s,
                    None => ticket.admit().await,
                };
                // The ticket stays first in line until the request is queued, so
                // later WAL calls cannot overtake it while it redials.
                let rx = match self.enqueue(slot, frame) {
                    Ok(rx) => rx,
                    Err((slot, frame)) => {
                        self.redial().await?;
                        self.enqueue(slot, frame).map_err(|_| self.lost())?
                    }
                };
                drop(ticket);
                rx.await.map_err(|_| self.lost())
            }
            Prepared::Control(count, frame, retry) => self.control(count, frame, retry).await,
            Prepared::ControlRedial(frame, retry) => {
                self.redial().await?;
                match self.pick() {
                    Some(count) => self.control(count, frame, retry).await,
                    None => Err(self.lost()),
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
        !self.inner.is_closed() && self.inner.peer.links.lock().live_current().is_some()
    }

    /// Closes this handle; the last open handle to a peer also closes the QUIC
    /// connection and stops re-dialing it.
    fn close(&self) {
        self.inner.closed.set();
        if self.inner.release() {
            close_links(&self.inner.peer, CODE_CLOSED, b"closed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn window_admits_in_ticket_order_and_skips_abandoned() {
        let w = WalWindow::new(1);
        let t0 = w.ticket();
        let s0 = t0.try_admit().unwrap();
        drop(t0);
        let (t1, t2, t3) = (w.ticket(), w.ticket(), w.ticket());
        // Full: nobody gets in; t2 is not first in line anyway.
        assert!(t1.try_admit().is_none());
        assert!(t2.try_admit().is_none());
        assert_eq!(w.used(), 1);
        assert_eq!(w.waiting(), 3);
        drop(s0);
        // Room, but only for the first in line.
        assert!(t2.try_admit().is_none());
        drop(t2); // t2 gives up out of turn
        let s1 = t1.try_admit().unwrap();
        assert!(t3.try_admit().is_none());
        drop(t1);
        assert!(t3.try_admit().is_none(), "the window holds one");
        drop(s1);
        let s3 = t3.try_admit().unwrap();
        drop(t3);
        assert_eq!(w.waiting(), 0);
        assert_eq!(w.used(), 1);
        drop(s3);
        assert_eq!(w.used(), 0);
    }

    struct Refuse;

    impl RequestHandler for Refuse {
        fn handle(
            &self,
            _peer: NodeId,
            req: Envelope<Request>,
        ) -> ha_core::transport::BoxFuture<Envelope<Response>> {
            Box::pin(std::future::ready(Envelope {
                from: req.to,
                to: req.from,
                term: req.term,
                request_id: req.request_id,
                body: Response::Error(RpcError::Malformed("test".into())),
            }))
        }
    }

    fn transport(ca: &crate::certs::CertificateAuthority, id: u64) -> QuicTransport {
        let cert = ca
            .issue(&crate::certs::NodeCertSpec::new(NodeId(id), 1))
            .unwrap();
        let identity = Identity::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        QuicTransport::new(
            &identity,
            QuicOptions::new(bind, vec![NodeId(1), NodeId(2)]),
        )
        .unwrap()
    }

    /// A caller waiting for another caller's dial is woken by unrelated changes
    /// many times; it neither gives up nor counts them as its own dials, and
    /// dials itself once the other dial ended without a connection.
    #[tokio::test(flavor = "current_thread")]
    async fn ensure_link_is_not_used_up_by_unrelated_wakeups() {
        let ca = crate::certs::CertificateAuthority::generate("ensure", 1).unwrap();
        let one = transport(&ca, 1);
        let two = transport(&ca, 2);
        two.listen(Arc::new(Refuse)).await.unwrap();
        let member = Member {
            id: NodeId(2),
            addr: two.local_addr().unwrap().to_string(),
            kind: ha_core::types::MemberKind::Data,
        };
        let shared = one.inner.clone();
        let peer = shared.peer(NodeId(2));
        // Another caller's dial is in progress.
        peer.links.lock().dialing = true;
        let waiter = {
            let (shared, peer) = (shared.clone(), peer.clone());
            tokio::spawn(async move {
                shared
                    .ensure_link(&peer, &member, false)
                    .await
                    .map(|l| l.dialer)
            })
        };
        // On this single-threaded runtime each yield lets the waiter run.
        for _ in 0..10 {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            peer.changed.notify_waiters();
        }
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "the waiter gave up: {waiter:?}");
        // The other dial ends without a connection: the waiter dials itself.
        peer.links.lock().dialing = false;
        peer.changed.notify_waiters();
        let dialer = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(dialer, NodeId(1));
        one.close().await;
        two.close().await;
    }

    #[test]
    fn only_idempotent_control_requests_are_retried() {
        use ha_core::message::{Fence, Heartbeat, Promote, RaiseFloor, VoteRequest};
        use ha_core::types::{LogIndex, Position, Term};
        let term = Term {
            number: 1,
            node: NodeId(1),
        };
        let last = Position::new(term, LogIndex(1));
        let vote = |pre_vote| {
            Request::Vote(VoteRequest {
                pre_vote,
                campaign_term: term,
                last,
                transfer: false,
            })
        };
        assert!(retry_safe(&Request::Heartbeat(Heartbeat {
            commit: LogIndex(1),
            last,
        })));
        assert!(retry_safe(&vote(true)));
        assert!(retry_safe(&vote(false)));
        assert!(retry_safe(&Request::Fence(Fence {
            reason: "test".into()
        })));
        assert!(!retry_safe(&Request::Promote(Promote {
            reason: "test".into(),
            last,
        })));
        assert!(!retry_safe(&Request::RaiseFloor(RaiseFloor {
            floors: vec![(NodeId(2), last)],
            commit: LogIndex(1),
            rewrite: false,
        })));
    }

    #[tokio::test]
    async fn admit_waits_for_a_slot() {
        let w = WalWindow::new(1);
        let t0 = w.ticket();
        let s0 = t0.try_admit().unwrap();
        drop(t0);
        let t1 = w.ticket();
        let waiter = tokio::spawn(async move {
            let s = t1.admit().await;
            drop(t1);
            s
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(s0);
        let s1 = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(w.used(), 1);
        drop(s1);
    }
}
