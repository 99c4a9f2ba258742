//! The calling side: [`TcpConnection`] (the [`PeerConnection`] of one peer),
//! the peer's two dialed links with their dial gates and shared backoff, the
//! WAL window, and the task that re-dials a lost control connection.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::backoff::Backoff;
use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::message::{Channel, Envelope, Request, Response};
use ha_core::transport::window::{Slot, Ticket, WalWindow};
use ha_core::transport::{bounded_call, check_response, PeerConnection};
use ha_core::types::NodeId;
use ha_core::wire::{self, FrameError};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::link::{Link, Refused, SharedBackoff};
use crate::transport::Shared;
use crate::{KIND_CONTROL, KIND_WAL};

/// One peer as this node reaches it.
pub(crate) struct PeerState {
    id: NodeId,
    member: Mutex<Option<Member>>,
    control: Mutex<Option<Arc<Link>>>,
    wal: Mutex<Option<Arc<Link>>>,
    /// One dial at a time per kind.
    dial_control: tokio::sync::Mutex<()>,
    dial_wal: tokio::sync::Mutex<()>,
    /// Shared with the peer's links: a dial succeeds once the peer sent
    /// something on the new connection.
    backoff: SharedBackoff,
    /// The number of this node's next connection of each kind to the peer
    /// (sent in the hello: the acceptor refuses an older one that arrives late).
    numbers: [AtomicU64; 2],
    pub(crate) window: Arc<WalWindow>,
    /// Open [`TcpConnection`]s; the reconnect task runs while there are any.
    users: AtomicUsize,
    reconnecting: AtomicBool,
    /// Woken when a user leaves.
    changed: Notify,
}

