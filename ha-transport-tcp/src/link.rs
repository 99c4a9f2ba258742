//! [`Link`]: one connection this node dialed to a peer (control or WAL), its
//! writer and reader tasks, and the requests on it awaiting their answers.
//!
//! The writer writes queued frames in queue order (whatever is queued together
//! in one flush) and a keep-alive when it wrote nothing for the keep-alive
//! interval; the reader hands each response to the request it answers (by
//! request id) and declares the connection dead when nothing arrived for the
//! idle timeout (the acceptor sends keep-alives of its own, so a slow handler
//! never looks like a dead peer). Either failing kills the link: every request
//! on it fails at once with "connection lost", and it is never used again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ha_core::backoff::Backoff;
use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::message::{Envelope, Response};
use ha_core::types::NodeId;
use ha_core::wire::{self, FrameError, ReadBudget};
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::socket;
use crate::transport::Shared;

/// An empty frame: a keep-alive (either direction).
pub(crate) const PING: [u8; wire::HEADER_BYTES] = [0; wire::HEADER_BYTES];

/// The hello after the handshake: the kind byte, the dialer's incarnation and
/// the connection's number among the dialer's connections of that kind to
/// that peer (big-endian), so the acceptor can tell an older connection that
/// finished its handshake late from a newer one.
pub(crate) const HELLO_BYTES: usize = 1 + 8 + 8;

/// Frames written per flush at most.
const MAX_COALESCE: usize = 64;
/// Write buffer of a connection.
const WRITE_BUFFER: usize = 256 * 1024;

type Stream = TlsStream<TcpStream>;

/// Who a new link reports its fate to: its peer's backoff (a dial counts as a
/// success only once the peer sent something on it).
pub(crate) type SharedBackoff = Arc<Mutex<Backoff>>;

/// One dialed connection.
pub(crate) struct Link {
    pub(crate) peer: NodeId,
    /// [`crate::KIND_CONTROL`] or [`crate::KIND_WAL`].
    pub(crate) kind: u8,
    tx: mpsc::Sender<Vec<u8>>,
    /// Requests written or queued, by request id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Envelope<Response>>>>,
    dead: Latch,
    /// The peer sent at least one frame (a keep-alive or an answer).
    heard: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a request could not be queued on a link.
pub(crate) enum Refused {
    /// The link is dead: the frame comes back.
    Dead(Vec<u8>),
    /// A request with this id is already awaiting its answer here.
    Duplicate(u64),
}

/// The hello a dialer sends: kind, incarnation, connection number.
pub(crate) fn hello(kind: u8, incarnation: u64, number: u64) -> [u8; HELLO_BYTES] {
    let mut h = [0u8; HELLO_BYTES];
    h[0] = kind;
    h[1..9].copy_from_slice(&incarnation.to_be_bytes());
    h[9..].copy_from_slice(&number.to_be_bytes());
    h
}

impl Link {
    /// Dials `member`, runs the TLS handshake under its `node-<id>` name, checks
    /// the certificate proves that member, and sends the hello.
    pub(crate) async fn open(
        shared: &Arc<Shared>,
        member: &Member,
        kind: u8,
        number: u64,
        backoff: SharedBackoff,
    ) -> Result<Arc<Link>, TransportError> {
        let to = member.id;
        let unreachable = |why: String| TransportError::Unreachable(to, why);
        let opts = &shared.opts;
        let attempt = async {
            let stream = TcpStream::connect(member.addr.as_str())
                .await
                .map_err(|e| unreachable(format!("cannot connect to {}: {e}", member.addr)))?;
            socket::tune(&stream, opts.net.keep_alive, opts.net.idle_timeout)
                .map_err(|e| TransportError::Local(format!("socket options: {e}")))?;
            let name = ha_tls::config::server_name(to)
                .map_err(|e| TransportError::Local(e.to_string()))?;
            let mut tls = shared
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
            let proven = tls
                .get_ref()
                .1
                .peer_certificates()
                .ok_or_else(|| TransportError::Unauthorised("no server certificate".into()))
                .and_then(|chain| {
                    ha_tls::config::peer_node(chain)
                        .map_err(|e| TransportError::Unauthorised(e.to_string()))
                })?;
            if proven != to {
                return Err(TransportError::Unauthorised(format!(
                    "dialed {to}, certificate names {proven}"
                )));
            }
            tls.write_all(&hello(kind, shared.incarnation, number))
                .await
                .map_err(|e| unreachable(format!("cannot start the connection: {e}")))?;
            Ok(tls)
        };
        let tls = match tokio::time::timeout(opts.net.connect_timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => return Err(unreachable("connect or handshake timed out".into())),
        };
        let capacity = match kind {
            crate::KIND_WAL => opts.net.wal_window.max(1),
            _ => opts.max_control_inflight.max(1) * 4,
        };
        let (tx, rx) = mpsc::channel(capacity);
        let link = Arc::new(Link {
            peer: to,
            kind,
            tx,
            pending: Mutex::new(HashMap::new()),
            dead: Latch::new(),
            heard: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let (read, write) = tokio::io::split(tls);
        let writer = tokio::spawn(write_loop(shared.clone(), link.clone(), write, rx));
        let reader = tokio::spawn(read_loop(shared.clone(), link.clone(), read, backoff));
        link.tasks.lock().extend([writer, reader]);
        Ok(link)
    }

    /// Neither side closed it and neither task failed.
    pub(crate) fn is_live(&self) -> bool {
        !self.dead.is_set()
    }

    /// Resolves once the link is dead.
    pub(crate) async fn dead(&self) {
        self.dead.wait().await;
    }

    /// Kills the link: every request on it fails, and it is never used again;
    /// its tasks end at once (even a write blocked on a full socket).
    pub(crate) fn kill(&self, why: &str) {
        if !self.dead.is_set() {
            tracing::debug!(peer = %self.peer, kind = self.kind, "closing connection: {why}");
        }
        self.dead.set();
        self.pending.lock().clear();
    }

    /// Kills the link for a protocol violation by the peer (logged).
    fn violation(&self, why: &str) {
        tracing::warn!(peer = %self.peer, "closing connection: {why}");
        self.kill(why);
    }

    /// Queues an encoded WAL request (its id `request_id`) now, so requests
    /// queued in order are written in order; the answer arrives on the
    /// receiver. The queue holds the whole WAL window, so an admitted request
    /// always finds room.
    pub(crate) fn submit(
        &self,
        request_id: u64,
        frame: Vec<u8>,
    ) -> Result<oneshot::Receiver<Envelope<Response>>, Refused> {
        match self.tx.try_reserve() {
            Ok(room) => self.enqueue(room, request_id, frame),
            Err(_) => Err(Refused::Dead(frame)),
        }
    }

    /// Queues an encoded control request, waiting for room in the queue (a
    /// burst of control calls waits rather than failing on a healthy link).
    pub(crate) async fn submit_waiting(
        &self,
        request_id: u64,
        frame: Vec<u8>,
    ) -> Result<oneshot::Receiver<Envelope<Response>>, Refused> {
        let room = tokio::select! {
            r = self.tx.reserve() => r.map_err(|_| Refused::Dead(Vec::new()))?,
            () = self.dead.wait() => return Err(Refused::Dead(Vec::new())),
        };
        self.enqueue(room, request_id, frame)
    }

    /// Registers the answer's waiter and queues the frame into `room`, under
    /// the pending lock (so a dead link or a duplicate id queues nothing).
    fn enqueue(
        &self,
        room: mpsc::Permit<'_, Vec<u8>>,
        request_id: u64,
        frame: Vec<u8>,
    ) -> Result<oneshot::Receiver<Envelope<Response>>, Refused> {
        let mut pending = self.pending.lock();
        if self.dead.is_set() {
            return Err(Refused::Dead(frame));
        }
        if pending.contains_key(&request_id) {
            return Err(Refused::Duplicate(request_id));
        }
        let (reply, rx) = oneshot::channel();
        pending.insert(request_id, reply);
        room.send(frame);
        Ok(rx)
    }

    /// Stops waiting for the answer to `request_id` (its caller gave up).
    pub(crate) fn forget(&self, request_id: u64) {
        self.pending.lock().remove(&request_id);
    }

    /// The link's tasks, to await (or abort) at close.
    pub(crate) fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock())
    }
}

/// Writes queued frames in queue order (up to [`MAX_COALESCE`] per flush) and a
/// keep-alive whenever nothing was written for `keep_alive`; ends when the
/// senders are gone or a write fails. Both sides' writers are this loop.
pub(crate) async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    keep_alive: std::time::Duration,
) -> std::io::Result<()> {
    loop {
        let first = tokio::select! {
            f = rx.recv() => f,
            () = tokio::time::sleep(keep_alive) => Some(PING.to_vec()),
        };
        let Some(first) = first else {
            return Ok(());
        };
        w.write_all(&first).await?;
        let mut n = 1;
        while n < MAX_COALESCE {
            let Ok(frame) = rx.try_recv() else { break };
            w.write_all(&frame).await?;
            n += 1;
        }
        w.flush().await?;
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    link: Arc<Link>,
    write: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, write);
    let result = tokio::select! {
        biased;
        () = link.dead.wait() => Ok(()),
        r = write_frames(&mut w, &mut rx, shared.opts.net.keep_alive) => r,
    };
    if let Err(e) = result {
        link.kill(&format!("write failed: {e}"));
    }
    // A bounded close_notify, so the peer sees an orderly end.
    let _ = tokio::time::timeout(shared.opts.net.close_timeout, w.shutdown()).await;
}

