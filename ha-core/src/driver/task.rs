//! The engine task: the single owner of the [`Engine`] and the state machine.
//!
//! It receives every input over one channel, steps the engine, and executes the
//! actions in order (see the engine's "driver's contract"): durable operations are
//! awaited before the next action runs, appends are issued at once and awaited off
//! the critical path, sends go to per-peer senders, replies complete the callers'
//! oneshots. No lock is held across an `.await`.
//!
//! # Snapshots
//! After a step whose actions applied enough entries, the task serializes the state
//! machine (on this task: it owns it) and *starts* saving the snapshot, but does not
//! wait for the save's fsync: the save is polled from the main loop alongside the
//! pending appends, and its completion is reported to the engine as
//! [`Event::SnapshotTaken`]. Ticks, heartbeats and client traffic go on meanwhile.
//! The store orders operations at call time, so later appends and truncations are
//! ordered after the save. At most one save is in flight. If the state machine or
//! the log is replaced while a save is pending (a snapshot installed or restored,
//! an async-mode rewind), the save is never reported, and a rewind saves the
//! snapshot the engine rewound to again, so the store's snapshot never covers
//! entries that are being discarded.

use std::collections::{BTreeMap, HashMap};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant as TokioInstant, MissedTickBehavior};

use super::futures::{BoxFut, FutureSet};
use super::peers::{spawn_control, wal_sender, PeerLink};
use super::{stopped_health, Input, NodeStatus, Shared};
use crate::config::Config;
use crate::engine::{Action, ClientId, Engine, Event};
use crate::error::{Error, StorageError};
use crate::log_store::{CatchUpBatch, LogStore, Snapshot};
use crate::message::{Channel, Envelope, Request, Response};
use crate::replicator::{ReadConsistency, WriteAck};
use crate::state_machine::StateMachine;
use crate::transport::Transport;
use crate::types::{Instant, LogIndex, MemberKind, NodeId, Payload, Position, WalEntry};

/// How many ticks between sweeps of callers that gave up waiting.
const PRUNE_EVERY_TICKS: u64 = 200;

type Appends<'s> = FutureSet<'s, Position, Result<(), StorageError>>;
type WriteReply = oneshot::Sender<Result<WriteAck, Error>>;
type ReadReply = oneshot::Sender<Result<Vec<u8>, Error>>;
type AdminReply = oneshot::Sender<Result<(), Error>>;

/// The capacity of a peer's WAL queue. The engine keeps at most
/// `max_inflight_batches` batches outstanding, but it resends lost ones on its own
/// timer, so retransmissions could otherwise pile up behind a slow peer.
pub(super) fn wal_queue_capacity(cfg: &Config) -> usize {
    cfg.max_inflight_batches.max(1).saturating_mul(2)
}

/// What became of a request offered to a peer's WAL queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Offered {
    /// Queued for the peer's sender task.
    Queued,
    /// The queue was full: dropped (the engine resends lost batches by itself).
    Dropped,
    /// The sender task is gone (the node is stopping).
    Closed,
}

/// Queues a WAL-channel request without ever waiting: a full queue drops it.
pub(super) fn offer_wal(
    queue: &mpsc::Sender<Envelope<Request>>,
    request: Envelope<Request>,
) -> Offered {
    match queue.try_send(request) {
        Ok(()) => Offered::Queued,
        Err(mpsc::error::TrySendError::Full(_)) => Offered::Dropped,
        Err(mpsc::error::TrySendError::Closed(_)) => Offered::Closed,
    }
}

/// One peer as the engine task sees it (its sender task lives in [`Core::tasks`]).
struct PeerHandle<T: Transport> {
    link: Arc<PeerLink<T>>,
    wal: mpsc::Sender<Envelope<Request>>,
}

/// A snapshot being saved.
struct SnapshotSave<'s> {
    snapshot: Snapshot,
    /// Set when the state machine or the log was replaced after the snapshot was
    /// taken: its completion is then not reported to the engine.
    stale: bool,
    /// The store's future until it resolves.
    running: Option<BoxFut<'s, Result<(), StorageError>>>,
    /// Its outcome once it resolved.
    outcome: Option<Result<(), StorageError>>,
}

