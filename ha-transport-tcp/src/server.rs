//! The serving side: accepting connections (a bounded number of handshakes at
//! once), proving the peer's identity, the duplicate-connection rule
//! ([`InboundConns`]), and serving control and WAL connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ha_core::latch::Latch;
use ha_core::message::{Envelope, Request};
use ha_core::transport::inbound::{encode_response, Dispatched};
use ha_core::types::NodeId;
use ha_core::wire::{self, BudgetPermit, FrameError, ReadBudget};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::link::PING;
use crate::transport::Shared;
use crate::{socket, KIND_CONTROL, KIND_WAL, MAX_CONNECTIONS_PER_PEER, WAL_WINDOW};

type Stream = TlsStream<TcpStream>;

/// Read buffer of an accepted connection.
const READ_BUFFER: usize = 256 * 1024;
/// Write buffer of an accepted connection.
const WRITE_BUFFER: usize = 64 * 1024;

/// One accepted connection, as the registry sees it.
struct Accepted {
    id: u64,
    /// Set to make it stop reading (and close).
    stop: Latch,
    /// Set once it has handed the node its last request.
    stopped: Latch,
    task: Option<JoinHandle<()>>,
}

/// The connections peers dialed to this node, by peer and kind: the newest of
/// each kind is current, older ones are being stopped.
#[derive(Default)]
pub(crate) struct InboundConns {
    next: AtomicU64,
    conns: Mutex<HashMap<(NodeId, u8), Vec<Accepted>>>,
}

impl InboundConns {
    /// Registers a new connection of `peer` and `kind` and tells the ones it
    /// replaces to stop; returns its id, its stop latch, its stopped latch and
    /// the stopped latches of those it replaces (it must not hand the node a
    /// request before they are set). `None` if the peer holds too many.
    fn register(&self, peer: NodeId, kind: u8) -> Option<(u64, Latch, Latch, Vec<Latch>)> {
        let mut conns = self.conns.lock();
        let list = conns.entry((peer, kind)).or_default();
        list.retain(|c| !c.stopped.is_set());
        if list.len() >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        let earlier: Vec<Latch> = list
            .iter()
            .map(|c| {
                c.stop.set();
                c.stopped.clone()
            })
            .collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (stop, stopped) = (Latch::new(), Latch::new());
        list.push(Accepted {
            id,
            stop: stop.clone(),
            stopped: stopped.clone(),
            task: None,
        });
        Some((id, stop, stopped, earlier))
    }

    fn set_task(&self, peer: NodeId, kind: u8, id: u64, task: JoinHandle<()>) {
        let mut conns = self.conns.lock();
        match conns
            .get_mut(&(peer, kind))
            .and_then(|l| l.iter_mut().find(|c| c.id == id))
        {
            Some(c) => c.task = Some(task),
            // Already gone: nothing to wait for.
            None => drop(task),
        }
    }

    fn remove(&self, peer: NodeId, kind: u8, id: u64) {
        let mut conns = self.conns.lock();
        if let Some(list) = conns.get_mut(&(peer, kind)) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(&(peer, kind));
            }
        }
    }

    /// Open accepted connections of `peer`.
    pub(crate) fn count(&self, peer: NodeId) -> usize {
        self.conns
            .lock()
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|(_, l)| l.iter().filter(|c| !c.stopped.is_set()).count())
            .sum()
    }

    /// Stops every accepted connection and waits for them.
    pub(crate) async fn shut_down(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut conns = self.conns.lock();
            conns
                .values_mut()
                .flat_map(|l| l.iter_mut())
                .filter_map(|c| {
                    c.stop.set();
                    c.task.take()
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(Semaphore::new(shared.opts.max_handshakes.max(1)));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.closed.wait() => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                tracing::warn!("accept failed: {e}");
                tokio::select! {
                    () = tokio::time::sleep(shared.opts.net.reconnect_interval) => continue,
                    () = shared.closed.wait() => return,
                }
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared
                .refusals
                .refused(&remote, &"too many handshakes in progress");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let accepted = handshake(&shared, stream, remote).await;
            drop(permit);
            if let Some((tls, peer, kind)) = accepted {
                serve(shared, tls, peer, kind, remote);
            }
        });
    }
}

