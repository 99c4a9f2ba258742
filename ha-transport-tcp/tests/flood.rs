//! A flood of silent TCP connections from one address cannot lock members out:
//! handshakes are bounded per source address as well as in all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::message::{Envelope, Response};
use ha_core::transport::Transport;
use ha_core::types::NodeId;
use ha_core::wire;
use ha_tls::certs::NodeCertSpec;
use ha_tls::testkit::TestCluster;
use ha_transport_testkit::probe::{pem_auth, raw_tls};
use ha_transport_testkit::{harness_node, heartbeat, TlsStack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_address_do_not_lock_out_another() {
    let cluster = TestCluster::new(3).unwrap();
    let members = cluster.members().to_vec();
    let server = harness_node::<common::Tcp>(
        &cluster.identity(NodeId(2)).unwrap(),
        common::Tcp::options(&members),
    )
    .unwrap();
    server
        .transport
        .listen(ha_transport_testkit::echo(NodeId(2)))
        .await
        .unwrap();
    let addr: SocketAddr = server.member.addr.parse().unwrap();
    // As many silent sockets from 127.0.0.1 as there are handshake places in all.
    let mut silent = Vec::new();
    for _ in 0..ha_transport_tcp::MAX_HANDSHAKES {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // A member from another address is still served.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let cert = cluster
        .ca()
        .issue(&NodeCertSpec::new(NodeId(1), 1))
        .unwrap();
    let tls = raw_tls(cluster.ca(), Some(pem_auth(&cert.cert_pem, &cert.key_pem)));
    let name = ha_tls::config::server_name(NodeId(2)).unwrap();
    let served = async {
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut hello = vec![ha_transport_tcp::KIND_CONTROL];
        hello.extend(1u64.to_be_bytes());
        hello.extend(0u64.to_be_bytes());
        stream.write_all(&hello).await.map_err(|e| e.to_string())?;
        let frame = wire::encode(&heartbeat(NodeId(1), NodeId(2), 1), wire::MAX_FRAME_BYTES)
            .map_err(|e| e.to_string())?;
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        loop {
            let mut len = [0u8; 4];
            stream
                .read_exact(&mut len)
                .await
                .map_err(|e| e.to_string())?;
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            stream
                .read_exact(&mut body)
                .await
                .map_err(|e| e.to_string())?;
            // Skip keep-alives.
            if !body.is_empty() {
                return wire::decode::<Envelope<Response>>(&body).map_err(|e| e.to_string());
            }
        }
    };
    let r = tokio::time::timeout(LIMIT, served)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
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
    drop(silent);
    server.transport.close().await;
}
