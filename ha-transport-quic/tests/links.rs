//! Connection management: one connection per peer pair after simultaneous
//! dials, background reconnection, and the bound on queued WAL requests.
//!
//! Nothing here sleeps to wait for something to happen. Over real UDP the only
//! way to see a connection settle or come back without making a call is to look
//! at its status, so a few checks poll a condition in a loop bounded in count
//! and time ([`eventually`]); the assertion is always on the condition itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo, heartbeat, identity, join_all, loopback, node, node_with, wal_batch};
use ha_core::error::TransportError;
use ha_core::message::{Envelope, Request, Response};
use ha_core::testkit::conformance::HarnessNode;
use ha_core::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use ha_core::types::NodeId;
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_transport_quic::{QuicConnection, QuicOptions, QuicTransport};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Semaphore};

const LIMIT: Duration = Duration::from_secs(10);
const CALL: Duration = Duration::from_secs(10);

/// Polls `cond` every few milliseconds, at most `limit` long and 2000 times;
/// true if it held.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    for _ in 0..2000 {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

fn identities(ca: &CertificateAuthority, n: u64) -> Vec<Identity> {
    (1..=n)
        .map(|id| identity(ca, &NodeCertSpec::new(NodeId(id), 1)))
        .collect()
}

/// Echoes heartbeats and acks WAL batches, recording the WAL request ids in
/// the order the handler saw them.
struct Recording {
    me: NodeId,
    wal: Arc<Mutex<Vec<u64>>>,
}

impl RequestHandler for Recording {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        if matches!(req.body, Request::WalBatch(_)) {
            self.wal.lock().push(req.request_id);
        }
        common::Echo(self.me).handle(peer, req)
    }
}

/// A burst of calls from `conn`: WAL batches and heartbeats interleaved, all
/// invoked before any is awaited. Returns the errors.
async fn burst(conn: &QuicConnection, from: NodeId, to: NodeId, first_id: u64) -> Vec<String> {
    let calls: Vec<_> = (0..16u64)
        .map(|i| {
            let id = first_id + i;
            let req = if i % 2 == 0 {
                wal_batch(from, to, id)
            } else {
                heartbeat(from, to, id)
            };
            conn.call(req, CALL)
        })
        .collect();
    let mut errors = Vec::new();
    for r in join_all(calls).await {
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    }
    errors
}

