//! `ha_core`'s log-store conformance suite against [`Wal`], with a reopen that
//! really closes the directory and opens it again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use ha_core::testkit::conformance::log_store_suite;
use ha_wal::{Wal, WalConfig};

fn run(cfg: WalConfig) {
    let root = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    let make = || {
        let dir = root
            .path()
            .join(format!("store-{}", n.fetch_add(1, Ordering::Relaxed)));
        Wal::open(dir, cfg.clone()).expect("open a fresh log")
    };
    let reopen = |wal: Wal| {
        let dir = wal.dir().to_path_buf();
        let cfg = wal.config().clone();
        drop(wal);
        Wal::open(dir, cfg).expect("reopen the log")
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(log_store_suite(make, Some(&reopen)));
}

#[test]
fn conformance_default_config() {
    run(WalConfig::default());
}

/// Tiny segments: every operation crosses segment boundaries.
#[test]
fn conformance_tiny_segments() {
    run(WalConfig::default().with_segment_size(128));
}

#[test]
fn conformance_without_sync() {
    run(WalConfig::default().with_sync(false));
}
