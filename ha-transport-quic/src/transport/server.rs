//! The serving side: accepting connections, accepting the peer's streams on
//! them, reading requests, answering control requests, and the call of the
//! request handler (shared with the WAL stream).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ha_core::message::{Envelope, Request, Response, RpcError};
use ha_core::transport::BoxFuture;
use ha_core::types::NodeId;
use quinn::VarInt;

use super::link::Link;
use super::peer::{peer_id, PeerState};
use super::shared::Shared;
use super::wal_stream::serve_wal;
use super::{CODE_PROTOCOL, CODE_SHUTDOWN, STREAM_CONTROL, STREAM_RETIRE, STREAM_WAL};
use crate::framing::{self, FrameError};

pub(super) async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            () = shared.closed.wait() => return,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(shared.opts.connect_timeout, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "handshake timed out");
                    return;
                }
            };
            let peer = match peer_id(&conn) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    conn.close(VarInt::from_u32(CODE_PROTOCOL), b"no identity");
                    return;
                }
            };
            if shared.closed.is_set() {
                conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
                return;
            }
            let peer = shared.peer(peer);
            let link = Link::new(&shared, &peer, peer.id, conn);
            shared.register(&peer, link);
        });
    }
}

/// Accepts the peer's streams on one link and serves them.
pub(super) async fn serve_conn(shared: Arc<Shared>, peer: Arc<PeerState>, link: Arc<Link>) {
    loop {
        let accepted = tokio::select! {
            s = link.conn.accept_bi() => s,
            () = shared.closed.wait() => break,
        };
        match accepted {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    shared.clone(),
                    peer.clone(),
                    link.clone(),
                    send,
                    recv,
                ));
            }
            Err(e) => {
                tracing::debug!(peer = %link.peer, "connection ended: {e}");
                break;
            }
        }
    }
    shared.forget(&peer, &link);
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    link: Arc<Link>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut kind = [0u8; 1];
    match tokio::time::timeout(shared.opts.frame_timeout, recv.read_exact(&mut kind)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(peer = %link.peer, "stream ended before its kind: {e}");
            return;
        }
        Err(_) => {
            link.protocol_close("stream kind not received in time");
            return;
        }
    }
    match kind[0] {
        STREAM_WAL if link.peer_wal_stream.swap(true, Ordering::SeqCst) => {
            link.protocol_close("a second WAL stream on one connection");
        }
        STREAM_WAL => serve_wal(shared, link, send, recv).await,
        STREAM_CONTROL => serve_control(shared, link, send, recv).await,
        STREAM_RETIRE => {
            link.peer_retired.store(true, Ordering::SeqCst);
            link.idle.notify_waiters();
            shared.peer_retired(&peer, &link).await;
        }
        other => link.protocol_close(&format!("unknown stream kind {other}")),
    }
}

/// Reads one request frame, closing the connection on garbage.
pub(super) async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    shared: &Shared,
    link: &Link,
    recv: &mut R,
) -> Option<Envelope<Request>> {
    match framing::read_frame(recv, shared.opts.max_frame, shared.opts.frame_timeout).await {
        Ok(Some(body)) => match framing::decode::<Envelope<Request>>(&body) {
            Ok(r) => Some(r),
            Err(e) => {
                link.protocol_close(&format!("bad request frame: {e}"));
                None
            }
        },
        Ok(None) => None,
        Err(FrameError::Io(e)) => {
            tracing::debug!(peer = %link.peer, "request stream ended: {e}");
            None
        }
        Err(e) => {
            link.protocol_close(&format!("bad request frame: {e}"));
            None
        }
    }
}

async fn serve_control(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(request) = read_request(&shared, &link, &mut recv).await else {
        return;
    };
    let Some(response) = shared.respond(link.peer, request).await else {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    };
    match shared.encode_response(&response) {
        Ok(frame) => {
            if framing::write_frame(&mut send, &frame).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => tracing::warn!(peer = %link.peer, "cannot encode a response: {e}"),
    }
}

/// A request handed to the handler, or refused before it.
pub(super) enum Dispatched {
    /// Nobody may answer: not listening, or closed.
    Closed,
    /// Refused by the transport itself.
    Refused(Envelope<Response>),
    /// The handler has it; its answer is on the way.
    Handling(BoxFuture<Envelope<Response>>),
}

impl Shared {
    /// The response to a request from `peer`, or `None` if nobody may answer
    /// (not listening, or closed): the stream is then dropped unanswered.
    pub(super) async fn respond(
        &self,
        peer: NodeId,
        request: Envelope<Request>,
    ) -> Option<Envelope<Response>> {
        self.answer(self.dispatch(peer, request)).await
    }

    /// Hands a request from `peer` to the handler now (the handler queues it
    /// before this returns, so requests dispatched in order reach the node in
    /// order), or refuses it; [`Self::answer`] then waits for the response.
    pub(super) fn dispatch(&self, peer: NodeId, request: Envelope<Request>) -> Dispatched {
        if self.closed.is_set() {
            return Dispatched::Closed;
        }
        let Some(handler) = self.handler.read().clone() else {
            return Dispatched::Closed;
        };
        let refusal = |error| Envelope {
            from: self.me,
            to: peer,
            term: request.term,
            request_id: request.request_id,
            body: Response::Error(error),
        };
        if request.from != peer {
            tracing::warn!(%peer, claimed = %request.from, "refusing a request that claims another sender");
            return Dispatched::Refused(refusal(RpcError::NotAMember));
        }
        if request.to != self.me {
            return Dispatched::Refused(refusal(RpcError::Malformed(format!(
                "request addressed to {} reached {}",
                request.to, self.me
            ))));
        }
        Dispatched::Handling(handler.handle(peer, request))
    }

    /// The response to a dispatched request, or `None` if this transport closed
    /// first.
    pub(super) async fn answer(&self, dispatched: Dispatched) -> Option<Envelope<Response>> {
        let handling = match dispatched {
            Dispatched::Closed => return None,
            Dispatched::Refused(response) => return Some(response),
            Dispatched::Handling(handling) => handling,
        };
        let closed = self.closed.wait();
        let response = tokio::select! {
            r = handling => r,
            () = closed => return None,
        };
        if self.closed.is_set() {
            return None;
        }
        Some(response)
    }

    /// Encodes a response, replacing one that is too large by an error response.
    pub(super) fn encode_response(
        &self,
        response: &Envelope<Response>,
    ) -> Result<Vec<u8>, FrameError> {
        match framing::encode(response, self.opts.max_frame) {
            Err(FrameError::TooLarge { len, max }) => {
                tracing::warn!(len, max, "response too large");
                let error = Envelope {
                    from: response.from,
                    to: response.to,
                    term: response.term,
                    request_id: response.request_id,
                    body: Response::Error(RpcError::Malformed(format!(
                        "response of {len} bytes exceeds the {max} byte limit"
                    ))),
                };
                framing::encode(&error, self.opts.max_frame)
            }
            other => other,
        }
    }
}
