//! [`Wal`]: the durable log store and its [`LogStore`] impl. Opening it takes
//! the directory's lock ([`crate::lock`]) and recovers what is on disk
//! ([`crate::recovery`]).

use std::fs::{self, File};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use ha_core::log_store::{CatchUpBatch, LogStore, Snapshot, SnapshotWriter, StoredState};
use ha_core::types::{HardState, LogIndex, Position, WalEntry};
use ha_core::StorageError;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use crate::config::WalConfig;
use crate::format::{encode_record, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::fsutil::{io_err, sync_dir};
use crate::lock::lock_dir;
use crate::metrics::{Counters, WalMetrics};
use crate::recovery::{recover, Recovered};
use crate::retention::RetainedLog;
use crate::snapfiles::SnapFiles;
use crate::state::State;
use crate::streamer::WalStreamer;
use crate::writer::{EncodedBatch, GatherSignal, Op, Shared, Writer};

/// The sending side of the writer's queue, with the count of operations sent.
struct Submitter {
    tx: Option<Sender<Op>>,
    submitted: u64,
}

/// A durable write-ahead log in a data directory: segmented record files, the hard
/// state and the latest snapshot. Implements [`LogStore`].
///
/// # Files
/// - `NNNNNNNNNNNNNNNNNNNN.wal`: segments (see [`crate::format`]), in sequence order;
/// - `hard_state`, `snapshot`, `log_meta`: replaced atomically (temporary file,
///   fsync, rename, directory fsync); `log_meta` holds where the log starts after
///   `purge_prefix` / `install_snapshot`; `snapshot` names the snapshot data files
///   kept (`snap-<gen>.snap`, streamed in and out: see `snapfiles`);
/// - `LOCK`: held (`flock`) while the log is open; a second open fails.
///
/// # Ordering and durability
/// Every mutating operation is queued when the method is called, so operations take
/// effect in call order; its future resolves once it is durable. Appends queued
/// together share one write and one `fdatasync` (group commit), done by a dedicated
/// writer thread. Reads (`read`, `load`, `last_position`) wait until every operation
/// called before them has finished, then read the durable state (they may also see
/// operations called after them that finished meanwhile).
///
/// After an I/O error the log refuses every later operation: what reached the disk
/// is unknown, and the node should stop and reopen.
///
/// Dropping the `Wal` finishes the queued operations, stops the writer thread and
/// releases the lock.
pub struct Wal {
    dir: PathBuf,
    cfg: WalConfig,
    state: Arc<RwLock<State>>,
    counters: Arc<Counters>,
    submit: Mutex<Submitter>,
    published: watch::Receiver<u64>,
    signal: Arc<GatherSignal>,
    files: Arc<SnapFiles>,
    writer: Option<JoinHandle<()>>,
    _lock: File,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn closed() -> StorageError {
    StorageError::Io("the write-ahead log's writer thread has stopped".to_string())
}

impl Wal {
    /// Opens (or creates) the log in `dir` with the default [`WalConfig`].
    pub fn open_default(dir: impl AsRef<Path>) -> Result<Wal, StorageError> {
        Wal::open(dir, WalConfig::default())
    }

    /// Opens (or creates) the log in `dir`.
    ///
    /// Takes the directory's lock (a second open fails), verifies every record,
    /// truncates a torn record at the very tail of the last segment (a write that was
    /// never acknowledged), deletes leftovers of interrupted operations, and finishes
    /// an interrupted `install_snapshot`. Any other damage (a bad checksum before the
    /// tail, a bad header, a gap in the indices) is a [`StorageError::Corrupt`] that
    /// names the file and byte offset.
    pub fn open(dir: impl AsRef<Path>, cfg: WalConfig) -> Result<Wal, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        if cfg.segment_size <= SEGMENT_HEADER_LEN as u64 {
            return Err(StorageError::Invalid(format!(
                "segment size {} is not larger than a segment header ({SEGMENT_HEADER_LEN} bytes)",
                cfg.segment_size
            )));
        }
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| io_err("create directory", &dir, e))?;
            // The new directory's own entry must survive a crash too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent, cfg.sync)?;
            }
        }
        let lock = lock_dir(&dir)?;
        let Recovered {
            meta,
            hard_state,
            snapshot,
            files,
            segments,
            locs,
            next_seq,
        } = recover(&dir, cfg.sync)?;
        let files = Arc::new(files);
        let state = Arc::new(RwLock::new(State {
            base: meta.base,
            min_seq: meta.min_seq,
            segments,
            locs,
            hard_state,
            snapshot,
            failed: None,
        }));
        let counters = Arc::new(Counters::default());
        let (published_tx, published) = watch::channel(0u64);
        let signal = Arc::new(GatherSignal::default());
        let mut writer = Writer::new(
            dir.clone(),
            cfg.clone(),
            Shared {
                state: state.clone(),
                counters: counters.clone(),
                published: published_tx,
                signal: signal.clone(),
                files: Arc::clone(&files),
            },
            next_seq,
        );
        if let Some(at) = meta.installing {
            let saved = state.read().snapshot.as_ref().map(|s| s.last_included);
            if saved == Some(at) {
                tracing::info!(position = %at, "finishing an interrupted snapshot install");
                writer.finish_install(at)?;
            } else {
                tracing::info!(position = %at, "forgetting a snapshot install that did not save its snapshot");
                writer.forget_install()?;
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("ha-wal-writer".to_string())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::Io(format!("spawn the writer thread: {e}")))?;
        Ok(Wal {
            dir,
            cfg,
            state,
            counters,
            submit: Mutex::new(Submitter {
                tx: Some(tx),
                submitted: 0,
            }),
            published,
            signal,
            files,
            writer: Some(handle),
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings the log was opened with.
    pub fn config(&self) -> &WalConfig {
        &self.cfg
    }

    /// The append counters since the log was opened.
    pub fn metrics(&self) -> WalMetrics {
        self.counters.snapshot()
    }

    /// Histograms of the writer's fsyncs: their durations and entries per fsync.
    pub fn fsync_histograms(&self) -> crate::FsyncHistograms {
        self.counters.histograms()
    }

    /// A reader of catch-up batches and entry ranges that does not hold up the
    /// writer (see [`WalStreamer`]). [`LogStore::read`] and
    /// [`LogStore::read_batch`] use one.
    pub fn streamer(&self) -> WalStreamer {
        WalStreamer::new(Arc::clone(&self.state), self.published.clone())
    }

    /// The number of segment files.
    pub fn segment_count(&self) -> usize {
        self.state.read().segments.len()
    }

    /// The durable bytes of the segment files' records (headers included; the
    /// zeros written ahead are not counted).
    pub fn segment_bytes(&self) -> u64 {
        self.gauges().segment_bytes()
    }

    /// A handle that reads this log's counters and sizes after the `Wal` itself
    /// moved into a node (for a metrics exporter).
    pub fn gauges(&self) -> WalGauges {
        WalGauges {
            state: Arc::clone(&self.state),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Queues an operation built around a reply channel; the returned future
    /// resolves with its outcome.
    fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), StorageError>>) -> Op,
    ) -> impl Future<Output = Result<(), StorageError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = {
            let mut s = self.submit.lock();
            match s.tx.as_ref().map(|tx| (tx.send(make(reply)), tx.len())) {
                Some((Ok(()), queued)) => {
                    s.submitted += 1;
                    drop(s);
                    self.signal.queued(queued);
                    true
                }
                _ => false,
            }
        };
        async move {
            if !sent {
                return Err(closed());
            }
            rx.await.unwrap_or_else(|_| Err(closed()))
        }
    }

    /// Runs `f` on the durable state once every operation called before it finished.
    fn after_prior<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> Result<T, StorageError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StorageError>> + Send + 'static {
        let ticket = self.submit.lock().submitted;
        let mut published = self.published.clone();
        let state = self.state.clone();
        async move {
            let ready = *published.borrow() >= ticket;
            if !ready {
                published
                    .wait_for(|&done| done >= ticket)
                    .await
                    .map_err(|_| closed())?;
            }
            let st = state.read();
            st.check_usable()?;
            f(&st)
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.submit.lock().tx = None;
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "the write-ahead log's writer thread panicked");
            }
        }
    }
}

