//! The simulator's state machine and disk: small, fully inspectable models.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::testkit::memory::SnapshotFiles;
use crate::types::{Command, HardState, LogIndex, Payload, Position, Term, WalEntry};

/// A client command in the simulation: write `value` (the write's unique id) to
/// `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimWrite {
    pub(crate) id: u64,
    pub(crate) key: u8,
}

impl SimWrite {
    pub(crate) fn command(self) -> Command {
        Command(postcard::to_allocvec(&self).unwrap_or_default())
    }

    pub(crate) fn decode(c: &Command) -> Option<SimWrite> {
        postcard::from_bytes(&c.0).ok()
    }
}

/// What a read of the model state machine answers: the state it was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimReadAnswer {
    /// The applied index of the state read.
    pub(crate) applied: LogIndex,
    /// The term of the last entry applied (zero if none).
    pub(crate) last_term: Term,
    /// The register's value: the id of the last write to the key.
    pub(crate) value: Option<u64>,
}

/// The model state machine: the applied sequence (term per index) and a register
/// per key holding the id of the last write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimMachine {
    /// `applied[i - 1]` is the term of the entry applied at index `i`.
    pub(crate) applied: Vec<Term>,
    pub(crate) registers: BTreeMap<u8, u64>,
}

impl SimMachine {
    pub(crate) fn applied_index(&self) -> LogIndex {
        LogIndex(self.applied.len() as u64)
    }

    /// Applies one entry; returns an error text if it does not follow the last one.
    pub(crate) fn apply(&mut self, pos: Position, payload: &Payload) -> Result<(), String> {
        if pos.index != self.applied_index().next() {
            return Err(format!(
                "applied index {} after {}",
                pos.index,
                self.applied_index()
            ));
        }
        self.applied.push(pos.term);
        if let Payload::Command(c) = payload {
            if let Some(w) = SimWrite::decode(c) {
                self.registers.insert(w.key, w.id);
            }
        }
        Ok(())
    }

