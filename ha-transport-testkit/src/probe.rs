//! The rejection suite: a transport probed as an attacker (with and without
//! cluster credentials) would. Only members get in, with certificates signed
//! directly by the cluster CA, valid now (also after a reconnect, whatever an
//! earlier session held), naming themselves canonically; bad frames and silent
//! connections close only their connection, within a bounded time.
//!
//! Every check is a `pub async fn` over a [`TlsStack`]; [`rejection_tests!`](crate::rejection_tests)
//! (crate root) expands them into one `#[tokio::test]` each.
//!
//! # Panics
//! Every function panics when the transport misbehaves (they are tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::message::{Envelope, Request, Response, RpcError};
use ha_core::testkit::conformance::HarnessNode;
use ha_core::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use ha_core::types::NodeId;
use ha_core::wire;
use ha_tls::certs::NodeCertSpec;
use ha_tls::config::{alpn, crypto_provider};
use ha_tls::testkit::{ManualClock, TestCluster};
use ha_tls::CertificateAuthority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{harness_node, heartbeat, Echo, RawConn, RawKind, TlsStack};

/// The bound on every wait of the suite.
pub const LIMIT: Duration = Duration::from_secs(10);

const MEMBERS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];

/// Counts the requests it sees and echoes heartbeats.
struct Counting(NodeId, Arc<AtomicUsize>);

impl RequestHandler for Counting {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Echo(self.0).handle(peer, req)
    }
}

/// Members 1, 2 and 3 of a fresh CA; node 2 listens with a counting handler.
struct Setup<S: TlsStack> {
    cluster: TestCluster,
    server: HarnessNode<S::Transport>,
    seen: Arc<AtomicUsize>,
}

impl<S: TlsStack> Setup<S> {
    async fn new(adjust: impl FnOnce(&mut S::Options)) -> Self {
        let cluster = TestCluster::new(3).unwrap();
        let mut opts = S::options(&MEMBERS);
        adjust(&mut opts);
        let server = harness_node::<S>(&cluster.identity(NodeId(2)).unwrap(), opts).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        server
            .transport
            .listen(Arc::new(Counting(NodeId(2), seen.clone())))
            .await
            .unwrap();
        Setup {
            cluster,
            server,
            seen,
        }
    }

    fn ca(&self) -> &CertificateAuthority {
        self.cluster.ca()
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.server.member.addr.parse().unwrap()
    }

    /// A transport of member `id`, not listening.
    fn member(&self, id: NodeId) -> HarnessNode<S::Transport> {
        harness_node::<S>(&self.cluster.identity(id).unwrap(), S::options(&MEMBERS)).unwrap()
    }

    /// A raw TLS client configuration presenting a fresh certificate of `id`.
    fn member_tls(&self, id: NodeId) -> rustls::ClientConfig {
        let cert = self.ca().issue(&NodeCertSpec::new(id, 1)).unwrap();
        raw_tls(self.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)))
    }

    /// Node 3 still connects and is served.
    async fn others_are_served(&self) {
        let other = self.member(NodeId(3));
        let conn = other.transport.connect(&self.server.member).await.unwrap();
        let ok = conn
            .call(heartbeat(NodeId(3), NodeId(2), 1), LIMIT)
            .await
            .unwrap();
        assert!(matches!(ok.body, Response::HeartbeatAck(_)), "{ok:?}");
        other.transport.close().await;
    }

    /// A heartbeat from `from` over a raw connection with `tls` is refused and
    /// the handler never runs.
    async fn assert_refused(self, tls: rustls::ClientConfig, what: &str) {
        let r = raw_heartbeat::<S>(self.addr(), tls, NodeId(1)).await;
        assert!(r.is_err(), "{what} must be refused, got {r:?}");
        assert_eq!(
            self.seen.load(Ordering::SeqCst),
            0,
            "{what}: the handler ran"
        );
        self.others_are_served().await;
        self.server.transport.close().await;
    }
}

/// A raw rustls client (TLS 1.3, the cluster's ALPN) trusting `ca`,
/// presenting `auth` (or no certificate).
pub fn raw_tls(
    ca: &CertificateAuthority,
    auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn()];
    cfg
}

