//! Reconnecting: the background task that re-dials a peer whose connection
//! dropped, and the backoff (exponential, with jitter) it shares with calls
//! that dial themselves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
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
                    Some((m.clone(), links.backoff.delay()))
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

/// Exponential reconnect backoff with jitter.
#[derive(Debug)]
pub(super) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    pub(super) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
            not_before: None,
        }
    }

    /// The delay before the next attempt after `failures` failures: uniform in
    /// `[base, min(max, base × 2^failures)]`.
    fn delay(&self) -> Duration {
        let shift = self.failures.min(20);
        let ceiling = self.base.saturating_mul(1u32 << shift).min(self.max);
        let (lo, hi) = (self.base.as_micros() as u64, ceiling.as_micros() as u64);
        let us = if hi > lo {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default()
                ^ (self as *const Self as u64);
            rand::rngs::SmallRng::seed_from_u64(seed).random_range(lo..=hi)
        } else {
            lo
        };
        Duration::from_micros(us)
    }

    pub(super) fn wait_left(&self) -> Option<Duration> {
        self.not_before
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    pub(super) fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(Instant::now() + self.delay());
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}
