//! The writer thread: takes operations in call order from a channel, groups
//! appends into one write and one `fdatasync`, and performs every other operation
//! (truncate, purge, hard state, snapshots) in between, in order.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;

use crossbeam_channel::Receiver;
use ha_core::log_store::Snapshot;
use ha_core::types::{HardState, LogIndex, Position};
use ha_core::StorageError;
use parking_lot::RwLock;
use tokio::sync::{oneshot, watch};

use crate::config::WalConfig;
use crate::format::{
    segment_file_name, set_group_start, LogMeta, SegmentHeader, HARD_STATE_MAGIC, META_MAGIC,
    SEGMENT_HEADER_LEN,
};
use crate::fsutil::{encode_payload, io_err, remove_file, sync_dir, write_small_file, TMP_SUFFIX};
use crate::metrics::Counters;
use crate::snapfiles::SnapFiles;
use crate::state::{Loc, Segment, State};

/// Preallocation writes zeros in pieces of at most this size.
const ZERO_CHUNK: usize = 1 << 20;

/// The hard-state file's name.
pub(crate) const HARD_STATE_FILE: &str = "hard_state";
/// The log metadata file's name.
pub(crate) const META_FILE: &str = "log_meta";

/// Where an operation's outcome goes.
pub(crate) type Reply = oneshot::Sender<Result<(), StorageError>>;

/// Entries encoded as records by the caller, ready to be copied into a segment.
#[derive(Debug)]
pub(crate) struct EncodedBatch {
    /// The records, back to back.
    pub(crate) bytes: Vec<u8>,
    /// Each record's position, start in `bytes` and length.
    pub(crate) records: Vec<(Position, usize, usize)>,
}

/// An operation for the writer thread.
#[derive(Debug)]
pub(crate) enum Op {
    Append(EncodedBatch, Reply),
    Truncate(LogIndex, Reply),
    Purge(LogIndex, Reply),
    HardState(HardState, Reply),
    SaveSnapshot(Snapshot, Reply),
    InstallSnapshot(Snapshot, Reply),
}

impl Op {
    fn reply(self, result: Result<(), StorageError>) {
        let reply = match self {
            Op::Append(_, r)
            | Op::Truncate(_, r)
            | Op::Purge(_, r)
            | Op::HardState(_, r)
            | Op::SaveSnapshot(_, r)
            | Op::InstallSnapshot(_, r) => r,
        };
        // The caller may have dropped its future; the operation still happened.
        let _ = reply.send(result);
    }
}

/// How appenders wake the writer while it gathers a group.
#[derive(Debug, Default)]
pub(crate) struct GatherSignal {
    /// While non-zero, the writer is parked until this many operations are queued.
    want: AtomicUsize,
    /// The writer thread.
    thread: OnceLock<Thread>,
}

impl GatherSignal {
    /// Called by an appender after it queued an operation; `queued` is the queue's
    /// length.
    pub(crate) fn queued(&self, queued: usize) {
        let want = self.want.load(Ordering::SeqCst);
        if want != 0 && queued >= want && self.want.swap(0, Ordering::SeqCst) != 0 {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }
}

/// The segment appends go to.
#[derive(Debug)]
struct Active {
    seq: u64,
    file: Arc<std::fs::File>,
    path: PathBuf,
    /// Its length including the bytes staged in the group buffer.
    len: u64,
    /// The file's length: bytes from the end of the written records up to here are
    /// zeros.
    zeroed: u64,
}

/// The writer thread's state.
pub(crate) struct Writer {
    dir: PathBuf,
    cfg: WalConfig,
    state: Arc<RwLock<State>>,
    counters: Arc<Counters>,
    published: watch::Sender<u64>,
    signal: Arc<GatherSignal>,
    /// The position of the last entry, including staged ones.
    tail: Position,
    active: Option<Active>,
    next_seq: u64,
    /// Records staged for the next group write.
    buf: Vec<u8>,
    staged: Vec<Loc>,
    /// Appends whose records are all staged.
    waiting: Vec<Reply>,
    /// A buffer of zeros for preallocation (allocated on first use).
    zeros: Vec<u8>,
    /// After an I/O failure every later operation fails: what is on disk is unknown.
    failed: Option<StorageError>,
    /// Operations taken from the channel so far.
    taken: u64,
    /// Appends in the previous group.
    last_group: usize,
    /// The snapshot files (their data was streamed in and fsynced by their
    /// writers; a save here only rewrites the small pointer file).
    files: Arc<SnapFiles>,
}

fn invalid(msg: String) -> StorageError {
    StorageError::Invalid(msg)
}

/// What the writer shares with the [`crate::Wal`].
pub(crate) struct Shared {
    pub(crate) state: Arc<RwLock<State>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) published: watch::Sender<u64>,
    pub(crate) signal: Arc<GatherSignal>,
    pub(crate) files: Arc<SnapFiles>,
}

