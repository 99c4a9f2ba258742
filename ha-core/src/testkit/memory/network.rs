//! [`MemNetwork`], [`MemTransport`] and [`MemConnection`]: an in-process network.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::latch::Latch;

use crate::config::Member;
use crate::error::TransportError;
use crate::message::{Channel, Envelope, Request, Response, RpcError};
use crate::testkit::conformance::{HarnessNode, TransportHarness};
use crate::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use crate::types::{MemberKind, NodeId};

/// The largest request or response frame [`MemNetwork::new`] carries (64 MiB); a
/// larger one fails with [`TransportError::Protocol`].
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// A registered listener: the handler of one node id.
#[derive(Clone)]
struct Listener {
    incarnation: u64,
    handler: Arc<dyn RequestHandler>,
    /// Set when the listening transport closes.
    closed: Latch,
}

#[derive(Default)]
struct NetState {
    listeners: HashMap<NodeId, Listener>,
    /// Directed links that drop everything: `(from, to)`.
    cuts: HashSet<(NodeId, NodeId)>,
    /// Nodes cut from everyone, both ways.
    isolated: HashSet<NodeId>,
    next_incarnation: u64,
}

impl NetState {
    fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        !self.cuts.contains(&(from, to))
            && !self.isolated.contains(&from)
            && !self.isolated.contains(&to)
    }
}

struct NetShared {
    max_frame: usize,
    state: Mutex<NetState>,
}

/// An in-process network of [`MemTransport`]s, with fault hooks for tests.
///
/// Clones share the same network. A request travels postcard-encoded, so the wire
/// types are exercised as over a real transport.
///
/// Faults: [`cut`](Self::cut) and [`cut_one_way`](Self::cut_one_way) drop messages on
/// a link. A request on a cut link fails at once with
/// [`TransportError::Unreachable`]; a response on a cut link is lost, so its caller
/// times out (the handler did run, as after a real partition).
#[derive(Clone)]
pub struct MemNetwork {
    inner: Arc<NetShared>,
}

impl Default for MemNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        let mut listening: Vec<_> = st.listeners.keys().copied().collect();
        listening.sort();
        f.debug_struct("MemNetwork")
            .field("max_frame", &self.inner.max_frame)
            .field("listening", &listening)
            .field("cuts", &st.cuts)
            .field("isolated", &st.isolated)
            .finish()
    }
}

impl MemNetwork {
    /// An empty network with frames of at most [`MAX_FRAME_BYTES`].
    pub fn new() -> Self {
        Self::with_max_frame_bytes(MAX_FRAME_BYTES)
    }

    /// An empty network whose frames are at most `max_frame` bytes.
    pub fn with_max_frame_bytes(max_frame: usize) -> Self {
        MemNetwork {
            inner: Arc::new(NetShared {
                max_frame,
                state: Mutex::new(NetState::default()),
            }),
        }
    }

    /// A transport for `node` on this network. It receives nothing until it
    /// [`listen`](Transport::listen)s.
    pub fn transport(&self, node: NodeId) -> MemTransport {
        MemTransport {
            node,
            net: self.clone(),
            shared: Arc::new(TransportShared {
                closed: Latch::new(),
                incarnation: Mutex::new(None),
            }),
        }
    }

