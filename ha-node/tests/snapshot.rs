//! A standby whose disk was wiped catches up through a streamed snapshot of a
//! data set larger than 64 MiB (four times the wire's 16 MiB frame cap), with
//! real processes: the snapshot goes in chunks, its bytes never whole in
//! memory, so the receiver's resident memory stays below the data set's size.
//! Every wait polls the API's published state, bounded.

use std::path::Path;
use std::time::Duration;

use ha_node::client::Client;
use ha_node::local::{LocalCluster, LocalOptions};

const STEP: Duration = Duration::from_secs(60);
/// Values just under the API's 1 MiB limit.
const VALUE: usize = (1 << 20) - 1024;
/// 72 of them: about 72 MiB.
const KEYS: usize = 72;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ha-node"))
}

fn value(i: usize) -> Vec<u8> {
    (0..VALUE).map(|b| ((b * 31 + i * 7) % 251) as u8).collect()
}

/// The snapshot data files in a WAL directory, with their sizes.
fn snapshot_files(wal: &Path) -> Vec<u64> {
    std::fs::read_dir(wal)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("snap-") && name.ends_with(".snap")
                })
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_wiped_standby_catches_up_by_a_streamed_snapshot_with_bounded_memory() {
    let mut c = LocalCluster::create(
        exe(),
        &LocalOptions {
            replication_extra: "snapshot_every = 16".into(),
            // Keep no log for a lagging standby: the wiped one needs the snapshot.
            sections_extra:
                "[wal]\nkeep_entries = 0\nkeep_bytes = 0\nmax_entries = 16\nmax_bytes = 1048576\n"
                    .into(),
            ..LocalOptions::default()
        },
    )
    .expect("cluster");
    c.start_all().expect("start");
    let p = c
        .wait_for(&[1, 2], STEP, "a writable primary", |s| s.writable)
        .expect("primary")
        .node_id;
    let s = if p == 1 { 2 } else { 1 };
    let writer = Client::new(Duration::from_secs(30), None);
    let pa = c.api(p).to_string();
    for i in 0..KEYS {
        let r = writer
            .request("PUT", &format!("{pa}/v1/kv/big/{i:03}"), Some(&value(i)))
            .expect("put");
        assert_eq!(r.status, 200, "put {i}: {}", r.text());
    }

    // The standby is killed and its disk wiped; it comes back as a new member
    // of the existing cluster.
    c.kill(s);
    let data = c.dir().join(format!("data/n{s}"));
    std::fs::remove_dir_all(&data).expect("wipe");
    let config = c.config(s);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("cluster_state = \"new\"", "cluster_state = \"existing\""),
    )
    .expect("config");
    // More writes: the primary snapshots and compacts past everything.
    for i in 0..20 {
        let r = writer
            .request("PUT", &format!("{pa}/v1/kv/small/{i}"), Some(b"x"))
            .expect("put");
        assert_eq!(r.status, 200, "small put {i}: {}", r.text());
    }
    let commit = c.status(p).expect("primary status").commit_index;
    c.start(s).expect("restart the standby");
    c.wait_for(&[s], STEP, "the wiped standby to catch up", |st| {
        st.applied_index >= commit
    })
    .expect("caught up");

    // It went through a snapshot from the primary, larger than 64 MiB.
    let log = std::fs::read_to_string(c.log(s)).expect("the standby's log");
    assert!(
        log.contains("snapshot installed"),
        "the standby installed the primary's snapshot"
    );
    let sizes = snapshot_files(&data.join("wal"));
    assert!(
        sizes.iter().any(|n| *n > 64 << 20),
        "a snapshot over 64 MiB was installed: {sizes:?}"
    );
    // Every value is there, byte for byte.
    let sa = c.api(s).to_string();
    for i in [0, KEYS / 2, KEYS - 1] {
        let r = writer
            .request("GET", &format!("{sa}/v1/kv/big/{i:03}?stale=true"), None)
            .expect("get");
        assert_eq!(r.status, 200, "get {i}");
        assert!(r.body == value(i), "value {i} differs");
    }
    // Its resident memory never came near the data set's size.
    let data_bytes = (KEYS * VALUE) as u64;
    let peak = c.peak_rss(s).expect("peak rss");
    eprintln!(
        "wiped standby: peak RSS {} MiB while installing a {} MiB snapshot",
        peak >> 20,
        sizes.iter().max().copied().unwrap_or(0) >> 20
    );
    assert!(
        peak < data_bytes,
        "peak RSS {peak} bytes, not below the {data_bytes}-byte data set"
    );
    c.teardown(false);
}
