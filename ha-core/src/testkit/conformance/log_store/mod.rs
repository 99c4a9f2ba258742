//! The [`LogStore`] conformance suite.

use std::fmt::Debug;
use std::future::Future;
use std::io::{Read, Write};

use crate::error::StorageError;
use crate::log_store::{CatchUpBatch, LogStore, Snapshot, StoredState};
use crate::types::{Command, HardState, LogIndex, NodeId, Payload, Position, Term, WalEntry};

mod snapshots;

pub use snapshots::*;

/// Runs every log-store check, each on a fresh store from `make`.
///
/// `reopen` stands for closing a store and opening its directory again (for an
/// in-memory store, the identity); with `Some`, [`check_reopen`] checks that a
/// reopened store reads back what was written. Pass `None` for a store that cannot
/// be reopened.
///
/// ```
/// # use ha_core::testkit::{conformance::log_store_suite, memory::MemLogStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// log_store_suite(MemLogStore::new, Some(&|s| s)).await;
/// # });
/// ```
pub async fn log_store_suite<S: LogStore>(
    make: impl Fn() -> S,
    reopen: Option<&(dyn Fn(S) -> S + Sync)>,
) {
    check_empty_load(&make()).await;
    check_append_and_read(&make()).await;
    check_read_max_bytes(&make()).await;
    check_append_gap_refused(&make()).await;
    check_bad_checksum_refused(&make()).await;
    check_call_order(&make()).await;
    check_truncate_then_append(&make()).await;
    check_purge_prefix(&make()).await;
    check_read_batch(&make()).await;
    check_hard_state(&make()).await;
    check_snapshot_save_load(&make()).await;
    check_install_snapshot_matching_suffix(&make()).await;
    check_install_snapshot_conflicting(&make()).await;
    check_install_snapshot_beyond_log(&make()).await;
    check_install_snapshot_on_empty(&make()).await;
    check_snapshot_streams(&make()).await;
    check_snapshots_kept(&make()).await;
    check_unfinished_snapshot_discarded(&make()).await;
    if let Some(reopen) = reopen {
        check_reopen(make(), reopen).await;
    }
}

pub(super) fn term(number: u64) -> Term {
    Term {
        number,
        node: NodeId(number % 2 + 1),
    }
}

pub(super) fn pos(t: u64, index: u64) -> Position {
    Position::new(term(t), LogIndex(index))
}

/// A command entry in term `t` at `index`, with a payload naming both.
pub(super) fn entry(t: u64, index: u64) -> WalEntry {
    WalEntry::new(
        pos(t, index),
        Payload::Command(Command(format!("entry {t}/{index}").into_bytes())),
    )
}

/// Entries `from..=to`, all in term `t`.
pub(super) fn entries(t: u64, from: u64, to: u64) -> Vec<WalEntry> {
    (from..=to).map(|i| entry(t, i)).collect()
}

/// The bytes of the suite's snapshot at `at`.
pub(super) fn state_at(at: Position) -> Vec<u8> {
    format!("state at {at}").into_bytes()
}

/// Writes the suite's snapshot at `at` into `store` (finished, not saved).
pub(super) fn snapshot<S: LogStore>(store: &S, at: Position) -> Snapshot {
    write_snapshot(store, at, &state_at(at))
}

/// Writes `data` as a snapshot at `at`, in pieces (finished, not saved).
pub(super) fn write_snapshot<S: LogStore>(store: &S, at: Position, data: &[u8]) -> Snapshot {
    let mut w = match store.snapshot_writer(at) {
        Ok(w) => w,
        Err(e) => panic!("[log_store_suite] snapshot_writer at {at} failed: {e}"),
    };
    for piece in data.chunks(4096) {
        if let Err(e) = w.write_all(piece) {
            panic!("[log_store_suite] writing the snapshot at {at} failed: {e}");
        }
    }
    assert_eq!(
        w.written(),
        data.len() as u64,
        "[log_store_suite] a snapshot writer counts what it wrote"
    );
    match w.finish() {
        Ok(s) => {
            assert_eq!(
                s,
                Snapshot {
                    last_included: at,
                    size: data.len() as u64
                },
                "[log_store_suite] a finished snapshot names its position and size"
            );
            s
        }
        Err(e) => panic!("[log_store_suite] finishing the snapshot at {at} failed: {e}"),
    }
}

