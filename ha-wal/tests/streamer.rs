//! The WAL streamer: catch-up batches for a lagging standby read from the segment
//! files, bounded by entries and bytes, with the batch's `prev` position; purged
//! entries are refused (the primary then sends the snapshot); reads are ordered
//! after earlier calls and run while the writer goes on; the retention policy
//! keeps what the standby lacks, within its cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_core::StorageError;
use ha_wal::{Retention, Wal, WalConfig};

const T1: Term = Term {
    number: 1,
    node: NodeId(1),
};
const T2: Term = Term {
    number: 2,
    node: NodeId(2),
};

fn entry(term: Term, i: u64, size: usize) -> WalEntry {
    WalEntry::new(
        Position::new(term, LogIndex(i)),
        Payload::Command(Command(vec![i as u8; size])),
    )
}

/// Entries 1..=n: term 1 up to `n / 2`, term 2 after; small segments so batches
/// cross segment files.
async fn filled(dir: &std::path::Path, n: u64, size: usize) -> (Wal, Vec<WalEntry>) {
    let cfg = WalConfig::default()
        .with_sync(false)
        .with_segment_size(4 << 10);
    let wal = Wal::open(dir, cfg).unwrap();
    let entries: Vec<WalEntry> = (1..=n)
        .map(|i| entry(if i <= n / 2 { T1 } else { T2 }, i, size))
        .collect();
    for chunk in entries.chunks(7) {
        wal.append(chunk.to_vec()).await.unwrap();
    }
    (wal, entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_bounded_by_entry_count_and_names_the_entry_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, entries) = filled(tmp.path(), 200, 100).await;
    assert!(wal.segment_count() > 2, "batches cross segments");
    let b = wal.read_batch(LogIndex(98), 10, usize::MAX).await.unwrap();
    assert_eq!(b.prev, entries[96].position);
    assert_eq!(b.entries, entries[97..107].to_vec());
    // The term changes inside the batch; the prev carries the older term.
    assert_eq!(b.prev.term, T1);
    assert_eq!(b.entries.last().unwrap().term(), T2);
    // From the very start: the prev is position zero.
    let b = wal.read_batch(LogIndex(1), 3, usize::MAX).await.unwrap();
    assert_eq!(b.prev, Position::ZERO);
    assert_eq!(b.entries, entries[..3].to_vec());
    // Near the end: what there is.
    let b = wal.read_batch(LogIndex(199), 10, usize::MAX).await.unwrap();
    assert_eq!(b.entries, entries[198..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_bounded_by_bytes_but_holds_at_least_one_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, entries) = filled(tmp.path(), 60, 1_000).await;
    let size = entries[0].approx_size();
    // Three entries fit in 3.5 sizes; the fourth would pass the bound.
    let b = wal
        .read_batch(LogIndex(10), 100, size * 7 / 2)
        .await
        .unwrap();
    assert_eq!(b.entries, entries[9..12].to_vec());
    // Exactly at the bound: it fits.
    let b = wal.read_batch(LogIndex(10), 100, size * 3).await.unwrap();
    assert_eq!(b.entries.len(), 3);
    // A bound below one entry still gives one.
    let b = wal.read_batch(LogIndex(10), 100, 1).await.unwrap();
    assert_eq!(b.entries, vec![entries[9].clone()]);
    // The same bounds through `read`.
    let got = wal
        .read(LogIndex(10), LogIndex(61), size * 7 / 2)
        .await
        .unwrap();
    assert_eq!(got, entries[9..12].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_entries_are_refused_and_the_purge_point_can_start_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, entries) = filled(tmp.path(), 100, 50).await;
    let mut w = wal.snapshot_writer(entries[59].position).unwrap();
    std::io::Write::write_all(&mut w, b"state at 60").unwrap();
    wal.save_snapshot(w.finish().unwrap()).await.unwrap();
    wal.purge_prefix(LogIndex(40)).await.unwrap();
    // The entry before 41 was purged exactly at the log's base: its position is
    // still known, so 41 can be served.
    let b = wal.read_batch(LogIndex(41), 5, usize::MAX).await.unwrap();
    assert_eq!(b.prev, entries[39].position);
    assert_eq!(b.entries, entries[40..45].to_vec());
    // Below it: purged, a clear refusal.
    for next in [1, 2, 40] {
        let err = wal
            .read_batch(LogIndex(next), 5, usize::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::Invalid(m) if m.contains("purged")),
            "next {next}: {err:?}"
        );
    }
    // Past the end: nothing to send is an error too (the engine never asks).
    let err = wal
        .read_batch(LogIndex(150), 5, usize::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Invalid(_)), "{err:?}");
    let err = wal
        .read_batch(LogIndex(101), 5, usize::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Invalid(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_is_ordered_after_earlier_calls_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, mut entries) = filled(tmp.path(), 30, 10).await;
    // Appended (not yet awaited) before the read is called: the read sees it.
    let more: Vec<WalEntry> = (31..=40).map(|i| entry(T2, i, 10)).collect();
    let pending = wal.append(more.clone());
    let b = wal.read_batch(LogIndex(31), 100, usize::MAX).await.unwrap();
    assert_eq!(b.entries, more);
    pending.await.unwrap();
    entries.extend(more);
    // A truncation called before the read is seen too.
    let cut = wal.truncate_suffix(LogIndex(36));
    let b = wal.read_batch(LogIndex(30), 100, usize::MAX).await.unwrap();
    assert_eq!(b.entries, entries[29..35].to_vec());
    cut.await.unwrap();
    drop(wal);
    let wal = Wal::open(tmp.path(), WalConfig::default().with_sync(false)).unwrap();
    let b = wal.read_batch(LogIndex(20), 100, usize::MAX).await.unwrap();
    assert_eq!(b.prev, entries[18].position);
    assert_eq!(b.entries, entries[19..35].to_vec());
}