/// Checks and encodes entries in the caller's thread.
fn encode_batch(entries: &[WalEntry]) -> Result<EncodedBatch, StorageError> {
    let mut bytes = Vec::with_capacity(
        entries
            .iter()
            .map(|e| e.approx_size() + RECORD_HEADER_LEN + 16)
            .sum(),
    );
    let mut records = Vec::with_capacity(entries.len());
    let mut prev: Option<Position> = None;
    for e in entries {
        if !e.verify() {
            return Err(StorageError::Invalid(format!(
                "entry at {} fails its checksum",
                e.position
            )));
        }
        if let Some(p) = prev {
            if e.index() != p.index.next() {
                return Err(StorageError::Invalid(format!(
                    "entry at {} does not follow the entry before it {p} without a gap",
                    e.position
                )));
            }
        }
        prev = Some(e.position);
        let start = bytes.len();
        let len = encode_record(e, &mut bytes)?;
        records.push((e.position, start, len));
    }
    Ok(EncodedBatch { bytes, records })
}

impl LogStore for Wal {
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send {
        self.after_prior(|st| st.load())
    }

    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        let queued = match encode_batch(&entries) {
            Ok(batch) if batch.records.is_empty() => Ok(None),
            Ok(batch) => Ok(Some(self.submit(|reply| Op::Append(batch, reply)))),
            Err(e) => Err(e),
        };
        async move {
            match queued {
                Ok(Some(fut)) => fut.await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send {
        let ticket = self.submit.lock().submitted;
        let streamer = self.streamer();
        async move { streamer.read_after(ticket, from, to, max_bytes).await }
    }

    fn read_batch(
        &self,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<CatchUpBatch, StorageError>> + Send {
        let ticket = self.submit.lock().submitted;
        let streamer = self.streamer();
        async move {
            streamer
                .batch_after(ticket, next, max_entries, max_bytes)
                .await
        }
    }

    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        // The retention policy keeps the entries after its standby match: the
        // standby's last held entry is kept too, as the next batch's `prev`.
        let standby_match = keep_from.map(|k| LogIndex(k.0.saturating_sub(1)));
        self.cfg
            .retention
            .purge_upto(snapshot, standby_match, self)
            .unwrap_or(LogIndex::ZERO)
    }

    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(move |reply| Op::Truncate(from, reply))
    }

    fn purge_prefix(
        &self,
        upto: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(move |reply| Op::Purge(upto, reply))
    }

    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(|reply| Op::HardState(state, reply))
    }

    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(move |reply| Op::SaveSnapshot(snapshot, reply))
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(move |reply| Op::InstallSnapshot(snapshot, reply))
    }

    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        self.files.writer(at)
    }

    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        self.files.reader(snapshot)
    }

    /// On a blocking thread of the tokio runtime (inline without one): the
    /// chunk is read from disk while the engine goes on.
    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send {
        let files = Arc::clone(&self.files);
        async move {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => rt
                    .spawn_blocking(move || files.read_at(snapshot, offset, max_bytes))
                    .await
                    .map_err(|e| StorageError::Io(format!("a snapshot read failed: {e}")))?,
                Err(_) => files.read_at(snapshot, offset, max_bytes),
            }
        }
    }

    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send {
        self.after_prior(|st| Ok(st.last()))
    }
}