/// Reads a snapshot whole, with `snapshot_reader`.
pub(super) fn read_whole<S: LogStore>(store: &S, snap: Snapshot) -> Result<Vec<u8>, StorageError> {
    let mut r = store.snapshot_reader(snap)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .map_err(|e| StorageError::Io(e.to_string()))?;
    Ok(out)
}

/// Awaits a store operation that must succeed.
pub(super) async fn ok<T>(
    check: &str,
    what: &str,
    f: impl Future<Output = Result<T, StorageError>>,
) -> T {
    match f.await {
        Ok(v) => v,
        Err(e) => panic!("[log_store_suite::{check}] {what}: unexpected error {e}"),
    }
}

/// Awaits a store operation that must fail with [`StorageError::Invalid`].
pub(super) async fn invalid<T: Debug>(
    check: &str,
    what: &str,
    f: impl Future<Output = Result<T, StorageError>>,
) {
    match f.await {
        Err(StorageError::Invalid(_)) => {}
        Err(e) => {
            panic!("[log_store_suite::{check}] {what}: expected StorageError::Invalid, got {e}")
        }
        Ok(v) => panic!(
            "[log_store_suite::{check}] {what}: expected StorageError::Invalid, got Ok({v:?})"
        ),
    }
}

pub(super) async fn expect_last<S: LogStore>(check: &str, what: &str, store: &S, want: Position) {
    let last = ok(check, "last_position", store.last_position()).await;
    assert_eq!(
        last, want,
        "[log_store_suite::{check}] last_position {what}"
    );
}

pub(super) async fn expect_read<S: LogStore>(
    check: &str,
    store: &S,
    from: u64,
    to: u64,
    want: &[WalEntry],
) {
    let what = format!("read [{from}, {to})");
    let got = ok(
        check,
        &what,
        store.read(LogIndex(from), LogIndex(to), usize::MAX),
    )
    .await;
    assert_eq!(
        got, want,
        "[log_store_suite::{check}] {what} returned other entries"
    );
}

pub(super) async fn expect_load<S: LogStore>(
    check: &str,
    what: &str,
    store: &S,
    want: &StoredState,
) {
    let got = ok(check, "load", store.load()).await;
    assert_eq!(&got, want, "[log_store_suite::{check}] load {what}");
}

/// A fresh store loads as empty and its last position is the empty log's.
pub async fn check_empty_load<S: LogStore>(store: &S) {
    const C: &str = "empty_load";
    expect_load(C, "of a fresh store", store, &StoredState::default()).await;
    expect_last(C, "of a fresh store", store, Position::ZERO).await;
}

/// Appends in two batches, then reads whole and partial ranges and loads.
pub async fn check_append_and_read<S: LogStore>(store: &S) {
    const C: &str = "append_and_read";
    let all: Vec<WalEntry> = entries(1, 1, 3)
        .into_iter()
        .chain(entries(2, 4, 6))
        .collect();
    ok(C, "append 1..=3", store.append(all[..3].to_vec())).await;
    expect_last(C, "after appending 1..=3", store, pos(1, 3)).await;
    ok(C, "append 4..=6", store.append(all[3..].to_vec())).await;
    expect_last(C, "after appending 4..=6", store, pos(2, 6)).await;
    expect_read(C, store, 1, 7, &all).await;
    expect_read(C, store, 2, 5, &all[1..4]).await;
    expect_read(C, store, 6, 7, &all[5..]).await;
    expect_read(C, store, 3, 3, &[]).await;
    expect_load(
        C,
        "after appends",
        store,
        &StoredState {
            hard_state: None,
            snapshot: None,
            entries: all,
        },
    )
    .await;
}

