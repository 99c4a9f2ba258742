//! Building the three members (data nodes n1 and n2, witness n3) over the chosen
//! network and log store.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use ha_core::testkit::memory::{MemLogStore, MemNetwork, MemTransport};
use ha_core::TransportError;
use ha_core::{
    Bootstrap, CommitMode, Config, LogStore, Member, MemberKind, Node, NodeBuilder, NodeId,
    Transport,
};
use ha_tls::certs::{CertificateAuthority, Identity, NodeCertSpec};
use ha_transport_quic::{QuicOptions, QuicTransport};
use ha_transport_tcp::{TcpOptions, TcpTransport};
use ha_wal::{Wal, WalConfig, WalMetrics};

use crate::kv::BenchKv;

/// Any error a run reports (rendered into its row).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The members, data nodes first: n1, n2, then the witness n3.
pub const IDS: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
/// The witness.
pub const WITNESS: NodeId = NodeId(3);

/// A benchmark node over transport `T` and log store `L`.
pub type BenchNode<T, L> = Node<T, L, BenchKv>;

/// A log store the benchmark can read group-commit counters from (the WAL), or
/// not (the in-memory store).
pub trait BenchStore: LogStore {
    /// The store's counters, if it keeps any.
    fn wal_metrics(&self) -> Option<WalMetrics>;
}

impl BenchStore for Wal {
    fn wal_metrics(&self) -> Option<WalMetrics> {
        Some(self.metrics())
    }
}

impl BenchStore for MemLogStore {
    fn wal_metrics(&self) -> Option<WalMetrics> {
        None
    }
}

/// The `Config` fields the flags set; everything else stays at its default.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `Config::commit_mode`.
    pub commit_mode: CommitMode,
    /// `Config::max_lag_on_failover` in async mode, if given (unset: the `Config`
    /// default, `ha_core::DEFAULT_ASYNC_LAG`; validate refuses it in the
    /// sync modes).
    pub max_lag: Option<u64>,
    /// `Config::snapshot_every`, if given.
    pub snapshot_every: Option<u64>,
}

fn kind(id: NodeId) -> MemberKind {
    if id == WITNESS {
        MemberKind::Witness
    } else {
        MemberKind::Data
    }
}

/// One config per member in [`IDS`] order, member `i` at `addrs[i]`.
pub fn configs(addrs: &[String], settings: Settings) -> Vec<Config> {
    IDS.iter()
        .zip(addrs)
        .map(|(id, bind)| {
            let peers = IDS
                .iter()
                .zip(addrs)
                .filter(|(m, _)| *m != id)
                .map(|(m, a)| Member {
                    id: *m,
                    addr: a.clone(),
                    kind: kind(*m),
                })
                .collect();
            let mut c = Config::new(*id, kind(*id), bind.clone(), peers);
            c.commit_mode = settings.commit_mode;
            c.max_lag_on_failover = match settings.commit_mode {
                CommitMode::Async => settings.max_lag,
                CommitMode::Sync | CommitMode::SyncApply => None,
            };
            if let Some(n) = settings.snapshot_every {
                c.snapshot_every = n;
            }
            c
        })
        .collect()
}

/// Free loopback UDP ports, one per member (bound together so they differ).
pub fn loopback_addresses() -> std::io::Result<Vec<String>> {
    let sockets = IDS
        .iter()
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    sockets
        .iter()
        .map(|s| s.local_addr().map(|a: SocketAddr| a.to_string()))
        .collect()
}

/// Addresses on the in-memory network (names only; it routes by node id).
pub fn mem_addresses() -> Vec<String> {
    IDS.iter().map(|id| format!("mem://{id}")).collect()
}

/// Free loopback TCP ports, one per member (bound together so they differ).
pub fn tcp_loopback_addresses() -> std::io::Result<Vec<String>> {
    let listeners = IDS
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a: SocketAddr| a.to_string()))
        .collect()
}

/// TLS transports made by `make`, with a fresh cluster CA and node
/// certificates.
fn tls_transports<T>(
    configs: &[Config],
    make: impl Fn(&Identity, &Config) -> Result<T, TransportError>,
) -> Result<Vec<T>, BoxError> {
    let ca = CertificateAuthority::generate("ha-bench CA", 2)?;
    configs
        .iter()
        .map(|c| {
            let cert = ca.issue(&NodeCertSpec::new(c.node_id, 2))?;
            let identity = Identity::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
            Ok(make(&identity, c)?)
        })
        .collect()
}

/// QUIC transports with a fresh cluster CA and node certificates.
pub fn quic_transports(configs: &[Config]) -> Result<Vec<QuicTransport>, BoxError> {
    tls_transports(configs, |id, c| {
        QuicTransport::new(id, QuicOptions::for_node(c)?)
    })
}

/// TCP transports with a fresh cluster CA and node certificates.
pub fn tcp_transports(configs: &[Config]) -> Result<Vec<TcpTransport>, BoxError> {
    tls_transports(configs, |id, c| {
        TcpTransport::new(id, TcpOptions::for_node(c)?)
    })
}

/// Transports on one new in-memory network.
pub fn mem_transports(configs: &[Config]) -> Vec<MemTransport> {
    let net = MemNetwork::new();
    configs.iter().map(|c| net.transport(c.node_id)).collect()
}

/// A write-ahead log per member under `dir` (default `WalConfig`: fsync on).
pub fn wal_stores(configs: &[Config], dir: &Path) -> Result<Vec<Wal>, BoxError> {
    configs
        .iter()
        .map(|c| {
            Ok(Wal::open(
                dir.join(format!("node-{}", c.node_id.0)),
                WalConfig::default(),
            )?)
        })
        .collect()
}

/// An in-memory log store per member.
pub fn mem_stores(configs: &[Config]) -> Vec<MemLogStore> {
    configs.iter().map(|_| MemLogStore::new()).collect()
}

/// The members, not yet started, in [`IDS`] order.
pub fn build<T: Transport, L: BenchStore>(
    configs: &[Config],
    transports: Vec<T>,
    stores: Vec<L>,
) -> Result<Vec<BenchNode<T, L>>, BoxError> {
    configs
        .iter()
        .zip(transports)
        .zip(stores)
        .map(|((c, t), s)| {
            Ok(NodeBuilder::new(c.clone())
                .transport(t)
                .log_store(s)
                .state_machine(BenchKv::new())
                .bootstrap(Bootstrap::NewCluster)
                .build()?)
        })
        .collect()
}
