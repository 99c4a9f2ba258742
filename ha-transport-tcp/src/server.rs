//! The serving side: accepting connections (a bounded number of handshakes at
//! once, fewer per source address), proving the peer's identity, the
//! duplicate-connection rule ([`InboundConns`]), and serving control and WAL
//! connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ha_core::latch::Latch;
use ha_core::message::{Envelope, Request};
use ha_core::ratelimit::{Burst, Verdict};
use ha_core::transport::inbound::{encode_response, Dispatched};
use ha_core::types::NodeId;
use ha_core::wire::{self, BudgetPermit, FrameError, ReadBudget};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::link::{write_frames, HELLO_BYTES};
use crate::transport::Shared;
use crate::{socket, KIND_CONTROL, KIND_WAL, MAX_CONNECTIONS_PER_PEER};

type Stream = TlsStream<TcpStream>;

/// Read buffer of an accepted connection.
const READ_BUFFER: usize = 256 * 1024;
/// Write buffer of an accepted connection.
const WRITE_BUFFER: usize = 64 * 1024;
/// Handshakes in progress at once from one source address.
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;

/// One accepted connection, as the registry sees it.
struct Accepted {
    id: u64,
    /// Set to make it stop reading (and close).
    stop: Latch,
    /// Set once it has handed the node its last request.
    stopped: Latch,
    task: Option<JoinHandle<()>>,
}

/// What the successive connections of one peer and kind share, so a reconnect
/// never resets them: the bytes of frames held and the requests in progress
/// (those of replaced connections still count until they are answered).
#[derive(Clone)]
pub(crate) struct Limits {
    budget: ReadBudget,
    inflight: Arc<Semaphore>,
}

/// The connections of one peer and kind.
struct Slot {
    limits: Limits,
    conns: Vec<Accepted>,
    /// The dialer incarnation and connection number of the newest one.
    newest: Option<(u64, u64)>,
}

/// The connections peers dialed to this node, by peer and kind: the newest of
/// each kind is current, older ones are being stopped.
#[derive(Default)]
pub(crate) struct InboundConns {
    next: AtomicU64,
    state: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    slots: HashMap<(NodeId, u8), Slot>,
    closed: bool,
}

/// A registered connection: its id, its latches, the stopped latches of those
/// it replaced, and the limits it shares with them.
struct Registered {
    id: u64,
    stop: Latch,
    stopped: Latch,
    earlier: Vec<Latch>,
    limits: Limits,
}

