//! Dialing: the peer's kept connection or a new dial (one at a time per peer,
//! a bounded number of them), and the check that the certificate names the
//! dialed member.

use std::sync::Arc;

use ha_core::config::Member;
use ha_core::error::TransportError;
use quinn::VarInt;

use super::link::Link;
use super::peer::{peer_id, PeerState};
use super::shared::Shared;
use super::{CODE_PROTOCOL, CODE_SHUTDOWN};
use ha_tls::certs::node_dns_name;

/// How many dials one caller makes for a connection before giving up (a dial
/// that succeeds normally leaves a kept connection at once).
const MAX_OWN_DIALS: u32 = 4;

impl Shared {
    /// The peer's kept connection if it is open, else a new dial (one at a time
    /// per peer: a concurrent caller waits for the dial in progress). With
    /// `respect_backoff`, fails at once while a failed dial's backoff runs.
    /// Gives up after [`MAX_OWN_DIALS`] dials of its own that left no kept
    /// connection, or after that many connect timeouts (plus one for another
    /// caller's dial) in all; other callers' activity uses up neither.
    pub(super) async fn ensure_link(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
        respect_backoff: bool,
    ) -> Result<Arc<Link>, TransportError> {
        let bound = self
            .opts
            .net
            .connect_timeout
            .saturating_mul(MAX_OWN_DIALS + 1);
        match tokio::time::timeout(bound, self.settle_link(peer, member, respect_backoff)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Unreachable(
                peer.id,
                format!("no connection within {bound:?}"),
            )),
        }
    }

    async fn settle_link(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
        respect_backoff: bool,
    ) -> Result<Arc<Link>, TransportError> {
        let closed = self.closed.wait();
        tokio::pin!(closed);
        // A dial registers a connection or fails; if the connection it
        // registered is not kept (or closes at once), dial again, a few times.
        // Wake-ups from other callers' dials and link changes do not count.
        let mut dials = 0;
        loop {
            if self.closed.is_set() {
                return Err(TransportError::Closed);
            }
            let changed = peer.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let dial = {
                let mut links = peer.links.lock();
                if let Some(l) = links.live_current() {
                    return Ok(l.clone());
                }
                if links.dialing {
                    false
                } else {
                    if dials >= MAX_OWN_DIALS {
                        return Err(TransportError::Unreachable(
                            peer.id,
                            format!("no connection after {dials} dials"),
                        ));
                    }
                    if respect_backoff {
                        if let Some(left) = links.backoff.wait_left(tokio::time::Instant::now()) {
                            return Err(TransportError::Unreachable(
                                peer.id,
                                format!("connection lost; next reconnect attempt in {left:?}"),
                            ));
                        }
                    }
                    links.dialing = true;
                    true
                }
            };
            if !dial {
                tokio::select! {
                    () = &mut changed => continue,
                    () = &mut closed => return Err(TransportError::Closed),
                }
            }
            dials += 1;
            let gate = DialGate { peer };
            let result = tokio::select! {
                r = self.dial(peer, member) => r,
                () = &mut closed => Err(TransportError::Closed),
            };
            {
                let mut links = peer.links.lock();
                match &result {
                    Ok(()) => links.backoff.succeeded(),
                    Err(_) => {
                        links.backoff.failed(tokio::time::Instant::now());
                    }
                }
            }
            drop(gate);
            result?;
        }
    }

    /// Dials `member` and registers the connection.
    pub(super) async fn dial(
        self: &Arc<Self>,
        peer: &Arc<PeerState>,
        member: &Member,
    ) -> Result<(), TransportError> {
        let to = member.id;
        let unreachable = |why: String| TransportError::Unreachable(to, why);
        let attempt = async {
            let addr = tokio::net::lookup_host(member.addr.as_str())
                .await
                .map_err(|e| unreachable(format!("cannot resolve {}: {e}", member.addr)))?
                .next()
                .ok_or_else(|| unreachable(format!("{} resolves to nothing", member.addr)))?;
            let connecting = self
                .endpoint
                .connect_with(self.client_cfg.clone(), addr, &node_dns_name(to))
                .map_err(|e| unreachable(e.to_string()))?;
            connecting.await.map_err(|e| unreachable(e.to_string()))
        };
        let conn = match tokio::time::timeout(self.opts.net.connect_timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => return Err(unreachable("handshake timed out".into())),
        };
        let proven = peer_id(&conn).map_err(TransportError::Unauthorised)?;
        if proven != to {
            conn.close(VarInt::from_u32(CODE_PROTOCOL), b"wrong peer");
            return Err(TransportError::Unauthorised(format!(
                "dialed {to}, certificate names {proven}"
            )));
        }
        if self.closed.is_set() {
            conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
            return Err(TransportError::Closed);
        }
        let link = Link::new(self, peer, self.me, conn);
        self.register(peer, link);
        Ok(())
    }
}

