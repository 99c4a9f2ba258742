//! Micro-benchmarks of the sans-IO engine: the cost of the protocol itself, without
//! I/O. `cargo bench -p ha-core --features testkit --bench engine`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ha_core::engine::{Action, Engine, Event, InitialState};
use ha_core::message::{AckResult, Envelope, HeartbeatAck, Request, Response, WalAck, WalBatch};
use ha_core::testkit::sim::{run, SimConfig};
use ha_core::{
    Command, Config, HardState, Instant, LogIndex, Member, MemberKind, NodeId, Payload, Position,
    Term, WalEntry,
};

const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const W: NodeId = NodeId(3);

fn config(id: NodeId) -> Config {
    let peers = [N1, N2, W]
        .into_iter()
        .filter(|p| *p != id)
        .map(|p| Member {
            id: p,
            addr: format!("127.0.0.1:{}", 7000 + p.0),
            kind: if p == W {
                MemberKind::Witness
            } else {
                MemberKind::Data
            },
        })
        .collect();
    let kind = if id == W {
        MemberKind::Witness
    } else {
        MemberKind::Data
    };
    let mut c = Config::new(id, kind, "127.0.0.1:7000", peers);
    c.wal_batch_size = 4096;
    c.max_inflight_batches = 1024;
    c
}

fn ms(n: u64) -> Instant {
    Instant(n * 1_000_000)
}

/// A primary with a lease, built by forcing promotion and acking a heartbeat.
fn primary() -> Engine {
    let mut e = Engine::new(
        config(N1),
        InitialState {
            hard_state: HardState::bootstrap(),
            ..Default::default()
        },
        ms(0),
        1,
    );
    e.step(ms(1), Event::Admin(0, ha_core::engine::Admin::ForcePromote));
    let acts = e.take_actions();
    let term = e.term();
    for a in acts {
        if let Action::Send(env) = a {
            if matches!(env.body, Request::Heartbeat(_)) && env.to == W {
                e.step(
                    ms(1),
                    Event::Response(Envelope {
                        from: W,
                        to: N1,
                        term,
                        request_id: env.request_id,
                        body: Response::HeartbeatAck(HeartbeatAck {
                            accepted: true,
                            last: Position::ZERO,
                            applied: LogIndex::ZERO,
                            voter: true,
                        }),
                    }),
                );
            }
        }
    }
    e.take_actions();
    e
}

/// One replication round on the primary: `n` client writes, its own fsync, the
/// standby's ack; returns the number of writes acknowledged.
fn primary_round(e: &mut Engine, n: u64, next_id: &mut u64) -> usize {
    let writes: Vec<(u64, Command)> = (0..n)
        .map(|_| {
            *next_id += 1;
            (*next_id, Command(vec![0u8; 100]))
        })
        .collect();
    e.step(ms(2), Event::ClientWrites(writes));
    let last = e.last_position();
    e.step(ms(2), Event::Persisted(last));
    let sent = e.take_actions();
    let term = e.term();
    let mut acked = 0;
    for a in sent {
        if let Action::Send(env) = a {
            if let Request::WalBatch(b) = &env.body {
                let last = b.entries.last().map(|x| x.position).unwrap_or(b.prev);
                e.step(
                    ms(2),
                    Event::Response(Envelope {
                        from: N2,
                        to: N1,
                        term,
                        request_id: env.request_id,
                        body: Response::WalAck(WalAck {
                            batch_term: term,
                            result: AckResult::Durable(last),
                            applied: LogIndex::ZERO,
                        }),
                    }),
                );
                acked += e
                    .take_actions()
                    .iter()
                    .filter(|a| matches!(a, Action::WriteDone(_, Ok(_))))
                    .count();
            }
        }
    }
    acked
}

fn bench_primary(c: &mut Criterion) {
    let mut g = c.benchmark_group("primary_round");
    for n in [1u64, 64] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{n}_writes_of_100B"), |b| {
            let mut e = primary();
            let mut id = 0;
            b.iter(|| primary_round(&mut e, n, &mut id));
        });
    }
    g.finish();
}

fn bench_standby(c: &mut Criterion) {
    let mut g = c.benchmark_group("standby_batch");
    let term = Term {
        number: 1,
        node: N1,
    };
    for n in [1u64, 64] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{n}_entries_of_100B"), |b| {
            b.iter_batched(
                || {
                    let e = Engine::new(
                        config(N2),
                        InitialState {
                            hard_state: HardState::bootstrap(),
                            ..Default::default()
                        },
                        ms(0),
                        2,
                    );
                    let entries: Vec<WalEntry> = (1..=n)
                        .map(|i| {
                            WalEntry::new(
                                Position::new(term, LogIndex(i)),
                                Payload::Command(Command(vec![0u8; 100])),
                            )
                        })
                        .collect();
                    (e, entries)
                },
                |(mut e, entries)| {
                    let last = entries.last().map(|x| x.position).unwrap_or_default();
                    let batch = WalBatch {
                        prev: Position::ZERO,
                        entries,
                        commit: LogIndex::ZERO,
                    };
                    e.step(
                        ms(1),
                        Event::Request(Envelope {
                            from: N1,
                            to: N2,
                            term,
                            request_id: 1,
                            body: Request::WalBatch(batch),
                        }),
                    );
                    e.step(ms(1), Event::Persisted(last));
                    e.take_actions().len()
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

fn bench_simulator(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulator");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("one_seed_8s_simulated", |b| {
        let mut seed = 0;
        b.iter(|| {
            seed += 1;
            run(seed, &SimConfig::for_seed(seed)).stats.steps
        });
    });
    g.finish();
}

criterion_group!(benches, bench_primary, bench_standby, bench_simulator);
criterion_main!(benches);
