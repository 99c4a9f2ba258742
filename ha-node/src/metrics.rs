//! `GET /metrics`: the node's metrics in the OpenMetrics text format, with
//! `prometheus-client` (the Prometheus project's own Rust client: typed metrics,
//! an OpenMetrics encoder and collectors read at scrape time, so no exposition
//! text is written by hand).
//!
//! Two kinds of metric: the API's own (writes and reads by outcome, write
//! latency, refused admin calls), live `prometheus-client` metrics updated as
//! requests finish; and everything else, read from the node, the WAL, the
//! transport and `/proc/self` on each scrape by [`NodeCollector`]. Every label
//! value comes from a fixed set or from the configured members, so no label
//! grows without bound. `docs/metrics.md` lists every metric (a test compares).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ha_core::histogram::HistogramReading;
use ha_core::{MemberKind, Role};
use ha_tls::{Direction, PeerConnections, RefusalReason};
use ha_wal::WalGauges;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::api::NodeApi;

/// The content type of [`Exporter::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a client write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    outcome: &'static str,
}

/// Labels of a client write's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    mode: &'static str,
    outcome: &'static str,
}

/// Labels of a client read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    consistency: &'static str,
    outcome: &'static str,
}

/// Labels of a refused admin call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The API's live metrics: updated by the handlers as requests finish.
#[derive(Debug)]
pub struct ApiMetrics {
    mode: &'static str,
    writes: Family<WriteLabels, Counter>,
    write_seconds: Family<LatencyLabels, Histogram>,
    reads: Family<ReadLabels, Counter>,
    admin_refused: Family<ReasonLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(ha_core::histogram::DURATION_BOUNDS.iter().copied())
}

impl ApiMetrics {
    /// Metrics of a node committing in `mode` (`"sync"`, ...).
    pub fn new(mode: &'static str) -> Self {
        let m = ApiMetrics {
            mode,
            writes: Family::default(),
            write_seconds: Family::new_with_constructor(latency_histogram),
            reads: Family::default(),
            admin_refused: Family::default(),
        };
        // The common series exist from the start at 0, so a rate() over them
        // starts at the first scrape instead of the first request.
        let _ = m.writes.get_or_create(&WriteLabels { outcome: "acked" });
        for consistency in ["linearizable", "stale"] {
            let _ = m.reads.get_or_create(&ReadLabels {
                consistency,
                outcome: "ok",
            });
        }
        for reason in ["unauthorized", "forbidden"] {
            let _ = m.admin_refused.get_or_create(&ReasonLabels { reason });
        }
        m
    }

    /// A client write finished with `outcome` (`acked`, `not_primary`,
    /// `indeterminate`, `busy`, ...) after `took`.
    pub fn write_done(&self, outcome: &'static str, took: Duration) {
        self.writes.get_or_create(&WriteLabels { outcome }).inc();
        self.write_seconds
            .get_or_create(&LatencyLabels {
                mode: self.mode,
                outcome,
            })
            .observe(took.as_secs_f64());
    }

    /// A client read finished.
    pub fn read_done(&self, consistency: &'static str, outcome: &'static str) {
        self.reads
            .get_or_create(&ReadLabels {
                consistency,
                outcome,
            })
            .inc();
    }

    /// An admin call was refused (`unauthorized` or `forbidden`).
    pub fn admin_refused(&self, reason: &'static str) {
        self.admin_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "ha_client_writes",
            "Client writes answered, by outcome (acked, mismatch, invalid, not_primary, indeterminate, busy, timeout, shutting_down, internal)",
            self.writes.clone(),
        );
        r.register(
            "ha_client_write_duration_seconds",
            "Time from a client write's arrival to its answer, by commit mode and outcome",
            self.write_seconds.clone(),
        );
        r.register(
            "ha_client_reads",
            "Client reads answered, by consistency (linearizable, stale) and outcome",
            self.reads.clone(),
        );
        r.register(
            "ha_admin_refused",
            "Admin calls refused, by reason (unauthorized: no token, forbidden: a wrong one)",
            self.admin_refused.clone(),
        );
    }
}

/// What the metrics read from the transport at scrape time.
pub trait TransportReadings: Send + Sync {
    /// Refused handshakes since start, by reason.
    fn refusals(&self) -> [(RefusalReason, u64); 4];
    /// Every other member's connections: open now and opened since start.
    fn connections(&self) -> Vec<PeerConnections>;
}

/// What [`NodeCollector`] reads on each scrape.
pub struct Sources {
    /// The node.
    pub node: Arc<dyn NodeApi>,
    /// Its write-ahead log.
    pub wal: WalGauges,
    /// The key-value store's file (none on a witness).
    pub store_file: Option<PathBuf>,
    /// The transport's refusals and connections.
    pub transport: Arc<dyn TransportReadings>,
    /// Every member but this node: id and kind.
    pub peers: Vec<(u64, MemberKind)>,
    /// This node's id, kind, transport and commit mode, for `ha_node_info`.
    pub info: NodeInfo,
}

