//! The store operations an executor issued and has not seen finish: appends,
//! snapshot saves and reads for the engine. They borrow the store, so they live in
//! the executor's run loop and are polled from it.

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll};

use super::futures::{BoxFut, FutureSet};
use crate::error::StorageError;
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::types::Position;

/// A snapshot being saved.
pub(super) struct SnapshotSave<'s> {
    pub(super) snapshot: Snapshot,
    /// Set when the state machine or the log was replaced after the snapshot was
    /// taken: its completion is then not reported to the engine.
    pub(super) stale: bool,
    /// The store's future until it resolves.
    pub(super) running: Option<BoxFut<'s, Result<(), StorageError>>>,
    /// Its outcome once it resolved.
    pub(super) outcome: Option<Result<(), StorageError>>,
}

/// A read of the durable log for the engine.
pub(super) struct PendingRead<'s> {
    pub(super) read_id: u64,
    pub(super) running: BoxFut<'s, Result<CatchUpBatch, StorageError>>,
}

/// A store operation that finished in the background.
pub(super) enum Finished {
    /// Appends are durable up to this position.
    Persisted(Position),
    /// A snapshot save finished.
    SnapshotSaved { snapshot: Snapshot, stale: bool },
    /// A read for the engine finished; its failure is the engine's to handle, not
    /// the node's.
    EntriesRead {
        read_id: u64,
        result: Result<CatchUpBatch, StorageError>,
    },
}

/// Everything in flight.
pub(super) struct Background<'s> {
    pub(super) appends: FutureSet<'s, Position, Result<(), StorageError>>,
    /// Saves in the order they were issued (the store orders them the same way).
    pub(super) snapshots: VecDeque<SnapshotSave<'s>>,
    /// Reads for the engine; a handful at most (one per peer).
    pub(super) reads: Vec<PendingRead<'s>>,
}

impl<'s> Background<'s> {
    pub(super) fn new() -> Self {
        Background {
            appends: FutureSet::new(),
            snapshots: VecDeque::new(),
            reads: Vec::new(),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.appends.is_empty() && self.snapshots.is_empty() && self.reads.is_empty()
    }

    /// Polls everything once, recording what finished (reported by
    /// [`Self::poll_finished`]).
    pub(super) fn poll_progress(&mut self, cx: &mut Context<'_>) {
        self.appends.poll_progress(cx);
        for save in self.snapshots.iter_mut() {
            if let Some(fut) = save.running.as_mut() {
                if let Poll::Ready(outcome) = fut.as_mut().poll(cx) {
                    save.running = None;
                    save.outcome = Some(outcome);
                }
            }
        }
    }

    /// Resolves with the next finished operation, or the first storage error.
    pub(super) fn poll_finished(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Finished, StorageError>> {
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
        // Saves are reported in the order they were issued.
        if self.snapshots.front().is_some_and(|s| s.outcome.is_some()) {
            if let Some(save) = self.snapshots.pop_front() {
                let outcome = save.outcome.unwrap_or(Ok(()));
                return Poll::Ready(outcome.map(|()| Finished::SnapshotSaved {
                    snapshot: save.snapshot,
                    stale: save.stale,
                }));
            }
        }
        Poll::Pending
    }

    /// Marks every pending snapshot save as superseded; true if one was pending
    /// and not already superseded.
    pub(super) fn supersede_snapshots(&mut self) -> bool {
        let mut any = false;
        for save in self.snapshots.iter_mut().filter(|s| !s.stale) {
            save.stale = true;
            any = true;
        }
        any
    }
}

/// Awaits a durable store operation while the pending appends and snapshot saves
/// keep making progress (their completions are recorded and reported by the run
/// loop).
pub(super) async fn durable<'s, F>(bg: &mut Background<'s>, op: F) -> Result<(), StorageError>
where
    F: Future<Output = Result<(), StorageError>>,
{
    let mut op = std::pin::pin!(op);
    std::future::poll_fn(|cx| {
        bg.poll_progress(cx);
        op.as_mut().poll(cx)
    })
    .await
}
