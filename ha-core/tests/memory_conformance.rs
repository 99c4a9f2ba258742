//! The conformance suites run against the in-memory implementations, plus focused
//! tests of `KvStateMachine` and of `MemNetwork`'s fault hooks.
#![cfg(feature = "testkit")]
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::Member;
use ha_core::log_store::LogStore;
use ha_core::message::{
    Envelope, Heartbeat, HeartbeatAck, InstallSnapshot, Request, Response, RpcError,
};
use ha_core::state_machine::{StateCapture, StateMachine};
use ha_core::testkit::conformance::{log_store_suite, transport_suite};
use ha_core::testkit::memory::{
    KvCommand, KvError, KvStateMachine, MemHarness, MemLogStore, MemNetwork, MemTransport,
    KV_ERROR_TAG,
};
use ha_core::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use ha_core::{
    Command, LogIndex, MemberKind, NodeId, Payload, Position, StorageError, Term, TransportError,
    WalEntry,
};

// ---- conformance ----

#[tokio::test]
async fn mem_log_store_passes_the_log_store_suite() {
    log_store_suite(MemLogStore::new, Some(&|s| s)).await;
}

#[tokio::test]
async fn mem_log_store_passes_without_reopen_too() {
    log_store_suite(MemLogStore::new, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_transport_passes_the_transport_suite() {
    transport_suite(&MemHarness).await;
}

#[tokio::test(start_paused = true)]
async fn mem_transport_passes_the_transport_suite_in_paused_time() {
    transport_suite(&MemHarness).await;
}

// ---- MemLogStore specifics ----

fn term(n: u64) -> Term {
    Term {
        number: n,
        node: NodeId(1),
    }
}

/// A position in term 1.
fn at(i: u64) -> Position {
    Position::new(term(1), LogIndex(i))
}

fn entry(t: u64, i: u64) -> WalEntry {
    WalEntry::new(
        Position::new(term(t), LogIndex(i)),
        Payload::Command(Command(vec![i as u8])),
    )
}

#[tokio::test]
async fn mem_log_store_refuses_what_only_a_buggy_caller_asks() {
    let s = MemLogStore::new();
    s.append(vec![entry(2, 1), entry(2, 2)]).await.unwrap();
    // A term going backwards.
    assert!(matches!(
        s.append(vec![entry(1, 3)]).await,
        Err(StorageError::Invalid(_))
    ));
    // Purging without a snapshot that covers it.
    assert!(matches!(
        s.purge_prefix(LogIndex(1)).await,
        Err(StorageError::Invalid(_))
    ));
    let empty = s
        .snapshot_writer(Position::new(term(2), LogIndex(1)))
        .unwrap()
        .finish()
        .unwrap();
    s.save_snapshot(empty).await.unwrap();
    // Truncating at or below the snapshot.
    assert!(matches!(
        s.truncate_suffix(LogIndex(1)).await,
        Err(StorageError::Invalid(_))
    ));
    s.purge_prefix(LogIndex(1)).await.unwrap();
    assert_eq!(s.entries(), vec![entry(2, 2)]);
    assert_eq!(s.last(), Position::new(term(2), LogIndex(2)));
    // Clones share the log.
    let clone = s.clone();
    clone.append(vec![entry(2, 3)]).await.unwrap();
    assert_eq!(s.state().entries, vec![entry(2, 2), entry(2, 3)]);
}

// ---- KvStateMachine ----

#[test]
fn kv_apply_query_and_outputs() {
    let mut sm = KvStateMachine::new();
    assert_eq!(sm.applied_index(), LogIndex::ZERO);

    let out = sm.apply(at(1), &KvCommand::put("a", "1"));
    assert_eq!(KvCommand::decode_output(&out), Ok(None));
    let out = sm.apply(at(2), &KvCommand::put("a", "2"));
    assert_eq!(KvCommand::decode_output(&out), Ok(Some(b"1".to_vec())));
    sm.apply_noop(at(3));
    let out = sm.apply(at(4), &KvCommand::put("b", "x"));
    assert_eq!(KvCommand::decode_output(&out), Ok(None));

    assert_eq!(
        KvCommand::decode_output(&sm.query(&KvCommand::query("a"))),
        Ok(Some(b"2".to_vec()))
    );
    assert_eq!(KvCommand::decode_output(&sm.query(b"missing")), Ok(None));
    assert_eq!(sm.get(b"b"), Some(&b"x"[..]));

    let out = sm.apply(at(5), &KvCommand::delete("a"));
    assert_eq!(KvCommand::decode_output(&out), Ok(Some(b"2".to_vec())));
    let out = sm.apply(at(6), &KvCommand::delete("a"));
    assert_eq!(KvCommand::decode_output(&out), Ok(None));
    assert_eq!(sm.applied_index(), LogIndex(6));
    assert_eq!(sm.len(), 1);

    assert_eq!(
        KvCommand::decode(&KvCommand::put("k", "v")),
        Ok(KvCommand::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec()
        })
    );
}

#[test]
fn kv_garbage_command_is_an_error_output_not_a_panic() {
    let mut sm = KvStateMachine::new();
    sm.apply(at(1), &KvCommand::put("a", "1"));
    for garbage in [
        vec![],
        vec![0xFF, 0xFF, 0xFF],
        vec![7, 1, 2],
        vec![0, 200, 1],
    ] {
        let before = sm.clone();
        let out = sm.apply(at(2), &Command(garbage.clone()));
        assert_eq!(out.first(), Some(&KV_ERROR_TAG), "garbage {garbage:?}");
        assert!(
            matches!(KvCommand::decode_output(&out), Err(KvError::Rejected(_))),
            "garbage {garbage:?} gave {out:?}"
        );
        assert_eq!(
            sm.data(),
            before.data(),
            "a refused command must not change the state"
        );
        assert_eq!(
            sm.applied_index(),
            LogIndex(2),
            "a refused command still counts as applied"
        );
    }
    // Trailing bytes after a valid command are refused too.
    let mut bytes = KvCommand::put("a", "2").0;
    bytes.push(0);
    assert!(KvCommand::decode(&Command(bytes)).is_err());
    assert!(matches!(
        KvCommand::decode_output(&[9, 9]),
        Err(KvError::Malformed(_))
    ));
}

#[test]
fn kv_snapshot_restore_roundtrip() {
    let mut sm = KvStateMachine::new();
    for i in 1..=20u64 {
        sm.apply(
            at(i),
            &KvCommand::put(format!("k{}", i % 7), format!("v{i}")),
        );
    }
    sm.apply(
        Position::new(term(2), LogIndex(21)),
        &KvCommand::delete("k3"),
    );
    assert_eq!(sm.fencing_term(), term(2));
    let at_21 = sm.clone();
    let capture = sm.capture();
    // Applied after the capture: the capture must not see it (it is serialized
    // off the engine task while later entries are applied).
    sm.apply(
        Position::new(term(2), LogIndex(22)),
        &KvCommand::put("k1", "after the capture"),
    );
    let mut snap = Vec::new();
    capture.write_to(&mut snap).unwrap();
    let sm = at_21;

    let mut other = KvStateMachine::new();
    other.apply(at(1), &KvCommand::put("stale", "x"));
    other.restore(LogIndex(21), &mut &snap[..]).unwrap();
    assert_eq!(other, sm);
    assert_eq!(other.applied_index(), LogIndex(21));
    assert_eq!(
        other.fencing_term(),
        term(2),
        "the snapshot keeps the token"
    );
    assert_eq!(KvCommand::decode_output(&other.query(b"k3")), Ok(None));

    // A snapshot restored at another index, or a corrupt one, is refused and
    // leaves the state alone.
    assert!(matches!(
        other.restore(LogIndex(20), &mut &snap[..]),
        Err(StorageError::Corrupt(_))
    ));
    assert!(matches!(
        other.restore(LogIndex(21), &mut &snap[..snap.len() - 1]),
        Err(StorageError::Corrupt(_))
    ));
    assert_eq!(other, sm);

    // The empty snapshot restores the initial state.
    other.restore(LogIndex::ZERO, &mut &[][..]).unwrap();
    assert_eq!(other, KvStateMachine::new());
}

#[test]
fn kv_reset_returns_to_the_empty_initial_state() {
    let mut sm = KvStateMachine::new();
    sm.apply(at(1), &KvCommand::put("a", "1"));
    sm.apply_noop(Position::new(term(2), LogIndex(2)));
    assert_eq!(sm.fencing_term(), term(2), "a no-op carries its term too");
    sm.reset();
    assert_eq!(sm, KvStateMachine::new());
    assert_eq!(sm.applied_index(), LogIndex::ZERO);
    assert_eq!(sm.fencing_term(), Term::ZERO);
    assert_eq!(KvCommand::decode_output(&sm.query(b"a")), Ok(None));
    // It applies from the start again.
    sm.apply(at(1), &KvCommand::put("b", "2"));
    assert_eq!(sm.applied_index(), LogIndex(1));
    assert_eq!(sm.len(), 1);
}

// ---- MemNetwork fault hooks ----

struct Echo {
    me: NodeId,
    calls: AtomicUsize,
}

impl RequestHandler for Echo {
    fn handle(&self, _peer: NodeId, request: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let body = Response::HeartbeatAck(HeartbeatAck {
            accepted: true,
            last: Position::ZERO,
            applied: LogIndex::ZERO,
            voter: true,
        });
        let resp = Envelope {
            from: self.me,
            to: request.from,
            term: request.term,
            request_id: request.request_id,
            body,
        };
        Box::pin(async move { resp })
    }
}

fn member(id: u64) -> Member {
    Member {
        id: NodeId(id),
        addr: format!("mem://n{id}"),
        kind: MemberKind::Data,
    }
}

fn hb(from: u64, to: u64, id: u64) -> Envelope<Request> {
    Envelope {
        from: NodeId(from),
        to: NodeId(to),
        term: Term::ZERO,
        request_id: id,
        body: Request::Heartbeat(Heartbeat {
            commit: LogIndex::ZERO,
            last: Position::ZERO,
        }),
    }
}

/// An empty WAL batch (the WAL channel) from `from` to `to`.
fn wal(from: u64, to: u64, id: u64) -> Envelope<Request> {
    Envelope {
        body: Request::WalBatch(ha_core::message::WalBatch {
            prev: Position::ZERO,
            entries: Vec::new(),
            commit: LogIndex::ZERO,
        }),
        ..hb(from, to, id)
    }
}

const D: Duration = Duration::from_millis(200);

async fn echo_node(net: &MemNetwork, id: u64) -> (MemTransport, Arc<Echo>) {
    let t = net.transport(NodeId(id));
    let echo = Arc::new(Echo {
        me: NodeId(id),
        calls: AtomicUsize::new(0),
    });
    t.listen(echo.clone()).await.unwrap();
    (t, echo)
}

#[tokio::test(start_paused = true)]
async fn cut_makes_calls_unreachable_and_heal_restores_them() {
    let net = MemNetwork::new();
    let (a, _) = echo_node(&net, 1).await;
    let (b, _) = echo_node(&net, 2).await;
    let ab = a.connect(&member(2)).await.unwrap();
    let ba = b.connect(&member(1)).await.unwrap();
    ab.call(hb(1, 2, 1), D).await.unwrap();

    net.cut(NodeId(1), NodeId(2));
    assert!(matches!(
        ab.call(hb(1, 2, 2), D).await,
        Err(TransportError::Unreachable(NodeId(2), _))
    ));
    assert!(matches!(
        ba.call(hb(2, 1, 3), D).await,
        Err(TransportError::Unreachable(NodeId(1), _))
    ));
    assert!(!ab.is_connected());
    // A handle made during the cut is fine (connect need not reach the peer);
    // its calls fail like the others.
    let during = a.connect(&member(2)).await.unwrap();
    assert!(matches!(
        during.call(hb(1, 2, 8), D).await,
        Err(TransportError::Unreachable(NodeId(2), _))
    ));

    net.heal(NodeId(2), NodeId(1));
    assert!(ab.is_connected());
    assert_eq!(ab.call(hb(1, 2, 4), D).await.unwrap().request_id, 4);
    assert_eq!(ba.call(hb(2, 1, 5), D).await.unwrap().request_id, 5);

    net.isolate(NodeId(2));
    assert!(matches!(
        ab.call(hb(1, 2, 6), D).await,
        Err(TransportError::Unreachable(..))
    ));
    net.heal_all();
    assert_eq!(ab.call(hb(1, 2, 7), D).await.unwrap().request_id, 7);
}

#[tokio::test(start_paused = true)]
async fn one_way_cut_drops_one_direction_only() {
    let net = MemNetwork::new();
    let (a, echo_a) = echo_node(&net, 1).await;
    let (b, echo_b) = echo_node(&net, 2).await;
    let ab = a.connect(&member(2)).await.unwrap();
    let ba = b.connect(&member(1)).await.unwrap();

    net.cut_one_way(NodeId(1), NodeId(2));
    // 1 -> 2 requests are refused at once and never reach 2.
    assert!(matches!(
        ab.call(hb(1, 2, 1), D).await,
        Err(TransportError::Unreachable(..))
    ));
    assert_eq!(echo_b.calls.load(Ordering::SeqCst), 0);
    // 2 -> 1 requests reach 1, but 1's response is lost: the caller times out.
    assert_eq!(
        ba.call(hb(2, 1, 2), D).await,
        Err(TransportError::Timeout(NodeId(1)))
    );
    assert_eq!(echo_a.calls.load(Ordering::SeqCst), 1);

    net.heal_one_way(NodeId(1), NodeId(2));
    assert_eq!(ab.call(hb(1, 2, 3), D).await.unwrap().request_id, 3);
    assert_eq!(ba.call(hb(2, 1, 4), D).await.unwrap().request_id, 4);
}

/// The transport owns reconnecting: a handle outlives its peer's restart and
/// reaches the new process; the old one hears nothing more.
#[tokio::test(start_paused = true)]
async fn a_handle_reaches_its_peer_again_after_a_restart() {
    let net = MemNetwork::new();
    let (a, _) = echo_node(&net, 1).await;
    let (_b, echo_b) = echo_node(&net, 2).await;
    let ab = a.connect(&member(2)).await.unwrap();
    ab.call(hb(1, 2, 1), D).await.unwrap();

    // A new process takes over node 2.
    let (_b2, echo_b2) = echo_node(&net, 2).await;
    ab.call(hb(1, 2, 2), D).await.unwrap();
    ab.call(wal(1, 2, 3), D).await.unwrap();
    assert!(ab.is_connected());
    assert_eq!(echo_b2.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        echo_b.calls.load(Ordering::SeqCst),
        1,
        "the old process heard nothing more"
    );
}

#[tokio::test(start_paused = true)]
async fn impostor_sender_and_wrong_responder_are_refused() {
    let net = MemNetwork::new();
    let (a, _) = echo_node(&net, 1).await;
    let (_b, echo_b) = echo_node(&net, 2).await;
    let ab = a.connect(&member(2)).await.unwrap();

    // Node 1 claims to be node 3: the transport answers NotAMember, the handler never runs.
    let resp = ab.call(hb(3, 2, 1), D).await.unwrap();
    assert_eq!(resp.body, Response::Error(RpcError::NotAMember));
    assert_eq!(resp.request_id, 1);
    assert_eq!(echo_b.calls.load(Ordering::SeqCst), 0);

    // A handler that answers with another request id, or as another node, is a
    // protocol violation.
    struct Liar;
    impl RequestHandler for Liar {
        fn handle(&self, _: NodeId, r: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
            let from = if r.request_id == 1 { r.to } else { NodeId(99) };
            let id = if r.request_id == 1 { 77 } else { r.request_id };
            let body = Response::Error(RpcError::ShuttingDown);
            Box::pin(async move {
                Envelope {
                    from,
                    to: r.from,
                    term: r.term,
                    request_id: id,
                    body,
                }
            })
        }
    }
    let c = net.transport(NodeId(3));
    c.listen(Arc::new(Liar)).await.unwrap();
    let ac = a.connect(&member(3)).await.unwrap();
    assert!(matches!(
        ac.call(hb(1, 3, 1), D).await,
        Err(TransportError::Protocol(NodeId(3), _))
    ));
    assert!(matches!(
        ac.call(hb(1, 3, 2), D).await,
        Err(TransportError::Protocol(NodeId(3), _))
    ));
}

#[tokio::test(start_paused = true)]
async fn frames_over_the_limit_are_protocol_errors() {
    let net = MemNetwork::with_max_frame_bytes(1024);
    let (a, _) = echo_node(&net, 1).await;
    let (_b, echo_b) = echo_node(&net, 2).await;
    let ab = a.connect(&member(2)).await.unwrap();
    let big = Envelope {
        from: NodeId(1),
        to: NodeId(2),
        term: Term::ZERO,
        request_id: 1,
        body: Request::InstallSnapshot(InstallSnapshot {
            last_included: Position::ZERO,
            size: 4096,
            offset: 0,
            data: vec![0; 4096],
            done: true,
            commit: LogIndex::ZERO,
            leader_last: Position::ZERO,
        }),
    };
    assert!(matches!(
        ab.call(big, D).await,
        Err(TransportError::Protocol(NodeId(2), _))
    ));
    assert_eq!(echo_b.calls.load(Ordering::SeqCst), 0);
    assert_eq!(ab.call(hb(1, 2, 2), D).await.unwrap().request_id, 2);
}

#[tokio::test(start_paused = true)]
async fn closed_transport_refuses_listen_and_leaves_the_network() {
    let net = MemNetwork::new();
    let (a, _) = echo_node(&net, 1).await;
    assert!(net.is_listening(NodeId(1)));
    a.close().await;
    a.close().await;
    assert!(a.is_closed());
    assert!(!net.is_listening(NodeId(1)));
    let echo = Arc::new(Echo {
        me: NodeId(1),
        calls: AtomicUsize::new(0),
    });
    assert_eq!(a.listen(echo).await, Err(TransportError::Closed));
}
