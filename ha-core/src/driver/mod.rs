//! The tokio driver: runs the [`Engine`] over a [`Transport`], a [`LogStore`] and a
//! [`StateMachine`], and implements [`Replicator`].
//!
//! # Shape
//! A [`Node`] is a cheap handle (an `Arc` inside) that HTTP handlers and tasks can
//! clone. [`Replicator::start`] loads the durable state, starts listening and spawns
//! one *engine task*, the single owner of the engine and the state machine. Every
//! input reaches that task over one channel: client writes (everything queued is
//! drained into one batch: group commit), reads, operator commands, peer requests
//! and responses; ticks come from a `tokio::time::interval`. The engine's clock is
//! tokio's, counted from the start, so tests with a paused clock drive it too.
//!
//! After every engine step the task publishes a [`HealthStatus`] snapshot and the
//! known primary (a `tokio::sync::watch`), from which [`Replicator::health`],
//! [`Replicator::is_leader`], [`Replicator::leader_id`] and
//! [`Replicator::wait_for_leader`] answer without reaching the task.
//!
//! # Executing actions
//! The engine task runs the shared [`Executor`]: the
//! same code the simulator checks over thousands of seeds. Actions run in the order
//! the engine emits them. Hard-state writes, truncations, snapshot installs and
//! compactions are awaited (durable) before the next action. Appends are issued to
//! the store at once (the store orders operations at call time) and their
//! completion is awaited alongside everything else, then reported as
//! [`Event::Persisted`](crate::engine::Event::Persisted), so the primary's own fsync
//! overlaps sending to the standby. Every entry reaches the state machine with its
//! [`Position`](crate::types::Position), whose term is the fencing token of the primary that wrote it. A
//! write acknowledgement or read answer leaves only if the lease still holds at that
//! moment.
//!
//! The engine asks for a snapshot every `snapshot_every` applied entries
//! ([`Action::TakeSnapshot`](crate::engine::Action::TakeSnapshot), after the step's
//! entries were applied, never between them); the executor serializes the state
//! machine and starts saving it; the save's fsync completes in the background, like
//! an append, and is then reported as
//! [`Event::SnapshotTaken`](crate::engine::Event::SnapshotTaken). A slow disk
//! therefore never stalls ticks or heartbeats, which would risk a false failover.
//!
//! Sends go to a per-peer connection: WAL-channel requests through one ordered
//! sender task per peer, fed by a bounded queue (when it is full, a request is
//! dropped: the engine resends lost batches on its own timer), control requests on
//! tasks of their own so they never wait behind WAL data. Lost connections are
//! re-established with exponential backoff and jitter, never blocking the engine
//! task; transport errors are only logged, since the engine retries by itself.
//!
//! # Shutdown
//! [`Replicator::shutdown`] stops the engine task, which fails pending calls, aborts
//! and awaits every peer task (so none reaches the transport afterwards) and closes
//! the transport. Every caller of `shutdown`, concurrent or later, returns only once
//! all that is done.
//!
//! # Failures
//! A log-store or state-machine error is fatal: the node logs it, stops the engine
//! task, closes the transport and fails every pending and later call with
//! [`Error::Storage`]. It never continues on a store it cannot trust.
//!
//! # Reads
//! [`ReadConsistency::Linearizable`] reads go through the engine (lease and no-op
//! checks) and run on the primary's state machine. In `async` commit mode such a
//! read may return a write that a later failover discards. [`ReadConsistency::Stale`]
//! reads query the local state machine directly, on any data node.

mod builder;
mod handler;
mod metrics;
mod observing;
mod peers;
mod status;
mod task;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;

