//! The contract of what the replicated log drives.

use crate::error::StorageError;
use crate::types::{Command, LogIndex, Position};

/// The application state the log is replayed into (the embedded key-value store in
/// `ha-node`, a test model in the simulator).
///
/// # Contract
/// - `apply` is deterministic: the same commands in the same order give the same
///   state and outputs on every node. It is called once per committed entry, in
///   index order, with no gaps; an invalid command is an output, not a failure.
/// - Every entry arrives with its [`Position`]. `position.term` is the *fencing
///   token* of the primary that wrote the entry (protocol.md, "Fencing"):
///   terms only grow along the log, and a term names the one primary that could
///   write in it, so a state machine that guards an external resource can hand the
///   term on (or refuse effects carrying a lower one than it has seen).
/// - `snapshot` captures the state after the last applied entry; `restore` replaces
///   the whole state with one, and afterwards `applied_index` is the snapshot's.
/// - `reset` replaces the whole state with the empty initial state (the state of a
///   new state machine); afterwards `applied_index` is 0. The driver uses it when an
///   async-mode failover discards entries that no local snapshot predates, and then
///   replays the log from the start.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command and returns its output for the client.
    ///
    /// `position.index` is the entry's index; `position.term` is the fencing token of
    /// the primary that wrote it.
    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8>;

    /// Records that the no-op at `position` was applied (it changes no state). A new
    /// primary's no-op is the first entry of its term, so `position.term` is the
    /// new fencing token from here on.
    fn apply_noop(&mut self, position: Position);

    /// Answers a read-only query against the current state.
    fn query(&self, query: &[u8]) -> Vec<u8>;

    /// The index of the last entry applied.
    fn applied_index(&self) -> LogIndex;

    /// Serializes the current state.
    fn snapshot(&self) -> Result<Vec<u8>, StorageError>;

    /// Replaces the whole state with a snapshot taken at `index`.
    fn restore(&mut self, index: LogIndex, data: &[u8]) -> Result<(), StorageError>;

    /// Replaces the whole state with the empty initial state; afterwards
    /// `applied_index` is 0.
    fn reset(&mut self);
}
