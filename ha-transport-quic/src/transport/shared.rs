//! The core: [`QuicTransport`] (its endpoint, its accessors and its
//! [`Transport`] impl) and [`Shared`], the state every task of it shares.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::transport::inbound::Inbound;
use ha_core::transport::{RequestHandler, Transport};
use ha_core::types::NodeId;
use ha_tls::{ConnectionTally, Direction, Identity, Members, PeerConnections, RefusalLog};
use parking_lot::Mutex;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{ConnInner, QuicConnection};
use super::options::QuicOptions;
use super::peer::{close_links, PeerState};
use super::reconnect::{reconnector, Running};
use super::server::accept_loop;
use super::CODE_SHUTDOWN;

/// What a transport's clones, connections and tasks share.
pub(super) struct Shared {
    pub(super) me: NodeId,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) client_cfg: quinn::ClientConfig,
    pub(super) server_cfg: quinn::ServerConfig,
    pub(super) opts: QuicOptions,
    /// Checks requests and hands them to the handler.
    pub(super) inbound: Inbound,
    /// Refused handshakes, logged at a bounded rate.
    pub(super) refusals: RefusalLog,
    /// Authenticated connections opened, per peer and direction.
    pub(super) connections: ConnectionTally,
    pub(super) peers: Mutex<HashMap<NodeId, Arc<PeerState>>>,
    pub(super) closed: Latch,
    pub(super) accepting: AtomicBool,
    pub(super) next_seq: AtomicU64,
    /// Reconnect tasks, awaited at close.
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Reconnect tasks running.
    pub(super) reconnectors: AtomicUsize,
    /// Duplicate connections retired so far.
    pub(super) superseded: AtomicUsize,
}

/// One node's QUIC endpoint; implements [`Transport`].
///
/// Clones share the endpoint. The UDP socket is bound at construction, so
/// [`local_addr`](Self::local_addr) is known before [`Transport::listen`]; until
/// then incoming connections are refused.
#[derive(Clone)]
pub struct QuicTransport {
    pub(super) inner: Arc<Shared>,
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
        let members: Members = Arc::new(opts.net.members.iter().copied().collect());
        if !members.contains(&identity.node) {
            return Err(TransportError::Local(format!(
                "{} is not among the configured members",
                identity.node
            )));
        }
        let mut tc = quinn::TransportConfig::default();
        tc.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(opts.net.idle_timeout).map_err(local)?,
        ));
        tc.keep_alive_interval(Some(opts.net.keep_alive));
        // Control streams, the WAL stream and a retire stream.
        tc.max_concurrent_bidi_streams(VarInt::from_u32(
            opts.max_control_streams.saturating_add(2),
        ));
        tc.max_concurrent_uni_streams(VarInt::from_u32(0));
        tc.stream_receive_window(VarInt::from_u32(16 * 1024 * 1024));
        tc.receive_window(VarInt::from_u32(64 * 1024 * 1024));
        tc.send_window(64 * 1024 * 1024);
        let tc = Arc::new(tc);

        let client_tls = ha_tls::client_config(identity, members.clone(), opts.tls_clock.clone())
            .map_err(local)?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(local)?,
        ));
        client_cfg.transport_config(tc.clone());
        let server_tls =
            ha_tls::server_config(identity, members, opts.tls_clock.clone()).map_err(local)?;
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
        let closed = Latch::new();
        Ok(QuicTransport {
            inner: Arc::new(Shared {
                me: identity.node,
                inbound: Inbound::new(identity.node, closed.clone()),
                refusals: RefusalLog::default(),
                connections: ConnectionTally::default(),
                endpoint,
                client_cfg,
                server_cfg,
                opts,
                peers: Mutex::new(HashMap::new()),
                closed,
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
        self.dialers(peer).len()
    }

    /// Every other configured member's connections with this node: open now
    /// (retired ones still draining included) and opened since start, by who
    /// dialed them.
    pub fn connections(&self) -> Vec<PeerConnections> {
        let (me, members) = (self.inner.me, &self.inner.opts.net.members);
        self.inner
            .connections
            .report(me, members, |peer, direction| {
                self.dialers(peer)
                    .into_iter()
                    .filter(|d| (*d == me) == (direction == Direction::Outbound))
                    .count()
            })
    }

    /// Who dialed each open connection with `peer` (for tests of the pair's
    /// choice of connection; `testkit` only).
    #[cfg(feature = "testkit")]
    pub fn connection_dialers(&self, peer: NodeId) -> Vec<NodeId> {
        self.dialers(peer)
    }

    fn dialers(&self, peer: NodeId) -> Vec<NodeId> {
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
    /// `NetOptions::wal_window`).
    pub fn wal_in_flight(&self, peer: NodeId) -> usize {
        self.inner
            .peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.window.used())
    }

    /// WAL calls to `peer` waiting for room in the window (or just admitted;
    /// `testkit` only).
    #[cfg(feature = "testkit")]
    pub fn wal_waiting(&self, peer: NodeId) -> usize {
        self.inner
            .peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.window.waiting())
    }

    /// The log of refused handshakes (bad or missing certificates,
    /// non-members, timeouts, over the handshake limit): its counts, including
    /// those not logged at WARN, and a signal tests wait on.
    pub fn refusals(&self) -> &ha_tls::RefusalLog {
        &self.inner.refusals
    }

    /// How many duplicate connections this node has retired (superseded by
    /// the pair's kept connection) since it started.
    pub fn superseded_connections(&self) -> usize {
        self.inner.superseded.load(Ordering::SeqCst)
    }

    /// Dials `member` and registers a new connection even if one is open (so
    /// tests can create a duplicate connection deterministically); the pair's
    /// choice of connection then applies as after a simultaneous dial (`testkit`
    /// only).
    #[cfg(feature = "testkit")]
    pub async fn dial_new(&self, member: &Member) -> Result<(), TransportError> {
        if self.inner.closed.is_set() {
            return Err(TransportError::Closed);
        }
        let peer = self.inner.peer(member.id);
        self.inner.dial(&peer, member).await
    }

    /// Background reconnect tasks running (none after [`Transport::close`];
    /// `testkit` only).
    #[cfg(feature = "testkit")]
    pub fn reconnect_tasks(&self) -> usize {
        self.inner.reconnectors.load(Ordering::SeqCst)
    }
}

impl Transport for QuicTransport {
    type Conn = QuicConnection;

    fn local_id(&self) -> NodeId {
        self.inner.me
    }

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
            // No dial here: the reconnect task (started below) dials at once,
            // and a call that finds no connection dials itself.
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
                    if tokio::time::timeout(shared.opts.net.close_timeout, &mut task)
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
            shared.inbound.set_handler(Some(handler));
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
        shared.inbound.set_handler(None);
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
            let deadline = Instant::now() + shared.opts.net.close_timeout;
            for mut task in tasks {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                    let _ = task.await;
                }
            }
            if first {
                let _ = tokio::time::timeout(
                    shared.opts.net.close_timeout,
                    shared.endpoint.wait_idle(),
                )
                .await;
            }
        }
    }
}