/// `max_bytes` bounds a read, which still returns at least one entry.
pub async fn check_read_max_bytes<S: LogStore>(store: &S) {
    const C: &str = "read_max_bytes";
    let all = entries(1, 1, 10);
    ok(C, "append 1..=10", store.append(all.clone())).await;
    let one = ok(
        C,
        "read with max_bytes 0",
        store.read(LogIndex(3), LogIndex(11), 0),
    )
    .await;
    assert_eq!(
        one,
        all[2..3],
        "[log_store_suite::{C}] max_bytes 0 must return exactly the first entry"
    );
    let one = ok(
        C,
        "read with max_bytes 1",
        store.read(LogIndex(1), LogIndex(11), 1),
    )
    .await;
    assert_eq!(
        one,
        all[..1],
        "[log_store_suite::{C}] max_bytes 1 must return exactly the first entry"
    );
    let budget = all[..3].iter().map(WalEntry::approx_size).sum();
    let some = ok(
        C,
        "read with a budget of about three entries",
        store.read(LogIndex(1), LogIndex(11), budget),
    )
    .await;
    assert!(
        !some.is_empty() && some.len() < all.len() && some[..] == all[..some.len()],
        "[log_store_suite::{C}] a read bounded to about three entries' size must return a non-empty proper \
         prefix of the range, got {} entries",
        some.len()
    );
    let every = ok(
        C,
        "read with max_bytes usize::MAX",
        store.read(LogIndex(1), LogIndex(11), usize::MAX),
    )
    .await;
    assert_eq!(
        every, all,
        "[log_store_suite::{C}] an unbounded read must return the whole range"
    );
}

/// An append that leaves a gap (before or inside the batch) is refused and leaves
/// the log unchanged.
pub async fn check_append_gap_refused<S: LogStore>(store: &S) {
    const C: &str = "append_gap_refused";
    invalid(
        C,
        "first append starting at index 2",
        store.append(vec![entry(1, 2)]),
    )
    .await;
    expect_last(C, "after a refused first append", store, Position::ZERO).await;
    ok(C, "append 1..=3", store.append(entries(1, 1, 3))).await;
    invalid(
        C,
        "append of index 5 after 3",
        store.append(vec![entry(1, 5)]),
    )
    .await;
    invalid(
        C,
        "append of a batch 4, 6",
        store.append(vec![entry(1, 4), entry(1, 6)]),
    )
    .await;
    invalid(
        C,
        "append of index 3 again (overlap)",
        store.append(vec![entry(1, 3)]),
    )
    .await;
    expect_last(C, "after refused appends", store, pos(1, 3)).await;
    expect_read(C, store, 1, 4, &entries(1, 1, 3)).await;
    ok(
        C,
        "append 4 after the refusals",
        store.append(vec![entry(1, 4)]),
    )
    .await;
    expect_last(C, "after appending 4", store, pos(1, 4)).await;
}

/// An entry whose checksum fails is refused, with the rest of its batch.
pub async fn check_bad_checksum_refused<S: LogStore>(store: &S) {
    const C: &str = "bad_checksum_refused";
    ok(C, "append 1..=2", store.append(entries(1, 1, 2))).await;
    let mut bad = entry(1, 3);
    bad.checksum ^= 1;
    invalid(
        C,
        "append of an entry with a wrong checksum",
        store.append(vec![bad]),
    )
    .await;
    let mut tampered = entry(1, 4);
    tampered.payload = Payload::Command(Command(b"tampered".to_vec()));
    invalid(
        C,
        "append of a good entry then a tampered one",
        store.append(vec![entry(1, 3), tampered]),
    )
    .await;
    expect_last(C, "after refused appends", store, pos(1, 2)).await;
    expect_read(C, store, 1, 3, &entries(1, 1, 2)).await;
}

/// Operations take effect in call order, not in the order their futures are
/// awaited.
pub async fn check_call_order<S: LogStore>(store: &S) {
    const C: &str = "call_order";
    let first = store.append(entries(1, 1, 3));
    let second = store.truncate_suffix(LogIndex(2));
    let third = store.append(entries(2, 2, 2));
    // Awaited last-first: a store that acts when polled would see a gap here.
    ok(C, "append 2 in term 2 (awaited first)", third).await;
    ok(C, "truncate from 2 (awaited second)", second).await;
    ok(C, "append 1..=3 (awaited last)", first).await;
    expect_last(C, "after append, truncate, append", store, pos(2, 2)).await;
    expect_read(C, store, 1, 3, &[entry(1, 1), entry(2, 2)]).await;
}

