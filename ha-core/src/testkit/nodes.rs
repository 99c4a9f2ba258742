//! Waiting on real nodes in tests: bounded, driven by the nodes' published
//! status (never by sleeping).

use std::time::Duration;

use crate::driver::Node;
use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::transport::Transport;
use crate::types::Role;

/// Waits at most `limit` until one of `nodes` is a running, writable primary,
/// and returns it; `None` if none became one in time. Woken by any node's
/// status change (subscribed before each check, so none is missed).
pub async fn wait_writable_primary<T: Transport, L: LogStore, S: StateMachine>(
    nodes: &[Node<T, L, S>],
    limit: Duration,
) -> Option<Node<T, L, S>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let statuses: Vec<_> = nodes.iter().map(|n| n.subscribe_status()).collect();
        if let Some(p) = nodes.iter().find(|n| {
            let s = n.status();
            s.running && s.role == Role::Primary && s.writable
        }) {
            return Some(p.clone());
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(nodes.len().max(1));
        let watchers: Vec<_> = statuses
            .into_iter()
            .map(|mut status| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if status.changed().await.is_ok() {
                        let _ = tx.send(()).await;
                    }
                })
            })
            .collect();
        drop(tx);
        let changed = tokio::time::timeout_at(deadline, rx.recv()).await;
        for w in watchers {
            w.abort();
        }
        if changed.is_err() {
            return None;
        }
    }
}
