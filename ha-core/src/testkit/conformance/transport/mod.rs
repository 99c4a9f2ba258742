//! The [`Transport`] conformance suite.
//!
//! The checks are listed in `transport_suite`; their shared helpers are in
//! `support.rs`.
//!
//! The checks never sleep to wait for something: they wait on channels, and use
//! timeouts only as upper bounds. They run on a current-thread or multi-thread
//! tokio runtime, in real time, or (for in-process transports) with paused time.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use crate::config::Member;
use crate::error::TransportError;
use crate::message::{Envelope, Request, Response, RpcError};
use crate::transport::{PeerConnection, PeerConnectionExt, RequestHandler, Transport};
use crate::types::NodeId;

mod support;
use self::support::*;

/// A transport under test and the record its peers use to reach it.
#[derive(Debug)]
pub struct HarnessNode<T> {
    /// How peers reach this node ([`Transport::connect`] takes it). It must be
    /// valid once the transport listens.
    pub member: Member,
    /// The transport, not yet listening.
    pub transport: T,
}

/// Builds transports for the transport suite.
///
/// Each check asks for a few fresh nodes with distinct ids, connected to each
/// other's [`HarnessNode::member`] records, and closes them when done. A transport
/// with real sockets binds loopback addresses (and issues certificates naming the
/// node ids); `member.addr` of a node that never listens must refuse or drop
/// connections.
pub trait TransportHarness: Send + Sync {
    /// The transport under test.
    type Transport: Transport;

    /// `n` fresh, unconnected, not yet listening nodes.
    fn nodes(&self, n: usize) -> impl Future<Output = Vec<HarnessNode<Self::Transport>>> + Send;
}

/// Deadline of calls that must succeed; only an upper bound.
const OK_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of calls that must time out.
const SHORT_DEADLINE: Duration = Duration::from_millis(200);
/// How much longer than its deadline a call, connect or close may take.
const SLACK: Duration = Duration::from_secs(2);

/// Runs every transport check, each on fresh nodes from `harness`.
pub async fn transport_suite<H: TransportHarness>(harness: &H) {
    check_round_trip(harness).await;
    check_error_response(harness).await;
    check_deadline(harness).await;
    check_unreachable_peer(harness).await;
    check_control_not_blocked_by_wal(harness).await;
    check_wal_order(harness).await;
    check_wal_order_by_call_time(harness).await;
    check_close(harness).await;
    check_connection_close(harness).await;
    check_peer_close(harness).await;
}

// ---- checks ----

/// A request as the handler saw it, with the authenticated caller.
type Seen = (NodeId, Envelope<Request>);

