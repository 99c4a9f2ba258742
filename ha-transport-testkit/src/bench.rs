//! The transport benchmark, over any [`TlsStack`]: WAL streaming throughput
//! (100 B and 4 KiB entries), control RPC round trip idle, and heartbeat round
//! trip while the WAL stream is saturated. Two nodes on loopback, the server
//! acknowledging at once (no disk), so the figures are the transport's own.
//!
//! [`measure`] gives one [`Figures`] row (for the side-by-side table);
//! [`criterion_wal_stream`] is the criterion form of the throughput figures.
//!
//! # Panics
//! When a call fails (this is a benchmark).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ha_core::message::{Envelope, Request, Response, WalBatch};
use ha_core::transport::{PeerConnection, Transport};
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_tls::testkit::TestCluster;

use crate::{echo, heartbeat, node_with, TlsStack};

/// WAL batches in flight at most (as the driver's sender keeps them).
pub const WINDOW: usize = 16;

/// A client transport connected to a server transport that acknowledges at
/// once.
pub struct Pair<S: TlsStack> {
    /// Node 1.
    pub client: S::Transport,
    /// Node 2, listening.
    pub server: S::Transport,
    /// Node 1's connection to node 2.
    pub conn: <S::Transport as Transport>::Conn,
}

impl<S: TlsStack> Pair<S> {
    /// Two transports of a fresh cluster, connected.
    pub async fn new() -> Self {
        let cluster = TestCluster::new(2).unwrap();
        let members = cluster.members().to_vec();
        let client = node_with::<S>(&cluster, NodeId(1), S::options(&members)).unwrap();
        let server = node_with::<S>(&cluster, NodeId(2), S::options(&members)).unwrap();
        server.transport.listen(echo(NodeId(2))).await.unwrap();
        let conn = client.transport.connect(&server.member).await.unwrap();
        // Connected before anything is timed.
        conn.call(heartbeat(NodeId(1), NodeId(2), 0), Duration::from_secs(10))
            .await
            .unwrap();
        Pair {
            client: client.transport,
            server: server.transport,
            conn,
        }
    }

    /// Closes both transports.
    pub async fn close(self) {
        self.client.close().await;
        self.server.close().await;
    }
}

fn term() -> Term {
    Term {
        number: 1,
        node: NodeId(1),
    }
}

fn batch(id: u64, seq: u64, entries: usize, size: usize) -> Envelope<Request> {
    let first = seq * entries as u64;
    Envelope {
        from: NodeId(1),
        to: NodeId(2),
        term: term(),
        request_id: id,
        body: Request::WalBatch(WalBatch {
            prev: Position::new(term(), LogIndex(first)),
            entries: (0..entries as u64)
                .map(|i| {
                    WalEntry::new(
                        Position::new(term(), LogIndex(first + i + 1)),
                        Payload::Command(Command(vec![0xab; size])),
                    )
                })
                .collect(),
            commit: LogIndex(first),
        }),
    }
}

/// Sends `batches` WAL batches of `entries` entries of `size` bytes (request
/// ids from `first_id`), with up to [`WINDOW`] in flight.
pub async fn stream<C: PeerConnection>(
    conn: &C,
    first_id: u64,
    batches: u64,
    entries: usize,
    size: usize,
) {
    let mut inflight = VecDeque::new();
    for i in 0..batches {
        if inflight.len() >= WINDOW {
            if let Some(f) = inflight.pop_front() {
                let r: Result<Envelope<Response>, _> = f.await;
                r.unwrap();
            }
        }
        inflight.push_back(Box::pin(conn.call(
            batch(first_id + i, i, entries, size),
            Duration::from_secs(30),
        )));
    }
    for f in inflight {
        let r: Result<Envelope<Response>, _> = f.await;
        r.unwrap();
    }
}

/// `n` heartbeat round trips, one after the other (ids from `first_id`).
pub async fn heartbeat_rtts<C: PeerConnection>(conn: &C, first_id: u64, n: u64) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        conn.call(
            heartbeat(NodeId(1), NodeId(2), first_id + i),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        v.push(t.elapsed());
    }
    v
}

/// The median and 99th percentile.
pub fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

