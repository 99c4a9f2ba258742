//! The simulator's state machine and disk: small, fully inspectable models.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::log_store::Snapshot;
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
    pub(crate) fn apply(&mut self, e: &WalEntry) -> Result<(), String> {
        if e.index() != self.applied_index().next() {
            return Err(format!(
                "applied index {} after {}",
                e.index(),
                self.applied_index()
            ));
        }
        self.applied.push(e.term());
        if let Payload::Command(c) = &e.payload {
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

    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub(crate) fn decode(data: &[u8]) -> Option<SimMachine> {
        postcard::from_bytes(data).ok()
    }
}

/// One node's disk: what survives a crash, plus appends still in flight.
#[derive(Clone, Debug, Default)]
pub(crate) struct SimDisk {
    pub(crate) hard_state: Option<HardState>,
    pub(crate) snapshot: Option<Snapshot>,
    /// The applied sequence inside `snapshot`, decoded once.
    pub(crate) snapshot_terms: Vec<Term>,
    pub(crate) entries: Vec<WalEntry>,
    /// Appends not yet durable, in order, with their completion times.
    pub(crate) pending: VecDeque<(u64, Vec<WalEntry>)>,
}

impl SimDisk {
    /// Makes the oldest pending append durable; returns its last position.
    pub(crate) fn complete_one(&mut self) -> Option<Position> {
        let (_, batch) = self.pending.pop_front()?;
        let last = batch.last().map(|e| e.position);
        for e in batch {
            let expect = self.last_index().next();
            if e.index() == expect {
                self.entries.push(e);
            } else if e.index() < expect {
                // Re-append after a truncation that raced: replace from here.
                self.entries.retain(|x| x.index() < e.index());
                self.entries.push(e);
            }
        }
        last
    }

    /// Completes every pending append (a later ordered operation must wait for them).
    pub(crate) fn flush(&mut self) -> Vec<Position> {
        let mut done = Vec::new();
        while let Some(p) = self.complete_one() {
            done.push(p);
        }
        done
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.entries
            .last()
            .map(|e| e.index())
            .or_else(|| self.snapshot.as_ref().map(|s| s.last_included.index))
            .unwrap_or(LogIndex::ZERO)
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

    pub(crate) fn compact(&mut self, upto: LogIndex) {
        self.entries.retain(|e| e.index() > upto);
    }

    pub(crate) fn save_snapshot(&mut self, snap: Snapshot) {
        self.snapshot_terms = SimMachine::decode(&snap.data)
            .map(|m| m.applied)
            .unwrap_or_default();
        self.snapshot = Some(snap);
    }

    pub(crate) fn install(&mut self, snap: Snapshot) {
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
        self.save_snapshot(snap);
    }
}
