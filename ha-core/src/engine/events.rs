//! What goes into the engine ([`Event`], [`Admin`], [`InitialState`]) and what
//! comes out ([`Action`]), and the test-only rule switches ([`Mutations`]).

use super::ClientId;
use crate::error::{Error, StorageError};
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::message::{Envelope, Request, Response};
use crate::types::{Command, HardState, LogIndex, NodeId, Position, Role, Term, WalEntry};

/// Something that happened, fed to [`Engine::step`](super::Engine::step).
#[derive(Clone, Debug)]
pub enum Event {
    /// Time passed. Drivers tick every `tick_interval`.
    Tick,
    /// A request from a peer (already authenticated by the transport).
    Request(Envelope<Request>),
    /// A response to a request this engine sent.
    Response(Envelope<Response>),
    /// Client writes to replicate.
    ClientWrites(Vec<(ClientId, Command)>),
    /// A linearizable read: answered with [`Action::ReadReady`] once it may be served.
    ClientRead(ClientId),
    /// The log store made entries durable up to this position.
    Persisted(Position),
    /// The snapshot asked for by [`Action::TakeSnapshot`] is durable in the log
    /// store.
    SnapshotTaken(Snapshot),
    /// An operator's request.
    Admin(ClientId, Admin),
    /// The answer to [`Action::ReadEntries`] with the same `read_id`: the batch
    /// read from the durable log, or why it could not be read (purged, I/O).
    EntriesRead {
        /// The id the action carried.
        read_id: u64,
        /// The batch, or the failure.
        result: Result<CatchUpBatch, StorageError>,
    },
    /// The answer to [`Action::ReadSnapshot`] with the same `read_id`: the
    /// chunk's bytes, or why they could not be read (the snapshot replaced, I/O).
    SnapshotRead {
        /// The id the action carried.
        read_id: u64,
        /// The chunk, or the failure.
        result: Result<Vec<u8>, StorageError>,
    },
}

/// Operator requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    /// Run an election now (still needs a majority).
    Promote,
    /// Become primary without a majority. May lose acknowledged writes.
    ForcePromote,
    /// Hand over to the caught-up standby with zero loss.
    Switchover,
    /// Do not start elections on this node's own timer.
    PauseFailover,
    /// Undo `PauseFailover`.
    ResumeFailover,
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replace the hard state durably before executing any later action.
    PersistHardState(HardState),
    /// Append entries to the log store; report [`Event::Persisted`] when durable.
    Append(Vec<WalEntry>),
    /// Remove log entries with index `>= from`, durably.
    Truncate(LogIndex),
    /// Write a chunk of a snapshot arriving from the primary into the log store:
    /// the chunks come in order from offset 0 (a chunk at offset 0 starts the
    /// snapshot over, discarding what was written); the last (`done`) finishes
    /// it, and [`Action::InstallSnapshot`] follows.
    StageSnapshot {
        /// The snapshot the chunk belongs to (its position and whole size).
        snapshot: Snapshot,
        /// Where the chunk starts.
        offset: u64,
        /// The chunk's bytes.
        data: Vec<u8>,
        /// The last chunk.
        done: bool,
    },
    /// Replace log and state machine with the snapshot received from the primary
    /// (written by [`Action::StageSnapshot`]).
    InstallSnapshot(Snapshot),
    /// Reset the state machine to its empty initial state; the engine then replays
    /// the log with [`Action::Apply`] (async-mode rewind after a failover).
    ResetStateMachine,
    /// Restore the state machine (not the log) from this local snapshot; the engine
    /// then replays the log after it (async-mode rewind after a failover).
    RestoreStateMachine(Snapshot),
    /// Drop the whole log and snapshot: the store then holds an empty log at
    /// position zero (async mode, when a failover discarded entries that the local
    /// snapshot already holds; the node then resyncs from the primary). Always
    /// preceded by [`Action::ResetStateMachine`].
    ResetLog,
    /// A durable snapshot covers the entries up to and including `upto`: the log
    /// store may purge them, keeping what its retention policy keeps for a lagging
    /// standby, which needs the entries from `keep_from` on (`None`: no standby to
    /// keep entries for). See [`crate::log_store::LogStore::purge_point`].
    Compact {
        /// The snapshot's index: nothing after it may be purged.
        upto: LogIndex,
        /// The standby's match index, if this node leads one: the last entry it is
        /// known to hold, whose position the next batch names as `prev`.
        keep_from: Option<LogIndex>,
    },
    /// Capture the state machine's state after the entry at this position (the
    /// last one applied: every [`Action::Apply`] before it ran), save it to the log
    /// store as the snapshot, and report it with [`Event::SnapshotTaken`] once it
    /// is durable. The engine asks every `snapshot_every` applied entries, one at a
    /// time; a snapshot overtaken by a replacement of the state machine
    /// ([`Action::InstallSnapshot`], [`Action::ResetStateMachine`],
    /// [`Action::RestoreStateMachine`]) is never reported.
    TakeSnapshot(Position),
    /// Read a catch-up batch from the durable log
    /// ([`crate::log_store::LogStore::read_batch`]) and report it with
    /// [`Event::EntriesRead`]: the engine streams from there to a peer that needs
    /// entries older than its in-memory log.
    ReadEntries {
        /// Echoed in [`Event::EntriesRead`].
        read_id: u64,
        /// The peer's next needed index: the batch starts there.
        next: LogIndex,
        /// At most this many entries.
        max_entries: usize,
        /// The byte bound (by [`WalEntry::approx_size`]).
        max_bytes: usize,
    },
    /// Read a chunk of a kept snapshot for a peer
    /// ([`crate::log_store::LogStore::read_snapshot`]) and report it with
    /// [`Event::SnapshotRead`].
    ReadSnapshot {
        /// Echoed in [`Event::SnapshotRead`].
        read_id: u64,
        /// The snapshot.
        snapshot: Snapshot,
        /// Where the chunk starts.
        offset: u64,
        /// At most this many bytes.
        max_bytes: usize,
    },
    /// Send a request to a peer; deliver its response as [`Event::Response`].
    Send(Envelope<Request>),
    /// Answer a request received from a peer.
    Respond(Envelope<Response>),
    /// Apply committed entries to the state machine, in order.
    Apply(Vec<WalEntry>),
    /// A client write finished: committed at this position (whose term is the
    /// fencing token), or failed.
    WriteDone(ClientId, Result<Position, Error>),
    /// A linearizable read may be served from the state machine now, or failed.
    ReadReady(ClientId, Result<Term, Error>),
    /// An operator request finished.
    AdminDone(ClientId, Result<(), Error>),
    /// Writes this node had acknowledged (async mode) were discarded by a failover.
    /// When the divergence reaches into the local snapshot, the snapshot's
    /// position stands for the discarded entries it holds (their count is then a
    /// lower bound).
    Discarded(Vec<Position>),
    /// A cluster event worth counting, logging and keeping in a history
    /// (elections and votes, fences, switchovers, snapshots).
    Observe(crate::observe::Observation),
    /// The node's role, term or known primary changed.
    RoleChanged {
        /// The new role.
        role: Role,
        /// The current term.
        term: Term,
        /// The primary it follows, if known.
        leader: Option<NodeId>,
    },
}

