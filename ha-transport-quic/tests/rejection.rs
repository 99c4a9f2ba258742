//! Only cluster members get in, and bad frames close only their connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{echo, heartbeat, identity, loopback, node, node_with};
use ha_core::message::{Envelope, Request, Response, RpcError};
use ha_core::testkit::conformance::HarnessNode;
use ha_core::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use ha_core::types::NodeId;
use ha_core::wire::{self as framing, MAX_FRAME_BYTES};
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_tls::config as tls;
use ha_transport_quic::transport::{CODE_SUPERSEDED, STREAM_CONTROL, STREAM_RETIRE, STREAM_WAL};
use ha_transport_quic::{QuicOptions, QuicTransport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const LIMIT: Duration = Duration::from_secs(10);

/// Counts the requests it sees and echoes heartbeats.
struct Counting(NodeId, Arc<AtomicUsize>);

impl RequestHandler for Counting {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        common::Echo(self.0).handle(peer, req)
    }
}

struct Cluster {
    ca: CertificateAuthority,
    server: HarnessNode<QuicTransport>,
    seen: Arc<AtomicUsize>,
}

/// Members 1, 2, 3; node 2 listens with a counting handler.
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
    let seen = Arc::new(AtomicUsize::new(0));
    server
        .transport
        .listen(Arc::new(Counting(NodeId(2), seen.clone())))
        .await
        .unwrap();
    Cluster { ca, server, seen }
}

/// A raw rustls client trusting `ca`, presenting `auth` (or nothing).
fn raw_client(
    ca: &CertificateAuthority,
    auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![tls::alpn()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap(),
    ))
}

fn pem_auth(
    cert_pem: &str,
    key_pem: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
    )
}

/// Tries a heartbeat from `from` over a raw connection; Ok(response) or why not.
async fn raw_heartbeat(
    server: &HarnessNode<QuicTransport>,
    cfg: quinn::ClientConfig,
    from: NodeId,
) -> Result<Envelope<Response>, String> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.member.addr.parse().unwrap();
    let attempt = async {
        let conn = endpoint
            .connect_with(cfg, addr, "node-2")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let frame = framing::encode(&heartbeat(from, NodeId(2), 1), MAX_FRAME_BYTES).unwrap();
        send.write_all(&[STREAM_CONTROL])
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let budget = framing::ReadBudget::new(MAX_FRAME_BYTES, MAX_FRAME_BYTES);
        let frame = framing::read_frame(&mut recv, MAX_FRAME_BYTES, LIMIT, &budget)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no response")?;
        framing::decode(&frame.body).map_err(|e| e.to_string())
    };
    let r = tokio::time::timeout(LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    endpoint.close(0u32.into(), b"");
    r
}

async fn assert_refused(c: &Cluster, cfg: quinn::ClientConfig, what: &str) {
    let r = raw_heartbeat(&c.server, cfg, NodeId(1)).await;
    assert!(r.is_err(), "{what} must be refused, got {r:?}");
    assert_eq!(
        c.seen.load(Ordering::SeqCst),
        0,
        "{what}: handler must not run"
    );
    c.server.transport.close().await;
}

#[tokio::test]
async fn control_raw_client_with_member_cert_is_served() {
    // The raw client works with a good certificate, so the refusals below are
    // caused by the certificates alone.
    let c = cluster().await;
    let good = c.ca.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let r = raw_heartbeat(
        &c.server,
        raw_client(&c.ca, Some(pem_auth(&good.cert_pem, &good.key_pem))),
        NodeId(1),
    )
    .await;
    assert!(
        matches!(
            r,
            Ok(Envelope {
                body: Response::HeartbeatAck(_),
                ..
            })
        ),
        "{r:?}"
    );
    c.server.transport.close().await;
}

#[tokio::test]
async fn refuses_peer_without_client_certificate() {
    let c = cluster().await;
    let cfg = raw_client(&c.ca, None);
    assert_refused(&c, cfg, "a peer without a client certificate").await;
}