/// `ha_node_info`'s labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeInfo {
    /// This node's id.
    pub node_id: String,
    /// `data` or `witness`.
    pub kind: &'static str,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// The commit mode.
    pub commit_mode: &'static str,
    /// The binary's version.
    pub version: &'static str,
}

/// The metrics read at scrape time.
pub struct NodeCollector(Sources);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// The registry behind `/metrics`.
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    /// An exporter of `api`'s metrics and of what `sources` read.
    pub fn new(api: &ApiMetrics, sources: Sources) -> Self {
        let mut registry = Registry::default();
        api.register(&mut registry);
        registry.register_collector(Box::new(NodeCollector(sources)));
        Exporter { registry }
    }

    /// The exposition text (OpenMetrics, ending with `# EOF`).
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A `peer` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirection {
    peer: String,
    direction: &'static str,
}

/// One label of a given name.
type One = [(&'static str, &'static str); 1];

/// Two labels.
type Two = [(&'static str, &'static str); 2];

fn one(k: &'static str, v: &'static str) -> One {
    [(k, v)]
}

fn two(k1: &'static str, v1: &'static str, k2: &'static str, v2: &'static str) -> Two {
    [(k1, v1), (k2, v2)]
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge with one sample per label set.
fn gauges<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter with one sample per label set.
fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_histogram(m: &mut MetricEncoder, h: &HistogramReading) -> fmt::Result {
    let buckets = h.cumulative();
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count(), &buckets, None)
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramReading,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    encode_histogram(&mut m, h)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

const ROLES: [(Role, &str); 5] = [
    (Role::Primary, "primary"),
    (Role::Standby, "standby"),
    (Role::Candidate, "candidate"),
    (Role::Witness, "witness"),
    (Role::Learner, "learner"),
];

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.0;
        let st = s.node.status();
        let m = s.node.metrics();
        let e = &mut e;
        gauges(
            e,
            "ha_node_info",
            "This node: id, kind, transport, commit mode and version (always 1)",
            [(s.info.clone(), 1.0)],
        )?;
        gauges(
            e,
            "ha_role",
            "1 for this node's current role, 0 for the others",
            ROLES
                .iter()
                .map(|(r, name)| (one("role", name), flag(st.role == *r))),
        )?;
        gauge(
            e,
            "ha_term",
            "The current term's number",
            st.term.number as f64,
        )?;
        gauge(
            e,
            "ha_is_primary",
            "1 while this node is the primary",
            flag(st.role == Role::Primary),
        )?;
        gauge(
            e,
            "ha_has_lease",
            "1 while this primary holds its lease (writes and linearizable reads are served)",
            flag(st.lease_remaining.is_some()),
        )?;
        gauge(
            e,
            "ha_lease_remaining_seconds",
            "How long this primary's lease still runs (0 without one)",
            st.lease_remaining.map_or(0.0, secs),
        )?;
        gauge(
            e,
            "ha_has_leader",
            "1 while this node knows a primary",
            flag(st.leader.is_some()),
        )?;
        gauge(
            e,
            "ha_failover_paused",
            "1 while automatic failover is paused (or off by config)",
            flag(st.failover_paused),
        )?;
        gauge(
            e,
            "ha_degraded",
            "1 while this primary commits without the standby (degraded sync)",
            flag(st.degraded),
        )?;
        gauge(
            e,
            "ha_running",
            "1 while the replication node runs",
            flag(st.running),
        )?;
        gauge(
            e,
            "ha_commit_index",
            "The highest log index known committed",
            st.commit_index.0 as f64,
        )?;
        gauge(
            e,
            "ha_applied_index",
            "The highest log index applied to the state machine",
            st.applied_index.0 as f64,
        )?;
        gauge(
            e,
            "ha_last_index",
            "The last index in this node's log",
            st.last_position.index.0 as f64,
        )?;
        gauge(
            e,
            "ha_durable_index",
            "The highest index durable in this node's log",
            st.durable_index.0 as f64,
        )?;
        gauge(
            e,
            "ha_lag_entries",
            "Entries between the primary's last index and this node's (0 on the primary)",
            st.lag as f64,
        )?;
        self.encode_peers(e, &st)?;
        self.encode_counters(e, &m)?;
        self.encode_histograms(e, &m)?;
        self.encode_sizes(e)
    }
}

