//! The WAL stream: this node's WAL requests written in call order on one
//! stream per link (after every link kept before it is done), their answers
//! read back in order, and the peer's WAL requests served in order.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::VarInt;
use tokio::io::BufReader;
use tokio::sync::mpsc;

use super::link::{Awaiting, Link, WalJob};
use super::peer::PeerState;
use super::server::read_request;
use super::shared::Shared;
use super::{CODE_SHUTDOWN, STREAM_WAL, WAL_WINDOW};
use ha_core::message::Channel;
use ha_core::transport::inbound::{encode_response, Dispatched};
use ha_core::wire::{BudgetPermit, FrameError};

/// How many queued WAL requests (or responses) go out in one stream write.
const MAX_COALESCE: usize = 64;
/// Read buffer of a stream that carries many frames.
const READ_BUFFER: usize = 256 * 1024;

/// Writes queued WAL requests of one link, in queue order, on its WAL stream;
/// whatever is queued together goes out in one write. If the stream fails while
/// the connection is open, closes the connection (a link without its WAL stream
/// must not stay open, or the two nodes could disagree on which link to keep).
pub(super) async fn wal_writer(
    shared: Arc<Shared>,
    peer: Arc<PeerState>,
    link: Arc<Link>,
    mut rx: mpsc::Receiver<WalJob>,
) {
    let result = write_wal(&shared, &peer, &link, &mut rx).await;
    if let Err(why) = result {
        if link.is_live() && !shared.closed.is_set() {
            link.protocol_close(&why);
        }
    }
    // `rx` is dropped only now, after the connection is closed, so a request
    // never finds the link open with its queue gone.
    drop(rx);
}

async fn write_wal(
    shared: &Arc<Shared>,
    peer: &PeerState,
    link: &Arc<Link>,
    rx: &mut mpsc::Receiver<WalJob>,
) -> Result<(), String> {
    let first = tokio::select! {
        j = rx.recv() => j,
        _ = link.conn.closed() => None,
        () = shared.closed.wait() => None,
    };
    let Some(first) = first else {
        return Ok(());
    };
    // Every link kept before this one must have answered its WAL requests (or
    // ended) first, or the peer could see two WAL streams at once and handle
    // a later request before an earlier one. Once that holds it keeps holding:
    // those links get no new WAL requests (only the kept link does, and a link
    // is kept once), so waiting before the first write covers every later one.
    if !wait_for_earlier_links(shared, peer, link).await {
        return Ok(());
    }
    let (mut send, recv) = link
        .conn
        .open_bi()
        .await
        .map_err(|e| format!("cannot open the WAL stream: {e}"))?;
    send.write_all(&[STREAM_WAL])
        .await
        .map_err(|e| format!("cannot start the WAL stream: {e}"))?;
    let awaiting: Arc<Mutex<VecDeque<Awaiting>>> = Arc::default();
    tokio::spawn(wal_reader(
        shared.clone(),
        link.clone(),
        recv,
        awaiting.clone(),
    ));
    let mut chunks: Vec<Bytes> = Vec::with_capacity(MAX_COALESCE);
    let mut next = Some(first);
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => tokio::select! {
                j = rx.recv() => match j {
                    Some(j) => j,
                    None => break,
                },
                _ = link.conn.closed() => break,
            },
        };
        {
            let mut waiting = awaiting.lock();
            let mut job = Some(job);
            while let Some(j) = job.take() {
                chunks.push(Bytes::from(j.frame));
                waiting.push_back(Awaiting {
                    reply: j.reply,
                    _slot: j.slot,
                    _count: j.count,
                });
                if chunks.len() < MAX_COALESCE {
                    job = rx.try_recv().ok();
                }
            }
        }
        if let Err(e) = send.write_all_chunks(&mut chunks).await {
            awaiting.lock().clear();
            return Err(format!("WAL stream write failed: {e}"));
        }
        chunks.clear();
    }
    let _ = send.finish();
    Ok(())
}