#[tokio::test]
async fn refuses_certificate_from_another_ca() {
    let c = cluster().await;
    let other = CertificateAuthority::generate("other", 1).unwrap();
    let cert = other.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let cfg = raw_client(&c.ca, Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    assert_refused(&c, cfg, "a certificate from another CA").await;
}

#[tokio::test]
async fn refuses_valid_certificate_of_non_member() {
    let c = cluster().await;
    let cert = c.ca.issue(&NodeCertSpec::new(NodeId(9), 1)).unwrap();
    let cfg = raw_client(&c.ca, Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    assert_refused(&c, cfg, "a valid certificate of a non-member").await;
}

#[tokio::test]
async fn refuses_expired_certificate() {
    let c = cluster().await;
    let mut spec = NodeCertSpec::new(NodeId(1), 1);
    spec.not_before = rcgen::date_time_ymd(2000, 1, 1);
    spec.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = c.ca.issue(&spec).unwrap();
    let cfg = raw_client(&c.ca, Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    assert_refused(&c, cfg, "an expired certificate").await;
}

#[tokio::test]
async fn refuses_member_claiming_another_node_id() {
    let c = cluster().await;
    let client = node(
        &identity(&c.ca, &NodeCertSpec::new(NodeId(1), 1)),
        &[NodeId(1), NodeId(2), NodeId(3)],
    );
    let conn = client.transport.connect(&c.server.member).await.unwrap();
    // Node 1's certificate, node 3's name in the envelope.
    let resp = conn
        .call(heartbeat(NodeId(3), NodeId(2), 5), LIMIT)
        .await
        .unwrap();
    assert_eq!(resp.body, Response::Error(RpcError::NotAMember));
    assert_eq!(resp.request_id, 5);
    assert_eq!(c.seen.load(Ordering::SeqCst), 0, "handler must not run");
    // The honest request still works on the same connection.
    let ok = conn
        .call(heartbeat(NodeId(1), NodeId(2), 6), LIMIT)
        .await
        .unwrap();
    assert!(matches!(ok.body, Response::HeartbeatAck(_)));
    client.transport.close().await;
    c.server.transport.close().await;
}

#[tokio::test]
async fn dialing_a_server_whose_certificate_names_another_node_fails() {
    // Node 1 dials "node 3" at node 2's address: the server proves node 2.
    let c = cluster().await;
    let client = node(
        &identity(&c.ca, &NodeCertSpec::new(NodeId(1), 1)),
        &[NodeId(1), NodeId(2), NodeId(3)],
    );
    let mut wrong = c.server.member.clone();
    wrong.id = NodeId(3);
    let r = client.transport.connect(&wrong).await;
    assert!(r.is_err(), "impostor server accepted");
    client.transport.close().await;
    c.server.transport.close().await;
}

/// Sends raw bytes on a fresh stream of a member connection and checks the server
/// closes that connection, while another member keeps being served.
async fn bad_bytes_close_connection(bytes: Vec<u8>) {
    let c = cluster().await;
    let good = c.ca.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let cfg = raw_client(&c.ca, Some(pem_auth(&good.cert_pem, &good.key_pem)));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(cfg, c.server.member.addr.parse().unwrap(), "node-2")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let _ = send.finish();
    let reason = tokio::time::timeout(LIMIT, conn.closed())
        .await
        .expect("the server must close a connection that sent a bad frame");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref a) if a.error_code == quinn::VarInt::from_u32(1)),
        "closed as a protocol error, got {reason}"
    );
    // Node 3 is still served.
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
    c.server.transport.close().await;
    endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn garbage_frame_closes_connection() {
    let mut bytes = vec![STREAM_CONTROL];
    bytes.extend(8u32.to_be_bytes());
    bytes.extend([0xff; 8]);
    bad_bytes_close_connection(bytes).await;
}

#[tokio::test]
async fn garbage_on_wal_stream_closes_connection() {
    let mut bytes = vec![STREAM_WAL];
    bytes.extend(3u32.to_be_bytes());
    bytes.extend([0xff, 0xff, 0xff]);
    bad_bytes_close_connection(bytes).await;
}

#[tokio::test]
async fn truncated_frame_closes_connection() {
    let mut bytes = vec![STREAM_CONTROL];
    bytes.extend(100u32.to_be_bytes());
    bytes.extend([0u8; 10]);
    bad_bytes_close_connection(bytes).await;
}

#[tokio::test]
async fn oversized_frame_closes_connection() {
    let mut bytes = vec![STREAM_WAL];
    bytes.extend(u32::MAX.to_be_bytes());
    bad_bytes_close_connection(bytes).await;
}

#[tokio::test]
async fn unknown_stream_kind_closes_connection() {
    bad_bytes_close_connection(vec![0x7f, 0, 0, 0, 0]).await;
}

/// A raw connection of member `id` to the cluster's server.
async fn member_conn(c: &Cluster, id: NodeId) -> (quinn::Endpoint, quinn::Connection) {
    let cert = c.ca.issue(&NodeCertSpec::new(id, 1)).unwrap();
    let cfg = raw_client(&c.ca, Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
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
        o.connect_timeout = Duration::from_millis(300);
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

#[test]
fn identity_used_by_helpers_is_a_member() {
    let ca = CertificateAuthority::generate("c", 1).unwrap();
    let id: Identity = identity(&ca, &NodeCertSpec::new(NodeId(4), 1));
    assert_eq!(id.node, NodeId(4));
    let _ = echo(NodeId(4));
}