impl Writer {
    pub(crate) fn new(dir: PathBuf, cfg: WalConfig, shared: Shared, next_seq: u64) -> Writer {
        let Shared {
            state,
            counters,
            published,
            signal,
            files,
        } = shared;
        let (tail, active) = {
            let st = state.read();
            let active = st.segments.last().map(|s| Active {
                seq: s.seq,
                file: s.file.clone(),
                path: s.path.clone(),
                len: s.len,
                zeroed: s.file_len.max(s.len),
            });
            (st.last(), active)
        };
        Writer {
            dir,
            cfg,
            state,
            counters,
            published,
            signal,
            tail,
            active,
            next_seq,
            buf: Vec::new(),
            staged: Vec::new(),
            waiting: Vec::new(),
            zeros: Vec::new(),
            failed: None,
            taken: 0,
            last_group: 0,
            files,
        }
    }

    /// Runs until every handle is gone and the queue is drained.
    pub(crate) fn run(mut self, rx: Receiver<Op>) {
        let _ = self.signal.thread.set(std::thread::current());
        let mut batch: Vec<Op> = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.push(first);
            self.gather(&rx, &mut batch);
            self.last_group = batch
                .iter()
                .filter(|op| matches!(op, Op::Append(..)))
                .count();
            for op in batch.drain(..) {
                self.taken += 1;
                self.handle(op);
            }
            self.flush_or_fail();
            self.publish();
        }
    }

    /// Takes every queued operation (up to the group byte limit), and waits briefly
    /// for more when the previous group was larger.
    fn gather(&self, rx: &Receiver<Op>, batch: &mut Vec<Op>) {
        let mut bytes: usize = 0;
        let mut appends: usize = 0;
        let mut take = |op: Op, batch: &mut Vec<Op>| {
            if let Op::Append(b, _) = &op {
                bytes = bytes.saturating_add(b.bytes.len());
                appends += 1;
            }
            batch.push(op);
            (bytes, appends)
        };
        let mut tally = (0, 0);
        for op in std::mem::take(batch) {
            tally = take(op, batch);
        }
        while tally.0 < self.cfg.max_group_bytes {
            match rx.try_recv() {
                Ok(op) => tally = take(op, batch),
                Err(_) => break,
            }
        }
        if !self.cfg.sync || self.cfg.group_wait.is_zero() || tally.1 == 0 {
            return;
        }
        // Wait (parked, not spinning: the appenders need the CPU) until as many
        // appends are queued as the previous group had, or the deadline passes. The
        // appender whose send reaches the count unparks this thread: one wake-up per
        // group, not one per append.
        let deadline = Instant::now() + self.cfg.group_wait;
        while tally.1 < self.last_group && tally.0 < self.cfg.max_group_bytes {
            let need = self.last_group - tally.1;
            self.signal.want.store(need, Ordering::SeqCst);
            if rx.len() < need {
                let now = Instant::now();
                if now >= deadline {
                    self.signal.want.store(0, Ordering::SeqCst);
                    break;
                }
                std::thread::park_timeout(deadline - now);
            }
            self.signal.want.store(0, Ordering::SeqCst);
            let before = tally.1;
            while tally.0 < self.cfg.max_group_bytes {
                match rx.try_recv() {
                    Ok(op) => tally = take(op, batch),
                    Err(_) => break,
                }
            }
            if tally.1 == before && Instant::now() >= deadline {
                break;
            }
        }
    }

    fn publish(&self) {
        self.published.send_replace(self.taken);
    }

    fn fail(&mut self, e: StorageError) {
        tracing::error!(dir = %self.dir.display(), error = %e, "write-ahead log failed; refusing every later operation");
        for reply in self.waiting.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
        self.buf.clear();
        self.staged.clear();
        self.state.write().failed = Some(e.clone());
        self.failed = Some(e);
    }

    fn flush_or_fail(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.flush() {
                self.fail(e);
            }
        }
    }

    fn handle(&mut self, op: Op) {
        if let Some(e) = &self.failed {
            op.reply(Err(e.clone()));
            return;
        }
        if let Op::Append(batch, reply) = op {
            self.stage_append(batch, reply);
            return;
        }
        if let Err(e) = self.flush() {
            self.fail(e.clone());
            op.reply(Err(e));
            return;
        }
        let result = match &op {
            Op::Append(..) => Ok(()),
            Op::SaveSnapshot(s, _) => self.save_snapshot(*s),
            Op::Truncate(from, _) => self.truncate_suffix(*from),
            Op::Purge(upto, _) => self.purge_prefix(*upto),
            Op::HardState(hs, _) => self.save_hard_state(hs),
            Op::InstallSnapshot(s, _) => self.install_snapshot(s),
        };
        if let Err(e) = &result {
            if !matches!(e, StorageError::Invalid(_)) {
                self.fail(e.clone());
            }
        }
        op.reply(result);
        self.publish();
    }

    // ---- appends ----

    fn stage_append(&mut self, batch: EncodedBatch, reply: Reply) {
        // Validate the whole batch first: a refused batch changes nothing.
        let mut prev = self.tail;
        for (pos, _, _) in &batch.records {
            let refusal = if Some(pos.index.0) != prev.index.0.checked_add(1) {
                Some(format!(
                    "entry at {pos} does not follow the last entry {prev} without a gap"
                ))
            } else if pos.term < prev.term {
                Some(format!(
                    "entry at {pos} has a lower term than the entry before it {prev}"
                ))
            } else {
                None
            };
            if let Some(msg) = refusal {
                let _ = reply.send(Err(invalid(msg)));
                return;
            }
            prev = *pos;
        }
        for &(pos, start, len) in &batch.records {
            let Some(record) = batch.bytes.get(start..start + len) else {
                // Earlier records of this batch may be staged already: stop the log
                // rather than let them become durable for a refused append.
                let e = StorageError::Io("malformed encoded batch (internal error)".to_string());
                self.fail(e.clone());
                let _ = reply.send(Err(e));
                return;
            };
            let len64 = len as u64;
            let roll = match &self.active {
                None => true,
                Some(a) => {
                    a.len > SEGMENT_HEADER_LEN as u64
                        && a.len.saturating_add(len64) > self.cfg.segment_size
                }
            };
            if roll {
                if let Err(e) = self.flush().and_then(|()| self.roll(pos.index.0)) {
                    self.fail(e.clone());
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            let Some(active) = self.active.as_mut() else {
                let e = StorageError::Io("no active segment (internal error)".to_string());
                self.fail(e.clone());
                let _ = reply.send(Err(e));
                return;
            };
            self.buf.extend_from_slice(record);
            self.staged.push(Loc {
                seq: active.seq,
                offset: active.len,
                len: len as u32,
                term: pos.term,
            });
            active.len += len64;
            self.tail = pos;
        }
        self.waiting.push(reply);
        if self.buf.len() >= self.cfg.max_group_bytes {
            self.flush_or_fail();
        }
    }

    /// Writes the staged records with one write and one fdatasync, publishes them
    /// and acknowledges the waiting appends.
    fn flush(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() && self.waiting.is_empty() {
            return Ok(());
        }
        if !self.buf.is_empty() {
            let Some(active) = self.active.as_ref() else {
                return Err(StorageError::Io(
                    "staged records but no active segment (internal error)".to_string(),
                ));
            };
            let offset = active.len - self.buf.len() as u64;
            // Stamp every record with where this group starts (recovery tells a torn
            // last group from damage before a later group by it).
            for loc in &self.staged {
                let at = (loc.offset - offset) as usize;
                if let Some(record) = self.buf.get_mut(at..at + loc.len as usize) {
                    set_group_start(record, offset);
                }
            }
            let zeroed = if active.len > active.zeroed && self.cfg.preallocate > 0 && self.cfg.sync
            {
                // Zeros ahead, written with this group and synced by its fdatasync.
                let target = active
                    .len
                    .saturating_add(self.cfg.preallocate)
                    .min(self.cfg.segment_size)
                    .max(active.len);
                if self.zeros.is_empty() {
                    self.zeros = vec![0u8; ZERO_CHUNK];
                }
                let mut at = active.len;
                while at < target {
                    let n = (target - at).min(ZERO_CHUNK as u64) as usize;
                    active
                        .file
                        .write_all_at(&self.zeros[..n], at)
                        .map_err(|e| {
                            io_err(
                                &format!("write zeros at byte offset {at} of"),
                                &active.path,
                                e,
                            )
                        })?;
                    at += n as u64;
                }
                target
            } else {
                active.zeroed.max(active.len)
            };
            active.file.write_all_at(&self.buf, offset).map_err(|e| {
                io_err(
                    &format!("write at byte offset {offset} of"),
                    &active.path,
                    e,
                )
            })?;
            if self.cfg.sync {
                let began = std::time::Instant::now();
                active
                    .file
                    .sync_data()
                    .map_err(|e| io_err("fdatasync", &active.path, e))?;
                self.counters
                    .fsynced(began.elapsed(), self.staged.len() as u64);
            }
            let seq = active.seq;
            let len = active.len;
            if let Some(a) = self.active.as_mut() {
                a.zeroed = zeroed;
            }
            let mut st = self.state.write();
            if let Some(seg) = st.segments.iter_mut().rev().find(|s| s.seq == seq) {
                seg.len = len;
                seg.count += self.staged.len() as u64;
            }
            st.locs.extend(self.staged.iter().copied());
        }
        self.counters.group(
            self.waiting.len() as u64,
            self.staged.len() as u64,
            self.buf.len() as u64,
        );
        self.buf.clear();
        self.staged.clear();
        for reply in self.waiting.drain(..) {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    /// Starts a new segment whose first record will be `first_index`. The header is
    /// written to a temporary file, synced and renamed into place, so a segment file
    /// never has a torn header.
    fn roll(&mut self, first_index: u64) -> Result<(), StorageError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = segment_file_name(seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err("create segment", &tmp, e))?;
        let header = SegmentHeader { seq, first_index }.encode();
        file.write_all_at(&header, 0)
            .map_err(|e| io_err("write segment header", &tmp, e))?;
        if self.cfg.sync {
            file.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io_err("rename into place", &path, e))?;
        sync_dir(&self.dir, self.cfg.sync)?;
        let file = Arc::new(file);
        self.state.write().segments.push(Segment {
            seq,
            first_index,
            count: 0,
            len: SEGMENT_HEADER_LEN as u64,
            file_len: SEGMENT_HEADER_LEN as u64,
            path: path.clone(),
            file: file.clone(),
        });
        self.active = Some(Active {
            seq,
            file,
            path,
            len: SEGMENT_HEADER_LEN as u64,
            zeroed: SEGMENT_HEADER_LEN as u64,
        });
        Ok(())
    }

    // ---- other operations (the group buffer is empty when they run) ----

    fn truncate_suffix(&mut self, from: LogIndex) -> Result<(), StorageError> {
        let mut st = self.state.write();
        let snapshot_index = st.snapshot_index();
        if from <= st.base.index || from <= snapshot_index {
            return Err(invalid(format!(
                "truncate from index {from}: at or below the compacted prefix {} or the snapshot {snapshot_index}",
                st.base.index
            )));
        }
        if from > st.last().index {
            return Ok(());
        }
        let Some(loc) = st.loc(from.0).copied() else {
            return Err(StorageError::Io(format!(
                "entry {from} has no location (internal error)"
            )));
        };
        // Later segments go first, newest first: each step leaves a valid prefix.
        let mut removed = false;
        while st.segments.last().is_some_and(|s| s.seq > loc.seq) {
            if let Some(seg) = st.segments.pop() {
                remove_file(&seg.path)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir, self.cfg.sync)?;
        }
        let base = st.base.index.0;
        let Some(seg) = st.segments.last_mut() else {
            return Err(StorageError::Io(format!(
                "segment {} of entry {from} is gone (internal error)",
                loc.seq
            )));
        };
        seg.file.set_len(loc.offset).map_err(|e| {
            io_err(
                &format!("truncate to byte offset {} ", loc.offset),
                &seg.path,
                e,
            )
        })?;
        if self.cfg.sync {
            seg.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &seg.path, e))?;
        }
        seg.len = loc.offset;
        seg.file_len = loc.offset;
        seg.count = from.0.saturating_sub(seg.first_index);
        self.active = Some(Active {
            seq: seg.seq,
            file: seg.file.clone(),
            path: seg.path.clone(),
            len: loc.offset,
            zeroed: loc.offset,
        });
        let keep = usize::try_from(from.0 - base - 1).unwrap_or(usize::MAX);
        st.locs.truncate(keep);
        self.tail = st.last();
        Ok(())
    }

    fn purge_prefix(&mut self, upto: LogIndex) -> Result<(), StorageError> {
        let (new_base, drop_all) = {
            let st = self.state.read();
            if upto <= st.base.index {
                return Ok(());
            }
            let Some(snapshot) = st
                .snapshot
                .as_ref()
                .filter(|s| s.last_included.index >= upto)
            else {
                return Err(invalid(format!(
                    "purge up to index {upto}: no saved snapshot covers it"
                )));
            };
            match st.loc(upto.0) {
                Some(loc) => (Position::new(loc.term, upto), false),
                // `upto` is past the last entry; the snapshot covers the whole log.
                None => (snapshot.last_included, true),
            }
        };
        self.rebase(new_base, drop_all)
    }

    /// Moves the log's start to `new_base`: deletes the segments entirely at or below
    /// it (every segment if `drop_all`), after recording the new start durably.
    fn rebase(&mut self, new_base: Position, drop_all: bool) -> Result<(), StorageError> {
        let mut st = self.state.write();
        let obsolete = if drop_all {
            st.segments.len()
        } else {
            st.segments
                .iter()
                .take_while(|s| s.end_index() <= new_base.index.0.saturating_add(1))
                .count()
        };
        let min_seq = st
            .segments
            .get(obsolete)
            .map(|s| s.seq)
            .unwrap_or(self.next_seq);
        let meta = LogMeta {
            base: new_base,
            min_seq,
            installing: None,
        };
        self.write_meta(&meta)?;
        let gone: Vec<Segment> = st.segments.drain(..obsolete).collect();
        for seg in &gone {
            remove_file(&seg.path)?;
            if self.active.as_ref().is_some_and(|a| a.seq == seg.seq) {
                self.active = None;
            }
        }
        if drop_all {
            st.locs.clear();
        } else {
            let n = new_base.index.0.saturating_sub(st.base.index.0);
            let n = usize::try_from(n).unwrap_or(usize::MAX).min(st.locs.len());
            st.locs.drain(..n);
        }
        st.base = new_base;
        st.min_seq = min_seq;
        self.tail = st.last();
        drop(st);
        if !gone.is_empty() {
            sync_dir(&self.dir, self.cfg.sync)?;
        }
        Ok(())
    }

    fn write_meta(&self, meta: &LogMeta) -> Result<(), StorageError> {
        let payload = encode_payload("log metadata", meta)?;
        write_small_file(&self.dir, META_FILE, META_MAGIC, &payload, self.cfg.sync)
    }

    fn save_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        let payload = encode_payload("hard state", hs)?;
        write_small_file(
            &self.dir,
            HARD_STATE_FILE,
            HARD_STATE_MAGIC,
            &payload,
            self.cfg.sync,
        )?;
        self.state.write().hard_state = Some(hs.clone());
        Ok(())
    }

    /// Makes a snapshot (its data already durable) the log's snapshot.
    fn save_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let base = self.state.read().base;
        if snapshot.last_included.index < base.index {
            return Err(invalid(format!(
                "snapshot at {} is behind the compacted prefix {base}",
                snapshot.last_included
            )));
        }
        self.write_snapshot(snapshot)
    }

    fn write_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        self.files.save(snapshot)?;
        self.state.write().snapshot = Some(snapshot);
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let at = snapshot.last_included;
        let meta = {
            let st = self.state.read();
            LogMeta {
                base: st.base,
                min_seq: st.min_seq,
                installing: Some(at),
            }
        };
        // The intent first: if the snapshot then lands, open finishes the install.
        self.write_meta(&meta)?;
        self.write_snapshot(*snapshot)?;
        self.finish_install(at)
    }

    /// Drops the entries an installed snapshot at `at` replaces: those up to `at`
    /// if the log holds `at`, every entry otherwise.
    pub(crate) fn finish_install(&mut self, at: Position) -> Result<(), StorageError> {
        let keep_suffix = {
            let st = self.state.read();
            at.index >= st.base.index
                && (at == st.base || st.loc(at.index.0).is_some_and(|l| l.term == at.term))
        };
        self.rebase(at, !keep_suffix)
    }

    /// Forgets an install that did not get as far as saving its snapshot.
    pub(crate) fn forget_install(&mut self) -> Result<(), StorageError> {
        let meta = {
            let st = self.state.read();
            LogMeta {
                base: st.base,
                min_seq: st.min_seq,
                installing: None,
            }
        };
        self.write_meta(&meta)
    }
}
