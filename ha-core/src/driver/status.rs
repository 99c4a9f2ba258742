//! What a node publishes about its progress: [`NodeStatus`], and the health
//! reported before it started and after it stopped.

use crate::config::Config;
use crate::health::{HealthStatus, PeerStatus};
use crate::types::{LogIndex, NodeId, Position, Role, Term};

/// A node's replication progress, published after every engine step (see
/// [`Node::subscribe_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// False before start and after the node stopped (shutdown or storage failure).
    pub running: bool,
    /// The current role.
    pub role: Role,
    /// The current term.
    pub term: Term,
    /// The primary this node knows of (itself, if primary).
    pub leader: Option<NodeId>,
    /// The last position in the log.
    pub last_position: Position,
    /// The highest index known to be committed.
    pub commit_index: LogIndex,
    /// The highest index applied to the state machine.
    pub applied_index: LogIndex,
    /// True if this node is the primary and holds a lease (see
    /// [`HealthStatus::writable`]).
    pub writable: bool,
    /// True while automatic failover is paused (or off in the config).
    pub failover_paused: bool,
}

impl NodeStatus {
    pub(super) fn from_health(h: &HealthStatus, running: bool) -> Self {
        NodeStatus {
            running,
            role: h.role,
            term: h.term,
            leader: h.leader,
            last_position: h.last_position,
            commit_index: h.commit_index,
            applied_index: h.applied_index,
            writable: h.writable,
            failover_paused: h.failover_paused,
        }
    }
}

pub(super) fn member_role(cfg: &Config, voter: bool) -> Role {
    Role::follower(cfg.kind, voter)
}

/// The status reported before the node started.
pub(super) fn initial_health(cfg: &Config) -> HealthStatus {
    HealthStatus {
        node_id: cfg.node_id,
        role: member_role(cfg, true),
        term: Term::ZERO,
        leader: None,
        writable: false,
        commit_mode: cfg.commit_mode,
        last_position: Position::ZERO,
        commit_index: LogIndex::ZERO,
        applied_index: LogIndex::ZERO,
        lag: 0,
        degraded: false,
        failover_paused: !cfg.auto_failover_enabled(),
        peers: cfg
            .peers
            .iter()
            .map(|m| PeerStatus {
                id: m.id,
                addr: m.addr.clone(),
                kind: m.kind,
                healthy: false,
                last_contact: None,
                match_index: None,
            })
            .collect(),
    }
}

/// The status reported after the node stopped: its last state, leading nothing.
pub(super) fn stopped_health(cfg: &Config, last: &HealthStatus) -> HealthStatus {
    let mut h = last.clone();
    h.role = member_role(cfg, last.role != Role::Learner);
    h.leader = None;
    h.writable = false;
    h.degraded = false;
    for p in &mut h.peers {
        p.healthy = false;
        p.match_index = None;
    }
    h
}
