//! Peers: the links, dialing and backoff of one peer, and the member a
//! connection's certificate proves.

use std::sync::Arc;

use ha_core::backoff::Backoff;
use ha_core::config::Member;
use ha_core::types::NodeId;
use parking_lot::Mutex;
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;

use super::link::Link;
use super::shared::Shared;
use ha_core::transport::window::WalWindow;

/// One peer: its links, its WAL window and the wake-ups of those waiting on it.
pub(super) struct PeerState {
    pub(super) id: NodeId,
    pub(super) links: Mutex<PeerLinks>,
    pub(super) window: Arc<WalWindow>,
    /// Woken when the peer's links change or a dial ends.
    pub(super) changed: Notify,
    /// Woken when a link's WAL requests are all answered or a link ends.
    pub(super) wal_idle: Arc<Notify>,
}

/// A peer's links and dial state, under one lock.
pub(super) struct PeerLinks {
    /// Every connection to the peer not yet forgotten (retired ones included).
    pub(super) all: Vec<Arc<Link>>,
    /// The kept connection, where new requests go.
    pub(super) current: Option<Arc<Link>>,
    /// Where to dial the peer, once a [`QuicConnection`](super::QuicConnection) to it was made.
    pub(super) member: Option<Member>,
    /// Open [`QuicConnection`](super::QuicConnection)s to the peer; the reconnect task runs while
    /// there are any.
    pub(super) users: usize,
    pub(super) reconnecting: bool,
    pub(super) dialing: bool,
    pub(super) backoff: Backoff,
    /// How many times a link became the kept one (see [`Link::kept_since`]).
    pub(super) kept_count: u64,
}

impl PeerLinks {
    pub(super) fn live_current(&self) -> Option<&Arc<Link>> {
        self.current.as_ref().filter(|l| l.is_live())
    }
}

impl Shared {
    pub(super) fn peer(&self, id: NodeId) -> Arc<PeerState> {
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
                            self.opts.net.reconnect_interval,
                            self.opts.net.max_reconnect_backoff,
                            Backoff::seed_for(self.me, id, self.opts.net.seed),
                        ),
                        kept_count: 0,
                    }),
                    window: WalWindow::new(self.opts.net.wal_window),
                    changed: Notify::new(),
                    wal_idle: Arc::new(Notify::new()),
                })
            })
            .clone()
    }

    /// Drops a connection that ended.
    pub(super) fn forget(&self, peer: &PeerState, link: &Arc<Link>) {
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
}

/// Closes every connection to `peer` and forgets them.
pub(super) fn close_links(peer: &PeerState, code: u32, why: &'static [u8]) {
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
pub(super) fn peer_id(conn: &quinn::Connection) -> Result<NodeId, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_string())?;
    ha_tls::config::peer_node(&chain).map_err(|e| e.to_string())
}
