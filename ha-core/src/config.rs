//! Node configuration: the seed's HA fields plus what docs/protocol.md adds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{CommitMode, MemberKind, NodeId};

/// Another member of the cluster, as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its identity.
    pub id: NodeId,
    /// Where to reach it (`host:port`).
    pub addr: String,
    /// Data node or witness.
    pub kind: MemberKind,
}

/// The role named in a node's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfiguredRole {
    /// The data node expected to lead.
    Primary,
    /// The data node expected to follow.
    Standby,
    /// The witness.
    Witness,
}

/// The entries an async-mode failover may lose when
/// [`Config::max_lag_on_failover`] is unset: two full default batches, about
/// 100 KiB of 100-byte writes or 1 MiB of 1 KiB ones (Patroni's default allowance
/// is 1 MiB). Enough that the primary rarely waits for the witness to record a
/// standby floor, small enough that a failover loses at most a moment of writes.
pub const DEFAULT_ASYNC_LAG: u64 = 1024;

/// The largest [`Config::snapshot_chunk_bytes`]: a chunk and its request's
/// other fields stay well under the wire's frame cap
/// ([`crate::wire::MAX_FRAME_BYTES`]).
pub const MAX_SNAPSHOT_CHUNK_BYTES: usize = 8 << 20;

/// Everything a node needs to take part in replication.
///
/// Build one with [`Config::new`] (LAN defaults) and check it with
/// [`Config::validate`] before use; the engine and driver assume a valid config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This node's identity.
    pub node_id: NodeId,
    /// What this node is: a data node or the witness.
    pub kind: MemberKind,
    /// The role the operator intends (the seed's `Role`). Every node still starts
    /// as a follower; a data node configured as primary only campaigns first when
    /// no primary is found (it skips the election-timeout jitter once).
    pub role: ConfiguredRole,
    /// The local address to listen on.
    pub bind_addr: String,
    /// The address peers use to reach this node.
    pub advertise_addr: String,
    /// The other members: for a data node, the other data node and (for automatic
    /// failover) the witness; for the witness, both data nodes.
    pub peers: Vec<Member>,
    /// How often the primary sends heartbeats.
    pub heartbeat_interval: Duration,
    /// The lower bound of the randomised election timeout: how long a standby waits
    /// without hearing the primary before it runs a pre-vote.
    pub failover_timeout: Duration,
    /// The randomised election timeout is drawn from
    /// `[failover_timeout, failover_timeout + failover_jitter)`.
    pub failover_jitter: Duration,
    /// Whether a standby elects itself when the primary is gone.
    pub auto_failover: bool,
    /// Allows automatic failover without a witness. With two voters a partition can
    /// elect nobody, and this flag does not change that; it only exists so a
    /// deployment that accepts the risk must say so.
    pub unsafe_auto_failover_without_witness: bool,
    /// How far a write must travel before its client is acknowledged.
    pub commit_mode: CommitMode,
    /// In sync modes: never commit without the standby (no degraded sync through the
    /// witness); writes wait and time out while the standby is away.
    pub strict_sync: bool,
    /// In async mode: at most this many acknowledged entries may be lost on
    /// failover; `None` means [`DEFAULT_ASYNC_LAG`]. The primary acknowledges a
    /// write once it is durable on the primary and the witness has recorded a
    /// standby floor at most this far behind it, so with a lag of a few batches it
    /// rarely waits for the witness (a lag of 0 waits on every commit, and is no
    /// faster than sync). Must be `None` in the sync modes, which lose nothing.
    pub max_lag_on_failover: Option<u64>,
    /// How long the primary waits for a standby ack before it falls back to recording
    /// a floor at the witness (degraded sync).
    pub degrade_timeout: Duration,
    /// Maximum entries per WAL batch.
    pub wal_batch_size: usize,
    /// Maximum bytes per WAL batch.
    pub wal_batch_bytes: usize,
    /// How long the primary may hold entries back to fill a batch while an
    /// earlier batch is in flight. With nothing in flight a batch leaves at once
    /// (a lone client pays no added delay); with batches in flight, new entries
    /// wait until a batch is full, an ack frees the window, or the oldest of them
    /// has waited this long (checked at every engine step, ticks included).
    pub wal_batch_timeout: Duration,
    /// Batches in flight to one peer before the primary waits for acks.
    pub max_inflight_batches: usize,
    /// Bytes in flight to one peer before the primary waits for acks (one batch
    /// may always be in flight, whatever its size).
    pub max_inflight_bytes: usize,
    /// Deadline of every RPC.
    pub rpc_timeout: Duration,
    /// First reconnect delay after a lost connection.
    pub reconnect_interval: Duration,
    /// Maximum reconnect delay (exponential backoff with jitter up to this).
    pub max_reconnect_backoff: Duration,
    /// The engine's tick; the lease is shortened by one tick.
    pub tick_interval: Duration,
    /// Bound on the relative clock-rate difference between nodes, in parts per
    /// million (10_000 = 1 %).
    pub clock_drift_ppm: u32,
    /// Take a state-machine snapshot and compact the log every this many entries.
    pub snapshot_every: u64,
    /// Bytes of snapshot per `InstallSnapshot` chunk: a snapshot of any size
    /// travels as chunks with offsets, each one request under `rpc_timeout`
    /// and well under the wire's frame cap.
    pub snapshot_chunk_bytes: usize,
    /// Backpressure: the primary refuses new writes while this many entries wait
    /// to commit (for example while strict sync waits for an absent standby).
    pub max_uncommitted_entries: u64,
}

