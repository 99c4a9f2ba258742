//! `ha-node certs`: the cluster CA and one certificate per node, as PEM files
//! ready for the configs (keys mode 0600).
//!
//! If the output directory already holds a CA (`ca.pem` and `ca-key.pem`), it is
//! loaded and reused, so certificates for new or replaced nodes come from the
//! same CA; otherwise a new CA is generated.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ha_core::NodeId;
use ha_tls::certs::{CertError, CertificateAuthority, NodeCertSpec, CA_CERT_FILE, CA_KEY_FILE};

/// One `--node ID[=HOST_OR_IP,...]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeArg {
    /// The node id.
    pub id: NodeId,
    /// Extra DNS names for the certificate.
    pub dns: Vec<String>,
    /// IP addresses for the certificate.
    pub ips: Vec<IpAddr>,
}

impl std::str::FromStr for NodeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, names) = match s.split_once('=') {
            Some((id, names)) => (id, Some(names)),
            None => (s, None),
        };
        let id = ha_tls::certs::parse_node_id(id)
            .ok_or_else(|| format!("{id:?} is not a node id (a number without leading zeros)"))?;
        let mut arg = NodeArg {
            id,
            dns: Vec::new(),
            ips: Vec::new(),
        };
        for name in names.into_iter().flat_map(|n| n.split(',')) {
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("empty host name in {s:?}"));
            }
            match name.parse::<IpAddr>() {
                Ok(ip) => arg.ips.push(ip),
                Err(_) => arg.dns.push(name.to_string()),
            }
        }
        Ok(arg)
    }
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// Whether the CA was generated (false: an existing one was reused).
    pub new_ca: bool,
    /// The CA certificate.
    pub ca: PathBuf,
    /// Each node's certificate and key.
    pub nodes: Vec<(NodeId, PathBuf, PathBuf)>,
}

/// Writes (or reuses) the CA in `dir` and a certificate per node, valid for
/// `days` days.
pub fn write(dir: &Path, nodes: &[NodeArg], days: i64) -> Result<Written, CertError> {
    let (ca_cert, ca_key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    let (ca, new_ca) = if ca_cert.exists() && ca_key.exists() {
        (CertificateAuthority::load(&ca_cert, &ca_key)?, false)
    } else {
        let ca = CertificateAuthority::generate("ha-node cluster CA", days)?;
        ca.write(dir)?;
        (ca, true)
    };
    let mut written = Vec::new();
    for n in nodes {
        let mut spec = NodeCertSpec::new(n.id, days);
        spec.dns_names = n.dns.clone();
        spec.ips = n.ips.clone();
        let (cert, key) = ca.issue(&spec)?.write(dir)?;
        written.push((n.id, cert, key));
    }
    Ok(Written {
        new_ca,
        ca: ca_cert,
        nodes: written,
    })
}
