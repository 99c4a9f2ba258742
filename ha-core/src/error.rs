//! Errors a caller of the replicator can match on.

use crate::config::ConfigError;
use crate::types::{NodeId, Term};

/// Why a replicator call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This node is not the primary; `leader` names the primary it knows of.
    #[error("not the leader (leader: {leader:?}, address: {leader_addr:?})")]
    NotLeader {
        /// The primary this node last heard from, if any.
        leader: Option<NodeId>,
        /// That primary's address, if known.
        leader_addr: Option<String>,
    },
    /// The operation did not finish before its deadline. A write that timed out may
    /// still commit later: its outcome is unknown.
    #[error("timed out")]
    Timeout,
    /// The replicator has shut down.
    #[error("replicator closed")]
    Closed,
    /// The replicator has not started yet (or is still in its start-up window).
    #[error("not ready")]
    NotReady,
    /// The node is a standby (or witness) and does not accept writes.
    #[error("standby mode: writes go to the primary")]
    StandbyMode,
    /// A newer primary exists; this node's term is over. The write's outcome is
    /// unknown unless it was acknowledged before.
    #[error("fenced by term {term}")]
    Fenced {
        /// The term that fenced this node.
        term: Term,
    },
    /// The primary refuses new writes while this many wait to commit
    /// (`Config::max_uncommitted_entries`): retry later. The write was not taken.
    #[error("busy: {waiting} writes are waiting to commit")]
    Busy {
        /// Writes appended and not yet committed.
        waiting: u64,
    },
    /// The config does not validate; names the field.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The transport speaks for another node than the config names.
    #[error("the transport speaks for {transport} but the config is for {configured}")]
    IdentityMismatch {
        /// `Config::node_id`.
        configured: NodeId,
        /// The transport's [`Transport::local_id`](crate::transport::Transport::local_id).
        transport: NodeId,
    },
    /// The transport could not start listening.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The configured bind address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The request is not valid in this state (for example a switchover without a
    /// caught-up standby, or a forced promotion without the flag).
    #[error("rejected: {0}")]
    Rejected(String),
    /// Storage or state machine failure; the node stops rather than guess.
    #[error("storage: {0}")]
    Storage(String),
}

/// A transport-level failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer is unreachable or the connection dropped.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The RPC missed its deadline.
    #[error("rpc to {0} timed out")]
    Timeout(NodeId),
    /// The peer sent something that does not decode or is too large.
    #[error("protocol violation from {0}: {1}")]
    Protocol(NodeId, String),
    /// The peer is not a cluster member or claimed another identity.
    #[error("peer is not an authorised member: {0}")]
    Unauthorised(String),
    /// The transport is closed.
    #[error("transport closed")]
    Closed,
    /// Binding or another local failure.
    #[error("local transport error: {0}")]
    Local(String),
}

/// A log-store or state-machine failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// An I/O error, with context.
    #[error("i/o: {0}")]
    Io(String),
    /// Stored data failed verification; names where.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// A caller asked for something the contract forbids (for example truncating
    /// committed entries, or reading compacted ones).
    #[error("invalid request: {0}")]
    Invalid(String),
}