#[test]
fn the_streamer_reads_outside_a_runtime_and_while_the_writer_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (wal, entries) = rt.block_on(filled(tmp.path(), 100, 64));
    let streamer = wal.streamer();
    // Plain threads, no runtime: the reads run inline.
    let readers: Vec<_> = (0..4)
        .map(|k| {
            let s = streamer.clone();
            let want = entries.clone();
            std::thread::spawn(move || {
                for round in 0..50u64 {
                    let next = 1 + (round * 7 + k) % 95;
                    let b = futures_lite_block_on(s.batch(LogIndex(next), 5, usize::MAX))
                        .expect("read");
                    let i = (next - 1) as usize;
                    assert_eq!(b.entries, want[i..(i + 5).min(want.len())].to_vec());
                }
            })
        })
        .collect();
    // Meanwhile the writer appends more.
    rt.block_on(async {
        for i in 101..=300 {
            wal.append(vec![entry(T2, i, 64)]).await.unwrap();
        }
    });
    for r in readers {
        r.join().unwrap();
    }
}

/// Polls a future to completion on this thread (the streamer needs no runtime
/// outside one).
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_the_standby_lacks_within_its_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let retention = Retention {
        keep_entries: 0,
        keep_bytes: 0,
        max_entries: 30,
        max_bytes: 1 << 30,
    };
    let cfg = WalConfig::default()
        .with_sync(false)
        .with_retention(retention);
    let wal = Wal::open(tmp.path(), cfg).unwrap();
    let entries: Vec<WalEntry> = (1..=100).map(|i| entry(T1, i, 10)).collect();
    wal.append(entries.clone()).await.unwrap();
    // No standby: everything the snapshot covers may go.
    assert_eq!(wal.purge_point(LogIndex(80), None), LogIndex(80));
    // The standby holds up to 75: 75 stays (the next batch's prev) and after.
    assert_eq!(
        wal.purge_point(LogIndex(80), Some(LogIndex(75))),
        LogIndex(74)
    );
    // A standby far behind: the cap keeps only the last 30 entries.
    assert_eq!(
        wal.purge_point(LogIndex(80), Some(LogIndex(5))),
        LogIndex(70)
    );
    // Never past the snapshot.
    assert_eq!(
        wal.purge_point(LogIndex(50), Some(LogIndex(90))),
        LogIndex(50)
    );
}