impl RetainedLog for Wal {
    fn first_index(&self) -> LogIndex {
        self.state.read().base.index.next()
    }

    fn last_index(&self) -> LogIndex {
        self.state.read().last().index
    }

    fn bytes_after(&self, index: LogIndex) -> u64 {
        self.state.read().bytes_after(index)
    }
}

/// Reads a [`Wal`]'s counters and sizes; cheap to clone ([`Wal::gauges`]).
#[derive(Clone)]
pub struct WalGauges {
    state: Arc<RwLock<State>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for WalGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalGauges").finish_non_exhaustive()
    }
}

impl WalGauges {
    /// As [`Wal::metrics`].
    pub fn metrics(&self) -> WalMetrics {
        self.counters.snapshot()
    }

    /// As [`Wal::fsync_histograms`].
    pub fn fsync_histograms(&self) -> crate::FsyncHistograms {
        self.counters.histograms()
    }

    /// As [`Wal::segment_count`].
    pub fn segment_count(&self) -> usize {
        self.state.read().segments.len()
    }

    /// As [`Wal::segment_bytes`].
    pub fn segment_bytes(&self) -> u64 {
        self.state.read().segments.iter().map(|s| s.len).sum()
    }

    /// The durable record bytes of the entries after `index` (0 if the log
    /// holds none after it): how far, in bytes, a peer at `index` lags.
    pub fn bytes_after(&self, index: LogIndex) -> u64 {
        self.state.read().bytes_after(index)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::{LogMeta, SNAPSHOT_MAGIC};
    use crate::fsutil::{encode_payload, write_small_file};
    use crate::snapfiles::{done_name, Kept, SnapRef, SNAPSHOT_FILE};
    use crate::testutil::{block_on, cfg, entry, six, term, write_meta};

    /// After the writer failed (what is on disk is unknown), reads refuse too,
    /// naming the failure, until the log is reopened.
    #[test]
    fn reads_refuse_after_the_writer_failed() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        assert_eq!(
            block_on(wal.read(LogIndex(1), LogIndex(3), usize::MAX))
                .unwrap()
                .len(),
            2
        );
        wal.state.write().failed = Some(StorageError::Io("disk full".into()));
        let refused = |r: Result<(), StorageError>| {
            let e = r.unwrap_err();
            assert!(
                e.to_string().contains("disk full") && e.to_string().contains("reopen"),
                "{e}"
            );
        };
        refused(block_on(wal.read(LogIndex(1), LogIndex(3), usize::MAX)).map(|_| ()));
        refused(block_on(wal.read_batch(LogIndex(2), 3, usize::MAX)).map(|_| ()));
        refused(block_on(wal.load()).map(|_| ()));
        refused(block_on(wal.last_position()).map(|_| ()));
        drop(wal);
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        assert_eq!(
            block_on(wal.read(LogIndex(1), LogIndex(7), usize::MAX))
                .unwrap()
                .len(),
            6
        );
    }

