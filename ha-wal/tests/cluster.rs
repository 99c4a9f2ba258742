//! The replication driver over real files: three nodes (two data nodes and a
//! witness) each keep their log and hard state in a `Wal` on disk. The primary is
//! stopped, the standby takes over with every acknowledged write, and the old
//! primary restarts from its directory, rejoins and catches up.
//!
//! Real time (the log's writer thread does real fsyncs); every wait is bounded and
//! driven by the nodes' published status, never by sleeping.

use std::path::Path;
use std::time::Duration;

use ha_core::driver::{Bootstrap, Node, NodeBuilder};
use ha_core::testkit::memory::{KvCommand, KvStateMachine, MemNetwork, MemTransport};
use ha_core::{Config, Member, MemberKind, NodeId, ReadConsistency, Replicator, Role};
use ha_wal::{Retention, Wal, WalConfig};

const IDS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const T: Duration = Duration::from_secs(20);

type DiskNode = Node<MemTransport, Wal, KvStateMachine>;

fn kind(id: NodeId) -> MemberKind {
    if id == NodeId(3) {
        MemberKind::Witness
    } else {
        MemberKind::Data
    }
}

fn node(net: &MemNetwork, id: NodeId, dir: &Path) -> DiskNode {
    node_with(net, id, dir, WalConfig::default())
}

fn node_with(net: &MemNetwork, id: NodeId, dir: &Path, wal_cfg: WalConfig) -> DiskNode {
    let peers = IDS
        .into_iter()
        .filter(|m| *m != id)
        .map(|m| Member {
            id: m,
            addr: format!("mem://{m}"),
            kind: kind(m),
        })
        .collect();
    let mut cfg = Config::new(id, kind(id), format!("mem://{id}"), peers);
    cfg.snapshot_every = 64;
    let wal = Wal::open(dir.join(format!("n{}", id.0)), wal_cfg).expect("open wal");
    NodeBuilder::new(cfg)
        .transport(net.transport(id))
        .log_store(wal)
        .state_machine(KvStateMachine::new())
        .bootstrap(Bootstrap::NewCluster)
        .seed(id.0)
        .build()
        .expect("valid config")
}

async fn wait_primary(nodes: &[DiskNode]) -> DiskNode {
    ha_core::testkit::nodes::wait_writable_primary(nodes, T)
        .await
        .unwrap_or_else(|| panic!("no writable primary within {T:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_rejoin_over_real_files_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = MemNetwork::new();
    let nodes: Vec<DiskNode> = IDS.iter().map(|id| node(&net, *id, dir.path())).collect();
    for n in &nodes {
        n.start().await.expect("start");
    }
    let primary = wait_primary(&nodes).await;
    for i in 0..200 {
        primary
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write acknowledged");
    }

    // Stop the primary; the standby takes over from its own disk.
    let old = primary.node_id();
    primary.shutdown().await.expect("shutdown");
    let survivors: Vec<DiskNode> = nodes
        .iter()
        .filter(|n| n.node_id() != old)
        .cloned()
        .collect();
    drop(nodes);
    drop(primary);
    let new_primary = wait_primary(&survivors).await;
    assert_ne!(new_primary.node_id(), old);
    for i in (0..200).step_by(17) {
        let got = new_primary
            .read(
                KvCommand::query(format!("k{i}")),
                ReadConsistency::Linearizable,
                T,
            )
            .await;
        let value = got
            .ok()
            .and_then(|b| KvCommand::decode_output(&b).ok().flatten());
        assert_eq!(
            value,
            Some(format!("v{i}").into_bytes()),
            "k{i} after failover"
        );
    }
    for i in 200..260 {
        new_primary
            .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
            .await
            .expect("write after failover");
    }

    // The old primary reopens its directory (the lock was released), rejoins as a
    // standby and catches up.
    let back = node(&net, old, dir.path());
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
    let got = back
        .read(KvCommand::query("k259"), ReadConsistency::Stale, T)
        .await
        .expect("stale read");
    assert_eq!(
        KvCommand::decode_output(&got).ok().flatten(),
        Some(b"v259".to_vec())
    );

    back.shutdown().await.expect("shutdown");
    for n in survivors {
        n.shutdown().await.expect("shutdown");
    }
}

/// A standby that was down while the primary took several snapshots catches up
/// from the primary's write-ahead log (the primary's memory holds only the entries
/// after its latest snapshot) when the retention policy kept what it lacks, and
/// from a snapshot when the policy's cap is below its lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_standby_catches_up_from_the_primarys_wal_within_retention() {
    let capped = Retention {
        keep_entries: 0,
        keep_bytes: 0,
        max_entries: 50,
        max_bytes: 1 << 30,
    };
    for (retention, expect_snapshot) in [(Retention::default(), false), (capped, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = MemNetwork::new();
        let wal_cfg = WalConfig::default().with_retention(retention.clone());
        let mut nodes: Vec<DiskNode> = IDS
            .iter()
            .map(|id| node_with(&net, *id, dir.path(), wal_cfg.clone()))
            .collect();
        for n in &nodes {
            n.start().await.expect("start");
        }
        let primary = wait_primary(&nodes).await;
        let k = nodes
            .iter()
            .position(|n| n.node_id() != primary.node_id() && n.node_id() != NodeId(3))
            .expect("a standby");
        // The only handle: dropping it after shutdown releases the log's lock.
        let standby = nodes.remove(k);
        let sid = standby.node_id();
        primary
            .apply(KvCommand::put("first", "x"), T)
            .await
            .expect("write");
        standby.shutdown().await.expect("shutdown");
        drop(standby);
        for i in 0..300 {
            primary
                .apply(KvCommand::put(format!("k{i}"), format!("v{i}")), T)
                .await
                .expect("write acknowledged while the standby is down");
        }
        // Snapshots are serialized off the engine task, then saved.
        let snapshots = primary
            .wait_status(|_| primary.metrics().snapshots_taken >= 3, T)
            .await;
        assert!(snapshots.is_ok(), "{:?}", primary.metrics());

        let back = node_with(&net, sid, dir.path(), wal_cfg.clone());
        back.start().await.expect("restart from disk");
        let target = primary.status().commit_index;
        let caught_up = back.wait_status(|s| s.applied_index >= target, T).await;
        assert!(
            caught_up.is_ok(),
            "standby did not catch up: {:?}",
            back.status()
        );
        let got = back
            .read(KvCommand::query("k299"), ReadConsistency::Stale, T)
            .await
            .expect("stale read");
        assert_eq!(
            KvCommand::decode_output(&got).ok().flatten(),
            Some(b"v299".to_vec())
        );
        if expect_snapshot {
            assert!(
                back.metrics().snapshots_installed >= 1,
                "{:?}",
                back.metrics()
            );
        } else {
            assert_eq!(
                back.metrics().snapshots_installed,
                0,
                "{:?}",
                back.metrics()
            );
            assert!(
                primary.metrics().catch_up_reads >= 1,
                "{:?}",
                primary.metrics()
            );
        }
        back.shutdown().await.expect("shutdown");
        for n in nodes {
            n.shutdown().await.expect("shutdown");
        }
    }
}
