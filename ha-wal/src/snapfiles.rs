//! Snapshot files: streamed in by writers, read back as streams or chunks, and
//! kept by a small pointer file (the `LogStore` contract's keeping rule).
//!
//! - A writer ([`SnapFiles::writer`]) streams into `snap-<gen>.partial`; finishing
//!   it fsyncs the file, renames it to `snap-<gen>.snap` and fsyncs the
//!   directory. A writer dropped unfinished deletes its file.
//! - The `snapshot` file (replaced atomically) names the store's snapshot and the
//!   one kept before it, each with its position, size, generation and CRC-32.
//!   Saving one rewrites it, then deletes the data file no longer named.
//! - At open every `snap-*` file the pointer does not name (partial, finished but
//!   never saved, dropped) is deleted, and the named ones must have their size.
//! - A stream read ([`SnapFiles::reader`]) checks the CRC-32 at its end: a
//!   damaged snapshot fails its restore instead of restoring wrong state.
//!
//! Nothing here holds a snapshot in memory: writes and reads are buffered
//! streams, and a chunk read reads one chunk.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ha_core::log_store::{Snapshot, SnapshotWriter};
use ha_core::types::Position;
use ha_core::StorageError;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::format::SNAPSHOT_MAGIC;
use crate::fsutil::{
    corrupt, decode_payload, encode_payload, io_err, read_small_file, remove_file, sync_dir,
    write_small_file,
};

/// The pointer file's name.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot";
const PREFIX: &str = "snap-";
const DONE: &str = ".snap";
const PARTIAL: &str = ".partial";

/// One snapshot data file, as the pointer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapRef {
    pub(crate) last_included: Position,
    pub(crate) size: u64,
    /// The file's generation: its name.
    pub(crate) gen: u64,
    /// CRC-32 of the whole file.
    pub(crate) crc: u32,
}

impl SnapRef {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_included: self.last_included,
            size: self.size,
        }
    }

    fn is(&self, s: Snapshot) -> bool {
        self.snapshot() == s
    }
}

pub(crate) fn done_name(gen: u64) -> String {
    format!("{PREFIX}{gen:020}{DONE}")
}

fn partial_name(gen: u64) -> String {
    format!("{PREFIX}{gen:020}{PARTIAL}")
}

/// The pointer file's record: the store's snapshot and the one kept before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub(crate) current: Option<SnapRef>,
    pub(crate) previous: Option<SnapRef>,
}

impl Kept {
    fn iter(&self) -> impl Iterator<Item = SnapRef> {
        self.current.into_iter().chain(self.previous)
    }
}

/// A log directory's snapshot files. Shared by the [`crate::Wal`] (writers and
/// readers, on any thread) and its writer thread (saves).
#[derive(Debug)]
pub(crate) struct SnapFiles {
    dir: PathBuf,
    sync: bool,
    next_gen: AtomicU64,
    kept: RwLock<Kept>,
    /// Finished by a writer, not saved yet.
    finished: Mutex<Vec<SnapRef>>,
}

