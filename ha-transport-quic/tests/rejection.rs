//! QUIC-specific rejections (streams, connection limits, retiring), and the
//! shared rejection suite over QUIC: only members get in, bad frames and silent
//! streams close only their connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{identity, loopback, node, node_with};
use ha_core::message::Response;
use ha_core::testkit::conformance::HarnessNode;
use ha_core::transport::{PeerConnection, Transport};
use ha_core::types::NodeId;
use ha_tls::certs::{CertificateAuthority, NodeCertSpec};
use ha_transport_quic::transport::{CODE_SUPERSEDED, STREAM_RETIRE, STREAM_WAL};
use ha_transport_quic::{QuicOptions, QuicTransport};
use ha_transport_testkit::probe::{pem_auth, raw_tls};
use ha_transport_testkit::{echo, heartbeat};

ha_transport_testkit::rejection_tests!(common::Quic);

const LIMIT: Duration = Duration::from_secs(10);

struct Cluster {
    ca: CertificateAuthority,
    server: HarnessNode<QuicTransport>,
}

/// Members 1, 2, 3; node 2 listens.
async fn cluster() -> Cluster {
    cluster_with(|_| {}).await
}

/// [`cluster`] with the server's options adjusted by `adjust`.
async fn cluster_with(adjust: impl FnOnce(&mut QuicOptions)) -> Cluster {
    let ca = CertificateAuthority::generate("cluster", 1).unwrap();
    let members = [NodeId(1), NodeId(2), NodeId(3)];
    let mut opts = QuicOptions::new(loopback(), members.to_vec());
    adjust(&mut opts);
    let server = node_with(&identity(&ca, &NodeCertSpec::new(NodeId(2), 1)), opts);
    server.transport.listen(echo(NodeId(2))).await.unwrap();
    Cluster { ca, server }
}

fn quic_client(tls: rustls::ClientConfig) -> quinn::ClientConfig {
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// Sends raw bytes on a fresh stream of a member connection and checks the
/// server closes that connection as a protocol error.
async fn bad_stream_closes_connection(bytes: Vec<u8>) {
    let c = cluster().await;
    let (endpoint, conn) = member_conn(&c, NodeId(1)).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let _ = send.finish();
    assert_eq!(close_code(&conn).await, 1, "closed as a protocol error");
    node_3_is_served(&c).await;
    c.server.transport.close().await;
    endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn unknown_stream_kind_closes_connection() {
    bad_stream_closes_connection(vec![0x7f, 0, 0, 0, 0]).await;
}

/// A raw connection of member `id` to the cluster's server.
async fn member_conn(c: &Cluster, id: NodeId) -> (quinn::Endpoint, quinn::Connection) {
    let cert = c.ca.issue(&NodeCertSpec::new(id, 1)).unwrap();
    let cfg = quic_client(raw_tls(
        &c.ca,
        Some(pem_auth(&cert.cert_pem, &cert.key_pem)),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(cfg, c.server.member.addr.parse().unwrap(), "node-2")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// The close code the server gave `conn`, waiting at most [`LIMIT`].
async fn close_code(conn: &quinn::Connection) -> u32 {
    let reason = tokio::time::timeout(LIMIT, conn.closed())
        .await
        .expect("the server closes the connection");
    match reason {
        quinn::ConnectionError::ApplicationClosed(a) => {
            u32::try_from(a.error_code.into_inner()).unwrap()
        }
        other => panic!("closed by the application expected, got {other}"),
    }
}

/// Node 3 can still connect and call.
async fn node_3_is_served(c: &Cluster) {
    let other = node(
        &identity(&c.ca, &NodeCertSpec::new(NodeId(3), 1)),
        &[NodeId(1), NodeId(2), NodeId(3)],
    );
    let conn3 = other.transport.connect(&c.server.member).await.unwrap();
    let ok = conn3
        .call(heartbeat(NodeId(3), NodeId(2), 1), LIMIT)
        .await
        .unwrap();
    assert!(matches!(ok.body, Response::HeartbeatAck(_)));
    other.transport.close().await;
}

/// One WAL stream per connection: a second one closes the connection as a
/// protocol error (each would cost a large read buffer, and two would let the
/// peer's requests overtake each other); other peers are unaffected.
#[tokio::test]
async fn second_wal_stream_closes_connection() {
    let c = cluster().await;
    let (endpoint, conn) = member_conn(&c, NodeId(1)).await;
    let (mut first, _r1) = conn.open_bi().await.unwrap();
    first.write_all(&[STREAM_WAL]).await.unwrap();
    let (mut second, _r2) = conn.open_bi().await.unwrap();
    second.write_all(&[STREAM_WAL]).await.unwrap();
    assert_eq!(close_code(&conn).await, 1, "closed as a protocol error");
    node_3_is_served(&c).await;
    c.server.transport.close().await;
    endpoint.close(0u32.into(), b"");
}

/// A peer cannot hold more than three open connections (the kept one and two
/// being retired): a fourth is closed as a protocol error, the others stay.
#[tokio::test]
async fn too_many_connections_from_one_peer_are_refused() {
    let c = cluster().await;
    let mut held = Vec::new();
    for k in 1..=3 {
        held.push(member_conn(&c, NodeId(1)).await);
        let registered = async {
            for _ in 0..2000 {
                if c.server.transport.live_connections(NodeId(1)) == k {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(LIMIT, registered)
            .await
            .expect("the server registers the connection");
        assert_eq!(c.server.transport.live_connections(NodeId(1)), k);
    }
    let (endpoint, extra) = member_conn(&c, NodeId(1)).await;
    assert_eq!(close_code(&extra).await, 1, "closed as a protocol error");
    assert_eq!(c.server.transport.live_connections(NodeId(1)), 3);
    for (_, conn) in &held {
        assert!(conn.close_reason().is_none(), "the earlier ones stay open");
    }
    node_3_is_served(&c).await;
    c.server.transport.close().await;
    endpoint.close(0u32.into(), b"");
    for (e, _) in held {
        e.close(0u32.into(), b"");
    }
}

/// The peer retires the connection this node keeps and no connection it would
/// prefer shows up (their views differ): after the connect timeout the node
/// retires it too and closes it once drained, without waiting for the drain
/// timeout or for the peer to close it.
#[tokio::test]
async fn retiring_the_kept_connection_is_honoured() {
    let c = cluster_with(|o| {
        o.net.connect_timeout = Duration::from_millis(300);
        o.drain_timeout = Duration::from_secs(60);
    })
    .await;
    // Node 1 dialed this connection, so node 2 keeps it.
    let (endpoint, conn) = member_conn(&c, NodeId(1)).await;
    let registered = async {
        for _ in 0..2000 {
            if c.server.transport.live_connections(NodeId(1)) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(LIMIT, registered)
        .await
        .expect("the server registers the connection");
    let (mut retire, _recv) = conn.open_bi().await.unwrap();
    retire.write_all(&[STREAM_RETIRE]).await.unwrap();
    retire.finish().unwrap();
    assert_eq!(close_code(&conn).await, CODE_SUPERSEDED);
    assert_eq!(c.server.transport.superseded_connections(), 1);
    node_3_is_served(&c).await;
    c.server.transport.close().await;
    endpoint.close(0u32.into(), b"");
}