/// A config field that is out of range, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid config field `{field}`: {reason}")]
pub struct ConfigError {
    /// The field's name as written in the config file.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl Config {
    /// A config with LAN defaults: heartbeat 50 ms, failover after 150–250 ms, sync
    /// commit, degraded sync through the witness after 100 ms.
    pub fn new(
        node_id: NodeId,
        kind: MemberKind,
        bind_addr: impl Into<String>,
        peers: Vec<Member>,
    ) -> Self {
        let bind_addr = bind_addr.into();
        let role = match kind {
            MemberKind::Data => ConfiguredRole::Standby,
            MemberKind::Witness => ConfiguredRole::Witness,
        };
        Config {
            node_id,
            kind,
            role,
            advertise_addr: bind_addr.clone(),
            bind_addr,
            peers,
            heartbeat_interval: Duration::from_millis(50),
            failover_timeout: Duration::from_millis(150),
            failover_jitter: Duration::from_millis(100),
            auto_failover: true,
            unsafe_auto_failover_without_witness: false,
            commit_mode: CommitMode::Sync,
            strict_sync: false,
            max_lag_on_failover: None,
            degrade_timeout: Duration::from_millis(100),
            wal_batch_size: 512,
            wal_batch_bytes: 1 << 20,
            wal_batch_timeout: Duration::from_micros(200),
            max_inflight_batches: 8,
            max_inflight_bytes: 8 << 20,
            rpc_timeout: Duration::from_millis(500),
            reconnect_interval: Duration::from_millis(20),
            max_reconnect_backoff: Duration::from_secs(1),
            tick_interval: Duration::from_millis(5),
            clock_drift_ppm: 10_000,
            snapshot_every: 100_000,
            snapshot_chunk_bytes: 1 << 20,
            max_uncommitted_entries: 100_000,
        }
    }

    /// The other data node, if this node's config names one.
    pub fn data_peer(&self) -> Option<&Member> {
        if self.kind == MemberKind::Data {
            self.peers.iter().find(|m| m.kind == MemberKind::Data)
        } else {
            None
        }
    }

    /// The seed's `PeerAddr`: the other data node's address.
    pub fn peer_addr(&self) -> Option<&str> {
        self.data_peer().map(|m| m.addr.as_str())
    }

    /// The witness, if configured (for the witness itself: `None`).
    pub fn witness(&self) -> Option<&Member> {
        self.peers.iter().find(|m| m.kind == MemberKind::Witness)
    }