/// Both nodes dial each other at the same moment and call each other at once,
/// many rounds, which often creates a duplicate connection; afterwards both
/// nodes keep the one dialed by node 1, exactly one connection is open, no call
/// failed and WAL requests arrived in call order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_settle_on_one_connection_without_failing_calls() {
    let ca = CertificateAuthority::generate("dedup", 1).unwrap();
    let ids = identities(&ca, 2);
    let members = [NodeId(1), NodeId(2)];
    for round in 0..12u64 {
        let a = node(&ids[0], &members);
        let b = node(&ids[1], &members);
        let (a_wal, b_wal) = (Arc::default(), Arc::default());
        a.transport
            .listen(Arc::new(Recording {
                me: NodeId(1),
                wal: Arc::clone(&a_wal),
            }))
            .await
            .unwrap();
        b.transport
            .listen(Arc::new(Recording {
                me: NodeId(2),
                wal: Arc::clone(&b_wal),
            }))
            .await
            .unwrap();
        let side = |me: &HarnessNode<QuicTransport>, other: &HarnessNode<QuicTransport>| {
            let (t, m) = (me.transport.clone(), other.member.clone());
            let (from, to) = (me.member.id, other.member.id);
            async move {
                let conn = t.connect(&m).await.unwrap();
                let mut errors = Vec::new();
                for k in 0..4 {
                    errors.extend(burst(&conn, from, to, 1 + k * 16).await);
                }
                (conn, errors)
            }
        };
        let ((ab, ab_errors), (ba, ba_errors)) =
            tokio::time::timeout(LIMIT, async { tokio::join!(side(&a, &b), side(&b, &a)) })
                .await
                .expect("the calls of a round finish");
        assert!(
            ab_errors.is_empty(),
            "round {round}: 1->2 calls failed: {ab_errors:?}"
        );
        assert!(
            ba_errors.is_empty(),
            "round {round}: 2->1 calls failed: {ba_errors:?}"
        );

        let settled = eventually(LIMIT, || {
            a.transport.live_connections(NodeId(2)) == 1
                && b.transport.live_connections(NodeId(1)) == 1
        })
        .await;
        assert!(
            settled,
            "round {round}: still {} and {} connections",
            a.transport.live_connections(NodeId(2)),
            b.transport.live_connections(NodeId(1))
        );
        assert_eq!(a.transport.connection_dialers(NodeId(2)), vec![NodeId(1)]);
        assert_eq!(b.transport.connection_dialers(NodeId(1)), vec![NodeId(1)]);
        // When both dials happened, both nodes retired node 2's.
        let retired = a.transport.superseded_connections();
        assert!(retired <= 1, "round {round}: node 1 retired {retired}");
        assert_eq!(
            b.transport.superseded_connections(),
            retired,
            "round {round}: both nodes retire the same connection"
        );
        // WAL requests (even ids) arrived in call order, each once.
        let want: Vec<u64> = (0..64u64).filter(|i| i % 2 == 0).map(|i| i + 1).collect();
        assert_eq!(*b_wal.lock(), want, "round {round}: WAL order at node 2");
        assert_eq!(*a_wal.lock(), want, "round {round}: WAL order at node 1");

        // The kept connection carries on, both ways.
        assert!(burst(&ab, NodeId(1), NodeId(2), 1000).await.is_empty());
        assert!(burst(&ba, NodeId(2), NodeId(1), 1000).await.is_empty());
        assert_eq!(a.transport.live_connections(NodeId(2)), 1);
        a.transport.close().await;
        b.transport.close().await;
    }
    // Whether a round has a duplicate depends on scheduling; the duplicate is
    // created on purpose, in both orders, by `duplicate_connection_in_either_order_settles`.
}

