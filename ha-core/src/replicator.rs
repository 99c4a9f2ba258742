//! The replicator's public API, the seed's `HAStandbyReplicator` in Rust idiom.

use std::future::Future;
use std::time::Duration;

use crate::error::Error;
use crate::health::HealthStatus;
use crate::types::{Command, NodeId, Position, Term};

/// Which replication scheme a replicator runs (the seed's `Mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationMode {
    /// A primary, a hot standby and optionally a witness.
    HotStandby,
}

/// A successful write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteAck {
    /// Where the write sits in the log.
    pub position: Position,
    /// The term it was acknowledged in: a fencing token for downstream systems.
    pub term: Term,
    /// The state machine's output for the command.
    pub output: Vec<u8>,
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Linearizable: served by the primary under its lease, after its no-op applied.
    Linearizable,
    /// Whatever this node has applied; may be stale. Only when the caller asks.
    Stale,
}

/// How to promote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromoteOptions {
    /// Become primary without a majority. Data acknowledged by the old primary may be
    /// lost; the new term still names this node, so its entries can never pass for
    /// the old primary's.
    pub force_without_quorum_may_lose_data: bool,
}

/// A hot-standby replicator.
pub trait Replicator: Send + Sync {
    /// Starts the node: loads durable state, listens, connects to peers. Every node
    /// starts as a follower, whatever its config's role.
    fn start(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Replicates one command; resolves once the commit mode is satisfied.
    fn apply(
        &self,
        command: Command,
        timeout: Duration,
    ) -> impl Future<Output = Result<WriteAck, Error>> + Send;

    /// Replicates several commands; each succeeds or fails on its own.
    fn apply_batch(
        &self,
        commands: Vec<Command>,
        timeout: Duration,
    ) -> impl Future<Output = Vec<Result<WriteAck, Error>>> + Send;

    /// Reads from the state machine with the asked-for consistency.
    fn read(
        &self,
        query: Vec<u8>,
        consistency: ReadConsistency,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, Error>> + Send;

    /// True if this node is the primary now.
    fn is_leader(&self) -> bool;

    /// The primary's address, if known.
    fn leader_addr(&self) -> Option<String>;

    /// The primary's id, if known.
    fn leader_id(&self) -> Option<NodeId>;

    /// The node's replication state.
    fn health(&self) -> HealthStatus;

    /// Waits until some node is primary and this node knows which.
    fn wait_for_leader(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<NodeId, Error>> + Send;

    /// Asks for this node to become primary: an ordinary election, or a forced one.
    fn promote(&self, options: PromoteOptions) -> impl Future<Output = Result<(), Error>> + Send;

    /// Planned handover from this primary to the standby with zero loss.
    fn switchover(&self, timeout: Duration) -> impl Future<Output = Result<(), Error>> + Send;

    /// Stops this node from starting elections on its own.
    fn pause_auto_failover(&self);

    /// Undoes [`Replicator::pause_auto_failover`].
    fn resume_auto_failover(&self);

    /// Stops the node; idempotent and prompt.
    fn shutdown(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The replication scheme.
    fn mode(&self) -> ReplicationMode;

    /// This node's id.
    fn node_id(&self) -> NodeId;
}
