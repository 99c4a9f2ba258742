//! The lock file, group-commit metrics, segment deletion, reads ordered after
//! earlier calls, and the retention policy over a real log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::sync::Arc;

use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_core::StorageError;
use ha_wal::{RetainedLog, Retention, Wal, WalConfig, LOCK_FILE};
use parking_lot::Mutex;

const T1: Term = Term {
    number: 1,
    node: NodeId(1),
};

fn entry(i: u64, size: usize) -> WalEntry {
    WalEntry::new(
        Position::new(T1, LogIndex(i)),
        Payload::Command(Command(vec![i as u8; size])),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

#[test]
fn a_second_open_of_the_same_directory_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Wal::open_default(tmp.path()).unwrap();
    let err = Wal::open_default(tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StorageError::Io(_)), "{err:?}");
    assert!(
        msg.contains("already in use") && msg.contains(LOCK_FILE),
        "a clear message: {msg}"
    );
    assert!(
        msg.contains(&tmp.path().display().to_string()),
        "names the directory: {msg}"
    );
    // Still refused while the first is open, from another thread too.
    let path = tmp.path().to_path_buf();
    std::thread::spawn(move || assert!(Wal::open_default(path).is_err()))
        .join()
        .unwrap();
    drop(first);
    // Released on drop.
    let again = Wal::open_default(tmp.path()).unwrap();
    drop(again);
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::open_default(tmp.path()).unwrap());
    let next = Arc::new(Mutex::new(0u64));
    rt().block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let wal = wal.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let fut = {
                            let mut n = next.lock();
                            *n += 1;
                            wal.append(vec![entry(*n, 100)])
                        };
                        fut.await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let m = wal.metrics();
    assert_eq!(m.entries, 1600);
    assert_eq!(m.appends, 1600);
    assert!(m.bytes > 1600 * 100);
    assert!(
        m.entries_per_fsync() > 2.0,
        "group commit: {m:?}, {} entries per fsync",
        m.entries_per_fsync()
    );
    let state = rt().block_on(wal.load()).unwrap();
    assert_eq!(state.entries.len(), 1600);
    for (k, e) in state.entries.iter().enumerate() {
        assert_eq!(e.index(), LogIndex(k as u64 + 1));
    }
}

#[test]
fn reads_see_operations_called_before_them() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = Wal::open_default(tmp.path()).unwrap();
    rt().block_on(async {
        // Neither append is awaited before the reads are called, and the reads are
        // awaited first.
        let a = wal.append((1..=3).map(|i| entry(i, 10)).collect());
        let b = wal.append(vec![entry(4, 10)]);
        let read = wal.read(LogIndex(1), LogIndex(10), usize::MAX);
        let last = wal.last_position();
        let load = wal.load();
        assert_eq!(read.await.unwrap().len(), 4);
        assert_eq!(last.await.unwrap().index, LogIndex(4));
        assert_eq!(load.await.unwrap().entries.len(), 4);
        let t = wal.truncate_suffix(LogIndex(3));
        let last_after = wal.last_position();
        assert_eq!(last_after.await.unwrap().index, LogIndex(2));
        a.await.unwrap();
        b.await.unwrap();
        t.await.unwrap();
    });
}

