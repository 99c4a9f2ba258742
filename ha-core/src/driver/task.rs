//! The engine task: the tokio [`Host`] of the shared [`Executor`], which owns the
//! [`Engine`] and the state machine.
//!
//! Every input reaches the task over one channel (client writes, everything queued
//! together drained into one batch: group commit; reads; operator commands; peer
//! requests and responses); ticks come from a `tokio::time::interval`. The
//! executor runs the engine's actions in order (see [`crate::executor`]); this
//! host carries out what leaves the node: sends go to per-peer senders, replies
//! complete the callers' oneshots, and the health snapshot is published after
//! a step that changed its headline (role, term, primary, writability) and
//! otherwise once per tick. No lock is held across an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant as TokioInstant, Interval, MissedTickBehavior};

use super::peers::{spawn_control, wal_sender, PeerLink};
use super::{stopped_health, Input, Shared};
use crate::config::Config;
use crate::engine::{ClientId, Engine};
use crate::error::{Error, StorageError};
use crate::executor::{self, Executor, Host, Notice, SnapshotJob};
use crate::log_store::{LogStore, Snapshot};
use crate::message::{Channel, Envelope, Request, Response};
use crate::observe::{Observation, Observed};
use crate::replicator::{ReadConsistency, WriteAck};
use crate::state_machine::StateMachine;
use crate::transport::{BoxFuture, Transport};
use crate::types::{Instant, NodeId};

/// How many ticks between sweeps of callers that gave up waiting.
const PRUNE_EVERY_TICKS: u64 = 200;

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

/// One peer as the engine task sees it (its sender task lives in
/// [`TokioHost::tasks`]).
struct PeerHandle<T: Transport> {
    link: Arc<PeerLink<T>>,
    wal: mpsc::Sender<Envelope<Request>>,
}

/// The engine task's host: its channel and timer, the peers' senders, and the
/// callers waiting for answers.
pub(super) struct TokioHost<T: Transport> {
    transport: Arc<T>,
    shared: Arc<Shared>,
    origin: TokioInstant,
    rx: mpsc::Receiver<Input>,
    ticker: Interval,
    /// An input taken from the channel while draining writes, served next.
    deferred: Option<Input>,
    peers: HashMap<NodeId, PeerHandle<T>>,
    /// The WAL sender tasks and the control-request tasks; all are aborted and
    /// awaited before the transport is closed.
    tasks: JoinSet<()>,
    /// A sender into this task's own channel, handed to the peer senders so they
    /// can feed responses back. The task itself never sends on it.
    inputs: mpsc::Sender<Input>,
    next_client: ClientId,
    writes: HashMap<ClientId, WriteReply>,
    reads: HashMap<ClientId, (ReadConsistency, ReadReply)>,
    admins: HashMap<ClientId, Option<AdminReply>>,
    responders: HashMap<(NodeId, u64), oneshot::Sender<Envelope<Response>>>,
    ticks: u64,
    /// What the last published status said of role, term, primary and
    /// writability; `None` before the first.
    headline: Option<Headline>,
    /// Set by every tick: the next step publishes the whole status (positions,
    /// peers' contact) even if the headline did not change.
    status_due: bool,
    /// The primary last reported by a role change (leader changes are counted).
    last_leader: Option<NodeId>,
}

/// The part of a node's status that callers wait on (a new primary, a lost
/// lease): published after the step that changed it. The rest (indices, peer
/// contact) changes with nearly every step and is published once per tick, so a
/// step under load does not rebuild the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Headline {
    role: crate::types::Role,
    term: crate::types::Term,
    leader: Option<NodeId>,
    writable: bool,
    degraded: bool,
    failover_paused: bool,
}

impl Headline {
    fn of(engine: &Engine, now: Instant) -> Self {
        Headline {
            role: engine.role(),
            term: engine.term(),
            leader: engine.leader(),
            writable: engine.writable(now),
            degraded: engine.degraded(),
            failover_paused: engine.failover_paused(),
        }
    }
}

