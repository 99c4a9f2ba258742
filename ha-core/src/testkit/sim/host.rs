//! What a simulated node's [`Executor`](crate::executor::Executor) runs on: a
//! [`Host`] over the world's network, clock and client workload, a [`LogStore`]
//! over the node's simulated disk (durable operations take simulated time, and a
//! crash loses what was not yet durable), and a [`StateMachine`] over the node's
//! model state (the checker sees every entry as it is applied).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use rand::Rng;

use super::model::{DiskOp, SimMachine, SimReadAnswer};
use super::network::Msg;
use super::world::{idx, Ev, World};
use crate::engine::{ClientId, Engine};
use crate::error::{Error, StorageError};
use crate::executor::{Host, Input, Notice, SnapshotJob};
use crate::log_store::{CatchUpBatch, LogStore, Snapshot, SnapshotWriter, StoredState};
use crate::message::{Envelope, Request, Response};
use crate::replicator::WriteAck;
use crate::state_machine::StateMachine;
use crate::testkit::memory::retention_point;
use crate::transport::BoxFuture;
use crate::types::{Command, HardState, Instant, LogIndex, NodeId, Payload, Position, WalEntry};

/// The world, shared by the simulator's loop and every node's executor (which
/// lock it only inside a call, never across one).
pub(super) type Shared = Arc<Mutex<World>>;

/// One incarnation of a node, as its executor sees the world.
#[derive(Clone)]
pub(super) struct Incarnation {
    pub(super) world: Shared,
    pub(super) id: NodeId,
    pub(super) inc: u64,
}

impl Incarnation {
    /// Runs `f` on the world if this incarnation is still alive.
    fn with<R>(&self, f: impl FnOnce(&mut World) -> R) -> Option<R> {
        let mut w = self.world.lock();
        if !w.current(self.id, self.inc) {
            return None;
        }
        Some(f(&mut w))
    }
}

/// The node's [`Host`].
pub(super) struct SimHost(pub(super) Incarnation);

impl Host for SimHost {
    fn now(&self) -> Instant {
        let w = self.0.world.lock();
        w.node(self.0.id).local(w.now)
    }

    fn poll_input(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Input>> {
        match self.0.with(|w| w.node_mut(self.0.id).inbox.pop_front()) {
            Some(Some(input)) => Poll::Ready(Some(input)),
            _ => Poll::Pending,
        }
    }

    fn poll_resume(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        let (id, inc) = (self.0.id, self.0.inc);
        self.0
            .with(|w| w.preempt_point(id, inc))
            .unwrap_or(Poll::Pending)
    }

    fn stepped(&mut self, engine: &Engine) {
        let id = self.0.id;
        self.0.with(|w| w.observe(id, engine));
    }

    fn send(&mut self, request: Envelope<Request>) {
        self.0.with(|w| w.send(Msg::Req(request)));
    }

    fn respond(&mut self, response: Envelope<Response>) {
        let id = self.0.id;
        self.0.with(|w| {
            w.responded(id, &response);
            w.send(Msg::Resp(response));
        });
    }

    fn write_done(&mut self, id: ClientId, result: Result<WriteAck, Error>) {
        let node = self.0.id;
        self.0.with(|w| w.write_done(node, id, result));
    }

    fn read_done(&mut self, id: ClientId, result: Result<Vec<u8>, Error>) {
        let node = self.0.id;
        self.0.with(|w| w.read_done(node, id, result));
    }

    fn admin_done(&mut self, id: ClientId, result: Result<(), Error>) {
        self.0.with(|w| w.admin_done(id, result));
    }

    /// At once: the simulated state machine's capture is already its encoding.
    fn offload(&mut self, job: SnapshotJob) -> BoxFuture<Result<Snapshot, StorageError>> {
        Box::pin(std::future::ready(job()))
    }

    fn notice(&mut self, notice: Notice<'_>) {
        let node = self.0.id;
        self.0.with(|w| w.notice(node, notice));
    }
}

/// The node's [`LogStore`]: every operation joins the disk's queue when called
/// and its future resolves once the queue reached it.
pub(super) struct SimStore(pub(super) Incarnation);

/// A queued disk operation's future.
pub(super) struct DiskWait {
    who: Incarnation,
    /// `None` when the incarnation was already dead at the call: never resolves.
    seq: Option<u64>,
    read: bool,
}

impl Future for DiskWait {
    type Output = Result<Option<CatchUpBatch>, StorageError>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(seq) = self.seq else {
            return Poll::Pending;
        };
        let read = self.read;
        let done = self.who.with(|w| {
            let disk = &mut w.node_mut(self.who.id).disk;
            if disk.done < seq {
                return None;
            }
            if let Some(e) = disk.failures.remove(&seq) {
                Some(Err(e))
            } else if read {
                let result = disk.read_results.remove(&seq).unwrap_or_else(|| {
                    Err(StorageError::Invalid("simulated read result lost".into()))
                });
                Some(result.map(Some))
            } else {
                Some(Ok(None))
            }
        });
        match done {
            Some(Some(result)) => Poll::Ready(result),
            _ => Poll::Pending,
        }
    }
}