async fn read_loop(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut read: ReadHalf<Stream>,
    backoff: SharedBackoff,
) {
    let net = &shared.opts.net;
    let budget = ReadBudget::new(net.read_budget, net.max_frame);
    let why = loop {
        let next = tokio::select! {
            biased;
            () = link.dead.wait() => return,
            r = wire::read_frame_or_idle(&mut read, net.max_frame, Some(net.idle_timeout), net.frame_timeout, &budget) => r,
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the peer closed the connection".to_string(),
            Err(FrameError::Io(e)) => break format!("read failed: {e}"),
            Err(FrameError::Idle(d)) => break format!("nothing received for {d:?}"),
            Err(e) => {
                link.violation(&format!("bad response frame: {e}"));
                return;
            }
        };
        if !link.heard.swap(true, Ordering::SeqCst) {
            // The dial really worked: the peer serves this connection.
            backoff.lock().succeeded();
        }
        // A keep-alive.
        if frame.body.is_empty() {
            continue;
        }
        let response = match wire::decode::<Envelope<Response>>(&frame.body) {
            Ok(r) => r,
            Err(e) => {
                link.violation(&format!("undecodable response: {e}"));
                return;
            }
        };
        let waiting = link.pending.lock().remove(&response.request_id);
        match waiting {
            Some(reply) => {
                let _ = reply.send(response);
            }
            // Its caller gave up (and forgot it).
            None => {
                tracing::debug!(peer = %link.peer, id = response.request_id, "dropping a response nobody waits for")
            }
        }
    };
    if !link.heard.load(Ordering::SeqCst) {
        // Closed before the peer sent anything (refused after the handshake,
        // say): a failed attempt, so re-dialing backs off.
        backoff.lock().failed(Instant::now());
    }
    link.kill(&why);
}
