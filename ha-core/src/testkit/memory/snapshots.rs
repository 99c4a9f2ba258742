//! [`SnapshotFiles`]: snapshot "files" held in memory, with the keeping rule of
//! the [`LogStore`](crate::log_store::LogStore) contract, for the in-memory
//! stores (the tests' and the simulator's).

use std::io::{Read, Write};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::StorageError;
use crate::log_store::{Snapshot, SnapshotWriter};
use crate::types::Position;

type Bytes = Arc<Vec<u8>>;

/// The snapshots of one store: the kept ones (its snapshot, and the newest one
/// before it) and those finished by a writer but not saved yet.
#[derive(Clone, Debug, Default)]
pub struct SnapshotFiles {
    /// The store's snapshot first, then the one kept before it.
    kept: Vec<(Snapshot, Bytes)>,
    /// Finished by a writer, not saved yet (shared with the writers).
    finished: Arc<Mutex<Vec<(Snapshot, Bytes)>>>,
}

impl SnapshotFiles {
    /// The store's snapshot.
    pub fn current(&self) -> Option<Snapshot> {
        self.kept.first().map(|(s, _)| *s)
    }

    /// A writer whose finished bytes join the finished snapshots.
    pub fn writer(&self, at: Position) -> Box<dyn SnapshotWriter> {
        Box::new(MemWriter {
            at,
            buf: Vec::new(),
            finished: Arc::clone(&self.finished),
        })
    }

    /// The bytes of a kept or finished snapshot.
    pub fn bytes(&self, snapshot: Snapshot) -> Result<Bytes, StorageError> {
        self.kept
            .iter()
            .find(|(s, _)| *s == snapshot)
            .map(|(_, b)| Arc::clone(b))
            .or_else(|| {
                let finished = self.finished.lock();
                finished
                    .iter()
                    .rev()
                    .find(|(s, _)| *s == snapshot)
                    .map(|(_, b)| Arc::clone(b))
            })
            .ok_or_else(|| {
                StorageError::Invalid(format!(
                    "snapshot at {} ({} bytes) is not kept",
                    snapshot.last_included, snapshot.size
                ))
            })
    }

    /// Makes `snapshot` (finished or kept) the store's, keeping the newest one
    /// before it.
    pub fn save(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let bytes = self.bytes(snapshot)?;
        self.finished.lock().retain(|(s, _)| *s != snapshot);
        let at = snapshot.last_included;
        let before = self
            .kept
            .iter()
            .filter(|(s, _)| s.last_included.index < at.index)
            .max_by_key(|(s, _)| s.last_included.index)
            .cloned();
        self.kept = std::iter::once((snapshot, bytes)).chain(before).collect();
        Ok(())
    }

    /// A stream of a kept or finished snapshot.
    pub fn reader(&self, snapshot: Snapshot) -> Result<Box<dyn Read + Send>, StorageError> {
        Ok(Box::new(ArcReader {
            bytes: self.bytes(snapshot)?,
            at: 0,
        }))
    }

    /// Up to `max_bytes` of a kept or finished snapshot from `offset`.
    pub fn read(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<u8>, StorageError> {
        let bytes = self.bytes(snapshot)?;
        let start = usize::try_from(offset)
            .ok()
            .filter(|o| *o <= bytes.len())
            .ok_or_else(|| {
                StorageError::Invalid(format!(
                    "snapshot read at offset {offset}: past its end ({} bytes)",
                    bytes.len()
                ))
            })?;
        let end = start.saturating_add(max_bytes).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    /// Forgets the finished snapshots nobody saved (a restart's clean-up).
    pub fn forget_finished(&self) {
        self.finished.lock().clear();
    }
}

/// An in-memory [`SnapshotWriter`].
struct MemWriter {
    at: Position,
    buf: Vec<u8>,
    finished: Arc<Mutex<Vec<(Snapshot, Bytes)>>>,
}

impl Write for MemWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SnapshotWriter for MemWriter {
    fn written(&self) -> u64 {
        self.buf.len() as u64
    }

    fn finish(self: Box<Self>) -> Result<Snapshot, StorageError> {
        let snapshot = Snapshot {
            last_included: self.at,
            size: self.buf.len() as u64,
        };
        self.finished.lock().push((snapshot, Arc::new(self.buf)));
        Ok(snapshot)
    }
}

/// Reads shared bytes.
struct ArcReader {
    bytes: Bytes,
    at: usize,
}

impl Read for ArcReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.bytes.get(self.at..).unwrap_or_default();
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}