/// A new transport on `addr` (its port may take a moment to be released by
/// the previous owner).
async fn rebind(
    identity: &Identity,
    members: &[NodeId],
    addr: std::net::SocketAddr,
) -> QuicTransport {
    let start = Instant::now();
    for _ in 0..500 {
        match QuicTransport::new(identity, QuicOptions::new(addr, members.to_vec())) {
            Ok(t) => return t,
            Err(_) if start.elapsed() < LIMIT => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
    panic!("cannot bind {addr} again");
}

/// The peer restarts on the same address: the connection comes back by itself,
/// without any call being made, and the reconnect task ends at close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_in_the_background_after_the_peer_restarts() {
    let ca = CertificateAuthority::generate("reconnect", 1).unwrap();
    let ids = identities(&ca, 2);
    let members = [NodeId(1), NodeId(2)];
    let a = node(&ids[0], &members);
    let b = node(&ids[1], &members);
    b.transport.listen(echo(NodeId(2))).await.unwrap();
    let conn = a.transport.connect(&b.member).await.unwrap();
    conn.call(heartbeat(NodeId(1), NodeId(2), 1), CALL)
        .await
        .unwrap();
    assert_eq!(a.transport.reconnect_tasks(), 1);

    let addr = b.transport.local_addr().unwrap();
    b.transport.close().await;
    drop(b);
    assert!(
        eventually(LIMIT, || !conn.is_connected()).await,
        "the lost connection is noticed"
    );

    let restarted = rebind(&ids[1], &members, addr).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    restarted
        .listen(Arc::new(Recording {
            me: NodeId(2),
            wal: Arc::clone(&seen),
        }))
        .await
        .unwrap();
    assert!(
        eventually(LIMIT, || conn.is_connected()).await,
        "the connection came back without a call"
    );
    // The dialer's handshake may finish before the restarted node registers
    // the connection.
    assert!(
        eventually(LIMIT, || restarted.live_connections(NodeId(1)) == 1).await,
        "the restarted node has {} connections",
        restarted.live_connections(NodeId(1))
    );
    // The first call after the restart finds the connection open.
    let b2 = wal_batch(NodeId(1), NodeId(2), 7);
    conn.call(b2, CALL).await.unwrap();
    assert_eq!(*seen.lock(), vec![7]);

    tokio::time::timeout(LIMIT, a.transport.close())
        .await
        .expect("close is prompt");
    assert_eq!(
        a.transport.reconnect_tasks(),
        0,
        "no reconnect task is left"
    );
    tokio::time::timeout(LIMIT, a.transport.close())
        .await
        .expect("a second close is prompt");
    restarted.close().await;
}

/// While the peer is down the reconnect task keeps dialing; closing the
/// transport stops it at once, and closing the last connection to the peer
/// stops it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_stops_on_close() {
    let ca = CertificateAuthority::generate("reconnect-stop", 1).unwrap();
    let ids = identities(&ca, 3);
    let members = [NodeId(1), NodeId(2), NodeId(3)];
    let mut opts = QuicOptions::new(loopback(), members.to_vec());
    opts.net.connect_timeout = Duration::from_secs(5);
    let a = node_with(&ids[0], opts);
    let b = node(&ids[1], &members);
    let c = node(&ids[2], &members);
    b.transport.listen(echo(NodeId(2))).await.unwrap();
    c.transport.listen(echo(NodeId(3))).await.unwrap();
    let to_b = a.transport.connect(&b.member).await.unwrap();
    let to_c = a.transport.connect(&c.member).await.unwrap();
    assert_eq!(a.transport.reconnect_tasks(), 2);

    // Closing the only connection to node 3 stops re-dialing it.
    to_c.close();
    assert!(
        eventually(LIMIT, || a.transport.reconnect_tasks() == 1).await,
        "the reconnect task of a closed connection ends"
    );

    // Node 2 goes away: the reconnect task is now dialing or backing off.
    b.transport.close().await;
    assert!(eventually(LIMIT, || !to_b.is_connected()).await);
    tokio::time::timeout(Duration::from_secs(2), a.transport.close())
        .await
        .expect("close does not wait for a dial in progress");
    assert_eq!(a.transport.reconnect_tasks(), 0);
    c.transport.close().await;
}

/// Counts WAL requests and answers each only once the test lets it.
struct Gated {
    me: NodeId,
    gate: Arc<Semaphore>,
    seen: mpsc::UnboundedSender<u64>,
}

impl RequestHandler for Gated {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        if !matches!(req.body, Request::WalBatch(_)) {
            return common::Echo(self.me).handle(peer, req);
        }
        let _ = self.seen.send(req.request_id);
        let (gate, me) = (self.gate.clone(), self.me);
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            common::Echo(me).handle(peer, req).await
        })
    }
}

