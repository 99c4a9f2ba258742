//! The snapshot checks of the [`LogStore`] conformance suite.

use super::*;
use crate::log_store::{LogStore, Snapshot, StoredState};

/// A saved snapshot loads back and a later one replaces it; entries it covers are
/// not returned by `load` but stay readable until purged.
pub async fn check_snapshot_save_load<S: LogStore>(store: &S) {
    const C: &str = "snapshot_save_load";
    ok(C, "append 1..=4", store.append(entries(1, 1, 4))).await;
    let first = snapshot(store, pos(1, 2));
    ok(C, "save_snapshot at 2", store.save_snapshot(first)).await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(first),
        entries: entries(1, 3, 4),
    };
    expect_load(C, "after a snapshot at 2", store, &want).await;
    expect_last(C, "after a snapshot without purge", store, pos(1, 4)).await;
    expect_read(C, store, 1, 5, &entries(1, 1, 4)).await;
    let second = snapshot(store, pos(1, 3));
    ok(C, "save_snapshot at 3", store.save_snapshot(second)).await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(second),
        entries: entries(1, 4, 4),
    };
    expect_load(C, "after a second snapshot at 3", store, &want).await;
}

/// `install_snapshot` at a position the log holds keeps the suffix after it.
pub async fn check_install_snapshot_matching_suffix<S: LogStore>(store: &S) {
    const C: &str = "install_snapshot_matching_suffix";
    ok(C, "append 1..=6", store.append(entries(1, 1, 6))).await;
    let snap = snapshot(store, pos(1, 4));
    ok(
        C,
        "install_snapshot at (1, 4)",
        store.install_snapshot(snap),
    )
    .await;
    expect_last(
        C,
        "after installing a snapshot inside the log",
        store,
        pos(1, 6),
    )
    .await;
    expect_read(C, store, 5, 7, &entries(1, 5, 6)).await;
    invalid(
        C,
        "read [4, 5) under the installed snapshot",
        store.read(LogIndex(4), LogIndex(5), usize::MAX),
    )
    .await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(snap),
        entries: entries(1, 5, 6),
    };
    expect_load(C, "after install_snapshot", store, &want).await;
    ok(C, "append 7", store.append(vec![entry(1, 7)])).await;
    expect_last(C, "after append", store, pos(1, 7)).await;
}

/// `install_snapshot` at a position whose term conflicts with the log drops the
/// whole log.
pub async fn check_install_snapshot_conflicting<S: LogStore>(store: &S) {
    const C: &str = "install_snapshot_conflicting";
    ok(C, "append 1..=6 in term 1", store.append(entries(1, 1, 6))).await;
    let snap = snapshot(store, pos(2, 4));
    ok(
        C,
        "install_snapshot at (2, 4)",
        store.install_snapshot(snap),
    )
    .await;
    expect_last(
        C,
        "after installing a conflicting snapshot",
        store,
        pos(2, 4),
    )
    .await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(snap),
        entries: Vec::new(),
    };
    expect_load(C, "after install_snapshot", store, &want).await;
    invalid(
        C,
        "read [1, 7) after install",
        store.read(LogIndex(1), LogIndex(7), usize::MAX),
    )
    .await;
    invalid(
        C,
        "append at 7 (a gap after the snapshot)",
        store.append(vec![entry(2, 7)]),
    )
    .await;
    ok(C, "append 5 in term 2", store.append(vec![entry(2, 5)])).await;
    expect_last(C, "after append", store, pos(2, 5)).await;
    expect_read(C, store, 5, 6, &[entry(2, 5)]).await;
}

/// `install_snapshot` past the end of the log drops the whole log.
pub async fn check_install_snapshot_beyond_log<S: LogStore>(store: &S) {
    const C: &str = "install_snapshot_beyond_log";
    ok(C, "append 1..=3", store.append(entries(1, 1, 3))).await;
    let snap = snapshot(store, pos(1, 8));
    ok(
        C,
        "install_snapshot at (1, 8)",
        store.install_snapshot(snap),
    )
    .await;
    expect_last(
        C,
        "after installing a snapshot past the log",
        store,
        pos(1, 8),
    )
    .await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(snap),
        entries: Vec::new(),
    };
    expect_load(C, "after install_snapshot", store, &want).await;
    ok(C, "append 9", store.append(vec![entry(1, 9)])).await;
    expect_read(C, store, 9, 10, &[entry(1, 9)]).await;
}

/// `install_snapshot` on a fresh store.
pub async fn check_install_snapshot_on_empty<S: LogStore>(store: &S) {
    const C: &str = "install_snapshot_on_empty";
    let snap = snapshot(store, pos(3, 5));
    ok(
        C,
        "install_snapshot at (3, 5)",
        store.install_snapshot(snap),
    )
    .await;
    expect_last(C, "after installing on an empty store", store, pos(3, 5)).await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(snap),
        entries: Vec::new(),
    };
    expect_load(C, "after install_snapshot", store, &want).await;
    ok(C, "append 6 in term 3", store.append(vec![entry(3, 6)])).await;
    expect_last(C, "after append", store, pos(3, 6)).await;
}

