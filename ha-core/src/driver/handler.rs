//! Incoming requests: hands each one to the engine task and waits for the engine's
//! matching [`crate::engine::Action::Respond`]. Every request gets an answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Input, Shared};
use crate::message::{Envelope, Request, Response, RpcError};
use crate::transport::{BoxFuture, RequestHandler};
use crate::types::NodeId;

/// The [`RequestHandler`] the driver gives its transport.
pub(super) struct Handler {
    pub(super) inputs: mpsc::Sender<Input>,
    pub(super) shared: Arc<Shared>,
    pub(super) timeout: Duration,
}

impl RequestHandler for Handler {
    fn handle(&self, peer: NodeId, request: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        let shared = Arc::clone(&self.shared);
        let node = shared.cfg.node_id;
        let request_id = request.request_id;
        let error = move |e: RpcError| Envelope {
            from: node,
            to: peer,
            term: shared.status.borrow().term,
            request_id,
            body: Response::Error(e),
        };
        if request.from != peer {
            tracing::warn!(%node, %peer, claimed = %request.from, "request claims another sender; refused");
            return Box::pin(std::future::ready(error(RpcError::NotAMember)));
        }
        self.shared.counters.bump_peer_request();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (reply, answer) = oneshot::channel();
        // Queued now, while `handle` is called, so requests reach the engine in the
        // order the transport delivered them (WAL batches stay in order even if the
        // transport polls the returned futures in another order).
        let queued = match self.inputs.try_send(Input::PeerRequest { request, reply }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(input)) => Some(input),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Box::pin(std::future::ready(error(RpcError::ShuttingDown)))
            }
        };
        let inputs = self.inputs.clone();
        Box::pin(async move {
            if let Some(input) = queued {
                match tokio::time::timeout_at(deadline, inputs.send(input)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return error(RpcError::ShuttingDown),
                    Err(_) => return error(RpcError::Timeout),
                }
            }
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(response)) => response,
                // The engine dropped the request: it stopped, or a newer request
                // with the same id replaced it.
                Ok(Err(_)) if inputs.is_closed() => error(RpcError::ShuttingDown),
                Ok(Err(_)) | Err(_) => error(RpcError::Timeout),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Member};
    use crate::driver::{initial_health, Counters};
    use crate::message::Fence;
    use crate::types::{MemberKind, Term};
    use parking_lot::Mutex;
    use tokio::sync::watch;

    fn handler(inputs: mpsc::Sender<Input>) -> Handler {
        let peers = vec![
            Member {
                id: NodeId(2),
                addr: "b".into(),
                kind: MemberKind::Data,
            },
            Member {
                id: NodeId(3),
                addr: "c".into(),
                kind: MemberKind::Witness,
            },
        ];
        let cfg = Config::new(NodeId(1), MemberKind::Data, "a", peers);
        let (status, _) = watch::channel(initial_health(&cfg));
        let shared = Arc::new(Shared {
            cfg,
            status,
            counters: Counters::default(),
            observations: tokio::sync::broadcast::channel(1).0,
            failure: Mutex::new(None),
            engine_alive: watch::channel(false).0,
        });
        Handler {
            inputs,
            shared,
            timeout: Duration::from_millis(100),
        }
    }

    fn fence(from: u64) -> Envelope<Request> {
        Envelope {
            from: NodeId(from),
            to: NodeId(1),
            term: Term::ZERO,
            request_id: 9,
            body: Request::Fence(Fence {
                reason: "test".into(),
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_claiming_another_sender_is_refused() {
        let (tx, _rx) = mpsc::channel(4);
        let resp = handler(tx).handle(NodeId(2), fence(3)).await;
        assert_eq!(resp.body, Response::Error(RpcError::NotAMember));
        assert_eq!(
            (resp.from, resp.to, resp.request_id),
            (NodeId(1), NodeId(2), 9)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out() {
        let (tx, mut rx) = mpsc::channel(4);
        let resp = handler(tx).handle(NodeId(2), fence(2)).await;
        assert_eq!(resp.body, Response::Error(RpcError::Timeout));
        assert!(matches!(rx.try_recv(), Ok(Input::PeerRequest { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_waited_for_within_the_deadline() {
        let (tx, mut rx) = mpsc::channel(1);
        let h = handler(tx.clone());
        tx.try_send(Input::PeerResponse(Envelope {
            from: NodeId(2),
            to: NodeId(1),
            term: Term::ZERO,
            request_id: 1,
            body: Response::Error(RpcError::Timeout),
        }))
        .map_err(|_| "queue")
        .expect("room for one");
        let pending = tokio::spawn(h.handle(NodeId(2), fence(2)));
        assert!(matches!(rx.recv().await, Some(Input::PeerResponse(_))));
        // Room again: the request gets in, and is answered.
        match rx.recv().await {
            Some(Input::PeerRequest { request, reply }) => {
                let body = Response::FenceAck(crate::message::FenceAck { fenced: false });
                let _ = reply.send(Envelope {
                    from: request.to,
                    to: request.from,
                    term: request.term,
                    request_id: request.request_id,
                    body,
                });
            }
            _ => panic!("expected the queued request"),
        }
        let resp = pending.await.expect("handler task");
        assert_eq!(
            resp.body,
            Response::FenceAck(crate::message::FenceAck { fenced: false })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_engine_answers_shutting_down() {
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let resp = handler(tx).handle(NodeId(2), fence(2)).await;
        assert_eq!(resp.body, Response::Error(RpcError::ShuttingDown));
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_answer_is_returned() {
        let (tx, mut rx) = mpsc::channel(4);
        let engine = tokio::spawn(async move {
            if let Some(Input::PeerRequest { request, reply }) = rx.recv().await {
                let body = Response::FenceAck(crate::message::FenceAck { fenced: true });
                let _ = reply.send(Envelope {
                    from: request.to,
                    to: request.from,
                    term: request.term,
                    request_id: request.request_id,
                    body,
                });
            }
        });
        let resp = handler(tx).handle(NodeId(2), fence(2)).await;
        assert_eq!(
            resp.body,
            Response::FenceAck(crate::message::FenceAck { fenced: true })
        );
        engine.await.expect("engine task");
    }
}