/// With a window of 4, a fifth WAL call waits (and times out at its deadline)
/// instead of being queued; the waiting calls go out in call order once answers
/// free the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_window_bounds_queued_requests() {
    let ca = CertificateAuthority::generate("window", 1).unwrap();
    let ids = identities(&ca, 2);
    let members = [NodeId(1), NodeId(2)];
    let mut opts = QuicOptions::new(loopback(), members.to_vec());
    opts.net.wal_window = 4;
    let a = node_with(&ids[0], opts);
    let b = node(&ids[1], &members);
    let gate = Arc::new(Semaphore::new(0));
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    b.transport
        .listen(Arc::new(Gated {
            me: NodeId(2),
            gate: gate.clone(),
            seen: seen_tx,
        }))
        .await
        .unwrap();
    let conn = a.transport.connect(&b.member).await.unwrap();
    let peer = NodeId(2);
    // Connected first (a handle need not be), so the counts below are exact.
    conn.call(heartbeat(NodeId(1), peer, 100), CALL)
        .await
        .unwrap();

    // Ten calls, invoked in order: four fit the window, six wait in line.
    let (created_tx, created) = tokio::sync::oneshot::channel();
    let caller = conn.clone();
    let calls = tokio::spawn(async move {
        let calls: Vec<_> = (1..=10u64)
            .map(|id| caller.call(wal_batch(NodeId(1), peer, id), CALL))
            .collect();
        created_tx.send(()).unwrap();
        join_all(calls).await
    });
    tokio::time::timeout(LIMIT, created).await.unwrap().unwrap();
    // Nothing is answered before the gate opens, so these are exact.
    assert_eq!(a.transport.wal_in_flight(peer), 4);
    assert_eq!(a.transport.wal_waiting(peer), 6);
    let first = tokio::time::timeout(LIMIT, seen.recv()).await.unwrap();
    assert_eq!(first, Some(1));

    // A call with a short deadline cannot get in while the window is full.
    let late = conn
        .call(wal_batch(NodeId(1), peer, 11), Duration::from_millis(300))
        .await;
    assert_eq!(late.unwrap_err(), TransportError::Timeout(peer));
    assert_eq!(a.transport.wal_in_flight(peer), 4, "the bound holds");
    // Control calls do not use the window.
    conn.call(heartbeat(NodeId(1), peer, 12), CALL)
        .await
        .unwrap();

    gate.add_permits(10);
    let results = tokio::time::timeout(LIMIT, calls).await.unwrap().unwrap();
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().request_id, i as u64 + 1);
    }
    let mut order = vec![1];
    while let Ok(id) = seen.try_recv() {
        order.push(id);
    }
    assert_eq!(
        order,
        (1..=10).collect::<Vec<_>>(),
        "call order, without the timed-out call"
    );
    assert_eq!(a.transport.wal_in_flight(peer), 0);
    assert_eq!(a.transport.wal_waiting(peer), 0);
    a.transport.close().await;
    b.transport.close().await;
}

/// Records WAL request ids in arrival order, reports each to the test, and
/// answers WAL requests only once the gate lets it (others at once).
struct GatedRecording {
    me: NodeId,
    gate: Arc<Semaphore>,
    wal: Arc<Mutex<Vec<u64>>>,
    seen: mpsc::UnboundedSender<u64>,
}

impl RequestHandler for GatedRecording {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        if !matches!(req.body, Request::WalBatch(_)) {
            return common::Echo(self.me).handle(peer, req);
        }
        self.wal.lock().push(req.request_id);
        let _ = self.seen.send(req.request_id);
        let (gate, me) = (self.gate.clone(), self.me);
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            common::Echo(me).handle(peer, req).await
        })
    }
}

/// A listening node whose WAL answers wait for its gate.
struct GatedNode {
    node: HarnessNode<QuicTransport>,
    gate: Arc<Semaphore>,
    wal: Arc<Mutex<Vec<u64>>>,
    seen: mpsc::UnboundedReceiver<u64>,
}

async fn gated_node(identity: &Identity, opts: QuicOptions) -> GatedNode {
    let node = node_with(identity, opts);
    let gate = Arc::new(Semaphore::new(0));
    let wal = Arc::new(Mutex::new(Vec::new()));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    node.transport
        .listen(Arc::new(GatedRecording {
            me: node.member.id,
            gate: gate.clone(),
            wal: wal.clone(),
            seen: seen_tx,
        }))
        .await
        .unwrap();
    GatedNode {
        node,
        gate,
        wal,
        seen,
    }
}

type Results = Vec<Result<Envelope<Response>, TransportError>>;