/// A store operation that finished in the background.
enum Finished {
    /// Appends are durable up to this position.
    Persisted(Position),
    /// A snapshot save finished.
    SnapshotSaved { snapshot: Snapshot, stale: bool },
    /// A read for the engine ([`Action::ReadEntries`]) finished; its failure is
    /// the engine's to handle, not the node's.
    EntriesRead {
        read_id: u64,
        result: Result<CatchUpBatch, StorageError>,
    },
}

/// A read of the durable log for the engine.
struct PendingRead<'s> {
    read_id: u64,
    running: BoxFut<'s, Result<CatchUpBatch, StorageError>>,
}

/// The store operations the engine task issued and has not seen finish: appends,
/// and at most one snapshot save. They borrow the store.
struct Background<'s> {
    appends: Appends<'s>,
    snapshot: Option<SnapshotSave<'s>>,
    /// Reads for the engine; a handful at most (one per peer).
    reads: Vec<PendingRead<'s>>,
}

impl<'s> Background<'s> {
    fn new() -> Self {
        Background {
            appends: FutureSet::new(),
            snapshot: None,
            reads: Vec::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.appends.is_empty() && self.snapshot.is_none() && self.reads.is_empty()
    }

    /// Polls everything once, recording what finished (reported by `poll_finished`).
    fn poll_progress(&mut self, cx: &mut Context<'_>) {
        self.appends.poll_progress(cx);
        if let Some(save) = self.snapshot.as_mut() {
            if let Some(fut) = save.running.as_mut() {
                if let Poll::Ready(outcome) = fut.as_mut().poll(cx) {
                    save.running = None;
                    save.outcome = Some(outcome);
                }
            }
        }
    }

    /// Resolves with the next finished operation, or the first storage error.
    fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<Result<Finished, StorageError>> {
        if !self.appends.is_empty() {
            if let Poll::Ready(done) = self.appends.poll_prefix(cx) {
                return Poll::Ready(done.map(Finished::Persisted));
            }
        }
        self.poll_progress(cx);
        for k in 0..self.reads.len() {
            if let Poll::Ready(result) = self.reads[k].running.as_mut().poll(cx) {
                let read_id = self.reads.swap_remove(k).read_id;
                return Poll::Ready(Ok(Finished::EntriesRead { read_id, result }));
            }
        }
        let outcome = self.snapshot.as_mut().and_then(|save| save.outcome.take());
        match (outcome, self.snapshot.take()) {
            (Some(outcome), Some(save)) => Poll::Ready(outcome.map(|()| Finished::SnapshotSaved {
                snapshot: save.snapshot,
                stale: save.stale,
            })),
            (_, save) => {
                self.snapshot = save;
                Poll::Pending
            }
        }
    }

    /// Marks a pending snapshot save as superseded; true if one was pending and not
    /// already superseded.
    fn supersede_snapshot(&mut self) -> bool {
        match self.snapshot.as_mut() {
            Some(save) if !save.stale => {
                save.stale = true;
                true
            }
            _ => false,
        }
    }
}

/// Everything the engine task owns.
pub(super) struct Core<T: Transport, L: LogStore, S: StateMachine> {
    engine: Engine,
    sm: S,
    store: Arc<L>,
    transport: Arc<T>,
    shared: Arc<Shared>,
    origin: TokioInstant,
    peers: HashMap<NodeId, PeerHandle<T>>,
    /// The WAL sender tasks and the control-request tasks; all are aborted and
    /// awaited before the transport is closed.
    tasks: JoinSet<()>,
    /// A sender into this task's own channel, handed to the peer senders so they
    /// can feed responses back. The task itself never sends on it.
    inputs: mpsc::Sender<Input>,
    next_client: ClientId,
    writes: HashMap<ClientId, WriteReply>,
    reads: HashMap<ClientId, (Vec<u8>, ReadReply)>,
    admins: HashMap<ClientId, Option<AdminReply>>,
    responders: HashMap<(NodeId, u64), oneshot::Sender<Envelope<Response>>>,
    /// Outputs of applied commands, until their client is answered.
    outputs: BTreeMap<LogIndex, Vec<u8>>,
    /// Entries applied since the last snapshot was taken.
    since_snapshot: u64,
    /// The position of the last entry applied to the state machine by this task
    /// (or of the snapshot it was restored from): where a snapshot is taken.
    last_applied: Option<Position>,
    ticks: u64,
}

/// What [`Core::new`] needs.
pub(super) struct CoreParts<T, L, S> {
    pub(super) engine: Engine,
    pub(super) sm: S,
    pub(super) store: Arc<L>,
    pub(super) transport: Arc<T>,
    pub(super) shared: Arc<Shared>,
    pub(super) origin: TokioInstant,
    pub(super) inputs: mpsc::Sender<Input>,
    pub(super) seed: u64,
}

impl<T: Transport, L: LogStore, S: StateMachine> Core<T, L, S> {
    /// Builds the core and starts one WAL sender task per peer. Must run inside a
    /// tokio runtime.
    pub(super) fn new(parts: CoreParts<T, L, S>) -> Self {
        let CoreParts {
            engine,
            sm,
            store,
            transport,
            shared,
            origin,
            inputs,
            seed,
        } = parts;
        let mut peers = HashMap::new();
        let mut tasks = JoinSet::new();
        let (capacity, max_inflight) = (
            wal_queue_capacity(&shared.cfg),
            shared.cfg.max_inflight_batches,
        );
        for member in &shared.cfg.peers {
            let link = Arc::new(PeerLink::new(
                member.clone(),
                Arc::clone(&transport),
                Arc::clone(&shared),
                &shared.cfg,
                seed,
            ));
            let (wal, queue) = mpsc::channel(capacity);
            tasks.spawn(wal_sender(
                Arc::clone(&link),
                queue,
                inputs.clone(),
                max_inflight,
            ));
            peers.insert(member.id, PeerHandle { link, wal });
        }
        Core {
            engine,
            sm,
            store,
            transport,
            shared,
            origin,
            peers,
            tasks,
            inputs,
            next_client: 1,
            writes: HashMap::new(),
            reads: HashMap::new(),
            admins: HashMap::new(),
            responders: HashMap::new(),
            outputs: BTreeMap::new(),
            since_snapshot: 0,
            last_applied: None,
            ticks: 0,
        }
    }