impl SimStore {
    fn queue(&self, op: DiskOp) -> DiskWait {
        let read = matches!(op, DiskOp::Read { .. });
        let (id, inc) = (self.0.id, self.0.inc);
        let seq = self.0.with(|w| {
            let seq = w.node_mut(id).disk.queue(op);
            let latency = w.disk_latency();
            w.schedule(latency, Ev::DiskDone(id, inc));
            w.maybe_crash_during_disk_op(id, inc, latency);
            seq
        });
        DiskWait {
            who: self.0.clone(),
            seq,
            read,
        }
    }

    fn durable(&self, op: DiskOp) -> impl Future<Output = Result<(), StorageError>> + Send {
        let wait = self.queue(op);
        async move { wait.await.map(|_| ()) }
    }
}

impl LogStore for SimStore {
    fn load(&self) -> impl Future<Output = Result<StoredState, StorageError>> + Send {
        let state = self
            .0
            .with(|w| {
                let d = &w.node(self.0.id).disk;
                StoredState {
                    hard_state: d.hard_state.clone(),
                    snapshot: d.snapshot,
                    entries: d.entries.clone(),
                }
            })
            .unwrap_or_default();
        std::future::ready(Ok(state))
    }

    fn append(
        &self,
        entries: Vec<WalEntry>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::Append(entries))
    }

    fn read(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<WalEntry>, StorageError>> + Send {
        let result = self
            .0
            .with(|w| w.node(self.0.id).disk.read(from, to, max_bytes))
            .unwrap_or_else(|| Err(StorageError::Io("the node is down".into())));
        std::future::ready(result)
    }

    fn truncate_suffix(
        &self,
        from: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::Truncate(from))
    }

    fn purge_prefix(
        &self,
        upto: LogIndex,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::Purge(upto))
    }

    fn save_hard_state(
        &self,
        state: HardState,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::HardState(state))
    }

    fn save_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::SaveSnapshot(snapshot))
    }

    fn install_snapshot(
        &self,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), StorageError>> + Send {
        self.durable(DiskOp::Install(snapshot))
    }

    fn last_position(&self) -> impl Future<Output = Result<Position, StorageError>> + Send {
        let pos = self
            .0
            .with(|w| w.node(self.0.id).disk.last_position())
            .unwrap_or_default();
        std::future::ready(Ok(pos))
    }

    fn read_batch(
        &self,
        next: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<CatchUpBatch, StorageError>> + Send {
        let fail = self
            .0
            .with(|w| {
                let p = w.cfg.read_failure;
                w.rng.random_bool(p)
            })
            .unwrap_or(false);
        let wait = self.queue(DiskOp::Read {
            next,
            max_entries,
            max_bytes,
            fail,
        });
        async move {
            match wait.await? {
                Some(batch) => Ok(batch),
                None => Err(StorageError::Invalid("not a read".into())),
            }
        }
    }

    fn snapshot_writer(&self, at: Position) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        self.0
            .with(|w| w.node(self.0.id).disk.files.writer(at))
            .ok_or_else(|| StorageError::Io("the node is down".into()))
    }

    fn snapshot_reader(
        &self,
        snapshot: Snapshot,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        self.0
            .with(|w| w.node(self.0.id).disk.files.reader(snapshot))
            .unwrap_or_else(|| Err(StorageError::Io("the node is down".into())))
    }

    /// At once, failing (an I/O error) a fifth as often as catch-up reads do.
    fn read_snapshot(
        &self,
        snapshot: Snapshot,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StorageError>> + Send {
        let result = self
            .0
            .with(|w| {
                let p = w.cfg.read_failure / 5.0;
                if w.rng.random_bool(p) {
                    return Err(StorageError::Io("simulated snapshot read error".into()));
                }
                w.node(self.0.id)
                    .disk
                    .files
                    .read(snapshot, offset, max_bytes)
            })
            .unwrap_or_else(|| Err(StorageError::Io("the node is down".into())));
        std::future::ready(result)
    }

    fn purge_point(&self, snapshot: LogIndex, keep_from: Option<LogIndex>) -> LogIndex {
        let retain = self.0.with(|w| w.cfg.retain_entries).unwrap_or(0);
        retention_point(snapshot, keep_from, retain)
    }
}