pub use self::builder::{Missing, NodeBuilder};
use self::handler::Handler;
use self::metrics::Counters;
pub use self::metrics::{ClusterCounters, Metrics, TickLateness};
use self::status::{initial_health, stopped_health};
use self::task::{run_engine, HostParts, TokioHost};
use crate::config::Config;
use crate::engine::{Admin, Engine, InitialState};
use crate::error::{Error, StorageError};
use crate::executor::Executor;
use crate::health::HealthStatus;
use crate::log_store::{LogStore, StoredState};
use crate::message::{Envelope, Request, Response};
use crate::observe::Observed;
use crate::replicator::{PromoteOptions, ReadConsistency, ReplicationMode, Replicator, WriteAck};
use crate::state_machine::StateMachine;
use crate::transport::Transport;
use crate::types::{Command, HardState, Instant, LogIndex, NodeId, Role, Term};

/// Capacity of the engine task's input channel; callers wait (within their own
/// deadlines) when it is full.
const INPUT_QUEUE: usize = 4096;

/// Observations a slow subscriber may fall behind by before it misses some.
const OBSERVATION_QUEUE: usize = 1024;

/// How a node with an empty data directory enters the cluster (as etcd's
/// `initial-cluster-state`). A stored hard state is always used as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Create a new cluster: an empty store gets [`HardState::bootstrap`] (a voter).
    NewCluster,
    /// Join an existing cluster: an empty store gets [`HardState::joining`] (not a
    /// voter until it has caught up).
    JoinExisting,
}

/// What the engine task publishes and every handle reads.
struct Shared {
    cfg: Config,
    status: watch::Sender<HealthStatus>,
    counters: Counters,
    /// Every observation, for [`Node::subscribe_observations`].
    observations: broadcast::Sender<Observed>,
    /// Set once a storage failure stopped the engine task.
    failure: Mutex<Option<String>>,
    /// True while an engine task exists: set before it is spawned, cleared when it
    /// has stopped (its peer tasks stopped, the transport closed), even if it
    /// panicked or was aborted.
    engine_alive: watch::Sender<bool>,
}

/// Clears [`Shared::engine_alive`] when the engine task ends, however it ends.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.engine_alive.send_replace(false);
    }
}

