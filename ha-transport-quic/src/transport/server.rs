//! The serving side: accepting connections, accepting the peer's streams on
//! them, reading requests, answering control requests, and the call of the
//! request handler (shared with the WAL stream).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ha_core::message::{Channel, Envelope, Request};
use ha_core::transport::inbound::encode_response;
use ha_core::wire::{self, BudgetPermit, FrameError};
use quinn::VarInt;

use super::link::Link;
use super::peer::{peer_id, PeerState};
use super::shared::Shared;
use super::wal_stream::serve_wal;
use super::{CODE_PROTOCOL, CODE_SHUTDOWN, STREAM_CONTROL, STREAM_RETIRE, STREAM_WAL};

/// Handshakes in progress at once; beyond that, new ones are refused.
pub const MAX_HANDSHAKES: usize = 64;

pub(super) async fn accept_loop(shared: Arc<Shared>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            () = shared.closed.wait() => return,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let remote = incoming.remote_address();
        // Under load, a source must prove its address first (a stateless
        // retry: spoofed Initials cannot answer it), and beyond the bound on
        // handshakes in progress new ones are refused.
        if handshakes.available_permits() < MAX_HANDSHAKES / 2
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            if incoming.retry().is_err() {
                shared.refusals.refused(
                    &remote,
                    ha_tls::RefusalReason::Overload,
                    &"address validation failed",
                );
            }
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            shared.refusals.refused(
                &remote,
                ha_tls::RefusalReason::Overload,
                &"too many handshakes in progress",
            );
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = match tokio::time::timeout(shared.opts.net.connect_timeout, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    shared
                        .refusals
                        .refused(&remote, ha_tls::RefusalReason::Handshake, &e);
                    return;
                }
                Err(_) => {
                    shared.refusals.refused(
                        &remote,
                        ha_tls::RefusalReason::Timeout,
                        &"handshake timed out",
                    );
                    return;
                }
            };
            let peer = match peer_id(&conn) {
                Ok(p) => p,
                Err(e) => {
                    shared
                        .refusals
                        .refused(&remote, ha_tls::RefusalReason::Identity, &e);
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
    match tokio::time::timeout(shared.opts.net.frame_timeout, recv.read_exact(&mut kind)).await {
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

/// Reads one request frame (its bytes taken from the connection's budget
/// until the permit is dropped), closing the connection on garbage.
pub(super) async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    shared: &Shared,
    link: &Link,
    recv: &mut R,
    channel: Channel,
) -> Option<(Envelope<Request>, BudgetPermit)> {
    match link.read(shared, recv, channel).await {
        Ok(Some(frame)) => match frame.decode::<Envelope<Request>>() {
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
    // A control stream carries one request: all of it (prefix included) must
    // arrive within the frame timeout, or a peer could hold the stream open.
    let read = tokio::time::timeout(
        shared.opts.net.frame_timeout,
        read_request(&shared, &link, &mut recv, Channel::Control),
    );
    let (request, _permit) = match read.await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(_) => {
            link.protocol_close("a control request did not arrive within the frame timeout");
            return;
        }
    };
    // A stalled handler must not keep the stream (and the peer's stream
    // credit) forever: after the frame timeout the caller has long given up,
    // so the stream is reset and its credit returns.
    let handled = tokio::time::timeout(
        shared.opts.net.frame_timeout,
        shared.inbound.respond(link.peer, request),
    );
    let Ok(Some(response)) = handled.await else {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    };
    match encode_response(&response, shared.opts.net.max_frame) {
        Ok(frame) => {
            if wire::write_frame(&mut send, &frame).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => tracing::warn!(peer = %link.peer, "cannot encode a response: {e}"),
    }
}
