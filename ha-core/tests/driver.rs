//! The tokio driver ([`ha_core::driver::Node`]) over the in-memory transport, log
//! store and state machine of the test kit.
//!
//! Longer than 800 lines because it is one harness (the in-memory cluster, its
//! gated and failing stores, its shared state machines, at the top) with every
//! driver scenario that needs it; split it when a group of scenarios grows a
//! harness of its own.
//!
//! Every test runs on tokio's paused clock: timers are virtual and the runtime jumps
//! ahead whenever every task waits. Nothing sleeps to wait for a condition; tests
//! wait on the nodes' published status (a `watch`) with generous virtual deadlines.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use ha_core::driver::{Bootstrap, Node, NodeBuilder};
use ha_core::log_store::{LogStore, Snapshot, SnapshotWriter, StoredState};
use ha_core::state_machine::StateMachine;
use ha_core::testkit::memory::{
    KvCommand, KvStateMachine, MemConnection, MemLogStore, MemNetwork, MemTransport,
};
use ha_core::transport::{RequestHandler, Transport};
use ha_core::{
    Command, CommitMode, Config, Error, HardState, LogIndex, Member, MemberKind, NodeId, Position,
    PromoteOptions, ReadConsistency, Replicator, Role, StorageError, Term, TransportError,
    WalEntry,
};

const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const WITNESS: NodeId = NodeId(3);

/// A generous bound for anything the cluster should do "soon" (virtual time).
const T: Duration = Duration::from_secs(10);

type MemNode<L = MemLogStore, S = KvStateMachine> = Node<MemTransport, L, S>;

fn addr(id: NodeId) -> String {
    format!("mem://{id}")
}

fn kind_of(id: NodeId) -> MemberKind {
    if id == WITNESS {
        MemberKind::Witness
    } else {
        MemberKind::Data
    }
}

/// Two data nodes and a witness, LAN defaults.
fn config(id: NodeId) -> Config {
    let peers = [N1, N2, WITNESS]
        .into_iter()
        .filter(|m| *m != id)
        .map(|m| Member {
            id: m,
            addr: addr(m),
            kind: kind_of(m),
        })
        .collect();
    Config::new(id, kind_of(id), addr(id), peers)
}

fn node<L: LogStore>(
    net: &MemNetwork,
    id: NodeId,
    store: L,
    bootstrap: Bootstrap,
    tweak: &dyn Fn(&mut Config),
) -> MemNode<L> {
    node_with(net, id, store, KvStateMachine::new(), bootstrap, tweak)
}

fn node_with<L: LogStore, S: StateMachine>(
    net: &MemNetwork,
    id: NodeId,
    store: L,
    sm: S,
    bootstrap: Bootstrap,
    tweak: &dyn Fn(&mut Config),
) -> MemNode<L, S> {
    let mut cfg = config(id);
    tweak(&mut cfg);
    NodeBuilder::new(cfg)
        .transport(net.transport(id))
        .log_store(store)
        .state_machine(sm)
        .bootstrap(bootstrap)
        .seed(0x5EED ^ id.0)
        .build()
        .expect("valid config")
}

struct Cluster<L: LogStore = MemLogStore, S: StateMachine = KvStateMachine> {
    net: MemNetwork,
    nodes: Vec<MemNode<L, S>>,
}

impl Cluster<MemLogStore> {
    async fn start() -> Self {
        Self::start_with(|_| MemLogStore::new(), |_| {}).await
    }
}

impl<L: LogStore> Cluster<L> {
    async fn start_with(store: impl Fn(NodeId) -> L, tweak: impl Fn(&mut Config)) -> Self {
        Cluster::start_full(store, |_| KvStateMachine::new(), tweak).await
    }
}

impl<L: LogStore, S: StateMachine> Cluster<L, S> {
    async fn start_full(
        store: impl Fn(NodeId) -> L,
        sm: impl Fn(NodeId) -> S,
        tweak: impl Fn(&mut Config),
    ) -> Self {
        let net = MemNetwork::new();
        let mut nodes = Vec::new();
        for id in [N1, N2, WITNESS] {
            let n = node_with(&net, id, store(id), sm(id), Bootstrap::NewCluster, &tweak);
            n.start().await.expect("start");
            nodes.push(n);
        }
        Cluster { net, nodes }
    }

    fn get(&self, id: NodeId) -> &MemNode<L, S> {
        self.nodes
            .iter()
            .find(|n| n.node_id() == id)
            .expect("member")
    }

    fn data(&self) -> Vec<MemNode<L, S>> {
        vec![self.get(N1).clone(), self.get(N2).clone()]
    }

    /// Waits for a primary; returns it and the other data node.
    async fn primary(&self) -> (MemNode<L, S>, MemNode<L, S>) {
        let p = wait_until(
            &self.data(),
            |n| n.status().running && n.status().role == Role::Primary,
            "a primary",
        )
        .await;
        let s = self.get(other(p.node_id())).clone();
        (p, s)
    }

    async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await.expect("shutdown");
        }
    }
}

fn other(id: NodeId) -> NodeId {
    if id == N1 {
        N2
    } else {
        N1
    }
}