/// The node's [`StateMachine`]: the model state lives in the world, so it
/// survives a crash when the run's state machine is persistent, and the checker
/// sees each entry as it is applied.
pub(super) struct SimSm(pub(super) Incarnation);

impl SimSm {
    fn apply_entry(&mut self, pos: Position, payload: &Payload) {
        let id = self.0.id;
        self.0.with(|w| {
            w.check_apply(id, pos);
            if let Err(err) = w.nodes[idx(id)].sm.apply(pos, payload) {
                w.violation(format!("{id}: {err}"));
            }
        });
    }
}

impl StateMachine for SimSm {
    type Capture = Vec<u8>;

    fn apply(&mut self, position: Position, command: &Command) -> Vec<u8> {
        self.apply_entry(position, &Payload::Command(command.clone()));
        Vec::new()
    }

    fn apply_noop(&mut self, position: Position) {
        self.apply_entry(position, &Payload::Noop);
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let key = query.first().copied().unwrap_or(0);
        let answer: SimReadAnswer =
            self.0
                .with(|w| w.node(self.0.id).sm.answer(key))
                .unwrap_or(SimReadAnswer {
                    applied: LogIndex::ZERO,
                    last_term: crate::types::Term::ZERO,
                    value: None,
                });
        postcard::to_allocvec(&answer).unwrap_or_default()
    }

    fn applied_index(&self) -> LogIndex {
        self.0
            .with(|w| w.node(self.0.id).sm.applied_index())
            .unwrap_or(LogIndex::ZERO)
    }

    fn capture(&self) -> Vec<u8> {
        self.0
            .with(|w| w.node(self.0.id).sm.encode())
            .unwrap_or_default()
    }

    fn restore(
        &mut self,
        _index: LogIndex,
        data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        let data = crate::state_machine::read_all(data)?;
        let Some(m) = SimMachine::decode(&data) else {
            return Err(StorageError::Invalid(
                "undecodable simulated snapshot".into(),
            ));
        };
        self.0.with(|w| w.nodes[idx(self.0.id)].sm = m);
        Ok(())
    }

    fn reset(&mut self) {
        self.0
            .with(|w| w.nodes[idx(self.0.id)].sm = SimMachine::default());
    }
}
