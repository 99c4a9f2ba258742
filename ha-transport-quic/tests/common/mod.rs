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
pub use ha_transport_quic::testkit::Quic;
use ha_transport_quic::transport::{STREAM_CONTROL, STREAM_WAL};
use ha_transport_quic::{QuicOptions, QuicTransport};

pub use ha_transport_testkit::{echo, heartbeat, loopback, wal_batch, Echo};

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
