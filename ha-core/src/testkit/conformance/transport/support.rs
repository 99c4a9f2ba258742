//! The transport suite's harness helpers: handlers, node set-up, bounded waits,
//! and requests of every kind with the answers the suite expects.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::error::TransportError;
use crate::message::{
    AckResult, Envelope, Fence, FenceAck, FloorAck, Heartbeat, HeartbeatAck, InstallSnapshot,
    Promote, PromoteAck, RaiseFloor, Request, Response, SnapshotAck, VoteRequest, VoteResponse,
    WalAck, WalBatch,
};
use crate::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use crate::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};

use super::{HarnessNode, TransportHarness, OK_DEADLINE, SLACK};

pub(super) type HandlerFn =
    dyn Fn(NodeId, Envelope<Request>) -> BoxFuture<Envelope<Response>> + Send + Sync;

pub(super) struct FnHandler(Box<HandlerFn>);

impl RequestHandler for FnHandler {
    fn handle(&self, peer: NodeId, request: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        (self.0)(peer, request)
    }
}

pub(super) fn handler(
    f: impl Fn(NodeId, Envelope<Request>) -> BoxFuture<Envelope<Response>> + Send + Sync + 'static,
) -> Arc<dyn RequestHandler> {
    Arc::new(FnHandler(Box::new(f)))
}

pub(super) fn ready_response(response: Envelope<Response>) -> BoxFuture<Envelope<Response>> {
    Box::pin(std::future::ready(response))
}

pub(super) fn never() -> BoxFuture<Envelope<Response>> {
    Box::pin(std::future::pending())
}

pub(super) async fn nodes<H: TransportHarness>(
    check: &str,
    harness: &H,
    n: usize,
) -> Vec<HarnessNode<H::Transport>> {
    let nodes = harness.nodes(n).await;
    assert_eq!(
        nodes.len(),
        n,
        "[transport_suite::{check}] the harness must build {n} nodes"
    );
    nodes
}

pub(super) async fn close_all<T: Transport>(check: &str, nodes: &[HarnessNode<T>]) {
    for n in nodes {
        bounded(check, "closing a transport", SLACK, n.transport.close()).await;
    }
}

/// Awaits `f`, failing the check if it takes longer than `limit`.
pub(super) async fn bounded<F: Future>(
    check: &str,
    what: &str,
    limit: Duration,
    f: F,
) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("[transport_suite::{check}] {what} did not finish within {limit:?}"),
    }
}

pub(super) async fn listen<T: Transport>(
    check: &str,
    node: &HarnessNode<T>,
    h: Arc<dyn RequestHandler>,
) {
    match bounded(check, "listen", SLACK, node.transport.listen(h)).await {
        Ok(()) => {}
        Err(e) => panic!(
            "[transport_suite::{check}] listen as {} failed: {e}",
            node.member.id
        ),
    }
}

pub(super) async fn connect<T: Transport>(
    check: &str,
    from: &HarnessNode<T>,
    to: &HarnessNode<T>,
) -> T::Conn {
    let what = format!("connect {} -> {}", from.member.id, to.member.id);
    match bounded(
        check,
        &what,
        OK_DEADLINE + SLACK,
        from.transport.connect(&to.member),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => panic!("[transport_suite::{check}] {what} failed: {e}"),
    }
}

pub(super) async fn call_ok<C: PeerConnection>(
    check: &str,
    conn: &C,
    request: Envelope<Request>,
) -> Envelope<Response> {
    let what = format!(
        "{} call with request id {}",
        request.body.kind(),
        request.request_id
    );
    match bounded(
        check,
        &what,
        OK_DEADLINE + SLACK,
        conn.call(request, OK_DEADLINE),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => panic!("[transport_suite::{check}] {what} failed: {e}"),
    }
}

pub(super) fn term_of(node: NodeId) -> Term {
    Term { number: 7, node }
}

pub(super) fn envelope(
    from: NodeId,
    to: NodeId,
    request_id: u64,
    body: Request,
) -> Envelope<Request> {
    Envelope {
        from,
        to,
        term: term_of(from),
        request_id,
        body,
    }
}

pub(super) fn heartbeat_body() -> Heartbeat {
    Heartbeat {
        commit: LogIndex(41),
        last: Position::new(term_of(NodeId(1)), LogIndex(42)),
    }
}

pub(super) fn heartbeat() -> Request {
    Request::Heartbeat(heartbeat_body())
}