/// Invokes `n` WAL calls with ids `first, first + 1, ...` in order, in a task
/// that awaits them; returns once all are invoked.
async fn start_wal(
    conn: &QuicConnection,
    from: NodeId,
    to: NodeId,
    first: u64,
    n: u64,
) -> tokio::task::JoinHandle<Results> {
    let (created_tx, created) = tokio::sync::oneshot::channel();
    let conn = conn.clone();
    let task = tokio::spawn(async move {
        let calls: Vec<_> = (first..first + n)
            .map(|id| conn.call(wal_batch(from, to, id), CALL))
            .collect();
        created_tx.send(()).unwrap();
        join_all(calls).await
    });
    tokio::time::timeout(LIMIT, created).await.unwrap().unwrap();
    task
}

/// The next WAL request id the node's handler sees.
async fn next_seen(n: &mut GatedNode) -> u64 {
    tokio::time::timeout(LIMIT, n.seen.recv())
        .await
        .expect("a WAL request reaches the handler")
        .expect("the handler is alive")
}

async fn all_ok(task: tokio::task::JoinHandle<Results>) -> Vec<u64> {
    let results = tokio::time::timeout(LIMIT, task)
        .await
        .expect("the calls finish")
        .unwrap();
    results
        .into_iter()
        .map(|r| r.expect("no call fails").request_id)
        .collect()
}

/// Two listening nodes 1 and 2 with gated WAL answers; `first` dials the
/// other, which then connects too (reusing that connection).
async fn pair(
    ca: &CertificateAuthority,
    first: usize,
    opts: impl Fn(NodeId) -> QuicOptions,
) -> ([GatedNode; 2], [QuicConnection; 2]) {
    let ids = identities(ca, 2);
    let a = gated_node(&ids[0], opts(NodeId(1))).await;
    let b = gated_node(&ids[1], opts(NodeId(2))).await;
    let nodes = [a, b];
    let second = 1 - first;
    let c_first = nodes[first]
        .node
        .transport
        .connect(&nodes[second].node.member)
        .await
        .unwrap();
    let first_id = nodes[first].node.member.id;
    assert!(
        eventually(LIMIT, || nodes[second]
            .node
            .transport
            .live_connections(first_id)
            == 1)
        .await,
        "the accepting node registers the connection"
    );
    let c_second = nodes[second]
        .node
        .transport
        .connect(&nodes[first].node.member)
        .await
        .unwrap();
    let conns = if first == 0 {
        [c_first, c_second]
    } else {
        [c_second, c_first]
    };
    for (i, n) in nodes.iter().enumerate() {
        let other = NodeId(2 - i as u64);
        assert_eq!(n.node.transport.connection_dialers(other), vec![first_id]);
    }
    (nodes, conns)
}

/// Waits until both nodes have exactly one open connection, dialed by node 1.
async fn settled_on_node_1(nodes: &[GatedNode; 2]) {
    let settled = eventually(LIMIT, || {
        nodes[0].node.transport.connection_dialers(NodeId(2)) == vec![NodeId(1)]
            && nodes[1].node.transport.connection_dialers(NodeId(1)) == vec![NodeId(1)]
    })
    .await;
    assert!(
        settled,
        "still {:?} and {:?}",
        nodes[0].node.transport.connection_dialers(NodeId(2)),
        nodes[1].node.transport.connection_dialers(NodeId(1))
    );
}