/// A certificate chain and key from PEM.
pub fn pem_auth(
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

/// Tries a heartbeat from `from` to node 2 at `addr` over a raw connection;
/// the response, or why there was none.
pub async fn raw_heartbeat<S: TlsStack>(
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
    from: NodeId,
) -> Result<Envelope<Response>, String> {
    let attempt = async {
        let mut raw = S::raw(addr, NodeId(2), tls, RawKind::Control).await?;
        let frame = wire::encode(&heartbeat(from, NodeId(2), 1), wire::MAX_FRAME_BYTES)
            .map_err(|e| e.to_string())?;
        raw.send(&frame).await?;
        let body = raw.recv().await?;
        wire::decode(&body).map_err(|e| e.to_string())
    };
    tokio::time::timeout(LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// The raw client works with a member's certificate, so the refusals below
/// are caused by the certificates alone.
pub async fn a_raw_client_with_a_member_certificate_is_served<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let r = raw_heartbeat::<S>(s.addr(), s.member_tls(NodeId(1)), NodeId(1)).await;
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
    s.server.transport.close().await;
}

/// No client certificate.
pub async fn refuses_a_peer_without_a_client_certificate<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let tls = raw_tls(s.ca(), None);
    s.assert_refused(tls, "a peer without a client certificate")
        .await;
}

/// A certificate from another CA, naming a member.
pub async fn refuses_a_certificate_from_another_ca<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let other = CertificateAuthority::generate("other", 1).unwrap();
    let cert = other.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let tls = raw_tls(s.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    s.assert_refused(tls, "a certificate from another CA").await;
}

/// A valid certificate of the cluster CA for a node that is not a member.
pub async fn refuses_a_valid_certificate_of_a_non_member<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let cert = s.ca().issue(&NodeCertSpec::new(NodeId(9), 1)).unwrap();
    let tls = raw_tls(s.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    s.assert_refused(tls, "a valid certificate of a non-member")
        .await;
}

/// An expired certificate of a member.
pub async fn refuses_an_expired_certificate<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let mut spec = NodeCertSpec::new(NodeId(1), 1);
    spec.not_before = rcgen::date_time_ymd(2000, 1, 1);
    spec.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = s.ca().issue(&spec).unwrap();
    let tls = raw_tls(s.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    s.assert_refused(tls, "an expired certificate").await;
}

/// A member certificate signed by an intermediate the cluster CA signed (its
/// `pathlen:0` forbids that; the project issues no intermediates).
pub async fn refuses_a_chain_through_an_intermediate<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let (chain, key) = s.ca().issue_via_intermediate(NodeId(1)).unwrap();
    let tls = raw_tls(s.ca(), Some(pem_auth(&chain, &key)));
    s.assert_refused(tls, "a chain through an intermediate")
        .await;
}

/// A member's id in a non-canonical spelling (`node-01`, `node-+1`).
pub async fn refuses_a_non_canonical_node_id<S: TlsStack>() {
    for name in ["node-01", "node-+1"] {
        let s = Setup::<S>::new(|_| {}).await;
        let (cert, key) = s.ca().issue_named(&[name], 1).unwrap();
        let tls = raw_tls(s.ca(), Some(pem_auth(&cert, &key)));
        s.assert_refused(tls, &format!("a certificate naming {name}"))
            .await;
    }
}

/// A member whose requests claim another sender is answered with an error
/// (the handler never sees it); its honest requests still work.
pub async fn refuses_a_member_claiming_another_node_id<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let client = s.member(NodeId(1));
    let conn = client.transport.connect(&s.server.member).await.unwrap();
    // Node 1's certificate, node 3's name in the envelope.
    let resp = conn
        .call(heartbeat(NodeId(3), NodeId(2), 5), LIMIT)
        .await
        .unwrap();
    assert_eq!(resp.body, Response::Error(RpcError::NotAMember));
    assert_eq!(resp.request_id, 5);
    assert_eq!(s.seen.load(Ordering::SeqCst), 0, "the handler ran");
    let ok = conn
        .call(heartbeat(NodeId(1), NodeId(2), 6), LIMIT)
        .await
        .unwrap();
    assert!(matches!(ok.body, Response::HeartbeatAck(_)));
    client.transport.close().await;
    s.server.transport.close().await;
}