/// `truncate_suffix` removes the suffix; the log then accepts a different term.
pub async fn check_truncate_then_append<S: LogStore>(store: &S) {
    const C: &str = "truncate_then_append";
    ok(C, "append 1..=5", store.append(entries(1, 1, 5))).await;
    ok(
        C,
        "truncate_suffix past the end",
        store.truncate_suffix(LogIndex(9)),
    )
    .await;
    expect_last(C, "after truncating past the end", store, pos(1, 5)).await;
    ok(C, "truncate_suffix(3)", store.truncate_suffix(LogIndex(3))).await;
    expect_last(C, "after truncate_suffix(3)", store, pos(1, 2)).await;
    expect_read(C, store, 1, 3, &entries(1, 1, 2)).await;
    let fresh = entries(2, 3, 4);
    ok(C, "append 3..=4 in term 2", store.append(fresh.clone())).await;
    expect_last(C, "after appending a new term", store, pos(2, 4)).await;
    let want: Vec<WalEntry> = entries(1, 1, 2).into_iter().chain(fresh).collect();
    expect_read(C, store, 1, 5, &want).await;
    expect_load(
        C,
        "after truncate and append",
        store,
        &StoredState {
            hard_state: None,
            snapshot: None,
            entries: want,
        },
    )
    .await;
}

/// After a snapshot and `purge_prefix`, reading purged entries is an error and
/// later entries remain.
pub async fn check_purge_prefix<S: LogStore>(store: &S) {
    const C: &str = "purge_prefix";
    ok(C, "append 1..=10", store.append(entries(1, 1, 10))).await;
    let snap = snapshot(store, pos(1, 5));
    ok(C, "save_snapshot at 5", store.save_snapshot(snap)).await;
    ok(C, "purge_prefix(5)", store.purge_prefix(LogIndex(5))).await;
    invalid(
        C,
        "read [1, 11) after purging up to 5",
        store.read(LogIndex(1), LogIndex(11), usize::MAX),
    )
    .await;
    invalid(
        C,
        "read [5, 6) after purging up to 5",
        store.read(LogIndex(5), LogIndex(6), usize::MAX),
    )
    .await;
    expect_read(C, store, 6, 11, &entries(1, 6, 10)).await;
    expect_last(C, "after purge", store, pos(1, 10)).await;
    let want = StoredState {
        hard_state: None,
        snapshot: Some(snap),
        entries: entries(1, 6, 10),
    };
    expect_load(C, "after purge", store, &want).await;
    ok(C, "append 11 after purge", store.append(vec![entry(1, 11)])).await;
    expect_last(C, "after append", store, pos(1, 11)).await;
}

/// A catch-up batch starts at the requested index with the position before it,
/// is bounded by entries and bytes (at least one entry), and is refused for
/// purged entries and past the end.
pub async fn check_read_batch<S: LogStore>(store: &S) {
    const C: &str = "read_batch";
    ok(
        C,
        "append 1..=10 in term 1",
        store.append(entries(1, 1, 10)),
    )
    .await;
    ok(
        C,
        "append 11..=20 in term 2",
        store.append(entries(2, 11, 20)),
    )
    .await;
    let expect = |what: &str, got: CatchUpBatch, prev: Position, want: Vec<WalEntry>| {
        let want = CatchUpBatch {
            prev,
            entries: want,
        };
        assert_eq!(got, want, "[log_store_suite::{C}] {what}");
    };
    let b = ok(C, "from 1", store.read_batch(LogIndex(1), 3, usize::MAX)).await;
    expect("from 1", b, Position::ZERO, entries(1, 1, 3));
    let b = ok(C, "from 11", store.read_batch(LogIndex(11), 5, usize::MAX)).await;
    expect("across a term change", b, pos(1, 10), entries(2, 11, 15));
    let b = ok(
        C,
        "from 18",
        store.read_batch(LogIndex(18), 100, usize::MAX),
    )
    .await;
    expect("to the end", b, pos(2, 17), entries(2, 18, 20));
    let b = ok(C, "one byte", store.read_batch(LogIndex(4), 100, 1)).await;
    expect(
        "a byte bound below one entry",
        b,
        pos(1, 3),
        entries(1, 4, 4),
    );
    let two = entry(1, 4).approx_size() + entry(1, 5).approx_size();
    let b = ok(
        C,
        "two entries' bytes",
        store.read_batch(LogIndex(4), 100, two),
    )
    .await;
    expect(
        "a byte bound of two entries",
        b,
        pos(1, 3),
        entries(1, 4, 5),
    );
    invalid(
        C,
        "past the end",
        store.read_batch(LogIndex(21), 5, usize::MAX),
    )
    .await;

    ok(
        C,
        "save_snapshot at 8",
        store.save_snapshot(snapshot(store, pos(1, 8))),
    )
    .await;
    ok(C, "purge_prefix(6)", store.purge_prefix(LogIndex(6))).await;
    let b = ok(
        C,
        "from 8 after purge",
        store.read_batch(LogIndex(8), 2, usize::MAX),
    )
    .await;
    expect("after purging up to 6", b, pos(1, 7), entries(1, 8, 9));
    for next in [1, 3, 6] {
        invalid(
            C,
            &format!("from {next} after purging up to 6"),
            store.read_batch(LogIndex(next), 5, usize::MAX),
        )
        .await;
    }
    // Right after the purge point a store may know the position before (the
    // log's base) or refuse; it never answers with other entries.
    if let Ok(b) = store.read_batch(LogIndex(7), 2, usize::MAX).await {
        expect("from the purge point", b, pos(1, 6), entries(1, 7, 8));
    }
}

