//! The one executor of engine actions, shared by the tokio driver and the
//! simulator.
//!
//! An [`Executor`] owns the [`Engine`] and the [`StateMachine`], holds the
//! [`LogStore`], and runs the engine's actions in order over them and over a
//! [`Host`]: the host supplies the inputs (ticks, client requests, peer messages),
//! the clock, and carries out what leaves the node (sends, responses, client
//! answers). The tokio driver's host is a channel, a timer and the transport's
//! per-peer senders; the simulator's host is its virtual network and clock. The
//! rules below therefore hold, and are checked, in both.
//!
//! # The rules it enforces
//! - **Order.** Actions run in the order the engine emitted them.
//! - **Durable before what depends on it.** [`Action::PersistHardState`],
//!   [`Action::Truncate`], [`Action::InstallSnapshot`], [`Action::ResetLog`] are
//!   awaited (durable) before the next action runs, so every message that depends
//!   on durable state leaves after it is durable. Appends are issued at once (the
//!   store orders operations at call time) and awaited in the background, then
//!   reported as [`Event::Persisted`], so the primary's own fsync overlaps sending
//!   to the standby. [`Action::Compact`] is issued at once too and awaited in the
//!   background: nothing depends on a purge having finished, and a purge (deleting
//!   files) must not stall the engine.
//! - **The lease where an answer leaves.** A write acknowledgement or a read
//!   answer is sent only if the engine still holds its lease at that moment: a pause
//!   (or a slow durable action before it) can fall between the engine deciding and
//!   the answer leaving (protocol.md, "Fencing").
//! - **Snapshots.** The engine decides when ([`Action::TakeSnapshot`]); the executor
//!   captures the state machine and saves it in the background, and reports the
//!   save with [`Event::SnapshotTaken`] once durable. A save overtaken by a
//!   replacement of the state machine or the log (a snapshot installed or restored,
//!   an async-mode rewind or reset) is superseded: never reported, and a rewind
//!   puts back the snapshot the engine rewound to, so the store's snapshot never
//!   covers entries that are being discarded.
//! - **Exactly once.** Committed entries reach the state machine in order; an entry
//!   it already holds (a state machine that persists its own state) is skipped, a
//!   gap is a storage error.
//!
//! A storage error stops [`Executor::run`]: the node never continues on a store it
//! cannot trust.

mod background;
pub(crate) mod futures;
mod mutations;

/// Test-only rule switches: public with the `testkit` feature only.
#[cfg(feature = "testkit")]
pub use self::mutations::ExecutorMutations;
#[cfg(not(feature = "testkit"))]
pub(crate) use self::mutations::ExecutorMutations;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::poll_fn;
use std::io::Write;
use std::sync::Arc;
use std::task::{Context, Poll};

use self::background::{
    durable, Background, Finished, PendingRead, PendingSnapshotRead, SavePhase, SnapshotSave,
};
use self::futures::BoxFut;
use crate::engine::{Action, Admin, ClientId, Engine, Event};
use crate::error::{Error, StorageError};
use crate::log_store::{LogStore, Snapshot, SnapshotWriter};
use crate::message::{Envelope, Request, Response};
use crate::replicator::{ReadConsistency, WriteAck};
use crate::state_machine::{StateCapture, StateMachine};
use crate::transport::BoxFuture;
use crate::types::{
    Command, Instant, LogIndex, MemberKind, Payload, Position, Role, Term, WalEntry,
};

/// An input to the executor, from its [`Host`].
#[derive(Clone, Debug)]
pub enum Input {
    /// The tick timer fired.
    Tick,
    /// Client writes, queued together (one engine step: group commit).
    Writes(Vec<(ClientId, Command)>),
    /// A client read.
    Read {
        /// Echoed in [`Host::read_done`].
        id: ClientId,
        /// The query for [`StateMachine::query`].
        query: Vec<u8>,
        /// Linearizable (through the engine) or stale (the local state at once).
        consistency: ReadConsistency,
    },
    /// An operator request.
    Admin(ClientId, Admin),
    /// A request from a peer; its answer goes to [`Host::respond`].
    Request(Envelope<Request>),
    /// A response to a request this node sent.
    Response(Envelope<Response>),
}

