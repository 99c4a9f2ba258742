//! `ha-node run`: the node as a foreground service.
//!
//! Opens the data directory (the WAL's lock refuses a second process), the
//! key-value store (data nodes) and the certificates, starts the replication
//! node over the configured transport, serves the API, and on SIGTERM or SIGINT
//! stops it all within a bounded time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{
    Bootstrap, Command, LogIndex, MemberKind, Node, NodeBuilder, NodeId, Position, Replicator,
    StateMachine, StorageError, Transport,
};
use ha_tls::Identity;
use ha_transport_quic::{QuicOptions, QuicTransport};
use ha_transport_tcp::{TcpOptions, TcpTransport};
use ha_wal::{Wal, WalConfig};

use crate::api::{self, ApiState, MemberApi, NodeApi};
use crate::client::Client;
use crate::config::{Checked, ClusterState, Kind, Role, TransportKind};
use crate::events::{EventLog, NodeEvent};
use crate::http::{HttpLimits, HttpServer};
use crate::metrics::{ApiMetrics, Exporter, NodeInfo, Sources, TransportReadings};
use crate::store::{KvStore, StoreHandle};

/// How long a write or a linearizable read may wait before the API answers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful stop may take before the process exits anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The witness's state machine: it holds no data, so there is nothing to apply.
#[derive(Debug, Default)]
pub struct NoData {
    applied: LogIndex,
}

impl StateMachine for NoData {
    type Capture = Vec<u8>;

    fn apply(&mut self, position: Position, _command: &Command) -> Vec<u8> {
        self.applied = position.index;
        Vec::new()
    }

    fn apply_noop(&mut self, position: Position) {
        self.applied = position.index;
    }