/// Resolves on every status change of any of `nodes`.
fn changes<T: Transport, L: LogStore, S: StateMachine>(
    nodes: &[Node<T, L, S>],
) -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    for n in nodes {
        let mut status = n.subscribe_status();
        let tx = tx.clone();
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// Waits (on the nodes' status watches, bounded by `T`) until one of `nodes`
/// satisfies `condition`.
async fn wait_until<T: Transport, L: LogStore, S: StateMachine>(
    nodes: &[Node<T, L, S>],
    condition: impl Fn(&Node<T, L, S>) -> bool,
    what: &str,
) -> Node<T, L, S> {
    let mut wake = changes(nodes);
    let found = tokio::time::timeout(T, async {
        loop {
            if let Some(n) = nodes.iter().find(|n| condition(n)) {
                return n.clone();
            }
            if wake.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    match found {
        Ok(n) => n,
        Err(_) => {
            let statuses: Vec<_> = nodes.iter().map(|n| (n.node_id(), n.status())).collect();
            panic!("timed out waiting for {what}: {statuses:#?}")
        }
    }
}

fn value(bytes: &[u8]) -> Option<Vec<u8>> {
    KvCommand::decode_output(bytes).expect("a kv output")
}

async fn get<T: Transport, L: LogStore, S: StateMachine>(
    n: &Node<T, L, S>,
    key: &str,
    consistency: ReadConsistency,
) -> Result<Option<Vec<u8>>, Error> {
    n.read(KvCommand::query(key), consistency, T)
        .await
        .map(|out| value(&out))
}

#[tokio::test(start_paused = true)]
async fn elects_a_primary_and_a_write_is_readable_on_both_data_nodes() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let leader = c
        .get(WITNESS)
        .wait_for_leader(T)
        .await
        .expect("the witness knows the primary");
    assert_eq!(leader, p.node_id());

    let first = p
        .apply(KvCommand::put("k", "v1"), T)
        .await
        .expect("write acknowledged");
    assert_eq!(
        first.term, first.position.term,
        "the ack's fencing token is the entry's term"
    );
    assert_eq!(first.term, p.term());
    assert_eq!(first.term.node, p.node_id(), "the term names its primary");
    assert_eq!(value(&first.output), None, "no previous value");

    let second = p
        .apply(KvCommand::put("k", "v2"), T)
        .await
        .expect("write acknowledged");
    assert_eq!(second.position.index, first.position.index.next());
    assert_eq!(
        value(&second.output),
        Some(b"v1".to_vec()),
        "the state machine's output reaches the client"
    );

    assert_eq!(
        get(&p, "k", ReadConsistency::Linearizable).await,
        Ok(Some(b"v2".to_vec()))
    );
    assert_eq!(
        get(&p, "missing", ReadConsistency::Linearizable).await,
        Ok(None)
    );

    // The standby applies once it learns the commit index; then a stale read sees it.
    let idx = second.position.index;
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= idx,
        "the standby to apply",
    )
    .await;
    assert_eq!(
        get(&s, "k", ReadConsistency::Stale).await,
        Ok(Some(b"v2".to_vec()))
    );
    assert_eq!(s.status().leader, Some(p.node_id()));
    assert_eq!(s.status().role, Role::Standby);

    // Linearizable reads are served only by the primary.
    match get(&s, "k", ReadConsistency::Linearizable).await {
        Err(Error::NotLeader { leader, .. }) => assert_eq!(leader, Some(p.node_id())),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    // The witness holds no data.
    assert!(matches!(
        get(c.get(WITNESS), "k", ReadConsistency::Stale).await,
        Err(Error::Rejected(_))
    ));

    assert!(p.is_leader() && !s.is_leader() && !c.get(WITNESS).is_leader());
    assert_eq!(p.leader_addr(), Some(addr(p.node_id())));
    assert_eq!(s.leader_addr(), Some(addr(p.node_id())));
    assert_eq!(s.leader_id(), Some(p.node_id()));
    let health = p.health();
    assert_eq!(health.role, Role::Primary);
    assert!(health.writable, "{health:?}");
    // A writable primary reports its lease, which never outlasts the failover
    // timeout; the standby holds none.
    assert!(
        health
            .lease_remaining
            .is_some_and(|d| !d.is_zero() && d < p.config().failover_timeout),
        "{health:?}"
    );
    assert_eq!(s.health().lease_remaining, None);
    assert!(health.peers.iter().all(|peer| peer.healthy), "{health:?}");
    assert_eq!(c.get(WITNESS).health().role, Role::Witness);

    let m = p.metrics();
    assert_eq!(m.writes_acked, 2);
    assert_eq!(m.reads_served, 2);
    assert!(m.role_changes >= 1);
    assert_eq!(s.metrics().stale_reads_served, 1);
    assert_eq!(m.discarded, 0);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_committed_together_and_concurrent_writes_all_succeed() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;

    let commands = (0..20)
        .map(|i| KvCommand::put(format!("b{i}"), "x"))
        .collect();
    let results = p.apply_batch(commands, T).await;
    let positions: Vec<Position> = results
        .into_iter()
        .map(|r| r.expect("batch write").position)
        .collect();
    assert!(
        positions
            .windows(2)
            .all(|w| w[1].index == w[0].index.next()),
        "{positions:?}"
    );

    let writers: Vec<_> = (0..50)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.apply(KvCommand::put(format!("c{i}"), "y"), T).await })
        })
        .collect();
    let mut indices = Vec::new();
    for w in writers {
        indices.push(
            w.await
                .expect("task")
                .expect("concurrent write")
                .position
                .index,
        );
    }
    indices.sort();
    indices.dedup();
    assert_eq!(indices.len(), 50, "every write has its own position");

    let last = *indices.last().expect("writes");
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= last,
        "the standby to apply",
    )
    .await;
    assert_eq!(
        get(&s, "c49", ReadConsistency::Stale).await,
        Ok(Some(b"y".to_vec()))
    );
    assert_eq!(p.metrics().writes_acked, 70);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn calls_before_start_are_not_ready_and_after_shutdown_closed() {
    let net = MemNetwork::new();
    let n = node(&net, N1, MemLogStore::new(), Bootstrap::NewCluster, &|_| {});
    let put = || KvCommand::put("k", "v");

    assert_eq!(n.apply(put(), T).await, Err(Error::NotReady));
    assert_eq!(
        n.apply_batch(vec![put(), put()], T).await,
        vec![Err(Error::NotReady), Err(Error::NotReady)]
    );
    assert_eq!(
        n.read(KvCommand::query("k"), ReadConsistency::Stale, T)
            .await,
        Err(Error::NotReady)
    );
    assert_eq!(n.wait_for_leader(T).await, Err(Error::NotReady));
    assert_eq!(
        n.promote(PromoteOptions::default()).await,
        Err(Error::NotReady)
    );
    assert_eq!(n.switchover(T).await, Err(Error::NotReady));
    assert!(!n.is_leader() && n.leader_id().is_none() && n.leader_addr().is_none());
    assert!(!n.is_running());
    assert_eq!(n.health().node_id, N1);
    assert_eq!(n.node_id(), N1);
    assert_eq!(n.mode(), ha_core::ReplicationMode::HotStandby);

    // A pause asked for before start is remembered.
    n.pause_auto_failover();
    n.start().await.expect("start");
    n.start().await.expect("start is idempotent");
    n.wait_status(|st| st.failover_paused, T)
        .await
        .expect("paused from the start");
    assert!(n.is_running());
    assert!(n.status().running);
    // Alone, it never learns of a primary.
    assert_eq!(
        n.wait_for_leader(Duration::from_secs(1)).await,
        Err(Error::Timeout)
    );

    n.shutdown().await.expect("shutdown");
    assert!(n.transport().is_closed());
    n.shutdown().await.expect("a second shutdown is Ok");
    assert_eq!(n.apply(put(), T).await, Err(Error::Closed));
    assert_eq!(
        n.apply_batch(vec![put()], T).await,
        vec![Err(Error::Closed)]
    );
    assert_eq!(
        n.read(KvCommand::query("k"), ReadConsistency::Stale, T)
            .await,
        Err(Error::Closed)
    );
    assert_eq!(n.wait_for_leader(T).await, Err(Error::Closed));
    assert_eq!(
        n.promote(PromoteOptions::default()).await,
        Err(Error::Closed)
    );
    assert_eq!(n.start().await, Err(Error::Closed));
    assert!(!n.status().running);
    assert!(!n.is_leader());

    // Shutting down a node that never started is fine too.
    let never = node(&net, N2, MemLogStore::new(), Bootstrap::NewCluster, &|_| {});
    never.shutdown().await.expect("shutdown before start");
    assert_eq!(never.start().await, Err(Error::Closed));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_config_is_rejected_naming_the_field() {
    let net = MemNetwork::new();
    let mut cfg = config(N1);
    cfg.heartbeat_interval = Duration::ZERO;
    let r = NodeBuilder::new(cfg)
        .transport(net.transport(N1))
        .log_store(MemLogStore::new())
        .state_machine(KvStateMachine::new())
        .bootstrap(Bootstrap::NewCluster)
        .seed(1)
        .build();
    match r {
        Err(Error::InvalidConfig(e)) => assert_eq!(e.field, "heartbeat_interval", "{e}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_fresh_store_is_bootstrapped_once_and_reused_as_is() {
    let net = MemNetwork::new();
    let store = MemLogStore::new();
    let n = node(&net, N1, store.clone(), Bootstrap::NewCluster, &|_| {});
    n.start().await.expect("start");
    assert_eq!(store.state().hard_state, Some(HardState::bootstrap()));
    n.shutdown().await.expect("shutdown");

    // A stored hard state wins over the bootstrap choice.
    let again = node(&net, N1, store.clone(), Bootstrap::JoinExisting, &|_| {});
    again.start().await.expect("restart");
    assert_eq!(store.state().hard_state, Some(HardState::bootstrap()));
    assert_eq!(again.status().role, Role::Standby);
    again.shutdown().await.expect("shutdown");

    let joining = MemLogStore::new();
    let j = node(&net, N2, joining.clone(), Bootstrap::JoinExisting, &|_| {});
    j.start().await.expect("start");
    assert_eq!(joining.state().hard_state, Some(HardState::joining()));
    assert_eq!(j.status().role, Role::Learner);
    j.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_write_to_the_standby_returns_not_leader_with_a_hint() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let pid = p.node_id();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().leader == Some(pid),
        "the standby to know the primary",
    )
    .await;
    match s.apply(KvCommand::put("k", "v"), T).await {
        Err(Error::NotLeader {
            leader,
            leader_addr,
        }) => {
            assert_eq!(leader, Some(pid));
            assert_eq!(leader_addr, Some(addr(pid)));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert!(matches!(
        c.get(WITNESS).apply(KvCommand::put("k", "v"), T).await,
        Err(Error::StandbyMode)
    ));
    assert_eq!(s.metrics().writes_acked, 0);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn killing_the_primary_fails_over_without_losing_an_acknowledged_write() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let ack = p
        .apply(KvCommand::put("k", "v"), T)
        .await
        .expect("write acknowledged");

    p.shutdown().await.expect("shutdown");
    assert!(!p.is_leader());
    let sid = s.node_id();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    assert!(s.term() > ack.term, "the new primary runs in a later term");
    assert_eq!(s.term().node, sid);
    assert_eq!(
        get(&s, "k", ReadConsistency::Linearizable).await,
        Ok(Some(b"v".to_vec())),
        "the acknowledged write survived"
    );

    // Alone with the witness it still commits (degraded sync through the floors).
    let next = s
        .apply(KvCommand::put("k2", "v2"), T)
        .await
        .expect("the new primary accepts writes");
    assert!(next.position > ack.position);
    assert_eq!(next.term, s.term());
    assert_eq!(c.get(WITNESS).wait_for_leader(T).await, Ok(sid));
    assert!(s.health().degraded, "{:?}", s.health());

    // The old primary restarts on its own store: it comes back as a standby of the
    // new primary and catches up, by itself.
    let old = p.node_id();
    let store = p.store().clone();
    let back = node(&c.net, old, store, Bootstrap::NewCluster, &|_| {});
    back.start().await.expect("restart");
    let idx = next.position.index;
    wait_until(
        std::slice::from_ref(&back),
        |n| n.status().leader == Some(sid) && n.status().applied_index >= idx,
        "the old primary to rejoin and catch up",
    )
    .await;
    assert_eq!(back.status().role, Role::Standby);
    assert_eq!(
        get(&back, "k2", ReadConsistency::Stale).await,
        Ok(Some(b"v2".to_vec()))
    );
    assert!(s.is_leader(), "still exactly one primary");
    back.shutdown().await.expect("shutdown");
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn switchover_moves_leadership_to_the_standby_without_losing_writes() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let results = p
        .apply_batch(
            (0..10)
                .map(|i| KvCommand::put(format!("k{i}"), "v"))
                .collect(),
            T,
        )
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let before = p.term();

    p.switchover(T).await.expect("switchover");
    let sid = s.node_id();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the target to lead",
    )
    .await;
    assert!(s.term() > before);
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().role == Role::Standby && n.status().leader == Some(sid),
        "the old primary to follow",
    )
    .await;
    for i in 0..10 {
        assert_eq!(
            get(&s, &format!("k{i}"), ReadConsistency::Linearizable).await,
            Ok(Some(b"v".to_vec()))
        );
    }
    match p.apply(KvCommand::put("late", "x"), T).await {
        Err(Error::NotLeader {
            leader,
            leader_addr,
        }) => {
            assert_eq!(leader, Some(sid));
            assert_eq!(leader_addr, Some(addr(sid)));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    let ack = s
        .apply(KvCommand::put("after", "x"), T)
        .await
        .expect("the new primary accepts writes");
    assert_eq!(ack.term, s.term());
    // Back again.
    s.switchover(T).await.expect("switchover back");
    let pid = p.node_id();
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().role == Role::Primary,
        "the first node to lead again",
    )
    .await;
    assert_eq!(
        get(&p, "after", ReadConsistency::Linearizable).await,
        Ok(Some(b"x".to_vec()))
    );
    assert_eq!(c.get(WITNESS).wait_for_leader(T).await, Ok(pid));
    // A switchover on a standby is refused.
    assert!(matches!(
        s.switchover(T).await,
        Err(Error::NotLeader { .. })
    ));
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn promote_while_the_primary_is_healthy_fails_instead_of_making_a_second_primary() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    let term = p.term();

    let err = s
        .promote(PromoteOptions::default())
        .await
        .expect_err("the witness and the primary refuse");
    assert!(
        matches!(err, Error::Rejected(_) | Error::Timeout),
        "{err:?}"
    );
    assert!(p.is_leader(), "the primary keeps leading");
    assert!(!s.is_leader(), "no second primary");
    assert_eq!(p.term(), term, "a refused pre-vote changes no term");
    assert_eq!(s.term(), term);
    p.apply(KvCommand::put("k", "v2"), T)
        .await
        .expect("the primary still accepts writes");

    // Promoting the primary is a no-op; the witness cannot be promoted.
    assert_eq!(p.promote(PromoteOptions::default()).await, Ok(()));
    assert!(matches!(
        c.get(WITNESS).promote(PromoteOptions::default()).await,
        Err(Error::Rejected(_))
    ));
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_paused_standby_does_not_take_over_until_resumed() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    s.pause_auto_failover();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().failover_paused,
        "the pause to apply",
    )
    .await;

    p.shutdown().await.expect("shutdown");
    let waited = s
        .wait_status(|st| st.role == Role::Primary, Duration::from_secs(3))
        .await;
    assert_eq!(
        waited,
        Err(Error::Timeout),
        "a paused standby does not campaign"
    );

    s.resume_auto_failover();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the resumed standby to take over",
    )
    .await;
    assert_eq!(
        get(&s, "k", ReadConsistency::Linearizable).await,
        Ok(Some(b"v".to_vec()))
    );
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_fails_a_pending_write_with_closed() {
    // Strict sync never commits without the standby, so a write waits.
    let c = Cluster::start_with(|_| MemLogStore::new(), |cfg| cfg.strict_sync = true).await;
    let (p, s) = c.primary().await;
    p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    c.net.cut(p.node_id(), s.node_id());

    let before = p.status().last_position.index;
    let pending = {
        let p = p.clone();
        tokio::spawn(async move { p.apply(KvCommand::put("k", "lost?"), T).await })
    };
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().last_position.index > before,
        "the write to be appended",
    )
    .await;
    p.shutdown().await.expect("shutdown");
    assert_eq!(pending.await.expect("task"), Err(Error::Closed));
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn snapshots_are_taken_and_a_lagging_standby_catches_up_through_one() {
    // Small chunks: the snapshot travels as dozens of them.
    let every = |cfg: &mut Config| {
        cfg.snapshot_every = 5;
        cfg.snapshot_chunk_bytes = 16;
    };
    // No retention: the primary purges everything its snapshots cover.
    let c = Cluster::start_with(|_| MemLogStore::with_retention(0), every).await;
    let (p, s) = c.primary().await;
    let mut last = LogIndex::ZERO;
    for i in 0..10 {
        last = p
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write")
            .position
            .index;
    }
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= last,
        "the standby to apply",
    )
    .await;
    // Serialized off the engine task, then saved: both nodes get there.
    for n in [&p, &s] {
        wait_until(
            std::slice::from_ref(n),
            |n| n.metrics().snapshots_taken >= 1,
            "a snapshot to be saved",
        )
        .await;
    }
    assert!(
        p.store().state().snapshot.is_some(),
        "the primary saved a snapshot"
    );

    // The standby stops; the primary goes on (degraded) far enough to compact what
    // the standby still needs.
    let sid = s.node_id();
    let store = s.store().clone();
    s.shutdown().await.expect("shutdown");
    for i in 10..60 {
        last = p
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write")
            .position
            .index;
    }
    let stale = store.last().index;
    // Snapshots are serialized off the engine task; the compaction follows the
    // save.
    wait_until(
        std::slice::from_ref(&p),
        |n| {
            let first = n.store().entries().first().map(|e| e.index());
            first.unwrap_or(last.next()) > stale.next()
        },
        "the primary to compact past the standby's log",
    )
    .await;

    let back = node(&c.net, sid, store.clone(), Bootstrap::NewCluster, &every);
    back.start().await.expect("restart");
    wait_until(
        std::slice::from_ref(&back),
        |n| n.status().applied_index >= last,
        "the standby to catch up",
    )
    .await;
    assert!(
        store
            .state()
            .snapshot
            .is_some_and(|snap| snap.last_included.index > stale),
        "it installed a snapshot"
    );
    assert_eq!(
        get(&back, "k0", ReadConsistency::Stale).await,
        Ok(Some(b"v0".to_vec()))
    );
    assert_eq!(
        get(&back, "k59", ReadConsistency::Stale).await,
        Ok(Some(b"v59".to_vec()))
    );
    assert!(
        back.metrics().snapshots_installed >= 1,
        "{:?}",
        back.metrics()
    );
    // It replicates synchronously again.
    let ack = p.apply(KvCommand::put("new", "x"), T).await.expect("write");
    wait_until(
        std::slice::from_ref(&back),
        |n| n.status().applied_index >= ack.position.index,
        "replication",
    )
    .await;
    back.shutdown().await.expect("shutdown");
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_wiped_standby_rejoins_with_an_empty_disk() {
    let every = |cfg: &mut Config| cfg.snapshot_every = 5;
    let c = Cluster::start_with(|_| MemLogStore::new(), every).await;
    let (p, s) = c.primary().await;
    let mut last = LogIndex::ZERO;
    for i in 0..30 {
        last = p
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write")
            .position
            .index;
    }
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= last,
        "the standby to apply",
    )
    .await;

    // The standby loses its disk and joins again with an empty one.
    let sid = s.node_id();
    s.shutdown().await.expect("shutdown");
    let fresh = MemLogStore::new();
    let rejoined = node(&c.net, sid, fresh.clone(), Bootstrap::JoinExisting, &every);
    rejoined.start().await.expect("start");
    assert_eq!(rejoined.status().role, Role::Learner);
    wait_until(
        std::slice::from_ref(&rejoined),
        |n| n.status().applied_index >= last && n.status().role == Role::Standby,
        "the wiped standby to catch up and vote again",
    )
    .await;
    assert_eq!(
        get(&rejoined, "k29", ReadConsistency::Stale).await,
        Ok(Some(b"v29".to_vec()))
    );
    rejoined.shutdown().await.expect("shutdown");
    c.shutdown().await;
}

/// A [`MemLogStore`] whose appends and hard-state writes can be made to fail.
#[derive(Clone, Default)]
struct FlakyStore {
    inner: MemLogStore,
    broken: Arc<AtomicBool>,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StorageError> {
        if self.broken.load(Ordering::SeqCst) {
            Err(StorageError::Io("injected disk failure".into()))
        } else {
            Ok(())
        }
    }
}

impl LogStore for FlakyStore {
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send {
        self.inner.load()
    }

    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let ok = self.check().map(|()| self.inner.append(entries));
        async move { ok?.await }
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send {
        self.inner.read(from, to, max_bytes)
    }

    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.truncate_suffix(from)
    }

    fn purge_prefix(
        &self,
        upto: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.purge_prefix(upto)
    }

    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let ok = self.check().map(|()| self.inner.save_hard_state(state));
        async move { ok?.await }
    }

    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.save_snapshot(snapshot)
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.install_snapshot(snapshot)
    }

    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        self.inner.snapshot_writer(at)
    }

    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        self.inner.snapshot_reader(snapshot)
    }

    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send {
        self.inner.read_snapshot(snapshot, offset, max_bytes)
    }

    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send {
        self.inner.last_position()
    }

    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        self.inner.purge_point(snapshot, keep_from)
    }
}