/// Something worth counting or logging that the executor saw.
#[derive(Clone, Copy, Debug)]
pub enum Notice<'a> {
    /// The node's role, term or known primary changed.
    RoleChanged {
        /// The new role.
        role: Role,
        /// The current term.
        term: Term,
        /// The primary it follows, if known.
        leader: Option<crate::types::NodeId>,
    },
    /// Acknowledged writes were discarded by a failover (async mode).
    Discarded(&'a [Position]),
    /// A cluster event the engine reported.
    Observed(&'a crate::observe::Observation),
    /// A snapshot of the local state machine is durable.
    SnapshotSaved(Position),
    /// A snapshot received from the primary was installed.
    SnapshotInstalled(Position),
    /// An append of this many entries was issued to the store.
    Appended(usize),
    /// A read of the durable log for a lagging peer finished (or failed).
    CatchUpRead(Result<(), &'a StorageError>),
}

/// What an executor runs on: its inputs, its clock and its outputs.
///
/// # Contract
/// - `poll_input` yields inputs in arrival order; `Ready(None)` stops the
///   executor.
/// - `now` is monotonic.
/// - `poll_resume` is polled before every action: a host that returns `Pending`
///   suspends the executor there until it wakes it (the simulator does, to model a
///   process descheduled, paused or killed between two actions). The tokio driver
///   is always ready.
/// - The output methods never block.
pub trait Host {
    /// The engine's clock.
    fn now(&self) -> Instant;

    /// The next input, if one is waiting.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<Option<Input>>;

    /// Whether the executor may run its next action now.
    fn poll_resume(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let _ = cx;
        Poll::Ready(())
    }

    /// Called after every engine step, before its actions run: the engine's state
    /// as it now is (for published status, and for the simulator's checker).
    fn stepped(&mut self, engine: &Engine);

    /// Sends a request to a peer; its response comes back as
    /// [`Input::Response`] (or not at all: the engine retries by itself).
    fn send(&mut self, request: Envelope<Request>);

    /// Answers a peer's request.
    fn respond(&mut self, response: Envelope<Response>);

    /// A client write finished.
    fn write_done(&mut self, id: ClientId, result: Result<WriteAck, Error>);

    /// A client read finished.
    fn read_done(&mut self, id: ClientId, result: Result<Vec<u8>, Error>);

    /// An operator request finished.
    fn admin_done(&mut self, id: ClientId, result: Result<(), Error>);

    /// Something to count or log.
    fn notice(&mut self, notice: Notice<'_>);

    /// Runs `job` away from the executor's task (it may be slow: a snapshot's
    /// serialization) and resolves with its result. The tokio driver runs it on a
    /// blocking thread; the simulator runs it at once.
    fn offload(&mut self, job: SnapshotJob) -> BoxFuture<Result<Snapshot, StorageError>>;
}

/// A snapshot's serialization, handed to [`Host::offload`]: it streams a capture
/// into the log store's snapshot writer and resolves with the finished snapshot.
pub type SnapshotJob = Box<dyn FnOnce() -> Result<Snapshot, StorageError> + Send>;

/// Runs one engine's actions over a log store, a state machine and a host. See
/// the module docs.
pub struct Executor<L: LogStore, S: StateMachine, H: Host> {
    engine: Engine,
    sm: S,
    store: Arc<L>,
    host: H,
    /// Writes the engine has not answered yet.
    writes: HashSet<ClientId>,
    /// Linearizable reads waiting for the engine, with their queries.
    reads: HashMap<ClientId, Vec<u8>>,
    /// Outputs of applied commands, until their client is answered.
    outputs: BTreeMap<LogIndex, Vec<u8>>,
    /// The snapshot arriving from the primary, written chunk by chunk.
    receiving: Option<(Snapshot, Box<dyn SnapshotWriter>)>,
    /// The snapshot received whole and finished, until it is installed.
    received: Option<Snapshot>,
    mutations: ExecutorMutations,
}

/// What the run loop does next.
enum Next {
    Finished(Result<Finished, StorageError>),
    Input(Option<Input>),
}

impl<L: LogStore, S: StateMachine, H: Host> Executor<L, S, H> {
    /// An executor for `engine` (built from the store's durable state) and `sm`
    /// (brought up to the store's snapshot, or further if it persists its own
    /// state).
    pub fn new(engine: Engine, sm: S, store: Arc<L>, host: H) -> Self {
        Executor {
            engine,
            sm,
            store,
            host,
            writes: HashSet::new(),
            reads: HashMap::new(),
            outputs: BTreeMap::new(),
            receiving: None,
            received: None,
            mutations: ExecutorMutations::default(),
        }
    }

    /// Switches executor rules off, for mutation tests only.
    #[cfg(feature = "testkit")]
    pub fn set_mutations(&mut self, m: ExecutorMutations) {
        self.mutations = m;
    }

    /// Shows the host the engine's state ([`Host::stepped`]) before any input,
    /// so a status is published from the start.
    pub fn publish(&mut self) {
        self.host.stepped(&self.engine);
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The host.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The host, mutably.
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Runs until the host has no more inputs (`Ok`) or the store fails (`Err`).
    /// Dropping the future stops it at its current action, as a killed process
    /// would stop.
    pub async fn run(&mut self) -> Result<(), StorageError> {
        let store = Arc::clone(&self.store);
        let store: &L = &store;
        let mut bg = Background::new(Box::new(move |snap| {
            let save: BoxFut<'_, _> = Box::pin(store.save_snapshot(snap));
            save
        }));
        loop {
            let next = poll_fn(|cx| {
                if !bg.is_idle() {
                    if let Poll::Ready(done) = bg.poll_finished(cx) {
                        return Poll::Ready(Next::Finished(done));
                    }
                }
                self.host.poll_input(cx).map(Next::Input)
            })
            .await;
            match next {
                Next::Finished(done) => self.finished(store, &mut bg, done?).await?,
                Next::Input(Some(input)) => self.input(store, &mut bg, input).await?,
                Next::Input(None) => return Ok(()),
            }
        }
    }

    async fn finished<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        done: Finished,
    ) -> Result<(), StorageError> {
        match done {
            Finished::Persisted(pos) => self.step(store, bg, Event::Persisted(pos)).await,
            Finished::SnapshotSaved(None) => {
                // Whatever replaced the state machine voided it; the engine
                // already knows (it emitted the replacement).
                Ok(())
            }
            Finished::SnapshotSaved(Some(snapshot)) => {
                self.host
                    .notice(Notice::SnapshotSaved(snapshot.last_included));
                self.step(store, bg, Event::SnapshotTaken(snapshot)).await
            }
            Finished::EntriesRead { read_id, result } => {
                self.host
                    .notice(Notice::CatchUpRead(result.as_ref().map(|_| ())));
                self.step(store, bg, Event::EntriesRead { read_id, result })
                    .await
            }
            Finished::SnapshotRead { read_id, result } => {
                self.step(store, bg, Event::SnapshotRead { read_id, result })
                    .await
            }
        }
    }

    async fn input<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        input: Input,
    ) -> Result<(), StorageError> {
        let event = match input {
            Input::Tick => Event::Tick,
            Input::Writes(writes) => {
                self.writes.extend(writes.iter().map(|(id, _)| *id));
                Event::ClientWrites(writes)
            }
            Input::Read {
                id,
                query,
                consistency: ReadConsistency::Stale,
            } => {
                let answer = if self.engine.config().kind == MemberKind::Witness {
                    Err(Error::Rejected("the witness holds no data".into()))
                } else {
                    Ok(self.sm.query(&query))
                };
                self.host.read_done(id, answer);
                return Ok(());
            }
            Input::Read {
                id,
                query,
                consistency: ReadConsistency::Linearizable,
            } => {
                self.reads.insert(id, query);
                Event::ClientRead(id)
            }
            Input::Admin(id, admin) => Event::Admin(id, admin),
            Input::Request(request) => Event::Request(request),
            Input::Response(response) => Event::Response(response),
        };
        self.step(store, bg, event).await
    }

    /// Steps the engine with `event` and executes what it asks, in order.
    async fn step<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        event: Event,
    ) -> Result<(), StorageError> {
        let now = self.host.now();
        self.engine.step(now, event);
        self.host.stepped(&self.engine);
        let mut actions = self.engine.take_actions();
        if self.mutations.send_before_durable {
            send_before_durable(&mut actions);
        }
        for action in actions {
            // An observation only tells the host: a pause before it is the same
            // as one after it, so it is no suspension point (and adding one
            // leaves the simulator's schedules as they were).
            if !matches!(action, Action::Observe(_)) {
                poll_fn(|cx| self.host.poll_resume(cx)).await;
            }
            self.execute(store, bg, action).await?;
        }
        Ok(())
    }

    async fn execute<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        action: Action,
    ) -> Result<(), StorageError> {
        match action {
            Action::PersistHardState(hs) => durable(bg, store.save_hard_state(hs)).await?,
            Action::Append(entries) => {
                if let Some(last) = entries.last().map(|e| e.position) {
                    self.host.notice(Notice::Appended(entries.len()));
                    // Issued now (the store orders operations at call time); its
                    // fsync overlaps whatever the engine does next.
                    bg.appends.push(last, Box::pin(store.append(entries)));
                }
            }
            Action::Truncate(from) => {
                durable(bg, store.truncate_suffix(from)).await?;
                self.outputs.split_off(&from);
            }
            Action::StageSnapshot {
                snapshot,
                offset,
                data,
                done,
            } => self.stage_snapshot(store, snapshot, offset, &data, done)?,
            Action::InstallSnapshot(snapshot) => {
                if self.received.take() != Some(snapshot) {
                    return Err(StorageError::Invalid(format!(
                        "the engine installs the snapshot at {} ({} bytes), which was not received whole",
                        snapshot.last_included, snapshot.size
                    )));
                }
                // Ordered after any pending save, so the store ends up with this one.
                bg.supersede_snapshots();
                durable(bg, store.install_snapshot(snapshot)).await?;
                self.restore_from(store, snapshot)?;
                self.outputs.clear();
                self.host
                    .notice(Notice::SnapshotInstalled(snapshot.last_included));
            }
            Action::ResetStateMachine => {
                self.sm.reset();
                if bg.supersede_snapshots() {
                    // The pending save holds entries the engine is discarding; put
                    // back what the engine rewinds to (no snapshot: the empty state
                    // at position zero), or the store would keep the discarded state
                    // (and refuse to truncate below it).
                    let empty = self.write_empty(store)?;
                    durable(bg, store.save_snapshot(empty)).await?;
                }
                self.outputs.clear();
            }
            Action::RestoreStateMachine(snapshot) => {
                self.restore_from(store, snapshot)?;
                if bg.supersede_snapshots() {
                    // As above: the store's snapshot goes back to the one the engine
                    // rewinds to (the store keeps it: it is the one before).
                    durable(bg, store.save_snapshot(snapshot)).await?;
                }
                self.outputs.clear();
            }
            Action::ResetLog => {
                bg.supersede_snapshots();
                // An empty snapshot at position zero replaces the old one, then every
                // entry goes: the store holds an empty log. The state machine was
                // just reset ([`Action::ResetStateMachine`] always comes first), so
                // its snapshot is the empty state.
                let empty = self.write_empty(store)?;
                durable(bg, store.install_snapshot(empty)).await?;
                durable(bg, store.truncate_suffix(LogIndex(1))).await?;
                self.outputs.clear();
            }
            Action::Compact { upto, keep_from } => {
                // The store's retention policy keeps entries for a lagging standby;
                // never past the snapshot.
                // Nor past what a persistent state machine has made durable.
                let to = store.purge_point(upto, keep_from).min(upto);
                let to = self.sm.durable_index().map_or(to, |d| to.min(d));
                if to > LogIndex::ZERO {
                    bg.purges.push(Box::pin(store.purge_prefix(to)));
                }
            }
            Action::TakeSnapshot(at) => self.take_snapshot(store, bg, at)?,
            Action::ReadSnapshot {
                read_id,
                snapshot,
                offset,
                max_bytes,
            } => bg.snapshot_reads.push(PendingSnapshotRead {
                read_id,
                running: Box::pin(store.read_snapshot(snapshot, offset, max_bytes)),
            }),
            Action::ReadEntries {
                read_id,
                next,
                max_entries,
                max_bytes,
            } => {
                // Issued now (ordered after every earlier operation), awaited off
                // the critical path.
                bg.reads.push(PendingRead {
                    read_id,
                    running: Box::pin(store.read_batch(next, max_entries, max_bytes)),
                });
            }
            Action::Send(request) => self.host.send(request),
            Action::Respond(response) => self.host.respond(response),
            Action::Apply(entries) => self.apply(entries)?,
            Action::WriteDone(id, result) => {
                let result = self.recheck_lease(result);
                self.write_done(id, result);
            }
            Action::ReadReady(id, result) => {
                let result = self.recheck_lease(result);
                if let Some(query) = self.reads.remove(&id) {
                    let answer = result.map(|_term| self.sm.query(&query));
                    self.host.read_done(id, answer);
                }
            }
            Action::AdminDone(id, result) => self.host.admin_done(id, result),
            Action::Discarded(positions) => self.host.notice(Notice::Discarded(&positions)),
            Action::Observe(o) => self.host.notice(Notice::Observed(&o)),
            Action::RoleChanged { role, term, leader } => {
                self.host.notice(Notice::RoleChanged { role, term, leader })
            }
        }
        Ok(())
    }

    /// Captures the state machine at `at` (the last entry applied) and starts
    /// saving it; the save is reported once durable.
    fn take_snapshot<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        at: Position,
    ) -> Result<(), StorageError> {
        let applied = self.sm.applied_index();
        if applied != at.index {
            return Err(StorageError::Invalid(format!(
                "the engine asked for a snapshot at {at} but the state machine applied up to {applied}"
            )));
        }
        // The capture is cheap (the state machine's contract); streaming it into
        // the store happens off this task, so no tick, heartbeat or ack waits
        // behind a snapshot.
        let mut writer = store.snapshot_writer(at)?;
        let capture = self.sm.capture();
        let serializing = self.host.offload(Box::new(move || {
            capture.write_to(&mut *writer)?;
            writer.finish()
        }));
        bg.snapshots.push_back(SnapshotSave {
            stale: false,
            phase: SavePhase::Serializing(serializing),
        });
        Ok(())
    }

    /// Writes the (just reset, empty) state machine as the snapshot at position
    /// zero. Small: it runs here.
    fn write_empty(&mut self, store: &L) -> Result<Snapshot, StorageError> {
        let mut writer = store.snapshot_writer(Position::ZERO)?;
        self.sm.capture().write_to(&mut *writer)?;
        writer.finish()
    }

    /// Restores the state machine from a snapshot the store keeps, streamed.
    fn restore_from(&mut self, store: &L, snapshot: Snapshot) -> Result<(), StorageError> {
        let mut reader = store.snapshot_reader(snapshot)?;
        self.sm.restore(snapshot.last_included.index, &mut *reader)
    }

    /// Writes a chunk of the snapshot arriving from the primary; the engine sends
    /// them in order, from offset 0 (which starts the snapshot over).
    fn stage_snapshot(
        &mut self,
        store: &L,
        snapshot: Snapshot,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> Result<(), StorageError> {
        if offset == 0 {
            self.received = None;
            self.receiving = Some((snapshot, store.snapshot_writer(snapshot.last_included)?));
        }
        let Some((_, writer)) = self
            .receiving
            .as_mut()
            .filter(|(s, w)| *s == snapshot && w.written() == offset)
        else {
            return Err(StorageError::Invalid(format!(
                "a chunk at offset {offset} of the snapshot at {} does not follow what was written",
                snapshot.last_included
            )));
        };
        writer
            .write_all(data)
            .map_err(|e| StorageError::Io(format!("writing a received snapshot: {e}")))?;
        if done {
            if let Some((_, writer)) = self.receiving.take() {
                let finished = writer.finish()?;
                if finished != snapshot {
                    return Err(StorageError::Invalid(format!(
                        "the received snapshot at {} has {} bytes, announced {}",
                        snapshot.last_included, finished.size, snapshot.size
                    )));
                }
                self.received = Some(finished);
            }
        }
        Ok(())
    }

    /// Applies committed entries in order, exactly once.
    fn apply(&mut self, entries: Vec<WalEntry>) -> Result<(), StorageError> {
        for entry in entries {
            let index = entry.index();
            let applied = self.sm.applied_index();
            if index <= applied {
                // A persistent state machine already holds it.
                continue;
            }
            if index != applied.next() {
                return Err(StorageError::Invalid(format!(
                    "state machine applied up to {applied} but the next committed entry is {index}"
                )));
            }
            // The entry's term is the fencing token of the primary that wrote it.
            match &entry.payload {
                Payload::Noop => self.sm.apply_noop(entry.position),
                Payload::Command(command) => {
                    let output = self.sm.apply(entry.position, command);
                    // Only a waiting client can claim an output.
                    if !self.writes.is_empty() {
                        self.outputs.insert(index, output);
                    }
                }
            }
        }
        Ok(())
    }

    /// The engine decided under a lease, but a pause (or a slow durable action
    /// before this one) can fall between deciding and answering: check the lease
    /// again at the moment of answering (protocol.md, "Fencing"). A write
    /// refused here is committed but unacknowledged: its outcome is unknown to the
    /// client, as with a timeout.
    fn recheck_lease<R>(&self, result: Result<R, Error>) -> Result<R, Error> {
        match result {
            Ok(_)
                if !self.mutations.no_lease_recheck && !self.engine.has_lease(self.host.now()) =>
            {
                Err(Error::Timeout)
            }
            other => other,
        }
    }

    fn write_done(&mut self, id: ClientId, result: Result<Position, Error>) {
        self.writes.remove(&id);
        let answer = result.map(|position| {
            let output = self.outputs.remove(&position.index).unwrap_or_default();
            // Writes are acknowledged in index order: nobody waits for a lower
            // index any more.
            self.outputs = self.outputs.split_off(&position.index);
            WriteAck {
                position,
                term: position.term,
                output,
            }
        });
        if self.writes.is_empty() {
            self.outputs.clear();
        }
        self.host.write_done(id, answer);
    }
}

