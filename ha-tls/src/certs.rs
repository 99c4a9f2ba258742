//! Certificate tooling: a cluster CA, per-node certificates, PEM files and loading
//! them back with clear errors.
//!
//! A node's identity is its node id, carried in its certificate's subject
//! alternative names as the DNS name [`node_dns_name`] (`node-<id>`). Node
//! certificates allow both TLS server and TLS client authentication, so one
//! certificate serves both ends of a connection. Used by the QUIC and TCP
//! transports, by `ha-node certs` and by tests.
//!
//! The CA is issued with `pathlen:0` and signs node certificates directly; a
//! node certificate file holds exactly one certificate.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ha_core::types::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

/// The prefix of the DNS name that carries a node id in a certificate.
pub const NODE_DNS_PREFIX: &str = "node-";

/// File name of the CA certificate written by [`CertificateAuthority::write`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key written by [`CertificateAuthority::write`].
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// The DNS name that names `node` in its certificate: `node-<id>`.
pub fn node_dns_name(node: NodeId) -> String {
    format!("{NODE_DNS_PREFIX}{}", node.0)
}

/// File name of a node's certificate: `node-<id>.pem`.
pub fn node_cert_file(node: NodeId) -> String {
    format!("{}.pem", node_dns_name(node))
}

/// File name of a node's private key: `node-<id>-key.pem`.
pub fn node_key_file(node: NodeId) -> String {
    format!("{}-key.pem", node_dns_name(node))
}

/// Why generating, writing or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file that should exist does not.
    #[error("missing file {0}")]
    Missing(PathBuf),
    /// Reading or writing a file failed.
    #[error("i/o on {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("bad PEM in {what}: {reason}")]
    BadPem {
        /// Which file or item.
        what: String,
        /// Why.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate {0}")]
    KeyMismatch(String),
    /// The certificate's validity period is over.
    #[error("certificate {what} expired at {not_after}")]
    Expired {
        /// Which certificate.
        what: String,
        /// The end of its validity.
        not_after: String,
    },
    /// The certificate's validity period has not begun.
    #[error("certificate {what} is not valid before {not_before}")]
    NotYetValid {
        /// Which certificate.
        what: String,
        /// The start of its validity.
        not_before: String,
    },
    /// The certificate was not issued by the cluster CA.
    #[error("certificate {what} is not signed by the cluster CA: {reason}")]
    WrongCa {
        /// Which certificate.
        what: String,
        /// The verifier's reason.
        reason: String,
    },
    /// The certificate carries no (or more than one) node id.
    #[error("certificate {what} does not name exactly one node id: {reason}")]
    NoNodeId {
        /// Which certificate.
        what: String,
        /// Why.
        reason: String,
    },
    /// The certificate names another node than expected.
    #[error("certificate {what} names {found}, expected {expected}")]
    WrongNode {
        /// Which certificate.
        what: String,
        /// The node it names.
        found: NodeId,
        /// The node it should name.
        expected: NodeId,
    },
    /// The certificate may not serve both ends of a connection (its extended
    /// key usage lacks TLS server or TLS client authentication).
    #[error("certificate {what} cannot be used for {missing}")]
    WrongUsage {
        /// Which certificate.
        what: String,
        /// The usage it lacks.
        missing: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// Building the TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e.to_string())
    }
}

/// What a node certificate names and how long it is valid.
#[derive(Clone, Debug)]
pub struct NodeCertSpec {
    /// The node whose identity the certificate proves.
    pub node: NodeId,
    /// Extra DNS names (the node's host names).
    pub dns_names: Vec<String>,
    /// IP addresses the node is reached at.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl NodeCertSpec {
    /// A spec for `node`, valid from a day ago for `days` days, with no extra names.
    pub fn new(node: NodeId, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        NodeCertSpec {
            node,
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(days),
        }
    }
}