    /// The member with this id (peers only).
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.peers.iter().find(|m| m.id == id)
    }

    /// True if automatic failover is on and allowed: there is a witness, or the
    /// unsafe option says so.
    pub fn auto_failover_enabled(&self) -> bool {
        self.auto_failover
            && (self.witness().is_some() || self.unsafe_auto_failover_without_witness)
    }

    /// The longest lease a primary may hold, measured on its own clock:
    /// `failover_timeout × (1 − ρ)/(1 + ρ)` minus one tick (docs/protocol.md,
    /// "Lease").
    pub fn lease_duration(&self) -> Duration {
        let rho = f64::from(self.clock_drift_ppm) / 1_000_000.0;
        let scaled = self.failover_timeout.as_secs_f64() * (1.0 - rho) / (1.0 + rho);
        Duration::from_secs_f64(scaled).saturating_sub(self.tick_interval)
    }

    /// Entries a failover may lose: `max_lag_on_failover` (or
    /// [`DEFAULT_ASYNC_LAG`]) in async mode, else 0.
    pub fn allowed_lag(&self) -> u64 {
        match self.commit_mode {
            CommitMode::Async => self.max_lag_on_failover.unwrap_or(DEFAULT_ASYNC_LAG),
            CommitMode::Sync | CommitMode::SyncApply => 0,
        }
    }

    /// Checks every field; the error names the first bad field and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.0 == 0 {
            return Err(bad(
                "node_id",
                "0 is reserved for the empty term; use 1 or more",
            ));
        }
        if self.bind_addr.trim().is_empty() {
            return Err(bad("bind_addr", "must not be empty"));
        }
        if self.advertise_addr.trim().is_empty() {
            return Err(bad("advertise_addr", "must not be empty"));
        }
        if (self.kind == MemberKind::Witness) != (self.role == ConfiguredRole::Witness) {
            return Err(bad(
                "role",
                "must be `witness` exactly when the node is the witness",
            ));
        }
        let mut ids: Vec<NodeId> = self.peers.iter().map(|m| m.id).collect();
        ids.push(self.node_id);
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(bad(
                "peers",
                "member ids must be distinct from each other and from node_id",
            ));
        }
        if self.peers.iter().any(|m| m.id.0 == 0) {
            return Err(bad("peers", "member id 0 is reserved"));
        }
        if self.peers.iter().any(|m| m.addr.trim().is_empty()) {
            return Err(bad("peers", "every member needs an address"));
        }
        let data = self
            .peers
            .iter()
            .filter(|m| m.kind == MemberKind::Data)
            .count();
        let witnesses = self
            .peers
            .iter()
            .filter(|m| m.kind == MemberKind::Witness)
            .count();
        match self.kind {
            MemberKind::Data if data != 1 => {
                return Err(bad(
                    "peers",
                    format!("a data node needs exactly one other data node, found {data}"),
                ))
            }
            MemberKind::Data if witnesses > 1 => return Err(bad("peers", "at most one witness")),
            MemberKind::Witness if data != 2 || witnesses != 0 => {
                return Err(bad(
                    "peers",
                    "a witness needs exactly the two data nodes as peers",
                ))
            }
            _ => {}
        }
        if self.heartbeat_interval.is_zero() {
            return Err(bad("heartbeat_interval", "must be greater than zero"));
        }
        if self.tick_interval.is_zero() {
            return Err(bad("tick_interval", "must be greater than zero"));
        }
        if self.tick_interval > self.heartbeat_interval {
            return Err(bad("tick_interval", "must not exceed heartbeat_interval"));
        }
        if self.failover_timeout < self.heartbeat_interval * 2 {
            return Err(bad(
                "failover_timeout",
                "must be at least twice heartbeat_interval",
            ));
        }
        if self.clock_drift_ppm >= 500_000 {
            return Err(bad("clock_drift_ppm", "must be below 500000 (50 %)"));
        }
        if self.lease_duration() <= self.heartbeat_interval {
            return Err(bad(
                "failover_timeout",
                "the lease it allows (shortened for clock drift and one tick) must exceed heartbeat_interval",
            ));
        }
        if self.degrade_timeout.is_zero() {
            return Err(bad("degrade_timeout", "must be greater than zero"));
        }
        if self.wal_batch_size == 0 {
            return Err(bad("wal_batch_size", "must be at least 1"));
        }
        if self.wal_batch_bytes < 1024 {
            return Err(bad("wal_batch_bytes", "must be at least 1024"));
        }
        if self.max_inflight_batches == 0 {
            return Err(bad("max_inflight_batches", "must be at least 1"));
        }
        if self.max_inflight_bytes == 0 {
            return Err(bad("max_inflight_bytes", "must be at least 1"));
        }
        if self.rpc_timeout.is_zero() {
            return Err(bad("rpc_timeout", "must be greater than zero"));
        }
        if self.reconnect_interval.is_zero() {
            return Err(bad("reconnect_interval", "must be greater than zero"));
        }
        if self.max_reconnect_backoff < self.reconnect_interval {
            return Err(bad(
                "max_reconnect_backoff",
                "must be at least reconnect_interval",
            ));
        }
        if self.max_uncommitted_entries == 0 {
            return Err(bad("max_uncommitted_entries", "must be at least 1"));
        }
        if self.snapshot_every == 0 {
            return Err(bad("snapshot_every", "must be at least 1"));
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes > MAX_SNAPSHOT_CHUNK_BYTES {
            return Err(bad(
                "snapshot_chunk_bytes",
                format!("must be between 1 and {MAX_SNAPSHOT_CHUNK_BYTES}"),
            ));
        }
        if self.commit_mode != CommitMode::Async && self.max_lag_on_failover.is_some() {
            return Err(bad(
                "max_lag_on_failover",
                "only applies in async commit mode; leave it unset",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_config() -> Config {
        Config::new(
            NodeId(1),
            MemberKind::Data,
            "127.0.0.1:7001",
            vec![
                Member {
                    id: NodeId(2),
                    addr: "127.0.0.1:7002".into(),
                    kind: MemberKind::Data,
                },
                Member {
                    id: NodeId(3),
                    addr: "127.0.0.1:7003".into(),
                    kind: MemberKind::Witness,
                },
            ],
        )
    }

    #[test]
    fn defaults_are_valid_and_lease_is_shorter_than_failover() {
        let c = data_config();
        c.validate().expect("defaults validate");
        assert!(c.lease_duration() < c.failover_timeout);
        assert!(c.lease_duration() > c.heartbeat_interval);
        assert!(c.auto_failover_enabled());
    }

    #[test]
    fn errors_name_the_bad_field() {
        let mut c = data_config();
        c.heartbeat_interval = Duration::ZERO;
        assert_eq!(c.validate().map_err(|e| e.field), Err("heartbeat_interval"));

        let mut c = data_config();
        c.failover_timeout = Duration::from_millis(60);
        assert_eq!(c.validate().map_err(|e| e.field), Err("failover_timeout"));

        let mut c = data_config();
        c.peers[1].id = NodeId(1);
        assert_eq!(c.validate().map_err(|e| e.field), Err("peers"));

        let mut c = data_config();
        c.role = ConfiguredRole::Witness;
        assert_eq!(c.validate().map_err(|e| e.field), Err("role"));

        let mut c = data_config();
        c.max_lag_on_failover = Some(5);
        assert_eq!(
            c.validate().map_err(|e| e.field),
            Err("max_lag_on_failover")
        );
    }

    #[test]
    fn no_witness_means_no_automatic_failover_unless_unsafe() {
        let mut c = data_config();
        c.peers.pop();
        assert!(!c.auto_failover_enabled());
        c.unsafe_auto_failover_without_witness = true;
        assert!(c.auto_failover_enabled());
    }
}