/// The `send_before_durable` mutation: moves the first hard-state write behind
/// the first send or response that follows it.
fn send_before_durable(actions: &mut Vec<Action>) {
    let Some(i) = actions
        .iter()
        .position(|a| matches!(a, Action::PersistHardState(_)))
    else {
        return;
    };
    let Some(j) = actions[i + 1..]
        .iter()
        .position(|a| matches!(a, Action::Send(_) | Action::Respond(_)))
    else {
        return;
    };
    let persist = actions.remove(i);
    actions.insert(i + j + 1, persist);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::test_request;
    use crate::types::HardState;

    fn send(id: u64) -> Action {
        Action::Send(test_request(id))
    }

    #[test]
    fn the_reorder_mutation_moves_the_first_persist_behind_the_next_send() {
        let persist = Action::PersistHardState(HardState::bootstrap());
        let mut actions = vec![
            send(1),
            persist.clone(),
            Action::Truncate(LogIndex(3)),
            send(2),
            send(3),
        ];
        send_before_durable(&mut actions);
        assert_eq!(
            actions,
            vec![
                send(1),
                Action::Truncate(LogIndex(3)),
                send(2),
                persist,
                send(3)
            ]
        );
        let mut alone = vec![Action::PersistHardState(HardState::bootstrap())];
        send_before_durable(&mut alone);
        assert_eq!(alone.len(), 1, "nothing to reorder without a later send");
    }
}
