//! Certificate generation and loading errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};

use ha_core::types::NodeId;
use ha_tls::certs::{
    node_dns_name, CertError, CertificateAuthority, Identity, NodeCertSpec, CA_CERT_FILE,
    CA_KEY_FILE,
};

fn ca() -> CertificateAuthority {
    CertificateAuthority::generate("test cluster", 30).unwrap()
}

#[test]
fn generate_write_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    ca.write(dir.path()).unwrap();
    let mut spec = NodeCertSpec::new(NodeId(3), 30);
    spec.dns_names.push("db3.example".into());
    spec.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let cert = ca.issue(&spec).unwrap();
    let (cert_path, key_path) = cert.write(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [&key_path, &dir.path().join(CA_KEY_FILE)] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} must be 0600", key.display());
        }
    }
    let id = Identity::load(&dir.path().join(CA_CERT_FILE), &cert_path, &key_path).unwrap();
    assert_eq!(id.node, NodeId(3));
    id.expect_node(NodeId(3)).unwrap();
    assert!(matches!(
        id.expect_node(NodeId(4)),
        Err(CertError::WrongNode { .. })
    ));
    assert_eq!(node_dns_name(NodeId(3)), "node-3");
    // The CA loads back and still issues certificates that chain to it.
    let again = CertificateAuthority::load(
        &dir.path().join(CA_CERT_FILE),
        &dir.path().join(CA_KEY_FILE),
    )
    .unwrap();
    let other = again.issue(&NodeCertSpec::new(NodeId(4), 1)).unwrap();
    let id4 = Identity::from_pem(&ca.cert_pem(), &other.cert_pem, &other.key_pem).unwrap();
    assert_eq!(id4.node, NodeId(4));
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Identity::load(
        &dir.path().join("ca.pem"),
        &dir.path().join("n.pem"),
        &dir.path().join("k.pem"),
    )
    .unwrap_err();
    assert!(
        matches!(err, CertError::Missing(ref p) if p.ends_with("ca.pem")),
        "{err}"
    );
    assert!(err.to_string().contains("missing file"));
}

#[test]
fn key_not_matching_certificate() {
    let ca = ca();
    let a = ca.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let b = ca.issue(&NodeCertSpec::new(NodeId(2), 1)).unwrap();
    let err = Identity::from_pem(&ca.cert_pem(), &a.cert_pem, &b.key_pem).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch(_)), "{err}");
}

#[test]
fn expired_certificate() {
    let ca = ca();
    let mut spec = NodeCertSpec::new(NodeId(1), 1);
    spec.not_before = rcgen::date_time_ymd(2000, 1, 1);
    spec.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let c = ca.issue(&spec).unwrap();
    let err = Identity::from_pem(&ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
}

#[test]
fn not_yet_valid_certificate() {
    let ca = ca();
    let mut spec = NodeCertSpec::new(NodeId(1), 1);
    spec.not_before = rcgen::date_time_ymd(2300, 1, 1);
    spec.not_after = rcgen::date_time_ymd(2301, 1, 1);
    let c = ca.issue(&spec).unwrap();
    let err = Identity::from_pem(&ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap_err();
    assert!(matches!(err, CertError::NotYetValid { .. }), "{err}");
}

#[test]
fn wrong_ca() {
    let ours = ca();
    let theirs = ca();
    let c = theirs.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let err = Identity::from_pem(&ours.cert_pem(), &c.cert_pem, &c.key_pem).unwrap_err();
    assert!(matches!(err, CertError::WrongCa { .. }), "{err}");
}

#[test]
fn garbage_pem() {
    let ca = ca();
    let c = ca.issue(&NodeCertSpec::new(NodeId(1), 1)).unwrap();
    let err = Identity::from_pem(&ca.cert_pem(), "not a pem", &c.key_pem).unwrap_err();
    assert!(matches!(err, CertError::BadPem { .. }), "{err}");
}

/// Any case of the `node-` prefix names a node (DNS names match
/// case-insensitively), so a second, upper-case one is not overlooked.
#[test]
fn a_second_node_name_in_another_case_is_refused() {
    let ca = ca();
    let (cert, key) = ca.issue_named(&["node-1", "NODE-2"], 1).unwrap();
    match Identity::from_pem(&ca.cert_pem(), &cert, &key) {
        Err(CertError::NoNodeId { .. }) => {}
        other => panic!("expected NoNodeId, got {other:?}"),
    }
}

/// A node certificate serves both ends of a connection: one missing TLS
/// server or client authentication is refused at load, naming what it lacks.
#[test]
fn a_certificate_for_one_end_only_is_refused() {
    let ca = ca();
    for (usage, missing) in [
        (rcgen::ExtendedKeyUsagePurpose::ClientAuth, "server"),
        (rcgen::ExtendedKeyUsagePurpose::ServerAuth, "client"),
    ] {
        let (cert, key) = ca.issue_with_usages(&["node-1"], 1, vec![usage]).unwrap();
        match Identity::from_pem(&ca.cert_pem(), &cert, &key) {
            Err(CertError::WrongUsage { missing: m, .. }) => assert!(m.contains(missing), "{m}"),
            other => panic!("expected WrongUsage, got {other:?}"),
        }
    }
}
