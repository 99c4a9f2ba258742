//! Test helpers (feature `testkit`): a fresh cluster CA with node identities,
//! and a clock the certificate checks can be moved along with.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ha_core::types::NodeId;
use rustls::pki_types::UnixTime;
use rustls::time_provider::TimeProvider;

use crate::certs::{CertError, CertificateAuthority, Identity, NodeCertSpec, CA_CERT_FILE};
use crate::config::Clock;

/// How long test certificates are valid, in days.
const DAYS: i64 = 1;

/// A cluster CA and the identities of members `1..=n`.
pub struct TestCluster {
    ca: CertificateAuthority,
    members: Vec<NodeId>,
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCluster")
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
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
        self.identity_with(&NodeCertSpec::new(node, DAYS))
    }

    /// A freshly issued identity from `spec` (for example one that expires soon).
    pub fn identity_with(&self, spec: &NodeCertSpec) -> Result<Identity, CertError> {
        let cert = self.ca.issue(spec)?;
        Identity::from_pem(&self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
    }

    /// Writes the CA and every member's certificate and key into `dir` (as
    /// `ha-node certs` would), and returns each member's identity loaded back
    /// from those files.
    pub fn write(&self, dir: &Path) -> Result<Vec<Identity>, CertError> {
        self.ca.write(dir)?;
        let ca_path: PathBuf = dir.join(CA_CERT_FILE);
        self.members
            .iter()
            .map(|&node| {
                let (cert, key) = self.ca.issue(&NodeCertSpec::new(node, DAYS))?.write(dir)?;
                Identity::load(&ca_path, &cert, &key)
            })
            .collect()
    }
}

/// A clock for certificate checks that tests move forward; starts at the
/// system time.
#[derive(Debug)]
pub struct ManualClock {
    base: UnixTime,
    ahead_secs: AtomicU64,
}

impl ManualClock {
    /// A clock at the current system time.
    pub fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            base: UnixTime::now(),
            ahead_secs: AtomicU64::new(0),
        })
    }

    /// Moves the clock forward by `by` (whole seconds).
    pub fn advance(&self, by: Duration) {
        self.ahead_secs.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    /// This clock as a [`Clock`] for the TLS configurations.
    pub fn clock(self: &Arc<Self>) -> Clock {
        self.clone()
    }
}

impl TimeProvider for ManualClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(
            self.base.as_secs() + self.ahead_secs.load(Ordering::SeqCst),
        )))
    }
}
