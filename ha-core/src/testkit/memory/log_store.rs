//! [`MemLogStore`]: a [`LogStore`] kept in memory.

use std::collections::VecDeque;
use std::future::{ready, Future};
use std::sync::Arc;

use parking_lot::Mutex;

use super::SnapshotFiles;
use crate::error::StorageError;
use crate::log_store::{LogStore, Snapshot, SnapshotWriter, StoredState};
use crate::types::{HardState, LogIndex, Position, WalEntry};

/// An in-memory [`LogStore`].
///
/// Every operation takes effect while the method is called (before it returns its
/// future) and is "durable" at once, so operations are trivially ordered by call
/// time. Clones share the same log: a clone stands for the same directory opened
/// again, so "reopening" a `MemLogStore` is cloning it.
///
/// Besides the contract in [`LogStore`], it refuses (with [`StorageError::Invalid`])
/// requests that only a buggy caller makes, so the simulator catches them:
/// appending an entry whose term is lower than the previous entry's, truncating at
/// or below the snapshot or the compacted prefix, purging entries that no saved
/// snapshot covers, and saving a snapshot behind the compacted prefix.
#[derive(Clone, Debug)]
pub struct MemLogStore {
    inner: Arc<Mutex<Inner>>,
    /// The retention policy's cap (see [`MemLogStore::with_retention`]).
    retain_max: u64,
}

impl Default for MemLogStore {
    fn default() -> Self {
        MemLogStore {
            inner: Arc::default(),
            retain_max: DEFAULT_RETAIN_MAX,
        }
    }
}

/// How many entries behind its snapshot a [`MemLogStore`] keeps for a lagging
/// standby unless told otherwise.
pub const DEFAULT_RETAIN_MAX: u64 = 1_000_000;

#[derive(Debug, Default)]
struct Inner {
    hard_state: Option<HardState>,
    snapshots: SnapshotFiles,
    /// The position just before `entries[0]`: the last compacted entry (or the
    /// snapshot an install left the log at), `Position::ZERO` for a fresh log.
    base: Position,
    /// Contiguous entries after `base`.
    entries: VecDeque<WalEntry>,
}

impl MemLogStore {
    /// An empty store: no hard state, no snapshot, no entries (a fresh node).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose retention policy keeps the entries a lagging standby
    /// still needs, but at most `max_entries` behind the snapshot (0: purge
    /// everything a snapshot covers).
    pub fn with_retention(max_entries: u64) -> Self {
        MemLogStore {
            inner: Arc::default(),
            retain_max: max_entries,
        }
    }

    /// Everything the store holds, read synchronously (what [`LogStore::load`]
    /// returns), for tests and simulator invariant checks.
    pub fn state(&self) -> StoredState {
        self.inner.lock().load()
    }

    /// The position of the last entry (or of the compacted prefix / snapshot),
    /// read synchronously.
    pub fn last(&self) -> Position {
        self.inner.lock().last()
    }

    /// The bytes of the store's snapshot, read synchronously (for tests).
    pub fn snapshot_bytes(&self) -> Option<Vec<u8>> {
        let inner = self.inner.lock();
        let s = inner.snapshots.current()?;
        inner.snapshots.bytes(s).ok().map(|b| b.to_vec())
    }

    /// Every retained entry, including any that a snapshot covers but that were
    /// not purged yet.
    pub fn entries(&self) -> Vec<WalEntry> {
        self.inner.lock().entries.iter().cloned().collect()
    }
}

fn invalid(msg: String) -> StorageError {
    StorageError::Invalid(msg)
}

impl Inner {
    fn last(&self) -> Position {
        self.entries.back().map(|e| e.position).unwrap_or(self.base)
    }

    /// The offset in `entries` of `index`, if the log holds it.
    fn offset(&self, index: LogIndex) -> Option<usize> {
        if index <= self.base.index {
            return None;
        }
        let k = usize::try_from(index.0 - self.base.index.0 - 1).ok()?;
        (k < self.entries.len()).then_some(k)
    }

    fn snapshot_index(&self) -> LogIndex {
        self.snapshots
            .current()
            .map(|s| s.last_included.index)
            .unwrap_or(LogIndex::ZERO)
    }

    fn load(&self) -> StoredState {
        let after = self.snapshot_index();
        StoredState {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshots.current(),
            entries: self
                .entries
                .iter()
                .filter(|e| e.index() > after)
                .cloned()
                .collect(),
        }
    }