/// The TLS handshake, the peer's proven identity and the kind byte, all bounded.
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
    remote: SocketAddr,
) -> Option<(Stream, NodeId, u8)> {
    let opts = &shared.opts;
    if let Err(e) = socket::tune(&stream, opts.net.keep_alive, opts.net.idle_timeout) {
        tracing::debug!(%remote, "socket options: {e}");
    }
    let mut tls = match tokio::time::timeout(
        opts.net.connect_timeout,
        shared.acceptor.accept(stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.refusals.refused(&remote, &e);
            return None;
        }
        Err(_) => {
            shared.refusals.refused(&remote, &"handshake timed out");
            return None;
        }
    };
    let peer = match tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| "no client certificate".to_string())
        .and_then(|chain| ha_tls::config::peer_node(chain).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            shared.refusals.refused(&remote, &e);
            return None;
        }
    };
    let mut kind = [0u8; 1];
    match tokio::time::timeout(opts.net.frame_timeout, tls.read_exact(&mut kind)).await {
        Ok(Ok(_)) if kind[0] == KIND_CONTROL || kind[0] == KIND_WAL => Some((tls, peer, kind[0])),
        Ok(Ok(_)) => {
            tracing::warn!(%peer, %remote, kind = kind[0], "closing a connection of unknown kind");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, %remote, "connection ended before its kind: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, %remote, "closing a connection that sent no kind in time");
            None
        }
    }
}

