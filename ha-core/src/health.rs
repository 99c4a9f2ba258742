//! What a node reports about itself.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{CommitMode, LogIndex, MemberKind, NodeId, Position, Role, Term};

/// A peer as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's identity.
    pub id: NodeId,
    /// Its configured address.
    pub addr: String,
    /// Data node or witness.
    pub kind: MemberKind,
    /// True if it answered within the failover timeout.
    pub healthy: bool,
    /// Time since it last answered, if it ever did.
    pub last_contact: Option<Duration>,
    /// Primary only: the highest position it durably holds.
    pub match_index: Option<LogIndex>,
}

/// A snapshot of a node's replication state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// False before the node started and after it stopped (shutdown or storage
    /// failure).
    pub running: bool,
    /// This node.
    pub node_id: NodeId,
    /// Its current role.
    pub role: Role,
    /// Its current term (also the fencing token of writes it acknowledges).
    pub term: Term,
    /// The primary it knows of.
    pub leader: Option<NodeId>,
    /// True if this node is the primary and holds a lease: writes and linearizable
    /// reads are served here now.
    pub writable: bool,
    /// On the primary holding a lease: how long the lease still runs, on this
    /// node's clock, as of when this status was taken (published at least once
    /// per tick). `None` without a lease.
    pub lease_remaining: Option<Duration>,
    /// The configured commit mode.
    pub commit_mode: CommitMode,
    /// The last position in its log.
    pub last_position: Position,
    /// The highest index it knows to be committed.
    pub commit_index: LogIndex,
    /// The highest index it applied.
    pub applied_index: LogIndex,
    /// The highest index durable in its own log.
    pub durable_index: LogIndex,
    /// Entries between the primary's last index and this node's (0 on the primary).
    pub lag: u64,
    /// True if the primary commits without the standby (degraded sync).
    pub degraded: bool,
    /// True if automatic failover is paused by an operator (or off in config).
    pub failover_paused: bool,
    /// Every configured peer.
    pub peers: Vec<PeerStatus>,
}