/// Dialing "node 3" at node 2's address fails: the server proves node 2.
pub async fn dialing_an_impostor_server_fails<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let client = s.member(NodeId(1));
    let mut wrong = s.server.member.clone();
    wrong.id = NodeId(3);
    let reached = async {
        let conn = client.transport.connect(&wrong).await?;
        conn.call(heartbeat(NodeId(1), NodeId(3), 1), LIMIT).await
    };
    let r = reached.await;
    assert!(r.is_err(), "an impostor server was accepted: {r:?}");
    assert_eq!(s.seen.load(Ordering::SeqCst), 0, "the handler ran");
    client.transport.close().await;
    s.server.transport.close().await;
}

/// Node 1 and node 2 with clocks of their own, node 2 listening.
async fn clocked_pair<S: TlsStack>(
    cluster: &TestCluster,
) -> (
    HarnessNode<S::Transport>,
    Arc<ManualClock>,
    HarnessNode<S::Transport>,
    Arc<ManualClock>,
) {
    let (c1, c2) = (ManualClock::new(), ManualClock::new());
    let mut o1 = S::options(&MEMBERS);
    S::set_clock(&mut o1, c1.clock());
    let mut o2 = S::options(&MEMBERS);
    S::set_clock(&mut o2, c2.clock());
    // Certificates that expire in an hour: well within the lifetime of any
    // session ticket, so a resumed session would still be offered and taken.
    let hour = |node| {
        let mut spec = NodeCertSpec::new(node, 1);
        spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        cluster.identity_with(&spec).unwrap()
    };
    let one = harness_node::<S>(&hour(NodeId(1)), o1).unwrap();
    let two = harness_node::<S>(&hour(NodeId(2)), o2).unwrap();
    two.transport.listen(crate::echo(NodeId(2))).await.unwrap();
    (one, c1, two, c2)
}

/// A heartbeat from node 1 to node 2 on a fresh connection handle.
async fn call_once<S: TlsStack>(
    one: &HarnessNode<S::Transport>,
    two: &HarnessNode<S::Transport>,
    id: u64,
) -> Result<Envelope<Response>, ha_core::error::TransportError> {
    let conn = one.transport.connect(&two.member).await?;
    let r = conn.call(heartbeat(NodeId(1), NodeId(2), id), LIMIT).await;
    conn.close();
    r
}

/// A burst of refused handshakes (here: peers without a client certificate)
/// is logged at WARN a few lines per second, with the rest counted, not one
/// line each (spoofable garbage must not flood the log).
pub async fn refused_handshakes_are_logged_at_a_bounded_rate<S: TlsStack>() {
    let s = Setup::<S>::new(|_| {}).await;
    let burst: u64 = 40;
    let start = tokio::time::Instant::now();
    for _ in 0..burst {
        let r = raw_heartbeat::<S>(s.addr(), raw_tls(s.ca(), None), NodeId(1)).await;
        assert!(r.is_err(), "a peer without a certificate was served: {r:?}");
    }
    // Every refusal is counted (it may land a moment after the client gave up).
    let log = S::refusals(&s.server.transport);
    let counted = tokio::task::block_in_place(|| log.wait_for(burst, LIMIT));
    assert!(counted, "every refused handshake is counted");
    let secs = start.elapsed().as_secs() + 1;
    let (total, suppressed) = (log.total(), log.suppressed());
    let logged = total - suppressed;
    assert!(
        logged <= 5 * (secs + 1),
        "{logged} of {total} refusals logged at WARN in about {secs} s"
    );
    s.server.transport.close().await;
}