#[tokio::test(start_paused = true)]
async fn a_storage_failure_stops_the_node_and_fails_its_calls() {
    let c = Cluster::start_with(|_| FlakyStore::default(), |_| {}).await;
    let (p, s) = c.primary().await;
    let ack = p.apply(KvCommand::put("k", "v"), T).await.expect("write");

    p.store().broken.store(true, Ordering::SeqCst);
    match p.apply(KvCommand::put("k", "never"), T).await {
        Err(Error::Storage(msg)) => assert!(msg.contains("injected"), "{msg}"),
        other => panic!("expected a storage error, got {other:?}"),
    }
    assert!(!p.is_running());
    assert!(!p.is_leader());
    assert!(matches!(
        p.apply(KvCommand::put("k", "later"), T).await,
        Err(Error::Storage(_))
    ));
    assert!(matches!(
        p.read(KvCommand::query("k"), ReadConsistency::Stale, T)
            .await,
        Err(Error::Storage(_))
    ));
    assert!(matches!(p.wait_for_leader(T).await, Err(Error::Storage(_))));
    assert!(
        p.transport().is_closed(),
        "a failed node leaves the cluster"
    );

    // The standby takes over with the acknowledged write.
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    assert_eq!(
        get(&s, "k", ReadConsistency::Linearizable).await,
        Ok(Some(b"v".to_vec()))
    );
    assert!(s.term() > ack.term);

    p.shutdown().await.expect("shutdown after a failure");
    assert_eq!(
        p.apply(KvCommand::put("k", "x"), T).await,
        Err(Error::Closed)
    );
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_primary_steps_down_and_the_standby_takes_over() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    let (pid, sid) = (p.node_id(), s.node_id());

    c.net.isolate(pid);
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().role != Role::Primary,
        "the isolated primary to step down",
    )
    .await;
    let refused = p.apply(KvCommand::put("k", "split"), T).await;
    assert!(
        matches!(refused, Err(Error::NotLeader { .. })),
        "{refused:?}"
    );
    s.apply(KvCommand::put("k", "v2"), T)
        .await
        .expect("the new primary accepts writes");

    c.net.heal_all();
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().leader == Some(sid) && n.status().role == Role::Standby,
        "the old primary to rejoin",
    )
    .await;
    let idx = s.status().commit_index;
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().applied_index >= idx,
        "the old primary to catch up",
    )
    .await;
    assert_eq!(
        get(&p, "k", ReadConsistency::Stale).await,
        Ok(Some(b"v2".to_vec()))
    );
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_forced_promotion_needs_the_explicit_flag() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let ack = p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    s.pause_auto_failover();
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().failover_paused,
        "the pause to apply",
    )
    .await;
    p.shutdown().await.expect("shutdown");
    c.get(WITNESS).shutdown().await.expect("shutdown");

    // Without a majority an ordinary promotion cannot win.
    let err = s
        .promote(PromoteOptions::default())
        .await
        .expect_err("no majority");
    assert!(
        matches!(err, Error::Timeout | Error::Rejected(_)),
        "{err:?}"
    );
    assert!(!s.is_leader());

    s.promote(PromoteOptions {
        force_without_quorum_may_lose_data: true,
    })
    .await
    .expect("forced promotion");
    assert!(s.is_leader());
    assert!(s.term() > ack.term);
    assert_eq!(
        s.term().node,
        s.node_id(),
        "the forced term names its primary"
    );
    let next = s
        .apply(KvCommand::put("k2", "v2"), T)
        .await
        .expect("a forced primary accepts writes");
    assert!(next.position > ack.position);
    assert_eq!(
        get(&s, "k", ReadConsistency::Linearizable).await,
        Ok(Some(b"v".to_vec()))
    );
    c.shutdown().await;
}