impl InboundConns {
    /// Registers a new connection of `peer` and `kind` (the dialer's
    /// `incarnation` and connection `number`) and tells the ones it replaces to
    /// stop. Refused (with why) once closed, beyond
    /// [`MAX_CONNECTIONS_PER_PEER`], or if it is older than the newest of the
    /// same dialer incarnation (it finished its handshake late).
    fn register(
        &self,
        opts: &crate::TcpOptions,
        peer: NodeId,
        kind: u8,
        (incarnation, number): (u64, u64),
    ) -> Result<Registered, &'static str> {
        let mut reg = self.state.lock();
        if reg.closed {
            return Err("the transport is closed");
        }
        let slot = reg.slots.entry((peer, kind)).or_insert_with(|| Slot {
            limits: Limits {
                budget: ReadBudget::new(opts.net.read_budget, opts.net.max_frame),
                inflight: Arc::new(Semaphore::new(if kind == KIND_WAL {
                    opts.net.wal_window.max(1)
                } else {
                    opts.max_control_inflight.max(1)
                })),
            },
            conns: Vec::new(),
            newest: None,
        });
        slot.conns.retain(|c| !c.stopped.is_set());
        if slot
            .newest
            .is_some_and(|(inc, n)| inc == incarnation && number <= n)
        {
            return Err("an older connection than the current one");
        }
        if slot.conns.len() >= MAX_CONNECTIONS_PER_PEER {
            return Err("too many connections of this kind");
        }
        slot.newest = Some((incarnation, number));
        let earlier: Vec<Latch> = slot
            .conns
            .iter()
            .map(|c| {
                c.stop.set();
                c.stopped.clone()
            })
            .collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (stop, stopped) = (Latch::new(), Latch::new());
        slot.conns.push(Accepted {
            id,
            stop: stop.clone(),
            stopped: stopped.clone(),
            task: None,
        });
        Ok(Registered {
            id,
            stop,
            stopped,
            earlier,
            limits: slot.limits.clone(),
        })
    }

    fn set_task(&self, peer: NodeId, kind: u8, id: u64, task: JoinHandle<()>) {
        let mut reg = self.state.lock();
        match reg
            .slots
            .get_mut(&(peer, kind))
            .and_then(|s| s.conns.iter_mut().find(|c| c.id == id))
        {
            Some(c) => c.task = Some(task),
            // Already gone: nothing to wait for.
            None => drop(task),
        }
    }

    fn remove(&self, peer: NodeId, kind: u8, id: u64) {
        let mut reg = self.state.lock();
        if let Some(slot) = reg.slots.get_mut(&(peer, kind)) {
            slot.conns.retain(|c| c.id != id);
        }
    }

    /// Open accepted connections of `peer`.
    pub(crate) fn count(&self, peer: NodeId) -> usize {
        self.state
            .lock()
            .slots
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|(_, s)| s.conns.iter().filter(|c| !c.stopped.is_set()).count())
            .sum()
    }

    /// Refuses new connections, tells every accepted one to stop (no waiting)
    /// and returns their tasks.
    pub(crate) fn stop_all(&self) -> Vec<JoinHandle<()>> {
        let mut reg = self.state.lock();
        reg.closed = true;
        reg.slots
            .values_mut()
            .flat_map(|s| s.conns.iter_mut())
            .filter_map(|c| {
                c.stop.set();
                c.task.take()
            })
            .collect()
    }
}

/// Handshakes in progress, in all and per source address.
struct Handshakes {
    all: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake's place; returned on drop.
struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    source: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Handshakes {
    fn admit(self: &Arc<Self>, source: IpAddr) -> Option<HandshakeSlot> {
        let permit = self.all.clone().try_acquire_owned().ok()?;
        let mut per = self.per_source.lock();
        let n = per.entry(source).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            handshakes: self.clone(),
            source,
            _permit: permit,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per = self.handshakes.per_source.lock();
        if let Some(n) = per.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.source);
            }
        }
    }
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(Handshakes {
        all: Arc::new(Semaphore::new(shared.opts.max_handshakes.max(1))),
        per_source: Mutex::new(HashMap::new()),
    });
    let accept_lines = Burst::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.closed.wait() => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                match accept_lines.admit_now() {
                    Verdict::Log { suppressed } => tracing::warn!(suppressed, "accept failed: {e}"),
                    Verdict::Suppress => tracing::debug!("accept failed: {e}"),
                }
                tokio::select! {
                    () = tokio::time::sleep(shared.opts.net.reconnect_interval) => continue,
                    () = shared.closed.wait() => return,
                }
            }
        };
        let Some(slot) = handshakes.admit(remote.ip()) else {
            shared.refusals.refused(
                &remote,
                ha_tls::RefusalReason::Overload,
                &"too many handshakes in progress",
            );
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some((mut tls, peer)) = handshake(&shared, stream, remote).await else {
                return;
            };
            // Authenticated: the unauthenticated handshake's place is free.
            drop(slot);
            if let Some((kind, dialer)) = read_hello(&shared, &mut tls, peer, remote).await {
                serve(shared, tls, peer, kind, dialer, remote);
            }
        });
    }
}

/// The TLS handshake and the peer's proven identity, bounded.
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
    remote: SocketAddr,
) -> Option<(Stream, NodeId)> {
    let net = &shared.opts.net;
    if let Err(e) = socket::tune(&stream, net.keep_alive, net.idle_timeout) {
        tracing::debug!(%remote, "socket options: {e}");
    }
    let tls = match tokio::time::timeout(net.connect_timeout, shared.acceptor.accept(stream)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared
                .refusals
                .refused(&remote, ha_tls::RefusalReason::Handshake, &e);
            return None;
        }
        Err(_) => {
            shared.refusals.refused(
                &remote,
                ha_tls::RefusalReason::Timeout,
                &"handshake timed out",
            );
            return None;
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| "no client certificate".to_string())
        .and_then(|chain| ha_tls::config::peer_node(chain).map_err(|e| e.to_string()));
    match peer {
        Ok(p) => Some((tls, p)),
        Err(e) => {
            shared
                .refusals
                .refused(&remote, ha_tls::RefusalReason::Identity, &e);
            None
        }
    }
}

