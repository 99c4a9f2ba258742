//! A child process appends from several threads and reports each entry once its
//! append resolved (durable); the parent kills it with SIGKILL and checks that every
//! reported entry is in the reopened log, intact.
//!
//! The test binary re-executes itself as the child: `sigkill_child` does the child's
//! work when the environment variable [`CHILD_DIR`] is set and nothing otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};
use ha_wal::{Wal, WalConfig};
use parking_lot::Mutex;

/// Set in the child: the data directory to append to.
const CHILD_DIR: &str = "HA_WAL_SIGKILL_CHILD_DIR";
/// Durable entries to see reported before each kill.
const REPORTS_PER_ROUND: usize = 2000;
/// Kill-and-reopen rounds.
const ROUNDS: usize = 2;
/// The whole test's time bound.
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Appender threads in the child.
const THREADS: usize = 6;

fn cfg() -> WalConfig {
    // Small segments, so that rolls happen during the test.
    WalConfig::default().with_segment_size(256 << 10)
}

/// The entry at `index`: its content follows from its index.
fn entry(index: u64) -> WalEntry {
    let body = format!("entry {index};").repeat(1 + (index % 20) as usize);
    WalEntry::new(
        Position::new(
            Term {
                number: 1,
                node: NodeId(1),
            },
            LogIndex(index),
        ),
        Payload::Command(Command(body.into_bytes())),
    )
}

/// The child's work: append until killed, printing `durable N` for each entry
/// whose append resolved.
#[test]
fn sigkill_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return; // Not the child: nothing to do.
    };
    let wal = Arc::new(Wal::open(&dir, cfg()).expect("child: open"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let last = rt
        .block_on(wal.last_position())
        .expect("child: last position");
    let next = Arc::new(Mutex::new(last.index.0));
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let wal = wal.clone();
            let next = next.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut round = 0u64;
                // Bounded even if nobody kills it.
                while started.elapsed() < TIME_LIMIT {
                    round += 1;
                    let batch = 1 + ((t as u64 + round) % 3);
                    let (indices, fut) = {
                        // Indices are taken and the append queued under one lock, so
                        // appends reach the log in index order.
                        let mut n = next.lock();
                        let first = *n + 1;
                        *n += batch;
                        let entries: Vec<WalEntry> = (first..first + batch).map(entry).collect();
                        (first..first + batch, wal.append(entries))
                    };
                    if let Err(e) = rt.block_on(fut) {
                        println!("error {e}");
                        return;
                    }
                    for i in indices {
                        println!("durable {i}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// Runs one child until it reported `REPORTS_PER_ROUND` durable entries, kills it,
/// and returns everything it reported.
fn run_child_and_kill(dir: &Path, deadline: Instant) -> BTreeSet<u64> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Process::new(exe)
        .args([
            "--exact",
            "sigkill_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut reported = BTreeSet::new();
    let take = |line: String, reported: &mut BTreeSet<u64>| {
        if let Some(n) = line.strip_prefix("durable ") {
            reported.insert(n.trim().parse::<u64>().expect("an index"));
        } else if line.starts_with("error ") {
            panic!("child failed: {line}");
        }
    };
    while reported.len() < REPORTS_PER_ROUND {
        let now = Instant::now();
        assert!(
            now < deadline,
            "the child reported only {} durable entries in time",
            reported.len()
        );
        match rx.recv_timeout(deadline - now) {
            Ok(line) => take(line, &mut reported),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the child exited early after {} reports", reported.len())
            }
        }
    }
    // SIGKILL on Unix: no destructor, no flush, mid-append.
    child.kill().expect("kill the child");
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed");
    // Whatever it printed before dying was reported durable too.
    for line in rx.iter() {
        take(line, &mut reported);
    }
    reader.join().unwrap();
    reported
}

#[test]
fn sigkill_while_appending_loses_no_durable_entry() {
    if std::env::var(CHILD_DIR).is_ok() {
        return; // The child runs only `sigkill_child`.
    }
    let deadline = Instant::now() + TIME_LIMIT;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut all_reported = BTreeSet::new();
    for round in 0..ROUNDS {
        let reported = run_child_and_kill(&dir, deadline);
        assert!(reported.len() >= REPORTS_PER_ROUND);
        all_reported.extend(reported);

        let wal = Wal::open(&dir, cfg()).unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
        let state = rt.block_on(wal.load()).unwrap();
        let entries = state.entries;
        for (k, e) in entries.iter().enumerate() {
            assert_eq!(
                *e,
                entry(k as u64 + 1),
                "round {round}: entry {} intact",
                k + 1
            );
        }
        let held = entries.len() as u64;
        let missing: Vec<u64> = all_reported.iter().copied().filter(|&i| i > held).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} entries reported durable are gone after SIGKILL (log holds 1..={held}), first {:?}",
            missing.len(),
            missing.first()
        );
        eprintln!(
            "round {round}: {} reported durable, log holds {held} after reopen",
            all_reported.len()
        );
    }
}
