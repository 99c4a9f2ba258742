//! Helpers for the QUIC tests, and the QUIC transport as the shared test
//! scaffold (`ha-transport-testkit`) drives it.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::message::Envelope;
use ha_core::message::Request;
use ha_core::testkit::conformance::HarnessNode;
use ha_core::types::{LogIndex, NodeId, Position, Term};
use ha_core::wire;
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_tls::Clock;
use ha_transport_quic::transport::{STREAM_CONTROL, STREAM_WAL};
use ha_transport_quic::{QuicOptions, QuicTransport};
use ha_transport_testkit::{RawConn, RawKind, TlsStack};

pub use ha_transport_testkit::{echo, heartbeat, loopback, Echo};

/// The QUIC stack.
pub struct Quic;

/// A raw QUIC connection with one stream of the chosen kind.
pub struct RawQuic {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Drop for RawQuic {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"");
    }
}

impl RawConn for RawQuic {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.send.write_all(bytes).await.map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Result<Vec<u8>, String> {
        let budget = wire::ReadBudget::new(wire::MAX_FRAME_BYTES, wire::MAX_FRAME_BYTES);
        wire::read_frame(
            &mut self.recv,
            wire::MAX_FRAME_BYTES,
            Duration::from_secs(10),
            &budget,
        )
        .await
        .map_err(|e| e.to_string())?
        .map(|f| f.body)
        .ok_or_else(|| "the server ended the stream".to_string())
    }

    async fn closed(&mut self) {
        self.conn.closed().await;
    }
}

impl TlsStack for Quic {
    type Transport = QuicTransport;
    type Options = QuicOptions;
    type Raw = RawQuic;

    fn options(members: &[NodeId]) -> QuicOptions {
        QuicOptions::new(loopback(), members.to_vec())
    }

    fn from_config(config: &Config, bind: SocketAddr) -> QuicOptions {
        QuicOptions::from_config(config, bind)
    }

    fn set_clock(opts: &mut QuicOptions, clock: Clock) {
        opts.tls_clock = clock;
    }

    fn set_timeouts(opts: &mut QuicOptions, idle: Duration, frame: Duration) {
        opts.idle_timeout = idle;
        opts.keep_alive = idle / 3;
        opts.frame_timeout = frame;
    }

    fn build(
        identity: &Identity,
        opts: QuicOptions,
    ) -> Result<(QuicTransport, SocketAddr), TransportError> {
        let t = QuicTransport::new(identity, opts)?;
        let addr = t.local_addr()?;
        Ok((t, addr))
    }

    fn free_addresses(n: usize) -> Vec<SocketAddr> {
        let held: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| std::net::UdpSocket::bind(loopback()).expect("bind"))
            .collect();
        held.iter()
            .map(|s| s.local_addr().expect("address"))
            .collect()
    }

    async fn raw(
        addr: SocketAddr,
        server: NodeId,
        tls: rustls::ClientConfig,
        kind: RawKind,
    ) -> Result<RawQuic, String> {
        let endpoint = quinn::Endpoint::client(loopback()).map_err(|e| e.to_string())?;
        let cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?,
        ));
        let conn = endpoint
            .connect_with(cfg, addr, &ha_tls::certs::node_dns_name(server))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let byte = match kind {
            RawKind::Control => STREAM_CONTROL,
            RawKind::Wal => STREAM_WAL,
        };
        send.write_all(&[byte]).await.map_err(|e| e.to_string())?;
        Ok(RawQuic {
            endpoint,
            conn,
            send,
            recv,
        })
    }
}

pub fn identity(ca: &CertificateAuthority, spec: &NodeCertSpec) -> Identity {
    let c = ca.issue(spec).unwrap();
    Identity::from_pem(&ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap()
}

pub fn node(identity: &Identity, members: &[NodeId]) -> HarnessNode<QuicTransport> {
    node_with(identity, QuicOptions::new(loopback(), members.to_vec()))
}

pub fn node_with(identity: &Identity, opts: QuicOptions) -> HarnessNode<QuicTransport> {
    ha_transport_testkit::harness_node::<Quic>(identity, opts).unwrap()
}

pub fn wal_batch(from: NodeId, to: NodeId, id: u64) -> Envelope<Request> {
    let term = Term {
        number: 1,
        node: from,
    };
    Envelope {
        from,
        to,
        term,
        request_id: id,
        body: Request::WalBatch(ha_core::message::WalBatch {
            prev: Position::new(term, LogIndex(id)),
            entries: vec![ha_core::types::WalEntry::new(
                Position::new(term, LogIndex(id + 1)),
                ha_core::types::Payload::Command(ha_core::types::Command(
                    id.to_le_bytes().to_vec(),
                )),
            )],
            commit: LogIndex(id),
        }),
    }
}

/// Awaits all `futures` concurrently, in one task.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}