/// The hello (kind, dialer incarnation, connection number), within the frame
/// timeout.
async fn read_hello(
    shared: &Shared,
    tls: &mut Stream,
    peer: NodeId,
    remote: SocketAddr,
) -> Option<(u8, (u64, u64))> {
    let mut hello = [0u8; HELLO_BYTES];
    match tokio::time::timeout(shared.opts.net.frame_timeout, tls.read_exact(&mut hello)).await {
        Ok(Ok(_)) if hello[0] == KIND_CONTROL || hello[0] == KIND_WAL => {
            let mut inc = [0u8; 8];
            inc.copy_from_slice(&hello[1..9]);
            let mut number = [0u8; 8];
            number.copy_from_slice(&hello[9..]);
            Some((
                hello[0],
                (u64::from_be_bytes(inc), u64::from_be_bytes(number)),
            ))
        }
        Ok(Ok(_)) => {
            tracing::warn!(%peer, %remote, kind = hello[0], "closing a connection of unknown kind");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, %remote, "connection ended before its hello: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, %remote, "closing a connection that sent no hello in time");
            None
        }
    }
}

fn serve(
    shared: Arc<Shared>,
    tls: Stream,
    peer: NodeId,
    kind: u8,
    dialer: (u64, u64),
    remote: SocketAddr,
) {
    let reg = match shared.accepted.register(&shared.opts, peer, kind, dialer) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%peer, %remote, "refusing a connection: {why}");
            return;
        }
    };
    shared.connections.opened(peer, ha_tls::Direction::Inbound);
    let (id, stopped, earlier) = (reg.id, reg.stopped.clone(), reg.earlier);
    let conn = Conn {
        shared: shared.clone(),
        peer,
        stop: reg.stop,
        limits: reg.limits,
    };
    let task = tokio::spawn(async move {
        let registry = conn.shared.clone();
        let (read, write) = tokio::io::split(tls);
        if kind == KIND_WAL {
            // WAL order across reconnects: nothing from this connection reaches
            // the node before the ones it replaces handed over their last. If
            // this one is replaced meanwhile, it serves nothing at all.
            let mut replaced = false;
            for e in earlier {
                tokio::select! {
                    biased;
                    () = conn.stop.wait() => { replaced = true; break; }
                    () = e.wait() => {}
                }
            }
            if !replaced {
                conn.serve_wal(read, write, &stopped).await;
            }
        } else {
            conn.serve_control(read, write, &stopped).await;
        }
        stopped.set();
        registry.accepted.remove(peer, kind, id);
    });
    shared.accepted.set_task(peer, kind, id, task);
}

/// One accepted connection being served.
struct Conn {
    shared: Arc<Shared>,
    peer: NodeId,
    stop: Latch,
    limits: Limits,
}

/// A request read, with its share of the budget; `None` once the connection
/// is done (keep-alives are skipped inside).
type Read = Option<(Envelope<Request>, BudgetPermit)>;

