//! The benchmark's own state machine: a hash map of 16-byte keys to values.
//!
//! A command is the key (16 bytes) followed by the value; applying it inserts the
//! pair. A snapshot is `count: u64` then, per pair, the key, `len: u32` and the
//! value (all integers little-endian), in the map's iteration order (unsorted:
//! the encoding costs one pass, and restore does not care).
//!
//! The map is a persistent hash map (`imbl`), so [`StateMachine::capture`] is an
//! O(1) clone as the contract requires (it runs on the engine task); the encoding
//! happens in [`StateCapture::serialize`], off it.

use std::sync::Arc;

use ha_core::{Command, LogIndex, Position, StateCapture, StateMachine, StorageError};

/// Length of every key.
pub const KEY_LEN: usize = 16;

/// Output of a command too short to hold a key.
const BAD_COMMAND: &[u8] = b"bad command: shorter than a 16-byte key";

/// The map: keys to shared values (a structural copy clones only handles).
pub type KvMap = imbl::HashMap<[u8; KEY_LEN], Arc<[u8]>>;

/// The key-value map and the index of the last entry applied.
#[derive(Debug, Default)]
pub struct BenchKv {
    map: KvMap,
    applied: LogIndex,
}

/// A [`BenchKv`] captured for a snapshot: an O(1) clone of its map.
#[derive(Debug)]
pub struct BenchCapture(KvMap);

impl StateCapture for BenchCapture {
    fn write_to(self, out: &mut dyn std::io::Write) -> Result<(), StorageError> {
        encode(&self.0)?.write_to(out)
    }
}

/// The command that sets `key` to `value`.
pub fn put_command(key: [u8; KEY_LEN], value: &[u8]) -> Command {
    let mut bytes = Vec::with_capacity(KEY_LEN + value.len());
    bytes.extend_from_slice(&key);
    bytes.extend_from_slice(value);
    Command(bytes)
}

/// The key of client `client`'s `counter`-th write: both as big-endian `u64`s.
pub fn key_for(client: u64, counter: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..8].copy_from_slice(&client.to_be_bytes());
    key[8..].copy_from_slice(&counter.to_be_bytes());
    key
}

impl BenchKv {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value held for `key`.
    pub fn get(&self, key: &[u8; KEY_LEN]) -> Option<&[u8]> {
        self.map.get(key).map(|v| &v[..])
    }
}

/// Encodes every pair of `map` (see the module docs).
pub fn encode(map: &KvMap) -> Result<Vec<u8>, StorageError> {
    let size: usize = map.values().map(|v| KEY_LEN + 4 + v.len()).sum();
    let mut out = Vec::with_capacity(8 + size);
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (key, value) in map {
        let len = u32::try_from(value.len()).map_err(|_| {
            StorageError::Io(format!(
                "kv snapshot: a value of {} bytes is too long",
                value.len()
            ))
        })?;
        out.extend_from_slice(key);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(value);
    }
    Ok(out)
}

/// Decodes [`encode`]'s output; the error says what was wrong where.
pub fn decode(data: &[u8]) -> Result<KvMap, StorageError> {
    let mut reader = Reader { data, at: 0 };
    let count = u64::from_le_bytes(reader.array("pair count")?);
    let mut map = KvMap::new();
    for i in 0..count {
        let key: [u8; KEY_LEN] = reader.array("key")?;
        let len = u32::from_le_bytes(reader.array("value length")?);
        let value: Arc<[u8]> = reader.take(len as usize, "value")?.into();
        if map.insert(key, value).is_some() {
            return Err(StorageError::Corrupt(format!(
                "kv snapshot: pair {i} repeats a key"
            )));
        }
    }
    if reader.at != data.len() {
        return Err(StorageError::Corrupt(format!(
            "kv snapshot: {} bytes after the last of {count} pairs",
            data.len() - reader.at
        )));
    }
    Ok(map)
}

/// A cursor over a snapshot being decoded.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StorageError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len());
        match end {
            Some(end) => {
                let bytes = &self.data[self.at..end];
                self.at = end;
                Ok(bytes)
            }
            None => Err(StorageError::Corrupt(format!(
                "kv snapshot truncated: {what} of {n} bytes at offset {} of {}",
                self.at,
                self.data.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StorageError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

impl StateMachine for BenchKv {
    type Capture = BenchCapture;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.applied = position.index;
        match command.0.split_first_chunk::<KEY_LEN>() {
            Some((key, value)) => {
                self.map.insert(*key, value.into());
                Vec::new()
            }
            None => BAD_COMMAND.to_vec(),
        }
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied = position.index;
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        <[u8; KEY_LEN]>::try_from(query)
            .ok()
            .and_then(|key| self.get(&key).map(<[u8]>::to_vec))
            .unwrap_or_default()
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn capture(&self) -> BenchCapture {
        BenchCapture(self.map.clone())
    }

    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        self.map = decode(&ha_core::state_machine::read_all(data)?)?;
        self.applied = index;
        Ok(())
    }

    fn reset(&mut self) {
        *self = BenchKv::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_core::Term;

    fn pos(i: u64) -> Position {
        Position {
            term: Term::default(),
            index: LogIndex(i),
        }
    }

    #[test]
    fn snapshot_round_trips_and_damage_is_an_error() {
        let mut kv = BenchKv::new();
        for i in 0..10u64 {
            let out = kv.apply(pos(i + 1), &put_command(key_for(7, i), &[i as u8; 100]));
            assert!(out.is_empty());
        }
        assert_eq!(kv.apply(pos(11), &Command(vec![1, 2, 3])), BAD_COMMAND);
        let capture = kv.capture();
        // Later writes do not reach an earlier capture.
        kv.apply(pos(12), &put_command(key_for(8, 0), &[9; 100]));
        let serialize = |c: BenchCapture| {
            let mut out = Vec::new();
            c.write_to(&mut out).expect("encode");
            out
        };
        let snap = serialize(capture);
        let mut back = BenchKv::new();
        back.restore(LogIndex(11), &mut &snap[..]).expect("decode");
        assert_eq!(decode(&snap).expect("decode").len(), 10);
        assert_eq!(back.applied_index(), LogIndex(11));
        assert_eq!(back.query(&key_for(7, 3)), vec![3u8; 100]);
        assert_eq!(back.get(&key_for(8, 0)), None);
        let again = serialize(back.capture());
        assert_eq!(
            decode(&again).expect("decode"),
            decode(&snap).expect("decode")
        );

        assert!(back
            .restore(LogIndex(1), &mut &snap[..snap.len() - 1])
            .is_err());
        let mut longer = snap.clone();
        longer.push(0);
        assert!(back.restore(LogIndex(1), &mut &longer[..]).is_err());
        assert!(back.restore(LogIndex(1), &mut &[0xff; 8][..]).is_err());
    }
}
