//! `ha-node certs`: a CA and node certificates that load back as identities,
//! keys mode 0600, the CA reused on a second run; and the binary end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use ha_core::NodeId;
use ha_node::certs::{write, NodeArg};
use ha_tls::Identity;

#[test]
fn node_arguments_parse_names_and_addresses() {
    let a: NodeArg = "2=db2.example,10.0.0.2,::1".parse().unwrap();
    assert_eq!(a.id, NodeId(2));
    assert_eq!(a.dns, vec!["db2.example".to_string()]);
    assert_eq!(a.ips.len(), 2);
    assert!("02".parse::<NodeArg>().is_err(), "non-canonical id");
    assert!("x".parse::<NodeArg>().is_err());
    assert!("1=a,,b".parse::<NodeArg>().is_err(), "empty name");
}

#[test]
fn certificates_load_back_and_the_ca_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeArg> = ["1=127.0.0.1", "2", "3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let w = write(dir.path(), &nodes, 30).unwrap();
    assert!(w.new_ca);
    for (id, cert, key) in &w.nodes {
        let identity = Identity::load(&w.ca, cert, key).unwrap();
        assert_eq!(identity.node, *id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    // A replacement certificate for node 2 comes from the same CA.
    let again = write(dir.path(), &["2".parse().unwrap()], 30).unwrap();
    assert!(!again.new_ca);
    let (_, cert, key) = &again.nodes[0];
    Identity::load(&w.ca, cert, key).unwrap();
}

#[test]
fn the_binary_writes_certificates_and_checks_configs() {
    let bin = env!("CARGO_BIN_EXE_ha-node");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(bin)
        .args(["certs", "--out"])
        .arg(&certs)
        .args(["--node", "1", "--node", "2", "--node", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(certs.join("node-3-key.pem").exists());

    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/primary.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let good = dir.path().join("node.toml");
    std::fs::write(&good, &text).unwrap();
    let out = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node 1"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("node_id = 1", "node_id = 7")).unwrap();
    let out = Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node_id") && err.contains("bad.toml"), "{err}");
}
