//! The config file: the commented examples load (so they never rot), and bad or
//! inconsistent files are refused with the key at fault.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use ha_core::{CommitMode, ConfiguredRole, NodeId};
use ha_node::config::{ConfigFileError, NodeFile, Role};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn example_text() -> String {
    std::fs::read_to_string(examples().join("primary.toml")).unwrap()
}

/// Checks `text` (relative paths against the examples directory).
fn check(text: &str) -> Result<ha_node::config::Checked, ConfigFileError> {
    NodeFile::parse(text)?.check(&examples())
}

fn refused(text: &str, key: &str) -> ConfigFileError {
    match check(text) {
        Ok(_) => panic!("a config with a bad `{key}` was accepted"),
        Err(e) => {
            assert!(
                e.key == key || e.reason.contains(key),
                "the error must name `{key}`: {e}"
            );
            e
        }
    }
}

#[test]
fn the_example_configs_load_and_describe_one_cluster() {
    let mut members = Vec::new();
    for (file, id, role) in [
        ("primary.toml", 1, Role::Primary),
        ("standby.toml", 2, Role::Standby),
        ("witness.toml", 3, Role::Witness),
    ] {
        let path = examples().join(file);
        let c = NodeFile::load(&path)
            .and_then(|f| f.check(&examples()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.config.node_id, NodeId(id), "{file}");
        assert_eq!(c.file.role, role, "{file}");
        assert_eq!(c.config.commit_mode, CommitMode::Sync);
        assert_eq!(c.config.peers.len(), 2, "{file}");
        assert!(
            c.file.tls.cert.ends_with(format!("node-{id}.pem")),
            "{file}"
        );
        members.push(c.file.members.clone());
    }
    assert!(members.windows(2).all(|w| w[0] == w[1]), "one member list");
    let primary = check(&example_text()).unwrap();
    assert_eq!(primary.config.role, ConfiguredRole::Primary);
    assert_eq!(
        primary.config.heartbeat_interval,
        std::time::Duration::from_millis(50)
    );
}

#[test]
fn an_unknown_key_is_refused_with_its_name_and_line() {
    let text = example_text().replace("strict = false", "strict = false\nstrickt = true");
    let e = check(&text).unwrap_err();
    assert!(e.reason.contains("strickt"), "{e}");
    assert!(e.reason.contains("line"), "the parser's line: {e}");
}

#[test]
fn a_bad_value_is_refused_with_its_key() {
    let text = example_text().replace("\"50ms\"", "\"fifty\"");
    let e = check(&text).unwrap_err();
    assert!(e.reason.contains("heartbeat_interval"), "{e}");
    let text = example_text().replace("commit_mode = \"sync\"", "commit_mode = \"eventually\"");
    let e = check(&text).unwrap_err();
    assert!(e.reason.contains("eventually"), "{e}");
}

#[test]
fn this_node_must_be_a_member_in_its_role() {
    refused(
        &example_text().replace("node_id = 1", "node_id = 9"),
        "node_id",
    );
    refused(
        &example_text().replace("role = \"primary\"", "role = \"witness\""),
        "role",
    );
}

#[test]
fn the_member_list_must_be_consistent() {
    let text = example_text();
    refused(&text.replacen("id = 2", "id = 1", 1), "members[1].id");
    refused(
        &text.replacen("kind = \"witness\"", "kind = \"data\"", 1),
        "members",
    );
    refused(
        &text.replacen("peer = \"127.0.0.1:7002\"", "peer = \"nowhere\"", 1),
        "members[1].peer",
    );
    refused(
        &text.replacen("api = \"http://127.0.0.1:8002\"", "api = \"ftp://x:1\"", 1),
        "members[1].api",
    );
    refused(
        &text.replacen(
            "[advertise]\npeer = \"127.0.0.1:7001\"",
            "[advertise]\npeer = \"127.0.0.1:7999\"",
            1,
        ),
        "advertise.peer",
    );
}

#[test]
fn the_admin_token_is_required_once_and_long_enough() {
    let text = example_text();
    refused(
        &text.replace("token = \"example-admin-token-change-me\"", ""),
        "admin",
    );
    refused(
        &text.replace(
            "token = \"example-admin-token-change-me\"",
            "token = \"example-admin-token-change-me\"\ntoken_file = \"t\"",
        ),
        "admin",
    );
    refused(
        &text.replace(
            "token = \"example-admin-token-change-me\"",
            "token = \"short\"",
        ),
        "admin",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "  a-token-read-from-a-file\n").unwrap();
    let from_file = text.replace(
        "token = \"example-admin-token-change-me\"",
        "token_file = \"token\"",
    );
    let c = NodeFile::parse(&from_file)
        .unwrap()
        .check(dir.path())
        .unwrap();
    assert_eq!(c.admin_token, "a-token-read-from-a-file");
    refused(
        &text.replace(
            "token = \"example-admin-token-change-me\"",
            "token_file = \"missing-token\"",
        ),
        "admin.token_file",
    );
}

/// The replication config's own checks are reported under the file's keys.
#[test]
fn replication_checks_name_the_file_key() {
    refused(
        &example_text().replace("strict = false", "strict = false\nmax_lag_on_failover = 10"),
        "replication.max_lag_on_failover",
    );
}

/// The WAL's retention is read from `[wal]`, and a minimum above its maximum
/// is refused under its key.
#[test]
fn wal_retention_is_read_and_checked() {
    let checked = check(&example_text().replace("keep_entries = 10000", "keep_entries = 7"))
        .expect("a valid retention");
    let r = checked.file.wal.retention().expect("retention");
    assert_eq!((r.keep_entries, r.max_entries), (7, 1_000_000));
    refused(
        &example_text().replace("keep_entries = 10000", "keep_entries = 2000000"),
        "wal.keep_entries",
    );
    refused(
        &example_text().replace("max_bytes = 4294967296", "max_bytes = 1024"),
        "wal.keep_bytes",
    );
    let e = check(&example_text().replace("keep_entries = 10000", "keep_entrys = 1")).unwrap_err();
    assert!(e.reason.contains("keep_entrys"), "{e}");
}