fn serve(shared: Arc<Shared>, tls: Stream, peer: NodeId, kind: u8, remote: SocketAddr) {
    if shared.closed.is_set() {
        return;
    }
    let Some((id, stop, stopped, earlier)) = shared.accepted.register(peer, kind) else {
        tracing::warn!(%peer, %remote, "refusing a connection: the peer already has {MAX_CONNECTIONS_PER_PEER} of this kind open");
        return;
    };
    let conn = Conn {
        shared: shared.clone(),
        peer,
        stop,
    };
    let task = tokio::spawn(async move {
        let registry = conn.shared.clone();
        let (read, write) = tokio::io::split(tls);
        if kind == KIND_WAL {
            // WAL order across reconnects: nothing from this connection reaches
            // the node before the ones it replaces handed over their last.
            for e in earlier {
                tokio::select! {
                    () = e.wait() => {}
                    () = conn.stop.wait() => {}
                }
            }
            conn.serve_wal(read, write, &stopped).await;
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
}

/// A request read, with its share of the connection's budget; `None` once the
/// connection is done (pings are answered inside).
type Read = Option<(Envelope<Request>, BudgetPermit)>;

/// The read side of an accepted connection and its budget.
struct Reader {
    r: BufReader<ReadHalf<Stream>>,
    budget: ReadBudget,
}

impl Reader {
    fn new(opts: &crate::TcpOptions, read: ReadHalf<Stream>) -> Self {
        Reader {
            r: BufReader::with_capacity(READ_BUFFER, read),
            budget: ReadBudget::new(opts.net.read_budget, opts.net.max_frame),
        }
    }
}

impl Conn {
    /// Reads the next request, answering pings (through `tx`, the
    /// connection's writer) on the way. Ends on a stop, the peer's close,
    /// silence for the idle timeout, or garbage (logged).
    async fn next(&self, reader: &mut Reader, tx: &mpsc::Sender<Vec<u8>>) -> Read {
        loop {
            match self.frame(reader).await {
                Some(read) => return read,
                None => {
                    if tx.send(PING.to_vec()).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// One frame: `None` for a ping, else what it was.
    async fn frame(&self, reader: &mut Reader) -> Option<Read> {
        let opts = &self.shared.opts;
        let read = wire::read_frame_or_idle(
            &mut reader.r,
            opts.net.max_frame,
            Some(opts.net.idle_timeout),
            opts.net.frame_timeout,
            &reader.budget,
        );
        let frame = tokio::select! {
            f = read => f,
            () = self.stop.wait() => return Some(None),
        };
        Some(match frame {
            Ok(Some(f)) if f.body.is_empty() => return None,
            Ok(Some(f)) => match f.decode::<Envelope<Request>>() {
                Ok((request, permit)) => Some((request, permit)),
                Err(e) => {
                    tracing::warn!(peer = %self.peer, "closing connection: bad request frame: {e}");
                    None
                }
            },
            Ok(None) => None,
            Err(FrameError::Io(e)) => {
                tracing::debug!(peer = %self.peer, "connection ended: {e}");
                None
            }
            Err(FrameError::Idle(d)) => {
                tracing::debug!(peer = %self.peer, "closing a connection silent for {d:?}");
                None
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, "closing connection: bad request frame: {e}");
                None
            }
        })
    }

    /// Control: each request is answered as soon as it is handled (in any
    /// order), at most `max_control_inflight` at once.
    async fn serve_control(
        self,
        read: ReadHalf<Stream>,
        write: WriteHalf<Stream>,
        stopped: &Latch,
    ) {
        let opts = &self.shared.opts;
        let inflight = Arc::new(Semaphore::new(opts.max_control_inflight.max(1)));
        let (tx, rx) = mpsc::channel::<Vec<u8>>(opts.max_control_inflight.max(1) + 1);
        let writer = tokio::spawn(write_loop(
            self.shared.clone(),
            write,
            rx,
            self.stop.clone(),
        ));
        let mut r = Reader::new(opts, read);
        while let Some((request, permit)) = self.next(&mut r, &tx).await {
            let slot = tokio::select! {
                s = inflight.clone().acquire_owned() => s,
                () = self.stop.wait() => break,
            };
            let Ok(slot) = slot else { break };
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
    /// answered in order, each once it is ready; at most [`WAL_WINDOW`] wait
    /// for their answers.
    async fn serve_wal(self, read: ReadHalf<Stream>, write: WriteHalf<Stream>, stopped: &Latch) {
        let opts = &self.shared.opts;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(WAL_WINDOW + 1);
        let writer = tokio::spawn(write_loop(
            self.shared.clone(),
            write,
            rx,
            self.stop.clone(),
        ));
        let (queue, mut answers) = mpsc::channel::<(Dispatched, BudgetPermit)>(WAL_WINDOW);
        let answerer = {
            let (shared, tx, stop) = (self.shared.clone(), tx.clone(), self.stop.clone());
            tokio::spawn(async move {
                while let Some((dispatched, _permit)) = answers.recv().await {
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
        let mut r = Reader::new(opts, read);
        while let Some((request, permit)) = self.next(&mut r, &tx).await {
            let room = tokio::select! {
                r = queue.reserve() => r,
                () = self.stop.wait() => break,
            };
            let Ok(room) = room else { break };
            // Dispatch is synchronous: stopping can never cut a request in
            // half, so `stopped` below really is the last hand-over.
            room.send((self.shared.inbound.dispatch(self.peer, request), permit));
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

/// Writes answers (and pongs) in the order they are sent, until the senders
/// are gone or `stop` is set; then a bounded close_notify.
async fn write_loop(
    shared: Arc<Shared>,
    write: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    stop: Latch,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, write);
    let result: std::io::Result<()> = async {
        loop {
            let first = tokio::select! {
                f = rx.recv() => f,
                () = stop.wait() => None,
            };
            let Some(first) = first else {
                return Ok(());
            };
            w.write_all(&first).await?;
            while let Ok(frame) = rx.try_recv() {
                w.write_all(&frame).await?;
            }
            w.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("answer write failed: {e}");
    }
    stop.set();
    let _ = tokio::time::timeout(shared.opts.net.close_timeout, w.shutdown()).await;
}
