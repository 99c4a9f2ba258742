//! The published (durable) state of the log, shared by the writer thread and readers.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use ha_core::log_store::{Snapshot, StoredState};
use ha_core::types::{HardState, LogIndex, Position, Term};
use ha_core::StorageError;

use crate::format::SEGMENT_HEADER_LEN;

/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Its sequence number (and file name).
    pub(crate) seq: u64,
    /// The index of its first record.
    pub(crate) first_index: u64,
    /// How many records it holds.
    pub(crate) count: u64,
    /// The durable length of its records in bytes (header included).
    pub(crate) len: u64,
    /// The file's length when the log was opened: bytes from `len` on are zeros
    /// written ahead (see [`crate::WalConfig::preallocate`]). Only the writer's
    /// starting point; it tracks the length from then on.
    pub(crate) file_len: u64,
    /// Its path.
    pub(crate) path: PathBuf,
    /// An open handle (read and write).
    pub(crate) file: Arc<File>,
}

impl Segment {
    /// One past the index of its last record.
    pub(crate) fn end_index(&self) -> u64 {
        self.first_index.saturating_add(self.count)
    }
}

/// Where an entry's record lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    /// The segment's sequence number.
    pub(crate) seq: u64,
    /// The record's byte offset in the segment.
    pub(crate) offset: u64,
    /// The record's length in bytes.
    pub(crate) len: u32,
    /// The entry's term.
    pub(crate) term: Term,
}

/// What is durable: the log's start, its segments, where each entry is, the hard
/// state and the snapshot. Changed only by the writer thread, after the change is
/// durable.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The position just before the first entry of the log.
    pub(crate) base: Position,
    /// Segments with a lower sequence number are obsolete.
    pub(crate) min_seq: u64,
    /// The live segments, by sequence number.
    pub(crate) segments: Vec<Segment>,
    /// The location of every entry after `base`, in order.
    pub(crate) locs: VecDeque<Loc>,
    /// The hard state, if one was saved.
    pub(crate) hard_state: Option<HardState>,
    /// The latest snapshot, if one was saved.
    pub(crate) snapshot: Option<Snapshot>,
    /// Set when the writer failed: what is on disk is then unknown (an operation
    /// may have been half applied), so reads refuse too, until the log is reopened.
    pub(crate) failed: Option<StorageError>,
}

impl State {
    /// Refuses reads once the writer failed.
    pub(crate) fn check_usable(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(e) => Err(StorageError::Io(format!(
                "the write-ahead log failed earlier ({e}); reopen it"
            ))),
            None => Ok(()),
        }
    }

    /// The position of the last entry, or `base` if the log is empty.
    pub(crate) fn last(&self) -> Position {
        match self.locs.back() {
            Some(loc) => Position::new(
                loc.term,
                LogIndex(self.base.index.0.saturating_add(self.locs.len() as u64)),
            ),
            None => self.base,
        }
    }

    /// The location of the entry at `index`, if the log holds it.
    pub(crate) fn loc(&self, index: u64) -> Option<&Loc> {
        let k = index.checked_sub(self.base.index.0)?.checked_sub(1)?;
        self.locs.get(usize::try_from(k).ok()?)
    }

    /// The segment with sequence number `seq`.
    pub(crate) fn segment(&self, seq: u64) -> Option<&Segment> {
        let k = self.segments.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.segments.get(k)
    }

    /// The snapshot's index, zero without one.
    pub(crate) fn snapshot_index(&self) -> LogIndex {
        self.snapshot
            .as_ref()
            .map(|s| s.last_included.index)
            .unwrap_or(LogIndex::ZERO)
    }

    /// Everything durable, as [`ha_core::log_store::LogStore::load`] returns it.
    pub(crate) fn load(&self) -> Result<StoredState, StorageError> {
        let after = self.snapshot_index().max(self.base.index);
        let last = self.last().index;
        let entries = if after < last {
            crate::streamer::read_inline(self, after.next(), last.next())?
        } else {
            Vec::new()
        };
        Ok(StoredState {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshot,
            entries,
        })
    }

    /// The record bytes of the entries after `index`.
    pub(crate) fn bytes_after(&self, index: LogIndex) -> u64 {
        let i = index.0.max(self.base.index.0);
        let Some(loc) = self.loc(i.saturating_add(1)) else {
            return 0;
        };
        let Ok(k) = self.segments.binary_search_by_key(&loc.seq, |s| s.seq) else {
            return 0;
        };
        let mut total = self.segments[k].len.saturating_sub(loc.offset);
        for s in &self.segments[k + 1..] {
            total += s.len.saturating_sub(SEGMENT_HEADER_LEN as u64);
        }
        total
    }
}