impl NodeCollector {
    fn encode_peers(&self, e: &mut DescriptorEncoder, st: &ha_core::HealthStatus) -> fmt::Result {
        let s = &self.0;
        let last = st.last_position.index;
        let peer = |id: u64| PeerLabel {
            peer: id.to_string(),
        };
        let status = |id: u64| st.peers.iter().find(|p| p.id.0 == id);
        // Lag is known on the primary only (it tracks what each peer holds).
        let primary = st.role == Role::Primary;
        let data_peers: Vec<u64> = s
            .peers
            .iter()
            .filter(|(_, k)| *k == MemberKind::Data)
            .map(|(id, _)| *id)
            .collect();
        let matched = |id: u64| status(id).and_then(|p| p.match_index);
        gauges(
            e,
            "ha_peer_lag_entries",
            "On the primary: entries a standby lacks (last index minus its match index)",
            data_peers.iter().filter(|_| primary).map(|id| {
                let lag = matched(*id).map_or(last.0, |m| last.0.saturating_sub(m.0));
                (peer(*id), lag as f64)
            }),
        )?;
        gauges(
            e,
            "ha_peer_lag_bytes",
            "On the primary: durable log bytes a standby lacks",
            data_peers.iter().filter(|_| primary).map(|id| {
                let from = matched(*id).unwrap_or(ha_core::LogIndex::ZERO);
                (peer(*id), s.wal.bytes_after(from) as f64)
            }),
        )?;
        gauges(
            e,
            "ha_peer_match_index",
            "On the primary: the highest index each standby durably holds",
            data_peers
                .iter()
                .filter_map(|id| matched(*id).map(|m| (peer(*id), m.0 as f64))),
        )?;
        gauges(
            e,
            "ha_peer_last_contact_seconds",
            "Time since each peer last answered (absent if it never did)",
            s.peers.iter().filter_map(|(id, _)| {
                status(*id)
                    .and_then(|p| p.last_contact)
                    .map(|d| (peer(*id), secs(d)))
            }),
        )?;
        gauges(
            e,
            "ha_peer_healthy",
            "1 if the peer answered within the failover timeout",
            s.peers
                .iter()
                .map(|(id, _)| (peer(*id), flag(status(*id).is_some_and(|p| p.healthy)))),
        )?;
        Ok(())
    }

    fn encode_counters(
        &self,
        e: &mut DescriptorEncoder,
        m: &ha_core::driver::Metrics,
    ) -> fmt::Result {
        let c = &m.cluster;
        counters(
            e,
            "ha_elections_started",
            "Campaigns this node started, by round (pre_vote, vote)",
            [
                (one("round", "pre_vote"), c.pre_votes_started),
                (one("round", "vote"), c.elections_started),
            ],
        )?;
        counter(
            e,
            "ha_elections_won",
            "Elections this node won",
            c.elections_won,
        )?;
        counter(
            e,
            "ha_elections_lost",
            "Campaigns of this node that ran out of time without a majority",
            c.elections_lost,
        )?;
        counter(
            e,
            "ha_forced_promotions",
            "Promotions of this node without votes",
            c.forced_promotions,
        )?;
        counter(
            e,
            "ha_pre_votes_refused",
            "Pre-vote answers refused to this node's campaigns",
            c.pre_votes_refused,
        )?;
        counters(
            e,
            "ha_votes_cast",
            "Answers this node gave to candidates, by round and whether granted",
            [
                (two("round", "vote", "granted", "true"), c.votes_granted),
                (two("round", "vote", "granted", "false"), c.votes_refused),
                (
                    two("round", "pre_vote", "granted", "false"),
                    c.pre_votes_denied,
                ),
            ],
        )?;
        counter(
            e,
            "ha_leader_changes",
            "Changes of the primary this node knows to another node",
            c.leader_changes,
        )?;
        counter(
            e,
            "ha_role_changes",
            "Changes of this node's role, term or known primary",
            m.role_changes,
        )?;
        counter(
            e,
            "ha_fences_sent",
            "Fences this primary sent",
            c.fences_sent,
        )?;
        counter(
            e,
            "ha_fences_received",
            "Fences of a newer primary this node obeyed",
            c.fences_received,
        )?;
        counter(
            e,
            "ha_degraded_periods",
            "Periods of degraded sync this primary entered (the standby's floor raised at the witness)",
            c.degraded_periods,
        )?;
        counter(
            e,
            "ha_switchovers",
            "Switchovers this primary started",
            c.switchovers,
        )?;
        counter(
            e,
            "ha_snapshots_taken",
            "Snapshots of the state machine taken and saved",
            m.snapshots_taken,
        )?;
        counter(
            e,
            "ha_snapshots_sent",
            "Snapshot transfers to a peer whose last chunk was sent",
            m.snapshots_sent,
        )?;
        counter(
            e,
            "ha_snapshots_installed",
            "Snapshots received from the primary and installed",
            m.snapshots_installed,
        )?;
        counters(
            e,
            "ha_streamed_bytes",
            "Bytes sent to peers, by kind (wal: entries, snapshot: snapshot chunks)",
            [
                (one("kind", "wal"), m.wal_bytes_sent),
                (one("kind", "snapshot"), m.snapshot_bytes_sent),
            ],
        )?;
        counter(
            e,
            "ha_catch_up_reads",
            "Reads of the durable log that served a lagging standby",
            m.catch_up_reads,
        )?;
        counter(
            e,
            "ha_peer_requests",
            "Requests received from peers",
            m.peer_requests,
        )?;
        counter(
            e,
            "ha_peer_send_failures",
            "Requests to peers that failed in the transport (retried by the engine)",
            m.send_failures,
        )?;
        counter(
            e,
            "ha_discarded_writes",
            "Acknowledged writes discarded by a failover (async commit mode only)",
            m.discarded,
        )?;
        counters(
            e,
            "ha_tls_handshakes_refused",
            "Peer connections refused, by reason (handshake, identity, timeout, overload)",
            self.0
                .transport
                .refusals()
                .into_iter()
                .map(|(r, n)| (one("reason", r.as_str()), n)),
        )?;
        let conns = self.0.transport.connections();
        let by_direction = |read: fn(&PeerConnections, Direction) -> u64| {
            conns.iter().flat_map(move |c| {
                Direction::ALL.map(|d| {
                    let labels = PeerDirection {
                        peer: c.peer.0.to_string(),
                        direction: d.as_str(),
                    };
                    (labels, read(c, d))
                })
            })
        };
        counters(
            e,
            "ha_peer_connections_opened",
            "Authenticated connections opened with each peer, by who dialed (inbound, outbound)",
            by_direction(PeerConnections::opened),
        )?;
        gauges(
            e,
            "ha_peer_connections",
            "Connections open with each peer now, by who dialed (QUIC: one per pair once settled; TCP: control and WAL)",
            by_direction(PeerConnections::open).map(|(l, n)| (l, n as f64)),
        )?;
        let w = self.0.wal.metrics();
        counter(
            e,
            "ha_wal_appends",
            "Appends made durable in the WAL",
            w.appends,
        )?;
        counter(
            e,
            "ha_wal_fsyncs",
            "Group commits (one write and fdatasync each)",
            w.fsyncs,
        )?;
        counter(
            e,
            "ha_wal_written_bytes",
            "Record bytes written to the WAL",
            w.bytes,
        )
    }

