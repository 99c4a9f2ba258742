//! The calling side: [`QuicConnection`], the [`PeerConnection`] of one peer:
//! WAL requests through the window onto the kept link's WAL stream, control
//! requests on a stream of their own (retried once if that is harmless).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::latch::Latch;
use ha_core::message::{Channel, Envelope, Request, Response};
use ha_core::transport::{bounded_call, PeerConnection};
use tokio::sync::oneshot;

use super::link::{Count, Link, Outstanding, WalJob};
use super::peer::{close_links, PeerState};
use super::shared::Shared;
use super::{CODE_CLOSED, STREAM_CONTROL};
use ha_core::transport::inbound::decode_response;
use ha_core::transport::window::{Slot, Ticket};
use ha_core::wire::{self, FrameError};

/// Sends one control request on its own stream and reads the response body.
async fn control_call(
    shared: &Shared,
    link: &Link,
    frame: &[u8],
) -> Result<Vec<u8>, TransportError> {
    let peer = link.peer;
    let lost = |e: String| TransportError::Unreachable(peer, e);
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    let mut chunks = [
        Bytes::from_static(&[STREAM_CONTROL]),
        Bytes::copy_from_slice(frame),
    ];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let _ = send.finish();
    match link.read(shared, &mut recv, Channel::Control).await {
        Ok(Some(frame)) => Ok(frame.body),
        Ok(None) => Err(lost("the peer closed the stream without answering".into())),
        Err(FrameError::Io(e)) => Err(lost(e)),
        Err(e) => {
            link.protocol_close(&format!("bad response frame: {e}"));
            Err(TransportError::Protocol(peer, e.to_string()))
        }
    }
}

pub(super) struct ConnInner {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: Arc<PeerState>,
    pub(super) member: Member,
    pub(super) closed: Latch,
    /// This handle no longer counts among the peer's users.
    pub(super) released: AtomicBool,
}

impl ConnInner {
    /// Stops counting this handle among the peer's users; true if it was the last.
    fn release(&self) -> bool {
        if self.released.swap(true, Ordering::SeqCst) {
            return false;
        }
        let last = {
            let mut links = self.peer.links.lock();
            links.users = links.users.saturating_sub(1);
            links.users == 0
        };
        // Lets the reconnect task see it.
        self.peer.changed.notify_waiters();
        last
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection to one peer; implements [`PeerConnection`].
///
/// Clones share the connection, and all connections to one peer share its
/// QUIC connection. If it is lost, a background task re-dials (within the
/// reconnect backoff), and a call that finds no connection dials itself instead
/// of failing forever.
#[derive(Clone)]
pub struct QuicConnection {
    pub(super) inner: Arc<ConnInner>,
}

impl fmt::Debug for QuicConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConnection")
            .field("from", &self.inner.shared.me)
            .field("to", &self.inner.peer.id)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// How a call proceeds after its synchronous part.
enum Prepared {
    /// Queued on the WAL stream; the response body arrives here.
    Wal(oneshot::Receiver<Vec<u8>>),
    /// A WAL request in line for the window (with its slot if it has one) or
    /// for a connection.
    WalPending(Ticket, Option<Slot>, Vec<u8>),
    /// A control request on this link; whether it may be retried (see
    /// [`retry_safe`]).
    Control(Outstanding, Vec<u8>, bool),
    /// A control request, with no open connection.
    ControlRedial(Vec<u8>, bool),
}

/// Whether a control request may be sent once more after the retired
/// connection it was on died with it unanswered (it may have run already):
/// only if running it twice is harmless. Heartbeats, votes and pre-votes (a
/// voter answers the same candidate in the same term alike) and fences are;
/// promote (TimeoutNow) and raise-floor are not retried, the caller gets the
/// error and the engine decides.
fn retry_safe(request: &Request) -> bool {
    matches!(
        request,
        Request::Heartbeat(_) | Request::Vote(_) | Request::Fence(_)
    )
}

impl ConnInner {
    fn is_closed(&self) -> bool {
        self.closed.is_set() || self.shared.closed.is_set()
    }

    fn lost(&self) -> TransportError {
        TransportError::Unreachable(self.peer.id, "connection lost".into())
    }

    /// Queues a WAL request on the kept connection, if it is open.
    #[allow(clippy::result_large_err)]
    fn enqueue(
        &self,
        slot: Slot,
        frame: Vec<u8>,
    ) -> Result<oneshot::Receiver<Vec<u8>>, (Slot, Vec<u8>)> {
        let links = self.peer.links.lock();
        let Some(link) = links.live_current() else {
            return Err((slot, frame));
        };
        let (reply, rx) = oneshot::channel();
        let job = WalJob {
            frame,
            reply,
            slot,
            count: Outstanding::new(link, Count::Wal),
        };
        // The channel holds at most the window's slots, so it is never full.
        link.wal_tx.try_send(job).map(|()| rx).map_err(|e| {
            let job = e.into_inner();
            (job.slot, job.frame)
        })
    }

    /// A control call counted on the kept connection, if it is open.
    fn pick(&self) -> Option<Outstanding> {
        let links = self.peer.links.lock();
        links
            .live_current()
            .map(|l| Outstanding::new(l, Count::Call))
    }

    /// Runs when `call` is invoked: checks, encodes and, for the WAL channel,
    /// takes a place in line (and queues the request if the window has room), so
    /// WAL requests keep call order.
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
            Channel::Wal => {
                let ticket = self.peer.window.ticket();
                match ticket.try_admit() {
                    Some(slot) => match self.enqueue(slot, frame) {
                        Ok(rx) => Ok(Prepared::Wal(rx)),
                        Err((slot, frame)) => Ok(Prepared::WalPending(ticket, Some(slot), frame)),
                    },
                    None => Ok(Prepared::WalPending(ticket, None, frame)),
                }
            }
            Channel::Control => {
                let retry = retry_safe(&request.body);
                Ok(match self.pick() {
                    Some(count) => Prepared::Control(count, frame, retry),
                    None => Prepared::ControlRedial(frame, retry),
                })
            }
        }
    }

