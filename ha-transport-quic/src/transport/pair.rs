//! One connection per peer pair: the rule that says which connection both
//! nodes keep ([`keep`], a pure function), registering a new connection,
//! electing the kept one, retiring the others and winding a retired one down.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ha_core::types::NodeId;
use quinn::VarInt;

use super::link::Link;
use super::peer::{close_links, PeerLinks, PeerState};
use super::shared::Shared;
use super::{CODE_SHUTDOWN, CODE_SUPERSEDED, MAX_CONNECTIONS_PER_PEER, STREAM_RETIRE};

/// One open, unretired connection of a peer pair, as [`keep`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    /// The node that dialed it.
    dialer: NodeId,
    /// Its creation order on this node: higher is newer.
    seq: u64,
}

impl Candidate {
    /// How `link` takes part in the rule.
    fn of(link: &Link) -> Self {
        Candidate {
            dialer: link.dialer,
            seq: link.seq,
        }
    }
}

/// Which of two connections [`keep`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// The first one given.
    First,
    /// The second one given.
    Second,
}

/// The duplicate-connection rule: which of two open, unretired connections
/// between nodes `a` and `b` (in either order) the pair keeps. The one dialed
/// by the lower node id; of two dialed by the same node, the newer. Equal in
/// both (the same connection), the first. Both nodes of a pair choose alike,
/// since neither the order of `a` and `b` nor which of them is this node
/// matters.
fn keep(a: NodeId, b: NodeId, first: Candidate, second: Candidate) -> Keep {
    let low = a.min(b);
    let rank = |c: Candidate| (c.dialer != low, std::cmp::Reverse(c.seq));
    if rank(second) < rank(first) {
        Keep::Second
    } else {
        Keep::First
    }
}

impl Shared {
    /// Adds a new connection, chooses the pair's kept one and retires the others.
    /// A connection the peer opened beyond [`MAX_CONNECTIONS_PER_PEER`] is
    /// closed instead.
    pub(super) fn register(self: &Arc<Self>, peer: &Arc<PeerState>, link: Arc<Link>) {
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
    /// one dialed by the lower node id, and among those the newest (see
    /// [`keep`]).
    fn elect(&self, peer: NodeId, links: &mut PeerLinks) -> Vec<Arc<Link>> {
        let best = links
            .all
            .iter()
            .filter(|l| l.is_live() && !l.is_retired())
            .reduce(
                |best, l| match keep(self.me, peer, Candidate::of(best), Candidate::of(l)) {
                    Keep::First => best,
                    Keep::Second => l,
                },
            )
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
    /// this node still keeps it after the connect timeout, the two
    /// nodes chose differently (their views of which connections are open
    /// differed): this node retires it too, and the next call or the reconnect
    /// task settles the pair on a connection both keep.
    pub(super) async fn peer_retired(self: &Arc<Self>, peer: &Arc<PeerState>, link: &Arc<Link>) {
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
            _ = tokio::time::timeout(self.opts.net.connect_timeout, settled) => {}
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
}

/// Winds down a retired connection: once this node's calls and WAL requests on
/// it are answered, tells the peer ([`STREAM_RETIRE`]); once the peer said the
/// same, closes it with [`CODE_SUPERSEDED`]. All of this is bounded by
/// [`QuicOptions::drain_timeout`]: then it is closed anyway (requests still on
/// it fail).
///
/// [`QuicOptions::drain_timeout`]: super::QuicOptions::drain_timeout
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(dialer: u64, seq: u64) -> Candidate {
        Candidate {
            dialer: NodeId(dialer),
            seq,
        }
    }

    /// Both orders of the pair's node ids: this node's view and the peer's.
    const PAIRS: [(NodeId, NodeId); 4] = [
        (NodeId(1), NodeId(2)),
        (NodeId(2), NodeId(1)),
        (NodeId(3), NodeId(7)),
        (NodeId(7), NodeId(3)),
    ];

    #[test]
    fn the_connection_dialed_by_the_lower_id_is_kept() {
        for (a, b) in PAIRS {
            let (low, high) = (a.min(b).0, a.max(b).0);
            // Whichever is newer, and in either argument order.
            for (low_seq, high_seq) in [(0, 1), (1, 0), (5, 9), (9, 5)] {
                let by_low = conn(low, low_seq);
                let by_high = conn(high, high_seq);
                assert_eq!(keep(a, b, by_low, by_high), Keep::First, "{a} {b}");
                assert_eq!(keep(a, b, by_high, by_low), Keep::Second, "{a} {b}");
            }
        }
    }

    /// Both dialed by the same node: the newer. Equal in both (the same
    /// connection): the first.
    #[test]
    fn of_two_dialed_by_the_same_node_the_newer_is_kept() {
        for (a, b) in PAIRS {
            for dialer in [a.0, b.0] {
                let (old, new) = (conn(dialer, 3), conn(dialer, 4));
                assert_eq!(keep(a, b, old, new), Keep::Second, "{a} {b} {dialer}");
                assert_eq!(keep(a, b, new, old), Keep::First, "{a} {b} {dialer}");
                assert_eq!(keep(a, b, old, old), Keep::First, "{a} {b} {dialer}");
            }
        }
    }

    #[test]
    fn both_nodes_of_a_pair_choose_alike() {
        for (a, b) in PAIRS {
            for (x, y) in [
                (conn(a.0, 1), conn(b.0, 2)),
                (conn(b.0, 1), conn(a.0, 2)),
                (conn(a.0, 1), conn(a.0, 2)),
                (conn(b.0, 2), conn(b.0, 1)),
            ] {
                assert_eq!(keep(a, b, x, y), keep(b, a, x, y), "{a} {b}");
            }
        }
    }
}
