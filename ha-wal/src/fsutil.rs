//! File-system helpers: errors with context, directory fsync, atomic replacement.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

use ha_core::StorageError;

use crate::format::{decode_small_file, encode_small_file};

/// The suffix of temporary files; leftovers are deleted on open.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// An I/O error naming what was being done and to which file.
pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what} {}: {e}", path.display()))
}

/// A corruption error naming the file and byte offset.
pub(crate) fn corrupt(path: &Path, offset: u64, why: &str) -> StorageError {
    StorageError::Corrupt(format!("{} at byte offset {offset}: {why}", path.display()))
}

/// Makes a directory's entries (creations, renames, deletions) durable.
pub(crate) fn sync_dir(dir: &Path, sync: bool) -> Result<(), StorageError> {
    if !sync {
        return Ok(());
    }
    let d = File::open(dir).map_err(|e| io_err("open directory", dir, e))?;
    d.sync_all().map_err(|e| io_err("fsync directory", dir, e))
}

/// Replaces `dir/name` atomically with `bytes`: writes `name.tmp`, fsyncs it, renames
/// it over `name` and fsyncs the directory. After a crash either the old or the new
/// content is read back.
pub(crate) fn replace_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    sync: bool,
) -> Result<(), StorageError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err("write", &tmp, e))?;
        if sync {
            f.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
        }
    }
    fs::rename(&tmp, &path).map_err(|e| io_err("rename into place", &path, e))?;
    sync_dir(dir, sync)
}

/// Writes a small container file (see [`encode_small_file`]) atomically.
pub(crate) fn write_small_file(
    dir: &Path,
    name: &str,
    magic: [u8; 8],
    payload: &[u8],
    sync: bool,
) -> Result<(), StorageError> {
    replace_file(dir, name, &encode_small_file(magic, payload), sync)
}

/// Reads a small container file; `None` if it does not exist. A file that exists
/// but fails verification is an error naming it.
pub(crate) fn read_small_file(
    dir: &Path,
    name: &str,
    magic: [u8; 8],
) -> Result<Option<Vec<u8>>, StorageError> {
    let path = dir.join(name);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path, e)),
    };
    match decode_small_file(magic, &bytes) {
        Ok(payload) => Ok(Some(payload.to_vec())),
        Err(why) => Err(corrupt(&path, 0, &why)),
    }
}

/// Decodes a postcard payload read from `path`.
pub(crate) fn decode_payload<T: serde::de::DeserializeOwned>(
    path: &Path,
    payload: &[u8],
) -> Result<T, StorageError> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(corrupt(
            path,
            0,
            &format!("{} trailing bytes after the payload", rest.len()),
        )),
        Err(e) => Err(corrupt(path, 0, &format!("payload does not decode: {e}"))),
    }
}

/// Encodes a value with postcard.
pub(crate) fn encode_payload<T: serde::Serialize>(
    what: &str,
    value: &T,
) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(value).map_err(|e| StorageError::Io(format!("encode {what}: {e}")))
}

/// Removes a file, treating "already gone" as done.
pub(crate) fn remove_file(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("delete", path, e)),
    }
}
