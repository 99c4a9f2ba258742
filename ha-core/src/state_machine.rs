//! The contract of what the replicated log drives.

use std::io::{Read, Write};

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
/// - `capture` takes a consistent capture of the state after the last applied
///   entry, and must be cheap whatever the state's size: it runs on the engine
///   task, where nothing may wait behind it (no tick, heartbeat or ack). A clone of
///   a persistent (structurally shared) map, a copy-on-write handle or a read
///   transaction qualifies; copying or serializing the whole state does not. The
///   capture's [`StateCapture::write_to`] streams it into the log store off the
///   engine task (on a blocking thread in the tokio driver) while later entries
///   are applied, and must not see them. `restore` replaces the whole state with
///   a serialized capture read as a stream (neither needs the whole snapshot in
///   memory), and afterwards `applied_index` is the capture's; a restore that
///   fails leaves the state as it was or fails the node.
/// - `reset` replaces the whole state with the empty initial state (the state of a
///   new state machine); afterwards `applied_index` is 0. The driver uses it when an
///   async-mode failover discards entries that no local snapshot predates, and then
///   replays the log from the start.
pub trait StateMachine: Send + 'static {
    /// A consistent capture of the state, serialized off the engine task.
    type Capture: StateCapture;

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

    /// Captures the current state for a snapshot; cheap (see the contract above).
    fn capture(&self) -> Self::Capture;

    /// Replaces the whole state with a snapshot taken at `index`, read from
    /// `data` (to its end).
    fn restore(&mut self, index: LogIndex, data: &mut dyn Read) -> Result<(), StorageError>;

    /// Replaces the whole state with the empty initial state; afterwards
    /// `applied_index` is 0.
    fn reset(&mut self);

    /// For a persistent state machine whose durability lags what it applied: the
    /// last index it has made durable. The log is never compacted past it, so a
    /// restart always finds the entries it must re-apply. `None` (the default)
    /// for a state machine that keeps nothing across restarts.
    fn durable_index(&self) -> Option<LogIndex> {
        None
    }
}

/// A consistent capture of a [`StateMachine`]'s state ([`StateMachine::capture`]).
pub trait StateCapture: Send + 'static {
    /// Streams the captured state, serialized as [`StateMachine::restore`] reads
    /// it, into `out`. May be slow: it never runs on the engine task.
    fn write_to(self, out: &mut dyn Write) -> Result<(), StorageError>;
}

/// An already serialized state: for state machines whose state is small enough to
/// serialize in [`StateMachine::capture`] itself.
impl StateCapture for Vec<u8> {
    fn write_to(self, out: &mut dyn Write) -> Result<(), StorageError> {
        out.write_all(&self)
            .map_err(|e| StorageError::Io(format!("writing a snapshot: {e}")))
    }
}

/// Reads a whole (small) snapshot into memory: for state machines whose state is
/// small enough to decode at once (test models, the witness's empty state).
pub fn read_all(data: &mut dyn Read) -> Result<Vec<u8>, StorageError> {
    let mut buf = Vec::new();
    data.read_to_end(&mut buf)
        .map_err(|e| StorageError::Io(format!("reading a snapshot: {e}")))?;
    Ok(buf)
}