    /// Cuts the link between `a` and `b` in both directions.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut st = self.inner.state.lock();
        st.cuts.insert((a, b));
        st.cuts.insert((b, a));
    }

    /// Restores the link between `a` and `b` in both directions.
    pub fn heal(&self, a: NodeId, b: NodeId) {
        let mut st = self.inner.state.lock();
        st.cuts.remove(&(a, b));
        st.cuts.remove(&(b, a));
    }

    /// Drops every message `from` sends to `to` (requests and responses); the other
    /// direction keeps working.
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.inner.state.lock().cuts.insert((from, to));
    }

    /// Undoes [`cut_one_way`](Self::cut_one_way).
    pub fn heal_one_way(&self, from: NodeId, to: NodeId) {
        self.inner.state.lock().cuts.remove(&(from, to));
    }

    /// Cuts `node` from every other node, both ways, until
    /// [`rejoin`](Self::rejoin) or [`heal_all`](Self::heal_all).
    pub fn isolate(&self, node: NodeId) {
        self.inner.state.lock().isolated.insert(node);
    }

    /// Undoes [`isolate`](Self::isolate) (links cut one by one stay cut).
    pub fn rejoin(&self, node: NodeId) {
        self.inner.state.lock().isolated.remove(&node);
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        let mut st = self.inner.state.lock();
        st.cuts.clear();
        st.isolated.clear();
    }

    /// True if messages from `from` to `to` are delivered.
    pub fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        self.inner.state.lock().link_up(from, to)
    }

    /// True if a transport listens as `node`.
    pub fn is_listening(&self, node: NodeId) -> bool {
        self.inner.state.lock().listeners.contains_key(&node)
    }

    /// The listener a request from `from` to `to` reaches, or why none does. With
    /// `incarnation`, only that registration counts (a session does not survive
    /// its peer's restart; its handle makes a new one).
    fn route(
        &self,
        from: NodeId,
        to: NodeId,
        incarnation: Option<u64>,
    ) -> Result<Listener, String> {
        let st = self.inner.state.lock();
        if !st.link_up(from, to) {
            return Err(format!("link {from} -> {to} is cut"));
        }
        match st.listeners.get(&to) {
            None => Err(format!("{to} is not listening")),
            Some(l) if incarnation.is_some_and(|i| i != l.incarnation) => {
                Err(format!("connection reset: {to} restarted"))
            }
            Some(l) if l.closed.is_set() => Err(format!("{to} is closed")),
            Some(l) => Ok(l.clone()),
        }
    }
}

struct TransportShared {
    closed: Latch,
    /// This transport's registration, while it listens.
    incarnation: Mutex<Option<u64>>,
}

/// One node's endpoint on a [`MemNetwork`]; implements [`Transport`].
///
/// Clones are the same endpoint. Listening again as a node id that another
/// transport listens as takes the id over (as a restarted process would); the
/// other transport stops receiving and its peers' connections to it break.
#[derive(Clone)]
pub struct MemTransport {
    node: NodeId,
    net: MemNetwork,
    shared: Arc<TransportShared>,
}

impl fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTransport")
            .field("node", &self.node)
            .field("closed", &self.shared.closed.is_set())
            .finish()
    }
}

impl MemTransport {
    /// The node this transport speaks for (the authenticated identity of its
    /// requests).
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The network it belongs to.
    pub fn network(&self) -> &MemNetwork {
        &self.net
    }

    /// True once [`Transport::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_set()
    }

    fn close_now(&self) {
        self.shared.closed.set();
        if let Some(inc) = self.shared.incarnation.lock().take() {
            let mut st = self.net.inner.state.lock();
            if st
                .listeners
                .get(&self.node)
                .is_some_and(|l| l.incarnation == inc)
            {
                st.listeners.remove(&self.node);
            }
        }
    }
}

impl Transport for MemTransport {
    type Conn = MemConnection;

    fn local_id(&self) -> NodeId {
        self.node
    }

    fn connect(
        &self,
        peer: &Member,
    ) -> impl Future<Output = Result<MemConnection, TransportError>> + Send {
        let this = self.clone();
        let to = peer.id;
        async move {
            if this.is_closed() {
                return Err(TransportError::Closed);
            }
            let conn = MemConnection {
                inner: Arc::new(ConnShared {
                    from: this.node,
                    to,
                    net: this.net.clone(),
                    closed: Latch::new(),
                    transport_closed: this.shared.closed.clone(),
                    session: Mutex::new(None),
                }),
            };
            // Like a real transport, reach the peer now if it is there; if it
            // is not, the first call tries again.
            let _ = conn.session();
            Ok(conn)
        }
    }

    fn listen(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let result = if self.is_closed() {
            Err(TransportError::Closed)
        } else {
            let mut mine = self.shared.incarnation.lock();
            let mut st = self.net.inner.state.lock();
            let incarnation = match *mine {
                Some(inc)
                    if st
                        .listeners
                        .get(&self.node)
                        .is_some_and(|l| l.incarnation == inc) =>
                {
                    inc
                }
                _ => {
                    st.next_incarnation += 1;
                    st.next_incarnation
                }
            };
            st.listeners.insert(
                self.node,
                Listener {
                    incarnation,
                    handler,
                    closed: self.shared.closed.clone(),
                },
            );
            *mine = Some(incarnation);
            Ok(())
        };
        std::future::ready(result)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        self.close_now();
        std::future::ready(())
    }
}

