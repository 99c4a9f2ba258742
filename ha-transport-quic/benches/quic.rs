//! QUIC transport over loopback: WAL streaming throughput (100 B and 4 KiB
//! entries), heartbeat round-trip p50/p99 idle and under a saturated WAL stream.
//!
//! `cargo bench -p ha-transport-quic --bench quic`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ha_core::config::Member;
use ha_core::message::{
    AckResult, Envelope, Heartbeat, HeartbeatAck, Request, Response, RpcError, WalAck, WalBatch,
};
use ha_core::transport::{BoxFuture, PeerConnection, RequestHandler, Transport};
use ha_core::types::{Command, LogIndex, MemberKind, NodeId, Payload, Position, Term, WalEntry};
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_transport_quic::{QuicConnection, QuicOptions, QuicTransport};

const WINDOW: usize = 16;

struct Acker;

impl RequestHandler for Acker {
    fn handle(&self, _peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        let body = match &req.body {
            Request::WalBatch(b) => Response::WalAck(WalAck {
                batch_term: req.term,
                result: AckResult::Durable(b.entries.last().map(|e| e.position).unwrap_or(b.prev)),
                applied: b.commit,
            }),
            Request::Heartbeat(h) => Response::HeartbeatAck(HeartbeatAck {
                accepted: true,
                last: h.last,
                applied: h.commit,
                voter: true,
            }),
            _ => Response::Error(RpcError::Malformed("bench".into())),
        };
        Box::pin(std::future::ready(Envelope {
            from: req.to,
            to: req.from,
            term: req.term,
            request_id: req.request_id,
            body,
        }))
    }
}

fn term() -> Term {
    Term {
        number: 1,
        node: NodeId(1),
    }
}

fn batch(seq: u64, entries: usize, size: usize) -> Request {
    let first = seq * entries as u64;
    Request::WalBatch(WalBatch {
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
    })
}

fn env(id: u64, body: Request) -> Envelope<Request> {
    Envelope {
        from: NodeId(1),
        to: NodeId(2),
        term: term(),
        request_id: id,
        body,
    }
}

fn heartbeat(id: u64) -> Envelope<Request> {
    env(
        id,
        Request::Heartbeat(Heartbeat {
            commit: LogIndex(1),
            last: Position::new(term(), LogIndex(1)),
        }),
    )
}

async fn pair() -> (QuicTransport, QuicTransport, QuicConnection) {
    let ca = CertificateAuthority::generate("bench", 1).unwrap();
    let members = vec![NodeId(1), NodeId(2)];
    let mk = |id| {
        let c = ca.issue(&NodeCertSpec::new(id, 1)).unwrap();
        let identity = Identity::from_pem(&ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap();
        QuicTransport::new(
            &identity,
            QuicOptions::new("127.0.0.1:0".parse().unwrap(), members.clone()),
        )
        .unwrap()
    };
    let (a, b) = (mk(NodeId(1)), mk(NodeId(2)));
    b.listen(Arc::new(Acker)).await.unwrap();
    let member = Member {
        id: NodeId(2),
        addr: b.local_addr().unwrap().to_string(),
        kind: MemberKind::Data,
    };
    let conn = a.connect(&member).await.unwrap();
    (a, b, conn)
}

/// Sends `batches` WAL batches with up to [`WINDOW`] in flight.
async fn stream(conn: &QuicConnection, first_id: u64, batches: u64, entries: usize, size: usize) {
    let mut inflight = VecDeque::new();
    for i in 0..batches {
        if inflight.len() >= WINDOW {
            if let Some(f) = inflight.pop_front() {
                let r: Result<Envelope<Response>, _> = f.await;
                r.unwrap();
            }
        }
        inflight.push_back(Box::pin(conn.call(
            env(first_id + i, batch(i, entries, size)),
            Duration::from_secs(30),
        )));
    }
    for f in inflight {
        let r: Result<Envelope<Response>, _> = f.await;
        r.unwrap();
    }
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

async fn heartbeat_rtts(conn: &QuicConnection, n: u64) -> Vec<Duration> {
    let mut v = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        conn.call(heartbeat(1_000_000_000 + i), Duration::from_secs(5))
            .await
            .unwrap();
        v.push(t.elapsed());
    }
    v
}

fn latency_report(rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let (a, b, conn) = pair().await;
        heartbeat_rtts(&conn, 200).await;
        let (p50, p99) = percentiles(heartbeat_rtts(&conn, 2000).await);
        println!("rpc_round_trip/heartbeat idle: p50 {p50:?} p99 {p99:?}");
        let wal = conn.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let pump = tokio::spawn(async move {
            let mut id = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                stream(&wal, id, 64, 64, 4096).await;
                id += 64;
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (p50, p99) = percentiles(heartbeat_rtts(&conn, 1000).await);
        println!(
            "rpc_round_trip/heartbeat under saturated 4KiB WAL stream: p50 {p50:?} p99 {p99:?}"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pump.await.unwrap();
        a.close().await;
        b.close().await;
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    latency_report(&rt);
    let (a, b, conn) = rt.block_on(pair());
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("wal_stream");
    for (size, entries) in [(100usize, 256usize), (4096, 64)] {
        let batches = 64u64;
        g.throughput(Throughput::Bytes((size * entries) as u64 * batches));
        g.bench_function(format!("{size}B_x{entries}_per_batch"), |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        stream(&conn, 0, batches, entries, size).await;
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
    c.final_summary();
    rt.block_on(async {
        a.close().await;
        b.close().await;
    });
}
