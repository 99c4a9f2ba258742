//! The embedded key-value store: the node's state machine, on redb.
//!
//! redb because it is a pure-Rust, crash-safe (copy-on-write B-trees, ACID)
//! embedded database with MVCC readers beside one writer, and commits that can
//! skip the fsync (`Durability::None`) until a later durable one: exactly the
//! "store durability may lag the WAL" the node needs.
//!
//! # How an entry gets in
//! - The engine task calls [`KvStore::apply`]. It reads the key's current state
//!   (the pending overlay first, then the database), decides the command (a
//!   compare-and-set may refuse), records the result in the overlay and queues it
//!   for the writer thread. Nothing waits for a disk there.
//! - The writer thread drains what is queued into one write transaction per batch:
//!   the entries and the applied index (`meta.applied`) go in together, so the
//!   store never holds an entry without knowing it applied it. Those commits skip
//!   the fsync; every [`DURABLE_EVERY`] (and at shutdown) a durable commit makes
//!   everything before it durable and advances [`StateMachine::durable_index`],
//!   past which the WAL is never compacted. After a crash the store resumes from
//!   its last durable applied index and the log replays the rest: each entry is
//!   applied exactly once.
//! - Entries leave the overlay only after their commit, so a reader that misses
//!   the overlay finds them in the database.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ha_core::{Command, LogIndex, Position, StateCapture, StateMachine, StorageError};
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};

use crate::kv::{Item, KvAnswer, KvCommand, KvOutput, KvQuery, MAX_LIST_LIMIT};
use crate::snapshot::{Decoder, Encoder};

/// key → (mod_index, value).
const DATA: TableDefinition<&[u8], (u64, &[u8])> = TableDefinition::new("kv");
/// `applied` → the last applied index.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED: &str = "applied";

/// redb's page cache.
const CACHE_BYTES: usize = 16 << 20;
/// A restore commits a transaction every this many bytes of keys and values.
const RESTORE_BATCH_BYTES: usize = 8 << 20;
/// How often the writer makes what it committed durable.
pub const DURABLE_EVERY: Duration = Duration::from_millis(100);
/// The most writes queued for the writer before `apply` waits for it.
const QUEUE: usize = 16 * 1024;
/// The most queued writes the writer puts in one transaction.
const BATCH: usize = 4096;

fn io(e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("kv store: {e}"))
}

/// A write waiting for (or in) the writer's transaction: the latest per key.
#[derive(Clone, Debug)]
struct Pending {
    index: u64,
    /// `None`: deleted.
    value: Option<Vec<u8>>,
}

type Overlay = BTreeMap<Vec<u8>, Pending>;

enum Op {
    Write {
        index: u64,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    Applied(u64),
    /// Commit everything queued durably, then answer.
    Flush(Sender<Result<(), StorageError>>),
}

struct Shared {
    db: Database,
    overlay: Mutex<Overlay>,
    durable: AtomicU64,
    failure: Mutex<Option<String>>,
}

/// The node's state machine: keys and values as bytes, each key with the index
/// of its last write, in a redb database.
pub struct KvStore {
    shared: Arc<Shared>,
    queue: Option<Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    applied: LogIndex,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

/// A read-only view of a [`KvStore`] for other threads (its size, its health).
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
}

impl StoreHandle {
    /// Why the writer stopped, if it did (the node must stop then).
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    /// The last applied index the store has made durable.
    pub fn durable_index(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }
}

impl KvStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<KvStore, StorageError> {
        // A bounded page cache (redb's default is 1 GiB): the store's resident
        // memory stays small whatever the data set's size.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(io)?;
        let applied = {
            let txn = db.begin_write().map_err(io)?;
            let applied = {
                txn.open_table(DATA).map_err(io)?;
                let meta = txn.open_table(META).map_err(io)?;
                let got = meta.get(APPLIED).map_err(io)?;
                got.map(|g| g.value()).unwrap_or(0)
            };
            txn.commit().map_err(io)?;
            applied
        };
        let shared = Arc::new(Shared {
            db,
            overlay: Mutex::new(BTreeMap::new()),
            durable: AtomicU64::new(applied),
            failure: Mutex::new(None),
        });
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kv-writer".into())
                .spawn(move || writer(&shared, &rx))
                .map_err(io)?
        };
        Ok(KvStore {
            shared,
            queue: Some(tx),
            writer: Some(writer),
            applied: LogIndex(applied),
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> StoreHandle {
        StoreHandle {
            shared: self.shared.clone(),
        }
    }

    fn send(&self, op: Op) {
        let sent = self.queue.as_ref().map(|q| q.send(op));
        if !matches!(sent, Some(Ok(()))) {
            self.fail("the writer thread is gone".into());
        }
    }

    fn fail(&self, why: String) {
        let mut f = self.shared.failure.lock();
        if f.is_none() {
            tracing::error!(error = %why, "kv store failed");
            *f = Some(why);
        }
    }

    /// Commits everything queued, durably.
    fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Op::Flush(tx));
        rx.recv()
            .map_err(|_| io("the writer thread is gone"))
            .and_then(|r| r)
    }

