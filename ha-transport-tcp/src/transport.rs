//! [`TcpTransport`]: the listener, the TLS configurations, the peers and the
//! [`Transport`] impl; [`Shared`] is what its clones, connections and tasks
//! share.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::transport::inbound::Inbound;
use ha_core::transport::{RequestHandler, Transport};
use ha_core::types::NodeId;
use ha_tls::{ConnectionTally, Direction, Identity, Members, PeerConnections, RefusalLog};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::client::{ConnInner, PeerState, TcpConnection};
use crate::options::TcpOptions;
use crate::server::{accept_loop, InboundConns};

/// What a transport's clones, connections and tasks share.
pub(crate) struct Shared {
    pub(crate) me: NodeId,
    pub(crate) opts: TcpOptions,
    pub(crate) connector: TlsConnector,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) inbound: Inbound,
    pub(crate) refusals: RefusalLog,
    /// Authenticated connections opened, per peer and direction.
    pub(crate) connections: ConnectionTally,
    pub(crate) closed: Latch,
    pub(crate) peers: Mutex<HashMap<NodeId, Arc<PeerState>>>,
    /// Connections peers dialed to this node, by peer and kind.
    pub(crate) accepted: InboundConns,
    /// This transport's incarnation, sent in every hello: the acceptor orders
    /// the connections of one incarnation by their numbers.
    pub(crate) incarnation: u64,
    /// The listener until [`Transport::listen`] takes it.
    listener: Mutex<Option<TcpListener>>,
    local_addr: SocketAddr,
    /// The accept loop and reconnect tasks, awaited at close.
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// The state of `peer`, created on first use.
    pub(crate) fn peer(self: &Arc<Self>, id: NodeId) -> Arc<PeerState> {
        self.peers
            .lock()
            .entry(id)
            .or_insert_with(|| Arc::new(PeerState::new(self, id)))
            .clone()
    }

    /// Tracks a task to await at close; if the transport is already closed,
    /// aborts it instead.
    pub(crate) fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock();
        if self.closed.is_set() {
            task.abort();
            return;
        }
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// One node's TCP + TLS endpoint; implements [`Transport`].
///
/// Clones share it. The listening socket is bound at construction (with
/// `SO_REUSEADDR`, so a restarted node gets its address back at once), so
/// [`local_addr`](Self::local_addr) is known before [`Transport::listen`];
/// connections are served only once it listens.
#[derive(Clone)]
pub struct TcpTransport {
    pub(crate) inner: Arc<Shared>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.inner.me)
            .field("addr", &self.inner.local_addr)
            .field("closed", &self.inner.closed.is_set())
            .finish()
    }
}

fn local(e: impl fmt::Display) -> TransportError {
    TransportError::Local(e.to_string())
}

/// A random incarnation id (std's per-process random hash keys, mixed with a
/// counter so two transports of one process differ).
fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl TcpTransport {
    /// A transport speaking for `identity.node`, listening socket bound to
    /// `opts.bind`. Must be called within a tokio runtime.
    pub fn new(identity: &Identity, opts: TcpOptions) -> Result<Self, TransportError> {
        let members: Members = Arc::new(opts.net.members.iter().copied().collect());
        if !members.contains(&identity.node) {
            return Err(TransportError::Local(format!(
                "{} is not among the configured members",
                identity.node
            )));
        }
        let client = ha_tls::client_config(identity, members.clone(), opts.tls_clock.clone())
            .map_err(local)?;
        let server =
            ha_tls::server_config(identity, members, opts.tls_clock.clone()).map_err(local)?;
        let listener = bind(opts.bind)
            .map_err(|e| TransportError::Local(format!("cannot listen on {}: {e}", opts.bind)))?;
        let local_addr = listener.local_addr().map_err(local)?;
        let closed = Latch::new();
        Ok(TcpTransport {
            inner: Arc::new(Shared {
                me: identity.node,
                connector: TlsConnector::from(Arc::new(client)),
                acceptor: TlsAcceptor::from(Arc::new(server)),
                inbound: Inbound::new(identity.node, closed.clone()),
                refusals: RefusalLog::default(),
                connections: ConnectionTally::default(),
                closed,
                peers: Mutex::new(HashMap::new()),
                accepted: InboundConns::default(),
                listener: Mutex::new(Some(listener)),
                incarnation: incarnation(),
                local_addr,
                tasks: Mutex::new(Vec::new()),
                opts,
            }),
        })
    }

    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The node this transport speaks for.
    pub fn node_id(&self) -> NodeId {
        self.inner.me
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

    /// Connections `peer` dialed to this node that are open, of both kinds
    /// (once reconnects settled, at most one of each).
    pub fn accepted_connections(&self, peer: NodeId) -> usize {
        self.inner.accepted.count(peer)
    }

    /// Connections this node dialed to `peer` that are live (control and WAL).
    pub fn dialed_connections(&self, peer: NodeId) -> usize {
        self.inner
            .peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.live_links())
    }

    /// Every other configured member's TCP connections with this node (control
    /// and WAL): open now and opened since start, by who dialed them.
    pub fn connections(&self) -> Vec<PeerConnections> {
        let (me, members) = (self.inner.me, &self.inner.opts.net.members);
        self.inner
            .connections
            .report(me, members, |peer, direction| match direction {
                Direction::Inbound => self.accepted_connections(peer),
                Direction::Outbound => self.dialed_connections(peer),
            })
    }

    /// The log of refused handshakes (bad or missing certificates,
    /// non-members, timeouts, over the handshake limit): its counts, including
    /// those not logged at WARN, and a signal tests wait on.
    pub fn refusals(&self) -> &ha_tls::RefusalLog {
        &self.inner.refusals
    }
}

impl Transport for TcpTransport {
    type Conn = TcpConnection;

    fn local_id(&self) -> NodeId {
        self.inner.me
    }

    fn connect(
        &self,
        peer: &Member,
    ) -> impl Future<Output = Result<TcpConnection, TransportError>> + Send {
        let shared = self.inner.clone();
        let member = peer.clone();
        async move {
            if shared.closed.is_set() {
                return Err(TransportError::Closed);
            }
            let peer = shared.peer(member.id);
            peer.set_member(&member);
            // No dial here: the reconnect task (started below) dials at once,
            // and a call that finds no connection dials itself.
            let inner = ConnInner::new(shared.clone(), peer.clone());
            peer.start_reconnecting(&shared);
            Ok(TcpConnection {
                inner: Arc::new(inner),
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
            if let Some(listener) = shared.listener.lock().take() {
                let task = tokio::spawn(accept_loop(shared.clone(), listener));
                shared.track(task);
            }
            Ok(())
        };
        std::future::ready(result)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        let shared = self.inner.clone();
        shared.closed.set();
        shared.inbound.set_handler(None);
        // Dropping an unused listener frees the port at once.
        drop(shared.listener.lock().take());
        // Everything is told to stop first, without waiting on anything; then
        // all of it is awaited together, and what is left at the deadline is
        // aborted.
        let peers: Vec<Arc<PeerState>> = shared.peers.lock().values().cloned().collect();
        let mut tasks: Vec<JoinHandle<()>> = peers.iter().flat_map(|p| p.kill_all()).collect();
        tasks.extend(shared.accepted.stop_all());
        tasks.extend(std::mem::take(&mut *shared.tasks.lock()));
        async move {
            let deadline = Instant::now() + shared.opts.net.close_timeout;
            for mut task in tasks {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                    let _ = task.await;
                }
            }
        }
    }
}