/// Every request kind makes the round trip: the handler sees it unchanged, with the
/// caller's authenticated id as `peer`, and the caller gets the handler's response
/// echoing the request id, from the callee, to the caller. Two clients call one
/// server, so `peer` must tell them apart.
pub async fn check_round_trip<H: TransportHarness>(harness: &H) {
    const C: &str = "round_trip";
    let nodes = nodes(C, harness, 3).await;
    let server = nodes[1].member.id;
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let h = handler(move |peer, req| {
        log.lock().push((peer, req.clone()));
        ready_response(answer(server, &req))
    });
    listen(C, &nodes[1], h).await;
    let mut sent = Vec::new();
    for client in [&nodes[0], &nodes[2]] {
        let me = client.member.id;
        let conn = connect(C, client, &nodes[1]).await;
        for (i, body) in every_request().into_iter().enumerate() {
            let request = envelope(me, server, 1000 * me.0 + i as u64, body);
            let kind = request.body.kind();
            let response = call_ok(C, &conn, request.clone()).await;
            assert_eq!(
                response.request_id, request.request_id,
                "[transport_suite::{C}] {kind} response must echo the request id"
            );
            assert_eq!(
                response.from, server,
                "[transport_suite::{C}] {kind} response must come from the callee"
            );
            assert_eq!(
                response.to, me,
                "[transport_suite::{C}] {kind} response must be addressed to the caller"
            );
            assert_eq!(
                response,
                answer(server, &request),
                "[transport_suite::{C}] {kind} response must arrive as the handler sent it"
            );
            sent.push((me, request));
        }
        // The typed helpers work over the transport too.
        let hb = Envelope {
            from: me,
            to: server,
            term: term_of(me),
            request_id: 7,
            body: heartbeat_body(),
        };
        let ack = match bounded(
            C,
            "send_heartbeat",
            OK_DEADLINE + SLACK,
            conn.send_heartbeat(hb.clone(), OK_DEADLINE),
        )
        .await
        {
            Ok(a) => a,
            Err(e) => panic!("[transport_suite::{C}] send_heartbeat failed: {e}"),
        };
        assert_eq!(
            ack.request_id, 7,
            "[transport_suite::{C}] send_heartbeat must echo the request id"
        );
        assert!(
            ack.body.accepted,
            "[transport_suite::{C}] send_heartbeat must return the handler's ack"
        );
        sent.push((
            me,
            Envelope {
                from: hb.from,
                to: hb.to,
                term: hb.term,
                request_id: 7,
                body: heartbeat(),
            },
        ));
    }
    let seen = seen.lock().clone();
    assert_eq!(
        seen.len(),
        sent.len(),
        "[transport_suite::{C}] the handler must see every request exactly once"
    );
    for ((peer, got), (caller, want)) in seen.iter().zip(&sent) {
        assert_eq!(
            peer, caller,
            "[transport_suite::{C}] the handler's `peer` must be the caller's authenticated id"
        );
        assert_eq!(
            got, want,
            "[transport_suite::{C}] the handler must see the request unchanged"
        );
    }
    close_all(C, &nodes).await;
}

/// A handler's [`Response::Error`] reaches the caller as a response, on both
/// channels.
pub async fn check_error_response<H: TransportHarness>(harness: &H) {
    const C: &str = "error_response";
    let nodes = nodes(C, harness, 2).await;
    let server = nodes[1].member.id;
    let h = handler(move |_, req: Envelope<Request>| {
        ready_response(Envelope {
            from: server,
            to: req.from,
            term: req.term,
            request_id: req.request_id,
            body: Response::Error(RpcError::Malformed(format!("refused {}", req.body.kind()))),
        })
    });
    listen(C, &nodes[1], h).await;
    let conn = connect(C, &nodes[0], &nodes[1]).await;
    let client = nodes[0].member.id;
    for (id, body) in [(1, heartbeat()), (2, wal_batch(1))] {
        let kind = body.kind();
        let response = call_ok(C, &conn, envelope(client, server, id, body)).await;
        assert_eq!(
            response.body,
            Response::Error(RpcError::Malformed(format!("refused {kind}"))),
            "[transport_suite::{C}] a {kind} handler's error must be delivered as Response::Error"
        );
        assert_eq!(
            response.request_id, id,
            "[transport_suite::{C}] an error response must echo the request id"
        );
    }
    close_all(C, &nodes).await;
}