/// A duplicate connection made on purpose while WAL requests are outstanding on
/// the existing one, in both orders: node 2 dials while node 1's connection is
/// open, and node 1 dials while node 2's is open. Both nodes settle on the
/// connection dialed by node 1, one connection remains, no call fails, and
/// each handler saw the WAL requests in call order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_connection_in_either_order_settles() {
    let ca = CertificateAuthority::generate("dup-order", 1).unwrap();
    let members = vec![NodeId(1), NodeId(2)];
    for first in [0usize, 1] {
        let (mut nodes, conns) = pair(&ca, first, |_| {
            QuicOptions::new(loopback(), members.clone())
        })
        .await;
        let ids = [NodeId(1), NodeId(2)];
        // Phase 1: WAL requests both ways, held by the handlers.
        let mut p1 = Vec::new();
        for i in 0..2 {
            p1.push(start_wal(&conns[i], ids[i], ids[1 - i], 1, 8).await);
        }
        for n in nodes.iter_mut() {
            assert_eq!(next_seen(n).await, 1);
        }
        // The other node dials a second connection.
        let second = 1 - first;
        nodes[second]
            .node
            .transport
            .dial_new(&nodes[first].node.member)
            .await
            .unwrap();
        // Both nodes see the duplicate and retire one.
        assert!(
            eventually(LIMIT, || nodes.iter().all(|n| n
                .node
                .transport
                .superseded_connections()
                == 1))
            .await,
            "both nodes retire the duplicate"
        );
        // Phase 2: more WAL calls (on the kept connection) and heartbeats.
        let mut p2 = Vec::new();
        for i in 0..2 {
            p2.push(start_wal(&conns[i], ids[i], ids[1 - i], 9, 8).await);
        }
        for i in 0..2 {
            conns[i]
                .call(heartbeat(ids[i], ids[1 - i], 100), CALL)
                .await
                .unwrap();
        }
        for n in &nodes {
            n.gate.add_permits(1000);
        }
        for (t1, t2) in p1.into_iter().zip(p2) {
            assert_eq!(all_ok(t1).await, (1..=8).collect::<Vec<_>>());
            assert_eq!(all_ok(t2).await, (9..=16).collect::<Vec<_>>());
        }
        for n in &nodes {
            assert_eq!(
                *n.wal.lock(),
                (1..=16).collect::<Vec<_>>(),
                "WAL order at node {} (node {} dialed first)",
                n.node.member.id,
                ids[first]
            );
        }
        settled_on_node_1(&nodes).await;
        // The kept connection carries on, both ways.
        for i in 0..2 {
            let t = start_wal(&conns[i], ids[i], ids[1 - i], 17, 4).await;
            assert_eq!(all_ok(t).await, (17..=20).collect::<Vec<_>>());
        }
        for n in &nodes {
            n.node.transport.close().await;
        }
    }
}

/// A chain of duplicates: WAL requests held on node 2's connection A, then node
/// 1 dials B and, before anything goes on B, C. WAL requests sent on C must
/// still wait for A's answers, so the handler sees them in call order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_order_holds_across_a_chain_of_retired_connections() {
    let ca = CertificateAuthority::generate("chain", 1).unwrap();
    let members = vec![NodeId(1), NodeId(2)];
    let (mut nodes, conns) = pair(&ca, 1, |_| QuicOptions::new(loopback(), members.clone())).await;
    // Node 2's WAL requests 1..=8 on A, held by node 1's handler.
    let p1 = start_wal(&conns[1], NodeId(2), NodeId(1), 1, 8).await;
    assert_eq!(next_seen(&mut nodes[0]).await, 1);
    for k in 1..=2 {
        nodes[0]
            .node
            .transport
            .dial_new(&nodes[1].node.member)
            .await
            .unwrap();
        assert!(
            eventually(LIMIT, || nodes[1].node.transport.superseded_connections()
                == k)
            .await,
            "node 2 switches to node 1's connection number {k}"
        );
    }
    let p2 = start_wal(&conns[1], NodeId(2), NodeId(1), 9, 8).await;
    // A control round trip on C after the WAL calls went on it.
    conns[1]
        .call(heartbeat(NodeId(2), NodeId(1), 100), CALL)
        .await
        .unwrap();
    nodes[0].gate.add_permits(1000);
    assert_eq!(all_ok(p1).await, (1..=8).collect::<Vec<_>>());
    assert_eq!(all_ok(p2).await, (9..=16).collect::<Vec<_>>());
    assert_eq!(*nodes[0].wal.lock(), (1..=16).collect::<Vec<_>>());
    settled_on_node_1(&nodes).await;
    for n in &nodes {
        n.node.transport.close().await;
    }
}