/// One request on its way, with the slot for its outcome.
struct Job {
    frame: Vec<u8>,
    reply: oneshot::Sender<Delivery>,
}

/// What became of a request.
enum Delivery {
    /// The encoded response envelope.
    Response(Vec<u8>),
    /// The request failed on the way.
    Failed(TransportError),
    /// The response was dropped by a cut link; the caller learns nothing.
    Lost,
}

/// What both a connection and its WAL worker need.
struct Link {
    from: NodeId,
    to: NodeId,
    /// The peer's registration this connection was opened to.
    incarnation: u64,
    net: MemNetwork,
    closed: Latch,
    transport_closed: Latch,
}

impl Link {
    fn is_closed(&self) -> bool {
        self.closed.is_set() || self.transport_closed.is_set()
    }

    /// Resolves once this connection or its transport is closed.
    fn wait_closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.closed.wait_either(&self.transport_closed)
    }
}

/// One connection to one registration (incarnation) of the peer.
#[derive(Clone)]
struct Session {
    link: Arc<Link>,
    /// Feeds the session's WAL worker; dropping the last handle ends it.
    wal_tx: mpsc::UnboundedSender<Job>,
}

/// A submitted request: where its outcome arrives, the control job still to
/// deliver (WAL jobs are queued already), and the session's link.
type Submitted = (oneshot::Receiver<Delivery>, Option<Job>, Arc<Link>);

/// A connection handle: the session to the peer's current registration, made
/// anew when the peer restarted (the handle outlives connections, as the
/// [`Transport::connect`] contract asks).
struct ConnShared {
    from: NodeId,
    to: NodeId,
    net: MemNetwork,
    closed: Latch,
    transport_closed: Latch,
    session: Mutex<Option<Session>>,
}

/// A connection from one [`MemTransport`] to a peer; implements [`PeerConnection`].
///
/// WAL-channel requests go through one FIFO worker per connection, which hands
/// each to the peer's handler and awaits its response before the next, so they are
/// handled in call order. Control requests are handed to the peer at once on their
/// own task and never wait behind WAL traffic.
#[derive(Clone)]
pub struct MemConnection {
    inner: Arc<ConnShared>,
}

impl fmt::Debug for MemConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemConnection")
            .field("from", &self.inner.from)
            .field("to", &self.inner.to)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MemConnection {
    /// The local node.
    pub fn local_id(&self) -> NodeId {
        self.inner.from
    }

    /// The peer this connection reaches.
    pub fn peer_id(&self) -> NodeId {
        self.inner.to
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.is_set() || self.inner.transport_closed.is_set()
    }

    /// The session to the peer's current registration: the one in use while
    /// it holds, else a new one (the peer restarted, or was not there before),
    /// or why the peer cannot be reached.
    fn session(&self) -> Result<Session, TransportError> {
        let c = &self.inner;
        let mut current = c.session.lock();
        if let Some(s) = current.as_ref() {
            if !s.wal_tx.is_closed() && c.net.route(c.from, c.to, Some(s.link.incarnation)).is_ok()
            {
                return Ok(s.clone());
            }
        }
        let listener = c
            .net
            .route(c.from, c.to, None)
            .map_err(|why| TransportError::Unreachable(c.to, why))?;
        let link = Arc::new(Link {
            from: c.from,
            to: c.to,
            incarnation: listener.incarnation,
            net: c.net.clone(),
            closed: c.closed.clone(),
            transport_closed: c.transport_closed.clone(),
        });
        let (wal_tx, wal_rx) = mpsc::unbounded_channel();
        tokio::spawn(wal_worker(link.clone(), wal_rx));
        let s = Session { link, wal_tx };
        *current = Some(s.clone());
        Ok(s)
    }

    /// Checks and encodes a request and, for the WAL channel, queues it. Runs when
    /// `call` is invoked, so WAL requests are ordered by call time.
    fn submit(&self, request: &Envelope<Request>) -> Result<Submitted, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let session = self.session()?;
        let link = &session.link;
        let max = link.net.inner.max_frame;
        let frame = crate::wire::encode(request, max).map_err(|e| match e {
            crate::wire::FrameError::TooLarge { len, max } => TransportError::Protocol(
                link.to,
                format!("request frame of {len} bytes exceeds the {max} byte limit"),
            ),
            other => TransportError::Local(format!("cannot encode request: {other}")),
        })?;
        let (reply, rx) = oneshot::channel();
        let job = Job { frame, reply };
        match request.body.channel() {
            Channel::Wal => {
                session
                    .wal_tx
                    .send(job)
                    .map_err(|_| TransportError::Unreachable(link.to, "connection lost".into()))?;
                Ok((rx, None, session.link))
            }
            Channel::Control => Ok((rx, Some(job), session.link)),
        }
    }
}

