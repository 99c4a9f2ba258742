//! The engine's in-memory view of its log: the entries after the last snapshot.
//!
//! The durable copy lives in a [`crate::log_store::LogStore`]; the engine keeps this
//! view in step by emitting the matching actions.

use std::collections::VecDeque;

use crate::types::{LogIndex, Position, Term, WalEntry};

/// Compacted entries freed per engine step: freeing a whole snapshot's worth
/// (100,000 entries by default) at once would hold up the step for milliseconds.
const FREE_PER_STEP: usize = 2048;

/// Entries after `snapshot`, contiguous.
#[derive(Clone, Debug, Default)]
pub(crate) struct Log {
    snapshot: Position,
    entries: VecDeque<WalEntry>,
    /// Entries compacted away and not yet freed ([`Log::free_some`]).
    garbage: Vec<VecDeque<WalEntry>>,
}

impl Log {
    pub(crate) fn new(snapshot: Position, entries: Vec<WalEntry>) -> Self {
        let mut log = Log {
            snapshot,
            entries: VecDeque::new(),
            garbage: Vec::new(),
        };
        for e in entries {
            if e.index() == log.last().index.next() {
                log.entries.push_back(e);
            }
        }
        log
    }

    /// The position of the last entry (or of the snapshot).
    pub(crate) fn last(&self) -> Position {
        self.entries
            .back()
            .map(|e| e.position)
            .unwrap_or(self.snapshot)
    }

    /// The last position the snapshot covers.
    pub(crate) fn snapshot(&self) -> Position {
        self.snapshot
    }

    /// The term of the entry at `index`, if the log knows it.
    pub(crate) fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.get(index).map(|e| e.term())
    }

    /// The position at `index`, if known.
    pub(crate) fn position_at(&self, index: LogIndex) -> Option<Position> {
        self.term_at(index).map(|term| Position::new(term, index))
    }

    /// True if the log holds exactly this position.
    pub(crate) fn holds(&self, pos: Position) -> bool {
        self.term_at(pos.index) == Some(pos.term)
    }

    pub(crate) fn get(&self, index: LogIndex) -> Option<&WalEntry> {
        if index <= self.snapshot.index {
            return None;
        }
        let offset = (index.0 - self.snapshot.index.0 - 1) as usize;
        self.entries.get(offset)
    }

    /// Up to `max_entries` entries from `from`, stopping once `max_bytes` is passed
    /// (at least one entry if any exists).
    pub(crate) fn slice(
        &self,
        from: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> Vec<WalEntry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = from;
        while out.len() < max_entries {
            let Some(e) = self.get(i) else { break };
            bytes += e.approx_size();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
            i = i.next();
        }
        out
    }

    /// Appends one entry that follows the last.
    pub(crate) fn push(&mut self, entry: WalEntry) {
        debug_assert_eq!(entry.index(), self.last().index.next());
        self.entries.push_back(entry);
    }

    /// Removes entries with index `>= from`.
    pub(crate) fn truncate_from(&mut self, from: LogIndex) {
        let keep = from.0.saturating_sub(self.snapshot.index.0 + 1) as usize;
        self.entries.truncate(keep);
    }

    /// Drops entries up to `upto`, which must be held; the log then starts after it.
    pub(crate) fn compact(&mut self, upto: LogIndex) {
        let Some(pos) = self.position_at(upto) else {
            return;
        };
        if upto <= self.snapshot.index {
            return;
        }
        let drop = (upto.0 - self.snapshot.index.0) as usize;
        // The kept suffix moves to a new buffer (it is short: entries after the
        // snapshot); the compacted prefix is freed a little per step.
        let kept = self.entries.split_off(drop.min(self.entries.len()));
        let compacted = std::mem::replace(&mut self.entries, kept);
        self.garbage.push(compacted);
        self.snapshot = pos;
    }

    /// Frees up to [`FREE_PER_STEP`] compacted entries; called once per step.
    pub(crate) fn free_some(&mut self) {
        let mut budget = FREE_PER_STEP;
        while budget > 0 {
            let Some(chunk) = self.garbage.last_mut() else {
                return;
            };
            let n = budget.min(chunk.len());
            chunk.truncate(chunk.len() - n);
            budget -= n;
            if chunk.is_empty() {
                self.garbage.pop();
            }
        }
    }

    /// Replaces the log by an empty one at `snapshot`, keeping the suffix after it if
    /// the log holds that position.
    pub(crate) fn reset_to(&mut self, snapshot: Position) {
        if snapshot != Position::ZERO
            && self.holds(snapshot)
            && snapshot.index >= self.snapshot.index
        {
            self.compact(snapshot.index);
        } else {
            self.entries.clear();
            self.snapshot = snapshot;
        }
    }

    /// The first index of the run of entries with the same term that contains
    /// `index`.
    pub(crate) fn first_index_of_term_run(&self, index: LogIndex) -> LogIndex {
        let Some(term) = self.term_at(index) else {
            return index;
        };
        let mut i = index;
        while i > self.snapshot.index.next() {
            match self.term_at(i.prev()) {
                Some(t) if t == term => i = i.prev(),
                _ => break,
            }
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NodeId, Payload};

    fn entries(n: u64) -> Vec<WalEntry> {
        let t = Term {
            number: 1,
            node: NodeId(1),
        };
        (1..=n)
            .map(|i| WalEntry::new(Position::new(t, LogIndex(i)), Payload::Noop))
            .collect()
    }

    #[test]
    fn compaction_frees_the_prefix_a_little_per_step() {
        let total = (FREE_PER_STEP * 3 + 10) as u64;
        let mut log = Log::new(Position::ZERO, entries(total + 5));
        log.compact(LogIndex(total));
        assert_eq!(log.snapshot().index, LogIndex(total));
        assert_eq!(log.slice(LogIndex(total + 1), 100, usize::MAX).len(), 5);
        assert!(!log.holds(Position::new(log.snapshot().term, LogIndex(3))));
        let pending = |log: &Log| log.garbage.iter().map(VecDeque::len).sum::<usize>();
        assert_eq!(pending(&log), total as usize);
        log.free_some();
        assert_eq!(pending(&log), total as usize - FREE_PER_STEP);
        for _ in 0..3 {
            log.free_some();
        }
        assert_eq!(pending(&log), 0);
        assert!(log.garbage.is_empty());
    }
}
