//! A flag that is set once and can be awaited: how transports and drivers signal
//! "closed" to every task that must stop promptly.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Set once, never reset; clones share the flag. Cheap to check, and `wait`
/// resolves for every waiter once it is set.
#[derive(Clone, Debug)]
pub struct Latch {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Latch {
    fn default() -> Self {
        Self::new()
    }
}

impl Latch {
    /// An unset latch.
    pub fn new() -> Self {
        Latch {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Sets the latch; idempotent.
    pub fn set(&self) {
        self.tx.send_replace(true);
    }

    /// True once set.
    pub fn is_set(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the latch is set (at once if it already is). The future owns
    /// what it needs, so it may outlive this handle.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        let keep = self.tx.clone();
        async move {
            if rx.wait_for(|set| *set).await.is_err() {
                // Unreachable while `keep` holds the sender; never resolve spuriously.
                std::future::pending::<()>().await;
            }
            drop(keep);
        }
    }

    /// Resolves once this latch or `other` is set (a connection's and its
    /// transport's "closed", say).
    pub fn wait_either(&self, other: &Latch) -> impl Future<Output = ()> + Send + 'static {
        let (a, b) = (self.wait(), other.wait());
        async move {
            tokio::select! {
                () = a => {}
                () = b => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Latch;

    #[tokio::test]
    async fn waiters_wake_once_set_and_later_waits_resolve_at_once() {
        let l = Latch::new();
        let w = tokio::spawn(l.wait());
        assert!(!l.is_set());
        l.clone().set();
        assert!(l.is_set());
        w.await.expect("waiter finished");
        l.wait().await;
    }
}