/// Rules that tests can switch off to prove the simulator's checker catches the
/// violation. Every field is `false` in production; the setter exists only with the
/// `testkit` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// The primary behaves as if it always held a lease.
    pub no_lease: bool,
    /// The witness votes without checking the candidate's floor.
    pub witness_skips_floor_check: bool,
    /// Messages with a stale term are processed as if current.
    pub accept_stale_terms: bool,
    /// The primary acknowledges writes after its own fsync alone.
    pub ack_before_standby_persists: bool,
    /// A standby keeps its own entry instead of truncating a conflicting suffix.
    pub no_truncate_on_conflict: bool,
    /// Data nodes grant votes without the up-to-date check.
    pub vote_without_log_check: bool,
    /// The lease is the bound it must stay below (`failover_timeout × (1 −
    /// ρ)/(1 + ρ)`, without the tick) stretched by this many parts per million
    /// (0: the correct lease).
    pub lease_overshoot_ppm: u32,
    /// A restarted node campaigns and votes at once, without the start-up window.
    pub no_startup_window: bool,
    /// The witness sets a floor to whatever a raise asks, lower or not.
    pub witness_floor_may_decrease: bool,
    /// `sync-apply` acknowledges writes once the standby holds them durably, as
    /// `sync` does, without waiting for it to apply them.
    pub sync_apply_skips_apply_wait: bool,
    /// A new primary serves reads before its no-op is applied.
    pub read_before_noop: bool,
    /// Async mode commits what the standby has not acked without a witness floor.
    pub async_commit_without_floor: bool,
    /// A primary without a lease for an election timeout neither steps down nor
    /// stops heartbeating (so its standby never takes over).
    pub never_step_down: bool,
    /// A switchover sends TimeoutNow without waiting for the target to catch up,
    /// the target campaigns without checking it holds the primary's last entry,
    /// and the handing-over primary votes for it without checking its log.
    pub transfer_without_catch_up: bool,
}

/// What the engine needs from durable storage at start-up.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// The stored hard state (for a fresh node: [`HardState::bootstrap`] or
    /// [`HardState::joining`], already persisted by the driver).
    pub hard_state: HardState,
    /// The stored snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The stored entries after the snapshot.
    pub entries: Vec<WalEntry>,
    /// The index the state machine has applied up to: the snapshot's for a state
    /// machine restored from it, further for one that persists its own state (its
    /// applied entries were committed, and are not applied again). Counted from the
    /// snapshot when lower; clipped to the log's last entry (the driver refuses to
    /// start a state machine that is ahead of its log).
    pub applied: LogIndex,
}
