//! Links: one QUIC connection each, with the counts of this node's requests
//! on it (so a retired link closes only after they are done).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use ha_core::message::Channel;
use ha_core::types::NodeId;
use ha_core::wire::{self, ReadBudget};
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, Notify};

use super::peer::PeerState;
use super::server::serve_conn;
use super::shared::Shared;
use super::wal_stream::wal_writer;
use super::CODE_PROTOCOL;
use ha_core::transport::window::Slot;

/// A WAL request queued on a link.
pub(super) struct WalJob {
    pub(super) frame: Vec<u8>,
    pub(super) reply: oneshot::Sender<Vec<u8>>,
    pub(super) slot: Slot,
    pub(super) count: Outstanding,
}

/// A WAL request written on the stream, waiting for its answer.
pub(super) struct Awaiting {
    pub(super) reply: oneshot::Sender<Vec<u8>>,
    pub(super) _slot: Slot,
    pub(super) _count: Outstanding,
}

/// One QUIC connection to an authenticated peer.
pub(super) struct Link {
    pub(super) peer: NodeId,
    /// Who dialed it (this node or the peer).
    pub(super) dialer: NodeId,
    /// Creation order on this node.
    pub(super) seq: u64,
    pub(super) conn: quinn::Connection,
    /// Bounded by the window: every queued job holds a slot.
    pub(super) wal_tx: mpsc::Sender<WalJob>,
    /// This node sends no new request on it (another connection is kept).
    pub(super) retired: AtomicBool,
    /// The peer said it sends no more requests on it.
    pub(super) peer_retired: AtomicBool,
    /// The peer opened its WAL stream on it (at most one is allowed).
    pub(super) peer_wal_stream: AtomicBool,
    /// This node's WAL requests queued or awaiting an answer on it.
    pub(super) wal_outstanding: AtomicUsize,
    /// This node's control calls in progress on it.
    pub(super) calls: AtomicUsize,
    /// Woken when a count reaches zero or the peer retires the link.
    pub(super) idle: Notify,
    /// The peer's [`PeerState::wal_idle`].
    peer_wal_idle: Arc<Notify>,
    /// When this link became the peer's kept one (from
    /// [`PeerLinks::kept_count`]); 0 if it never was. Requests go only on the
    /// kept link, and a link is kept at most once, so every WAL request on a
    /// link kept earlier was invoked before every one on this link.
    ///
    /// [`PeerLinks::kept_count`]: super::peer::PeerLinks::kept_count
    pub(super) kept_since: AtomicU64,
    /// The bytes of WAL frames (the peer's WAL requests, the answers to this
    /// node's) this connection may hold at once.
    wal_budget: ReadBudget,
    /// The same for control frames: a budget of their own, so a control read
    /// never waits behind WAL frames (the semaphore is fair).
    control_budget: ReadBudget,
}

impl Link {
    pub(super) fn new(
        shared: &Arc<Shared>,
        peer: &Arc<PeerState>,
        dialer: NodeId,
        conn: quinn::Connection,
    ) -> Arc<Link> {
        let (wal_tx, wal_rx) = mpsc::channel(shared.opts.net.wal_window.max(1));
        let direction = if dialer == shared.me {
            ha_tls::Direction::Outbound
        } else {
            ha_tls::Direction::Inbound
        };
        shared.connections.opened(peer.id, direction);
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
            wal_budget: ReadBudget::new(shared.opts.net.read_budget, shared.opts.net.max_frame),
            control_budget: ReadBudget::new(shared.opts.net.read_budget, shared.opts.net.max_frame),
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
    pub(super) fn is_live(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Reads one frame from a stream of this connection (bounded by the
    /// frame limits, charged to this connection's budget for `channel`).
    pub(super) async fn read<R: tokio::io::AsyncRead + Unpin>(
        &self,
        shared: &Shared,
        r: &mut R,
        channel: Channel,
    ) -> Result<Option<wire::Frame>, wire::FrameError> {
        let net = &shared.opts.net;
        let budget = match channel {
            Channel::Wal => &self.wal_budget,
            Channel::Control => &self.control_budget,
        };
        wire::read_frame(r, net.max_frame, net.frame_timeout, budget).await
    }

    pub(super) fn protocol_close(&self, why: &str) {
        tracing::warn!(peer = %self.peer, "closing connection: {why}");
        self.conn
            .close(VarInt::from_u32(CODE_PROTOCOL), why.as_bytes());
    }

    /// Resolves once `cond` holds (re-checked whenever the link's counts or
    /// retire state change).
    pub(super) async fn wait_until(&self, cond: impl Fn(&Link) -> bool) {
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
pub(super) enum Count {
    Wal,
    Call,
}

/// Counts one WAL request or control call of this node on a link, so a
/// retired link closes only after they are done.
pub(super) struct Outstanding {
    pub(super) link: Arc<Link>,
    kind: Count,
}

impl Outstanding {
    pub(super) fn new(link: &Arc<Link>, kind: Count) -> Self {
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