impl SnapFiles {
    /// Reads the pointer, deletes every snapshot file it does not name and
    /// checks the named ones are whole.
    pub(crate) fn recover(dir: &Path, sync: bool) -> Result<SnapFiles, StorageError> {
        let kept: Kept = match read_small_file(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC)? {
            Some(p) => decode_payload(&dir.join(SNAPSHOT_FILE), &p)?,
            None => Kept::default(),
        };
        let named: Vec<String> = kept.iter().map(|r| done_name(r.gen)).collect();
        let mut max_gen = kept.iter().map(|r| r.gen).max().unwrap_or(0);
        let mut deleted = false;
        let listing = fs::read_dir(dir).map_err(|e| io_err("list directory", dir, e))?;
        for item in listing {
            let item = item.map_err(|e| io_err("list directory", dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(PREFIX) || named.iter().any(|n| n == name) {
                continue;
            }
            if let Some(gen) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('.').next())
                .and_then(|g| g.parse::<u64>().ok())
            {
                max_gen = max_gen.max(gen);
            }
            tracing::info!(file = %item.path().display(), "deleting a snapshot file no save kept");
            remove_file(&item.path())?;
            deleted = true;
        }
        if deleted {
            sync_dir(dir, sync)?;
        }
        for r in kept.iter() {
            let path = dir.join(done_name(r.gen));
            let len = fs::metadata(&path)
                .map_err(|e| io_err("stat snapshot", &path, e))?
                .len();
            if len != r.size {
                return Err(corrupt(
                    &path,
                    0,
                    &format!(
                        "the snapshot at {} should hold {} bytes, the file holds {len}",
                        r.last_included, r.size
                    ),
                ));
            }
        }
        Ok(SnapFiles {
            dir: dir.to_path_buf(),
            sync,
            next_gen: AtomicU64::new(max_gen + 1),
            kept: RwLock::new(kept),
            finished: Mutex::new(Vec::new()),
        })
    }

    /// The store's snapshot.
    pub(crate) fn current(&self) -> Option<Snapshot> {
        self.kept.read().current.map(|r| r.snapshot())
    }

    /// Starts a snapshot at `at`.
    pub(crate) fn writer(
        self: &Arc<Self>,
        at: Position,
    ) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(partial_name(gen));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err("create snapshot", &path, e))?;
        Ok(Box::new(FileWriter {
            files: Arc::clone(self),
            at,
            gen,
            path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            crc: crc32fast::Hasher::new(),
            written: 0,
        }))
    }

    /// The file of a kept or finished snapshot.
    fn resolve(&self, s: Snapshot) -> Result<SnapRef, StorageError> {
        let kept = *self.kept.read();
        kept.iter()
            .find(|r| r.is(s))
            .or_else(|| self.finished.lock().iter().rev().find(|r| r.is(s)).copied())
            .ok_or_else(|| {
                StorageError::Invalid(format!(
                    "the snapshot at {} ({} bytes) is not kept",
                    s.last_included, s.size
                ))
            })
    }

    fn open(&self, r: SnapRef) -> Result<(File, PathBuf), StorageError> {
        let path = self.dir.join(done_name(r.gen));
        let file = File::open(&path).map_err(|e| io_err("open snapshot", &path, e))?;
        Ok((file, path))
    }

    /// A stream of a kept or finished snapshot, checked against its CRC-32 at
    /// its end.
    pub(crate) fn reader(&self, s: Snapshot) -> Result<Box<dyn Read + Send>, StorageError> {
        let r = self.resolve(s)?;
        let (file, path) = self.open(r)?;
        Ok(Box::new(CheckedReader {
            inner: BufReader::with_capacity(1 << 20, file),
            path,
            want: r,
            crc: crc32fast::Hasher::new(),
            read: 0,
        }))
    }

    /// Up to `max_bytes` of a kept or finished snapshot from `offset`.
    pub(crate) fn read_at(
        &self,
        s: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<u8>, StorageError> {
        let r = self.resolve(s)?;
        if offset > r.size {
            return Err(StorageError::Invalid(format!(
                "snapshot read at offset {offset}: past its end ({} bytes)",
                r.size
            )));
        }
        let len = usize::try_from(r.size - offset)
            .unwrap_or(usize::MAX)
            .min(max_bytes);
        let (file, path) = self.open(r)?;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| io_err(&format!("read at byte offset {offset} of"), &path, e))?;
        Ok(buf)
    }

    /// Makes `s` (finished or kept) the store's snapshot, keeping the newest
    /// one before it, and deletes the file it no longer keeps. Called by the
    /// writer thread only.
    pub(crate) fn save(&self, s: Snapshot) -> Result<(), StorageError> {
        let r = self.resolve(s)?;
        let old = *self.kept.read();
        let previous = old
            .iter()
            .filter(|k| k.gen != r.gen && k.last_included.index < r.last_included.index)
            .max_by_key(|k| k.last_included.index);
        let new = Kept {
            current: Some(r),
            previous,
        };
        let payload = encode_payload("snapshot pointer", &new)?;
        write_small_file(
            &self.dir,
            SNAPSHOT_FILE,
            SNAPSHOT_MAGIC,
            &payload,
            self.sync,
        )?;
        *self.kept.write() = new;
        self.finished.lock().retain(|f| f.gen != r.gen);
        let mut deleted = false;
        for gone in old.iter().filter(|k| new.iter().all(|n| n.gen != k.gen)) {
            remove_file(&self.dir.join(done_name(gone.gen)))?;
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir, self.sync)?;
        }
        Ok(())
    }
}

/// Streams a snapshot into its partial file.
struct FileWriter {
    files: Arc<SnapFiles>,
    at: Position,
    gen: u64,
    path: PathBuf,
    /// `None` once finished.
    out: Option<BufWriter<File>>,
    crc: crc32fast::Hasher,
    written: u64,
}

impl Write for FileWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the snapshot writer is finished"))?;
        let n = out.write(data)?;
        self.crc.update(&data[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl SnapshotWriter for FileWriter {
    fn written(&self) -> u64 {
        self.written
    }

    fn finish(mut self: Box<Self>) -> Result<Snapshot, StorageError> {
        let Some(out) = self.out.take() else {
            return Err(StorageError::Invalid(
                "the snapshot writer is finished".into(),
            ));
        };
        let file = out
            .into_inner()
            .map_err(|e| io_err("write snapshot", &self.path, e.into_error()))?;
        if self.files.sync {
            file.sync_data()
                .map_err(|e| io_err("fsync snapshot", &self.path, e))?;
        }
        drop(file);
        let done = self.files.dir.join(done_name(self.gen));
        fs::rename(&self.path, &done).map_err(|e| io_err("rename snapshot", &self.path, e))?;
        sync_dir(&self.files.dir, self.files.sync)?;
        let r = SnapRef {
            last_included: self.at,
            size: self.written,
            gen: self.gen,
            crc: self.crc.clone().finalize(),
        };
        self.files.finished.lock().push(r);
        Ok(r.snapshot())
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Unfinished: what it wrote is no snapshot.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads a snapshot file, checking its length and CRC-32 at the end.
struct CheckedReader {
    inner: BufReader<File>,
    path: PathBuf,
    want: SnapRef,
    crc: crc32fast::Hasher,
    read: u64,
}

impl Read for CheckedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.read += n as u64;
        if n == 0 && !buf.is_empty() {
            let crc = self.crc.clone().finalize();
            if self.read != self.want.size || crc != self.want.crc {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "snapshot {} is damaged: {} bytes with CRC-32 {crc:08x}, expected {} bytes with {:08x}",
                        self.path.display(),
                        self.read,
                        self.want.size,
                        self.want.crc
                    ),
                ));
            }
        }
        Ok(n)
    }
}
