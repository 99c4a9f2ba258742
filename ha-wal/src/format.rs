//! The on-disk formats: segment headers, log records and the small files that are
//! replaced atomically (hard state, snapshot, log metadata).
//!
//! All integers are little-endian. Every structure carries a CRC-32 (crc32fast), and
//! every decoder here takes arbitrary bytes without panicking: it returns what it
//! found, or why the bytes are not a valid structure.
//!
//! # Segment file
//! A segment file is named `{seq:020}.wal` (see [`segment_file_name`]) and starts
//! with a [`SEGMENT_HEADER_LEN`]-byte header:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | magic `HAWALSEG`                                   |
//! | 8..12  | format version ([`FORMAT_VERSION`])                |
//! | 12..16 | reserved, zero                                     |
//! | 16..24 | segment sequence number (matches the file name)    |
//! | 24..32 | index of the first record the segment holds        |
//! | 32..36 | reserved, zero                                     |
//! | 36..40 | CRC-32 of bytes 0..36                              |
//!
//! Records follow back to back.
//!
//! # Record
//! | bytes     | field                                           |
//! |-----------|-------------------------------------------------|
//! | 0..4      | body length `n`                                 |
//! | 4..8      | CRC-32 of the body                              |
//! | 8..16     | term number                                     |
//! | 16..24    | term node                                       |
//! | 24..32    | log index                                       |
//! | 32..40    | byte offset where the record's write group starts |
//! | 40..44    | CRC-32 of bytes 0..40 (the header)              |
//! | 44..44+n  | body: the postcard-encoded [`WalEntry`]         |
//!
//! The header has its own CRC so that a damaged length is told apart from a record
//! that was cut short by a crash. The group start lets recovery tell a torn last
//! group (written with one fdatasync that never completed, so its sectors may land
//! in any order) from damage followed by a later, acknowledged group.

use ha_core::types::{LogIndex, NodeId, Position, Term, WalEntry};
use ha_core::StorageError;
use serde::{Deserialize, Serialize};

/// The version of every format in this module. A file with another version is
/// refused.
pub const FORMAT_VERSION: u32 = 2;

/// The magic bytes at the start of a segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HAWALSEG";

/// The length of a segment header in bytes.
pub const SEGMENT_HEADER_LEN: usize = 40;

/// The length of a record header in bytes (before the body).
pub const RECORD_HEADER_LEN: usize = 44;

/// The largest record body accepted (encoded entry), in bytes.
pub const MAX_RECORD_BODY: usize = 256 << 20;

/// The file name extension of segment files.
pub const SEGMENT_EXT: &str = "wal";

/// The file name of the segment with sequence number `seq`.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}.{SEGMENT_EXT}")
}

/// The sequence number named by a segment file name, if `name` is one.
///
/// Returns `None` for names that do not end in `.wal`, and `Some(Err(..))` for a
/// `.wal` file whose stem is not a sequence number (never skipped silently).
pub fn parse_segment_file_name(name: &str) -> Option<Result<u64, String>> {
    let stem = name.strip_suffix(".wal")?;
    Some(
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            stem.parse::<u64>()
                .map_err(|e| format!("segment file name {name:?}: {e}"))
        } else {
            Err(format!(
                "file {name:?} looks like a segment but its name is not a 20-digit sequence number"
            ))
        },
    )
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// A segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's sequence number; segments are read in this order.
    pub seq: u64,
    /// The index of the first record the segment holds (or will hold).
    pub first_index: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_index.to_le_bytes());
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header from the start of `buf`; the error says what is wrong.
    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, String> {
        let Some(h) = buf.get(..SEGMENT_HEADER_LEN) else {
            return Err(format!(
                "segment header is cut short: {} of {SEGMENT_HEADER_LEN} bytes",
                buf.len()
            ));
        };
        if h[0..8] != SEGMENT_MAGIC {
            return Err("not a segment file: bad magic".to_string());
        }
        let crc = u32_at(h, 36);
        if crc != crc32fast::hash(&h[0..36]) {
            return Err("segment header fails its checksum".to_string());
        }
        let version = u32_at(h, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "segment format version {version} is not supported (this build reads {FORMAT_VERSION})"
            ));
        }
        Ok(SegmentHeader {
            seq: u64_at(h, 16),
            first_index: u64_at(h, 24),
        })
    }
}