/// The same driver on a multi-threaded runtime and the real clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_real_time_and_several_threads_a_write_survives_failover() {
    let c = Cluster::start().await;
    let (p, s) = c.primary().await;
    let results = p
        .apply_batch(
            (0..20)
                .map(|i| KvCommand::put(format!("k{i}"), "v"))
                .collect(),
            T,
        )
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // On a loaded machine the primary may commit these through the witness
    // (degraded sync) before the standby has them; the standby is then rightly
    // barred from taking over. Wait for it to hold them first.
    let last = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|a| a.position.index)
        .max()
        .expect("writes");
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().last_position.index >= last,
        "the standby to receive the writes",
    )
    .await;
    p.shutdown().await.expect("shutdown");
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    assert_eq!(
        get(&s, "k19", ReadConsistency::Linearizable).await,
        Ok(Some(b"v".to_vec()))
    );
    s.apply(KvCommand::put("after", "x"), T)
        .await
        .expect("write after failover");
    c.shutdown().await;
}

// ---- The state machine sees the fencing token; reset ----

/// A [`KvStateMachine`] shared with the test (so it can be inspected, and outlives
/// a node like a persistent state machine), recording every position applied.
#[derive(Clone, Default)]
struct SharedSm {
    kv: Arc<Mutex<KvStateMachine>>,
    /// Every entry applied: its position, and whether it was a no-op.
    applied: Arc<Mutex<Vec<(Position, bool)>>>,
    resets: Arc<AtomicUsize>,
}