impl PeerConnection for MemConnection {
    fn call(
        &self,
        request: Envelope<Request>,
        deadline: Duration,
    ) -> impl Future<Output = Result<Envelope<Response>, TransportError>> + Send {
        let submitted = self.submit(&request);
        let request_id = request.request_id;
        async move {
            let (rx, control_job, link) = submitted?;
            if let Some(job) = control_job {
                let link = link.clone();
                tokio::spawn(async move { deliver(&link, job).await });
            }
            let to = link.to;
            let max = link.net.inner.max_frame;
            let outcome = async move {
                match rx.await {
                    Ok(Delivery::Response(frame)) => decode_response(to, request_id, max, &frame),
                    Ok(Delivery::Failed(e)) => Err(e),
                    Ok(Delivery::Lost) => std::future::pending().await,
                    Err(_) => Err(TransportError::Unreachable(to, "connection lost".into())),
                }
            };
            let closed = link.wait_closed();
            crate::transport::bounded_call(to, deadline, outcome, closed, || link.is_closed()).await
        }
    }

    fn is_connected(&self) -> bool {
        !self.is_closed() && self.session().is_ok()
    }

    fn close(&self) {
        self.inner.closed.set();
        // Ends the session's WAL worker once its queue is drained.
        self.inner.session.lock().take();
    }
}

fn decode_response(
    peer: NodeId,
    request_id: u64,
    max: usize,
    frame: &[u8],
) -> Result<Envelope<Response>, TransportError> {
    let protocol = |e: crate::wire::FrameError| {
        TransportError::Protocol(peer, format!("undecodable response: {e}"))
    };
    let body = match crate::wire::split_frame(frame, max).map_err(protocol)? {
        Some((body, used)) if used == frame.len() => body,
        _ => {
            return Err(TransportError::Protocol(
                peer,
                "malformed response frame".into(),
            ))
        }
    };
    let response: Envelope<Response> = crate::wire::decode(body).map_err(protocol)?;
    crate::transport::check_response(peer, request_id, response)
}

/// Delivers WAL requests of one connection in call order: each is handed to the
/// peer's handler as it arrives (so batches sent together reach the node
/// together), and each caller gets its own answer once it is ready.
async fn wal_worker(link: Arc<Link>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let closed = link.wait_closed();
    tokio::pin!(closed);
    loop {
        let Job { frame, reply } = tokio::select! {
            job = rx.recv() => match job {
                Some(job) => job,
                None => return,
            },
            () = &mut closed => return,
        };
        let admitted = admit(&link, &frame);
        let link = link.clone();
        tokio::spawn(async move {
            let closed = link.wait_closed();
            let outcome = tokio::select! {
                d = complete(&link, admitted) => d,
                () = closed => Delivery::Failed(TransportError::Closed),
            };
            let _ = reply.send(outcome);
        });
    }
}

/// Hands one request to the peer's handler and reports the outcome to its caller.
async fn deliver(link: &Link, job: Job) {
    let Job { frame, reply } = job;
    let closed = link.wait_closed();
    let outcome = tokio::select! {
        d = serve(link, frame) => d,
        () = closed => Delivery::Failed(TransportError::Closed),
    };
    // The caller may have given up; then nobody wants the outcome.
    let _ = reply.send(outcome);
}