/// Appends the record for `entry` to `out`; returns the record's length in bytes.
///
/// The entry is encoded as it is; checking its checksum is the caller's business.
pub fn encode_record(entry: &WalEntry, out: &mut Vec<u8>) -> Result<usize, StorageError> {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    let buf = std::mem::take(out);
    let mut buf = postcard::to_extend(entry, buf).map_err(|e| {
        StorageError::Invalid(format!("entry at {} does not encode: {e}", entry.position))
    })?;
    let body_len = buf.len() - start - RECORD_HEADER_LEN;
    if body_len > MAX_RECORD_BODY {
        buf.truncate(start);
        *out = buf;
        return Err(StorageError::Invalid(format!(
            "entry at {} encodes to {body_len} bytes, more than the limit of {MAX_RECORD_BODY}",
            entry.position
        )));
    }
    let body_crc = crc32fast::hash(&buf[start + RECORD_HEADER_LEN..]);
    let h = &mut buf[start..start + RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&body_crc.to_le_bytes());
    h[8..16].copy_from_slice(&entry.position.term.number.to_le_bytes());
    h[16..24].copy_from_slice(&entry.position.term.node.0.to_le_bytes());
    h[24..32].copy_from_slice(&entry.position.index.0.to_le_bytes());
    let header_crc = crc32fast::hash(&h[0..40]);
    h[40..44].copy_from_slice(&header_crc.to_le_bytes());
    *out = buf;
    Ok(RECORD_HEADER_LEN + body_len)
}

/// Stamps an encoded record with the byte offset where its write group starts in
/// its segment (and fixes the header CRC). The writer calls it just before the
/// group is written; `record` must start with a header from [`encode_record`].
pub fn set_group_start(record: &mut [u8], group_start: u64) {
    if let Some(h) = record.get_mut(..RECORD_HEADER_LEN) {
        h[32..40].copy_from_slice(&group_start.to_le_bytes());
        let header_crc = crc32fast::hash(&h[0..40]);
        h[40..44].copy_from_slice(&header_crc.to_le_bytes());
    }
}

/// What [`decode_record`] found at the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordDecode {
    /// A whole, valid record.
    Record {
        /// The entry it holds (its checksum verified, its position matching the
        /// record header).
        entry: WalEntry,
        /// The record's length in bytes (header and body).
        len: usize,
        /// Where the record's write group starts in its segment.
        group_start: u64,
    },
    /// The buffer ends inside the record: either the header is incomplete, or the
    /// header is valid and its body runs past the end of the buffer.
    Truncated,
    /// The bytes are not a valid record; says why.
    Invalid(String),
}

/// Decodes the record at the start of `buf`. Never panics, whatever the bytes.
pub fn decode_record(buf: &[u8]) -> RecordDecode {
    let Some(h) = buf.get(..RECORD_HEADER_LEN) else {
        return RecordDecode::Truncated;
    };
    if u32_at(h, 40) != crc32fast::hash(&h[0..40]) {
        return RecordDecode::Invalid("record header fails its checksum".to_string());
    }
    let body_len = u32_at(h, 0) as usize;
    if body_len > MAX_RECORD_BODY {
        return RecordDecode::Invalid(format!(
            "record body length {body_len} exceeds the limit of {MAX_RECORD_BODY}"
        ));
    }
    let position = Position::new(
        Term {
            number: u64_at(h, 8),
            node: NodeId(u64_at(h, 16)),
        },
        LogIndex(u64_at(h, 24)),
    );
    let Some(body) = buf.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + body_len) else {
        return RecordDecode::Truncated;
    };
    if u32_at(h, 4) != crc32fast::hash(body) {
        return RecordDecode::Invalid(format!(
            "record body of the entry at {position} fails its checksum"
        ));
    }
    let entry = match postcard::take_from_bytes::<WalEntry>(body) {
        Ok((entry, [])) => entry,
        Ok((_, rest)) => {
            return RecordDecode::Invalid(format!(
                "record body of the entry at {position} has {} trailing bytes",
                rest.len()
            ))
        }
        Err(e) => {
            return RecordDecode::Invalid(format!(
                "record body of the entry at {position} does not decode: {e}"
            ))
        }
    };
    if entry.position != position {
        return RecordDecode::Invalid(format!(
            "record header names {position} but its entry is at {}",
            entry.position
        ));
    }
    if !entry.verify() {
        return RecordDecode::Invalid(format!("entry at {position} fails its own checksum"));
    }
    RecordDecode::Record {
        entry,
        len: RECORD_HEADER_LEN + body_len,
        group_start: u64_at(h, 32),
    }
}

