//! The key-value store's snapshot format, written and read as a stream (a
//! snapshot of any size never sits in memory whole):
//!
//! ```text
//! magic "HAKVSNP1" | applied index (u64 LE)
//! per item: 1 | key length (u32 LE) | key | mod_index (u64 LE) | value length (u32 LE) | value
//! end:      0 | item count (u64 LE)
//! ```
//!
//! The log store checks the file's integrity (ha-wal: a CRC-32 over it); the
//! reader checks the structure: the magic, every length against its bound
//! (nothing is allocated from an unchecked length), the count, and that
//! nothing follows the end.

use std::io::{Read, Write};

use ha_core::StorageError;

use crate::kv::Item;

const MAGIC: &[u8; 8] = b"HAKVSNP1";
const ITEM: u8 = 1;
const END: u8 = 0;
/// The longest key or value a snapshot may hold (the API's limits are far
/// lower; this only bounds what a damaged file can make the reader allocate).
const MAX_FIELD: u32 = 64 << 20;

fn corrupt(why: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("kv snapshot: {why}"))
}

fn write_err(e: std::io::Error) -> StorageError {
    StorageError::Io(format!("writing a kv snapshot: {e}"))
}

/// Writes a snapshot item by item.
pub(crate) struct Encoder<'a> {
    out: &'a mut dyn Write,
    count: u64,
}

impl<'a> Encoder<'a> {
    /// Starts a snapshot of the state after `applied`.
    pub(crate) fn new(out: &'a mut dyn Write, applied: u64) -> Result<Self, StorageError> {
        out.write_all(MAGIC).map_err(write_err)?;
        out.write_all(&applied.to_le_bytes()).map_err(write_err)?;
        Ok(Encoder { out, count: 0 })
    }

    /// Writes one key with its value and `mod_index`.
    pub(crate) fn item(
        &mut self,
        key: &[u8],
        mod_index: u64,
        value: &[u8],
    ) -> Result<(), StorageError> {
        let len = |b: &[u8]| {
            u32::try_from(b.len())
                .ok()
                .filter(|n| *n <= MAX_FIELD)
                .ok_or_else(|| StorageError::Invalid(format!("a {}-byte field", b.len())))
        };
        let (klen, vlen) = (len(key)?, len(value)?);
        let o = &mut *self.out;
        o.write_all(&[ITEM]).map_err(write_err)?;
        o.write_all(&klen.to_le_bytes()).map_err(write_err)?;
        o.write_all(key).map_err(write_err)?;
        o.write_all(&mod_index.to_le_bytes()).map_err(write_err)?;
        o.write_all(&vlen.to_le_bytes()).map_err(write_err)?;
        o.write_all(value).map_err(write_err)?;
        self.count += 1;
        Ok(())
    }

    /// Ends the snapshot.
    pub(crate) fn finish(self) -> Result<(), StorageError> {
        self.out.write_all(&[END]).map_err(write_err)?;
        self.out
            .write_all(&self.count.to_le_bytes())
            .map_err(write_err)?;
        self.out.flush().map_err(write_err)
    }
}

/// Reads a snapshot item by item.
pub(crate) struct Decoder<'a> {
    input: &'a mut dyn Read,
    count: u64,
    done: bool,
}

impl<'a> Decoder<'a> {
    /// Reads the header; returns the decoder and the snapshot's applied index.
    pub(crate) fn new(input: &'a mut dyn Read) -> Result<(Self, u64), StorageError> {
        let mut magic = [0u8; 8];
        read_exact(input, &mut magic, "the header")?;
        if &magic != MAGIC {
            return Err(corrupt("not a key-value snapshot (bad magic)"));
        }
        let applied = read_u64(input, "the applied index")?;
        Ok((
            Decoder {
                input,
                count: 0,
                done: false,
            },
            applied,
        ))
    }

    /// The next item, or `None` at the (checked) end.
    pub(crate) fn next_item(&mut self) -> Result<Option<Item>, StorageError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        read_exact(self.input, &mut tag, "an item's tag")?;
        match tag[0] {
            ITEM => {
                let key = read_field(self.input, "a key")?;
                let mod_index = read_u64(self.input, "a mod_index")?;
                let value = read_field(self.input, "a value")?;
                self.count += 1;
                Ok(Some(Item {
                    key,
                    value,
                    mod_index,
                }))
            }
            END => {
                let count = read_u64(self.input, "the item count")?;
                if count != self.count {
                    return Err(corrupt(format!(
                        "the end says {count} items, the snapshot holds {}",
                        self.count
                    )));
                }
                let mut extra = [0u8; 1];
                match self.input.read(&mut extra) {
                    Ok(0) => {}
                    Ok(_) => return Err(corrupt("bytes after the end")),
                    Err(e) => return Err(corrupt(e)),
                }
                self.done = true;
                Ok(None)
            }
            t => Err(corrupt(format!("unknown tag {t}"))),
        }
    }
}

fn read_exact(input: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<(), StorageError> {
    input
        .read_exact(buf)
        .map_err(|e| corrupt(format!("reading {what}: {e}")))
}

fn read_u64(input: &mut dyn Read, what: &str) -> Result<u64, StorageError> {
    let mut b = [0u8; 8];
    read_exact(input, &mut b, what)?;
    Ok(u64::from_le_bytes(b))
}

fn read_field(input: &mut dyn Read, what: &str) -> Result<Vec<u8>, StorageError> {
    let mut b = [0u8; 4];
    read_exact(input, &mut b, what)?;
    let len = u32::from_le_bytes(b);
    if len > MAX_FIELD {
        return Err(corrupt(format!("{what} of {len} bytes")));
    }
    let mut out = vec![0u8; len as usize];
    read_exact(input, &mut out, what)?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn encoded(items: &[(&[u8], u64, &[u8])], applied: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out, applied).unwrap();
        for (k, i, v) in items {
            e.item(k, *i, v).unwrap();
        }
        e.finish().unwrap();
        out
    }

    fn decoded(bytes: &[u8]) -> Result<(u64, Vec<Item>), StorageError> {
        let mut input = bytes;
        let (mut d, applied) = Decoder::new(&mut input)?;
        let mut items = Vec::new();
        while let Some(it) = d.next_item()? {
            items.push(it);
        }
        Ok((applied, items))
    }

    #[test]
    fn a_snapshot_round_trips() {
        let bytes = encoded(&[(b"a", 3, b"x"), (b"b", 9, b"")], 12);
        let (applied, items) = decoded(&bytes).unwrap();
        assert_eq!(applied, 12);
        assert_eq!(items.len(), 2);
        assert_eq!(
            (
                items[1].key.as_slice(),
                items[1].mod_index,
                items[1].value.len()
            ),
            (&b"b"[..], 9, 0)
        );
    }

    #[test]
    fn every_cut_and_a_trailing_byte_are_refused() {
        let bytes = encoded(&[(b"key", 3, b"value")], 5);
        for cut in 0..bytes.len() {
            assert!(
                matches!(decoded(&bytes[..cut]), Err(StorageError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decoded(&longer), Err(StorageError::Corrupt(_))));
    }

    #[test]
    fn a_huge_announced_length_allocates_nothing() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(ITEM);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decoded(&bytes), Err(StorageError::Corrupt(_))));
    }
}
