//! The QUIC transport as the shared test scaffold (`ha-transport-testkit`)
//! drives it (feature `testkit`): [`Quic`] implements
//! [`TlsStack`](ha_transport_testkit::TlsStack), so the conformance harness,
//! the rejection suite, the end-to-end cluster and the transport benchmark run
//! over QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::Config;
use ha_core::error::TransportError;
use ha_core::transport::NetOptions;
use ha_core::types::NodeId;
use ha_core::wire;
use ha_tls::{Clock, Identity};
use ha_transport_testkit::{loopback, RawConn, RawKind, TlsStack};

use crate::transport::{STREAM_CONTROL, STREAM_WAL};
use crate::{QuicOptions, QuicTransport};

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

    fn net(opts: &mut QuicOptions) -> &mut NetOptions {
        &mut opts.net
    }

    fn build(
        identity: &Identity,
        opts: QuicOptions,
    ) -> Result<(QuicTransport, SocketAddr), TransportError> {
        let t = QuicTransport::new(identity, opts)?;
        let addr = t.local_addr()?;
        Ok((t, addr))
    }

    fn refusals(transport: &QuicTransport) -> &ha_tls::RefusalLog {
        transport.refusals()
    }

    fn connections(transport: &QuicTransport) -> Vec<ha_tls::PeerConnections> {
        transport.connections()
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