/// Node 1's connection to node 2 is counted on both sides, by direction, and
/// a reconnect after the handle was closed counts another; node 3, never
/// reached, still has its row of zeros; a refused handshake counts nowhere.
pub async fn connections_are_counted_per_peer_and_direction<S: TlsStack>() {
    use ha_tls::Direction::{Inbound, Outbound};
    let cluster = TestCluster::new(3).unwrap();
    let (one, _, two, _) = clocked_pair::<S>(&cluster).await;
    let row = |t: &S::Transport, peer: NodeId| {
        let rows = S::connections(t);
        assert_eq!(rows.len(), 2, "one row per other member: {rows:?}");
        rows.into_iter().find(|r| r.peer == peer).unwrap()
    };
    let first = call_once::<S>(&one, &two, 1).await;
    assert!(first.is_ok(), "{first:?}");
    let dialed = row(&one.transport, NodeId(2)).opened(Outbound);
    assert!(dialed >= 1, "node 1 counts its dial of node 2");
    // An answered request was read from a registered connection.
    let accepted = row(&two.transport, NodeId(1));
    assert!(
        accepted.opened(Inbound) >= 1,
        "node 2 counts node 1's connection: {accepted:?}"
    );
    assert_eq!(
        accepted.opened(Outbound),
        0,
        "node 2 dialed nobody: {accepted:?}"
    );
    assert_eq!(
        row(&one.transport, NodeId(2)).open(Outbound),
        0,
        "closing the last handle closes node 1's connections to node 2"
    );
    let again = call_once::<S>(&one, &two, 2).await;
    assert!(again.is_ok(), "{again:?}");
    assert!(
        row(&one.transport, NodeId(2)).opened(Outbound) > dialed,
        "the reconnect is counted"
    );
    assert_eq!(
        row(&one.transport, NodeId(3)),
        ha_tls::PeerConnections {
            peer: NodeId(3),
            ..Default::default()
        },
        "node 3 was never reached"
    );
    // A handshake without a certificate is refused and not counted.
    let before = S::connections(&two.transport);
    let refused = raw_heartbeat::<S>(
        two.member.addr.parse().unwrap(),
        raw_tls(cluster.ca(), None),
        NodeId(1),
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    let log = S::refusals(&two.transport);
    let counted = tokio::task::block_in_place(|| log.wait_for(1, LIMIT));
    assert!(counted, "the refusal is counted as a refusal");
    let after = S::connections(&two.transport);
    let opened = |rows: &[ha_tls::PeerConnections]| -> Vec<[u64; 2]> {
        rows.iter().map(|r| r.opened).collect()
    };
    assert_eq!(
        opened(&before),
        opened(&after),
        "a refused handshake was counted"
    );
    one.transport.close().await;
    two.transport.close().await;
}

/// Whose clock moves past the certificates' expiry.
#[derive(Clone, Copy, Debug)]
enum Expired {
    /// The server's: it must refuse the client's certificate.
    Client,
    /// The client's: it must refuse the server's certificate.
    Server,
}

/// Node 1 calls node 2, the connection goes, the certificates expire in the
/// eyes of one side, and node 1 calls again: refused (a resumed TLS session
/// would skip that side's check of the other's certificate).
async fn expired_certificates_cannot_reconnect<S: TlsStack>(which: Expired) {
    let cluster = TestCluster::new(3).unwrap();
    let (one, c1, two, c2) = clocked_pair::<S>(&cluster).await;
    let first = call_once::<S>(&one, &two, 1).await;
    assert!(
        matches!(
            first,
            Ok(Envelope {
                body: Response::HeartbeatAck(_),
                ..
            })
        ),
        "{first:?}"
    );
    // Two hours later (the certificates were valid for one more hour).
    let clock = match which {
        Expired::Client => c2,
        Expired::Server => c1,
    };
    clock.advance(Duration::from_secs(2 * 3600));
    let again = call_once::<S>(&one, &two, 2).await;
    assert!(
        again.is_err(),
        "{which:?} certificate expired, yet the reconnect went through: {again:?}"
    );
    one.transport.close().await;
    two.transport.close().await;
}

/// Node 1's certificate expires while node 2 runs: once the connection is
/// gone, node 1 cannot get back in.
pub async fn an_expired_client_certificate_cannot_reconnect<S: TlsStack>() {
    expired_certificates_cannot_reconnect::<S>(Expired::Client).await;
}

/// Node 2's certificate expires while node 1 runs: once the connection is
/// gone, node 1 refuses to reconnect to it.
pub async fn an_expired_server_certificate_is_refused_on_reconnect<S: TlsStack>() {
    expired_certificates_cannot_reconnect::<S>(Expired::Server).await;
}

/// Sends `bytes` on a raw member connection of `kind` and checks the server
/// closes it, while another member keeps being served.
async fn bad_bytes_close_the_connection<S: TlsStack>(kind: RawKind, bytes: Vec<u8>) {
    let s = Setup::<S>::new(|_| {}).await;
    let mut raw = S::raw(s.addr(), NodeId(2), s.member_tls(NodeId(1)), kind)
        .await
        .unwrap();
    raw.send(&bytes).await.unwrap();
    tokio::time::timeout(LIMIT, raw.closed())
        .await
        .expect("the server must close a connection that sent a bad frame");
    assert_eq!(s.seen.load(Ordering::SeqCst), 0, "the handler ran");
    s.others_are_served().await;
    s.server.transport.close().await;
}

/// Bytes that are no request.
pub async fn a_garbage_frame_closes_only_its_connection<S: TlsStack>() {
    let mut bytes = 8u32.to_be_bytes().to_vec();
    bytes.extend([0xff; 8]);
    bad_bytes_close_the_connection::<S>(RawKind::Control, bytes.clone()).await;
    bad_bytes_close_the_connection::<S>(RawKind::Wal, bytes).await;
}

/// A frame whose body is cut off by the end of the stream.
pub async fn a_truncated_frame_closes_only_its_connection<S: TlsStack>() {
    let mut bytes = 100u32.to_be_bytes().to_vec();
    bytes.extend([0u8; 10]);
    let s = Setup::<S>::new(|_| {}).await;
    let mut raw = S::raw(s.addr(), NodeId(2), s.member_tls(NodeId(1)), RawKind::Wal)
        .await
        .unwrap();
    raw.send(&bytes).await.unwrap();
    // The end of the stream: dropping the raw connection closes it.
    drop(raw);
    assert_eq!(s.seen.load(Ordering::SeqCst), 0, "the handler ran");
    s.others_are_served().await;
    s.server.transport.close().await;
    // And one that stays open with half a frame is closed by the frame timeout.
    stalled_connections_are_closed_in_time::<S>(bytes).await;
}

/// A length prefix over the maximum frame size.
pub async fn an_oversized_frame_closes_only_its_connection<S: TlsStack>() {
    bad_bytes_close_the_connection::<S>(RawKind::Control, u32::MAX.to_be_bytes().to_vec()).await;
    bad_bytes_close_the_connection::<S>(RawKind::Wal, u32::MAX.to_be_bytes().to_vec()).await;
}

/// A raw member connection that sends `bytes` (perhaps none) and then nothing
/// more is closed within a bounded time; others are still served.
async fn stalled_connections_are_closed_in_time<S: TlsStack>(bytes: Vec<u8>) {
    let s = Setup::<S>::new(|o| {
        S::set_timeouts(o, Duration::from_millis(500), Duration::from_millis(300))
    })
    .await;
    let mut raw = S::raw(
        s.addr(),
        NodeId(2),
        s.member_tls(NodeId(1)),
        RawKind::Control,
    )
    .await
    .unwrap();
    raw.send(&bytes).await.unwrap();
    tokio::time::timeout(LIMIT, raw.closed())
        .await
        .expect("a stalled connection must be closed in time");
    s.others_are_served().await;
    s.server.transport.close().await;
}

/// A connection (or control stream) that opens and then sends nothing is
/// closed within a bounded time; so is one that announces the largest frame
/// and sends only a little of it.
pub async fn a_silent_connection_is_closed_in_time<S: TlsStack>() {
    stalled_connections_are_closed_in_time::<S>(Vec::new()).await;
    let mut big = u32::try_from(wire::MAX_FRAME_BYTES)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    big.extend([7u8; 1000]);
    stalled_connections_are_closed_in_time::<S>(big).await;
}

/// Expands the suite into one `#[tokio::test]` per check for the stack type
/// `$stack`.
#[macro_export]
macro_rules! rejection_tests {
    ($stack:ty) => {
        $crate::rejection_tests!(@each $stack;
            a_raw_client_with_a_member_certificate_is_served,
            refuses_a_peer_without_a_client_certificate,
            refuses_a_certificate_from_another_ca,
            refuses_a_valid_certificate_of_a_non_member,
            refuses_an_expired_certificate,
            refuses_a_chain_through_an_intermediate,
            refuses_a_non_canonical_node_id,
            refuses_a_member_claiming_another_node_id,
            dialing_an_impostor_server_fails,
            an_expired_client_certificate_cannot_reconnect,
            an_expired_server_certificate_is_refused_on_reconnect,
            a_garbage_frame_closes_only_its_connection,
            a_truncated_frame_closes_only_its_connection,
            an_oversized_frame_closes_only_its_connection,
            a_silent_connection_is_closed_in_time,
            a_slow_handler_is_not_a_dead_peer,
            refused_handshakes_are_logged_at_a_bounded_rate,
            connections_are_counted_per_peer_and_direction,
        );
    };
    (@each $stack:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::probe::$name::<$stack>().await;
            }
        )*
    };
}

