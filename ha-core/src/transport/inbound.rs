//! [`Inbound`]: the serving side every network transport shares, between
//! reading a request and writing its answer: the checks of an authenticated
//! peer's request before the handler sees it, the hand-over to the handler in
//! arrival order, and the encoding of the answer.

use std::sync::Arc;

use parking_lot::RwLock;

use super::{BoxFuture, RequestHandler};
use crate::latch::Latch;
use crate::message::{Envelope, Request, Response, RpcError};
use crate::types::NodeId;
use crate::wire::{self, FrameError};

/// A request handed to the handler, or refused before it.
pub enum Dispatched {
    /// Nobody may answer: not listening, or closed.
    Closed,
    /// Refused by the transport itself.
    Refused(Envelope<Response>),
    /// The handler has it; its answer is on the way.
    Handling(BoxFuture<Envelope<Response>>),
}

/// The handler slot of a transport and the rules applied to every request from
/// a peer whose identity the connection proved.
pub struct Inbound {
    me: NodeId,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    closed: Latch,
}

impl Inbound {
    /// The serving side of node `me`; answers nothing until
    /// [`set_handler`](Self::set_handler), and nothing after `closed` is set.
    pub fn new(me: NodeId, closed: Latch) -> Self {
        Inbound {
            me,
            handler: RwLock::new(None),
            closed,
        }
    }

    /// Starts (or, with `None`, stops) handing requests to `handler`.
    pub fn set_handler(&self, handler: Option<Arc<dyn RequestHandler>>) {
        *self.handler.write() = handler;
    }

    /// Hands a request from `peer` to the handler now (the handler queues it
    /// before this returns, so requests dispatched in order reach the node in
    /// order), or refuses it: a request whose envelope claims another sender
    /// than the proven `peer`, or is addressed to another node.
    /// [`answer`](Self::answer) then waits for the response.
    pub fn dispatch(&self, peer: NodeId, request: Envelope<Request>) -> Dispatched {
        if self.closed.is_set() {
            return Dispatched::Closed;
        }
        let Some(handler) = self.handler.read().clone() else {
            return Dispatched::Closed;
        };
        let refusal = |error| Envelope {
            from: self.me,
            to: peer,
            term: request.term,
            request_id: request.request_id,
            body: Response::Error(error),
        };
        if request.from != peer {
            tracing::warn!(%peer, claimed = %request.from, "refusing a request that claims another sender");
            return Dispatched::Refused(refusal(RpcError::NotAMember));
        }
        if request.to != self.me {
            return Dispatched::Refused(refusal(RpcError::Malformed(format!(
                "request addressed to {} reached {}",
                request.to, self.me
            ))));
        }
        Dispatched::Handling(handler.handle(peer, request))
    }

    /// The response to a dispatched request, or `None` if the transport closed
    /// first (the request is then dropped unanswered).
    pub async fn answer(&self, dispatched: Dispatched) -> Option<Envelope<Response>> {
        let handling = match dispatched {
            Dispatched::Closed => return None,
            Dispatched::Refused(response) => return Some(response),
            Dispatched::Handling(handling) => handling,
        };
        let closed = self.closed.wait();
        let response = tokio::select! {
            r = handling => r,
            () = closed => return None,
        };
        if self.closed.is_set() {
            return None;
        }
        Some(response)
    }

    /// [`dispatch`](Self::dispatch) and [`answer`](Self::answer) in one.
    pub async fn respond(
        &self,
        peer: NodeId,
        request: Envelope<Request>,
    ) -> Option<Envelope<Response>> {
        self.answer(self.dispatch(peer, request)).await
    }
}

/// Encodes a response as a frame of at most `max` bytes; one that is too large
/// is replaced by an error response, so the caller still gets an answer.
pub fn encode_response(response: &Envelope<Response>, max: usize) -> Result<Vec<u8>, FrameError> {
    match wire::encode(response, max) {
        Err(FrameError::TooLarge { len, max }) => {
            tracing::warn!(len, max, "response too large");
            let error = Envelope {
                from: response.from,
                to: response.to,
                term: response.term,
                request_id: response.request_id,
                body: Response::Error(RpcError::Malformed(format!(
                    "response of {len} bytes exceeds the {max} byte limit"
                ))),
            };
            wire::encode(&error, max)
        }
        other => other,
    }
}

/// Decodes a response body and checks it answers `request_id` from `peer`
/// ([`super::check_response`]).
pub fn decode_response(
    peer: NodeId,
    request_id: u64,
    body: &[u8],
) -> Result<Envelope<Response>, crate::error::TransportError> {
    let response: Envelope<Response> = wire::decode(body).map_err(|e| {
        crate::error::TransportError::Protocol(peer, format!("undecodable response: {e}"))
    })?;
    super::check_response(peer, request_id, response)
}
