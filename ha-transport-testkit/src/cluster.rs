//! The whole stack for real, over any [`TlsStack`]: three nodes (two data nodes
//! and a witness) run the replication driver over its mutually authenticated
//! transport on loopback, each with its
//! log and hard state in a `Wal` on disk. The primary is stopped, the standby takes
//! over with every acknowledged write, and the old primary restarts from its
//! directory on the same address, rejoins and catches up.
//!
//! Real time (real sockets, real fsyncs); every wait is bounded and driven by the
//! nodes' published status, never by sleeping.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ha_core::driver::{Bootstrap, Node, NodeBuilder};
use ha_core::testkit::memory::{KvCommand, KvStateMachine};
use ha_core::{Config, Member, MemberKind, NodeId, ReadConsistency, Replicator, Role};
use ha_tls::testkit::TestCluster;
use ha_wal::{Wal, WalConfig};

use crate::TlsStack;

const IDS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const T: Duration = Duration::from_secs(20);

type StackNode<S> = Node<<S as TlsStack>::Transport, Wal, KvStateMachine>;

fn kind(id: NodeId) -> MemberKind {
    if id == NodeId(3) {
        MemberKind::Witness
    } else {
        MemberKind::Data
    }
}

fn node<S: TlsStack>(
    cluster: &TestCluster,
    addrs: &[SocketAddr],
    id: NodeId,
    dir: &Path,
) -> StackNode<S> {
    let peers = IDS
        .iter()
        .zip(addrs)
        .filter(|(m, _)| **m != id)
        .map(|(m, a)| Member {
            id: *m,
            addr: a.to_string(),
            kind: kind(*m),
        })
        .collect();
    let bind = addrs[(id.0 - 1) as usize];
    let mut cfg = Config::new(id, kind(id), bind.to_string(), peers);
    cfg.snapshot_every = 64;
    let identity = cluster.identity(id).expect("identity");
    let (transport, _) = S::build(&identity, S::from_config(&cfg, bind)).expect("bind");
    let wal = Wal::open(dir.join(format!("n{}", id.0)), WalConfig::default()).expect("open wal");
    NodeBuilder::new(cfg)
        .transport(transport)
        .log_store(wal)
        .state_machine(KvStateMachine::new())
        .bootstrap(Bootstrap::NewCluster)
        .seed(id.0)
        .build()
        .expect("valid config")
}

/// Waits (bounded) until one of `nodes` is a writable primary.
async fn wait_primary<S: TlsStack>(nodes: &[StackNode<S>]) -> StackNode<S> {
    ha_core::testkit::nodes::wait_writable_primary(nodes, T)
        .await
        .unwrap_or_else(|| panic!("no writable primary within {T:?}"))
}

async fn read<S: TlsStack>(
    node: &StackNode<S>,
    key: &str,
    consistency: ReadConsistency,
) -> Option<Vec<u8>> {
    let got = node
        .read(KvCommand::query(key), consistency, T)
        .await
        .ok()?;
    KvCommand::decode_output(&got).ok().flatten()
}

/// Writes to the primary, stops it, checks the standby took over with every
/// acknowledged write, writes more, restarts the old primary from its
/// directory on the same address and checks it rejoins as a standby and
/// catches up (through a snapshot: the new primary compacted meanwhile).
///
/// # Panics
/// On any failed step (this is a test).
#[allow(clippy::expect_used)]
pub async fn failover_and_rejoin<S: TlsStack>() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = TestCluster::new(3).expect("certificates");
    let addrs = S::free_addresses(IDS.len());
    let nodes: Vec<StackNode<S>> = IDS
        .iter()
        .map(|id| node::<S>(&cluster, &addrs, *id, dir.path()))
        .collect();
    for n in &nodes {
        n.start().await.expect("start");
    }
    let primary = wait_primary::<S>(&nodes).await;
    for i in 0..200 {
        primary
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write acknowledged");
    }

    // Stop the primary; the standby takes over from its own disk.
    let old = primary.node_id();
    primary.shutdown().await.expect("shutdown");
    let survivors: Vec<StackNode<S>> = nodes
        .iter()
        .filter(|n| n.node_id() != old)
        .cloned()
        .collect();
    drop(nodes);
    drop(primary);
    let new_primary = wait_primary::<S>(&survivors).await;
    assert_ne!(new_primary.node_id(), old);
    for i in (0..200).step_by(13) {
        assert_eq!(
            read::<S>(
                &new_primary,
                &format!("k{i}"),
                ReadConsistency::Linearizable
            )
            .await,
            Some(format!("v{i}").into_bytes()),
            "k{i} after failover"
        );
    }
    for i in 200..300 {
        new_primary
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write after failover");
    }

    // The old primary restarts on its address from its directory, rejoins as a
    // standby and catches up (the new primary snapshotted meanwhile).
    let back = node::<S>(&cluster, &addrs, old, dir.path());
    back.start().await.expect("restart from disk");
    let target = new_primary.status().commit_index;
    let caught_up = back
        .wait_status(|s| s.role == Role::Standby && s.applied_index >= target, T)
        .await;
    assert!(
        caught_up.is_ok(),
        "old primary did not catch up: {:?}",
        back.status()
    );
    assert_eq!(
        read::<S>(&back, "k299", ReadConsistency::Stale).await,
        Some(b"v299".to_vec())
    );
    // It follows synchronously again: a new write reaches it.
    let ack = new_primary
        .apply(KvCommand::put("last", "x"), T)
        .await
        .expect("write");
    let applied = back
        .wait_status(|s| s.applied_index >= ack.position.index, T)
        .await;
    assert!(applied.is_ok(), "{:?}", back.status());

    back.shutdown().await.expect("shutdown");
    for n in survivors {
        n.shutdown().await.expect("shutdown");
    }
}