/// The magic of the hard-state file.
pub const HARD_STATE_MAGIC: [u8; 8] = *b"HAWALHST";
/// The magic of the snapshot pointer file (`crate::snapfiles`).
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HAWALSNP";
/// The magic of the log metadata file.
pub const META_MAGIC: [u8; 8] = *b"HAWALMET";

const SMALL_HEADER_LEN: usize = 24;

/// Wraps `payload` in the container used by every atomically replaced file:
/// magic (8 bytes), version (4), payload length (8), CRC-32 of bytes 0..20 and the
/// payload (4), then the payload.
pub fn encode_small_file(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SMALL_HEADER_LEN + payload.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[0..20]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Unwraps a file written by [`encode_small_file`] with `magic`; the error says
/// what is wrong.
pub fn decode_small_file(magic: [u8; 8], buf: &[u8]) -> Result<&[u8], String> {
    let Some(h) = buf.get(..SMALL_HEADER_LEN) else {
        return Err(format!(
            "file is cut short: {} bytes, the header alone is {SMALL_HEADER_LEN}",
            buf.len()
        ));
    };
    if h[0..8] != magic {
        return Err("bad magic".to_string());
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        ));
    }
    let len = u64_at(h, 12);
    let payload = &buf[SMALL_HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "header says {len} payload bytes, the file holds {}",
            payload.len()
        ));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[0..20]);
    crc.update(payload);
    if crc.finalize() != u32_at(h, 20) {
        return Err("checksum mismatch".to_string());
    }
    Ok(payload)
}

/// The log metadata: where the log logically starts, which segments are obsolete,
/// and an `install_snapshot` in progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogMeta {
    /// The position just before the first entry of the log (the compacted prefix or
    /// an installed snapshot).
    pub(crate) base: Position,
    /// Segments with a lower sequence number are obsolete (left over from an
    /// interrupted purge or install) and are deleted on open.
    pub(crate) min_seq: u64,
    /// An `install_snapshot` at this position was started: if the snapshot file holds
    /// it, the install is finished on open; otherwise it is forgotten.
    pub(crate) installing: Option<Position>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ha_core::types::{Command, Payload};

    fn entry(i: u64, body: &[u8]) -> WalEntry {
        WalEntry::new(
            Position::new(
                Term {
                    number: 3,
                    node: NodeId(2),
                },
                LogIndex(i),
            ),
            Payload::Command(Command(body.to_vec())),
        )
    }

    #[test]
    fn record_round_trips() {
        let mut buf = Vec::new();
        let e = entry(7, b"hello");
        let n = encode_record(&e, &mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(
            decode_record(&buf),
            RecordDecode::Record {
                entry: e,
                len: n,
                group_start: 0
            }
        );
        for cut in 0..n {
            assert_eq!(decode_record(&buf[..cut]), RecordDecode::Truncated, "{cut}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        let n = encode_record(&entry(1, b"abc"), &mut buf).unwrap();
        for byte in 0..n {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                match decode_record(&b) {
                    RecordDecode::Record { .. } => panic!("flip {byte}/{bit} not detected"),
                    RecordDecode::Truncated | RecordDecode::Invalid(_) => {}
                }
            }
        }
    }

    #[test]
    fn segment_header_round_trips() {
        let h = SegmentHeader {
            seq: 5,
            first_index: 99,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[20] ^= 1;
        assert!(SegmentHeader::decode(&b).is_err());
    }

    #[test]
    fn small_file_round_trips() {
        let f = encode_small_file(META_MAGIC, b"payload");
        assert_eq!(decode_small_file(META_MAGIC, &f), Ok(&b"payload"[..]));
        assert!(decode_small_file(SNAPSHOT_MAGIC, &f).is_err());
        assert!(decode_small_file(META_MAGIC, &f[..f.len() - 1]).is_err());
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(3), "00000000000000000003.wal");
        assert_eq!(
            parse_segment_file_name("00000000000000000003.wal"),
            Some(Ok(3))
        );
        assert_eq!(parse_segment_file_name("LOCK"), None);
        assert!(matches!(parse_segment_file_name("x.wal"), Some(Err(_))));
    }
}
