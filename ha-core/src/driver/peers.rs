//! Outgoing traffic: one connection handle per peer (kept: the transport owns
//! reconnecting; only getting the handle is retried here, with the shared
//! backoff), an ordered sender task per peer for the WAL channel, and
//! independent tasks for control requests so they never wait behind WAL data.
//!
//! Every task started here lives in the engine task's [`JoinSet`]: the engine task
//! aborts and awaits them all before it closes the transport, so none outlives a
//! shutdown (or reaches the transport after it was closed).

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant as TokioInstant;

use super::{Input, Shared};
use crate::backoff::Backoff;
use crate::config::{Config, Member};
use crate::error::TransportError;
use crate::executor::futures::FutureSet;
use crate::message::{Envelope, Request, Response};
use crate::transport::{PeerConnection, Transport};

/// Everything the driver knows about reaching one peer.
pub(super) struct PeerLink<T: Transport> {
    member: Member,
    transport: Arc<T>,
    shared: Arc<Shared>,
    rpc_timeout: Duration,
    conn: Mutex<Option<Arc<T::Conn>>>,
    backoff: Mutex<Backoff>,
    /// Serialises connection attempts so concurrent senders do not stampede.
    connecting: tokio::sync::Mutex<()>,
}

impl<T: Transport> PeerLink<T> {
    pub(super) fn new(
        member: Member,
        transport: Arc<T>,
        shared: Arc<Shared>,
        cfg: &Config,
        seed: u64,
    ) -> Self {
        let jitter_seed = Backoff::seed_for(cfg.node_id, member.id, seed);
        PeerLink {
            member,
            transport,
            shared,
            rpc_timeout: cfg.rpc_timeout,
            conn: Mutex::new(None),
            backoff: Mutex::new(Backoff::new(
                cfg.reconnect_interval,
                cfg.max_reconnect_backoff,
                jitter_seed,
            )),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<Arc<T::Conn>> {
        self.conn.lock().clone()
    }

    /// The peer's connection handle, kept for the life of the node: the
    /// transport owns reconnecting (a handle stays usable across lost
    /// connections; see [`Transport::connect`]). Only getting the handle can fail
    /// here (a local error or a closed transport); while backing off after such
    /// a failure this fails at once instead of waiting: the engine retries by
    /// itself.
    async fn connection(&self) -> Result<Arc<T::Conn>, TransportError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let peer = self.member.id;
        let now = TokioInstant::now();
        if self.backoff.lock().wait_left(now).is_some() {
            return Err(TransportError::Unreachable(
                peer,
                "backing off after a failed connection attempt".into(),
            ));
        }
        let result = match tokio::time::timeout(
            self.rpc_timeout,
            self.transport.connect(&self.member),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(peer)),
        };
        match result {
            Ok(conn) => {
                let conn = Arc::new(conn);
                *self.conn.lock() = Some(Arc::clone(&conn));
                self.backoff.lock().succeeded();
                tracing::debug!(node = %self.shared.cfg.node_id, %peer, "connection handle ready");
                Ok(conn)
            }
            Err(e) => {
                let wait = self.backoff.lock().failed(TokioInstant::now());
                tracing::debug!(node = %self.shared.cfg.node_id, %peer, error = %e, ?wait, "connection attempt failed");
                Err(e)
            }
        }
    }