/// A cluster certificate authority: signs node certificates.
pub struct CertificateAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// A node certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct NodeCert {
    /// The node it names.
    pub node: NodeId,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `name`, valid for `days` days (from a day ago).
    pub fn generate(name: &str, days: i64) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { cert, key })
    }

    /// Loads a CA written by [`write`](Self::write) (certificate and key PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let cert_pem = read_string(cert_path)?;
        let key_pem = read_string(key_path)?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// A CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::BadPem {
            what: "CA key".into(),
            reason: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| CertError::BadPem {
                what: "CA certificate".into(),
                reason: e.to_string(),
            })?;
        let der = first_cert(cert_pem.as_bytes(), "CA certificate")?;
        check_key_matches(&der, &key, "CA certificate")?;
        // Re-signing with the same key and name yields an equivalent issuer.
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a node certificate (ServerAuth and ClientAuth) naming `spec.node` as
    /// `node-<id>` plus the spec's DNS names and IPs.
    pub fn issue(&self, spec: &NodeCertSpec) -> Result<NodeCert, CertError> {
        let key = KeyPair::generate()?;
        let mut names = vec![node_dns_name(spec.node)];
        names.extend(spec.dns_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_dns_name(spec.node));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCert {
            node: spec.node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate carrying exactly the DNS names `names` (no
    /// `node-<id>` added), for tests of identity parsing (`testkit` only).
    #[cfg(feature = "testkit")]
    pub fn issue_named(&self, names: &[&str], days: i64) -> Result<(String, String), CertError> {
        self.issue_with_usages(
            names,
            days,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// As [`issue_named`](Self::issue_named), with the extended key usages
    /// `usages` (`testkit` only).
    #[cfg(feature = "testkit")]
    pub fn issue_with_usages(
        &self,
        names: &[&str],
        days: i64,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = usages;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues an intermediate CA signed by this CA (which its `pathlen:0`
    /// forbids) and a certificate for `node` signed by that intermediate;
    /// returns the chain (leaf, then intermediate) and the leaf's key, PEM, for
    /// tests that such a chain is refused (`testkit` only).
    #[cfg(feature = "testkit")]
    pub fn issue_via_intermediate(&self, node: NodeId) -> Result<(String, String), CertError> {
        let mid_key = KeyPair::generate()?;
        let mut mid = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "rogue intermediate");
        mid.distinguished_name = dn;
        mid.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        mid.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        mid.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        mid.not_before = now - time::Duration::days(1);
        mid.not_after = now + time::Duration::days(1);
        let mid_cert = mid.signed_by(&mid_key, &self.cert, &self.key)?;
        let leaf_key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec![node_dns_name(node)])?;
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.not_before = now - time::Duration::days(1);
        leaf.not_after = now + time::Duration::days(1);
        leaf.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf.signed_by(&leaf_key, &mid_cert, &mid_key)?;
        Ok((
            format!("{}{}", leaf_cert.pem(), mid_cert.pem()),
            leaf_key.serialize_pem(),
        ))
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        create_dir(dir)?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem().as_bytes(), false)?;
        write_file(&dir.join(CA_KEY_FILE), self.key_pem().as_bytes(), true)
    }
}

impl NodeCert {
    /// Writes `node-<id>.pem` and `node-<id>-key.pem` (mode 0600) into `dir`;
    /// returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
        create_dir(dir)?;
        let cert = dir.join(node_cert_file(self.node));
        let key = dir.join(node_key_file(self.node));
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|error| CertError::Io {
        path: dir.to_path_buf(),
        error,
    })
}

/// Writes a file; private ones are created with mode 0600 (on Unix).
fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), CertError> {
    let io = |error| CertError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            CertError::Missing(path.to_path_buf())
        } else {
            CertError::Io {
                path: path.to_path_buf(),
                error,
            }
        }
    })
}

