//! The event history (`GET /v1/events`, `ha-node events`): the last few
//! thousand cluster events of this node (role changes, elections with their
//! votes, fences, degraded-sync periods, switchovers, snapshot installs,
//! operator requests, starts and stops), in a bounded ring, kept across restarts
//! in `data_dir/events.jsonl` (one JSON object per line, like pg_auto_failover's
//! events table).
//!
//! The file is appended to as events happen (written through to the page cache,
//! not fsynced: it survives a killed process, and a machine crash may lose the
//! last lines, never the replicated data). At open a line that does not parse
//! (a write cut short) is skipped and counted in the log; once the file holds
//! twice the ring's capacity it is rewritten with the ring (temp file, rename).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use ha_core::observe::{Observation, Observed};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Events kept in memory and served.
pub const CAPACITY: usize = 4096;

/// The events file in the data directory.
pub const FILE: &str = "events.jsonl";

/// A line longer than this is not an event (refused at open).
const MAX_LINE: usize = 64 * 1024;

/// Events of this node itself rather than of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeEvent {
    /// The process started.
    NodeStarted {
        /// The role its config starts it in.
        role: String,
        /// `new` or `existing`.
        cluster_state: String,
    },
    /// The process is stopping.
    NodeStopping {
        /// Why (a signal, a storage failure).
        reason: String,
    },
    /// An operator asked for something through the admin API.
    OperatorRequest {
        /// `promote`, `promote --force`, `switchover`, `pause-failover`,
        /// `resume-failover`.
        request: String,
        /// What came of it (`ok` or the error).
        result: String,
    },
    /// Events this history missed because it fell behind.
    EventsMissed {
        /// How many.
        count: u64,
    },
}

/// What an event records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum What {
    /// A cluster event seen by the replication node.
    Cluster(Observation),
    /// An event of this process.
    Node(NodeEvent),
}

/// One entry of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its sequence number: increasing, never reused on this data directory.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened (its `kind` field names the kind).
    #[serde(flatten)]
    pub what: What,
}

struct Inner {
    ring: VecDeque<Event>,
    next_seq: u64,
    file: Option<File>,
    lines_in_file: usize,
}

/// The history: a ring in memory and its file.
pub struct EventLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// The newest sequence number, for waiters (`--follow`).
    newest: watch::Sender<u64>,
}

fn now_ms() -> u64 {
    Observed::now(Observation::FailoverPaused { paused: false }).at_ms
}

