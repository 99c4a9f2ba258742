//! Test helpers for crates that run real TCP transports (feature `testkit`):
//! transports bound to loopback for the identities of an
//! [`ha_tls::testkit::TestCluster`], and ha-core's [`TransportHarness`] so the
//! transport conformance suite runs over TCP.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ha_core::types::NodeId;
//! use ha_tls::testkit::TestCluster;
//! use ha_transport_tcp::testkit::node;
//!
//! let cluster = TestCluster::new(2)?;
//! let one = node(&cluster, NodeId(1))?;
//! let two = node(&cluster, NodeId(2))?;
//! // one.transport / two.transport, reachable at one.member / two.member
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;

use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::testkit::conformance::{HarnessNode, TransportHarness};
use ha_core::types::{MemberKind, NodeId};
use ha_tls::testkit::TestCluster;
use ha_tls::Identity;

use crate::{TcpOptions, TcpTransport};

/// `127.0.0.1:0`: a free loopback port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Default options on a loopback port, with `cluster`'s members.
pub fn options(cluster: &TestCluster) -> TcpOptions {
    TcpOptions::new(loopback(), cluster.members().to_vec())
}

/// A transport for `node` of `cluster` with [`options`], not yet listening.
pub fn node(
    cluster: &TestCluster,
    node: NodeId,
) -> Result<HarnessNode<TcpTransport>, TransportError> {
    node_with(cluster, node, options(cluster))
}

/// A transport for `node` of `cluster` with `opts`, not yet listening.
pub fn node_with(
    cluster: &TestCluster,
    node: NodeId,
    opts: TcpOptions,
) -> Result<HarnessNode<TcpTransport>, TransportError> {
    let identity = cluster
        .identity(node)
        .map_err(|e| TransportError::Local(e.to_string()))?;
    harness_node(&identity, opts)
}

/// A transport for `identity` with `opts` and the member record peers dial.
pub fn harness_node(
    identity: &Identity,
    opts: TcpOptions,
) -> Result<HarnessNode<TcpTransport>, TransportError> {
    let transport = TcpTransport::new(identity, opts)?;
    Ok(HarnessNode {
        member: Member {
            id: identity.node,
            addr: transport.local_addr().to_string(),
            kind: MemberKind::Data,
        },
        transport,
    })
}

/// ha-core's [`TransportHarness`] over TCP on loopback: nodes `1..=n`, all
/// members, certificates from a fresh CA per call.
///
/// # Panics
/// If certificates cannot be generated or a loopback socket cannot be bound
/// (the harness has no way to report an error).
#[derive(Debug)]
pub struct TcpHarness;

impl TransportHarness for TcpHarness {
    type Transport = TcpTransport;

    #[allow(clippy::expect_used)]
    fn nodes(&self, n: usize) -> impl Future<Output = Vec<HarnessNode<TcpTransport>>> + Send {
        let cluster = TestCluster::new(n as u64).expect("generate test certificates");
        let nodes = cluster
            .members()
            .iter()
            .map(|&id| node(&cluster, id).expect("bind a loopback transport"))
            .collect();
        std::future::ready(nodes)
    }
}