/// A call whose handler never answers fails with [`TransportError::Timeout`] once
/// its deadline passes, on both channels.
pub async fn check_deadline<H: TransportHarness>(harness: &H) {
    const C: &str = "deadline";
    let nodes = nodes(C, harness, 2).await;
    listen(C, &nodes[1], handler(|_, _| never())).await;
    let conn = connect(C, &nodes[0], &nodes[1]).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    // Control first: the stuck WAL request would hold up later WAL requests.
    for (id, body) in [(1, heartbeat()), (2, wal_batch(1))] {
        let kind = body.kind();
        let what = format!("a {kind} call to a handler that never answers");
        let started = tokio::time::Instant::now();
        let result = bounded(
            C,
            &what,
            SHORT_DEADLINE + SLACK,
            conn.call(envelope(client, server, id, body), SHORT_DEADLINE),
        )
        .await;
        match result {
            Err(TransportError::Timeout(peer)) => {
                assert_eq!(
                    peer, server,
                    "[transport_suite::{C}] Timeout must name the peer"
                )
            }
            other => panic!("[transport_suite::{C}] {what} must fail with Timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() + Duration::from_millis(1) >= SHORT_DEADLINE / 2,
            "[transport_suite::{C}] {what} timed out long before its deadline"
        );
    }
    close_all(C, &nodes).await;
}

/// Connecting to, or calling, a node that does not listen fails with
/// [`TransportError::Unreachable`] or [`TransportError::Timeout`] instead of hanging.
pub async fn check_unreachable_peer<H: TransportHarness>(harness: &H) {
    const C: &str = "unreachable_peer";
    let nodes = nodes(C, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    let limit = OK_DEADLINE + SHORT_DEADLINE + SLACK;
    let outcome = bounded(
        C,
        "connect and call to a node that never listens",
        limit,
        async {
            match nodes[0].transport.connect(&nodes[1].member).await {
                Err(e) => Err(e),
                Ok(conn) => conn
                    .call(envelope(client, server, 1, heartbeat()), SHORT_DEADLINE)
                    .await
                    .map(|_| ()),
            }
        },
    )
    .await;
    match outcome {
        Err(e) if is_unreachable_or_timeout(&e) => {}
        other => panic!("[transport_suite::{C}] a node that never listens must be Unreachable or Timeout, got {other:?}"),
    }
    close_all(C, &nodes).await;
}

/// A heartbeat completes while a WAL request on the same connection is stuck in
/// its handler.
pub async fn check_control_not_blocked_by_wal<H: TransportHarness>(harness: &H) {
    const C: &str = "control_not_blocked_by_wal";
    let nodes = nodes(C, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let h = handler(move |_, req| {
        let response = answer(server, &req);
        if matches!(req.body, Request::WalBatch(_)) {
            let _ = started_tx.send(req.request_id);
            let gate = gate.clone();
            Box::pin(async move {
                gate.notified().await;
                response
            })
        } else {
            ready_response(response)
        }
    });
    listen(C, &nodes[1], h).await;
    let conn = Arc::new(connect(C, &nodes[0], &nodes[1]).await);
    let wal_conn = conn.clone();
    let wal = tokio::spawn(async move {
        wal_conn
            .call(envelope(client, server, 1, wal_batch(1)), OK_DEADLINE)
            .await
    });
    let got = bounded(
        C,
        "the WAL request reaching its handler",
        OK_DEADLINE,
        started_rx.recv(),
    )
    .await;
    assert_eq!(
        got,
        Some(1),
        "[transport_suite::{C}] the WAL handler must see the WAL request"
    );
    for (id, body) in [(2, heartbeat()), (3, pre_vote())] {
        let kind = body.kind();
        let response = call_ok(C, conn.as_ref(), envelope(client, server, id, body)).await;
        assert_eq!(
            response.request_id, id,
            "[transport_suite::{C}] the {kind} response must echo its request id"
        );
    }
    assert!(
        !wal.is_finished(),
        "[transport_suite::{C}] the stuck WAL call must still be waiting for its handler"
    );
    release.notify_one();
    let joined = bounded(C, "the released WAL call", OK_DEADLINE + SLACK, wal).await;
    match joined {
        Ok(Ok(r)) => assert_eq!(
            r.request_id, 1,
            "[transport_suite::{C}] the WAL response must echo its request id"
        ),
        Ok(Err(e)) => panic!("[transport_suite::{C}] the released WAL call failed: {e}"),
        Err(e) => panic!("[transport_suite::{C}] the WAL call task failed: {e}"),
    }
    close_all(C, &nodes).await;
}

/// Records the request ids of WAL requests as they are handed to the handler
/// (when `handle` is called: a handler queues a request there, so that is the
/// order the node sees).
fn recording(me: NodeId, seen: Arc<Mutex<Vec<u64>>>) -> Arc<dyn RequestHandler> {
    handler(move |_, req| {
        let response = answer(me, &req);
        if matches!(req.body, Request::WalBatch(_)) {
            seen.lock().push(req.request_id);
        }
        Box::pin(async move { response })
    })
}

async fn wal_order<H: TransportHarness>(check: &str, harness: &H, count: u64, reverse: bool) {
    let nodes = nodes(check, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    listen(check, &nodes[1], recording(server, seen.clone())).await;
    let conn = connect(check, &nodes[0], &nodes[1]).await;
    let calls: Vec<_> = (0..count)
        .map(|i| conn.call(envelope(client, server, 100 + i, wal_batch(i)), OK_DEADLINE))
        .collect();
    let what = format!("{count} pipelined WAL calls");
    let results = bounded(check, &what, OK_DEADLINE + SLACK, join_all(calls, reverse)).await;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(resp) => assert_eq!(
                resp.request_id,
                100 + i as u64,
                "[transport_suite::{check}] WAL call {i} got the response of another request"
            ),
            Err(e) => panic!("[transport_suite::{check}] WAL call {i} failed: {e}"),
        }
    }
    let want: Vec<u64> = (100..100 + count).collect();
    assert_eq!(
        *seen.lock(),
        want,
        "[transport_suite::{check}] the handler must see WAL requests of one connection in call order"
    );
    close_all(check, &nodes).await;
}

/// 100 WAL calls issued in order from one connection and awaited together reach
/// the handler (its futures start) in call order.
pub async fn check_wal_order<H: TransportHarness>(harness: &H) {
    wal_order("wal_order", harness, 100, false).await;
}

/// WAL calls are ordered by when `call` is invoked, not by when their futures are
/// first polled: 20 calls created in order and polled last-first still reach the
/// handler in call order (the contract in [`PeerConnection`]).
pub async fn check_wal_order_by_call_time<H: TransportHarness>(harness: &H) {
    wal_order("wal_order_by_call_time", harness, 20, true).await;
}

/// [`Transport::close`] is prompt and idempotent; it fails a call in flight at once,
/// and afterwards calls and connects fail with [`TransportError::Closed`].
pub async fn check_close<H: TransportHarness>(harness: &H) {
    const C: &str = "close";
    let nodes = nodes(C, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let h = handler(move |_, req| {
        if matches!(req.body, Request::WalBatch(_)) {
            let _ = started_tx.send(req.request_id);
            never()
        } else {
            ready_response(answer(server, &req))
        }
    });
    listen(C, &nodes[1], h).await;
    let conn = Arc::new(connect(C, &nodes[0], &nodes[1]).await);
    call_ok(C, conn.as_ref(), envelope(client, server, 1, heartbeat())).await;
    assert!(
        conn.is_connected(),
        "[transport_suite::{C}] a working connection must report is_connected"
    );

    let stuck_conn = conn.clone();
    let long = Duration::from_secs(60);
    let stuck = tokio::spawn(async move {
        stuck_conn
            .call(envelope(client, server, 2, wal_batch(1)), long)
            .await
    });
    let got = bounded(
        C,
        "the WAL request reaching its handler",
        OK_DEADLINE,
        started_rx.recv(),
    )
    .await;
    assert_eq!(
        got,
        Some(2),
        "[transport_suite::{C}] the WAL handler must see the WAL request"
    );

    bounded(C, "close", SLACK, nodes[0].transport.close()).await;
    bounded(C, "a second close", SLACK, nodes[0].transport.close()).await;
    match bounded(
        C,
        "a call in flight when its transport closed",
        SLACK,
        stuck,
    )
    .await
    {
        Ok(Err(TransportError::Closed | TransportError::Unreachable(..))) => {}
        Ok(other) => panic!(
            "[transport_suite::{C}] a call in flight at close must fail with Closed, got {other:?}"
        ),
        Err(e) => panic!("[transport_suite::{C}] the in-flight call task failed: {e}"),
    }
    assert!(
        !conn.is_connected(),
        "[transport_suite::{C}] a connection of a closed transport must not be connected"
    );
    match bounded(
        C,
        "a call after close",
        SLACK,
        conn.call(envelope(client, server, 3, heartbeat()), OK_DEADLINE),
    )
    .await
    {
        Err(TransportError::Closed) => {}
        other => {
            panic!("[transport_suite::{C}] a call after close must fail with Closed, got {other:?}")
        }
    }
    match bounded(
        C,
        "a connect after close",
        SLACK,
        nodes[0].transport.connect(&nodes[1].member),
    )
    .await
    {
        Err(TransportError::Closed) => {}
        Err(e) => {
            panic!("[transport_suite::{C}] a connect after close must fail with Closed, got {e}")
        }
        Ok(_) => panic!(
            "[transport_suite::{C}] a connect after close must fail with Closed, got a connection"
        ),
    }
    close_all(C, &nodes).await;
}

/// [`PeerConnection::close`] is idempotent; afterwards the connection is not
/// connected and its calls fail with [`TransportError::Closed`], while the
/// transport can still open a new connection.
pub async fn check_connection_close<H: TransportHarness>(harness: &H) {
    const C: &str = "connection_close";
    let nodes = nodes(C, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    listen(C, &nodes[1], answering(server)).await;
    let conn = connect(C, &nodes[0], &nodes[1]).await;
    call_ok(C, &conn, envelope(client, server, 1, heartbeat())).await;
    conn.close();
    conn.close();
    assert!(
        !conn.is_connected(),
        "[transport_suite::{C}] a closed connection must not report is_connected"
    );
    for (id, body) in [(2, heartbeat()), (3, wal_batch(1))] {
        let kind = body.kind();
        let what = format!("a {kind} call on a closed connection");
        match bounded(
            C,
            &what,
            SLACK,
            conn.call(envelope(client, server, id, body), OK_DEADLINE),
        )
        .await
        {
            Err(TransportError::Closed) => {}
            other => panic!("[transport_suite::{C}] {what} must fail with Closed, got {other:?}"),
        }
    }
    let fresh = connect(C, &nodes[0], &nodes[1]).await;
    call_ok(C, &fresh, envelope(client, server, 4, heartbeat())).await;
    close_all(C, &nodes).await;
}

/// Once the callee closes its transport it receives nothing: calls to it fail
/// promptly (no hang) and its handler is not invoked again.
pub async fn check_peer_close<H: TransportHarness>(harness: &H) {
    const C: &str = "peer_close";
    let nodes = nodes(C, harness, 2).await;
    let (client, server) = (nodes[0].member.id, nodes[1].member.id);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let h = handler(move |_, req| {
        counter.fetch_add(1, Ordering::SeqCst);
        ready_response(answer(server, &req))
    });
    listen(C, &nodes[1], h).await;
    let conn = connect(C, &nodes[0], &nodes[1]).await;
    call_ok(C, &conn, envelope(client, server, 1, heartbeat())).await;
    bounded(C, "close of the callee", SLACK, nodes[1].transport.close()).await;
    bounded(
        C,
        "a second close of the callee",
        SLACK,
        nodes[1].transport.close(),
    )
    .await;
    let handled = calls.load(Ordering::SeqCst);
    for (id, body) in [(2, heartbeat()), (3, wal_batch(1))] {
        let kind = body.kind();
        let what = format!("a {kind} call to a closed peer");
        let result = bounded(
            C,
            &what,
            SHORT_DEADLINE + SLACK,
            conn.call(envelope(client, server, id, body), SHORT_DEADLINE),
        )
        .await;
        match result {
            Err(
                TransportError::Unreachable(..)
                | TransportError::Timeout(_)
                | TransportError::Closed,
            ) => {}
            other => panic!("[transport_suite::{C}] {what} must fail, got {other:?}"),
        }
    }
    let limit = OK_DEADLINE + SHORT_DEADLINE + SLACK;
    let again = bounded(C, "connect and call to a closed peer", limit, async {
        match nodes[0].transport.connect(&nodes[1].member).await {
            Err(e) => Err(e),
            Ok(c) => c
                .call(envelope(client, server, 4, heartbeat()), SHORT_DEADLINE)
                .await
                .map(|_| ()),
        }
    })
    .await;
    assert!(
        again.is_err(),
        "[transport_suite::{C}] a new connection to a closed peer must not deliver requests"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        handled,
        "[transport_suite::{C}] a closed transport's handler must not be invoked"
    );
    close_all(C, &nodes).await;
}