    pub(crate) fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index.0 == 0 {
            return None;
        }
        self.applied.get((index.0 - 1) as usize).copied()
    }

    /// The answer to a read of `key`.
    pub(crate) fn answer(&self, key: u8) -> SimReadAnswer {
        SimReadAnswer {
            applied: self.applied_index(),
            last_term: self.applied.last().copied().unwrap_or(Term::ZERO),
            value: self.registers.get(&key).copied(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub(crate) fn decode(data: &[u8]) -> Option<SimMachine> {
        postcard::from_bytes(data).ok()
    }
}

/// One queued disk operation, in call order.
#[derive(Clone, Debug)]
pub(crate) enum DiskOp {
    Append(Vec<WalEntry>),
    HardState(HardState),
    Truncate(LogIndex),
    Purge(LogIndex),
    SaveSnapshot(Snapshot),
    Install(Snapshot),
    /// A catch-up read; `fail` makes it an I/O error.
    Read {
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
        fail: bool,
    },
}

/// One node's disk: what survives a crash, plus operations still in flight.
#[derive(Clone, Debug, Default)]
pub(crate) struct SimDisk {
    pub(crate) hard_state: Option<HardState>,
    pub(crate) snapshot: Option<Snapshot>,
    /// The applied sequence inside `snapshot`, decoded once.
    pub(crate) snapshot_terms: Vec<Term>,
    pub(crate) entries: Vec<WalEntry>,
    /// Operations not yet durable, in call order, with their sequence numbers.
    pub(crate) pending: VecDeque<(u64, DiskOp)>,
    /// The sequence number the next operation gets.
    pub(crate) next_seq: u64,
    /// Every operation up to this sequence number is durable.
    pub(crate) done: u64,
    /// Results of finished reads, until their caller takes them.
    pub(crate) read_results: HashMap<u64, Result<CatchUpBatch, StorageError>>,
    /// Failures of finished operations, until their caller takes them.
    pub(crate) failures: HashMap<u64, StorageError>,
    /// The snapshot files (`snapshot` is the current one's position and size).
    pub(crate) files: SnapshotFiles,
}

impl SimDisk {
    /// Queues an operation; returns its sequence number.
    pub(crate) fn queue(&mut self, op: DiskOp) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.pending.push_back((seq, op));
        seq
    }

    /// Makes the oldest pending operation durable; returns it (for the checker).
    pub(crate) fn complete_one(&mut self) -> Option<DiskOp> {
        let (seq, op) = self.pending.pop_front()?;
        self.done = seq;
        match &op {
            DiskOp::Append(batch) => {
                for e in batch {
                    let expect = self.last_index().next();
                    if e.index() == expect {
                        self.entries.push(e.clone());
                    } else if e.index() < expect {
                        // Re-append after a truncation: replace from here.
                        self.entries.retain(|x| x.index() < e.index());
                        self.entries.push(e.clone());
                    }
                }
            }
            DiskOp::HardState(hs) => self.hard_state = Some(hs.clone()),
            DiskOp::Truncate(from) => self.truncate(*from),
            DiskOp::Purge(upto) => self.compact(*upto),
            DiskOp::SaveSnapshot(s) => {
                if let Err(e) = self.save_snapshot(*s) {
                    self.failures.insert(seq, e);
                }
            }
            DiskOp::Install(s) => {
                if let Err(e) = self.install(*s) {
                    self.failures.insert(seq, e);
                }
            }
            DiskOp::Read {
                next,
                max_entries,
                max_bytes,
                fail,
            } => {
                let result = if *fail {
                    Err(StorageError::Io("simulated read error".into()))
                } else {
                    self.read_batch(*next, *max_entries, *max_bytes)
                };
                self.read_results.insert(seq, result);
            }
        }
        Some(op)
    }

    /// A crash: the first `survive` pending operations reached the disk before
    /// the power went, the rest are lost. Returns the ones that made it.
    pub(crate) fn crash(&mut self, survive: usize) -> Vec<DiskOp> {
        let mut made_it = Vec::new();
        for _ in 0..survive {
            match self.complete_one() {
                Some(op) => made_it.push(op),
                None => break,
            }
        }
        self.pending.clear();
        self.read_results.clear();
        self.failures.clear();
        // Finished snapshots nobody saved are cleaned up at the restart.
        self.files.forget_finished();
        made_it
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.entries
            .last()
            .map(|e| e.index())
            .or_else(|| self.snapshot.as_ref().map(|s| s.last_included.index))
            .unwrap_or(LogIndex::ZERO)
    }

    /// The last durable position (entry or snapshot).
    pub(crate) fn last_position(&self) -> Position {
        self.entries
            .last()
            .map(|e| e.position)
            .or(self.snapshot.as_ref().map(|s| s.last_included))
            .unwrap_or_default()
    }

    /// True if the durable log (or snapshot) holds `pos`.
    pub(crate) fn holds(&self, pos: Position) -> bool {
        if let Some(s) = &self.snapshot {
            if pos.index <= s.last_included.index {
                return s.last_included == pos
                    || self.snapshot_terms.get((pos.index.0.max(1) - 1) as usize)
                        == Some(&pos.term);
            }
        }
        self.entries.iter().any(|e| e.position == pos)
    }

    pub(crate) fn truncate(&mut self, from: LogIndex) {
        self.entries.retain(|e| e.index() < from);
    }

    /// Entries `[from, to)` as a [`crate::log_store::LogStore`] reads them: an
    /// error for compacted entries, at least one entry once past `max_bytes`.
    pub(crate) fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<WalEntry>, StorageError> {
        let first = self.entries.first().map(|e| e.index());
        if first.is_none_or(|f| from < f) && from <= self.last_index() {
            return Err(StorageError::Invalid(format!(
                "read from {from}: compacted"
            )));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in self
            .entries
            .iter()
            .filter(|e| e.index() >= from && e.index() < to)
        {
            bytes = bytes.saturating_add(e.approx_size());
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    /// A catch-up batch as [`crate::log_store::LogStore::read_batch`] reads it.
    pub(crate) fn read_batch(
        &self,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<CatchUpBatch, StorageError> {
        let to = LogIndex(next.0.saturating_add(max_entries as u64));
        let before = (next.0 > 1)
            .then(|| self.read(next.prev(), next, usize::MAX))
            .transpose()?;
        CatchUpBatch::from_reads(next, before, self.read(next, to, max_bytes)?)
    }

    pub(crate) fn compact(&mut self, upto: LogIndex) {
        self.entries.retain(|e| e.index() > upto);
    }

    pub(crate) fn save_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        self.files.save(snap)?;
        self.snapshot_terms = self
            .files
            .bytes(snap)
            .ok()
            .and_then(|b| SimMachine::decode(&b))
            .map(|m| m.applied)
            .unwrap_or_default();
        self.snapshot = Some(snap);
        Ok(())
    }

    /// The state machine the current snapshot holds.
    pub(crate) fn snapshot_machine(&self) -> Option<SimMachine> {
        let snap = self.snapshot?;
        SimMachine::decode(&self.files.bytes(snap).ok()?)
    }

    pub(crate) fn install(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        // The snapshot must be there before the log changes.
        self.files.bytes(snap)?;
        let keep = self
            .entries
            .iter()
            .any(|e| e.position == snap.last_included);
        if keep {
            self.entries
                .retain(|e| e.index() > snap.last_included.index);
        } else {
            self.entries.clear();
        }
        self.save_snapshot(snap)
    }
}
