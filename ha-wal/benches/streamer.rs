//! Catch-up reads: how fast [`WalStreamer`] serves a lagging standby from the
//! segment files (what the primary sends when the standby needs entries older
//! than its in-memory log). Batches of 512 entries (the default `wal_batch_size`)
//! up to 1 MiB (the default `wal_batch_bytes`), from a log of 100-byte or 4 KiB
//! entries, alone and while 16 appenders write to the same log.
//!
//! ```sh
//! cargo bench -p ha-wal --bench streamer -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Criterion reports entries/s (one element = one entry read and verified).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_wal::{Wal, WalConfig};

const TERM: Term = Term {
    number: 1,
    node: NodeId(1),
};
const BATCH: usize = 512;
const BATCH_BYTES: usize = 1 << 20;

fn entry(i: u64, size: usize) -> WalEntry {
    WalEntry::new(
        Position::new(TERM, LogIndex(i)),
        Payload::Command(Command(vec![i as u8; size])),
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("catch_up_read");
    for (size, count) in [(100usize, 200_000u64), (4096, 20_000)] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), WalConfig::default().with_sync(false)).unwrap());
        rt.block_on(async {
            let mut i = 1;
            while i <= count {
                let chunk: Vec<WalEntry> = (i..(i + 1000).min(count + 1))
                    .map(|k| entry(k, size))
                    .collect();
                i += chunk.len() as u64;
                wal.append(chunk).await.unwrap();
            }
        });
        let per_batch = BATCH.min(BATCH_BYTES / entry(1, size).approx_size()).max(1) as u64;
        g.throughput(Throughput::Elements(per_batch));
        let cursor = AtomicU64::new(1);
        let streamer = wal.streamer();
        let next_batch = || {
            let span = count - per_batch;
            let at = cursor.fetch_add(per_batch, Ordering::Relaxed) % span + 1;
            LogIndex(at)
        };
        g.bench_function(BenchmarkId::new(format!("{size}B"), "idle"), |b| {
            b.iter(|| {
                let batch = rt
                    .block_on(streamer.batch(next_batch(), BATCH, BATCH_BYTES))
                    .unwrap();
                assert_eq!(batch.entries.len() as u64, per_batch);
            })
        });
        // The same while appenders keep the writer busy.
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(count));
        // Indexes are taken and appends queued under one lock, so they stay in order.
        let lock = Arc::new(parking_lot::Mutex::new(()));
        let writers: Vec<_> = (0..16)
            .map(|_| {
                let (wal, stop, last) = (wal.clone(), stop.clone(), last.clone());
                let lock = lock.clone();
                rt.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let fut = {
                            let _g = lock.lock();
                            let i = last.fetch_add(1, Ordering::SeqCst) + 1;
                            wal.append(vec![entry(i, size)])
                        };
                        if fut.await.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        g.bench_function(
            BenchmarkId::new(format!("{size}B"), "while_16_append"),
            |b| {
                b.iter(|| {
                    let batch = rt
                        .block_on(streamer.batch(next_batch(), BATCH, BATCH_BYTES))
                        .unwrap();
                    assert_eq!(batch.entries.len() as u64, per_batch);
                })
            },
        );
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let _ = rt.block_on(w);
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