impl EventLog {
    /// Opens (or creates) the history in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<EventLog> {
        let path = dir.join(FILE);
        let mut ring = VecDeque::new();
        let mut lines = 0;
        let mut bad = 0;
        if let Ok(f) = File::open(&path) {
            let mut reader = BufReader::new(f);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n =
                    Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
                if n == 0 {
                    break;
                }
                lines += 1;
                if line.len() > MAX_LINE {
                    bad += 1;
                    // Skip the rest of the overlong line.
                    let mut rest = Vec::new();
                    reader.read_until(b'\n', &mut rest)?;
                    continue;
                }
                match serde_json::from_slice::<Event>(&line) {
                    Ok(e) => {
                        ring.push_back(e);
                        if ring.len() > CAPACITY {
                            ring.pop_front();
                        }
                    }
                    Err(_) => bad += 1,
                }
            }
        }
        if bad > 0 {
            tracing::warn!(file = %path.display(), bad, "event history: lines that are not events were skipped (a write cut short by a crash)");
        }
        let next_seq = ring.back().map_or(1, |e| e.seq + 1);
        let log = EventLog {
            path,
            inner: Mutex::new(Inner {
                ring,
                next_seq,
                file: None,
                lines_in_file: lines,
            }),
            newest: watch::channel(next_seq - 1).0,
        };
        {
            let mut inner = log.inner.lock();
            if inner.lines_in_file > 2 * CAPACITY || bad > 0 {
                log.rewrite(&mut inner)?;
            }
            inner.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log.path)?,
            );
        }
        Ok(log)
    }

    /// Rewrites the file with the ring only.
    fn rewrite(&self, inner: &mut Inner) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            let mut f = std::io::BufWriter::new(File::create(&tmp)?);
            for e in &inner.ring {
                serde_json::to_writer(&mut f, e)?;
                f.write_all(b"\n")?;
            }
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        inner.lines_in_file = inner.ring.len();
        inner.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }

    /// Records a cluster event seen at `at_ms`.
    pub fn observed(&self, o: Observed) {
        self.push(o.at_ms, What::Cluster(o.observation));
    }

    /// Records an event of this process, now.
    pub fn node(&self, e: NodeEvent) {
        self.push(now_ms(), What::Node(e));
    }

    fn push(&self, at_ms: u64, what: What) {
        let mut inner = self.inner.lock();
        let event = Event {
            seq: inner.next_seq,
            at_ms,
            what,
        };
        inner.next_seq += 1;
        let seq = event.seq;
        let written = match (serde_json::to_vec(&event), inner.file.as_mut()) {
            (Ok(mut line), Some(f)) => {
                line.push(b'\n');
                f.write_all(&line)
            }
            (Err(e), _) => Err(std::io::Error::other(e)),
            (_, None) => Ok(()),
        };
        if let Err(e) = written {
            tracing::warn!(file = %self.path.display(), error = %e, "event history: cannot append to the file (the event stays in memory)");
        }
        inner.lines_in_file += 1;
        inner.ring.push_back(event);
        if inner.ring.len() > CAPACITY {
            inner.ring.pop_front();
        }
        if inner.lines_in_file > 2 * CAPACITY {
            if let Err(e) = self.rewrite(&mut inner) {
                tracing::warn!(file = %self.path.display(), error = %e, "event history: cannot compact the file");
            }
        }
        drop(inner);
        self.newest.send_replace(seq);
    }

    /// Up to `limit` events after sequence number `since`, oldest first.
    pub fn since(&self, since: u64, limit: usize) -> Vec<Event> {
        let inner = self.inner.lock();
        inner
            .ring
            .iter()
            .filter(|e| e.seq > since)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The oldest sequence number still held (0 if none).
    pub fn oldest(&self) -> u64 {
        self.inner.lock().ring.front().map_or(0, |e| e.seq)
    }

    /// A receiver of the newest sequence number.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ha_core::types::{NodeId, Role, Term};

    fn role_changed(n: u64) -> Observed {
        Observed {
            at_ms: n,
            observation: Observation::RoleChanged {
                role: Role::Standby,
                term: Term {
                    number: n,
                    node: NodeId(1),
                },
                leader: Some(NodeId(1)),
            },
        }
    }

    #[test]
    fn events_survive_a_reopen_and_sequence_numbers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.observed(role_changed(1));
        log.node(NodeEvent::OperatorRequest {
            request: "switchover".into(),
            result: "ok".into(),
        });
        drop(log);
        let log = EventLog::open(dir.path()).unwrap();
        let got = log.since(0, 10);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].what, What::Cluster(role_changed(1).observation));
        assert!(matches!(
            got[1].what,
            What::Node(NodeEvent::OperatorRequest { .. })
        ));
        log.observed(role_changed(2));
        assert_eq!(log.since(2, 10)[0].seq, 3);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.observed(role_changed(1));
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"seq\":2,\"at_ms\":5,\"ki").unwrap();
        drop(f);
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.since(0, 10).len(), 1);
        log.observed(role_changed(2));
        drop(log);
        // The rewrite dropped the torn line: both events read back.
        let log = EventLog::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.since(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn the_ring_and_the_file_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for n in 0..(2 * CAPACITY as u64 + 10) {
            log.observed(role_changed(n));
        }
        assert_eq!(log.since(0, usize::MAX).len(), CAPACITY);
        assert_eq!(log.oldest(), 2 * CAPACITY as u64 + 10 - CAPACITY as u64 + 1);
        let lines = fs::read_to_string(dir.path().join(FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * CAPACITY, "{lines} lines");
    }
}