    /// A connection after the old one was lost, respecting the backoff.
    async fn redial(&self) -> Result<(), TransportError> {
        self.shared
            .ensure_link(&self.peer, &self.member, true)
            .await
            .map(|_| ())
    }

    /// A control call; if it failed because its retired connection died and it
    /// is `retry`-safe, once more on the kept one.
    async fn control(
        &self,
        count: Outstanding,
        frame: Vec<u8>,
        retry: bool,
    ) -> Result<Vec<u8>, TransportError> {
        let result = control_call(&self.shared, &count.link, &frame).await;
        match result {
            Err(TransportError::Unreachable(..))
                if retry && count.link.is_retired() && !count.link.is_live() =>
            {
                drop(count);
                match self.pick() {
                    Some(count) => control_call(&self.shared, &count.link, &frame).await,
                    None => Err(self.lost()),
                }
            }
            other => other,
        }
    }

    async fn run(&self, prepared: Prepared) -> Result<Vec<u8>, TransportError> {
        match prepared {
            Prepared::Wal(rx) => rx.await.map_err(|_| self.lost()),
            Prepared::WalPending(ticket, slot, frame) => {
                let slot = match slot {
                    Some(s) => s,
                    None => ticket.admit().await,
                };
                // The ticket stays first in line until the request is queued, so
                // later WAL calls cannot overtake it while it redials.
                let rx = match self.enqueue(slot, frame) {
                    Ok(rx) => rx,
                    Err((slot, frame)) => {
                        self.redial().await?;
                        self.enqueue(slot, frame).map_err(|_| self.lost())?
                    }
                };
                drop(ticket);
                rx.await.map_err(|_| self.lost())
            }
            Prepared::Control(count, frame, retry) => self.control(count, frame, retry).await,
            Prepared::ControlRedial(frame, retry) => {
                self.redial().await?;
                match self.pick() {
                    Some(count) => self.control(count, frame, retry).await,
                    None => Err(self.lost()),
                }
            }
        }
    }
}

impl PeerConnection for QuicConnection {
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
                let body = inner.run(prepared).await?;
                decode_response(peer, request_id, &body)
            };
            bounded_call(peer, deadline, outcome, closed, || inner.is_closed()).await
        }
    }

    fn is_connected(&self) -> bool {
        !self.inner.is_closed() && self.inner.peer.links.lock().live_current().is_some()
    }

    /// Closes this handle; the last open handle to a peer also closes the QUIC
    /// connection and stops re-dialing it.
    fn close(&self) {
        self.inner.closed.set();
        if self.inner.release() {
            close_links(&self.inner.peer, CODE_CLOSED, b"closed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ha_core::types::NodeId;

    use super::*;

    #[test]
    fn only_idempotent_control_requests_are_retried() {
        use ha_core::message::{Fence, Heartbeat, Promote, RaiseFloor, VoteRequest};
        use ha_core::types::{LogIndex, Position, Term};
        let term = Term {
            number: 1,
            node: NodeId(1),
        };
        let last = Position::new(term, LogIndex(1));
        let vote = |pre_vote| {
            Request::Vote(VoteRequest {
                pre_vote,
                campaign_term: term,
                last,
                transfer: false,
            })
        };
        assert!(retry_safe(&Request::Heartbeat(Heartbeat {
            commit: LogIndex(1),
            last,
        })));
        assert!(retry_safe(&vote(true)));
        assert!(retry_safe(&vote(false)));
        assert!(retry_safe(&Request::Fence(Fence {
            reason: "test".into()
        })));
        assert!(!retry_safe(&Request::Promote(Promote {
            reason: "test".into(),
            last,
        })));
        assert!(!retry_safe(&Request::RaiseFloor(RaiseFloor {
            floors: vec![(NodeId(2), last)],
            commit: LogIndex(1),
            rewrite: false,
        })));
    }
}