/// Marks a peer's dial as over (also when the dial is cancelled).
struct DialGate<'a> {
    peer: &'a PeerState,
}

impl Drop for DialGate<'_> {
    fn drop(&mut self) {
        self.peer.links.lock().dialing = false;
        self.peer.changed.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use ha_core::message::{Envelope, Request, Response, RpcError};
    use ha_core::transport::{RequestHandler, Transport};
    use ha_core::types::NodeId;

    use super::*;
    use crate::transport::{QuicOptions, QuicTransport};
    use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};

    struct Refuse;

    impl RequestHandler for Refuse {
        fn handle(
            &self,
            _peer: NodeId,
            req: Envelope<Request>,
        ) -> ha_core::transport::BoxFuture<Envelope<Response>> {
            Box::pin(std::future::ready(Envelope {
                from: req.to,
                to: req.from,
                term: req.term,
                request_id: req.request_id,
                body: Response::Error(RpcError::Malformed("test".into())),
            }))
        }
    }

    fn transport(ca: &CertificateAuthority, id: u64) -> QuicTransport {
        let cert = ca.issue(&NodeCertSpec::new(NodeId(id), 1)).unwrap();
        let identity = Identity::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        QuicTransport::new(
            &identity,
            QuicOptions::new(bind, vec![NodeId(1), NodeId(2)]),
        )
        .unwrap()
    }

    /// A caller waiting for another caller's dial is woken by unrelated changes
    /// many times; it neither gives up nor counts them as its own dials, and
    /// dials itself once the other dial ended without a connection.
    #[tokio::test(flavor = "current_thread")]
    async fn ensure_link_is_not_used_up_by_unrelated_wakeups() {
        let ca = CertificateAuthority::generate("ensure", 1).unwrap();
        let one = transport(&ca, 1);
        let two = transport(&ca, 2);
        two.listen(Arc::new(Refuse)).await.unwrap();
        let member = Member {
            id: NodeId(2),
            addr: two.local_addr().unwrap().to_string(),
            kind: ha_core::types::MemberKind::Data,
        };
        let shared = one.inner.clone();
        let peer = shared.peer(NodeId(2));
        // Another caller's dial is in progress.
        peer.links.lock().dialing = true;
        let waiter = {
            let (shared, peer) = (shared.clone(), peer.clone());
            tokio::spawn(async move {
                shared
                    .ensure_link(&peer, &member, false)
                    .await
                    .map(|l| l.dialer)
            })
        };
        // On this single-threaded runtime each yield lets the waiter run.
        for _ in 0..10 {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            peer.changed.notify_waiters();
        }
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "the waiter gave up: {waiter:?}");
        // The other dial ends without a connection: the waiter dials itself.
        peer.links.lock().dialing = false;
        peer.changed.notify_waiters();
        let dialer = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(dialer, NodeId(1));
        one.close().await;
        two.close().await;
    }
}