/// What [`TokioHost::new`] needs.
pub(super) struct HostParts<T> {
    pub(super) transport: Arc<T>,
    pub(super) shared: Arc<Shared>,
    pub(super) origin: TokioInstant,
    pub(super) rx: mpsc::Receiver<Input>,
    pub(super) inputs: mpsc::Sender<Input>,
    pub(super) seed: u64,
}

impl<T: Transport> TokioHost<T> {
    /// Builds the host and starts one WAL sender task per peer. Must run inside a
    /// tokio runtime.
    pub(super) fn new(parts: HostParts<T>) -> Self {
        let HostParts {
            transport,
            shared,
            origin,
            rx,
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
        let mut ticker = tokio::time::interval(shared.cfg.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        TokioHost {
            transport,
            shared,
            origin,
            rx,
            ticker,
            deferred: None,
            peers,
            tasks,
            inputs,
            next_client: 1,
            writes: HashMap::new(),
            reads: HashMap::new(),
            admins: HashMap::new(),
            responders: HashMap::new(),
            ticks: 0,
            headline: None,
            status_due: true,
            last_leader: None,
        }
    }

    fn next_client_id(&mut self) -> ClientId {
        let id = self.next_client;
        self.next_client += 1;
        id
    }

    /// Registers the caller of a channel input and turns it into the executor's.
    fn admit(&mut self, input: Input) -> Option<executor::Input> {
        Some(match input {
            Input::Writes(mut batch) => {
                // Group commit: everything already queued goes into one batch.
                loop {
                    match self.rx.try_recv() {
                        Ok(Input::Writes(more)) => batch.extend(more),
                        Ok(other) => {
                            self.deferred = Some(other);
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
                executor::Input::Writes(writes)
            }
            Input::Read {
                query,
                consistency,
                reply,
            } => {
                let id = self.next_client_id();
                self.reads.insert(id, (consistency, reply));
                executor::Input::Read {
                    id,
                    query,
                    consistency,
                }
            }
            Input::Admin { admin, reply } => {
                let id = self.next_client_id();
                self.admins.insert(id, reply);
                executor::Input::Admin(id, admin)
            }
            Input::PeerRequest { request, reply } => {
                // A newer request under the same id (a restarted peer) replaces
                // the old one, whose handler then answers with a timeout.
                self.responders
                    .insert((request.from, request.request_id), reply);
                executor::Input::Request(request)
            }
            Input::PeerResponse(response) => executor::Input::Response(response),
        })
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.status_due = true;
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
        }
    }

    /// Counts `o`, logs it (if `log`) and hands it to the subscribers.
    fn observe(&mut self, o: Observation, log: bool) {
        if log {
            super::observing::log(self.shared.cfg.node_id, &o);
        }
        self.shared.counters.observed(&o);
        // Nobody listening is fine.
        let _ = self.shared.observations.send(Observed::now(o));
    }

    /// Publishes the health snapshot if its headline changed or a tick passed.
    fn publish(&mut self, engine: &Engine) {
        let now = self.now();
        let headline = Headline::of(engine, now);
        if !self.status_due && self.headline == Some(headline) {
            return;
        }
        if let Some(before) = self.headline {
            if before.degraded != headline.degraded {
                let term = headline.term;
                self.observe(
                    if headline.degraded {
                        Observation::DegradedEntered { term }
                    } else {
                        Observation::DegradedExited { term }
                    },
                    true,
                );
            }
            if before.failover_paused != headline.failover_paused {
                let paused = headline.failover_paused;
                self.observe(Observation::FailoverPaused { paused }, true);
            }
        }
        self.status_due = false;
        self.headline = Some(headline);
        let health = engine.health(now);
        self.shared.status.send_if_modified(|s| {
            let changed = *s != health;
            if changed {
                *s = health;
            }
            changed
        });
    }
}

impl<T: Transport> Host for TokioHost<T> {
    /// Nanoseconds since the driver started (tokio's clock, so a paused test clock
    /// drives it too).
    fn now(&self) -> Instant {
        let nanos = TokioInstant::now()
            .saturating_duration_since(self.origin)
            .as_nanos();
        Instant(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<Option<executor::Input>> {
        if let Some(input) = self.deferred.take() {
            return Poll::Ready(self.admit(input));
        }
        if let Poll::Ready(scheduled) = self.ticker.poll_tick(cx) {
            // Polled only while the executor waits for input: a slow step shows
            // here as a late tick.
            let late = TokioInstant::now().saturating_duration_since(scheduled);
            self.shared.counters.record_tick_lateness(late);
            self.on_tick();
            return Poll::Ready(Some(executor::Input::Tick));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(input)) => Poll::Ready(self.admit(input)),
            // Unreachable while `self.inputs` lives; stop cleanly anyway.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn stepped(&mut self, engine: &Engine) {
        self.publish(engine);
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

    fn respond(&mut self, response: Envelope<Response>) {
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

    fn write_done(&mut self, id: ClientId, result: Result<WriteAck, Error>) {
        match &result {
            Ok(_) => self.shared.counters.bump_write_acked(),
            Err(_) => self.shared.counters.bump_write_failed(),
        }
        if let Some(reply) = self.writes.remove(&id) {
            let _ = reply.send(result);
        }
    }

    fn read_done(&mut self, id: ClientId, result: Result<Vec<u8>, Error>) {
        if let Some((consistency, reply)) = self.reads.remove(&id) {
            if result.is_ok() {
                match consistency {
                    ReadConsistency::Linearizable => self.shared.counters.bump_read(),
                    ReadConsistency::Stale => self.shared.counters.bump_stale_read(),
                }
            }
            let _ = reply.send(result);
        }
    }

    fn admin_done(&mut self, id: ClientId, result: Result<(), Error>) {
        if let Some(Some(reply)) = self.admins.remove(&id) {
            let _ = reply.send(result);
        } else if let Err(e) = result {
            tracing::warn!(node = %self.shared.cfg.node_id, error = %e, "operator request failed");
        }
    }

    fn notice(&mut self, notice: Notice<'_>) {
        let node = self.shared.cfg.node_id;
        match notice {
            Notice::RoleChanged { role, term, leader } => {
                self.shared.counters.bump_role_change();
                if leader.is_some() && leader != self.last_leader {
                    self.shared.counters.leader_changed();
                }
                self.last_leader = leader;
                self.observe(Observation::RoleChanged { role, term, leader }, true);
            }
            Notice::Observed(o) => self.observe(o.clone(), true),
            Notice::Discarded(positions) => {
                tracing::warn!(
                    %node,
                    count = positions.len(),
                    first = ?positions.first(),
                    last = ?positions.last(),
                    "acknowledged writes were discarded by a failover (async commit mode)"
                );
                self.shared.counters.add_discarded(positions.len() as u64);
                let count = positions.len() as u64;
                self.observe(Observation::WritesDiscarded { count }, false);
            }
            Notice::SnapshotSaved(pos) => {
                tracing::debug!(%node, position = %pos, "snapshot saved");
                self.shared.counters.bump_snapshot();
            }
            Notice::SnapshotInstalled(pos) => {
                tracing::info!(%node, position = %pos, "snapshot installed");
                self.shared.counters.bump_snapshot_installed();
            }
            Notice::Appended(entries) => self.shared.counters.add_append(entries as u64),
            Notice::CatchUpRead(Ok(())) => self.shared.counters.bump_catch_up_read(),
            Notice::CatchUpRead(Err(e)) => {
                tracing::debug!(%node, error = %e, "read of the durable log failed")
            }
        }
    }

    /// On a thread of its own, at a lower CPU priority, waited for from one of
    /// tokio's blocking threads: a snapshot's serialization must hold up neither
    /// the engine task nor (on a machine with few cores) its timers' share of
    /// the CPU.
    fn offload(&mut self, job: SnapshotJob) -> BoxFuture<Result<Snapshot, StorageError>> {
        let running = tokio::task::spawn_blocking(move || serialize_at_low_priority(job));
        Box::pin(async move {
            running.await.unwrap_or_else(|e| {
                Err(StorageError::Io(format!(
                    "the snapshot serialization did not finish: {e}"
                )))
            })
        })
    }
}

/// The driver's executor.
pub(super) type Core<T, L, S> = Executor<L, S, TokioHost<T>>;

/// Fails everything still waiting, stops the peer senders, publishes a stopped
/// status and closes the transport.
async fn stop<T: Transport, L: LogStore, S: StateMachine>(core: &mut Core<T, L, S>, err: Error) {
    let last = {
        let engine = core.engine();
        engine.health(core.host().now())
    };
    let host = core.host_mut();
    host.rx.close();
    if let Some(input) = host.deferred.take() {
        fail_input(input, &err);
    }
    while let Ok(input) = host.rx.try_recv() {
        fail_input(input, &err);
    }
    for (_, reply) in host.writes.drain() {
        let _ = reply.send(Err(err.clone()));
    }
    for (_, (_, reply)) in host.reads.drain() {
        let _ = reply.send(Err(err.clone()));
    }
    for (_, reply) in host.admins.drain() {
        if let Some(reply) = reply {
            let _ = reply.send(Err(err.clone()));
        }
    }
    // Dropping the responders makes their handlers answer `ShuttingDown`.
    host.responders.clear();
    // Every peer task stops (and is awaited) before the transport closes, so
    // none reaches the transport after it was closed.
    let links: Vec<_> = host.peers.drain().map(|(_, peer)| peer.link).collect();
    host.tasks.abort_all();
    while let Some(done) = host.tasks.join_next().await {
        if let Err(e) = done {
            if e.is_panic() {
                tracing::error!(node = %host.shared.cfg.node_id, error = %e, "a peer task panicked");
            }
        }
    }
    for link in links {
        link.close();
    }
    let health = stopped_health(&host.shared.cfg, &last);
    host.shared.status.send_replace(health);
    host.transport.close().await;
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

/// The engine task: runs the executor until shutdown or a storage failure, then
/// fails whatever is pending (with [`Error::Closed`] or [`Error::Storage`]).
pub(super) async fn run_engine<T: Transport, L: LogStore, S: StateMachine>(
    mut core: Core<T, L, S>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let result: Result<(), StorageError> = {
        let run = core.run();
        tokio::select! {
            biased;
            // A dropped sender (every `Node` handle gone) also stops the task.
            _ = stop_rx.wait_for(|s| *s) => Ok(()),
            r = run => r,
        }
    };
    let shared = Arc::clone(&core.host().shared);
    let err = match result {
        Ok(()) => Error::Closed,
        Err(e) => {
            let msg = e.to_string();
            tracing::error!(node = %shared.cfg.node_id, error = %msg, "storage failure: the node stops");
            *shared.failure.lock() = Some(msg.clone());
            Error::Storage(msg)
        }
    };
    stop(&mut core, err).await;
}

/// How much lower than the engine's the serializing thread's priority is (a
/// `nice` increment: at 10 it gets about a tenth of a contended core).
const SNAPSHOT_NICENESS: i32 = 10;

/// Runs a snapshot's serialization on a new thread with a lower priority and
/// waits for it.
fn serialize_at_low_priority(job: SnapshotJob) -> Result<Snapshot, StorageError> {
    let thread = std::thread::Builder::new()
        .name("ha-snapshot".into())
        .spawn(move || {
            // On Linux the nice value is per thread. Best effort: at the default
            // priority the serialization still runs, only with a larger share.
            #[cfg(unix)]
            let _ = rustix::process::nice(SNAPSHOT_NICENESS);
            job()
        })
        .map_err(|e| StorageError::Io(format!("cannot start the snapshot thread: {e}")))?;
    thread.join().unwrap_or_else(|_| {
        Err(StorageError::Io(
            "the snapshot serialization panicked".into(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Member;
    use crate::message::test_request as request;
    use crate::types::MemberKind;

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
