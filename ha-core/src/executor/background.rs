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

/// A snapshot being serialized (off the engine task) and then saved.
pub(super) struct SnapshotSave<'s> {
    /// Set when the state machine or the log was replaced after the snapshot was
    /// taken: it is then never saved, and its completion is not reported.
    pub(super) stale: bool,
    pub(super) phase: SavePhase<'s>,
}

/// Where a snapshot save is.
pub(super) enum SavePhase<'s> {
    /// Its capture is being written into the store's snapshot writer.
    Serializing(BoxFut<'static, Result<Snapshot, StorageError>>),
    /// Written; its save is issued once every earlier save was (saves reach the
    /// store in the order they were taken).
    Serialized(Snapshot),
    /// The store is saving it.
    Saving {
        snapshot: Snapshot,
        running: BoxFut<'s, Result<(), StorageError>>,
    },
    /// Finished (or failed, or went stale before its save was issued).
    Done(Result<Option<Snapshot>, StorageError>),
}

/// Issues a snapshot save to the store.
pub(super) type IssueSave<'s> =
    Box<dyn Fn(Snapshot) -> BoxFut<'s, Result<(), StorageError>> + Send + 's>;

/// A read of the durable log for the engine.
pub(super) struct PendingRead<'s> {
    pub(super) read_id: u64,
    pub(super) running: BoxFut<'s, Result<CatchUpBatch, StorageError>>,
}

/// A read of a snapshot chunk for the engine.
pub(super) struct PendingSnapshotRead<'s> {
    pub(super) read_id: u64,
    pub(super) running: BoxFut<'s, Result<Vec<u8>, StorageError>>,
}

/// A store operation that finished in the background.
pub(super) enum Finished {
    /// Appends are durable up to this position.
    Persisted(Position),
    /// A snapshot save finished (`None`: it went stale and was not saved, or
    /// its completion means nothing any more).
    SnapshotSaved(Option<Snapshot>),
    /// A read for the engine finished; its failure is the engine's to handle, not
    /// the node's.
    EntriesRead {
        read_id: u64,
        result: Result<CatchUpBatch, StorageError>,
    },
    /// A snapshot chunk read for the engine finished (its failure, too, is the
    /// engine's to handle).
    SnapshotRead {
        read_id: u64,
        result: Result<Vec<u8>, StorageError>,
    },
}

/// Everything in flight.
pub(super) struct Background<'s> {
    issue_save: IssueSave<'s>,
    pub(super) appends: FutureSet<'s, Position, Result<(), StorageError>>,
    /// Saves in the order they were issued (the store orders them the same way).
    pub(super) snapshots: VecDeque<SnapshotSave<'s>>,
    /// Reads for the engine; a handful at most (one per peer).
    pub(super) reads: Vec<PendingRead<'s>>,
    /// Snapshot chunk reads for the engine (one per peer at most).
    pub(super) snapshot_reads: Vec<PendingSnapshotRead<'s>>,
    /// Purges of the log's compacted prefix: nothing waits for them (the store
    /// orders later operations after them), but their failure fails the node.
    pub(super) purges: Vec<BoxFut<'s, Result<(), StorageError>>>,
    /// The first failure of a purge, reported by [`Self::poll_finished`].
    failed: Option<StorageError>,
}

impl<'s> Background<'s> {
    pub(super) fn new(issue_save: IssueSave<'s>) -> Self {
        Background {
            issue_save,
            appends: FutureSet::new(),
            snapshots: VecDeque::new(),
            reads: Vec::new(),
            snapshot_reads: Vec::new(),
            purges: Vec::new(),
            failed: None,
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.appends.is_empty()
            && self.snapshots.is_empty()
            && self.reads.is_empty()
            && self.snapshot_reads.is_empty()
            && self.purges.is_empty()
            && self.failed.is_none()
    }

    /// Polls everything once, recording what finished (reported by
    /// [`Self::poll_finished`]).
    pub(super) fn poll_progress(&mut self, cx: &mut Context<'_>) {
        self.appends.poll_progress(cx);
        let failed = &mut self.failed;
        self.purges
            .retain_mut(|purge| match purge.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => {
                    failed.get_or_insert(e);
                    false
                }
                Poll::Pending => true,
            });
        // Saves are issued in the order they were taken: one whose serialization
        // finished waits for every earlier one to be issued.
        let mut earlier_issued = true;
        for save in self.snapshots.iter_mut() {
            let phase = std::mem::replace(&mut save.phase, SavePhase::Done(Ok(None)));
            save.phase = advance(phase, save.stale, earlier_issued, &self.issue_save, cx);
            earlier_issued &= matches!(save.phase, SavePhase::Saving { .. } | SavePhase::Done(_));
        }
    }

    /// Resolves with the next finished operation, or the first storage error.
    pub(super) fn poll_finished(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Finished, StorageError>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        if !self.appends.is_empty() {
            if let Poll::Ready(done) = self.appends.poll_prefix(cx) {
                return Poll::Ready(done.map(Finished::Persisted));
            }
        }
        self.poll_progress(cx);
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        for k in 0..self.reads.len() {
            if let Poll::Ready(result) = self.reads[k].running.as_mut().poll(cx) {
                let read_id = self.reads.swap_remove(k).read_id;
                return Poll::Ready(Ok(Finished::EntriesRead { read_id, result }));
            }
        }
        for k in 0..self.snapshot_reads.len() {
            if let Poll::Ready(result) = self.snapshot_reads[k].running.as_mut().poll(cx) {
                let read_id = self.snapshot_reads.swap_remove(k).read_id;
                return Poll::Ready(Ok(Finished::SnapshotRead { read_id, result }));
            }
        }
        // Saves are reported in the order they were taken.
        if self
            .snapshots
            .front()
            .is_some_and(|s| matches!(s.phase, SavePhase::Done(_)))
        {
            if let Some(save) = self.snapshots.pop_front() {
                let SavePhase::Done(outcome) = save.phase else {
                    return Poll::Pending;
                };
                let stale = save.stale;
                return Poll::Ready(
                    outcome.map(|snap| Finished::SnapshotSaved(snap.filter(|_| !stale))),
                );
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

/// Moves one snapshot save on as far as it can go now.
fn advance<'s>(
    phase: SavePhase<'s>,
    stale: bool,
    earlier_issued: bool,
    issue_save: &IssueSave<'s>,
    cx: &mut Context<'_>,
) -> SavePhase<'s> {
    let phase = match phase {
        SavePhase::Serializing(mut fut) => match fut.as_mut().poll(cx) {
            Poll::Ready(Ok(snapshot)) => SavePhase::Serialized(snapshot),
            Poll::Ready(Err(e)) => SavePhase::Done(Err(e)),
            Poll::Pending => return SavePhase::Serializing(fut),
        },
        other => other,
    };
    let phase = match phase {
        // Superseded before its save was issued: never saved.
        SavePhase::Serialized(_) if stale => return SavePhase::Done(Ok(None)),
        SavePhase::Serialized(snapshot) if earlier_issued => SavePhase::Saving {
            snapshot,
            running: issue_save(snapshot),
        },
        other => other,
    };
    match phase {
        SavePhase::Saving {
            snapshot,
            mut running,
        } => match running.as_mut().poll(cx) {
            Poll::Ready(outcome) => SavePhase::Done(outcome.map(|()| Some(snapshot))),
            Poll::Pending => SavePhase::Saving { snapshot, running },
        },
        other => other,
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