impl StateMachine for SharedSm {
    type Capture = <KvStateMachine as StateMachine>::Capture;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.applied.lock().push((position, false));
        self.kv.lock().apply(position, command)
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied.lock().push((position, true));
        self.kv.lock().apply_noop(position)
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        self.kv.lock().query(query)
    }

    fn applied_index(&self) -> LogIndex {
        self.kv.lock().applied_index()
    }

    fn capture(&self) -> Self::Capture {
        self.kv.lock().capture()
    }

    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        self.kv.lock().restore(index, data)
    }

    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.kv.lock().reset()
    }
}

#[tokio::test(start_paused = true)]
async fn every_entry_reaches_the_state_machine_with_its_term_as_fencing_token() {
    let sms = [
        SharedSm::default(),
        SharedSm::default(),
        SharedSm::default(),
    ];
    let c = Cluster::start_full(
        |_| MemLogStore::new(),
        |id| sms[(id.0 - 1) as usize].clone(),
        |_| {},
    )
    .await;
    let (p, s) = c.primary().await;
    let ack = p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    let idx = ack.position.index;
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= idx,
        "the standby to apply",
    )
    .await;

    for (node, sm) in [
        (&p, &sms[(p.node_id().0 - 1) as usize]),
        (&s, &sms[(s.node_id().0 - 1) as usize]),
    ] {
        let applied = sm.applied.lock().clone();
        assert!(
            applied.contains(&(ack.position, false)),
            "{}: the write arrives at its position, with the term of the primary that wrote it: {applied:?}",
            node.node_id()
        );
        // The new primary's no-op comes first in its term and carries it.
        let noop = applied
            .iter()
            .find(|(pos, noop)| *noop && pos.term == ack.term)
            .map(|(pos, _)| *pos);
        assert!(
            noop.is_some_and(|pos| pos.index < idx),
            "{}: {applied:?}",
            node.node_id()
        );
        assert!(
            applied
                .windows(2)
                .all(|w| w[1].0.index == w[0].0.index.next()),
            "in index order, without gaps: {applied:?}"
        );
        assert_eq!(sm.kv.lock().fencing_term(), ack.term);
        assert_eq!(ack.term.node, p.node_id(), "the token names the primary");
    }
    assert!(
        sms[(WITNESS.0 - 1) as usize].applied.lock().is_empty(),
        "the witness applies nothing"
    );
    c.shutdown().await;
}

// ---- Snapshot saves run in the background ----

/// A [`MemLogStore`] whose next `held` snapshot saves take effect at call time (as
/// the `LogStore` contract orders them) but report durability only once
/// [`GatedStore::release`] is called: a very slow fsync.
#[derive(Clone, Default)]
struct GatedStore {
    inner: MemLogStore,
    held: Arc<AtomicUsize>,
    gate: Arc<watch::Sender<bool>>,
    saves: Arc<AtomicUsize>,
}

impl GatedStore {
    fn holding(saves: usize) -> Self {
        let store = GatedStore::default();
        store.held.store(saves, Ordering::SeqCst);
        store
    }

    /// Lets every held save finish, and holds no more.
    fn release(&self) {
        self.held.store(0, Ordering::SeqCst);
        self.gate.send_replace(true);
    }

    /// How many snapshot saves were started.
    fn saves(&self) -> usize {
        self.saves.load(Ordering::SeqCst)
    }
}

impl LogStore for GatedStore {
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send {
        self.inner.load()
    }

    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.append(entries)
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send {
        self.inner.read(from, to, max_bytes)
    }

    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.truncate_suffix(from)
    }

    fn purge_prefix(
        &self,
        upto: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.purge_prefix(upto)
    }

    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.save_hard_state(state)
    }

    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.saves.fetch_add(1, Ordering::SeqCst);
        let hold = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let mut gate = self.gate.subscribe();
        let done = self.inner.save_snapshot(snapshot);
        async move {
            if hold {
                // The sender lives in the store.
                let _ = gate.wait_for(|open| *open).await;
            }
            done.await
        }
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.install_snapshot(snapshot)
    }

    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        self.inner.snapshot_writer(at)
    }

    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        self.inner.snapshot_reader(snapshot)
    }

    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send {
        self.inner.read_snapshot(snapshot, offset, max_bytes)
    }

    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send {
        self.inner.last_position()
    }

    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        self.inner.purge_point(snapshot, keep_from)
    }
}