/// Answers WAL batches after `delay` (a slow disk), heartbeats at once.
struct Slow(NodeId, Duration);

impl RequestHandler for Slow {
    fn handle(&self, peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        let answer = Echo(self.0).handle(peer, req.clone());
        let delay = if matches!(req.body, Request::WalBatch(_)) {
            self.1
        } else {
            Duration::ZERO
        };
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer.await
        })
    }
}

/// A handler slower than the idle timeout (a stalled fsync) does not make the
/// caller declare a live peer dead: the WAL call is answered on the same
/// connection, however long nothing else was said on it.
pub async fn a_slow_handler_is_not_a_dead_peer<S: TlsStack>() {
    let cluster = TestCluster::new(3).unwrap();
    let idle = Duration::from_millis(300);
    let opts = || {
        let mut o = S::options(&MEMBERS);
        S::set_timeouts(&mut o, idle, LIMIT);
        o
    };
    let one = harness_node::<S>(&cluster.identity(NodeId(1)).unwrap(), opts()).unwrap();
    let two = harness_node::<S>(&cluster.identity(NodeId(2)).unwrap(), opts()).unwrap();
    two.transport
        .listen(Arc::new(Slow(NodeId(2), idle * 4)))
        .await
        .unwrap();
    let conn = one.transport.connect(&two.member).await.unwrap();
    let r = conn
        .call(crate::wal_batch(NodeId(1), NodeId(2), 1), LIMIT)
        .await;
    assert!(
        matches!(
            r,
            Ok(Envelope {
                body: Response::WalAck(_),
                ..
            })
        ),
        "a WAL call answered after 4 idle timeouts must succeed: {r:?}"
    );
    one.transport.close().await;
    two.transport.close().await;
}

