//! The data directory's lock file: while a log is open it holds `LOCK`
//! (`flock`), so a second open of the same directory (in this or another
//! process) fails.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use ha_core::StorageError;

use crate::fsutil::io_err;

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the directory's lock file.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, StorageError> {
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
