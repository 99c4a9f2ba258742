//! The durable log's contract.

use std::future::Future;

use crate::error::StorageError;
use crate::types::{HardState, LogIndex, Position, WalEntry};

/// A durable snapshot of the state machine: the log position it covers and its
/// size. Its bytes stay in the log store, which streams them
/// ([`LogStore::snapshot_reader`], [`LogStore::read_snapshot`]): no one holds a
/// whole snapshot in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// The last entry the snapshot includes.
    pub last_included: Position,
    /// The serialized state's size in bytes.
    pub size: u64,
}

/// A snapshot being written into a log store ([`LogStore::snapshot_writer`]):
/// by a state machine's capture, off the engine task, or chunk by chunk as a
/// primary's snapshot arrives. Dropping it unfinished discards what it wrote.
pub trait SnapshotWriter: std::io::Write + Send {
    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Makes what was written durable and returns the snapshot it forms, ready
    /// for [`LogStore::save_snapshot`] or [`LogStore::install_snapshot`] (it is
    /// not the store's snapshot before that).
    fn finish(self: Box<Self>) -> Result<Snapshot, StorageError>;
}

/// A batch read from the durable log for a lagging peer (see
/// [`LogStore::read_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatchUpBatch {
    /// The position of the entry just before the first one (zero before index 1):
    /// the batch's `prev`, which the peer must hold.
    pub prev: Position,
    /// At least one entry, contiguous from the requested index.
    pub entries: Vec<WalEntry>,
}

impl CatchUpBatch {
    /// Builds the batch for `next` from two reads: the entry before `next` (`None`
    /// when `next` is 1: the position before is zero) and the entries from `next`,
    /// checking they are what was asked for.
    pub fn from_reads(
        next: LogIndex,
        before: Option<Vec<WalEntry>>,
        entries: Vec<WalEntry>,
    ) -> Result<Self, StorageError> {
        let bad =
            |why: &str| StorageError::Invalid(format!("catch-up read for index {next}: {why}"));
        let prev = match before {
            None if next.0 <= 1 => Position::ZERO,
            None => return Err(bad("the entry before it was not read")),
            Some(before) => match before.first() {
                Some(e) if e.index() == next.prev() => e.position,
                _ => return Err(bad("the log does not hold the entry before it")),
            },
        };
        if !entries
            .windows(2)
            .all(|w| w[1].index() == w[0].index().next())
        {
            return Err(bad("entries are not contiguous"));
        }
        match entries.first() {
            None => Err(bad("the log holds no entry from there")),
            Some(e) if e.index() != next => Err(bad("does not start at the requested index")),
            Some(_) => Ok(CatchUpBatch { prev, entries }),
        }
    }
}

/// Everything a node reads back from its store at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredState {
    /// The hard state, or `None` if the directory is empty (a fresh node).
    pub hard_state: Option<HardState>,
    /// The latest durable snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The entries after the snapshot, in order.
    pub entries: Vec<WalEntry>,
}

/// The durable write-ahead log and hard state of one node.
///
/// # Contract
/// - Operations take effect in the order they are *called*, not the order their
///   futures are polled: an implementation enqueues the operation before it returns
///   the future. The future resolves once the operation is durable (fsynced).
/// - `append` takes entries that follow the current last entry without a gap; a gap
///   or an entry whose checksum fails is refused with [`StorageError::Invalid`].
/// - `truncate_suffix(from)` removes every entry with index `>= from`.
/// - `purge_prefix(upto)` removes entries with index `<= upto`; it is only called
///   after a snapshot covering `upto` was saved.
/// - `save_hard_state` replaces the hard state atomically: after a crash the old or
///   the new state is read back, never a mix.
/// - Reading compacted entries fails with [`StorageError::Invalid`], never returns
///   a shorter range silently. Entries that a snapshot covers but that were not
///   purged yet can still be read: a primary streams them to a lagging standby.
/// - Snapshots are files of the store, streamed in and out: a writer
///   ([`snapshot_writer`](Self::snapshot_writer)) produces one, which becomes the
///   store's snapshot only with `save_snapshot` or `install_snapshot`. The store
///   *keeps* its snapshot and the newest one before it (older than it), at most
///   one per position: those, and finished ones not yet saved, can be read
///   ([`snapshot_reader`](Self::snapshot_reader), [`read_snapshot`](Self::read_snapshot)),
///   and saving a kept one makes it the store's snapshot again (an async-mode
///   rewind to the snapshot before a pending save). Others fail to read with
///   [`StorageError::Invalid`].
///
/// Implementations are checked by `ha_core::testkit::log_store_suite`.
pub trait LogStore: Send + Sync + 'static {
    /// Reads back everything durable.
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send;

    /// Appends entries; resolves when they are durable.
    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Reads entries `[from, to)`, stopping early once `max_bytes` is exceeded (at
    /// least one entry is returned if any exists).
    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send;

    /// Removes entries with index `>= from`.
    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Removes entries with index `<= upto`.
    fn purge_prefix(&self, upto: LogIndex)
        -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Replaces the hard state atomically.
    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Makes a snapshot (finished by a writer of this store, or kept) the store's
    /// snapshot, durably; the one it replaces is kept as the one before.
    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Replaces the whole log with a received snapshot: entries up to its position
    /// are dropped (and any that conflict with it), and the snapshot is saved.
    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Starts writing a snapshot that covers the log up to `at`. The writer owns
    /// what it needs: it runs on any thread, while the store goes on.
    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError>;

    /// Streams a snapshot's bytes (kept, or finished and not yet saved).
    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError>;

    /// Reads up to `max_bytes` of a snapshot from `offset` (a chunk for a peer),
    /// without holding up the store's writers. Fails if the store no longer keeps
    /// it, or `offset` is past its end.
    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send;

    /// The position of the last durable entry (or of the snapshot, if the log after
    /// it is empty).
    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send;

    /// Reads the batch a lagging peer whose next needed index is `next` gets: up to
    /// `max_entries` entries from `next`, stopping once `max_bytes` is exceeded (at
    /// least one entry), with the position of the entry before them. Fails if the
    /// log no longer holds the entry before `next` (the peer then needs the
    /// snapshot) or holds nothing from `next` on.
    ///
    /// The default reads with [`read`](Self::read); a store may serve it without
    /// holding up its writers (ha-wal's `WalStreamer` does).
    fn read_batch(
        &self,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<CatchUpBatch, StorageError>> + Send {
        let before = (next.0 > 1).then(|| self.read(next.prev(), next, usize::MAX));
        let to = LogIndex(next.0.saturating_add(max_entries as u64));
        let read = self.read(next, to, max_bytes);
        async move {
            let before = match before {
                Some(f) => Some(f.await?),
                None => None,
            };
            CatchUpBatch::from_reads(next, before, read.await?)
        }
    }

    /// The retention policy: once a durable snapshot covers the entries up to
    /// `snapshot`, how far [`purge_prefix`](Self::purge_prefix) should go. A primary
    /// serves a lagging standby from the durable log, so keeping the entries from
    /// `keep_from` on (the standby's match index, whose entry's position starts the
    /// next batch; `None` when there is no standby to keep entries for) spares it a
    /// full snapshot, like a replication slot; a policy should cap what it keeps so
    /// that a dead standby cannot fill the disk. The driver never purges past
    /// `snapshot`, whatever this returns.
    ///
    /// The default keeps nothing the snapshot covers.
    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        let _ = keep_from;
        snapshot
    }
}