    fn encode_histograms(
        &self,
        e: &mut DescriptorEncoder,
        m: &ha_core::driver::Metrics,
    ) -> fmt::Result {
        let f = self.0.wal.fsync_histograms();
        histogram(
            e,
            "ha_wal_fsync_duration_seconds",
            "Duration of each WAL fdatasync",
            &f.duration,
        )?;
        histogram(
            e,
            "ha_wal_entries_per_fsync",
            "Entries made durable by each WAL fdatasync (group commit)",
            &f.entries,
        )?;
        {
            let mut fam = e.encode_descriptor(
                "ha_heartbeat_rtt_seconds",
                "Round trip of each answered heartbeat, per peer",
                None,
                MetricType::Histogram,
            )?;
            for (id, h) in &m.heartbeat_rtt {
                let labels = PeerLabel {
                    peer: id.0.to_string(),
                };
                encode_histogram(&mut fam.encode_family(&labels)?, h)?;
            }
        }
        if let Some(h) = &m.snapshot_transfer {
            histogram(
                e,
                "ha_snapshot_transfer_duration_seconds",
                "Duration of each snapshot received, first chunk to last",
                h,
            )?;
        }
        gauge(
            e,
            "ha_engine_tick_lateness_max_seconds",
            "The latest an engine tick ran after its time since start",
            m.tick_lateness.max_us as f64 / 1e6,
        )
    }

    fn encode_sizes(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        gauge(
            e,
            "ha_wal_segments",
            "Segment files of the WAL",
            s.wal.segment_count() as f64,
        )?;
        gauge(
            e,
            "ha_wal_size_bytes",
            "Durable record bytes in the WAL's segments",
            s.wal.segment_bytes() as f64,
        )?;
        if let Some(path) = &s.store_file {
            let size = std::fs::metadata(path).map_or(0, |m| m.len());
            gauge(
                e,
                "ha_store_size_bytes",
                "Size of the key-value store's file",
                size as f64,
            )?;
        }
        let proc = crate::procstat::read();
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory of this process",
            proc.rss_bytes as f64,
        )?;
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors of this process",
            proc.open_fds as f64,
        )?;
        gauge(
            e,
            "process_threads",
            "Threads of this process",
            proc.threads as f64,
        )
    }
}