/// An input to the engine task.
enum Input {
    Writes(Vec<(Command, oneshot::Sender<Result<WriteAck, Error>>)>),
    Read {
        query: Vec<u8>,
        consistency: ReadConsistency,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    Admin {
        admin: Admin,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    PeerRequest {
        request: Envelope<Request>,
        reply: oneshot::Sender<Envelope<Response>>,
    },
    PeerResponse(Envelope<Response>),
}

enum Lifecycle {
    NotStarted,
    Running {
        inputs: mpsc::Sender<Input>,
        stop: watch::Sender<bool>,
        task: Option<JoinHandle<()>>,
    },
    Closed,
}

struct Inner<T: Transport, L: LogStore, S: StateMachine> {
    shared: Arc<Shared>,
    transport: Arc<T>,
    store: Arc<L>,
    bootstrap: Bootstrap,
    seed: u64,
    /// The state machine until `start` hands it to the engine task.
    state_machine: Mutex<Option<S>>,
    lifecycle: Mutex<Lifecycle>,
    /// Serialises `start` calls (held across the start-up awaits; it guards nothing
    /// the engine task uses).
    start_lock: tokio::sync::Mutex<()>,
    /// `pause_auto_failover` called before `start`.
    paused_before_start: AtomicBool,
}

/// A replication node: the engine driven over a transport, a log store and a state
/// machine. See the [module docs](self).
///
/// Cloning is cheap and every clone controls the same node. When the last clone is
/// dropped without [`Replicator::shutdown`], the engine task stops as well.
///
/// Calls before [`Replicator::start`] fail with [`Error::NotReady`] (except
/// [`Replicator::pause_auto_failover`], which is remembered and applied at start);
/// after shutdown with [`Error::Closed`]; after a storage failure with
/// [`Error::Storage`].
pub struct Node<T: Transport, L: LogStore, S: StateMachine> {
    inner: Arc<Inner<T, L, S>>,
}

impl<T: Transport, L: LogStore, S: StateMachine> Clone for Node<T, L, S> {
    fn clone(&self) -> Self {
        Node {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: Transport, L: LogStore, S: StateMachine> std::fmt::Debug for Node<T, L, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.inner.shared.status.borrow();
        f.debug_struct("Node")
            .field("id", &h.node_id)
            .field("role", &h.role)
            .field("term", &h.term)
            .finish()
    }
}

impl<T: Transport, L: LogStore, S: StateMachine> Node<T, L, S> {
    /// Builds a node from checked parts ([`NodeBuilder::build`], the way to make
    /// one); nothing runs
    /// until [`Replicator::start`].
    fn from_parts(
        config: Config,
        transport: T,
        store: L,
        state_machine: S,
        bootstrap: Bootstrap,
        seed: u64,
    ) -> Result<Self, Error> {
        config.validate()?;
        let (status, _) = watch::channel(initial_health(&config));
        let counters = Counters::new(config.peers.iter().map(|m| m.id));
        let shared = Arc::new(Shared {
            cfg: config,
            status,
            counters,
            observations: broadcast::channel(OBSERVATION_QUEUE).0,
            failure: Mutex::new(None),
            engine_alive: watch::channel(false).0,
        });
        Ok(Node {
            inner: Arc::new(Inner {
                shared,
                transport: Arc::new(transport),
                store: Arc::new(store),
                bootstrap,
                seed,
                state_machine: Mutex::new(Some(state_machine)),
                lifecycle: Mutex::new(Lifecycle::NotStarted),
                start_lock: tokio::sync::Mutex::new(()),
                paused_before_start: AtomicBool::new(false),
            }),
        })
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.shared.cfg
    }

    /// The transport this node runs over.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// The node's log store.
    pub fn store(&self) -> &L {
        &self.inner.store
    }

    /// The node's counters.
    pub fn metrics(&self) -> Metrics {
        self.inner.shared.counters.read()
    }

    /// A receiver of every cluster event from now on ([`Observed`]: elections
    /// with their votes, fences, degraded sync, switchovers, snapshots, role
    /// changes). A receiver more than 1,024 events behind misses the oldest
    /// (`RecvError::Lagged` says how many).
    pub fn subscribe_observations(&self) -> broadcast::Receiver<Observed> {
        self.inner.shared.observations.subscribe()
    }

    /// The role as last published.
    pub fn role(&self) -> Role {
        self.inner.shared.status.borrow().role
    }

    /// The term as last published (the fencing token of writes acknowledged now).
    pub fn term(&self) -> Term {
        self.inner.shared.status.borrow().term
    }

    /// The replication progress as last published.
    pub fn status(&self) -> HealthStatus {
        self.inner.shared.status.borrow().clone()
    }

    /// A receiver that sees every change of [`HealthStatus`] (role, term, known
    /// primary, log, commit and applied positions, writability, paused failover).
    pub fn subscribe_status(&self) -> watch::Receiver<HealthStatus> {
        self.inner.shared.status.subscribe()
    }

    /// Waits until the published [`HealthStatus`] satisfies `condition`, and returns
    /// it; [`Error::Timeout`] after `timeout`. Works before start and after
    /// shutdown too (the status then no longer changes).
    pub async fn wait_status(
        &self,
        mut condition: impl FnMut(&HealthStatus) -> bool + Send,
        timeout: Duration,
    ) -> Result<HealthStatus, Error> {
        let mut rx = self.inner.shared.status.subscribe();
        let result = match tokio::time::timeout(timeout, rx.wait_for(|s| condition(s))).await {
            Ok(Ok(status)) => Ok(status.clone()),
            // The sender lives as long as this node.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        };
        result
    }

    /// True between a successful [`Replicator::start`] and shutdown or a storage
    /// failure.
    pub fn is_running(&self) -> bool {
        self.inputs().is_ok()
    }

    /// The engine task's channel, or why calls cannot be served.
    fn inputs(&self) -> Result<mpsc::Sender<Input>, Error> {
        let failure = self.inner.shared.failure.lock().clone();
        let lifecycle = self.inner.lifecycle.lock();
        if matches!(*lifecycle, Lifecycle::Closed) {
            return Err(Error::Closed);
        }
        if let Some(msg) = failure {
            return Err(Error::Storage(msg));
        }
        match &*lifecycle {
            Lifecycle::NotStarted => Err(Error::NotReady),
            Lifecycle::Running { inputs, .. } => Ok(inputs.clone()),
            Lifecycle::Closed => Err(Error::Closed),
        }
    }

    /// Why a call's reply channel was dropped: a storage failure or a shutdown.
    fn stopped_error(&self) -> Error {
        // Never both locks at once.
        let failure = self.inner.shared.failure.lock().clone();
        let closed = matches!(*self.inner.lifecycle.lock(), Lifecycle::Closed);
        match failure {
            Some(msg) if !closed => Error::Storage(msg),
            _ => Error::Closed,
        }
    }

    /// Sends `input` to the engine task and waits for the reply on `answer`, both
    /// before `deadline`.
    async fn call<R>(
        &self,
        input: Input,
        answer: oneshot::Receiver<Result<R, Error>>,
        deadline: TokioInstant,
    ) -> Result<R, Error> {
        let inputs = self.inputs()?;
        match tokio::time::timeout_at(deadline, inputs.send(input)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.stopped_error()),
            Err(_) => return Err(Error::Timeout),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn admin(&self, admin: Admin, timeout: Duration) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        let deadline = TokioInstant::now() + timeout;
        self.call(
            Input::Admin {
                admin,
                reply: Some(reply),
            },
            answer,
            deadline,
        )
        .await
    }

    /// Sends an operator command without waiting for its outcome (for the
    /// synchronous pause/resume methods).
    fn admin_detached(&self, admin: Admin) {
        let inputs = match self.inputs() {
            Ok(inputs) => inputs,
            Err(Error::NotReady) => {
                // Remembered and applied at start.
                self.inner
                    .paused_before_start
                    .store(admin == Admin::PauseFailover, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(node = %self.node_id(), ?admin, error = %e, "operator command ignored");
                return;
            }
        };
        match inputs.try_send(Input::Admin { admin, reply: None }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(input)) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let _ = inputs.send(input).await;
                        });
                    }
                    Err(_) => {
                        tracing::warn!(node = %self.node_id(), ?admin, "input queue full; operator command dropped")
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    async fn start_inner(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let _serialised = inner.start_lock.lock().await;
        match self.inputs() {
            Ok(_) => return Ok(()),
            Err(Error::NotReady) => {}
            Err(e) => return Err(e),
        }
        let cfg = &inner.shared.cfg;
        let stored = inner.store.load().await.map_err(storage)?;
        let hard_state = match stored.hard_state.clone() {
            Some(hs) => hs,
            None => {
                let hs = match inner.bootstrap {
                    Bootstrap::NewCluster => HardState::bootstrap(),
                    Bootstrap::JoinExisting => HardState::joining(),
                };
                inner
                    .store
                    .save_hard_state(hs.clone())
                    .await
                    .map_err(storage)?;
                hs
            }
        };
        let Some(mut sm) = inner.state_machine.lock().take() else {
            return Err(Error::Closed);
        };
        // Bring the state machine up to the stored snapshot; a persistent state
        // machine that is further along goes on from where it is (the engine
        // starts applying after its applied index: exactly once across restarts).
        if let Err(e) = catch_up_state_machine(&mut sm, &*inner.store, &stored) {
            *inner.state_machine.lock() = Some(sm);
            return Err(storage(e));
        }
        let (inputs, rx) = mpsc::channel(INPUT_QUEUE);
        let handler = Arc::new(Handler {
            inputs: inputs.clone(),
            shared: Arc::clone(&inner.shared),
            timeout: cfg.rpc_timeout,
        });
        if let Err(e) = inner.transport.listen(handler).await {
            *inner.state_machine.lock() = Some(sm);
            return Err(Error::Listen {
                addr: cfg.bind_addr.clone(),
                reason: e.to_string(),
            });
        }
        if inner.paused_before_start.load(Ordering::SeqCst) {
            let _ = inputs.try_send(Input::Admin {
                admin: Admin::PauseFailover,
                reply: None,
            });
        }

        let origin = TokioInstant::now();
        let init = InitialState {
            hard_state,
            snapshot: stored.snapshot,
            entries: stored.entries,
            applied: sm.applied_index(),
        };
        let engine = Engine::new(cfg.clone(), init, Instant(0), inner.seed);
        let host = TokioHost::new(HostParts {
            transport: Arc::clone(&inner.transport),
            shared: Arc::clone(&inner.shared),
            origin,
            rx,
            inputs: inputs.clone(),
            seed: inner.seed,
        });
        let mut core = Executor::new(engine, sm, Arc::clone(&inner.store), host);
        core.publish();
        let (stop, stop_rx) = watch::channel(false);
        // Alive before the task exists, so a shutdown never misses it.
        inner.shared.engine_alive.send_replace(true);
        let alive = AliveGuard(Arc::clone(&inner.shared));
        // Unconstrained by tokio's cooperative budget: while inputs keep coming
        // the engine goes on (and sees its ticks on time) instead of being sent
        // to the back of the run queue behind the tasks that feed it.
        let task = tokio::spawn(tokio::task::unconstrained(async move {
            let _alive = alive;
            run_engine(core, stop_rx).await;
        }));
        let mut lifecycle = inner.lifecycle.lock();
        if matches!(*lifecycle, Lifecycle::Closed) {
            // Shut down while starting: the task stops and closes the transport.
            let _ = stop.send(true);
            return Err(Error::Closed);
        }
        *lifecycle = Lifecycle::Running {
            inputs,
            stop,
            task: Some(task),
        };
        tracing::info!(node = %cfg.node_id, kind = ?cfg.kind, "started");
        Ok(())
    }

    /// Stops the node; every caller returns only once the engine task has stopped
    /// and the transport is closed.
    async fn shutdown_inner(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let previous = std::mem::replace(&mut *inner.lifecycle.lock(), Lifecycle::Closed);
        let first = !matches!(previous, Lifecycle::Closed);
        if let Lifecycle::Running { inputs, stop, task } = previous {
            // The task fails pending calls, stops the peer tasks and closes the
            // transport.
            let _ = stop.send(true);
            drop(inputs);
            if let Some(task) = task {
                if let Err(e) = task.await {
                    tracing::warn!(node = %self.node_id(), error = %e, "engine task ended abnormally");
                }
            }
        }
        // A `start` in progress sees `Closed` and stops what it started; wait for it
        // (only contended while a start runs).
        drop(inner.start_lock.lock().await);
        // Then for the engine task, whichever caller stopped it.
        let mut alive = inner.shared.engine_alive.subscribe();
        // The sender lives in `Shared`, as long as this handle.
        let _ = alive.wait_for(|alive| !*alive).await;
        inner.transport.close().await;
        if first {
            tracing::info!(node = %self.node_id(), "shut down");
        }
        Ok(())
    }
}

fn storage(e: StorageError) -> Error {
    Error::Storage(e.to_string())
}

impl<T: Transport, L: LogStore, S: StateMachine> Replicator for Node<T, L, S> {
    fn start(&self) -> impl Future<Output = Result<(), Error>> + Send {
        self.start_inner()
    }

    async fn apply(&self, command: Command, timeout: Duration) -> Result<WriteAck, Error> {
        let deadline = TokioInstant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        self.call(Input::Writes(vec![(command, reply)]), answer, deadline)
            .await
    }

    async fn apply_batch(
        &self,
        commands: Vec<Command>,
        timeout: Duration,
    ) -> Vec<Result<WriteAck, Error>> {
        let deadline = TokioInstant::now() + timeout;
        let n = commands.len();
        let inputs = match self.inputs() {
            Ok(inputs) => inputs,
            Err(e) => return vec![Err(e); n],
        };
        let mut batch = Vec::with_capacity(n);
        let mut answers = Vec::with_capacity(n);
        for command in commands {
            let (reply, answer) = oneshot::channel();
            batch.push((command, reply));
            answers.push(answer);
        }
        match tokio::time::timeout_at(deadline, inputs.send(Input::Writes(batch))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return vec![Err(self.stopped_error()); n],
            Err(_) => return vec![Err(Error::Timeout); n],
        }
        let mut results = Vec::with_capacity(n);
        for answer in answers {
            results.push(match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(self.stopped_error()),
                Err(_) => Err(Error::Timeout),
            });
        }
        results
    }

    async fn read(
        &self,
        query: Vec<u8>,
        consistency: ReadConsistency,
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let deadline = TokioInstant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        self.call(
            Input::Read {
                query,
                consistency,
                reply,
            },
            answer,
            deadline,
        )
        .await
    }

    fn is_leader(&self) -> bool {
        self.inner.shared.status.borrow().role == Role::Primary
    }

    fn leader_addr(&self) -> Option<String> {
        let cfg = &self.inner.shared.cfg;
        let leader = self.leader_id()?;
        if leader == cfg.node_id {
            Some(cfg.advertise_addr.clone())
        } else {
            cfg.member(leader).map(|m| m.addr.clone())
        }
    }

    fn leader_id(&self) -> Option<NodeId> {
        self.inner.shared.status.borrow().leader
    }

    fn health(&self) -> HealthStatus {
        self.inner.shared.status.borrow().clone()
    }

    async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, Error> {
        let mut status = self.inner.shared.status.subscribe();
        let wait = async {
            loop {
                self.inputs()?;
                let current = status.borrow_and_update().clone();
                if !current.running {
                    return Err(self.stopped_error());
                }
                if let Some(id) = current.leader {
                    return Ok(id);
                }
                if status.changed().await.is_err() {
                    return Err(self.stopped_error());
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(Error::Timeout))
    }

    async fn promote(&self, options: PromoteOptions) -> Result<(), Error> {
        let admin = if options.force_without_quorum_may_lose_data {
            Admin::ForcePromote
        } else {
            Admin::Promote
        };
        // The engine ends an election by itself (won, lost or timed out); this
        // bound only guards against waiting forever.
        let cfg = &self.inner.shared.cfg;
        let bound = (cfg.failover_timeout + cfg.failover_jitter) * 4 + cfg.rpc_timeout;
        self.admin(admin, bound).await
    }

    fn switchover(&self, timeout: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        self.admin(Admin::Switchover, timeout)
    }

    fn pause_auto_failover(&self) {
        self.admin_detached(Admin::PauseFailover)
    }

    fn resume_auto_failover(&self) {
        self.admin_detached(Admin::ResumeFailover)
    }

    fn shutdown(&self) -> impl Future<Output = Result<(), Error>> + Send {
        self.shutdown_inner()
    }

    fn mode(&self) -> ReplicationMode {
        ReplicationMode::HotStandby
    }

    fn node_id(&self) -> NodeId {
        self.inner.shared.cfg.node_id
    }
}

/// Restores the state machine from the stored snapshot if it is behind it, and
/// refuses one that has applied entries the log does not hold (it belongs to
/// another data directory, or the log lost entries it had applied).
fn catch_up_state_machine<S: StateMachine, L: LogStore>(
    sm: &mut S,
    store: &L,
    stored: &StoredState,
) -> Result<(), StorageError> {
    if let Some(snap) = stored.snapshot {
        if sm.applied_index() < snap.last_included.index {
            let mut reader = store.snapshot_reader(snap)?;
            sm.restore(snap.last_included.index, &mut *reader)?;
        }
    }
    let log_end = stored
        .entries
        .last()
        .map(|e| e.index())
        .or(stored.snapshot.as_ref().map(|s| s.last_included.index))
        .unwrap_or(LogIndex::ZERO);
    let applied = sm.applied_index();
    if applied > log_end {
        return Err(StorageError::Invalid(format!(
            "the state machine has applied up to index {applied} but the log ends at {log_end}: \
             it does not belong to this data directory (reset it, or restore the directory)"
        )));
    }
    Ok(())
}