    /// The key's current state: the overlay, else the database.
    fn current(&self, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let overlay = self.shared.overlay.lock();
        if let Some(p) = overlay.get(key) {
            return Ok(p.value.clone().map(|v| (p.index, v)));
        }
        // Read under the overlay lock: an entry leaves the overlay only after its
        // commit, so this read transaction sees it.
        let txn = self.shared.db.begin_read().map_err(io)?;
        drop(overlay);
        read_one(&txn, key)
    }

    /// Replaces the whole state with a streamed snapshot at `index`, in
    /// transactions of at most [`RESTORE_BATCH_BYTES`] (memory stays bounded
    /// whatever the snapshot's size). The first empties the store and records
    /// applied index 0, durably; the last records `index`: a crash in between
    /// leaves a store that a restart restores again from the log's snapshot.
    fn restore_stream(
        &mut self,
        index: u64,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        let (mut dec, applied) = Decoder::new(data)?;
        if applied != index {
            return Err(StorageError::Corrupt(format!(
                "kv snapshot of index {applied} offered as index {index}"
            )));
        }
        self.replace(0, &[])?;
        let mut done = false;
        while !done {
            let mut txn = self.shared.db.begin_write().map_err(io)?;
            txn.set_durability(Durability::None).map_err(io)?;
            {
                let mut table = txn.open_table(DATA).map_err(io)?;
                let mut bytes = 0usize;
                while bytes < RESTORE_BATCH_BYTES {
                    let Some(it) = dec.next_item()? else {
                        done = true;
                        break;
                    };
                    bytes += it.key.len() + it.value.len();
                    table
                        .insert(it.key.as_slice(), (it.mod_index, it.value.as_slice()))
                        .map_err(io)?;
                }
            }
            txn.commit().map_err(io)?;
        }
        let mut txn = self.shared.db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(APPLIED, index).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        self.shared.durable.store(index, Ordering::Release);
        self.applied = LogIndex(index);
        Ok(())
    }

    /// Replaces the whole state with `items` at `applied`, durably.
    fn replace(&mut self, applied: u64, items: &[Item]) -> Result<(), StorageError> {
        self.flush()?;
        let mut txn = self.shared.db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        txn.delete_table(DATA).map_err(io)?;
        {
            let mut data = txn.open_table(DATA).map_err(io)?;
            for it in items {
                data.insert(it.key.as_slice(), (it.mod_index, it.value.as_slice()))
                    .map_err(io)?;
            }
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(APPLIED, applied).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        self.shared.overlay.lock().clear();
        self.shared.durable.store(applied, Ordering::Release);
        self.applied = LogIndex(applied);
        Ok(())
    }

    fn answer(&self, query: &KvQuery) -> Result<KvAnswer, StorageError> {
        match query {
            KvQuery::Get { key } => Ok(KvAnswer::Value(self.current(key)?.map(
                |(mod_index, value)| Item {
                    key: key.clone(),
                    value,
                    mod_index,
                },
            ))),
            KvQuery::List {
                prefix,
                start_after,
                limit,
            } => {
                let limit = (*limit).clamp(1, MAX_LIST_LIMIT) as usize;
                let from = match start_after {
                    Some(k) if k.as_slice() >= prefix.as_slice() => Bound::Excluded(k.to_vec()),
                    _ => Bound::Included(prefix.clone()),
                };
                // The overlay's part of the range (at most `limit + 1` of it
                // matters), and a read transaction opened under the same lock.
                let (pending, txn) = {
                    let overlay = self.shared.overlay.lock();
                    let pending: Vec<(Vec<u8>, Pending)> = overlay
                        .range((from.clone(), Bound::Unbounded))
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, p)| (k.clone(), p.clone()))
                        .collect();
                    (pending, self.shared.db.begin_read().map_err(io)?)
                };
                let (items, more) = merged(&txn, prefix, &from, &pending, limit)?;
                Ok(KvAnswer::List { items, more })
            }
        }
    }
}

fn read_one(txn: &ReadTransaction, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let table = txn.open_table(DATA).map_err(io)?;
    let got = table.get(key).map_err(io)?;
    Ok(got.map(|g| {
        let (idx, v) = g.value();
        (idx, v.to_vec())
    }))
}

