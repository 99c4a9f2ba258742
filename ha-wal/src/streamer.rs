//! [`WalStreamer`]: the primary's side of WAL streaming that touches the disk.
//!
//! The replication engine (in `ha-core`) decides *what* a standby needs: it keeps a
//! window of in-flight batches per peer, resumes from the standby's ack or conflict
//! hint, and keeps only the entries after its latest snapshot in memory. When a
//! standby needs older entries, the engine asks the log store for a catch-up batch
//! ([`LogStore::read_batch`]); for a [`Wal`](crate::Wal) the streamer reads it:
//!
//! - **Bounded batches.** At most `max_entries` entries, stopping once `max_bytes`
//!   is exceeded (by [`WalEntry::approx_size`], at least one entry), with the
//!   position of the entry before them (the batch's `prev`; the log's base position
//!   when the entry before was purged exactly there).
//! - **Off the writers' path.** The locations of the records are copied under the
//!   log's state lock, which is released before any byte is read; the reads run on
//!   a blocking thread of the tokio runtime (inline without one), so neither the
//!   writer thread nor the async tasks wait on a catch-up read.
//! - **Purged entries.** If the log no longer holds the entry before `next` the
//!   read fails with [`StorageError::Invalid`] naming the purge point; the engine
//!   then sends the snapshot instead.
//! - **Checked.** Every record is decoded with its checksums and must hold the
//!   (term, index) the log's index says; a file changed under the read (a racing
//!   truncation) is an error, never a wrong entry.
//!
//! [`LogStore::read_batch`]: ha_core::log_store::LogStore::read_batch

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use ha_core::log_store::CatchUpBatch;
use ha_core::types::{LogIndex, Position, Term, WalEntry};
use ha_core::StorageError;
use parking_lot::RwLock;
use tokio::sync::watch;

use crate::format::{decode_record, RecordDecode};
use crate::fsutil::{corrupt, io_err};
use crate::state::State;

/// One read of consecutive records of one segment.
struct Run {
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    len: usize,
    /// The (term, index) of each record in the run, in order.
    expect: Vec<(Term, LogIndex)>,
}

/// What to read, copied from the log's state under its lock.
struct Plan {
    runs: Vec<Run>,
}

/// Reads are done in chunks of at most this many bytes.
const READ_CHUNK: usize = 1 << 20;

/// A record's length exceeds its entry's [`WalEntry::approx_size`] by at most this
/// (record header, and the varints of the encoded entry): the plan reads at least
/// as far as the byte bound can reach.
const RECORD_OVERHEAD: u64 = 96;

/// Reads catch-up batches and ranges of entries from a [`Wal`](crate::Wal)'s
/// segment files without holding up its writer (see the module docs). Cheap to
/// clone; made by [`Wal::streamer`](crate::Wal::streamer).
#[derive(Clone)]
pub struct WalStreamer {
    state: Arc<RwLock<State>>,
    published: watch::Receiver<u64>,
}

impl std::fmt::Debug for WalStreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStreamer").finish_non_exhaustive()
    }
}

impl WalStreamer {
    pub(crate) fn new(state: Arc<RwLock<State>>, published: watch::Receiver<u64>) -> Self {
        WalStreamer { state, published }
    }