/// Writes keys `k0..k{n}` through `p`, each acknowledged (else panics with `why`).
async fn write_keys<Tr: Transport, L: LogStore, S: StateMachine>(
    p: &Node<Tr, L, S>,
    n: usize,
    why: &str,
) {
    for i in 0..n {
        p.apply(KvCommand::put(format!("k{i}"), "v"), T)
            .await
            .expect(why);
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_snapshot_save_stalls_neither_writes_nor_heartbeats() {
    let every = |cfg: &mut Config| cfg.snapshot_every = 5;
    let c = Cluster::start_with(|_| GatedStore::holding(usize::MAX), every).await;
    let (p, s) = c.primary().await;
    let term = p.term();
    // Sync mode: every write needs the standby's ack too, so neither engine stalls
    // while its snapshot save waits.
    write_keys(&p, 30, "writes go on while the snapshot save waits").await;
    // Many failover timeouts later, nobody failed over.
    let changed = s
        .wait_status(
            |st| st.role == Role::Primary || st.term != term,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(changed, Err(Error::Timeout), "no false failover");
    assert!(p.is_leader() && p.term() == term);
    assert!(p.health().writable, "{:?}", p.health());
    assert_eq!(p.metrics().snapshots_taken, 0, "no save finished yet");
    assert_eq!(p.store().saves(), 1, "one save in flight at a time");
    assert_eq!(s.store().saves(), 1, "one save in flight at a time");
    assert!(
        p.store().inner.entries().first().map(|e| e.index()) == Some(LogIndex(1)),
        "nothing is compacted before the snapshot is durable"
    );

    // The fsync completes: the engine learns of the snapshot and compacts.
    p.store().release();
    s.store().release();
    let ack = p
        .apply(KvCommand::put("after", "x"), T)
        .await
        .expect("write");
    wait_until(
        std::slice::from_ref(&p),
        |n| n.metrics().snapshots_taken >= 1 && n.store().saves() >= 2,
        "the snapshot to be saved and the next one to follow",
    )
    .await;
    let first = p.store().inner.entries().first().map(|e| e.index());
    assert!(
        first.is_none_or(|i| i > LogIndex(1)),
        "the log was compacted: {first:?}"
    );
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= ack.position.index,
        "the standby to apply",
    )
    .await;
    assert!(s.metrics().snapshots_taken >= 1, "{:?}", s.metrics());
    c.shutdown().await;
}

/// The primary's retention policy keeps what the stopped standby lacks, so the
/// standby catches up from the primary's durable log (the primary's in-memory log
/// starts after its latest snapshot) without a snapshot; with a cap below its lag
/// it gets the snapshot.
#[tokio::test(start_paused = true)]
async fn a_lagging_standby_catches_up_from_the_primarys_durable_log_within_retention() {
    for (retain, expect_snapshot) in [(1_000, false), (10, true)] {
        let every = |cfg: &mut Config| cfg.snapshot_every = 5;
        let c = Cluster::start_with(|_| MemLogStore::with_retention(retain), every).await;
        let (p, s) = c.primary().await;
        let sid = s.node_id();
        let store = s.store().clone();
        let ack = p.apply(KvCommand::put("k", "v"), T).await.expect("write");
        wait_until(
            std::slice::from_ref(&s),
            |n| n.status().applied_index >= ack.position.index,
            "the standby to apply",
        )
        .await;
        s.shutdown().await.expect("shutdown");
        let mut last = LogIndex::ZERO;
        for i in 0..50 {
            last = p
                .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
                .await
                .expect("write")
                .position
                .index;
        }
        let held = p.store().entries().first().map(|e| e.index());
        let stale = store.last().index;
        if expect_snapshot {
            // Snapshots are serialized off the engine task; the purge follows
            // the save.
            let first = |n: &MemNode| n.store().entries().first().map(|e| e.index());
            wait_until(
                std::slice::from_ref(&p),
                |n| first(n) > Some(stale.next()),
                "the primary to purge past the standby",
            )
            .await;
        } else {
            assert!(held <= Some(stale.next()), "kept for the standby: {held:?}");
        }

        let back = node(&c.net, sid, store.clone(), Bootstrap::NewCluster, &every);
        back.start().await.expect("restart");
        wait_until(
            std::slice::from_ref(&back),
            |n| n.status().applied_index >= last,
            "the standby to catch up",
        )
        .await;
        assert_eq!(
            get(&back, "k49", ReadConsistency::Stale).await,
            Ok(Some(b"v49".to_vec()))
        );
        let installed = back.metrics().snapshots_installed;
        if expect_snapshot {
            assert!(installed >= 1, "retention {retain}: {:?}", back.metrics());
        } else {
            assert_eq!(installed, 0, "retention {retain}: {:?}", back.metrics());
            assert!(p.metrics().catch_up_reads >= 1, "{:?}", p.metrics());
        }
        back.shutdown().await.expect("shutdown");
        c.shutdown().await;
    }
}

/// A state machine that persists its own state (here: it outlives the node) goes
/// on after a restart from what it applied: every entry reaches it exactly once,
/// in order, although the log's snapshot is older than its state.
#[tokio::test(start_paused = true)]
async fn a_persistent_state_machine_applies_each_entry_exactly_once_across_restarts() {
    let sms = [
        SharedSm::default(),
        SharedSm::default(),
        SharedSm::default(),
    ];
    let every = |cfg: &mut Config| cfg.snapshot_every = 5;
    let c = Cluster::start_full(
        |_| MemLogStore::new(),
        |id| sms[(id.0 - 1) as usize].clone(),
        every,
    )
    .await;
    let (p, s) = c.primary().await;
    let sid = s.node_id();
    let sm = sms[(sid.0 - 1) as usize].clone();
    let mut last = LogIndex::ZERO;
    let mut cur = s.clone();
    for round in 0..3 {
        for i in 0..7 {
            last = p
                .apply(KvCommand::put(format!("k{round}.{i}"), "v"), T)
                .await
                .expect("write")
                .position
                .index;
        }
        wait_until(
            std::slice::from_ref(&cur),
            |n| n.status().applied_index >= last,
            "the standby to apply",
        )
        .await;
        // The state machine is ahead of the log's latest snapshot.
        let snap = cur.store().state().snapshot.map(|x| x.last_included.index);
        assert!(snap < Some(sm.applied_index()), "{snap:?}");
        cur.shutdown().await.expect("shutdown");
        let store = cur.store().clone();
        // Restarted while writes go on; then restarted again at once.
        let back = node_with(
            &c.net,
            sid,
            store.clone(),
            sm.clone(),
            Bootstrap::NewCluster,
            &every,
        );
        back.start().await.expect("restart");
        for i in 0..3 {
            last = p
                .apply(KvCommand::put(format!("after{round}.{i}"), "v"), T)
                .await
                .expect("write")
                .position
                .index;
        }
        wait_until(
            std::slice::from_ref(&back),
            |n| n.status().applied_index >= last,
            "the restarted standby to apply",
        )
        .await;
        back.shutdown().await.expect("shutdown");
        cur = node_with(
            &c.net,
            sid,
            store,
            sm.clone(),
            Bootstrap::NewCluster,
            &every,
        );
        cur.start().await.expect("restart again");
    }
    cur.shutdown().await.expect("shutdown");
    let applied: Vec<u64> = sm.applied.lock().iter().map(|(p, _)| p.index.0).collect();
    let expected: Vec<u64> = (1..=applied.len() as u64).collect();
    assert_eq!(applied, expected, "every index once, in order");
    assert_eq!(sm.resets.load(Ordering::SeqCst), 0);
    c.shutdown().await;
}

/// A state machine that applied entries its log does not hold (another node's, or
/// the log was replaced) is refused at start with a clear error, not silently
/// replayed over.
#[tokio::test(start_paused = true)]
async fn a_state_machine_ahead_of_its_log_is_refused_at_start() {
    let net = MemNetwork::new();
    let sm = SharedSm::default();
    {
        let mut kv = sm.kv.lock();
        for i in 1..=3 {
            kv.apply_noop(Position::new(
                Term {
                    number: 1,
                    node: N1,
                },
                LogIndex(i),
            ));
        }
    }
    let n = node_with(
        &net,
        N1,
        MemLogStore::new(),
        sm,
        Bootstrap::NewCluster,
        &|_| {},
    );
    let err = n.start().await.expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("applied up to index 3") && msg.contains("log ends at 0"),
        "{msg}"
    );
    assert!(!n.is_running());
}

fn async_mode(cfg: &mut Config) {
    cfg.commit_mode = CommitMode::Async;
    cfg.max_lag_on_failover = Some(100);
    cfg.snapshot_every = 5;
}

#[tokio::test(start_paused = true)]
async fn an_async_rewind_while_a_snapshot_save_is_pending_resets_the_state_machine() {
    let sms = [
        SharedSm::default(),
        SharedSm::default(),
        SharedSm::default(),
    ];
    let sm_of = |id: NodeId| sms[(id.0 - 1) as usize].clone();
    // Each node's first snapshot save waits until released.
    let c = Cluster::start_full(|_| GatedStore::holding(1), sm_of, async_mode).await;
    let (p, s) = c.primary().await;
    let (pid, sid) = (p.node_id(), s.node_id());
    s.store().release();
    let acks = p
        .apply_batch(
            vec![KvCommand::put("w0", "v"), KvCommand::put("w1", "v")],
            T,
        )
        .await;
    let w1 = acks[1].as_ref().expect("write").position.index;
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= w1,
        "the standby to apply",
    )
    .await;

    // The standby misses the next writes, which the primary acknowledges (async
    // mode), applies and snapshots; the save of that snapshot does not finish.
    c.net.cut(pid, sid);
    let mut first_x = None;
    for i in 0..6 {
        let ack = p
            .apply(KvCommand::put(format!("x{i}"), "lost"), T)
            .await
            .expect("async write");
        first_x.get_or_insert(ack.position.index);
    }
    let first_x = first_x.expect("writes");
    // The snapshot is serialized off the engine task, then its save is issued.
    wait_until(
        std::slice::from_ref(&p),
        |n| n.store().saves() >= 1,
        "the snapshot's save to be issued",
    )
    .await;
    assert_eq!(p.store().saves(), 1);
    let pending = p
        .store()
        .inner
        .state()
        .snapshot
        .expect("the save took effect at call time");
    assert!(
        pending.last_included.index >= first_x,
        "the pending snapshot holds entries a failover discards: {pending:?}"
    );

    // The primary is isolated; the standby takes over and writes at the same index.
    c.net.isolate(pid);
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().role != Role::Primary,
        "the isolated primary to step down",
    )
    .await;
    let y = s
        .apply(KvCommand::put("y", "kept"), T)
        .await
        .expect("write");
    assert!(y.position.index <= pending.last_included.index);

    // Back: the old primary must discard what it applied, with its snapshot save
    // still pending. It resets its state machine and replays the new primary's log.
    c.net.heal_all();
    wait_until(
        std::slice::from_ref(&p),
        // A heartbeat can name the new primary before its log arrives: wait for
        // the new primary's entries (the rewind comes first) and for them applied.
        |n| {
            let st = n.status();
            st.leader == Some(sid)
                && st.last_position.term == y.position.term
                && st.applied_index >= y.position.index
        },
        "the old primary to rewind and catch up",
    )
    .await;
    assert!(p.is_running(), "no storage failure");
    // Entries the old primary's snapshot holds are reported as the snapshot's
    // position: the count is at least one.
    assert!(p.metrics().discarded >= 1, "{:?}", p.metrics());
    assert!(
        sm_of(pid).resets.load(Ordering::SeqCst) >= 1,
        "reset, not restored"
    );
    assert_eq!(get(&p, "x0", ReadConsistency::Stale).await, Ok(None));
    assert_eq!(
        get(&p, "y", ReadConsistency::Stale).await,
        Ok(Some(b"kept".to_vec()))
    );
    assert_eq!(
        get(&p, "w1", ReadConsistency::Stale).await,
        Ok(Some(b"v".to_vec()))
    );
    // (A snapshot taken after the rewind, of the new primary's log, may already
    // be saved: the engine decides when, and a superseded save in flight does not
    // hold it back. Entries from `first_x` on are then the new primary's.)
    let stored = p.store().inner.state().snapshot.map(|s| s.last_included);
    assert!(
        stored.is_none_or(|pos| pos.index < first_x || pos.term == y.position.term),
        "the store's snapshot holds no discarded entry: {stored:?}"
    );
    // The stale save finishes; it is not reported, and snapshots go on.
    p.store().release();
    let ack = s.apply(KvCommand::put("z", "v"), T).await.expect("write");
    wait_until(
        std::slice::from_ref(&p),
        |n| n.status().applied_index >= ack.position.index,
        "replication",
    )
    .await;
    assert!(p.is_running());
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_restored_from_a_snapshot_can_still_reset_its_state_machine() {
    // Only N1 takes snapshots, so N2 never answers N1 with a snapshot of its own.
    let tweak = |cfg: &mut Config| {
        async_mode(cfg);
        if cfg.node_id != N1 {
            cfg.snapshot_every = 1_000_000;
        }
    };
    let c = Cluster::start_with(|_| MemLogStore::new(), tweak).await;
    let (p, s) = c.primary().await;
    let (p, s) = if p.node_id() == N1 {
        (p, s)
    } else {
        p.switchover(T).await.expect("switchover to N1");
        wait_until(
            std::slice::from_ref(&s),
            |n| n.status().role == Role::Primary,
            "N1 to lead",
        )
        .await;
        (s, p)
    };
    let (pid, sid) = (p.node_id(), s.node_id());
    let ack = p.apply(KvCommand::put("w", "v"), T).await.expect("write");
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= ack.position.index,
        "the standby to apply",
    )
    .await;
    // Entries the standby never gets, snapshotted by the primary.
    c.net.cut(pid, sid);
    let mut first_x = None;
    for i in 0..12 {
        let ack = p
            .apply(KvCommand::put(format!("x{i}"), "lost"), T)
            .await
            .expect("async write");
        first_x.get_or_insert(ack.position.index);
    }
    let first_x = first_x.expect("writes");
    // Serialized off the engine task, then saved.
    wait_until(
        std::slice::from_ref(&p),
        |n| {
            n.metrics().snapshots_taken >= 1
                && n.store()
                    .state()
                    .snapshot
                    .is_some_and(|s| s.last_included.index >= first_x)
        },
        "the snapshot to be saved",
    )
    .await;
    let store = p.store().clone();
    p.shutdown().await.expect("shutdown");
    let snap = store.state().snapshot.expect("a snapshot");
    assert!(snap.last_included.index >= first_x, "{snap:?}");

    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().role == Role::Primary,
        "the standby to take over",
    )
    .await;
    let y = s
        .apply(KvCommand::put("y", "kept"), T)
        .await
        .expect("write");
    // The new primary's log grows past the old primary's.
    let mut last = y.position.index;
    for i in 0..20 {
        last = s
            .apply(KvCommand::put(format!("n{i}"), "v"), T)
            .await
            .expect("write")
            .position
            .index;
    }
    assert!(last > snap.last_included.index);
    assert!(s.store().state().snapshot.is_none(), "N2 takes no snapshot");
    c.net.heal_all();

    // The old primary restarts from its snapshot (its state machine is restored,
    // not empty); the new primary's log conflicts with that snapshot, so it must
    // reset the state machine and resync.
    let back = node(&c.net, pid, store.clone(), Bootstrap::NewCluster, &tweak);
    back.start().await.expect("restart");
    wait_until(
        std::slice::from_ref(&back),
        |n| n.status().leader == Some(sid) && n.status().applied_index >= last,
        "the old primary to resync",
    )
    .await;
    assert!(back.is_running(), "no storage failure");
    assert!(back.metrics().discarded >= 1, "{:?}", back.metrics());
    assert_eq!(get(&back, "x0", ReadConsistency::Stale).await, Ok(None));
    assert_eq!(
        get(&back, "y", ReadConsistency::Stale).await,
        Ok(Some(b"kept".to_vec()))
    );
    assert_eq!(
        get(&back, "w", ReadConsistency::Stale).await,
        Ok(Some(b"v".to_vec()))
    );
    back.shutdown().await.expect("shutdown");
    c.shutdown().await;
}