/// A snapshot streams in and out: written in pieces, it reads back whole and
/// in chunks (before and after its save), and a read past its end fails.
pub async fn check_snapshot_streams<S: LogStore>(store: &S) {
    const C: &str = "snapshot_streams";
    ok(C, "append 1..=4", store.append(entries(1, 1, 4))).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let snap = write_snapshot(store, pos(1, 3), &data);
    let whole = read_whole(store, snap);
    assert!(
        whole.as_deref() == Ok(&data[..]),
        "[log_store_suite::{C}] a finished snapshot reads back whole before its save"
    );
    ok(C, "save_snapshot at 3", store.save_snapshot(snap)).await;
    let whole = read_whole(store, snap);
    assert!(
        whole.as_deref() == Ok(&data[..]),
        "[log_store_suite::{C}] the saved snapshot reads back whole"
    );
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    while offset < snap.size {
        let chunk = ok(
            C,
            "read_snapshot",
            store.read_snapshot(snap, offset, 65_536),
        )
        .await;
        assert!(
            !chunk.is_empty() && chunk.len() <= 65_536,
            "[log_store_suite::{C}] a chunk is at most max_bytes, and not empty before the end"
        );
        offset += chunk.len() as u64;
        chunks.extend_from_slice(&chunk);
    }
    assert!(
        chunks == data,
        "[log_store_suite::{C}] the chunks put together are the snapshot"
    );
    let at_end = ok(
        C,
        "read_snapshot at its end",
        store.read_snapshot(snap, snap.size, 1024),
    )
    .await;
    assert!(
        at_end.is_empty(),
        "[log_store_suite::{C}] a read at the snapshot's end is empty"
    );
    assert!(
        store
            .read_snapshot(snap, snap.size + 1, 1024)
            .await
            .is_err(),
        "[log_store_suite::{C}] a read past the snapshot's end fails"
    );
    let loaded = ok(C, "load", store.load()).await;
    assert_eq!(
        loaded.snapshot,
        Some(snap),
        "[log_store_suite::{C}] load names the saved snapshot"
    );
}

/// The store keeps its snapshot and the one before; saving the one before
/// makes it the store's again; an older one is gone.
pub async fn check_snapshots_kept<S: LogStore>(store: &S) {
    const C: &str = "snapshots_kept";
    ok(C, "append 1..=6", store.append(entries(1, 1, 6))).await;
    let s2 = snapshot(store, pos(1, 2));
    ok(C, "save_snapshot at 2", store.save_snapshot(s2)).await;
    let s4 = snapshot(store, pos(1, 4));
    ok(C, "save_snapshot at 4", store.save_snapshot(s4)).await;
    assert!(
        read_whole(store, s2).is_ok_and(|b| b == state_at(pos(1, 2))),
        "[log_store_suite::{C}] the snapshot before the store's is kept"
    );
    // An async-mode rewind: back to the one before.
    ok(C, "save_snapshot at 2 again", store.save_snapshot(s2)).await;
    let loaded = ok(C, "load after saving the kept one", store.load()).await;
    assert_eq!(
        loaded.snapshot,
        Some(s2),
        "[log_store_suite::{C}] saving a kept snapshot makes it the store's"
    );
    let s5 = snapshot(store, pos(1, 5));
    ok(C, "save_snapshot at 5", store.save_snapshot(s5)).await;
    let s6 = snapshot(store, pos(1, 6));
    ok(C, "save_snapshot at 6", store.save_snapshot(s6)).await;
    assert!(
        read_whole(store, s2).is_err(),
        "[log_store_suite::{C}] a snapshot two saves old is not kept"
    );
    assert!(
        store.save_snapshot(s2).await.is_err(),
        "[log_store_suite::{C}] a snapshot that is not kept cannot be saved"
    );
    assert!(
        read_whole(store, s5).is_ok_and(|b| b == state_at(pos(1, 5)))
            && read_whole(store, s6).is_ok_and(|b| b == state_at(pos(1, 6))),
        "[log_store_suite::{C}] the store's snapshot and the one before read back"
    );
}

/// A writer dropped unfinished leaves nothing to save.
pub async fn check_unfinished_snapshot_discarded<S: LogStore>(store: &S) {
    const C: &str = "unfinished_snapshot_discarded";
    ok(C, "append 1..=3", store.append(entries(1, 1, 3))).await;
    let done = snapshot(store, pos(1, 2));
    ok(C, "save_snapshot at 2", store.save_snapshot(done)).await;
    {
        let mut w = match store.snapshot_writer(pos(1, 3)) {
            Ok(w) => w,
            Err(e) => panic!("[log_store_suite::{C}] snapshot_writer failed: {e}"),
        };
        assert!(
            w.write_all(b"half a state").is_ok(),
            "[log_store_suite::{C}] writing"
        );
    }
    let never = Snapshot {
        last_included: pos(1, 3),
        size: 12,
    };
    assert!(
        store.save_snapshot(never).await.is_err(),
        "[log_store_suite::{C}] an unfinished snapshot cannot be saved"
    );
    let loaded = ok(C, "load", store.load()).await;
    assert_eq!(
        loaded.snapshot,
        Some(done),
        "[log_store_suite::{C}] the store's snapshot is unchanged"
    );
}