/// Watches `live_bytes` (the test binary's counting allocator) while `paths`
/// raw member connections (control and WAL in turn) each announce a frame of the largest size and send
/// a kilobyte of it: the server must hold about what arrived, not what was
/// announced (before the fix it allocated every announced length at once).
/// Observes for `window`; returns the largest growth seen, in bytes.
pub async fn announced_frames_pin_no_memory<S: TlsStack>(
    live_bytes: fn() -> usize,
    paths: usize,
    window: Duration,
) -> usize {
    let s = Setup::<S>::new(|_| {}).await;
    let base = live_bytes();
    let mut held = Vec::new();
    for i in 0..paths {
        // Both kinds, so a transport that keeps one connection per kind holds
        // two at once.
        let kind = if i % 2 == 0 {
            RawKind::Control
        } else {
            RawKind::Wal
        };
        let mut raw = S::raw(s.addr(), NodeId(2), s.member_tls(NodeId(1)), kind)
            .await
            .unwrap();
        let mut bytes = u32::try_from(wire::MAX_FRAME_BYTES)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        bytes.extend([7u8; 1024]);
        raw.send(&bytes).await.unwrap();
        held.push(raw);
    }
    let mut peak = 0;
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        peak = peak.max(live_bytes().saturating_sub(base));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(held);
    s.server.transport.close().await;
    peak
}

/// Defines, for the stack type `$stack`, a counting global allocator and the
/// test that announced frame lengths pin no memory
/// ([`announced_frames_pin_no_memory`]). Use it alone in a test binary, so no
/// other test's allocations count.
#[macro_export]
macro_rules! memory_test {
    ($stack:ty) => {
        #[global_allocator]
        static ALLOCATOR: $crate::cap::Cap<std::alloc::System> =
            $crate::cap::Cap::new(std::alloc::System, usize::MAX);

        fn live_bytes() -> usize {
            ALLOCATOR.allocated()
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn announced_frames_pin_no_memory() {
            // Three connections announcing 16 MiB each: 48 MiB if the
            // lengths were allocated up front.
            let peak = $crate::probe::announced_frames_pin_no_memory::<$stack>(
                live_bytes,
                3,
                std::time::Duration::from_secs(2),
            )
            .await;
            assert!(
                peak < 24 << 20,
                "the server held {peak} bytes for 3 KiB received"
            );
        }
    };
}
