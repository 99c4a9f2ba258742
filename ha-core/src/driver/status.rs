//! The health a node reports before it started and after it stopped.

use crate::config::Config;
use crate::health::{HealthStatus, PeerStatus};
use crate::types::{LogIndex, Position, Role, Term};

pub(super) fn member_role(cfg: &Config, voter: bool) -> Role {
    Role::follower(cfg.kind, voter)
}

/// The status reported before the node started.
pub(super) fn initial_health(cfg: &Config) -> HealthStatus {
    HealthStatus {
        running: false,
        node_id: cfg.node_id,
        role: member_role(cfg, true),
        term: Term::ZERO,
        leader: None,
        writable: false,
        lease_remaining: None,
        commit_mode: cfg.commit_mode,
        last_position: Position::ZERO,
        commit_index: LogIndex::ZERO,
        applied_index: LogIndex::ZERO,
        durable_index: LogIndex::ZERO,
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
    h.running = false;
    h.role = member_role(cfg, last.role != Role::Learner);
    h.leader = None;
    h.writable = false;
    h.lease_remaining = None;
    h.degraded = false;
    for p in &mut h.peers {
        p.healthy = false;
        p.match_index = None;
    }
    h
}