    #[test]
    fn every_fsync_is_timed_and_its_entries_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Wal::open(
            tmp.path(),
            WalConfig {
                sync: true,
                ..cfg()
            },
        )
        .unwrap();
        block_on(wal.append(vec![entry(1, 1), entry(1, 2)])).unwrap();
        block_on(wal.append(vec![entry(1, 3)])).unwrap();
        let h = wal.fsync_histograms();
        let fsyncs = wal.metrics().fsyncs;
        assert!(fsyncs >= 1);
        assert_eq!(h.duration.count(), fsyncs, "one duration per fsync");
        assert_eq!(h.entries.count(), fsyncs);
        assert_eq!(h.entries.sum, 3.0, "every entry in some fsync");
        assert!(wal.segment_bytes() > 0);
    }

    /// What an install left on disk when it crashed after saving its snapshot (or
    /// before, if `snapshot_at` differs from `installing`).
    fn crash_mid_install(dir: &Path, installing: Position, snapshot_at: Position) {
        let meta = LogMeta {
            base: Position::ZERO,
            min_seq: 0,
            installing: Some(installing),
        };
        write_meta(dir, &meta);
        std::fs::write(dir.join(done_name(1)), b"snap").unwrap();
        let kept = Kept {
            current: Some(SnapRef {
                last_included: snapshot_at,
                size: 4,
                gen: 1,
                crc: crc32fast::hash(b"snap"),
            }),
            previous: None,
        };
        write_small_file(
            dir,
            SNAPSHOT_FILE,
            SNAPSHOT_MAGIC,
            &encode_payload("s", &kept).unwrap(),
            true,
        )
        .unwrap();
    }

    #[test]
    fn an_interrupted_conflicting_install_is_finished_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        let at = Position::new(term(2), LogIndex(4));
        crash_mid_install(tmp.path(), at, at);
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        let state = block_on(wal.load()).unwrap();
        assert_eq!(state.snapshot.map(|s| s.last_included), Some(at));
        assert!(state.entries.is_empty(), "the conflicting log is gone");
        assert_eq!(block_on(wal.last_position()).unwrap(), at);
        assert_eq!(wal.segment_count(), 0);
        drop(wal);
        // And it stays finished.
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        assert_eq!(block_on(wal.last_position()).unwrap(), at);
        block_on(wal.append(vec![entry(2, 5)])).unwrap();
    }

    #[test]
    fn an_interrupted_matching_install_keeps_the_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        let at = Position::new(term(1), LogIndex(4));
        crash_mid_install(tmp.path(), at, at);
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        let state = block_on(wal.load()).unwrap();
        assert_eq!(state.entries, vec![entry(1, 5), entry(1, 6)]);
        assert!(matches!(
            block_on(wal.read(LogIndex(4), LogIndex(5), usize::MAX)),
            Err(StorageError::Invalid(_))
        ));
    }

    #[test]
    fn an_install_that_did_not_save_its_snapshot_is_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        crash_mid_install(
            tmp.path(),
            Position::new(term(2), LogIndex(4)),
            Position::new(term(1), LogIndex(2)),
        );
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        let state = block_on(wal.load()).unwrap();
        assert_eq!(
            state.snapshot.map(|s| s.last_included),
            Some(Position::new(term(1), LogIndex(2)))
        );
        assert_eq!(
            state.entries,
            (3..=6).map(|i| entry(1, i)).collect::<Vec<_>>()
        );
        assert_eq!(block_on(wal.last_position()).unwrap().index, LogIndex(6));
    }
}