pub(super) fn pre_vote() -> Request {
    let t = term_of(NodeId(1));
    Request::Vote(VoteRequest {
        pre_vote: true,
        campaign_term: t.next_for(NodeId(2)),
        last: Position::new(t, LogIndex(9)),
        transfer: false,
    })
}

pub(super) fn wal_batch(seq: u64) -> Request {
    let t = term_of(NodeId(1));
    let entries = vec![
        WalEntry::new(
            Position::new(t, LogIndex(seq + 1)),
            Payload::Command(Command(seq.to_le_bytes().to_vec())),
        ),
        WalEntry::noop(Position::new(t, LogIndex(seq + 2))),
    ];
    Request::WalBatch(WalBatch {
        prev: Position::new(t, LogIndex(seq)),
        entries,
        commit: LogIndex(seq),
    })
}

/// One request of every kind, with non-trivial contents.
pub(super) fn every_request() -> Vec<Request> {
    let t = term_of(NodeId(1));
    let p = |i: u64| Position::new(t, LogIndex(i));
    vec![
        wal_batch(10),
        Request::WalBatch(WalBatch {
            prev: p(12),
            entries: Vec::new(),
            commit: LogIndex(12),
        }),
        heartbeat(),
        Request::Fence(Fence {
            reason: "conformance fence \u{2014} step down".into(),
        }),
        pre_vote(),
        Request::Vote(VoteRequest {
            pre_vote: false,
            campaign_term: t.next_for(NodeId(2)),
            last: p(9),
            transfer: true,
        }),
        Request::Promote(Promote {
            reason: "switchover".into(),
            last: p(12),
        }),
        Request::RaiseFloor(RaiseFloor {
            floors: vec![(NodeId(1), p(5)), (NodeId(2), p(6))],
            commit: LogIndex(4),
            rewrite: true,
        }),
        Request::InstallSnapshot(InstallSnapshot {
            last_included: p(100),
            size: 1 << 20,
            offset: 128 * 1024,
            data: (0..64 * 1024u32).map(|i| (i % 251) as u8).collect(),
            done: false,
            commit: LogIndex(100),
            leader_last: p(120),
        }),
    ]
}

/// The suite's handler answer to `request` at node `me`: the right response kind,
/// echoing sender, request id and parts of the body.
pub(super) fn answer(me: NodeId, request: &Envelope<Request>) -> Envelope<Response> {
    let body = match &request.body {
        Request::WalBatch(b) => Response::WalAck(WalAck {
            batch_term: request.term,
            result: AckResult::Durable(b.entries.last().map(|e| e.position).unwrap_or(b.prev)),
            applied: b.commit,
        }),
        Request::Heartbeat(h) => Response::HeartbeatAck(HeartbeatAck {
            accepted: true,
            last: h.last,
            applied: h.commit,
            voter: true,
        }),
        Request::Fence(_) => Response::FenceAck(FenceAck { fenced: true }),
        Request::Vote(v) => Response::Vote(VoteResponse {
            campaign_term: v.campaign_term,
            granted: !v.pre_vote,
            pre_vote: v.pre_vote,
        }),
        Request::Promote(_) => Response::PromoteAck(PromoteAck { started: true }),
        Request::RaiseFloor(r) => Response::FloorAck(FloorAck {
            floors: r.floors.clone(),
            accepted: true,
        }),
        Request::InstallSnapshot(s) => Response::SnapshotAck(SnapshotAck {
            snapshot_term: s.last_included.term,
            installed: false,
            last: s.last_included,
            next_offset: Some(s.offset + s.data.len() as u64),
        }),
    };
    Envelope {
        from: me,
        to: request.from,
        term: term_of(me),
        request_id: request.request_id,
        body,
    }
}

/// A handler that answers everything with [`answer`].
pub(super) fn answering(me: NodeId) -> Arc<dyn RequestHandler> {
    handler(move |_, req| ready_response(answer(me, &req)))
}

pub(super) fn is_unreachable_or_timeout(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Unreachable(..) | TransportError::Timeout(_)
    )
}

/// Polls `futures` until all are ready, each round in creation order, or in reverse
/// order with `reverse`; returns their outputs in creation order.
pub(super) async fn join_all<F: Future>(futures: Vec<F>, reverse: bool) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let n = futures.len();
        let mut pending = false;
        for k in 0..n {
            let i = if reverse { n - 1 - k } else { k };
            if outputs[i].is_none() {
                match futures[i].as_mut().poll(cx) {
                    Poll::Ready(v) => outputs[i] = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(outputs.drain(..).flatten().collect())
        }
    })
    .await
}