/// The hard state (with floors) reads back as saved, and a save replaces it.
pub async fn check_hard_state<S: LogStore>(store: &S) {
    const C: &str = "hard_state";
    let mut hs = HardState::bootstrap();
    hs.current_term = term(4);
    hs.voted_for = Some(NodeId(2));
    hs.raise_floor(NodeId(1), pos(3, 17));
    hs.raise_floor(NodeId(2), pos(4, 20));
    ok(C, "save_hard_state", store.save_hard_state(hs.clone())).await;
    let loaded = ok(C, "load", store.load()).await;
    assert_eq!(
        loaded.hard_state.as_ref(),
        Some(&hs),
        "[log_store_suite::{C}] hard state must read back as saved"
    );
    ok(C, "append 1..=2", store.append(entries(1, 1, 2))).await;
    let mut next = HardState::joining();
    next.current_term = term(5);
    ok(
        C,
        "save_hard_state again",
        store.save_hard_state(next.clone()),
    )
    .await;
    let loaded = ok(C, "load", store.load()).await;
    assert_eq!(
        loaded.hard_state,
        Some(next),
        "[log_store_suite::{C}] a second save must replace the hard state"
    );
    assert_eq!(
        loaded.entries,
        entries(1, 1, 2),
        "[log_store_suite::{C}] saving hard state must not touch entries"
    );
}

/// A reopened store loads the same state (hard state, snapshot, purged prefix,
/// truncated suffix) and goes on from it.
pub async fn check_reopen<S: LogStore>(store: S, reopen: &(dyn Fn(S) -> S + Sync)) {
    const C: &str = "reopen";
    let mut hs = HardState::bootstrap();
    hs.current_term = term(2);
    hs.voted_for = Some(NodeId(1));
    hs.raise_floor(NodeId(2), pos(2, 6));
    ok(C, "save_hard_state", store.save_hard_state(hs)).await;
    ok(C, "append 1..=6", store.append(entries(1, 1, 6))).await;
    ok(
        C,
        "save_snapshot at 3",
        store.save_snapshot(snapshot(&store, pos(1, 3))),
    )
    .await;
    ok(C, "purge_prefix(2)", store.purge_prefix(LogIndex(2))).await;
    ok(C, "truncate_suffix(6)", store.truncate_suffix(LogIndex(6))).await;
    ok(C, "append 6..=7 in term 2", store.append(entries(2, 6, 7))).await;
    let before = ok(C, "load before reopening", store.load()).await;
    let last = ok(C, "last_position before reopening", store.last_position()).await;
    assert_eq!(
        last,
        pos(2, 7),
        "[log_store_suite::{C}] last_position before reopening"
    );

    let store = reopen(store);
    expect_load(C, "after reopening", &store, &before).await;
    if let Some(snap) = before.snapshot {
        assert!(
            read_whole(&store, snap).is_ok_and(|b| b == state_at(pos(1, 3))),
            "[log_store_suite::{C}] the snapshot's bytes survive reopening"
        );
    }
    expect_last(C, "after reopening", &store, last).await;
    expect_read(
        C,
        &store,
        4,
        8,
        &[entry(1, 4), entry(1, 5), entry(2, 6), entry(2, 7)],
    )
    .await;
    ok(
        C,
        "append 8 after reopening",
        store.append(vec![entry(2, 8)]),
    )
    .await;

    let store = reopen(store);
    expect_last(C, "after a second reopen", &store, pos(2, 8)).await;
    let loaded = ok(C, "load after a second reopen", store.load()).await;
    assert_eq!(
        loaded.entries.last(),
        Some(&entry(2, 8)),
        "[log_store_suite::{C}] an entry appended after reopening must survive the next reopen"
    );
}