/// A retired connection whose own WAL request is never answered is closed
/// after the drain timeout anyway (the request fails; later ones go on the
/// kept connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_is_bounded_by_the_drain_timeout() {
    let ca = CertificateAuthority::generate("drain", 1).unwrap();
    let members = vec![NodeId(1), NodeId(2)];
    let (mut nodes, conns) = pair(&ca, 1, |id| {
        let mut o = QuicOptions::new(loopback(), members.clone());
        // Node 1 would wait a minute for node 2 to retire the connection.
        o.drain_timeout = if id == NodeId(2) {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(60)
        };
        o
    })
    .await;
    // Node 2's WAL request on its own connection, never answered.
    let stuck = start_wal(&conns[1], NodeId(2), NodeId(1), 1, 1).await;
    assert_eq!(next_seen(&mut nodes[0]).await, 1);
    nodes[0]
        .node
        .transport
        .dial_new(&nodes[1].node.member)
        .await
        .unwrap();
    // Node 2 closes the retired connection after its drain timeout although
    // its request is unanswered; both nodes then have node 1's connection only.
    settled_on_node_1(&nodes).await;
    let r = tokio::time::timeout(LIMIT, stuck).await.unwrap().unwrap();
    assert!(
        matches!(r[0], Err(TransportError::Unreachable(..))),
        "{r:?}"
    );
    // The kept connection works (the handler answers the next request).
    nodes[0].gate.add_permits(1000);
    let t = start_wal(&conns[1], NodeId(2), NodeId(1), 2, 2).await;
    assert_eq!(all_ok(t).await, vec![2, 3]);
    for n in &nodes {
        n.node.transport.close().await;
    }
}

/// Node 1 dials node 2 before listening itself; node 2's WAL request on that
/// connection finds no handler, so node 1 ends the WAL stream. Node 2 must then
/// close the connection (not keep it open while treating it as dead), and
/// once node 1 listens both nodes agree on one connection that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_stream_closes_its_connection() {
    let ca = CertificateAuthority::generate("wal-fail", 1).unwrap();
    let ids = identities(&ca, 2);
    let members = [NodeId(1), NodeId(2)];
    let a = node(&ids[0], &members);
    let b = node(&ids[1], &members);
    b.transport.listen(echo(NodeId(2))).await.unwrap();
    // Node 1 dials without a user of the connection: nothing re-dials it.
    a.transport.dial_new(&b.member).await.unwrap();
    assert!(eventually(LIMIT, || b.transport.live_connections(NodeId(1)) == 1).await);
    let to_a = b.transport.connect(&a.member).await.unwrap();
    let r = to_a.call(wal_batch(NodeId(2), NodeId(1), 1), CALL).await;
    assert!(r.is_err(), "node 1 does not listen yet: {r:?}");
    // The connection is closed, on both sides.
    assert!(
        eventually(LIMIT, || a.transport.live_connections(NodeId(2)) == 0).await,
        "node 1's side of the connection is still open"
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    a.transport
        .listen(Arc::new(Recording {
            me: NodeId(1),
            wal: seen.clone(),
        }))
        .await
        .unwrap();
    let to_b = a.transport.connect(&b.member).await.unwrap();
    for id in 2..6 {
        to_a.call(wal_batch(NodeId(2), NodeId(1), id), CALL)
            .await
            .unwrap();
        to_b.call(heartbeat(NodeId(1), NodeId(2), id), CALL)
            .await
            .unwrap();
    }
    assert_eq!(*seen.lock(), vec![2, 3, 4, 5]);
    assert!(
        eventually(LIMIT, || a.transport.connection_dialers(NodeId(2))
            == b.transport.connection_dialers(NodeId(1))
            && a.transport.live_connections(NodeId(2)) == 1)
        .await,
        "{:?} / {:?}",
        a.transport.connection_dialers(NodeId(2)),
        b.transport.connection_dialers(NodeId(1))
    );
    a.transport.close().await;
    b.transport.close().await;
}
