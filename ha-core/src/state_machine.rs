//! The contract of what the replicated log drives.

use crate::error::StorageError;
use crate::types::{Command, LogIndex};

/// The application state the log is replayed into (the embedded key-value store in
/// `ha-node`, a test model in the simulator).
///
/// # Contract
/// - `apply` is deterministic: the same commands in the same order give the same
///   state and outputs on every node. It is called once per committed entry, in
///   index order, with no gaps; an invalid command is an output, not a failure.
/// - `snapshot` captures the state after the last applied entry; `restore` replaces
///   the whole state with one, and afterwards `applied_index` is the snapshot's.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command and returns its output for the client.
    fn apply(&mut self, index: LogIndex, command: &Command) -> Vec<u8>;

    /// Records that the no-op at `index` was applied (it changes no state).
    fn apply_noop(&mut self, index: LogIndex);

    /// Answers a read-only query against the current state.
    fn query(&self, query: &[u8]) -> Vec<u8>;

    /// The index of the last entry applied.
    fn applied_index(&self) -> LogIndex;

    /// Serializes the current state.
    fn snapshot(&self) -> Result<Vec<u8>, StorageError>;

    /// Replaces the whole state with a snapshot taken at `index`.
    fn restore(&mut self, index: LogIndex, data: &[u8]) -> Result<(), StorageError>;
}