    fn query(&self, _query: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn capture(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(
        &mut self,
        index: LogIndex,
        _data: &mut dyn std::io::Read,
    ) -> Result<(), StorageError> {
        self.applied = index;
        Ok(())
    }

    fn reset(&mut self) {
        self.applied = LogIndex::ZERO;
    }
}

/// Why the node could not run.
#[derive(Debug)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunError {}

fn err(what: &str, e: impl std::fmt::Display) -> RunError {
    RunError(format!("{what}: {e}"))
}

/// Runs the node until SIGTERM or SIGINT (or a storage failure).
pub async fn run(checked: Checked) -> Result<(), RunError> {
    let file = &checked.file;
    std::fs::create_dir_all(&file.data_dir)
        .map_err(|e| err(&format!("data_dir {}", file.data_dir.display()), e))?;
    // The WAL first: its lock refuses a second process on this directory before
    // anything else is touched.
    let retention = file.wal.retention().map_err(|e| RunError(e.to_string()))?;
    let wal = Wal::open(
        file.data_dir.join("wal"),
        WalConfig::default().with_retention(retention),
    )
    .map_err(|e| err("the write-ahead log", e))?;
    let identity = Identity::load(&file.tls.ca, &file.tls.cert, &file.tls.key)
        .map_err(|e| err("the certificates (tls.*)", e))?;
    let witness = file.role == Role::Witness;
    match (file.transport, witness) {
        (TransportKind::Quic, false) => {
            let (sm, handle) = open_store(&checked)?;
            let t = quic(&identity, &checked)?;
            serve(&checked, t, wal, sm, Some(handle)).await
        }
        (TransportKind::Quic, true) => {
            let t = quic(&identity, &checked)?;
            serve(&checked, t, wal, NoData::default(), None).await
        }
        (TransportKind::Tcp, false) => {
            let (sm, handle) = open_store(&checked)?;
            let t = tcp(&identity, &checked)?;
            serve(&checked, t, wal, sm, Some(handle)).await
        }
        (TransportKind::Tcp, true) => {
            let t = tcp(&identity, &checked)?;
            serve(&checked, t, wal, NoData::default(), None).await
        }
    }
}

fn open_store(checked: &Checked) -> Result<(KvStore, StoreHandle), RunError> {
    let path = checked.file.data_dir.join("kv.redb");
    let store = KvStore::open(&path).map_err(|e| err("the key-value store", e))?;
    let handle = store.handle();
    Ok((store, handle))
}

impl TransportReadings for QuicTransport {
    fn refusals(&self) -> [(ha_tls::RefusalReason, u64); 4] {
        QuicTransport::refusals(self).by_reason()
    }

    fn connections(&self) -> Vec<ha_tls::PeerConnections> {
        QuicTransport::connections(self)
    }
}

impl TransportReadings for TcpTransport {
    fn refusals(&self) -> [(ha_tls::RefusalReason, u64); 4] {
        TcpTransport::refusals(self).by_reason()
    }

    fn connections(&self) -> Vec<ha_tls::PeerConnections> {
        TcpTransport::connections(self)
    }
}

fn quic(identity: &Identity, checked: &Checked) -> Result<QuicTransport, RunError> {
    let opts = QuicOptions::for_node(&checked.config).map_err(|e| err("listen.peer", e))?;
    QuicTransport::new(identity, opts).map_err(|e| err("the QUIC transport", e))
}

fn tcp(identity: &Identity, checked: &Checked) -> Result<TcpTransport, RunError> {
    let opts = TcpOptions::for_node(&checked.config).map_err(|e| err("listen.peer", e))?;
    TcpTransport::new(identity, opts).map_err(|e| err("the TCP transport", e))
}

async fn serve<T: Transport + TransportReadings + Clone, S: StateMachine>(
    checked: &Checked,
    transport: T,
    wal: Wal,
    sm: S,
    store: Option<StoreHandle>,
) -> Result<(), RunError> {
    let file = &checked.file;
    let bootstrap = match file.cluster_state {
        ClusterState::New => Bootstrap::NewCluster,
        ClusterState::Existing => Bootstrap::JoinExisting,
    };
    let events = Arc::new(EventLog::open(&file.data_dir).map_err(|e| {
        err(
            &format!(
                "the event history {}",
                file.data_dir.join(crate::events::FILE).display()
            ),
            e,
        )
    })?);
    let wal_gauges = wal.gauges();
    let readings: Arc<dyn TransportReadings> = Arc::new(transport.clone());
    let node: Node<T, Wal, S> = NodeBuilder::new(checked.config.clone())
        .transport(transport)
        .log_store(wal)
        .state_machine(sm)
        .bootstrap(bootstrap)
        .build()
        .map_err(|e| err("the node", e))?;
    // Subscribed before the start, so the history sees the first events.
    let history = tokio::spawn(keep_history(
        node.subscribe_observations(),
        Arc::clone(&events),
    ));
    events.node(NodeEvent::NodeStarted {
        role: format!("{:?}", file.role).to_lowercase(),
        cluster_state: format!("{:?}", file.cluster_state).to_lowercase(),
    });
    node.start()
        .await
        .map_err(|e| err("starting the node", e))?;
    let members: BTreeMap<NodeId, MemberApi> = file
        .members
        .iter()
        .map(|m| {
            let kind = match m.kind {
                Kind::Data => MemberKind::Data,
                Kind::Witness => MemberKind::Witness,
            };
            (
                NodeId(m.id),
                MemberApi {
                    kind,
                    api: m.api.trim_end_matches('/').to_string(),
                },
            )
        })
        .collect();
    let api_node: Arc<dyn NodeApi> = Arc::new(node.clone());
    let mode = crate::config::commit_mode_name(checked.config.commit_mode);
    let metrics = Arc::new(ApiMetrics::new(mode));
    let peers = checked
        .config
        .peers
        .iter()
        .map(|m| (m.id.0, m.kind))
        .collect();
    let sources = Sources {
        node: Arc::clone(&api_node),
        wal: wal_gauges,
        store_file: store.as_ref().map(|_| file.data_dir.join("kv.redb")),
        transport: readings,
        peers,
        info: NodeInfo {
            node_id: checked.config.node_id.0.to_string(),
            kind: if file.role == Role::Witness {
                "witness"
            } else {
                "data"
            },
            transport: match file.transport {
                TransportKind::Quic => "quic",
                TransportKind::Tcp => "tcp",
            },
            commit_mode: mode,
            version: env!("CARGO_PKG_VERSION"),
        },
    };
    let exporter = Exporter::new(&metrics, sources);
    let state = Arc::new(ApiState {
        node: api_node,
        metrics,
        exporter,
        events: Arc::clone(&events),
        refusal_lines: ha_core::ratelimit::Burst::default(),
        admin_token: checked.admin_token.clone(),
        members,
        request_timeout: REQUEST_TIMEOUT,
        client: Client::new(Duration::from_secs(2), Some(checked.admin_token.clone())),
    });
    let mut http = match HttpServer::bind(
        checked.api_listen,
        api::router(state),
        HttpLimits::default(),
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(err(&format!("listen.api {}", checked.api_listen), e));
        }
    };
    tracing::info!(
        node = checked.config.node_id.0,
        role = ?file.role,
        transport = ?file.transport,
        peer = %checked.config.bind_addr,
        api = %http.local_addr(),
        "ha-node running"
    );
    let why = wait_for_stop(&node, store.as_ref()).await;
    let reason = why.as_deref().unwrap_or("signal").to_string();
    tracing::info!(%reason, "stopping");
    events.node(NodeEvent::NodeStopping { reason });
    let stopped = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        http.shutdown().await;
        node.shutdown().await
    })
    .await;
    history.abort();
    match stopped {
        Err(_) => tracing::error!("shutdown did not finish in time; exiting anyway"),
        Ok(Err(e)) => tracing::warn!(error = %e, "node shutdown reported an error"),
        Ok(Ok(())) => tracing::info!("stopped"),
    }
    match why {
        None => Ok(()),
        Some(failure) => Err(RunError(failure)),
    }
}

/// Waits for SIGTERM or SIGINT (`None`), or for a storage failure (`Some`).
async fn wait_for_stop<T: Transport, S: StateMachine>(
    node: &Node<T, Wal, S>,
    store: Option<&StoreHandle>,
) -> Option<String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot watch SIGTERM: {e}")),
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot watch SIGINT: {e}")),
    };
    let mut status = node.subscribe_status();
    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => return None,
            _ = int.recv() => return None,
            changed = status.changed() => {
                if changed.is_err() || !status.borrow().running {
                    return Some("the replication node stopped (storage failure; see the log above)".into());
                }
            }
            _ = check.tick() => {
                if let Some(f) = store.and_then(StoreHandle::failure) {
                    return Some(format!("the key-value store failed: {f}"));
                }
            }
        }
    }
}

/// Copies every cluster event but the routine ones (pre-vote rounds) into the
/// history; a history that fell behind records how many it missed.
async fn keep_history(
    mut rx: tokio::sync::broadcast::Receiver<ha_core::observe::Observed>,
    events: Arc<EventLog>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(o) if o.observation.is_routine() => {}
            Ok(o) => events.observed(o),
            Err(RecvError::Lagged(count)) => events.node(NodeEvent::EventsMissed { count }),
            Err(RecvError::Closed) => return,
        }
    }
}