    /// The catch-up batch for a peer whose next needed index is `next`, read from
    /// what is durable now. See the module docs.
    pub async fn batch(
        &self,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<CatchUpBatch, StorageError> {
        self.batch_after(0, next, max_entries, max_bytes).await
    }

    /// As [`Self::batch`], once the writer finished operation number `ticket`.
    pub(crate) async fn batch_after(
        &self,
        ticket: u64,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<CatchUpBatch, StorageError> {
        self.wait(ticket).await?;
        let (prev, plan) = {
            let st = self.state.read();
            st.check_usable()?;
            let prev = prev_position(&st, next)?;
            let to = LogIndex(next.0.saturating_add(max_entries as u64));
            (prev, plan(&st, next, to, max_bytes)?)
        };
        let entries = execute_off_runtime(plan, max_bytes).await?;
        if entries.is_empty() {
            return Err(StorageError::Invalid(format!(
                "catch-up read for index {next}: the log holds no entry from there"
            )));
        }
        Ok(CatchUpBatch { prev, entries })
    }

    /// Entries `[from, to)` once the writer finished operation number `ticket`,
    /// stopping once `max_bytes` is exceeded (at least one entry); compacted
    /// entries are an error.
    pub(crate) async fn read_after(
        &self,
        ticket: u64,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<WalEntry>, StorageError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.wait(ticket).await?;
        let plan = {
            let st = self.state.read();
            st.check_usable()?;
            if from <= st.base.index {
                return Err(StorageError::Invalid(format!(
                    "read from index {from}: entries up to {} are compacted (or index 0, which is no entry)",
                    st.base.index
                )));
            }
            plan(&st, from, to, max_bytes)?
        };
        execute_off_runtime(plan, max_bytes).await
    }

    async fn wait(&self, ticket: u64) -> Result<(), StorageError> {
        if ticket == 0 || *self.published.borrow() >= ticket {
            return Ok(());
        }
        let mut published = self.published.clone();
        published
            .wait_for(|&done| done >= ticket)
            .await
            .map(|_| ())
            .map_err(|_| StorageError::Io("the write-ahead log is closed".into()))
    }
}

/// The position of the entry before `next`: held in the log, or the log's base
/// (the position the log starts after), or zero before index 1.
fn prev_position(st: &State, next: LogIndex) -> Result<Position, StorageError> {
    if next <= st.base.index {
        return Err(StorageError::Invalid(format!(
            "catch-up read for index {next}: entries up to {} were purged",
            st.base.index
        )));
    }
    if next.0 <= 1 {
        return Ok(Position::ZERO);
    }
    let prev = next.prev();
    if prev == st.base.index {
        return Ok(st.base);
    }
    match st.loc(prev.0) {
        Some(loc) => Ok(Position::new(loc.term, prev)),
        None => Err(StorageError::Invalid(format!(
            "catch-up read for index {next}: the log ends at {}",
            st.last().index
        ))),
    }
}

/// The runs of records to read for entries `[from, to)`, far enough to reach
/// `max_bytes` by [`WalEntry::approx_size`].
fn plan(st: &State, from: LogIndex, to: LogIndex, max_bytes: usize) -> Result<Plan, StorageError> {
    let mut runs: Vec<Run> = Vec::new();
    let mut planned: u64 = 0;
    let budget = max_bytes as u64;
    let mut i = from;
    while i < to {
        let Some(loc) = st.loc(i.0).copied() else {
            break;
        };
        let seg = st.segment(loc.seq).ok_or_else(|| {
            StorageError::Io(format!(
                "entry {i} is in segment {} which is not open (internal error)",
                loc.seq
            ))
        })?;
        let len = u64::from(loc.len);
        let extends = runs.last().is_some_and(|r| {
            Arc::ptr_eq(&r.file, &seg.file)
                && r.offset + r.len as u64 == loc.offset
                && r.len + loc.len as usize <= READ_CHUNK
        });
        match runs.last_mut() {
            Some(r) if extends => {
                r.len += loc.len as usize;
                r.expect.push((loc.term, i));
            }
            _ => runs.push(Run {
                file: Arc::clone(&seg.file),
                path: seg.path.clone(),
                offset: loc.offset,
                len: loc.len as usize,
                expect: vec![(loc.term, i)],
            }),
        }
        // A lower bound of the entries' approximate sizes so far.
        planned = planned.saturating_add(len.saturating_sub(RECORD_OVERHEAD));
        if planned > budget {
            break;
        }
        i = i.next();
    }
    Ok(Plan { runs })
}

/// Entries `[from, to)` read on this thread while `st` is held (start-up's
/// `load`, which reads everything after the snapshot once).
pub(crate) fn read_inline(
    st: &State,
    from: LogIndex,
    to: LogIndex,
) -> Result<Vec<WalEntry>, StorageError> {
    execute(plan(st, from, to, usize::MAX)?, usize::MAX)
}

/// Reads and decodes the plan on a blocking thread (inline outside a runtime).
async fn execute_off_runtime(plan: Plan, max_bytes: usize) -> Result<Vec<WalEntry>, StorageError> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(move || execute(plan, max_bytes))
            .await
            .map_err(|e| StorageError::Io(format!("a read of the log failed: {e}")))?,
        Err(_) => execute(plan, max_bytes),
    }
}

fn execute(plan: Plan, max_bytes: usize) -> Result<Vec<WalEntry>, StorageError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut buf = Vec::new();
    for run in plan.runs {
        buf.resize(run.len, 0);
        run.file.read_exact_at(&mut buf, run.offset).map_err(|e| {
            io_err(
                &format!("read at byte offset {} of", run.offset),
                &run.path,
                e,
            )
        })?;
        let mut at = 0usize;
        for (term, index) in run.expect {
            let offset = run.offset + at as u64;
            let entry = match decode_record(buf.get(at..).unwrap_or(&[])) {
                RecordDecode::Record { entry, len, .. } => {
                    at += len;
                    entry
                }
                RecordDecode::Truncated => {
                    return Err(corrupt(
                        &run.path,
                        offset,
                        "record cut short (the file changed under the read)",
                    ))
                }
                RecordDecode::Invalid(why) => return Err(corrupt(&run.path, offset, &why)),
            };
            if entry.position != Position::new(term, index) {
                return Err(corrupt(
                    &run.path,
                    offset,
                    &format!(
                        "record holds {}, the log's index says {} (the file changed under the read)",
                        entry.position,
                        Position::new(term, index)
                    ),
                ));
            }
            bytes = bytes.saturating_add(entry.approx_size());
            if !out.is_empty() && bytes > max_bytes {
                return Ok(out);
            }
            out.push(entry);
        }
    }
    Ok(out)
}