// ---- Shutdown ----

/// A [`MemTransport`] whose `connect` never completes (an unreachable host that
/// drops packets). It counts the connection attempts still pending, and those
/// made after `close`.
#[derive(Clone)]
struct BlackholeTransport {
    inner: MemTransport,
    /// Connection attempts in progress (their futures not yet dropped).
    pending: Arc<watch::Sender<usize>>,
    closed: Arc<AtomicBool>,
    after_close: Arc<AtomicUsize>,
}

/// Counts one pending connection attempt until dropped.
struct PendingConnect(Arc<watch::Sender<usize>>);

impl Drop for PendingConnect {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Transport for BlackholeTransport {
    type Conn = MemConnection;

    fn local_id(&self) -> NodeId {
        self.inner.local_id()
    }

    fn connect(
        &self,
        _peer: &Member,
    ) -> impl Future<Output = Result<MemConnection, TransportError>> + Send {
        if self.closed.load(Ordering::SeqCst) {
            self.after_close.fetch_add(1, Ordering::SeqCst);
        }
        self.pending.send_modify(|n| *n += 1);
        let guard = PendingConnect(Arc::clone(&self.pending));
        async move {
            let _guard = guard;
            std::future::pending().await
        }
    }

    fn listen(
        &self,
        handler: Arc<dyn RequestHandler>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.listen(handler)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        self.closed.store(true, Ordering::SeqCst);
        self.inner.close()
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_shutdowns_all_wait_until_the_node_has_stopped() {
    let net = MemNetwork::new();
    let transport = BlackholeTransport {
        inner: net.transport(N1),
        pending: Arc::new(watch::channel(0).0),
        closed: Arc::new(AtomicBool::new(false)),
        after_close: Arc::new(AtomicUsize::new(0)),
    };
    let n = NodeBuilder::new(config(N1))
        .transport(transport.clone())
        .log_store(MemLogStore::new())
        .state_machine(KvStateMachine::new())
        .bootstrap(Bootstrap::NewCluster)
        .seed(1)
        .build()
        .expect("valid config");
    n.start().await.expect("start");
    // Alone, it campaigns: its pre-votes hang in `connect` on control-request tasks.
    let mut pending = transport.pending.subscribe();
    tokio::time::timeout(T, pending.wait_for(|n| *n >= 2))
        .await
        .expect("pre-votes are being sent")
        .expect("the transport lives");

    let stopped = |n: Node<BlackholeTransport, MemLogStore, KvStateMachine>| async move {
        n.shutdown().await.expect("shutdown");
        (
            n.is_running(),
            n.status().running,
            n.transport().closed.load(Ordering::SeqCst),
            *n.transport().pending.borrow(),
        )
    };
    let (first, second) = tokio::join!(stopped(n.clone()), stopped(n.clone()));
    for (who, (running, status_running, closed, pending)) in [("first", first), ("second", second)]
    {
        assert!(!running, "{who}: still running");
        assert!(!status_running, "{who}: the engine task had not stopped");
        assert!(closed, "{who}: the transport was not closed yet");
        assert_eq!(pending, 0, "{who}: a peer task outlived the shutdown");
    }
    // A later shutdown is still Ok. Then virtual time runs on past every retry and
    // backoff timer (not waiting for a condition: showing that nothing happens):
    // no task is left to reach the transport after close.
    n.shutdown().await.expect("shutdown");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(transport.after_close.load(Ordering::SeqCst), 0);
    assert_eq!(*transport.pending.borrow(), 0);
}

/// The builder checks that the transport speaks for the configured node.
#[tokio::test(start_paused = true)]
async fn a_transport_speaking_for_another_node_is_refused() {
    let net = MemNetwork::new();
    let r: Result<MemNode, Error> = NodeBuilder::new(config(N1))
        .transport(net.transport(N2))
        .log_store(MemLogStore::new())
        .state_machine(KvStateMachine::new())
        .build();
    match r {
        Err(Error::IdentityMismatch {
            configured,
            transport,
        }) => assert_eq!((configured, transport), (N1, N2)),
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
}

/// The engine task keeps a histogram of how late its ticks ran; on tokio's paused
/// clock, with nothing slow on the task, every tick runs on time.
#[tokio::test(start_paused = true)]
async fn the_engine_task_records_how_late_its_ticks_ran() {
    let c = Cluster::start().await;
    let (p, _) = c.primary().await;
    p.apply(KvCommand::put("k", "v"), T).await.expect("write");
    let ticks = p.metrics().tick_lateness;
    assert!(ticks.count() > 0, "ticks are recorded: {ticks:?}");
    assert_eq!(ticks.buckets[0], ticks.count(), "all on time: {ticks:?}");
    c.shutdown().await;
}

/// Released by the test; a capture's serialization waits for it.
#[derive(Default)]
struct SerializeGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl SerializeGate {
    fn release(&self) {
        if let Ok(mut open) = self.open.lock() {
            *open = true;
        }
        self.opened.notify_all();
    }

    /// Waits (real time, bounded) until released; false if it never was.
    fn wait(&self) -> bool {
        let Ok(open) = self.open.lock() else {
            return false;
        };
        self.opened
            .wait_timeout_while(open, Duration::from_secs(10), |open| !*open)
            .is_ok_and(|(open, _)| *open)
    }
}

/// A key-value state machine whose snapshot serialization blocks until the test
/// releases it: a stand-in for a large state that takes long to serialize.
struct SlowSerializingSm {
    kv: KvStateMachine,
    gate: Arc<SerializeGate>,
}

struct GatedCapture {
    inner: <KvStateMachine as StateMachine>::Capture,
    gate: Arc<SerializeGate>,
}

impl ha_core::StateCapture for GatedCapture {
    fn write_to(self, out: &mut dyn std::io::Write) -> Result<(), StorageError> {
        if !self.gate.wait() {
            return Err(StorageError::Io(
                "the test never released the serialization".into(),
            ));
        }
        self.inner.write_to(out)
    }
}

impl StateMachine for SlowSerializingSm {
    type Capture = GatedCapture;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.kv.apply(position, command)
    }
    fn apply_noop(&mut self, position: Position) {
        self.kv.apply_noop(position)
    }
    fn query(&self, query: &[u8]) -> Vec<u8> {
        self.kv.query(query)
    }
    fn applied_index(&self) -> LogIndex {
        self.kv.applied_index()
    }
    fn capture(&self) -> GatedCapture {
        GatedCapture {
            inner: self.kv.capture(),
            gate: self.gate.clone(),
        }
    }
    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        self.kv.restore(index, data)
    }
    fn reset(&mut self) {
        self.kv.reset()
    }
}

/// A snapshot's serialization runs off the engine task: while it is blocked, the
/// engine goes on committing and acknowledging writes (were it on the engine
/// task, the first write after the snapshot point would wait for the release, and
/// the serialization would give up and fail the node). Once it finishes, the
/// snapshot is saved and the log compacted.
#[tokio::test(start_paused = true)]
async fn a_slow_snapshot_serialization_does_not_hold_up_the_engine() {
    let gate = Arc::new(SerializeGate::default());
    let sm = |_| SlowSerializingSm {
        kv: KvStateMachine::new(),
        gate: gate.clone(),
    };
    let every = |cfg: &mut Config| cfg.snapshot_every = 5;
    let c = Cluster::start_full(|_| MemLogStore::new(), sm, every).await;
    let (p, s) = c.primary().await;
    let term = p.term();
    write_keys(&p, 30, "writes go on while the snapshot serializes").await;
    assert_eq!(p.term(), term);
    assert_eq!(p.metrics().snapshots_taken, 0, "still serializing");

    gate.release();
    let ack = p
        .apply(KvCommand::put("after", "x"), T)
        .await
        .expect("write");
    wait_until(
        std::slice::from_ref(&p),
        |n| n.metrics().snapshots_taken >= 1,
        "the snapshot to be saved",
    )
    .await;
    wait_until(
        std::slice::from_ref(&s),
        |n| n.status().applied_index >= ack.position.index && n.metrics().snapshots_taken >= 1,
        "the standby to apply and save its snapshot",
    )
    .await;
    assert_eq!(p.term(), term, "no failover");
    c.shutdown().await;
}
