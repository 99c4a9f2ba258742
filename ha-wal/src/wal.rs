//! [`Wal`]: the durable log store, and its recovery on open.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use ha_core::log_store::{CatchUpBatch, LogStore, Snapshot, StoredState};
use ha_core::types::{HardState, LogIndex, Position, WalEntry};
use ha_core::StorageError;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use crate::config::WalConfig;
use crate::format::{
    decode_record, encode_record, parse_segment_file_name, LogMeta, RecordDecode, SegmentHeader,
    SnapshotRecord, HARD_STATE_MAGIC, META_MAGIC, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
    SNAPSHOT_MAGIC,
};
use crate::fsutil::{
    corrupt, decode_payload, io_err, read_small_file, remove_file, sync_dir, TMP_SUFFIX,
};
use crate::metrics::{Counters, WalMetrics};
use crate::retention::RetainedLog;
use crate::state::{Loc, Segment, State};
use crate::streamer::WalStreamer;
use crate::writer::{
    EncodedBatch, GatherSignal, Op, Writer, HARD_STATE_FILE, META_FILE, SNAPSHOT_FILE,
};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "LOCK";

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
///   `purge_prefix` / `install_snapshot`;
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

/// Takes the directory's lock file.
fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err("open lock file", &path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(StorageError::Io(format!(
                "data directory {} is already in use: its lock file {LOCK_FILE} is held by another open log (in this or another process)",
                dir.display()
            )))
        }
        Err(TryLockError::Error(e)) => return Err(io_err("lock", &path, e)),
    }
    // For whoever looks: which process holds it. Not needed for correctness.
    let _ = f
        .set_len(0)
        .and_then(|()| writeln!(f, "{}", std::process::id()));
    Ok(f)
}

/// True if a whole valid record of a *later* write group starts in `bytes` after
/// `from` and at or before `last_start` (the last non-zero byte: a record header is
/// never all zeros). Valid records of the group the damage lies in (group start at
/// or before `from`) do not count: that group's fdatasync never completed, so its
/// sectors may have landed in any order and none of it was acknowledged.
///
/// Only called on damage.
fn later_group_after(bytes: &[u8], from: usize, last_start: usize) -> bool {
    (from + 1..=last_start.min(bytes.len())).any(|p| {
        matches!(decode_record(&bytes[p..]), RecordDecode::Record { group_start, .. } if group_start > from as u64)
    })
}

/// What scanning the segments found.
struct Scanned {
    segments: Vec<Segment>,
    locs: std::collections::VecDeque<Loc>,
}

