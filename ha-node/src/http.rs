//! Serving the API: hyper connections with bounded header reads, a bounded
//! request time, a cap on open connections, and a graceful stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ha_core::ratelimit::{Burst, Verdict};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Limits of the API server.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (slow or idle clients are
    /// disconnected).
    pub header_timeout: Duration,
    /// A whole request (body and answer) must finish within this.
    pub request_timeout: Duration,
    /// The most connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long a graceful stop lets requests in flight finish.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// A running API server.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    drain: Duration,
}

impl HttpServer {
    /// Binds `addr` and serves `router` on it.
    pub async fn bind(
        addr: SocketAddr,
        router: Router,
        limits: HttpLimits,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let limit = limits.request_timeout;
        let router = router.layer(axum::middleware::from_fn(move |req, next| {
            bounded(limit, req, next)
        }));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, router, limits, stopped));
        Ok(HttpServer {
            addr,
            stop,
            task: Some(task),
            drain: limits.drain_timeout,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (bounded), then returns.
    /// Idempotent.
    pub async fn shutdown(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(self.drain + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Answers `408` for a request that did not finish within `limit`.
async fn bounded(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            axum::Json(serde_json::json!({
                "error": "request_timeout",
                "detail": "the request took too long (a write may still commit: read before retrying)",
            })),
        )
            .into_response(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let accept_lines = Burst::default();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped.changed() => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly.
                    match accept_lines.admit_now() {
                        Verdict::Log { suppressed } => {
                            tracing::warn!(error = %e, suppressed, "API accept failed");
                        }
                        Verdict::Suppress => tracing::debug!(error = %e, "API accept failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stopped.clone();
        let header_timeout = limits.header_timeout;
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stopping = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}