#[test]
fn purge_deletes_whole_segments_and_truncate_crosses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = WalConfig::default().with_segment_size(1024);
    let wal = Wal::open(tmp.path(), cfg.clone()).unwrap();
    let rt = rt();
    rt.block_on(async {
        for i in 1..=200 {
            wal.append(vec![entry(i, 60)]).await.unwrap();
        }
    });
    let files = |dir: &std::path::Path| {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "wal")
            })
            .count()
    };
    let before = wal.segment_count();
    assert!(before > 10, "{before} segments");
    assert_eq!(files(tmp.path()), before);

    // Truncate back across several segments: later segment files go.
    rt.block_on(wal.truncate_suffix(LogIndex(150))).unwrap();
    assert!(wal.segment_count() < before);
    assert_eq!(files(tmp.path()), wal.segment_count());
    assert_eq!(
        rt.block_on(wal.last_position()).unwrap().index,
        LogIndex(149)
    );

    // Purge: the whole segments below the snapshot go, the one holding 101 stays.
    let mid = wal.segment_count();
    let mut w = wal
        .snapshot_writer(Position::new(T1, LogIndex(100)))
        .unwrap();
    std::io::Write::write_all(&mut w, b"state").unwrap();
    rt.block_on(wal.save_snapshot(w.finish().unwrap())).unwrap();
    rt.block_on(wal.purge_prefix(LogIndex(100))).unwrap();
    assert!(wal.segment_count() < mid);
    assert_eq!(files(tmp.path()), wal.segment_count());
    assert!(matches!(
        rt.block_on(wal.read(LogIndex(100), LogIndex(102), usize::MAX)),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(
        rt.block_on(wal.read(LogIndex(101), LogIndex(102), usize::MAX))
            .unwrap(),
        vec![entry(101, 60)]
    );
    assert_eq!(wal.first_index(), LogIndex(101));

    // The retention policy reads the real log: bytes after an index shrink as it
    // grows, and reach zero at the end.
    let total = wal.bytes_after(LogIndex(100));
    assert!(total > 0);
    assert!(wal.bytes_after(LogIndex(120)) < total);
    assert_eq!(wal.bytes_after(LogIndex(149)), 0);
    let r = Retention {
        keep_entries: 10,
        keep_bytes: 0,
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
    assert_eq!(
        r.purge_upto(LogIndex(145), Some(LogIndex(120)), &wal),
        Some(LogIndex(120))
    );
    assert_eq!(r.purge_upto(LogIndex(145), None, &wal), Some(LogIndex(139)));

    // And all of it survives a reopen.
    drop(wal);
    let wal = Wal::open(tmp.path(), cfg).unwrap();
    let state = rt.block_on(wal.load()).unwrap();
    let want: Vec<WalEntry> = (101..=149).map(|i| entry(i, 60)).collect();
    assert_eq!(state.entries, want);
    assert_eq!(files(tmp.path()), wal.segment_count());
}

#[test]
fn reads_are_bounded_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = Wal::open(tmp.path(), WalConfig::default().with_segment_size(500)).unwrap();
    let rt = rt();
    let all: Vec<WalEntry> = (1..=50).map(|i| entry(i, 40)).collect();
    rt.block_on(wal.append(all.clone())).unwrap();
    assert!(wal.segment_count() > 3);
    let got = rt
        .block_on(wal.read(LogIndex(1), LogIndex(51), usize::MAX))
        .unwrap();
    assert_eq!(got, all);
    let budget = all[..10].iter().map(WalEntry::approx_size).sum();
    let got = rt
        .block_on(wal.read(LogIndex(5), LogIndex(51), budget))
        .unwrap();
    assert_eq!(got, all[4..14]);
    let got = rt.block_on(wal.read(LogIndex(7), LogIndex(51), 0)).unwrap();
    assert_eq!(got, all[6..7]);
    let got = rt
        .block_on(wal.read(LogIndex(40), LogIndex(1000), usize::MAX))
        .unwrap();
    assert_eq!(got, all[39..]);
}

#[test]
fn oversized_and_malformed_appends_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = Wal::open(tmp.path(), WalConfig::default().with_segment_size(4096)).unwrap();
    let rt = rt();
    // A record larger than a segment gets a segment of its own.
    rt.block_on(wal.append(vec![entry(1, 10_000)])).unwrap();
    rt.block_on(wal.append(vec![entry(2, 10)])).unwrap();
    // A lower term than the entry before is refused.
    let lower = WalEntry::noop(Position::new(Term::ZERO, LogIndex(3)));
    assert!(matches!(
        rt.block_on(wal.append(vec![lower])),
        Err(StorageError::Invalid(_))
    ));
    drop(wal);
    let wal = Wal::open(tmp.path(), WalConfig::default().with_segment_size(4096)).unwrap();
    let state = rt.block_on(wal.load()).unwrap();
    assert_eq!(state.entries, vec![entry(1, 10_000), entry(2, 10)]);
}