/// One transport's figures.
#[derive(Clone, Debug)]
pub struct Figures {
    /// WAL throughput with 100-byte entries, entries per second.
    pub small_entries_per_s: f64,
    /// The same in MB/s of entry payload.
    pub small_mb_per_s: f64,
    /// WAL throughput with 4 KiB entries, entries per second.
    pub large_entries_per_s: f64,
    /// The same in MB/s of entry payload.
    pub large_mb_per_s: f64,
    /// Control RPC (heartbeat) round trip on an idle connection: p50, p99.
    pub rpc_idle: (Duration, Duration),
    /// Heartbeat round trip while a 4 KiB WAL stream saturates the link.
    pub rpc_saturated: (Duration, Duration),
}

/// Streams batches of `entries` × `size` bytes for about `secs`; entries/s
/// and MB/s.
async fn throughput<C: PeerConnection>(
    conn: &C,
    secs: Duration,
    entries: usize,
    size: usize,
) -> (f64, f64) {
    let batches = 64u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut id = 1_000_000;
    while start.elapsed() < secs {
        stream(conn, id, batches, entries, size).await;
        id += batches;
        sent += batches * entries as u64;
    }
    let t = start.elapsed().as_secs_f64();
    let per_s = sent as f64 / t;
    (per_s, per_s * size as f64 / 1e6)
}

/// Measures one row: each throughput figure for `secs`, 2,000 idle round
/// trips, 1,000 round trips under a saturated stream.
pub async fn measure<S: TlsStack>(secs: Duration) -> Figures
where
    <S::Transport as Transport>::Conn: Clone,
{
    let pair = Pair::<S>::new().await;
    let (small_entries_per_s, small_mb_per_s) = throughput(&pair.conn, secs, 256, 100).await;
    let (large_entries_per_s, large_mb_per_s) = throughput(&pair.conn, secs, 64, 4096).await;
    heartbeat_rtts(&pair.conn, 10_000_000, 200).await;
    let rpc_idle = percentiles(heartbeat_rtts(&pair.conn, 20_000_000, 2000).await);
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (conn, stop) = (pair.conn.clone(), stop.clone());
        tokio::spawn(async move {
            let mut id = 30_000_000;
            while !stop.load(Ordering::Relaxed) {
                stream(&conn, id, 64, 64, 4096).await;
                id += 64;
            }
        })
    };
    // Let the stream fill the window and the socket buffers first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rpc_saturated = percentiles(heartbeat_rtts(&pair.conn, 40_000_000, 1000).await);
    stop.store(true, Ordering::Relaxed);
    pump.await.unwrap();
    pair.close().await;
    Figures {
        small_entries_per_s,
        small_mb_per_s,
        large_entries_per_s,
        large_mb_per_s,
        rpc_idle,
        rpc_saturated,
    }
}

/// The criterion group `wal_stream` over stack `S` (100 B × 256 and 4 KiB × 64
/// entries per batch, 64 batches per iteration).
pub fn criterion_wal_stream<S: TlsStack>(c: &mut Criterion, rt: &tokio::runtime::Runtime)
where
    <S::Transport as Transport>::Conn: Clone,
{
    let pair = rt.block_on(Pair::<S>::new());
    let mut g = c.benchmark_group("wal_stream");
    for (size, entries) in [(100usize, 256usize), (4096, 64)] {
        let batches = 64u64;
        g.throughput(Throughput::Bytes((size * entries) as u64 * batches));
        g.bench_function(format!("{size}B_x{entries}_per_batch"), |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        stream(&pair.conn, 0, batches, entries, size).await;
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
    rt.block_on(pair.close());
}

/// The bench binaries' main: the latency figures printed, then the criterion
/// throughput group.
pub fn bench_main<S: TlsStack>(name: &str)
where
    <S::Transport as Transport>::Conn: Clone,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(measure::<S>(Duration::from_secs(2)));
    println!("{name}: {}", row(name, &f));
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    criterion_wal_stream::<S>(&mut c, &rt);
    c.final_summary();
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The header of the side-by-side table (markdown).
pub fn header() -> String {
    "| transport | WAL 100 B entries/s | MB/s | WAL 4 KiB entries/s | MB/s | RPC idle p50 ms | p99 ms | heartbeat under saturated WAL p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|".to_string()
}

/// One row of the side-by-side table (markdown).
pub fn row(name: &str, f: &Figures) -> String {
    format!(
        "| {name} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} |",
        f.small_entries_per_s,
        f.small_mb_per_s,
        f.large_entries_per_s,
        f.large_mb_per_s,
        ms(f.rpc_idle.0),
        ms(f.rpc_idle.1),
        ms(f.rpc_saturated.0),
        ms(f.rpc_saturated.1),
    )
}
