//! A small set of boxed futures polled together, without an extra dependency.
//!
//! The log store's and the transport's futures borrow the store or connection they
//! came from, so they cannot be spawned as `'static` tasks. The driver keeps them in
//! one of these sets inside the task that owns the borrowed value and polls them
//! from its `select!` loop, which overlaps them with everything else that task does.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A boxed, sendable future borrowing for `'a`.
pub(crate) type BoxFut<'a, O> = Pin<Box<dyn Future<Output = O> + Send + 'a>>;

enum Slot<'a, O> {
    Running(BoxFut<'a, O>),
    Done(O),
}

/// Futures tagged with a key, kept in the order they were pushed.
pub(crate) struct FutureSet<'a, K, O> {
    items: VecDeque<(K, Slot<'a, O>)>,
}

impl<'a, K, O> FutureSet<'a, K, O> {
    /// An empty set.
    pub(crate) fn new() -> Self {
        FutureSet {
            items: VecDeque::new(),
        }
    }

    /// True if nothing is pending or waiting to be taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many futures are pending or waiting to be taken.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Adds a future at the back.
    pub(crate) fn push(&mut self, key: K, fut: BoxFut<'a, O>) {
        self.items.push_back((key, Slot::Running(fut)));
    }

    /// Polls every running future once, recording the outputs of those that finish.
    pub(crate) fn poll_progress(&mut self, cx: &mut Context<'_>) {
        for (_, slot) in self.items.iter_mut() {
            if let Slot::Running(fut) = slot {
                if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                    *slot = Slot::Done(out);
                }
            }
        }
    }

    /// Resolves with any one finished future (key and output), in no particular
    /// order.
    pub(crate) fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<(K, O)> {
        self.poll_progress(cx);
        let pos = self
            .items
            .iter()
            .position(|(_, s)| matches!(s, Slot::Done(_)));
        match pos.and_then(|i| self.items.remove(i)) {
            Some((key, Slot::Done(out))) => Poll::Ready((key, out)),
            // `position` only finds finished slots.
            Some((key, Slot::Running(fut))) => {
                self.items.push_front((key, Slot::Running(fut)));
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }
}

impl<'a, K, E> FutureSet<'a, K, Result<(), E>> {
    /// In-order completion: resolves with the key of the last future of the longest
    /// finished prefix (everything before it finished too), or with the first error
    /// found anywhere (errors are not reordered behind slower successes).
    pub(crate) fn poll_prefix(&mut self, cx: &mut Context<'_>) -> Poll<Result<K, E>> {
        self.poll_progress(cx);
        if let Some(i) = self
            .items
            .iter()
            .position(|(_, s)| matches!(s, Slot::Done(Err(_))))
        {
            if let Some((_, Slot::Done(Err(e)))) = self.items.remove(i) {
                return Poll::Ready(Err(e));
            }
        }
        let mut last = None;
        while matches!(self.items.front(), Some((_, Slot::Done(_)))) {
            if let Some((key, _)) = self.items.pop_front() {
                last = Some(key);
            }
        }
        match last {
            Some(key) => Poll::Ready(Ok(key)),
            None => Poll::Pending,
        }
    }
}
