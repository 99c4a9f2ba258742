//! Observations as structured log events: one event per role change, election,
//! vote, fence, degraded-sync period, switchover and snapshot, each with the term
//! and the peers involved (`event` names the kind). What repeats while a node is
//! cut off (pre-vote rounds) is logged at DEBUG.

use crate::observe::Observation;
use crate::types::NodeId;

/// Logs `o` as seen by `node`.
pub(super) fn log(node: NodeId, o: &Observation) {
    let event = o.kind();
    match o {
        Observation::RoleChanged { role, term, leader } => {
            tracing::info!(%node, event, %role, %term, ?leader, "role changed")
        }
        Observation::ElectionStarted {
            term,
            pre_vote,
            cause,
        } => {
            if *pre_vote {
                tracing::debug!(%node, event, %term, pre_vote, ?cause, "pre-vote started");
            } else {
                tracing::info!(%node, event, %term, ?cause, "election started");
            }
        }
        Observation::VoteReceived {
            term,
            from,
            pre_vote,
            granted,
        } => {
            if *pre_vote {
                tracing::debug!(%node, event, %term, voter = %from, pre_vote, granted, "pre-vote answered");
            } else {
                tracing::info!(%node, event, %term, voter = %from, granted, "vote answered");
            }
        }
        Observation::VoteCast {
            term,
            candidate,
            pre_vote,
            granted,
        } => {
            if *pre_vote {
                tracing::debug!(%node, event, %term, %candidate, pre_vote, granted, "pre-vote cast");
            } else {
                tracing::info!(%node, event, %term, %candidate, granted, "vote cast");
            }
        }
        Observation::ElectionWon { term, votes } => {
            tracing::info!(%node, event, %term, ?votes, "election won")
        }
        Observation::ElectionLost {
            term,
            pre_vote,
            granted,
            responded,
        } => {
            if *pre_vote {
                tracing::debug!(%node, event, %term, pre_vote, ?granted, ?responded, "pre-vote lost");
            } else {
                tracing::info!(%node, event, %term, ?granted, ?responded, "election lost");
            }
        }
        Observation::ForcedPromotion { term } => {
            tracing::warn!(%node, event, %term, "promoted without votes: acknowledged writes may be lost")
        }
        Observation::FenceSent { to, term } => {
            tracing::info!(%node, event, %term, peer = %to, "fence sent")
        }
        Observation::FenceReceived { from, term } => {
            tracing::info!(%node, event, %term, peer = %from, "fenced by a newer primary")
        }
        Observation::DegradedEntered { term } => {
            tracing::warn!(%node, event, %term, "degraded sync: committing without the standby")
        }
        Observation::DegradedExited { term } => {
            tracing::info!(%node, event, %term, "degraded sync over: the standby is back")
        }
        Observation::FailoverPaused { paused } => {
            tracing::info!(%node, event, paused, "automatic failover paused or resumed")
        }
        Observation::SwitchoverStarted { term, target } => {
            tracing::info!(%node, event, %term, peer = %target, "switchover started")
        }
        Observation::SnapshotInstalled {
            from,
            last_included,
            size,
            took_ms,
        } => {
            tracing::info!(%node, event, peer = %from, position = %last_included, size, took_ms, "snapshot received")
        }
        Observation::WritesDiscarded { count } => {
            tracing::warn!(%node, event, count, "acknowledged writes discarded by a failover (async commit mode)")
        }
    }
}