/// Waits until no other open link of `peer` that was kept before `link` has
/// WAL requests of this node queued or awaiting an answer. False if `link` or
/// the transport closed meanwhile.
async fn wait_for_earlier_links(shared: &Shared, peer: &PeerState, link: &Arc<Link>) -> bool {
    let mine = match link.kept_since.load(Ordering::SeqCst) {
        0 => u64::MAX,
        k => k,
    };
    loop {
        let idle = peer.wal_idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        let blocker = {
            let links = peer.links.lock();
            links
                .all
                .iter()
                .find(|l| {
                    let since = l.kept_since.load(Ordering::SeqCst);
                    !Arc::ptr_eq(l, link)
                        && since != 0
                        && since < mine
                        && l.is_live()
                        && l.wal_outstanding.load(Ordering::SeqCst) > 0
                })
                .cloned()
        };
        let Some(blocker) = blocker else {
            return true;
        };
        tokio::select! {
            () = &mut idle => {}
            _ = blocker.conn.closed() => {}
            _ = link.conn.closed() => return false,
            () = shared.closed.wait() => return false,
        }
    }
}

/// Reads WAL responses in order and hands each to the oldest waiting request.
/// The peer ends its side of the WAL stream only when the connection ends, so
/// if it ends (or fails) while the connection is open, closes the connection:
/// later requests would wait for answers that never come.
async fn wal_reader(
    shared: Arc<Shared>,
    link: Arc<Link>,
    recv: quinn::RecvStream,
    awaiting: Arc<Mutex<VecDeque<Awaiting>>>,
) {
    let mut recv = BufReader::with_capacity(READ_BUFFER, recv);
    loop {
        match link.read(&shared, &mut recv, Channel::Wal).await {
            Ok(Some(frame)) => {
                let waiting = awaiting.lock().pop_front();
                match waiting {
                    // The caller may have given up; the order is kept regardless.
                    Some(w) => {
                        let _ = w.reply.send(frame.body);
                    }
                    None => {
                        link.protocol_close("unsolicited WAL response");
                        break;
                    }
                }
            }
            Ok(None) => {
                if link.is_live() && !shared.closed.is_set() {
                    link.protocol_close("the peer ended the WAL stream");
                }
                break;
            }
            Err(FrameError::Io(e)) => {
                if link.is_live() && !shared.closed.is_set() {
                    link.protocol_close(&format!("the WAL stream failed: {e}"));
                }
                break;
            }
            Err(e) => {
                link.protocol_close(&format!("bad WAL response frame: {e}"));
                break;
            }
        }
    }
    awaiting.lock().clear();
}

pub(super) async fn serve_wal(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    // Each request is handed to the node as it arrives (in order), so batches
    // that arrive together are appended and made durable together; the answers
    // leave in the same order, each once it is ready. At most `WAL_WINDOW`
    // requests wait for their answers.
    // Each request keeps its share of the connection's read budget until its
    // answer is written.
    let (tx, mut rx) = mpsc::channel::<(Dispatched, BudgetPermit)>(WAL_WINDOW);
    let (rshared, rlink) = (shared.clone(), link.clone());
    let reader = tokio::spawn(async move {
        let mut recv = BufReader::with_capacity(READ_BUFFER, recv);
        while let Some((request, budget)) =
            read_request(&rshared, &rlink, &mut recv, Channel::Wal).await
        {
            let permit = match tx.reserve().await {
                Ok(permit) => permit,
                Err(_) => break,
            };
            permit.send((rshared.inbound.dispatch(rlink.peer, request), budget));
        }
    });
    while let Some((dispatched, _budget)) = rx.recv().await {
        let Some(response) = shared.inbound.answer(dispatched).await else {
            let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
            break;
        };
        let frame = match encode_response(&response, shared.opts.net.max_frame) {
            Ok(f) => f,
            Err(e) => {
                link.protocol_close(&format!("cannot encode a response: {e}"));
                break;
            }
        };
        if let Err(e) = send.write_chunk(Bytes::from(frame)).await {
            tracing::debug!(peer = %link.peer, "WAL response write failed: {e}");
            break;
        }
    }
    reader.abort();
}
