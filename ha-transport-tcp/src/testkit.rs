//! The TCP transport as the shared test scaffold (`ha-transport-testkit`)
//! drives it (feature `testkit`): [`Tcp`] implements
//! [`TlsStack`](ha_transport_testkit::TlsStack), so the conformance harness,
//! the rejection suite, the end-to-end cluster and the transport benchmark run
//! over TCP.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{TcpOptions, TcpTransport, KIND_CONTROL, KIND_WAL};

/// The TCP stack.
pub struct Tcp;

/// A raw TLS connection to a TCP transport.
pub struct RawTcp(TlsStream<TcpStream>);

impl RawConn for RawTcp {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.0.flush().await.map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Result<Vec<u8>, String> {
        let budget = wire::ReadBudget::new(wire::MAX_FRAME_BYTES, wire::MAX_FRAME_BYTES);
        loop {
            let frame = wire::read_frame(
                &mut self.0,
                wire::MAX_FRAME_BYTES,
                Duration::from_secs(10),
                &budget,
            )
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the server closed the connection")?;
            // Skip pongs.
            if !frame.body.is_empty() {
                return Ok(frame.body);
            }
        }
    }

    async fn closed(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.0.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    }
}

impl TlsStack for Tcp {
    type Transport = TcpTransport;
    type Options = TcpOptions;
    type Raw = RawTcp;

    fn options(members: &[NodeId]) -> TcpOptions {
        TcpOptions::new(loopback(), members.to_vec())
    }

    fn from_config(config: &Config, bind: SocketAddr) -> TcpOptions {
        TcpOptions::from_config(config, bind)
    }

    fn set_clock(opts: &mut TcpOptions, clock: Clock) {
        opts.tls_clock = clock;
    }

    fn net(opts: &mut TcpOptions) -> &mut NetOptions {
        &mut opts.net
    }

    fn build(
        identity: &Identity,
        opts: TcpOptions,
    ) -> Result<(TcpTransport, SocketAddr), TransportError> {
        let t = TcpTransport::new(identity, opts)?;
        let addr = t.local_addr();
        Ok((t, addr))
    }

    fn refusals(transport: &TcpTransport) -> &ha_tls::RefusalLog {
        transport.refusals()
    }

    fn connections(transport: &TcpTransport) -> Vec<ha_tls::PeerConnections> {
        transport.connections()
    }

    fn free_addresses(n: usize) -> Vec<SocketAddr> {
        let held: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind(loopback()).expect("bind"))
            .collect();
        held.iter()
            .map(|l| l.local_addr().expect("address"))
            .collect()
    }

    async fn raw(
        addr: SocketAddr,
        server: NodeId,
        tls: rustls::ClientConfig,
        kind: RawKind,
    ) -> Result<RawTcp, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ha_tls::config::server_name(server).map_err(|e| e.to_string())?;
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let byte = match kind {
            RawKind::Control => KIND_CONTROL,
            RawKind::Wal => KIND_WAL,
        };
        // Each raw connection poses as a fresh dialer incarnation, so the
        // acceptor's ordering of one incarnation's connections never refuses it.
        static RAW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 63);
        let incarnation = RAW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stream
            .write_all(&crate::link::hello(byte, incarnation, 0))
            .await
            .map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok(RawTcp(stream))
    }
}