impl Conn {
    /// Reads the next request, skipping keep-alives. Ends on a stop, the
    /// peer's close, silence for the idle timeout, or garbage (logged).
    async fn next(&self, r: &mut BufReader<ReadHalf<Stream>>) -> Read {
        let net = &self.shared.opts.net;
        loop {
            let frame = tokio::select! {
                biased;
                () = self.stop.wait() => return None,
                f = wire::read_frame_or_idle(r, net.max_frame, Some(net.idle_timeout), net.frame_timeout, &self.limits.budget) => f,
            };
            match frame {
                Ok(Some(f)) if f.body.is_empty() => continue,
                Ok(Some(f)) => match f.decode::<Envelope<Request>>() {
                    Ok(r) => return Some(r),
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, "closing connection: bad request frame: {e}");
                        return None;
                    }
                },
                Ok(None) => return None,
                Err(FrameError::Io(e)) => {
                    tracing::debug!(peer = %self.peer, "connection ended: {e}");
                    return None;
                }
                Err(FrameError::Idle(d)) => {
                    tracing::debug!(peer = %self.peer, "closing a connection silent for {d:?}");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(peer = %self.peer, "closing connection: bad request frame: {e}");
                    return None;
                }
            }
        }
    }

    /// A place among the requests in progress of this peer and kind.
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            () = self.stop.wait() => None,
            p = self.limits.inflight.clone().acquire_owned() => p.ok(),
        }
    }

    /// Control: each request is answered as soon as it is handled (in any
    /// order), at most `max_control_inflight` at once for the peer.
    async fn serve_control(
        self,
        read: ReadHalf<Stream>,
        write: WriteHalf<Stream>,
        stopped: &Latch,
    ) {
        let opts = &self.shared.opts;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(opts.max_control_inflight.max(1) + 1);
        let writer = tokio::spawn(write_loop(
            self.shared.clone(),
            write,
            rx,
            self.stop.clone(),
        ));
        let mut r = BufReader::with_capacity(READ_BUFFER, read);
        while let Some((request, permit)) = self.next(&mut r).await {
            let Some(slot) = self.admit().await else {
                break;
            };
            let dispatched = self.shared.inbound.dispatch(self.peer, request);
            let (shared, tx) = (self.shared.clone(), tx.clone());
            tokio::spawn(async move {
                let _held = (slot, permit);
                if let Some(frame) = answer(&shared, dispatched).await {
                    let _ = tx.send(frame).await;
                }
            });
        }
        // This connection hands the node nothing more.
        stopped.set();
        self.stop.set();
        drop(tx);
        let _ = writer.await;
    }

    /// WAL: each request is handed to the node as it arrives (in order) and
    /// answered in order, each once it is ready; at most the WAL window of the
    /// peer waits for its answers.
    async fn serve_wal(self, read: ReadHalf<Stream>, write: WriteHalf<Stream>, stopped: &Latch) {
        let window = self.shared.opts.net.wal_window.max(1);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(window + 1);
        let writer = tokio::spawn(write_loop(
            self.shared.clone(),
            write,
            rx,
            self.stop.clone(),
        ));
        type Queued = (Dispatched, BudgetPermit, OwnedSemaphorePermit);
        let (queue, mut answers) = mpsc::channel::<Queued>(window);
        let answerer = {
            let (shared, tx, stop) = (self.shared.clone(), tx.clone(), self.stop.clone());
            tokio::spawn(async move {
                while let Some((dispatched, _budget, _slot)) = answers.recv().await {
                    let Some(frame) = answer(&shared, dispatched).await else {
                        stop.set();
                        break;
                    };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut r = BufReader::with_capacity(READ_BUFFER, read);
        while let Some((request, permit)) = self.next(&mut r).await {
            let Some(slot) = self.admit().await else {
                break;
            };
            let room = tokio::select! {
                biased;
                () = self.stop.wait() => break,
                r = queue.reserve() => r,
            };
            let Ok(room) = room else { break };
            // Dispatch is synchronous: stopping can never cut a request in
            // half, so `stopped` below really is the last hand-over.
            room.send((
                self.shared.inbound.dispatch(self.peer, request),
                permit,
                slot,
            ));
        }
        stopped.set();
        drop(queue);
        // Answers of requests already handed over still go out, unless the
        // connection is being stopped (replaced or shut down).
        tokio::select! {
            _ = answerer => {}
            () = self.stop.wait() => {}
        }
        self.stop.set();
        drop(tx);
        let _ = writer.await;
    }
}

/// The encoded answer to a dispatched request, or `None` if the transport
/// closed first.
async fn answer(shared: &Shared, dispatched: Dispatched) -> Option<Vec<u8>> {
    let response = shared.inbound.answer(dispatched).await?;
    match encode_response(&response, shared.opts.net.max_frame) {
        Ok(frame) => Some(frame),
        Err(e) => {
            tracing::warn!("cannot encode a response: {e}");
            None
        }
    }
}

/// Writes answers in the order they are sent, and a keep-alive whenever it
/// wrote nothing for the keep-alive interval (so a slow handler never looks
/// like a dead node), until the senders are gone or `stop` is set; then a
/// bounded close_notify.
async fn write_loop(
    shared: Arc<Shared>,
    write: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    stop: Latch,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, write);
    let result = tokio::select! {
        biased;
        () = stop.wait() => Ok(()),
        r = write_frames(&mut w, &mut rx, shared.opts.net.keep_alive) => r,
    };
    if let Err(e) = result {
        tracing::debug!("answer write failed: {e}");
    }
    stop.set();
    let _ = tokio::time::timeout(shared.opts.net.close_timeout, w.shutdown()).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts() -> crate::TcpOptions {
        crate::TcpOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)), vec![NodeId(1)])
    }

    /// An older connection of one dialer incarnation that finishes its
    /// handshake after a newer one is refused (it would replace the newer and
    /// hand over its stale requests after the newer one's); a newer one, or
    /// one of a new incarnation (a restarted dialer), replaces the current.
    #[test]
    fn a_late_older_connection_never_replaces_a_newer_one() {
        let conns = InboundConns::default();
        let o = opts();
        let p = NodeId(1);
        let five = conns.register(&o, p, KIND_WAL, (7, 5)).unwrap();
        assert!(conns.register(&o, p, KIND_WAL, (7, 3)).is_err(), "older");
        assert!(
            conns.register(&o, p, KIND_WAL, (7, 5)).is_err(),
            "the same again"
        );
        assert!(!five.stop.is_set(), "a refused connection stops nothing");
        let six = conns.register(&o, p, KIND_WAL, (7, 6)).unwrap();
        assert!(five.stop.is_set(), "the newer replaces it");
        assert_eq!(six.earlier.len(), 1);
        let restarted = conns.register(&o, p, KIND_WAL, (8, 0)).unwrap();
        assert!(six.stop.is_set(), "a restarted dialer replaces it");
        assert!(!restarted.stop.is_set());
        // The other kind is separate.
        assert!(conns.register(&o, p, KIND_CONTROL, (7, 0)).is_ok());
    }

    /// Successive connections of a peer and kind share one budget and one
    /// bound on requests in progress, so reconnecting never resets them.
    #[test]
    fn reconnects_share_the_limits() {
        let conns = InboundConns::default();
        let o = opts();
        let a = conns.register(&o, NodeId(1), KIND_WAL, (1, 0)).unwrap();
        let b = conns.register(&o, NodeId(1), KIND_WAL, (1, 1)).unwrap();
        assert!(Arc::ptr_eq(&a.limits.inflight, &b.limits.inflight));
        assert_eq!(a.limits.inflight.available_permits(), o.net.wal_window);
        let held = a.limits.inflight.clone().try_acquire_owned().unwrap();
        assert_eq!(b.limits.inflight.available_permits(), o.net.wal_window - 1);
        drop(held);
        let c = conns.register(&o, NodeId(1), KIND_CONTROL, (1, 0)).unwrap();
        assert_eq!(
            c.limits.inflight.available_permits(),
            o.max_control_inflight
        );
    }

    #[test]
    fn nothing_registers_after_close() {
        let conns = InboundConns::default();
        let o = opts();
        let a = conns.register(&o, NodeId(1), KIND_WAL, (1, 0)).unwrap();
        conns.stop_all();
        assert!(a.stop.is_set());
        assert!(conns.register(&o, NodeId(1), KIND_WAL, (1, 1)).is_err());
    }

    #[test]
    fn handshakes_are_bounded_per_source() {
        let h = Arc::new(Handshakes {
            all: Arc::new(Semaphore::new(64)),
            per_source: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let held: Vec<_> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| h.admit(a).unwrap())
            .collect();
        assert!(h.admit(a).is_none(), "one source gets a few places");
        assert!(h.admit(b).is_some(), "another source still gets in");
        drop(held);
        assert!(h.admit(a).is_some());
        assert!(h.per_source.lock().get(&a).is_none_or(|n| *n <= 1));
    }
}