impl PeerState {
    pub(crate) fn new(shared: &Shared, id: NodeId) -> Self {
        let opts = &shared.opts;
        PeerState {
            id,
            member: Mutex::new(None),
            control: Mutex::new(None),
            wal: Mutex::new(None),
            dial_control: tokio::sync::Mutex::new(()),
            dial_wal: tokio::sync::Mutex::new(()),
            numbers: [AtomicU64::new(0), AtomicU64::new(0)],
            backoff: Arc::new(Mutex::new(Backoff::new(
                opts.net.reconnect_interval,
                opts.net.max_reconnect_backoff,
                Backoff::seed_for(shared.me, id, opts.net.seed),
            ))),
            window: WalWindow::new(opts.net.wal_window),
            users: AtomicUsize::new(0),
            reconnecting: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub(crate) fn set_member(&self, member: &Member) {
        *self.member.lock() = Some(member.clone());
    }

    fn slot(&self, kind: u8) -> &Mutex<Option<Arc<Link>>> {
        if kind == KIND_WAL {
            &self.wal
        } else {
            &self.control
        }
    }

    /// The live link of `kind`, if any.
    fn live(&self, kind: u8) -> Option<Arc<Link>> {
        self.slot(kind)
            .lock()
            .as_ref()
            .filter(|l| l.is_live())
            .cloned()
    }

    /// Live dialed links (control and WAL).
    pub(crate) fn live_links(&self) -> usize {
        usize::from(self.live(KIND_CONTROL).is_some()) + usize::from(self.live(KIND_WAL).is_some())
    }

    /// The live link of `kind`, or a new dial (one at a time per kind: a
    /// concurrent caller waits for the dial in progress). With
    /// `respect_backoff`, fails at once while a failed dial's backoff runs.
    pub(crate) async fn ensure(
        &self,
        shared: &Arc<Shared>,
        kind: u8,
        respect_backoff: bool,
    ) -> Result<Arc<Link>, TransportError> {
        if let Some(l) = self.live(kind) {
            return Ok(l);
        }
        let gate = if kind == KIND_WAL {
            &self.dial_wal
        } else {
            &self.dial_control
        };
        let _gate = tokio::select! {
            g = gate.lock() => g,
            () = shared.closed.wait() => return Err(TransportError::Closed),
        };
        if let Some(l) = self.live(kind) {
            return Ok(l);
        }
        if shared.closed.is_set() {
            return Err(TransportError::Closed);
        }
        if respect_backoff {
            if let Some(left) = self.backoff.lock().wait_left(Instant::now()) {
                return Err(TransportError::Unreachable(
                    self.id,
                    format!("connection lost; next reconnect attempt in {left:?}"),
                ));
            }
        }
        let member =
            self.member.lock().clone().ok_or_else(|| {
                TransportError::Local(format!("no address known for {}", self.id))
            })?;
        let number = self.numbers[usize::from(kind == KIND_WAL)].fetch_add(1, Ordering::SeqCst);
        let opened = tokio::select! {
            r = Link::open(shared, &member, kind, number, self.backoff.clone()) => r,
            () = shared.closed.wait() => Err(TransportError::Closed),
        };
        match opened {
            Ok(link) => {
                // Stored under the slot's lock with the checks, so a link never
                // outlives the transport's close or its last user's release.
                let mut slot = self.slot(kind).lock();
                if shared.closed.is_set() || self.users.load(Ordering::SeqCst) == 0 {
                    link.kill("no longer needed");
                    return Err(TransportError::Closed);
                }
                *slot = Some(link.clone());
                drop(slot);
                shared
                    .connections
                    .opened(self.id, ha_tls::Direction::Outbound);
                Ok(link)
            }
            Err(e) => {
                self.backoff.lock().failed(Instant::now());
                Err(e)
            }
        }
    }

    /// Starts the reconnect task unless it runs.
    pub(crate) fn start_reconnecting(self: &Arc<Self>, shared: &Arc<Shared>) {
        self.users.fetch_add(1, Ordering::SeqCst);
        if !self.reconnecting.swap(true, Ordering::SeqCst) {
            let task = tokio::spawn(reconnector(shared.clone(), self.clone()));
            shared.track(task);
        }
    }

    /// One user fewer; the last one closes the links (and so stops the
    /// reconnect task).
    fn release(&self) {
        if self.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            for slot in [&self.control, &self.wal] {
                let link = slot.lock().take();
                if let Some(l) = link {
                    l.kill("closed by its user");
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Kills both links at once (no waiting); returns their tasks.
    pub(crate) fn kill_all(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for slot in [&self.control, &self.wal] {
            let link = slot.lock().take();
            if let Some(l) = link {
                l.kill("shutdown");
                tasks.extend(l.take_tasks());
            }
        }
        self.changed.notify_waiters();
        tasks
    }
}

/// Re-dials the control connection of `peer` whenever it is dead, after the
/// backoff delay, while a [`TcpConnection`] to it is open and the transport is
/// not closed (so the next heartbeat finds a connection).
async fn reconnector(shared: Arc<Shared>, peer: Arc<PeerState>) {
    loop {
        let changed = peer.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if peer.users.load(Ordering::SeqCst) == 0 || shared.closed.is_set() {
            peer.reconnecting.store(false, Ordering::SeqCst);
            // A user that arrived meanwhile restarts it.
            if peer.users.load(Ordering::SeqCst) > 0
                && !shared.closed.is_set()
                && !peer.reconnecting.swap(true, Ordering::SeqCst)
            {
                continue;
            }
            return;
        }
        match peer.live(KIND_CONTROL) {
            Some(link) => {
                tokio::select! {
                    () = link.dead() => {}
                    () = &mut changed => {}
                    () = shared.closed.wait() => {}
                }
            }
            None => {
                let delay = peer.backoff.lock().delay(Instant::now());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {
                        if let Err(e) = peer.ensure(&shared, KIND_CONTROL, false).await {
                            tracing::debug!(peer = %peer.id, "reconnect failed: {e}");
                        }
                    }
                    () = &mut changed => {}
                    () = shared.closed.wait() => {}
                }
            }
        }
    }
}

pub(crate) struct ConnInner {
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    closed: Latch,
    released: AtomicBool,
}

impl ConnInner {
    pub(crate) fn new(shared: Arc<Shared>, peer: Arc<PeerState>) -> Self {
        ConnInner {
            shared,
            peer,
            closed: Latch::new(),
            released: AtomicBool::new(false),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.is_set() || self.shared.closed.is_set()
    }

    fn lost(&self) -> TransportError {
        TransportError::Unreachable(self.peer.id, "connection lost".into())
    }

    fn release(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.peer.release();
        }
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection to one peer; implements [`PeerConnection`].
///
/// Clones share it, and all connections to one peer share its two TCP
/// connections. If one is lost, the next call (or, for the control
/// connection, the reconnect task) dials again within the backoff.
#[derive(Clone)]
pub struct TcpConnection {
    pub(crate) inner: Arc<ConnInner>,
}

impl fmt::Debug for TcpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpConnection")
            .field("from", &self.inner.shared.me)
            .field("to", &self.inner.peer.id)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// How a call proceeds after its synchronous part.
enum Prepared {
    /// Queued on the WAL link; holds its window slot until answered.
    Wal(oneshot::Receiver<Envelope<Response>>, Arc<Link>, Slot),
    /// A WAL request in line for the window (with its slot if it has one) or
    /// for a connection.
    WalPending(Ticket, Option<Slot>, Vec<u8>),
    /// A control request.
    Control(Vec<u8>),
}

/// Forgets a request's answer if its caller gives up before it arrives.
struct Waiting<'a> {
    link: &'a Link,
    request_id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.link.forget(self.request_id);
    }
}

impl ConnInner {
    /// Queues on `link`; a dead link gives the frame back.
    fn submit(
        &self,
        link: &Arc<Link>,
        request_id: u64,
        frame: Vec<u8>,
    ) -> Result<Result<oneshot::Receiver<Envelope<Response>>, Vec<u8>>, TransportError> {
        match link.submit(request_id, frame) {
            Ok(rx) => Ok(Ok(rx)),
            Err(Refused::Dead(frame)) => Ok(Err(frame)),
            Err(Refused::Duplicate(id)) => Err(self.duplicate(id)),
        }
    }

    fn duplicate(&self, id: u64) -> TransportError {
        TransportError::Local(format!(
            "request id {id} is already awaiting an answer from {}",
            self.peer.id
        ))
    }

    /// Runs when `call` is invoked: checks, encodes and, for the WAL channel,
    /// takes a place in line (and queues the request if the window has room and
    /// the WAL connection is up), so WAL requests keep call order.
    fn prepare(&self, request: &Envelope<Request>) -> Result<Prepared, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let peer = self.peer.id;
        let frame = wire::encode(request, self.shared.opts.net.max_frame).map_err(|e| match e {
            FrameError::TooLarge { .. } => TransportError::Protocol(peer, e.to_string()),
            other => TransportError::Local(other.to_string()),
        })?;
        match request.body.channel() {
            Channel::Control => Ok(Prepared::Control(frame)),
            Channel::Wal => {
                let ticket = self.peer.window.ticket();
                let Some(slot) = ticket.try_admit() else {
                    return Ok(Prepared::WalPending(ticket, None, frame));
                };
                let Some(link) = self.peer.live(KIND_WAL) else {
                    return Ok(Prepared::WalPending(ticket, Some(slot), frame));
                };
                match self.submit(&link, request.request_id, frame)? {
                    Ok(rx) => Ok(Prepared::Wal(rx, link, slot)),
                    Err(frame) => Ok(Prepared::WalPending(ticket, Some(slot), frame)),
                }
            }
        }
    }

    async fn answer(
        &self,
        link: &Link,
        request_id: u64,
        rx: oneshot::Receiver<Envelope<Response>>,
    ) -> Result<Envelope<Response>, TransportError> {
        let _waiting = Waiting { link, request_id };
        rx.await.map_err(|_| self.lost())
    }

    async fn run(
        &self,
        request_id: u64,
        prepared: Prepared,
    ) -> Result<Envelope<Response>, TransportError> {
        match prepared {
            Prepared::Wal(rx, link, _slot) => self.answer(&link, request_id, rx).await,
            Prepared::WalPending(ticket, slot, frame) => {
                let _slot = match slot {
                    Some(s) => s,
                    None => ticket.admit().await,
                };
                // The ticket stays first in line until the request is queued,
                // so later WAL calls cannot overtake it while it dials.
                let link = self.peer.ensure(&self.shared, KIND_WAL, true).await?;
                let rx = self
                    .submit(&link, request_id, frame)?
                    .map_err(|_| self.lost())?;
                drop(ticket);
                self.answer(&link, request_id, rx).await
            }
            Prepared::Control(frame) => {
                let link = self.peer.ensure(&self.shared, KIND_CONTROL, true).await?;
                let rx = match link.submit_waiting(request_id, frame).await {
                    Ok(rx) => rx,
                    Err(Refused::Dead(_)) => return Err(self.lost()),
                    Err(Refused::Duplicate(id)) => return Err(self.duplicate(id)),
                };
                self.answer(&link, request_id, rx).await
            }
        }
    }
}

impl PeerConnection for TcpConnection {
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
            let closed = inner.closed.wait_either(&inner.shared.closed);
            let outcome = async {
                let response = inner.run(request_id, prepared).await?;
                check_response(peer, request_id, response)
            };
            bounded_call(peer, deadline, outcome, closed, || inner.is_closed()).await
        }
    }

    fn is_connected(&self) -> bool {
        !self.inner.is_closed() && self.inner.peer.live(KIND_CONTROL).is_some()
    }

    /// Closes this handle; the last open handle to a peer also closes its TCP
    /// connections and stops re-dialing it.
    fn close(&self) {
        self.inner.closed.set();
        self.inner.release();
    }
}
