//! [`KvStateMachine`]: a key-value [`StateMachine`] with postcard-encoded commands.

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::state_machine::{StateCapture, StateMachine};
use crate::types::{Command, LogIndex, Position, Term};

/// The first byte of an error output of [`KvStateMachine::apply`].
///
/// A successful output is a postcard-encoded `Option<Vec<u8>>`, whose first byte is
/// 0 or 1, so an output that starts with this byte is never mistaken for one. The
/// rest of an error output is a UTF-8 reason.
pub const KV_ERROR_TAG: u8 = 0xFF;

/// A command of [`KvStateMachine`]; travels postcard-encoded in a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`; the output is the previous value.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Removes `key`; the output is the previous value.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// Why a [`KvStateMachine`] output or command could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The state machine refused the command (it did not decode); the reason is
    /// for logs.
    #[error("command rejected by the state machine: {0}")]
    Rejected(String),
    /// The bytes are not a valid command or output.
    #[error("malformed: {0}")]
    Malformed(String),
}

impl KvCommand {
    /// A command that sets `key` to `value`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Command {
        KvCommand::Put {
            key: key.into(),
            value: value.into(),
        }
        .encode()
    }

    /// A command that removes `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Command {
        KvCommand::Delete { key: key.into() }.encode()
    }

    /// The command's encoded form.
    pub fn encode(&self) -> Command {
        // Postcard cannot fail on an enum of byte vectors written to a `Vec`; were
        // it to, the empty command would be refused by `apply` as undecodable.
        Command(postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Decodes a command.
    pub fn decode(command: &Command) -> Result<KvCommand, KvError> {
        decode_exact(&command.0)
    }

    /// The key the command touches.
    pub fn key(&self) -> &[u8] {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } => key,
        }
    }

    /// Decodes an output of [`KvStateMachine::apply`] (the previous value) or of
    /// [`KvStateMachine::query`] (the current value).
    pub fn decode_output(output: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match output.split_first() {
            Some((&KV_ERROR_TAG, reason)) => Err(KvError::Rejected(
                String::from_utf8_lossy(reason).into_owned(),
            )),
            _ => decode_exact(output),
        }
    }

    /// The query bytes that ask [`KvStateMachine::query`] for `key`'s value: the
    /// key itself.
    pub fn query(key: impl Into<Vec<u8>>) -> Vec<u8> {
        key.into()
    }
}

fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, KvError> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(KvError::Malformed(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(KvError::Malformed(e.to_string())),
    }
}

fn encode_value(value: Option<Vec<u8>>) -> Vec<u8> {
    match postcard::to_allocvec(&value) {
        Ok(bytes) => bytes,
        Err(e) => error_output(&format!("cannot encode output: {e}")),
    }
}

fn error_output(reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 1);
    out.push(KV_ERROR_TAG);
    out.extend_from_slice(reason.as_bytes());
    out
}

/// The serialized form of a [`KvStateMachine`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct KvSnapshot {
    applied: u64,
    fencing_term: Term,
    data: KvMap,
}

/// The map of a [`KvStateMachine`]: a persistent map, so a clone is O(1) and
/// shares structure with the original until either changes.
pub type KvMap = imbl::OrdMap<Vec<u8>, Vec<u8>>;

/// A [`KvStateMachine`]'s state captured for a snapshot (an O(1) clone of its
/// map); [`StateCapture::write_to`] encodes it.
#[derive(Clone, Debug)]
pub struct KvCapture(KvSnapshot);

impl StateCapture for KvCapture {
    fn write_to(self, out: &mut dyn std::io::Write) -> Result<(), StorageError> {
        postcard::to_allocvec(&self.0)
            .map_err(|e| StorageError::Io(format!("encode kv snapshot: {e}")))?
            .write_to(out)
    }
}

/// An in-memory key-value [`StateMachine`].
///
/// - Commands are [`KvCommand`]s; `apply` returns the key's previous value as a
///   postcard-encoded `Option<Vec<u8>>`, or, for a command that does not decode, an
///   error output starting with [`KV_ERROR_TAG`]. Read either with
///   [`KvCommand::decode_output`].
/// - A query is a key; `query` returns its current value as a postcard-encoded
///   `Option<Vec<u8>>`.
/// - It remembers the term of the last applied entry, the fencing token of the
///   primary that wrote it ([`KvStateMachine::fencing_term`]).
/// - Snapshots are the postcard encoding of the map, the applied index and the
///   fencing term. `restore` of an empty byte string restores the empty initial
///   state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStateMachine {
    data: KvMap,
    applied: LogIndex,
    fencing_term: Term,
}

impl KvStateMachine {
    /// An empty state machine at index 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }

    /// The term of the last applied entry (the fencing token of the primary that
    /// wrote it); [`Term::ZERO`] before anything was applied.
    pub fn fencing_term(&self) -> Term {
        self.fencing_term
    }

    /// The whole map.
    pub fn data(&self) -> &KvMap {
        &self.data
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True if no key is set.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl StateMachine for KvStateMachine {
    type Capture = KvCapture;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.applied = position.index;
        self.fencing_term = position.term;
        match KvCommand::decode(command) {
            Ok(KvCommand::Put { key, value }) => encode_value(self.data.insert(key, value)),
            Ok(KvCommand::Delete { key }) => encode_value(self.data.remove(&key)),
            Err(e) => error_output(&format!("undecodable command at {position}: {e}")),
        }
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied = position.index;
        self.fencing_term = position.term;
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        encode_value(self.data.get(query).cloned())
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn capture(&self) -> KvCapture {
        KvCapture(KvSnapshot {
            applied: self.applied.0,
            fencing_term: self.fencing_term,
            data: self.data.clone(),
        })
    }

    fn restore(
        &mut self,
        index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        let data = &crate::state_machine::read_all(data)?[..];
        if data.is_empty() {
            self.data.clear();
            self.applied = index;
            self.fencing_term = Term::ZERO;
            return Ok(());
        }
        let snap: KvSnapshot = decode_exact(data)
            .map_err(|e| StorageError::Corrupt(format!("kv snapshot at index {index}: {e}")))?;
        if snap.applied != index.0 {
            return Err(StorageError::Corrupt(format!(
                "kv snapshot was taken at index {} but is restored at index {index}",
                snap.applied
            )));
        }
        self.data = snap.data;
        self.applied = index;
        self.fencing_term = snap.fencing_term;
        Ok(())
    }

    fn reset(&mut self) {
        *self = KvStateMachine::new();
    }
}
