//! [`Observation`]: the cluster events a node saw (elections with their votes,
//! fences, degraded-sync periods, switchovers, snapshots), as the engine and the
//! driver report them. The driver logs each as one structured event, counts it in
//! [`Metrics`](crate::driver::Metrics) and hands it to subscribers
//! ([`Node::subscribe_observations`](crate::Node::subscribe_observations)), such
//! as ha-node's event history.

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, Position, Role, Term};

/// Why an election started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElectionCause {
    /// The node heard no primary for its election timeout.
    Timer,
    /// The primary handed over to it (a switchover).
    Handover,
    /// An operator asked (promote).
    Operator,
}

/// One cluster event, as this node saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Observation {
    /// The node's role, term or known primary changed.
    RoleChanged {
        /// The new role.
        role: Role,
        /// The current term.
        term: Term,
        /// The primary it follows, if known.
        leader: Option<NodeId>,
    },
    /// This node started a pre-vote or a vote for `term`.
    ElectionStarted {
        /// The term campaigned for.
        term: Term,
        /// A pre-vote round (changes no one's term).
        pre_vote: bool,
        /// Why.
        cause: ElectionCause,
    },
    /// A voter answered this node's campaign.
    VoteReceived {
        /// The term campaigned for.
        term: Term,
        /// The voter.
        from: NodeId,
        /// An answer to a pre-vote.
        pre_vote: bool,
        /// Granted or refused.
        granted: bool,
    },
    /// This node answered a candidate.
    VoteCast {
        /// The term the candidate campaigns for.
        term: Term,
        /// The candidate.
        candidate: NodeId,
        /// A pre-vote.
        pre_vote: bool,
        /// Granted or refused.
        granted: bool,
    },
    /// This node won the vote for `term` and became primary.
    ElectionWon {
        /// The new term.
        term: Term,
        /// The voters that granted (this node included).
        votes: Vec<NodeId>,
    },
    /// A campaign of this node ran out of time without a majority.
    ElectionLost {
        /// The term campaigned for.
        term: Term,
        /// A pre-vote round.
        pre_vote: bool,
        /// The voters that granted (this node included).
        granted: Vec<NodeId>,
        /// The voters that answered at all.
        responded: Vec<NodeId>,
    },
    /// This node became primary without votes (an operator's forced promote, or
    /// the unsafe witness-less option).
    ForcedPromotion {
        /// Its fresh term.
        term: Term,
    },
    /// This primary ordered a node with a stale term to step down.
    FenceSent {
        /// The fenced node.
        to: NodeId,
        /// The term it was fenced with.
        term: Term,
    },
    /// This node was ordered to step down by a primary of a newer term.
    FenceReceived {
        /// The primary that fenced it.
        from: NodeId,
        /// Its term.
        term: Term,
    },
    /// The primary began committing without the standby (degraded sync, the
    /// floor raised at the witness).
    DegradedEntered {
        /// The primary's term.
        term: Term,
    },
    /// The primary commits with the standby again.
    DegradedExited {
        /// The primary's term.
        term: Term,
    },
    /// Automatic failover was paused or resumed on this node.
    FailoverPaused {
        /// Paused (true) or resumed.
        paused: bool,
    },
    /// This primary began handing over to `target`.
    SwitchoverStarted {
        /// The primary's term.
        term: Term,
        /// The standby it hands over to.
        target: NodeId,
    },
    /// The last chunk of a snapshot from the primary arrived: this node installs
    /// it (the log and the state machine are replaced).
    SnapshotInstalled {
        /// The primary that sent it.
        from: NodeId,
        /// Its position.
        last_included: Position,
        /// Its size in bytes.
        size: u64,
        /// From its first chunk to its last, in milliseconds.
        took_ms: u64,
    },
    /// Writes this node had acknowledged (async mode) were discarded by a
    /// failover.
    WritesDiscarded {
        /// How many (a lower bound when the divergence reached into the
        /// snapshot).
        count: u64,
    },
}

impl Observation {
    /// A short name of the kind (`"election_started"`, ...), as in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Observation::RoleChanged { .. } => "role_changed",
            Observation::ElectionStarted { .. } => "election_started",
            Observation::VoteReceived { .. } => "vote_received",
            Observation::VoteCast { .. } => "vote_cast",
            Observation::ElectionWon { .. } => "election_won",
            Observation::ElectionLost { .. } => "election_lost",
            Observation::ForcedPromotion { .. } => "forced_promotion",
            Observation::FenceSent { .. } => "fence_sent",
            Observation::FenceReceived { .. } => "fence_received",
            Observation::DegradedEntered { .. } => "degraded_entered",
            Observation::DegradedExited { .. } => "degraded_exited",
            Observation::FailoverPaused { .. } => "failover_paused",
            Observation::SwitchoverStarted { .. } => "switchover_started",
            Observation::SnapshotInstalled { .. } => "snapshot_installed",
            Observation::WritesDiscarded { .. } => "writes_discarded",
        }
    }

    /// True for what repeats while a node is cut off (pre-vote rounds and their
    /// answers): counted and logged at DEBUG, but not worth an event of their own
    /// in a history of a few thousand.
    pub fn is_routine(&self) -> bool {
        match self {
            Observation::ElectionStarted { pre_vote, .. }
            | Observation::VoteReceived { pre_vote, .. }
            | Observation::VoteCast { pre_vote, .. }
            | Observation::ElectionLost { pre_vote, .. } => *pre_vote,
            _ => false,
        }
    }
}

/// An [`Observation`] with the wall-clock time the node saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Milliseconds since the Unix epoch, on this node's clock.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub observation: Observation,
}

impl Observed {
    /// `observation`, seen now.
    pub fn now(observation: Observation) -> Self {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Observed { at_ms, observation }
    }
}