    /// The engine's clock: nanoseconds since the driver started (tokio's clock, so a
    /// paused test clock drives it too).
    fn now(&self) -> Instant {
        let nanos = TokioInstant::now()
            .saturating_duration_since(self.origin)
            .as_nanos();
        Instant(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn next_client_id(&mut self) -> ClientId {
        let id = self.next_client;
        self.next_client += 1;
        id
    }

    /// Publishes the health snapshot and the known primary.
    pub(super) fn publish(&self) {
        let health = self.engine.health(self.now());
        let status = NodeStatus::from_health(&health, true);
        *self.shared.health.write() = health;
        self.shared.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    /// The main loop; returns only on a storage failure (the caller stops it for a
    /// shutdown by dropping this future).
    async fn run(&mut self, rx: &mut mpsc::Receiver<Input>) -> Result<(), StorageError> {
        let store = Arc::clone(&self.store);
        let store: &L = &store;
        let mut bg = Background::new();
        let mut ticker = tokio::time::interval(self.shared.cfg.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut deferred: Option<Input> = None;
        loop {
            let input = match deferred.take() {
                Some(input) => input,
                None => tokio::select! {
                    biased;
                    done = poll_fn(|cx| bg.poll_finished(cx)), if !bg.is_idle() => {
                        match done? {
                            Finished::Persisted(pos) => {
                                self.step(store, &mut bg, Event::Persisted(pos)).await?;
                            }
                            Finished::SnapshotSaved { snapshot, stale } => {
                                self.snapshot_saved(store, &mut bg, snapshot, stale).await?;
                            }
                            Finished::EntriesRead { read_id, result } => {
                                match &result {
                                    Ok(_) => self.shared.counters.bump_catch_up_read(),
                                    Err(e) => tracing::debug!(node = %self.shared.cfg.node_id, read_id, error = %e, "read of the durable log failed"),
                                }
                                let event = Event::EntriesRead { read_id, result };
                                self.step(store, &mut bg, event).await?;
                            }
                        }
                        continue;
                    }
                    _ = ticker.tick() => {
                        self.on_tick();
                        self.step(store, &mut bg, Event::Tick).await?;
                        continue;
                    }
                    input = rx.recv() => match input {
                        Some(input) => input,
                        // Unreachable while `self.inputs` lives; stop cleanly anyway.
                        None => return Ok(()),
                    },
                },
            };
            match input {
                Input::Writes(mut batch) => {
                    // Group commit: everything already queued goes into one batch.
                    loop {
                        match rx.try_recv() {
                            Ok(Input::Writes(more)) => batch.extend(more),
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let mut writes = Vec::with_capacity(batch.len());
                    for (command, reply) in batch {
                        let id = self.next_client_id();
                        self.writes.insert(id, reply);
                        writes.push((id, command));
                    }
                    self.step(store, &mut bg, Event::ClientWrites(writes))
                        .await?;
                }
                Input::Read {
                    query,
                    consistency: ReadConsistency::Stale,
                    reply,
                } => {
                    let result = if self.shared.cfg.kind == MemberKind::Witness {
                        Err(Error::Rejected("the witness holds no data".into()))
                    } else {
                        self.shared.counters.bump_stale_read();
                        Ok(self.sm.query(&query))
                    };
                    let _ = reply.send(result);
                }
                Input::Read {
                    query,
                    consistency: ReadConsistency::Linearizable,
                    reply,
                } => {
                    let id = self.next_client_id();
                    self.reads.insert(id, (query, reply));
                    self.step(store, &mut bg, Event::ClientRead(id)).await?;
                }
                Input::Admin { admin, reply } => {
                    let id = self.next_client_id();
                    self.admins.insert(id, reply);
                    self.step(store, &mut bg, Event::Admin(id, admin)).await?;
                }
                Input::PeerRequest { request, reply } => {
                    // A newer request under the same id (a restarted peer) replaces
                    // the old one, whose handler then answers with a timeout.
                    self.responders
                        .insert((request.from, request.request_id), reply);
                    self.step(store, &mut bg, Event::Request(request)).await?;
                }
                Input::PeerResponse(response) => {
                    self.step(store, &mut bg, Event::Response(response)).await?;
                }
            }
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        // Reap the control-request tasks that finished.
        while let Some(done) = self.tasks.try_join_next() {
            if let Err(e) = done {
                if e.is_panic() {
                    tracing::error!(node = %self.shared.cfg.node_id, error = %e, "a peer task panicked");
                }
            }
        }
        if self.ticks.is_multiple_of(PRUNE_EVERY_TICKS) {
            self.writes.retain(|_, r| !r.is_closed());
            self.reads.retain(|_, (_, r)| !r.is_closed());
            self.admins
                .retain(|_, r| r.as_ref().is_none_or(|r| !r.is_closed()));
            self.responders.retain(|_, r| !r.is_closed());
            if self.writes.is_empty() {
                self.outputs.clear();
            }
        }
    }

    /// Steps the engine with `event` and executes what it asks, in order; then,
    /// once every action ran, takes a snapshot if enough entries were applied.
    async fn step<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        event: Event,
    ) -> Result<(), StorageError> {
        let now = self.now();
        self.engine.step(now, event);
        for action in self.engine.take_actions() {
            self.execute(store, bg, action).await?;
        }
        self.maybe_snapshot(store, bg)?;
        self.publish();
        Ok(())
    }

    /// Takes a snapshot of the state machine and starts saving it, if enough
    /// entries were applied since the last one and no save is in flight. The save
    /// runs in the background; [`Self::snapshot_saved`] reports it to the engine.
    fn maybe_snapshot<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
    ) -> Result<(), StorageError> {
        if self.since_snapshot < self.shared.cfg.snapshot_every || bg.snapshot.is_some() {
            return Ok(());
        }
        let applied = self.sm.applied_index();
        let Some(pos) = self.last_applied.filter(|p| p.index == applied) else {
            return Ok(());
        };
        let snapshot = Snapshot {
            last_included: pos,
            data: self.sm.snapshot()?,
        };
        self.since_snapshot = 0;
        tracing::debug!(node = %self.shared.cfg.node_id, position = %pos, "snapshot taken; saving it");
        // Issued now: the store orders it before every later operation.
        let running: BoxFut<'s, _> = Box::pin(store.save_snapshot(snapshot.clone()));
        bg.snapshot = Some(SnapshotSave {
            snapshot,
            stale: false,
            running: Some(running),
            outcome: None,
        });
        Ok(())
    }

    /// A snapshot save finished: the engine learns of it (and may compact the log).
    async fn snapshot_saved<'s>(
        &mut self,
        store: &'s L,
        bg: &mut Background<'s>,
        snapshot: Snapshot,
        stale: bool,
    ) -> Result<(), StorageError> {
        let pos = snapshot.last_included;
        if stale {
            tracing::debug!(node = %self.shared.cfg.node_id, position = %pos, "snapshot saved after its state was replaced; not reported");
            // Whatever replaced it reset the count; a later step takes a new one.
            return Ok(());
        }
        self.shared.counters.bump_snapshot();
        tracing::debug!(node = %self.shared.cfg.node_id, position = %pos, "snapshot saved");
        self.step(store, bg, Event::SnapshotTaken(snapshot)).await
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
                    // Issued now (the store orders operations at call time); its
                    // fsync overlaps whatever the engine does next.
                    bg.appends.push(last, Box::pin(store.append(entries)));
                }
            }
            Action::Truncate(from) => {
                durable(bg, store.truncate_suffix(from)).await?;
                self.outputs.split_off(&from);
            }
            Action::InstallSnapshot(snapshot) => {
                // Ordered after any pending save, so the store ends up with this one.
                bg.supersede_snapshot();
                let (pos, data) = (snapshot.last_included, snapshot.data.clone());
                durable(bg, store.install_snapshot(snapshot)).await?;
                self.sm.restore(pos.index, &data)?;
                self.shared.counters.bump_snapshot_installed();
                self.state_replaced(Some(pos));
            }
            Action::ResetStateMachine => {
                self.sm.reset();
                if bg.supersede_snapshot() {
                    // The pending save holds entries the engine is discarding; put
                    // back what the engine rewinds to (no snapshot: the empty state
                    // at position zero), or the store would keep the discarded state
                    // (and refuse to truncate below it).
                    let empty = Snapshot {
                        last_included: Position::ZERO,
                        data: self.sm.snapshot()?,
                    };
                    durable(bg, store.save_snapshot(empty)).await?;
                }
                self.state_replaced(None);
            }
            Action::RestoreStateMachine(snapshot) => {
                let pos = snapshot.last_included;
                self.sm.restore(pos.index, &snapshot.data)?;
                if bg.supersede_snapshot() {
                    // As above: the store's snapshot goes back to the one the engine
                    // rewinds to.
                    durable(bg, store.save_snapshot(snapshot)).await?;
                }
                self.state_replaced(Some(pos));
            }
            Action::ResetLog => {
                bg.supersede_snapshot();
                // An empty snapshot at position zero replaces the old one, then every
                // entry goes: the store holds an empty log. The state machine was
                // just reset ([`Action::ResetStateMachine`] always comes first), so
                // its snapshot is the empty state.
                let empty = Snapshot {
                    last_included: Position::ZERO,
                    data: self.sm.snapshot()?,
                };
                durable(bg, store.install_snapshot(empty)).await?;
                durable(bg, store.truncate_suffix(LogIndex(1))).await?;
                self.state_replaced(None);
            }
            Action::Compact { upto, keep_from } => {
                // The store's retention policy keeps entries for a lagging standby;
                // never past the snapshot.
                let to = store.purge_point(upto, keep_from).min(upto);
                if to > LogIndex::ZERO {
                    durable(bg, store.purge_prefix(to)).await?;
                }
            }
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
            Action::Send(request) => self.send(request),
            Action::Respond(response) => {
                match self.responders.remove(&(response.to, response.request_id)) {
                    Some(reply) => {
                        let _ = reply.send(response);
                    }
                    None => tracing::debug!(
                        node = %self.shared.cfg.node_id,
                        to = %response.to,
                        request_id = response.request_id,
                        "response has no waiting handler (it timed out)"
                    ),
                }
            }
            Action::Apply(entries) => self.apply(entries)?,
            Action::WriteDone(id, result) => {
                let result = self.recheck_lease(result);
                self.write_done(id, result)
            }
            Action::ReadReady(id, result) => {
                let result = self.recheck_lease(result);
                if let Some((query, reply)) = self.reads.remove(&id) {
                    let answer = result.map(|_term| self.sm.query(&query));
                    if answer.is_ok() {
                        self.shared.counters.bump_read();
                    }
                    let _ = reply.send(answer);
                }
            }
            Action::AdminDone(id, result) => {
                if let Some(Some(reply)) = self.admins.remove(&id) {
                    let _ = reply.send(result);
                } else if let Err(e) = result {
                    tracing::warn!(node = %self.shared.cfg.node_id, error = %e, "operator request failed");
                }
            }
            Action::Discarded(positions) => {
                tracing::warn!(
                    node = %self.shared.cfg.node_id,
                    count = positions.len(),
                    first = ?positions.first(),
                    last = ?positions.last(),
                    "acknowledged writes were discarded by a failover (async commit mode)"
                );
                self.shared.counters.add_discarded(positions.len() as u64);
            }
            Action::RoleChanged { role, term, leader } => {
                tracing::info!(node = %self.shared.cfg.node_id, %role, %term, ?leader, "role changed");
                self.shared.counters.bump_role_change();
            }
        }
        Ok(())
    }

    fn send(&mut self, request: Envelope<Request>) {
        let Some(peer) = self.peers.get(&request.to) else {
            tracing::warn!(node = %self.shared.cfg.node_id, to = %request.to, "send to an unknown peer dropped");
            return;
        };
        match request.body.channel() {
            Channel::Wal => {
                let (to, request_id, kind) = (request.to, request.request_id, request.body.kind());
                match offer_wal(&peer.wal, request) {
                    Offered::Queued => {}
                    Offered::Dropped => tracing::debug!(
                        node = %self.shared.cfg.node_id,
                        %to,
                        request_id,
                        kind,
                        "WAL queue full; request dropped (the engine resends it)"
                    ),
                    // The sender task only ends when the node stops.
                    Offered::Closed => {}
                }
            }
            Channel::Control => spawn_control(
                &mut self.tasks,
                Arc::clone(&peer.link),
                request,
                self.inputs.clone(),
            ),
        }
    }

    /// The state machine was replaced (restored, reset or installed): outputs of
    /// the old state are void and the snapshot count starts over.
    fn state_replaced(&mut self, at: Option<Position>) {
        self.outputs.clear();
        self.since_snapshot = 0;
        self.last_applied = at;
    }

    /// Applies committed entries in order. A snapshot, if due, is taken only after
    /// the whole step (see [`Self::maybe_snapshot`]), never between entries.
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
            self.since_snapshot += 1;
            self.last_applied = Some(entry.position);
        }
        Ok(())
    }