fn read_string(path: &Path) -> Result<String, CertError> {
    String::from_utf8(read_bytes(path)?).map_err(|e| CertError::BadPem {
        what: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Every certificate in a PEM buffer.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::BadPem {
            what: what.into(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn first_cert(pem: &[u8], what: &str) -> Result<CertificateDer<'static>, CertError> {
    let mut certs = parse_certs(pem, what)?;
    Ok(certs.swap_remove(0))
}

fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
    what: &str,
) -> Result<x509_parser::certificate::X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| CertError::BadPem {
            what: what.into(),
            reason: format!("not an X.509 certificate: {e}"),
        })
}

fn check_key_matches(der: &CertificateDer<'_>, key: &KeyPair, what: &str) -> Result<(), CertError> {
    let cert = parse_x509(der, what)?;
    if cert.public_key().raw != key.public_key_der().as_slice() {
        return Err(CertError::KeyMismatch(what.into()));
    }
    Ok(())
}

/// Checks that `der` is valid at `now`.
pub fn check_validity(
    der: &CertificateDer<'_>,
    what: &str,
    now: UnixTime,
) -> Result<(), CertError> {
    let cert = parse_x509(der, what)?;
    let v = cert.validity();
    let now = now.as_secs() as i64;
    if now < v.not_before.timestamp() {
        return Err(CertError::NotYetValid {
            what: what.into(),
            not_before: v.not_before.to_string(),
        });
    }
    if now > v.not_after.timestamp() {
        return Err(CertError::Expired {
            what: what.into(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

/// Parses the `<id>` of a `node-<id>` name in its one canonical form: decimal
/// digits without sign or leading zeros (`0` itself is allowed), so no two
/// spellings name the same node.
pub fn parse_node_id(digits: &str) -> Option<NodeId> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok().map(NodeId)
}

/// Checks that a node certificate allows both TLS server and TLS client
/// authentication (one certificate serves both ends of a connection).
fn check_usage(der: &CertificateDer<'_>, what: &str) -> Result<(), CertError> {
    let cert = parse_x509(der, what)?;
    let eku = cert.extended_key_usage().map_err(|e| CertError::BadPem {
        what: what.into(),
        reason: format!("bad extendedKeyUsage: {e}"),
    })?;
    let Some(eku) = eku else {
        return Ok(());
    };
    let eku = eku.value;
    let missing = match (eku.any || eku.server_auth, eku.any || eku.client_auth) {
        (true, true) => return Ok(()),
        (false, true) => "TLS server authentication",
        (true, false) => "TLS client authentication",
        (false, false) => "TLS server or client authentication",
    };
    Err(CertError::WrongUsage {
        what: what.into(),
        missing: missing.into(),
    })
}

/// The node id a certificate proves: its single `node-<id>` DNS name.
pub fn node_id_of(der: &CertificateDer<'_>) -> Result<NodeId, CertError> {
    let what = "peer certificate";
    let cert = parse_x509(der, what)?;
    let no_id = |reason: String| CertError::NoNodeId {
        what: what.into(),
        reason,
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| no_id(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| no_id("no subjectAltName".into()))?;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
            // DNS names match case-insensitively, so any spelling of the
            // prefix names a node (and only the canonical one is accepted).
            let prefix = dns.get(..NODE_DNS_PREFIX.len());
            if prefix.is_some_and(|p| p.eq_ignore_ascii_case(NODE_DNS_PREFIX)) {
                let id = dns
                    .strip_prefix(NODE_DNS_PREFIX)
                    .and_then(parse_node_id)
                    .ok_or_else(|| no_id(format!("{dns} is not node-<number>")))?;
                if found.replace(id).is_some() {
                    return Err(no_id("more than one node-<id> name".into()));
                }
            }
        }
    }
    found.ok_or_else(|| no_id("no node-<id> DNS name".into()))
}

/// A node's TLS identity: its certificate chain, key and the cluster CA, checked
/// to belong together.
#[derive(Debug)]
pub struct Identity {
    /// The node the certificate names.
    pub node: NodeId,
    /// The node's certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            node: self.node,
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl Identity {
    /// Loads and checks PEM files: the CA certificate, the node certificate (chain)
    /// and its private key. Errors say which file is missing, that the key does not
    /// match, that a certificate is expired or not yet valid, or that the node
    /// certificate is not from this CA.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let ca = read_bytes(ca_path)?;
        let cert = read_bytes(cert_path)?;
        let key = read_bytes(key_path)?;
        Self::from_pem_named(
            (&ca, &ca_path.display().to_string()),
            (&cert, &cert_path.display().to_string()),
            (&key, &key_path.display().to_string()),
        )
    }

    /// As [`load`](Self::load), from PEM in memory.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        Self::from_pem_named(
            (ca_pem.as_bytes(), "CA certificate"),
            (cert_pem.as_bytes(), "node certificate"),
            (key_pem.as_bytes(), "node key"),
        )
    }

    fn from_pem_named(
        (ca_pem, ca_what): (&[u8], &str),
        (cert_pem, cert_what): (&[u8], &str),
        (key_pem, key_what): (&[u8], &str),
    ) -> Result<Self, CertError> {
        let ca = first_cert(ca_pem, ca_what)?;
        let chain = parse_certs(cert_pem, cert_what)?;
        let key_str = std::str::from_utf8(key_pem).map_err(|e| CertError::BadPem {
            what: key_what.into(),
            reason: e.to_string(),
        })?;
        let key_pair = KeyPair::from_pem(key_str).map_err(|e| CertError::BadPem {
            what: key_what.into(),
            reason: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::BadPem {
            what: key_what.into(),
            reason: e.to_string(),
        })?;
        let leaf = &chain[0];
        check_key_matches(leaf, &key_pair, cert_what)?;
        let now = UnixTime::now();
        check_validity(&ca, ca_what, now)?;
        check_validity(leaf, cert_what, now)?;
        check_usage(leaf, cert_what)?;
        let node = node_id_of(leaf).map_err(|e| match e {
            CertError::NoNodeId { reason, .. } => CertError::NoNodeId {
                what: cert_what.into(),
                reason,
            },
            other => other,
        })?;
        crate::config::verify_chain(&ca, &chain, now).map_err(|reason| CertError::WrongCa {
            what: cert_what.into(),
            reason,
        })?;
        Ok(Identity {
            node,
            chain,
            key,
            ca,
        })
    }

    /// Fails unless the certificate names `expected`.
    pub fn expect_node(&self, expected: NodeId) -> Result<(), CertError> {
        if self.node != expected {
            return Err(CertError::WrongNode {
                what: "node certificate".into(),
                found: self.node,
                expected,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_parse_only_in_canonical_form() {
        assert_eq!(parse_node_id("1"), Some(NodeId(1)));
        assert_eq!(parse_node_id("0"), Some(NodeId(0)));
        assert_eq!(parse_node_id("1234567"), Some(NodeId(1_234_567)));
        for bad in [
            "01",
            "+1",
            "-1",
            "",
            " 1",
            "1 ",
            "1a",
            "00",
            "0x1",
            "99999999999999999999",
        ] {
            assert_eq!(parse_node_id(bad), None, "{bad:?}");
        }
    }
}