    /// Sends one request on `conn` with the RPC deadline; counts the bytes of
    /// WAL entries and snapshot chunks it carries, and times answered heartbeats.
    async fn call(
        &self,
        conn: &T::Conn,
        request: Envelope<Request>,
    ) -> Result<Envelope<Response>, TransportError> {
        let peer = self.member.id;
        let counters = &self.shared.counters;
        let heartbeat = match &request.body {
            Request::WalBatch(b) => {
                counters.add_wal_bytes_sent(b.entries.iter().map(|e| e.approx_size() as u64).sum());
                false
            }
            Request::InstallSnapshot(s) => {
                counters.add_snapshot_chunk_sent(s.data.len() as u64, s.done);
                false
            }
            Request::Heartbeat(_) => true,
            _ => false,
        };
        let sent = TokioInstant::now();
        let result = match tokio::time::timeout(
            self.rpc_timeout,
            conn.call(request, self.rpc_timeout),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(peer)),
        };
        if heartbeat && result.is_ok() {
            counters.record_heartbeat_rtt(peer, sent.elapsed());
        }
        result
    }

    /// Logs a failed call. Returns true if the connection under it was lost
    /// (the calls still on it are given up; the transport re-dials by itself).
    fn failed(
        &self,
        conn: Option<&Arc<T::Conn>>,
        kind: &'static str,
        error: &TransportError,
    ) -> bool {
        self.shared.counters.bump_send_failure();
        tracing::debug!(node = %self.shared.cfg.node_id, peer = %self.member.id, kind, %error, "request failed");
        let Some(conn) = conn else { return false };
        matches!(
            error,
            TransportError::Unreachable(..) | TransportError::Closed
        ) || !conn.is_connected()
    }

    /// Closes the cached connection, if any.
    pub(super) fn close(&self) {
        if let Some(c) = self.conn.lock().take() {
            c.close();
        }
    }
}

/// Sends a control request on its own task (tracked in `tasks`): it never waits
/// behind WAL data.
pub(super) fn spawn_control<T: Transport>(
    tasks: &mut JoinSet<()>,
    link: Arc<PeerLink<T>>,
    request: Envelope<Request>,
    inputs: mpsc::Sender<Input>,
) {
    tasks.spawn(async move {
        let kind = request.body.kind();
        let conn = match link.connection().await {
            Ok(c) => c,
            Err(e) => {
                link.failed(None, kind, &e);
                return;
            }
        };
        match link.call(&conn, request).await {
            Ok(response) => {
                // The engine may have stopped; then nobody needs the answer.
                let _ = inputs.send(Input::PeerResponse(response)).await;
            }
            Err(e) => {
                link.failed(Some(&conn), kind, &e);
            }
        }
    });
}

/// The WAL sender of one peer: issues requests in the order the engine emitted
/// them (the transport delivers WAL requests in call order), keeps up to
/// `max_inflight` in flight, and feeds every response back to the engine. Requests
/// queued while the peer is unreachable are dropped: the engine resends from its
/// own state.
pub(super) async fn wal_sender<T: Transport>(
    link: Arc<PeerLink<T>>,
    mut queue: mpsc::Receiver<Envelope<Request>>,
    inputs: mpsc::Sender<Input>,
    max_inflight: usize,
) {
    let max_inflight = max_inflight.max(1);
    'connect: loop {
        let Some(first) = queue.recv().await else {
            return;
        };
        let conn = match link.connection().await {
            Ok(c) => c,
            Err(e) => {
                link.failed(None, first.body.kind(), &e);
                while queue.try_recv().is_ok() {}
                continue 'connect;
            }
        };
        let mut inflight: FutureSet<'_, &'static str, _> = FutureSet::new();
        inflight.push(first.body.kind(), Box::pin(link.call(&conn, first)));
        loop {
            tokio::select! {
                biased;
                (kind, result) = poll_fn(|cx| inflight.poll_any(cx)), if !inflight.is_empty() => match result {
                    Ok(response) => {
                        if inputs.send(Input::PeerResponse(response)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if link.failed(Some(&conn), kind, &e) {
                            // Outstanding calls on the broken connection are dropped.
                            continue 'connect;
                        }
                    }
                },
                // While the window is full, requests wait in the (bounded) queue.
                next = queue.recv(), if inflight.len() < max_inflight => match next {
                    Some(request) => inflight.push(request.body.kind(), Box::pin(link.call(&conn, request))),
                    None => return,
                },
            }
        }
    }
}