/// Up to `limit` live items with `prefix` from `from` on, the overlay's `pending`
/// (in key order) taking precedence over the database; and whether more follow.
fn merged(
    txn: &ReadTransaction,
    prefix: &[u8],
    from: &Bound<Vec<u8>>,
    pending: &[(Vec<u8>, Pending)],
    limit: usize,
) -> Result<(Vec<Item>, bool), StorageError> {
    let mut items = Vec::new();
    let more = merge_each(txn, prefix, from, pending, |item| {
        if items.len() == limit {
            return Ok(false);
        }
        items.push(item);
        Ok(true)
    })?;
    Ok((items, more))
}

/// Visits the database's items from `from` with `prefix`, merged with the
/// pending overlay (sorted by key), in key order; `visit` answers whether to go
/// on. True if it stopped before the end.
fn merge_each(
    txn: &ReadTransaction,
    prefix: &[u8],
    from: &Bound<Vec<u8>>,
    pending: &[(Vec<u8>, Pending)],
    mut visit: impl FnMut(Item) -> Result<bool, StorageError>,
) -> Result<bool, StorageError> {
    let table = txn.open_table(DATA).map_err(io)?;
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = match from {
        Bound::Included(k) => (Bound::Included(k.as_slice()), Bound::Unbounded),
        Bound::Excluded(k) => (Bound::Excluded(k.as_slice()), Bound::Unbounded),
        Bound::Unbounded => (Bound::Unbounded, Bound::Unbounded),
    };
    let mut db = table.range::<&[u8]>(bounds).map_err(io)?.peekable();
    let mut ov = pending.iter().peekable();
    loop {
        let db_key: Option<Vec<u8>> = match db.peek() {
            Some(Ok((k, _))) => Some(k.value().to_vec()),
            Some(Err(_)) => {
                if let Some(Err(e)) = db.next() {
                    return Err(io(e));
                }
                None
            }
            None => None,
        };
        let db_key = db_key.filter(|k| k.starts_with(prefix));
        let ov_key = ov.peek().map(|(k, _)| k.clone());
        let next: Option<Item> = match (db_key, ov_key) {
            (None, None) => break,
            (Some(d), o) if o.as_ref().is_none_or(|o| d < *o) => {
                let Some(Ok((k, v))) = db.next() else {
                    break;
                };
                let (mod_index, value) = v.value();
                Some(Item {
                    key: k.value().to_vec(),
                    value: value.to_vec(),
                    mod_index,
                })
            }
            (d, Some(o)) => {
                if d.as_ref() == Some(&o) {
                    db.next();
                }
                let Some((k, p)) = ov.next() else {
                    break;
                };
                p.value.as_ref().map(|v| Item {
                    key: k.clone(),
                    value: v.clone(),
                    mod_index: p.index,
                })
            }
            (Some(_), None) => break,
        };
        if let Some(item) = next {
            if !visit(item)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The writer thread: one transaction per batch of queued writes, durable every
/// [`DURABLE_EVERY`], until the queue closes (then a last durable commit).
fn writer(shared: &Shared, rx: &Receiver<Op>) {
    let mut last_durable = Instant::now();
    let mut committed = shared.durable.load(Ordering::Acquire);
    let mut dirty = false;
    loop {
        let first = match rx.recv_timeout(DURABLE_EVERY) {
            Ok(op) => Some(op),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut ops: Vec<Op> = first.into_iter().collect();
        while ops.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let mut writes = Vec::new();
        let mut applied = committed;
        for op in ops {
            match op {
                Op::Write { index, key, value } => {
                    applied = applied.max(index);
                    writes.push((index, key, value));
                }
                Op::Applied(index) => applied = applied.max(index),
                Op::Flush(tx) => flushes.push(tx),
            }
        }
        let durable = !flushes.is_empty() || (dirty && last_durable.elapsed() >= DURABLE_EVERY);
        let result = if applied > committed || durable {
            commit(shared, &writes, applied, durable)
        } else {
            Ok(())
        };
        match &result {
            Ok(()) => {
                if applied > committed {
                    dirty = true;
                }
                committed = applied;
                // Committed: these may leave the overlay (unless overwritten since).
                let mut overlay = shared.overlay.lock();
                for (index, key, _) in &writes {
                    if overlay.get(key).is_some_and(|p| p.index == *index) {
                        overlay.remove(key);
                    }
                }
                drop(overlay);
                if durable {
                    shared.durable.store(committed, Ordering::Release);
                    last_durable = Instant::now();
                    dirty = false;
                }
            }
            Err(e) => {
                let mut f = shared.failure.lock();
                if f.is_none() {
                    tracing::error!(error = %e, "kv store commit failed");
                    *f = Some(e.to_string());
                }
            }
        }
        for tx in flushes {
            let _ = tx.send(result.clone());
        }
        if result.is_err() {
            // Nothing more can be committed in order: answer flushes with the
            // failure until the queue closes.
            while let Ok(op) = rx.recv() {
                if let Op::Flush(tx) = op {
                    let _ = tx.send(Err(io("the store failed earlier")));
                }
            }
            return;
        }
    }
    if dirty {
        if let Err(e) = commit(shared, &[], committed, true) {
            tracing::error!(error = %e, "kv store: the last durable commit failed");
        } else {
            shared.durable.store(committed, Ordering::Release);
        }
    }
}

type Write = (u64, Vec<u8>, Option<Vec<u8>>);

fn commit(
    shared: &Shared,
    writes: &[Write],
    applied: u64,
    durable: bool,
) -> Result<(), StorageError> {
    let mut txn = shared.db.begin_write().map_err(io)?;
    let level = if durable {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(level).map_err(io)?;
    {
        let mut data = txn.open_table(DATA).map_err(io)?;
        for (index, key, value) in writes {
            match value {
                Some(v) => {
                    data.insert(key.as_slice(), (*index, v.as_slice()))
                        .map_err(io)?;
                }
                None => {
                    data.remove(key.as_slice()).map_err(io)?;
                }
            }
        }
        let mut meta = txn.open_table(META).map_err(io)?;
        meta.insert(APPLIED, applied).map_err(io)?;
    }
    txn.commit().map_err(io)
}

impl Drop for KvStore {
    fn drop(&mut self) {
        // Closing the queue makes the writer commit durably and stop.
        self.queue = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A consistent capture of the store: a read transaction and the overlay at the
/// moment of capture.
pub struct KvCapture {
    txn: Result<ReadTransaction, String>,
    pending: Vec<(Vec<u8>, Pending)>,
    applied: u64,
}

impl StateCapture for KvCapture {
    /// Streams the read transaction's items merged with the overlay captured
    /// with it, one at a time (see [`crate::snapshot`]).
    fn write_to(self, out: &mut dyn std::io::Write) -> Result<(), StorageError> {
        let txn = self.txn.map_err(io)?;
        let mut enc = Encoder::new(out, self.applied)?;
        merge_each(&txn, &[], &Bound::Unbounded, &self.pending, |it| {
            enc.item(&it.key, it.mod_index, &it.value)?;
            Ok(true)
        })?;
        enc.finish()
    }
}

impl StateMachine for KvStore {
    type Capture = KvCapture;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        let index = position.index.0;
        self.applied = position.index;
        let output = match KvCommand::decode(&command.0) {
            Err(e) => KvOutput::Invalid(format!("not a key-value command: {e}")),
            Ok(cmd) => match self.current(cmd.key()) {
                Err(e) => {
                    // The store cannot be read: the node must stop (the writer
                    // reports the same failure); this entry is applied again from
                    // the log after a restart.
                    self.fail(e.to_string());
                    KvOutput::Invalid(format!("the store failed: {e}"))
                }
                Ok(cur) => {
                    let current = cur.as_ref().map_or(0, |(i, _)| *i);
                    match cmd.if_mod_index() {
                        Some(want) if want != current => KvOutput::Mismatch { current },
                        _ => {
                            let existed = cur.is_some();
                            let (key, value) = match cmd {
                                KvCommand::Put { key, value, .. } => (key, Some(value)),
                                KvCommand::Delete { key, .. } => (key, None),
                            };
                            self.shared.overlay.lock().insert(
                                key.clone(),
                                Pending {
                                    index,
                                    value: value.clone(),
                                },
                            );
                            self.send(Op::Write { index, key, value });
                            return KvOutput::Done { existed }.encode();
                        }
                    }
                }
            },
        };
        // Nothing changed, but the applied index moved.
        self.send(Op::Applied(index));
        output.encode()
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied = position.index;
        self.send(Op::Applied(position.index.0));
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let answer = match KvQuery::decode(query) {
            Err(e) => KvAnswer::Invalid(format!("not a key-value query: {e}")),
            Ok(q) => self
                .answer(&q)
                .unwrap_or_else(|e| KvAnswer::Invalid(e.to_string())),
        };
        answer.encode()
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn capture(&self) -> KvCapture {
        let overlay = self.shared.overlay.lock();
        let pending = overlay
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        // A failed begin is a storage failure: the capture then fails to
        // serialize, and the engine takes no snapshot.
        let txn = self.shared.db.begin_read().map_err(|e| e.to_string());
        drop(overlay);
        if let Err(e) = &txn {
            self.fail(e.clone());
        }
        KvCapture {
            txn,
            pending,
            applied: self.applied.0,
        }
    }

    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        self.restore_stream(index.0, data)
    }

    fn reset(&mut self) {
        if let Err(e) = self.replace(0, &[]) {
            self.fail(e.to_string());
        }
    }

    fn durable_index(&self) -> Option<LogIndex> {
        Some(LogIndex(self.shared.durable.load(Ordering::Acquire)))
    }
}