    fn append(&mut self, entries: Vec<WalEntry>) -> Result<(), StorageError> {
        // Validate the whole batch first: a refused batch leaves the log unchanged.
        let mut prev = self.last();
        for e in &entries {
            if !e.verify() {
                return Err(invalid(format!(
                    "entry at {} fails its checksum",
                    e.position
                )));
            }
            if e.index() != prev.index.next() {
                return Err(invalid(format!(
                    "entry at {} does not follow the last entry {} without a gap",
                    e.position, prev
                )));
            }
            if e.term() < prev.term {
                return Err(invalid(format!(
                    "entry at {} has a lower term than the entry before it {}",
                    e.position, prev
                )));
            }
            prev = e.position;
        }
        self.entries.extend(entries);
        Ok(())
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<WalEntry>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        if from <= self.base.index {
            return Err(invalid(format!(
                "read from index {from}: entries up to {} are compacted (or index 0, which is no entry)",
                self.base.index
            )));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let Some(start) = self.offset(from) else {
            return Ok(out);
        };
        let want = usize::try_from(to.0 - from.0).unwrap_or(usize::MAX);
        for e in self.entries.iter().skip(start).take(want) {
            bytes = bytes.saturating_add(e.approx_size());
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn truncate_suffix(&mut self, from: LogIndex) -> Result<(), StorageError> {
        if from <= self.base.index || from <= self.snapshot_index() {
            return Err(invalid(format!(
                "truncate from index {from}: at or below the compacted prefix {} or the snapshot {}",
                self.base.index,
                self.snapshot_index()
            )));
        }
        if let Some(k) = self.offset(from) {
            self.entries.truncate(k);
        }
        Ok(())
    }

    fn purge_prefix(&mut self, upto: LogIndex) -> Result<(), StorageError> {
        if upto <= self.base.index {
            return Ok(());
        }
        let Some(snapshot) = self
            .snapshots
            .current()
            .filter(|s| s.last_included.index >= upto)
        else {
            return Err(invalid(format!(
                "purge up to index {upto}: no saved snapshot covers it"
            )));
        };
        match self.offset(upto) {
            Some(k) => {
                self.base = self.entries[k].position;
                self.entries.drain(..=k);
            }
            None => {
                // `upto` is past the last entry; the snapshot covers the whole log.
                self.base = snapshot.last_included;
                self.entries.clear();
            }
        }
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        if snapshot.last_included.index < self.base.index {
            return Err(invalid(format!(
                "snapshot at {} is behind the compacted prefix {}",
                snapshot.last_included, self.base
            )));
        }
        self.snapshots.save(snapshot)
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        // The snapshot must be there before the log changes.
        self.snapshots.bytes(snapshot)?;
        let at = snapshot.last_included;
        let keep_suffix = at.index >= self.base.index
            && (at == self.base
                || self
                    .offset(at.index)
                    .is_some_and(|k| self.entries[k].position == at));
        if keep_suffix {
            if let Some(k) = self.offset(at.index) {
                self.entries.drain(..=k);
            }
        } else {
            self.entries.clear();
        }
        self.base = at;
        self.snapshots.save(snapshot)
    }
}

impl LogStore for MemLogStore {
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send {
        ready(Ok(self.inner.lock().load()))
    }

    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        ready(self.inner.lock().append(entries))
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send {
        ready(self.inner.lock().read(from, to, max_bytes))
    }

    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        ready(self.inner.lock().truncate_suffix(from))
    }

    fn purge_prefix(
        &self,
        upto: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        ready(self.inner.lock().purge_prefix(upto))
    }

    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.inner.lock().hard_state = Some(state);
        ready(Ok(()))
    }

    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        ready(self.inner.lock().save_snapshot(snapshot))
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        ready(self.inner.lock().install_snapshot(snapshot))
    }

    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        Ok(self.inner.lock().snapshots.writer(at))
    }

    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        self.inner.lock().snapshots.reader(snapshot)
    }

    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send {
        ready(
            self.inner
                .lock()
                .snapshots
                .read(snapshot, offset, max_bytes),
        )
    }

    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send {
        ready(Ok(self.inner.lock().last()))
    }

    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        retention_point(snapshot, keep_from, self.retain_max)
    }
}

/// The purge point that keeps the entries from `keep_from` on, but at most `max`
/// entries behind the snapshot; never past the snapshot.
pub(crate) fn retention_point(
    snapshot: LogIndex,
    keep_from: Option<LogIndex>,
    max: u64,
) -> LogIndex {
    match keep_from {
        Some(k) => LogIndex(
            k.0.saturating_sub(1)
                .max(snapshot.0.saturating_sub(max))
                .min(snapshot.0),
        ),
        None => snapshot,
    }
}