    /// The engine decided under a lease, but a pause (or a slow durable action
    /// before this one) can fall between deciding and answering: check the lease
    /// again at the moment of answering (DESIGN.md section 3, "Fencing"). A write
    /// refused here is committed but unacknowledged: its outcome is unknown to the
    /// client, as with a timeout.
    fn recheck_lease<R>(&self, result: Result<R, Error>) -> Result<R, Error> {
        match result {
            Ok(_) if !self.engine.has_lease(self.now()) => Err(Error::Timeout),
            other => other,
        }
    }

    fn write_done(&mut self, id: ClientId, result: Result<Position, Error>) {
        let reply = self.writes.remove(&id);
        let answer = match result {
            Ok(position) => {
                let output = self.outputs.remove(&position.index).unwrap_or_default();
                // Writes are acknowledged in index order: nobody waits for a lower
                // index any more.
                self.outputs = self.outputs.split_off(&position.index);
                self.shared.counters.bump_write_acked();
                Ok(WriteAck {
                    position,
                    term: position.term,
                    output,
                })
            }
            Err(e) => {
                self.shared.counters.bump_write_failed();
                Err(e)
            }
        };
        if self.writes.is_empty() {
            self.outputs.clear();
        }
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }

    /// Fails everything still waiting, stops the peer senders, publishes a stopped
    /// status and closes the transport.
    async fn stop(mut self, rx: &mut mpsc::Receiver<Input>, err: Error) {
        rx.close();
        while let Ok(input) = rx.try_recv() {
            fail_input(input, &err);
        }
        for (_, reply) in self.writes.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, (_, reply)) in self.reads.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, reply) in self.admins.drain() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(err.clone()));
            }
        }
        // Dropping the responders makes their handlers answer `ShuttingDown`.
        self.responders.clear();
        // Every peer task stops (and is awaited) before the transport closes, so
        // none reaches the transport after it was closed.
        let links: Vec<_> = self.peers.drain().map(|(_, peer)| peer.link).collect();
        self.tasks.abort_all();
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                if e.is_panic() {
                    tracing::error!(node = %self.shared.cfg.node_id, error = %e, "a peer task panicked");
                }
            }
        }
        for link in links {
            link.close();
        }
        let health = stopped_health(&self.shared.cfg, &self.engine.health(self.now()));
        self.shared
            .status
            .send_replace(NodeStatus::from_health(&health, false));
        *self.shared.health.write() = health;
        self.transport.close().await;
    }
}

