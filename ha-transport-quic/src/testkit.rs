//! Test helpers for crates that run real QUIC transports (feature `testkit`):
//! a fresh cluster CA with node identities, transports bound to loopback, and
//! ha-core's [`TransportHarness`] so the transport conformance suite runs over
//! QUIC.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ha_core::types::NodeId;
//! use ha_transport_quic::testkit::TestCluster;
//!
//! let cluster = TestCluster::new(2)?;
//! let one = cluster.node(NodeId(1))?;
//! let two = cluster.node(NodeId(2))?;
//! // one.transport / two.transport, reachable at one.member / two.member
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ha_core::config::Member;
use ha_core::error::TransportError;
use ha_core::testkit::conformance::{HarnessNode, TransportHarness};
use ha_core::types::{MemberKind, NodeId};

use crate::certs::{CertError, CertificateAuthority, Identity, NodeCertSpec};
use crate::{QuicOptions, QuicTransport};

/// How long test certificates are valid, in days.
const DAYS: i64 = 1;

/// `127.0.0.1:0`: a free loopback port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A cluster CA and the identities of members `1..=n`.
pub struct TestCluster {
    ca: CertificateAuthority,
    members: Vec<NodeId>,
}

impl TestCluster {
    /// A fresh CA; members are nodes `1..=n`.
    pub fn new(n: u64) -> Result<Self, CertError> {
        Ok(TestCluster {
            ca: CertificateAuthority::generate("testkit", DAYS)?,
            members: (1..=n).map(NodeId).collect(),
        })
    }

    /// The cluster CA (to issue more certificates, for example for a non-member).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The member ids, `1..=n`.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// A freshly issued identity for `node` (which need not be a member).
    pub fn identity(&self, node: NodeId) -> Result<Identity, CertError> {
        let cert = self.ca.issue(&NodeCertSpec::new(node, DAYS))?;
        Identity::from_pem(&self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
    }

    /// Writes the CA and every member's certificate and key into `dir` (as
    /// `ha-node certs` would), and returns each member's identity loaded back
    /// from those files.
    pub fn write(&self, dir: &Path) -> Result<Vec<Identity>, CertError> {
        self.ca.write(dir)?;
        let ca_path: PathBuf = dir.join(crate::certs::CA_CERT_FILE);
        self.members
            .iter()
            .map(|&node| {
                let (cert, key) = self.ca.issue(&NodeCertSpec::new(node, DAYS))?.write(dir)?;
                Identity::load(&ca_path, &cert, &key)
            })
            .collect()
    }

    /// Default options on a loopback port, with this cluster's members.
    pub fn options(&self) -> QuicOptions {
        QuicOptions::new(loopback(), self.members.clone())
    }

    /// A transport for `node` with [`options`](Self::options), not yet listening.
    pub fn node(&self, node: NodeId) -> Result<HarnessNode<QuicTransport>, TransportError> {
        self.node_with(node, self.options())
    }

    /// A transport for `node` with `opts`, not yet listening.
    pub fn node_with(
        &self,
        node: NodeId,
        opts: QuicOptions,
    ) -> Result<HarnessNode<QuicTransport>, TransportError> {
        let identity = self
            .identity(node)
            .map_err(|e| TransportError::Local(e.to_string()))?;
        harness_node(&identity, opts)
    }
}

/// A transport for `identity` with `opts` and the member record peers dial.
pub fn harness_node(
    identity: &Identity,
    opts: QuicOptions,
) -> Result<HarnessNode<QuicTransport>, TransportError> {
    let transport = QuicTransport::new(identity, opts)?;
    Ok(HarnessNode {
        member: Member {
            id: identity.node,
            addr: transport.local_addr()?.to_string(),
            kind: MemberKind::Data,
        },
        transport,
    })
}

/// ha-core's [`TransportHarness`] over QUIC on loopback: nodes `1..=n`, all
/// members, certificates from a fresh CA per call.
///
/// # Panics
/// If certificates cannot be generated or a loopback socket cannot be bound
/// (the harness has no way to report an error).
pub struct QuicHarness;

impl TransportHarness for QuicHarness {
    type Transport = QuicTransport;

    #[allow(clippy::expect_used)]
    fn nodes(&self, n: usize) -> impl Future<Output = Vec<HarnessNode<QuicTransport>>> + Send {
        let cluster = TestCluster::new(n as u64).expect("generate test certificates");
        let nodes = cluster
            .members()
            .iter()
            .map(|&id| cluster.node(id).expect("bind a loopback transport"))
            .collect();
        std::future::ready(nodes)
    }
}