/// A request past the receiving side's checks.
enum Admitted {
    /// It failed on the way, or the transport refused it.
    Done(Delivery),
    /// The transport answers it itself.
    Refused(Envelope<Response>),
    /// The handler has it.
    Handling {
        handling: BoxFuture<Envelope<Response>>,
        peer_closed: Latch,
    },
}

/// The receiving side: authenticate, decode, handle, encode.
async fn serve(link: &Link, frame: Vec<u8>) -> Delivery {
    let admitted = admit(link, &frame);
    complete(link, admitted).await
}

/// The receiving side up to the handler: route, decode and check the request,
/// then hand it over (the handler queues it before this returns).
fn admit(link: &Link, frame: &[u8]) -> Admitted {
    let (from, to) = (link.from, link.to);
    let listener = match link.net.route(from, to, Some(link.incarnation)) {
        Ok(l) => l,
        Err(why) => return Admitted::Done(Delivery::Failed(TransportError::Unreachable(to, why))),
    };
    let max = link.net.inner.max_frame;
    let decoded = match crate::wire::split_frame(frame, max) {
        Ok(Some((body, used))) if used == frame.len() => crate::wire::decode(body).ok(),
        _ => None,
    };
    let Some(request) = decoded else {
        return Admitted::Done(Delivery::Failed(TransportError::Protocol(
            to,
            "the peer could not decode the request".into(),
        )));
    };
    let request: Envelope<Request> = request;
    if request.from != from {
        Admitted::Refused(refusal(&request, to, from, RpcError::NotAMember))
    } else if request.to != to {
        Admitted::Refused(refusal(
            &request,
            to,
            from,
            RpcError::Malformed(format!("request addressed to {} reached {to}", request.to)),
        ))
    } else {
        Admitted::Handling {
            handling: listener.handler.handle(from, request),
            peer_closed: listener.closed.clone(),
        }
    }
}

/// The receiving side after the handler: wait for the answer, encode it, and
/// lose it if the link back is cut.
async fn complete(link: &Link, admitted: Admitted) -> Delivery {
    let (from, to) = (link.from, link.to);
    let response = match admitted {
        Admitted::Done(delivery) => return delivery,
        Admitted::Refused(response) => response,
        Admitted::Handling {
            handling,
            peer_closed,
        } => {
            let peer_closed = peer_closed.wait();
            tokio::select! {
                r = handling => r,
                () = peer_closed => return Delivery::Failed(TransportError::Unreachable(to, format!("{to} closed"))),
            }
        }
    };
    let max = link.net.inner.max_frame;
    let bytes = match crate::wire::encode(&response, max) {
        Ok(b) => b,
        Err(e) => {
            return Delivery::Failed(TransportError::Protocol(
                to,
                format!("the peer could not encode the response: {e}"),
            ))
        }
    };
    if !link.net.link_up(to, from) {
        return Delivery::Lost;
    }
    Delivery::Response(bytes)
}

/// The transport's own answer to a request it refuses before the handler sees it.
fn refusal(
    request: &Envelope<Request>,
    me: NodeId,
    peer: NodeId,
    error: RpcError,
) -> Envelope<Response> {
    Envelope {
        from: me,
        to: peer,
        term: request.term,
        request_id: request.request_id,
        body: Response::Error(error),
    }
}

/// A [`TransportHarness`] over a fresh [`MemNetwork`] per call: nodes `1..=n`,
/// data members with addresses `mem://n<id>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemHarness;

impl TransportHarness for MemHarness {
    type Transport = MemTransport;

    fn nodes(&self, n: usize) -> impl Future<Output = Vec<HarnessNode<MemTransport>>> + Send {
        let net = MemNetwork::new();
        let nodes = (1..=n as u64)
            .map(|i| {
                let id = NodeId(i);
                HarnessNode {
                    member: Member {
                        id,
                        addr: format!("mem://{id}"),
                        kind: MemberKind::Data,
                    },
                    transport: net.transport(id),
                }
            })
            .collect();
        std::future::ready(nodes)
    }
}