/// Awaits a durable store operation while the pending appends and snapshot save
/// keep making progress (their completions are recorded and reported by the main
/// loop).
async fn durable<'s, F>(bg: &mut Background<'s>, op: F) -> Result<(), StorageError>
where
    F: Future<Output = Result<(), StorageError>>,
{
    let mut op = pin!(op);
    poll_fn(|cx| {
        bg.poll_progress(cx);
        match op.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn fail_input(input: Input, err: &Error) {
    match input {
        Input::Writes(batch) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(err.clone()));
            }
        }
        Input::Read { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Input::Admin { reply, .. } => {
            if let Some(reply) = reply {
                let _ = reply.send(Err(err.clone()));
            }
        }
        // Dropped: the handler answers `ShuttingDown`.
        Input::PeerRequest { .. } | Input::PeerResponse(_) => {}
    }
}

/// The engine task: runs the core until shutdown or a storage failure, then fails
/// whatever is pending (with [`Error::Closed`] or [`Error::Storage`]).
pub(super) async fn run_engine<T: Transport, L: LogStore, S: StateMachine>(
    mut core: Core<T, L, S>,
    mut rx: mpsc::Receiver<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let result = {
        let run = core.run(&mut rx);
        tokio::select! {
            biased;
            // A dropped sender (every `Node` handle gone) also stops the task.
            _ = stop.wait_for(|s| *s) => Ok(()),
            r = run => r,
        }
    };
    let err = match result {
        Ok(()) => Error::Closed,
        Err(e) => {
            let msg = e.to_string();
            tracing::error!(node = %core.shared.cfg.node_id, error = %msg, "storage failure: the node stops");
            *core.shared.failure.lock() = Some(msg.clone());
            Error::Storage(msg)
        }
    };
    core.stop(&mut rx, err).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Member;
    use crate::message::Fence;
    use crate::types::Term;

    fn request(id: u64) -> Envelope<Request> {
        Envelope {
            from: NodeId(1),
            to: NodeId(2),
            term: Term::ZERO,
            request_id: id,
            body: Request::Fence(Fence {
                reason: "test".into(),
            }),
        }
    }

    #[test]
    fn the_wal_queue_holds_twice_the_window() {
        let peer = Member {
            id: NodeId(2),
            addr: "b".into(),
            kind: MemberKind::Data,
        };
        let mut cfg = Config::new(NodeId(1), MemberKind::Data, "a", vec![peer]);
        cfg.max_inflight_batches = 8;
        assert_eq!(wal_queue_capacity(&cfg), 16);
        cfg.max_inflight_batches = 0;
        assert_eq!(
            wal_queue_capacity(&cfg),
            2,
            "never zero (a channel needs room)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_wal_queue_drops_new_requests_instead_of_waiting() {
        let (tx, mut rx) = mpsc::channel(2);
        assert_eq!(offer_wal(&tx, request(1)), Offered::Queued);
        assert_eq!(offer_wal(&tx, request(2)), Offered::Queued);
        // Full: the newest is dropped at once; what is queued stays, in order.
        assert_eq!(offer_wal(&tx, request(3)), Offered::Dropped);
        assert_eq!(rx.recv().await.map(|r| r.request_id), Some(1));
        assert_eq!(offer_wal(&tx, request(4)), Offered::Queued);
        assert_eq!(rx.recv().await.map(|r| r.request_id), Some(2));
        assert_eq!(rx.recv().await.map(|r| r.request_id), Some(4));
        drop(rx);
        assert_eq!(offer_wal(&tx, request(5)), Offered::Closed);
    }
}
