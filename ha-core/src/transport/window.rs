//! [`WalWindow`]: a per-peer bound on WAL requests, admitted in call order
//! (every transport bounds the WAL requests queued or awaiting an answer with
//! it, so nothing is buffered without limit and waiting never reorders).

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Bounds the WAL requests of one peer that are queued or awaiting an answer.
/// A call takes a [`Ticket`] when it is invoked; tickets are admitted strictly in
/// order, each when a [`Slot`] is free, so WAL order survives waiting.
pub struct WalWindow {
    cap: usize,
    state: Mutex<WindowState>,
    changed: Notify,
}

struct WindowState {
    /// Slots taken (requests queued or awaiting an answer).
    used: usize,
    /// The next ticket to hand out.
    next: u64,
    /// The oldest ticket still in line.
    head: u64,
    /// Tickets behind `head` that already left the line.
    gone: BTreeSet<u64>,
}

impl WalWindow {
    /// A window of `cap` requests (at least 1).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(WalWindow {
            cap: cap.max(1),
            state: Mutex::new(WindowState {
                used: 0,
                next: 0,
                head: 0,
                gone: BTreeSet::new(),
            }),
            changed: Notify::new(),
        })
    }

    /// A place in line, taken when a WAL call is invoked.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut s = self.state.lock();
        let n = s.next;
        s.next += 1;
        Ticket {
            window: self.clone(),
            n,
        }
    }

    /// Slots taken: requests queued or awaiting an answer.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    /// Tickets in line (waiting for a slot, or admitted and not yet queued).
    pub fn waiting(&self) -> usize {
        let s = self.state.lock();
        usize::try_from(s.next - s.head).unwrap_or(usize::MAX) - s.gone.len()
    }
}

/// A WAL call's place in line; leaving the line (drop) lets the next one in.
pub struct Ticket {
    window: Arc<WalWindow>,
    n: u64,
}

impl Ticket {
    /// A slot, if this ticket is first in line and one is free.
    pub fn try_admit(&self) -> Option<Slot> {
        let mut s = self.window.state.lock();
        if s.head == self.n && s.used < self.window.cap {
            s.used += 1;
            Some(Slot {
                window: self.window.clone(),
            })
        } else {
            None
        }
    }

    /// Waits until [`try_admit`](Self::try_admit) succeeds (bounded by the
    /// caller's deadline).
    pub async fn admit(&self) -> Slot {
        loop {
            let changed = self.window.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.try_admit() {
                return slot;
            }
            changed.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut s = self.window.state.lock();
            if s.head == self.n {
                s.head += 1;
                loop {
                    let head = s.head;
                    if !s.gone.remove(&head) {
                        break;
                    }
                    s.head += 1;
                }
            } else {
                s.gone.insert(self.n);
            }
        }
        self.window.changed.notify_waiters();
    }
}

/// One WAL request's place in the window, held until it is answered or dropped.
pub struct Slot {
    window: Arc<WalWindow>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.window.state.lock().used -= 1;
        self.window.changed.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn window_admits_in_ticket_order_and_skips_abandoned() {
        let w = WalWindow::new(1);
        let t0 = w.ticket();
        let s0 = t0.try_admit().unwrap();
        drop(t0);
        let (t1, t2, t3) = (w.ticket(), w.ticket(), w.ticket());
        // Full: nobody gets in; t2 is not first in line anyway.
        assert!(t1.try_admit().is_none());
        assert!(t2.try_admit().is_none());
        assert_eq!(w.used(), 1);
        assert_eq!(w.waiting(), 3);
        drop(s0);
        // Room, but only for the first in line.
        assert!(t2.try_admit().is_none());
        drop(t2); // t2 gives up out of turn
        let s1 = t1.try_admit().unwrap();
        assert!(t3.try_admit().is_none());
        drop(t1);
        assert!(t3.try_admit().is_none(), "the window holds one");
        drop(s1);
        let s3 = t3.try_admit().unwrap();
        drop(t3);
        assert_eq!(w.waiting(), 0);
        assert_eq!(w.used(), 1);
        drop(s3);
        assert_eq!(w.used(), 0);
    }

    #[tokio::test]
    async fn admit_waits_for_a_slot() {
        let w = WalWindow::new(1);
        let t0 = w.ticket();
        let s0 = t0.try_admit().unwrap();
        drop(t0);
        let t1 = w.ticket();
        let waiter = tokio::spawn(async move {
            let s = t1.admit().await;
            drop(t1);
            s
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(s0);
        let s1 = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(w.used(), 1);
        drop(s1);
    }
}
