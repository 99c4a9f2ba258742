//! ha-core's transport conformance suite over QUIC on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ha_transport_testkit::StackHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_suite_multi_thread() {
    ha_core::testkit::conformance::transport_suite(&StackHarness::<common::Quic>::new()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn transport_suite_current_thread() {
    ha_core::testkit::conformance::transport_suite(&StackHarness::<common::Quic>::new()).await;
}

/// The testkit's cluster written to files loads back into working transports.
#[tokio::test]
async fn testkit_cluster_from_files() {
    use ha_core::transport::{PeerConnection, Transport};
    use ha_core::types::NodeId;
    use ha_tls::testkit::TestCluster;

    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::new(2).unwrap();
    let ids = cluster.write(dir.path()).unwrap();
    assert_eq!(
        ids.iter().map(|i| i.node).collect::<Vec<_>>(),
        cluster.members()
    );
    let one = common::node(&ids[0], cluster.members());
    let two = common::node(&ids[1], cluster.members());
    two.transport.listen(common::echo(NodeId(2))).await.unwrap();
    let conn = one.transport.connect(&two.member).await.unwrap();
    let reply = conn
        .call(
            common::heartbeat(NodeId(1), NodeId(2), 1),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(reply.request_id, 1);
    one.transport.close().await;
    two.transport.close().await;
}
