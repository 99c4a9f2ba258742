//! The engine task: the single owner of the [`Engine`] and the state machine.
//!
//! It receives every input over one channel, steps the engine, and executes the
//! actions in order (see the engine's "driver's contract"): durable operations are
//! awaited before the next action runs, appends are issued at once and awaited off
//! the critical path, sends go to per-peer senders, replies complete the callers'
//! oneshots. No lock is held across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant as TokioInstant, MissedTickBehavior};

use super::futures::FutureSet;
use super::peers::{spawn_control, wal_sender, PeerLink};
use super::{stopped_health, Input, NodeStatus, Shared};
use crate::engine::{Action, ClientId, Engine, Event};
use crate::error::{Error, StorageError};
use crate::log_store::{LogStore, Snapshot};
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

/// One peer as the engine task sees it.
struct PeerHandle<T: Transport> {
    link: Arc<PeerLink<T>>,
    wal: mpsc::UnboundedSender<Envelope<Request>>,
    task: JoinHandle<()>,
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
    since_snapshot: u64,
    /// The state machine's empty state, for [`Action::ResetStateMachine`].
    empty_state: Option<Vec<u8>>,
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
    pub(super) empty_state: Option<Vec<u8>>,
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
            empty_state,
            seed,
        } = parts;
        let mut peers = HashMap::new();
        for member in &shared.cfg.peers {
            let link = Arc::new(PeerLink::new(
                member.clone(),
                Arc::clone(&transport),
                Arc::clone(&shared),
                &shared.cfg,
                seed,
            ));
            let (wal, queue) = mpsc::unbounded_channel();
            let task = tokio::spawn(wal_sender(Arc::clone(&link), queue, inputs.clone()));
            peers.insert(member.id, PeerHandle { link, wal, task });
        }
        Core {
            engine,
            sm,
            store,
            transport,
            shared,
            origin,
            peers,
            inputs,
            next_client: 1,
            writes: HashMap::new(),
            reads: HashMap::new(),
            admins: HashMap::new(),
            responders: HashMap::new(),
            outputs: BTreeMap::new(),
            since_snapshot: 0,
            empty_state,
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
        let mut appends: Appends<'_> = FutureSet::new();
        let mut ticker = tokio::time::interval(self.shared.cfg.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut deferred: Option<Input> = None;
        loop {
            let input = match deferred.take() {
                Some(input) => input,
                None => tokio::select! {
                    biased;
                    done = poll_fn(|cx| appends.poll_prefix(cx)), if !appends.is_empty() => {
                        let pos = done?;
                        self.step(store, &mut appends, Event::Persisted(pos)).await?;
                        continue;
                    }
                    _ = ticker.tick() => {
                        self.on_tick();
                        self.step(store, &mut appends, Event::Tick).await?;
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
                    self.step(store, &mut appends, Event::ClientWrites(writes))
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
                    self.step(store, &mut appends, Event::ClientRead(id))
                        .await?;
                }
                Input::Admin { admin, reply } => {
                    let id = self.next_client_id();
                    self.admins.insert(id, reply);
                    self.step(store, &mut appends, Event::Admin(id, admin))
                        .await?;
                }
                Input::PeerRequest { request, reply } => {
                    // A newer request under the same id (a restarted peer) replaces
                    // the old one, whose handler then answers with a timeout.
                    self.responders
                        .insert((request.from, request.request_id), reply);
                    self.step(store, &mut appends, Event::Request(request))
                        .await?;
                }
                Input::PeerResponse(response) => {
                    self.step(store, &mut appends, Event::Response(response))
                        .await?;
                }
            }
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
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

    /// Steps the engine with `event` and executes what it asks, in order; events
    /// that executing produces (a snapshot taken) are stepped afterwards.
    async fn step<'s>(
        &mut self,
        store: &'s L,
        appends: &mut Appends<'s>,
        event: Event,
    ) -> Result<(), StorageError> {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let now = self.now();
            self.engine.step(now, event);
            for action in self.engine.take_actions() {
                self.execute(store, appends, action, &mut queue).await?;
            }
        }
        self.publish();
        Ok(())
    }

    async fn execute<'s>(
        &mut self,
        store: &'s L,
        appends: &mut Appends<'s>,
        action: Action,
        follow_up: &mut VecDeque<Event>,
    ) -> Result<(), StorageError> {
        match action {
            Action::PersistHardState(hs) => durable(appends, store.save_hard_state(hs)).await?,
            Action::Append(entries) => {
                if let Some(last) = entries.last().map(|e| e.position) {
                    // Issued now (the store orders operations at call time); its
                    // fsync overlaps whatever the engine does next.
                    appends.push(last, Box::pin(store.append(entries)));
                }
            }
            Action::Truncate(from) => {
                durable(appends, store.truncate_suffix(from)).await?;
                self.outputs.split_off(&from);
            }
            Action::InstallSnapshot(snapshot) => {
                let (index, data) = (snapshot.last_included.index, snapshot.data.clone());
                durable(appends, store.install_snapshot(snapshot)).await?;
                self.sm.restore(index, &data)?;
                self.outputs.clear();
                self.since_snapshot = 0;
            }
            Action::ResetStateMachine => {
                let Some(empty) = self.empty_state.as_ref() else {
                    return Err(StorageError::Invalid(
                        "the engine asked to reset the state machine, but its empty state is unknown \
                         (it had applied entries before the driver started)"
                            .into(),
                    ));
                };
                self.sm.restore(LogIndex::ZERO, empty)?;
                self.outputs.clear();
                self.since_snapshot = 0;
            }
            Action::RestoreStateMachine(snapshot) => {
                self.sm
                    .restore(snapshot.last_included.index, &snapshot.data)?;
                self.outputs.clear();
                self.since_snapshot = 0;
            }
            Action::ResetLog => {
                // An empty snapshot at position zero replaces the old one, then every
                // entry goes: the store holds an empty log.
                let empty = Snapshot {
                    last_included: Position::ZERO,
                    data: self.empty_state.clone().unwrap_or_default(),
                };
                durable(appends, store.install_snapshot(empty)).await?;
                durable(appends, store.truncate_suffix(LogIndex(1))).await?;
                self.outputs.clear();
                self.since_snapshot = 0;
            }
            Action::Compact(upto) => durable(appends, store.purge_prefix(upto)).await?,
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
            Action::Apply(entries) => self.apply(store, appends, entries, follow_up).await?,
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
                // The sender task only ends when the engine task drops this handle.
                let _ = peer.wal.send(request);
            }
            Channel::Control => spawn_control(Arc::clone(&peer.link), request, self.inputs.clone()),
        }
    }

    async fn apply<'s>(
        &mut self,
        store: &'s L,
        appends: &mut Appends<'s>,
        entries: Vec<WalEntry>,
        follow_up: &mut VecDeque<Event>,
    ) -> Result<(), StorageError> {
        let mut last = None;
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
            match &entry.payload {
                Payload::Noop => self.sm.apply_noop(index),
                Payload::Command(command) => {
                    let output = self.sm.apply(index, command);
                    // Only a waiting client can claim an output.
                    if !self.writes.is_empty() {
                        self.outputs.insert(index, output);
                    }
                }
            }
            self.since_snapshot += 1;
            last = Some(entry.position);
        }
        if self.since_snapshot >= self.shared.cfg.snapshot_every {
            if let Some(pos) = last.filter(|p| p.index == self.sm.applied_index()) {
                let snapshot = Snapshot {
                    last_included: pos,
                    data: self.sm.snapshot()?,
                };
                durable(appends, store.save_snapshot(snapshot.clone())).await?;
                self.since_snapshot = 0;
                self.shared.counters.bump_snapshot();
                tracing::debug!(node = %self.shared.cfg.node_id, position = %pos, "snapshot taken");
                follow_up.push_back(Event::SnapshotTaken(snapshot));
            }
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
        for (_, peer) in self.peers.drain() {
            peer.task.abort();
            peer.link.close();
        }
        let health = stopped_health(&self.shared.cfg, &self.engine.health(self.now()));
        self.shared
            .status
            .send_replace(NodeStatus::from_health(&health, false));
        *self.shared.health.write() = health;
        self.transport.close().await;
    }
}

/// Awaits a durable store operation while the pending appends keep making progress
/// (their completions are recorded and reported by the main loop).
async fn durable<'s, F>(appends: &mut Appends<'s>, op: F) -> Result<(), StorageError>
where
    F: Future<Output = Result<(), StorageError>>,
{
    let mut op = pin!(op);
    poll_fn(|cx| {
        appends.poll_progress(cx);
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
