//! Helpers for the tests, on top of `ha_transport_quic::testkit` (whose
//! `QuicHarness` runs ha-core's conformance suite over loopback QUIC).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;

use ha_core::message::{Envelope, Heartbeat, Request, Response};
use ha_core::testkit::conformance::HarnessNode;
use ha_core::transport::{BoxFuture, RequestHandler};
use ha_core::types::{LogIndex, NodeId, Position, Term};
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_transport_quic::{QuicOptions, QuicTransport};

#[allow(unused_imports)]
pub use ha_transport_quic::testkit::{loopback, QuicHarness};

pub fn identity(ca: &CertificateAuthority, spec: &NodeCertSpec) -> Identity {
    let c = ca.issue(spec).unwrap();
    Identity::from_pem(&ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap()
}

pub fn node(identity: &Identity, members: &[NodeId]) -> HarnessNode<QuicTransport> {
    node_with(identity, QuicOptions::new(loopback(), members.to_vec()))
}

pub fn node_with(identity: &Identity, opts: QuicOptions) -> HarnessNode<QuicTransport> {
    ha_transport_quic::testkit::harness_node(identity, opts).unwrap()
}

pub struct Echo(pub NodeId);

impl RequestHandler for Echo {
    fn handle(&self, _peer: NodeId, req: Envelope<Request>) -> BoxFuture<Envelope<Response>> {
        let body = match &req.body {
            Request::Heartbeat(h) => Response::HeartbeatAck(ha_core::message::HeartbeatAck {
                accepted: true,
                last: h.last,
                applied: h.commit,
                voter: true,
            }),
            Request::WalBatch(b) => Response::WalAck(ha_core::message::WalAck {
                batch_term: req.term,
                result: ha_core::message::AckResult::Durable(
                    b.entries.last().map(|e| e.position).unwrap_or(b.prev),
                ),
                applied: b.commit,
            }),
            _ => Response::Error(ha_core::message::RpcError::Malformed("echo".into())),
        };
        Box::pin(std::future::ready(Envelope {
            from: self.0,
            to: req.from,
            term: req.term,
            request_id: req.request_id,
            body,
        }))
    }
}

pub fn echo(id: NodeId) -> Arc<dyn RequestHandler> {
    Arc::new(Echo(id))
}

pub fn heartbeat(from: NodeId, to: NodeId, id: u64) -> Envelope<Request> {
    let term = Term {
        number: 1,
        node: from,
    };
    Envelope {
        from,
        to,
        term,
        request_id: id,
        body: Request::Heartbeat(Heartbeat {
            commit: LogIndex(1),
            last: Position::new(term, LogIndex(1)),
        }),
    }
}

pub fn wal_batch(from: NodeId, to: NodeId, id: u64) -> Envelope<Request> {
    let term = Term {
        number: 1,
        node: from,
    };
    Envelope {
        from,
        to,
        term,
        request_id: id,
        body: Request::WalBatch(ha_core::message::WalBatch {
            prev: Position::new(term, LogIndex(id)),
            entries: vec![ha_core::types::WalEntry::new(
                Position::new(term, LogIndex(id + 1)),
                ha_core::types::Payload::Command(ha_core::types::Command(
                    id.to_le_bytes().to_vec(),
                )),
            )],
            commit: LogIndex(id),
        }),
    }
}

/// Awaits all `futures` concurrently, in one task.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}
