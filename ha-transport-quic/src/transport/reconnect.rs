//! Reconnecting: the background task that re-dials a peer whose connection
//! dropped, paced by the peer's [`Backoff`](ha_core::backoff::Backoff), which
//! it shares with calls that dial themselves.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::peer::PeerState;
use super::shared::Shared;

/// Counts a reconnect task from its spawn to its end.
pub(super) struct Running(Arc<Shared>);

impl Running {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        shared.reconnectors.fetch_add(1, Ordering::SeqCst);
        Running(shared.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.reconnectors.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Re-dials `peer` whenever it has no open connection, after the backoff delay,
/// while a [`QuicConnection`](super::QuicConnection) to it is open and the transport is not closed.
pub(super) async fn reconnector(shared: Arc<Shared>, peer: Arc<PeerState>, running: Running) {
    let _running = running;
    let closed = shared.closed.wait();
    tokio::pin!(closed);
    loop {
        let changed = peer.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let due = {
            let mut links = peer.links.lock();
            if links.users == 0 || shared.closed.is_set() {
                links.reconnecting = false;
                return;
            }
            match &links.member {
                Some(m) if links.live_current().is_none() && !links.dialing => {
                    Some((m.clone(), links.backoff.delay(Instant::now())))
                }
                _ => None,
            }
        };
        let Some((member, delay)) = due else {
            tokio::select! {
                () = &mut changed => continue,
                () = &mut closed => return,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut closed => return,
        }
        if let Err(e) = shared.ensure_link(&peer, &member, false).await {
            tracing::debug!(peer = %peer.id, "reconnect failed: {e}");
        }
    }
}
