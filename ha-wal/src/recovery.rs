//! Recovery at open: listing the data directory (and deleting what
//! interrupted writes, purges and installs left behind), reading the log's
//! metadata, hard state and snapshot, and reading every segment back, verifying
//! each record and truncating a torn record at the very tail of the last one.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ha_core::log_store::Snapshot;
use ha_core::types::{HardState, Position};
use ha_core::StorageError;

use crate::format::{
    decode_record, parse_segment_file_name, LogMeta, RecordDecode, SegmentHeader, HARD_STATE_MAGIC,
    META_MAGIC, SEGMENT_HEADER_LEN,
};
use crate::fsutil::{
    corrupt, decode_payload, io_err, read_small_file, remove_file, sync_dir, TMP_SUFFIX,
};
use crate::snapfiles::SnapFiles;
use crate::state::{Loc, Segment};
use crate::writer::{HARD_STATE_FILE, META_FILE};

/// What recovery found in a data directory.
pub(crate) struct Recovered {
    /// Where the log starts, its lowest live segment and an interrupted install.
    pub(crate) meta: LogMeta,
    /// The saved hard state, if any.
    pub(crate) hard_state: Option<HardState>,
    /// The saved snapshot, if any.
    pub(crate) snapshot: Option<Snapshot>,
    /// The snapshot files.
    pub(crate) files: SnapFiles,
    /// The live segments, in sequence order, verified.
    pub(crate) segments: Vec<Segment>,
    /// Where each entry after the log's start is.
    pub(crate) locs: std::collections::VecDeque<Loc>,
    /// The sequence number of the next new segment.
    pub(crate) next_seq: u64,
}

/// Recovers the log in `dir` (whose lock this process holds): deletes
/// temporary files of interrupted writes and segments an interrupted purge or
/// install left behind, reads the log's metadata, hard state and snapshot, and
/// reads and verifies every live segment (see [`scan_segments`]). `sync` says
/// whether deletions and a truncated tail are made durable.
pub(crate) fn recover(dir: &Path, sync: bool) -> Result<Recovered, StorageError> {
    // List the directory: segments, and leftovers of interrupted writes.
    let mut listed: Vec<(u64, PathBuf)> = Vec::new();
    let read_dir = fs::read_dir(dir).map_err(|e| io_err("list directory", dir, e))?;
    for item in read_dir {
        let item = item.map_err(|e| io_err("list directory", dir, e))?;
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

    let meta: LogMeta = match read_small_file(dir, META_FILE, META_MAGIC)? {
        Some(p) => decode_payload(&dir.join(META_FILE), &p)?,
        None => LogMeta::default(),
    };
    let hard_state: Option<HardState> =
        match read_small_file(dir, HARD_STATE_FILE, HARD_STATE_MAGIC)? {
            Some(p) => Some(decode_payload(&dir.join(HARD_STATE_FILE), &p)?),
            None => None,
        };
    let files = SnapFiles::recover(dir, sync)?;
    let snapshot = files.current();

    // Segments below `min_seq` were being deleted by a purge or install.
    let (obsolete, live): (Vec<_>, Vec<_>) =
        listed.into_iter().partition(|(seq, _)| *seq < meta.min_seq);
    for (_, path) in &obsolete {
        tracing::info!(segment = %path.display(), "deleting a segment an interrupted purge or install left behind");
        remove_file(path)?;
    }
    if !obsolete.is_empty() {
        sync_dir(dir, sync)?;
    }

    let scanned = scan_segments(&live, meta.base, sync)?;
    let next_seq = live
        .last()
        .map(|(seq, _)| seq.saturating_add(1))
        .unwrap_or(0)
        .max(meta.min_seq);
    Ok(Recovered {
        meta,
        hard_state,
        snapshot,
        files,
        segments: scanned.segments,
        locs: scanned.locs,
        next_seq,
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::{block_on, cfg, entry, six, term, write_meta};
    use crate::wal::Wal;
    use ha_core::log_store::LogStore;
    use ha_core::types::LogIndex;

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
        write_meta(tmp.path(), &meta);
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
        write_meta(tmp.path(), &meta);
        let err = Wal::open(tmp.path(), cfg()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("byte offset"), "{err}");
    }
}
