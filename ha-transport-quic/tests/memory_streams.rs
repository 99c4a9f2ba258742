//! The issue's measurement, as a test: one member connection opens many
//! control streams, each announcing the largest frame and sending a kilobyte
//! of it. Before the fix the server allocated every announced length at once
//! (one connection held +1.5 GiB); now it holds what arrived, the streams are
//! capped at 32 and the connection's bytes by its read budget. Alone in its
//! binary, so no other test's allocations count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use ha_core::transport::Transport;
use ha_core::types::NodeId;
use ha_core::wire;
use ha_tls::certs::NodeCertSpec;
use ha_tls::testkit::TestCluster;
use ha_transport_quic::transport::STREAM_CONTROL;
use ha_transport_testkit::cap::Cap;
use ha_transport_testkit::probe::{pem_auth, raw_tls};
use ha_transport_testkit::TlsStack;

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_of_one_connection_pin_no_memory() {
    let cluster = TestCluster::new(3).unwrap();
    let members = cluster.members().to_vec();
    let server = ha_transport_testkit::harness_node::<common::Quic>(
        &cluster.identity(NodeId(2)).unwrap(),
        common::Quic::options(&members),
    )
    .unwrap();
    server
        .transport
        .listen(ha_transport_testkit::echo(NodeId(2)))
        .await
        .unwrap();
    let cert = cluster
        .ca()
        .issue(&NodeCertSpec::new(NodeId(1), 1))
        .unwrap();
    let tls = raw_tls(cluster.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client(common::loopback()).unwrap();
    let conn = endpoint
        .connect_with(cfg, server.member.addr.parse().unwrap(), "node-2")
        .unwrap()
        .await
        .unwrap();
    let base = ALLOCATOR.allocated();
    let mut streams = Vec::new();
    let mut announce = u32::try_from(wire::MAX_FRAME_BYTES)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    announce.extend([7u8; 1024]);
    // Thirty streams (within the cap of 32): 480 MiB if allocated up front.
    for _ in 0..30 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[STREAM_CONTROL]).await.unwrap();
        send.write_all(&announce).await.unwrap();
        streams.push((send, recv));
    }
    // Observe for two seconds (well within the frame timeout).
    let mut peak = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < end {
        peak = peak.max(ALLOCATOR.allocated().saturating_sub(base));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        peak < 24 << 20,
        "one connection held {peak} bytes for 30 KiB received"
    );
    drop(streams);
    endpoint.close(0u32.into(), b"");
    server.transport.close().await;
}