/// Reads and verifies every segment, truncating a torn tail of the last one.
fn scan_segments(
    list: &[(u64, PathBuf)],
    base: Position,
    sync: bool,
) -> Result<Scanned, StorageError> {
    let mut segments = Vec::with_capacity(list.len());
    let mut locs = std::collections::VecDeque::new();
    let mut next: Option<u64> = None;
    let mut prev_term = None;
    for (k, (seq, path)) in list.iter().enumerate() {
        let is_last = k + 1 == list.len();
        let bytes = fs::read(path).map_err(|e| io_err("read segment", path, e))?;
        let header = SegmentHeader::decode(&bytes).map_err(|why| corrupt(path, 0, &why))?;
        if header.seq != *seq {
            return Err(corrupt(
                path,
                0,
                &format!(
                    "header names segment {} but the file name says {seq}",
                    header.seq
                ),
            ));
        }
        match next {
            Some(want) if header.first_index != want => {
                return Err(corrupt(
                    path,
                    0,
                    &format!(
                        "segment starts at index {} but the previous segment ends before index {want} (a gap or an overlap)",
                        header.first_index
                    ),
                ))
            }
            None if header.first_index == 0 || header.first_index > base.index.0.saturating_add(1) => {
                return Err(corrupt(
                    path,
                    0,
                    &format!(
                        "first segment starts at index {} but the log starts after index {} (a gap)",
                        header.first_index, base.index
                    ),
                ))
            }
            _ => {}
        }
        let mut off = SEGMENT_HEADER_LEN;
        let mut file_len = bytes.len() as u64;
        let mut index = header.first_index;
        while off < bytes.len() {
            let damage = match decode_record(&bytes[off..]) {
                RecordDecode::Record { entry, len, .. } => {
                    let pos = entry.position;
                    let problem = if pos.index.0 != index {
                        Some(format!(
                            "record holds index {}, expected {index} (a gap)",
                            pos.index
                        ))
                    } else if pos.index.0 == base.index.0 && pos != base {
                        Some(format!(
                            "entry at {pos} does not match the log start {base} recorded in {META_FILE}"
                        ))
                    } else if prev_term.is_some_and(|t| pos.term < t) {
                        Some(format!(
                            "entry at {pos} has a lower term than the entry before it"
                        ))
                    } else if pos.index.0 == base.index.0.saturating_add(1) && pos.term < base.term
                    {
                        Some(format!(
                            "entry at {pos} has a lower term than the log start {base}"
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = problem {
                        return Err(corrupt(path, off as u64, &why));
                    }
                    prev_term = Some(pos.term);
                    if pos.index > base.index {
                        locs.push_back(Loc {
                            seq: *seq,
                            offset: off as u64,
                            len: len as u32,
                            term: pos.term,
                        });
                    }
                    off += len;
                    index = index
                        .checked_add(1)
                        .ok_or_else(|| corrupt(path, off as u64, "log index overflows"))?;
                    continue;
                }
                RecordDecode::Truncated => "record cut short".to_string(),
                RecordDecode::Invalid(why) => why,
            };
            // Zeros to the end of the file: preallocated space, where records end.
            let Some(last_nonzero) = bytes[off..].iter().rposition(|&b| b != 0) else {
                break;
            };
            // Damage. Only a torn tail of the last segment (nothing valid after it)
            // is an unacknowledged write; anything else is corruption.
            if !is_last {
                return Err(corrupt(
                    path,
                    off as u64,
                    &format!("{damage} (not at the end of the log)"),
                ));
            }
            if later_group_after(&bytes, off, off + last_nonzero) {
                return Err(corrupt(
                    path,
                    off as u64,
                    &format!(
                        "{damage}, and records of a later write group follow (not a torn tail)"
                    ),
                ));
            }
            tracing::warn!(
                segment = %path.display(),
                offset = off,
                dropped_bytes = bytes.len() - off,
                reason = %damage,
                "truncating a torn record at the tail of the log (it was never acknowledged)"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_err("open", path, e))?;
            f.set_len(off as u64).map_err(|e| {
                io_err(
                    &format!("truncate torn tail at byte offset {off} of"),
                    path,
                    e,
                )
            })?;
            if sync {
                f.sync_all().map_err(|e| io_err("fsync", path, e))?;
            }
            file_len = off as u64;
            break;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open segment", path, e))?;
        let count = index - header.first_index;
        next = Some(index);
        segments.push(Segment {
            seq: *seq,
            first_index: header.first_index,
            count,
            len: off as u64,
            file_len,
            path: path.clone(),
            file: Arc::new(file),
        });
    }
    if let (Some(end), Some(last)) = (next, segments.last()) {
        if end.saturating_sub(1) < base.index.0 {
            return Err(corrupt(
                &last.path,
                last.len,
                &format!(
                    "the log ends at index {} but starts after index {} (recorded in {META_FILE})",
                    end.saturating_sub(1),
                    base.index
                ),
            ));
        }
    }
    Ok(Scanned { segments, locs })
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

        // List the directory: segments, and leftovers of interrupted writes.
        let mut listed: Vec<(u64, PathBuf)> = Vec::new();
        let read_dir = fs::read_dir(&dir).map_err(|e| io_err("list directory", &dir, e))?;
        for item in read_dir {
            let item = item.map_err(|e| io_err("list directory", &dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let path = item.path();
            if name.ends_with(TMP_SUFFIX) {
                tracing::info!(file = %path.display(), "deleting a temporary file left by an interrupted write");
                remove_file(&path)?;
                continue;
            }
            match parse_segment_file_name(name) {
                None => {}
                Some(Ok(seq)) => listed.push((seq, path)),
                Some(Err(why)) => return Err(corrupt(&path, 0, &why)),
            }
        }
        listed.sort();

        let meta: LogMeta = match read_small_file(&dir, META_FILE, META_MAGIC)? {
            Some(p) => decode_payload(&dir.join(META_FILE), &p)?,
            None => LogMeta::default(),
        };
        let hard_state: Option<HardState> =
            match read_small_file(&dir, HARD_STATE_FILE, HARD_STATE_MAGIC)? {
                Some(p) => Some(decode_payload(&dir.join(HARD_STATE_FILE), &p)?),
                None => None,
            };
        let snapshot: Option<Snapshot> = match read_small_file(&dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC)?
        {
            Some(p) => Some(
                decode_payload::<SnapshotRecord>(&dir.join(SNAPSHOT_FILE), &p)?.into_snapshot(),
            ),
            None => None,
        };

        // Segments below `min_seq` were being deleted by a purge or install.
        let (obsolete, live): (Vec<_>, Vec<_>) =
            listed.into_iter().partition(|(seq, _)| *seq < meta.min_seq);
        for (_, path) in &obsolete {
            tracing::info!(segment = %path.display(), "deleting a segment an interrupted purge or install left behind");
            remove_file(path)?;
        }
        if !obsolete.is_empty() {
            sync_dir(&dir, cfg.sync)?;
        }

        let scanned = scan_segments(&live, meta.base, cfg.sync)?;
        let next_seq = live
            .last()
            .map(|(seq, _)| seq.saturating_add(1))
            .unwrap_or(0)
            .max(meta.min_seq);
        let state = Arc::new(RwLock::new(State {
            base: meta.base,
            min_seq: meta.min_seq,
            segments: scanned.segments,
            locs: scanned.locs,
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
            state.clone(),
            counters.clone(),
            published_tx,
            signal.clone(),
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
        self.submit(|reply| Op::SaveSnapshot(snapshot, reply))
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.submit(|reply| Op::InstallSnapshot(snapshot, reply))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fsutil::{encode_payload, write_small_file};
    use ha_core::types::{Command, NodeId, Payload, Term};

    fn term(n: u64) -> Term {
        Term {
            number: n,
            node: NodeId(1),
        }
    }

    fn entry(t: u64, i: u64) -> WalEntry {
        WalEntry::new(
            Position::new(term(t), LogIndex(i)),
            Payload::Command(Command(vec![i as u8; 20])),
        )
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn cfg() -> WalConfig {
        WalConfig::default().with_segment_size(200)
    }

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

    /// A log with entries 1..=6 in term 1 over several segments, closed.
    fn six(dir: &Path) {
        let wal = Wal::open(dir, cfg()).unwrap();
        block_on(wal.append((1..=6).map(|i| entry(1, i)).collect())).unwrap();
        assert!(wal.segment_count() > 2);
    }

    /// What an install left on disk when it crashed after saving its snapshot (or
    /// before, if `snapshot_at` differs from `installing`).
    fn crash_mid_install(dir: &Path, installing: Position, snapshot_at: Position) {
        let meta = LogMeta {
            base: Position::ZERO,
            min_seq: 0,
            installing: Some(installing),
        };
        write_small_file(
            dir,
            META_FILE,
            META_MAGIC,
            &encode_payload("m", &meta).unwrap(),
            true,
        )
        .unwrap();
        let snap = SnapshotRecord {
            last_included: snapshot_at,
            data: b"snap".to_vec(),
        };
        write_small_file(
            dir,
            SNAPSHOT_FILE,
            SNAPSHOT_MAGIC,
            &encode_payload("s", &snap).unwrap(),
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

    #[test]
    fn leftovers_of_interrupted_operations_are_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        // A purge that recorded its new start but crashed before deleting segments.
        let meta = LogMeta {
            base: Position::new(term(1), LogIndex(2)),
            min_seq: 1,
            installing: None,
        };
        let first = tmp.path().join(crate::format::segment_file_name(0));
        let bytes = fs::read(&first).unwrap();
        let ranges = {
            let mut v = Vec::new();
            let mut off = SEGMENT_HEADER_LEN;
            while let RecordDecode::Record { entry, len, .. } = decode_record(&bytes[off..]) {
                v.push(entry.index().0);
                off += len;
            }
            v
        };
        // The test needs segment 0 to end at or before index 2.
        assert!(ranges.iter().all(|&i| i <= 2), "{ranges:?}");
        write_small_file(
            tmp.path(),
            META_FILE,
            META_MAGIC,
            &encode_payload("m", &meta).unwrap(),
            true,
        )
        .unwrap();
        fs::write(tmp.path().join("hard_state.tmp"), b"half written").unwrap();
        let wal = Wal::open(tmp.path(), cfg()).unwrap();
        assert!(!first.exists(), "the obsolete segment was deleted");
        assert!(!tmp.path().join("hard_state.tmp").exists());
        let state = block_on(wal.load()).unwrap();
        assert_eq!(
            state.entries,
            (3..=6).map(|i| entry(1, i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_log_start_that_does_not_match_the_entries_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        six(tmp.path());
        let meta = LogMeta {
            base: Position::new(term(7), LogIndex(3)),
            min_seq: 0,
            installing: None,
        };
        write_small_file(
            tmp.path(),
            META_FILE,
            META_MAGIC,
            &encode_payload("m", &meta).unwrap(),
            true,
        )
        .unwrap();
        let err = Wal::open(tmp.path(), cfg()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("byte offset"), "{err}");
    }
}
