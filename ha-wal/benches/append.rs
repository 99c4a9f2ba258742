//! Append throughput of the durable log: 100-byte and 4 KiB entries, 1, 16 and 64
//! concurrent appenders, with fdatasync (durable) and without.
//!
//! ```sh
//! cargo bench -p ha-wal --bench append -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Criterion reports entries/s (one element = one durable entry); after each
//! benchmark a line gives MB/s and the entries per fsync from [`Wal::metrics`].

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_wal::{Wal, WalConfig, WalMetrics};
use parking_lot::Mutex;

const TERM: Term = Term {
    number: 1,
    node: NodeId(1),
};

/// Appends `total` entries of `size` bytes from `appenders` concurrent tasks; each
/// task has one append in flight at a time. Returns the elapsed time per `total`
/// entries (each task appends `total / appenders` rounded up).
fn run(
    rt: &tokio::runtime::Runtime,
    wal: &Arc<Wal>,
    next: &Arc<Mutex<u64>>,
    appenders: usize,
    size: usize,
    total: u64,
) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        let per_task = total.div_ceil(appenders as u64);
        let mut tasks = Vec::with_capacity(appenders);
        for _ in 0..appenders {
            let wal = wal.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let payload = vec![0x5a; size];
                for _ in 0..per_task {
                    let fut = {
                        // The index is taken and the append queued under one lock, so
                        // appends reach the log in index order.
                        let mut n = next.lock();
                        *n += 1;
                        let e = WalEntry::new(
                            Position::new(TERM, LogIndex(*n)),
                            Payload::Command(Command(payload.clone())),
                        );
                        wal.append(vec![e])
                    };
                    fut.await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("appender task");
        }
    });
    let done = total.div_ceil(appenders as u64) * appenders as u64;
    start.elapsed().mul_f64(total as f64 / done as f64)
}

fn bench_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut run_no = 0;
    for sync in [true, false] {
        let mut group = c.benchmark_group(if sync {
            "append_durable"
        } else {
            "append_nosync"
        });
        group.throughput(Throughput::Elements(1));
        for size in [100usize, 4096] {
            for appenders in [1usize, 16, 64] {
                run_no += 1;
                let dir = root.path().join(format!("run-{run_no}"));
                let wal = Arc::new(Wal::open(&dir, WalConfig::default().with_sync(sync)).unwrap());
                let next = Arc::new(Mutex::new(0u64));
                let mut total = Duration::ZERO;
                let before: WalMetrics = wal.metrics();
                let id = BenchmarkId::new(format!("{size}B"), format!("{appenders}_appenders"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let t = Instant::now();
                        let d = run(&rt, &wal, &next, appenders, size, iters);
                        total += t.elapsed();
                        d
                    })
                });
                let m = wal.metrics().since(&before);
                if m.entries == 0 {
                    continue;
                }
                let secs = total.as_secs_f64().max(1e-9);
                println!(
                    "    {} {size}B x {appenders} appenders: {:.0} entries/s, {:.1} MB/s, {:.1} entries/fsync ({} entries, {} fsyncs)",
                    if sync { "durable" } else { "no-sync" },
                    m.entries as f64 / secs,
                    m.bytes as f64 / secs / 1e6,
                    m.entries_per_fsync(),
                    m.entries,
                    m.fsyncs,
                );
                drop(wal);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
