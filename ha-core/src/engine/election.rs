//! Pre-vote, vote and leadership transfer (protocol.md, "Election",
//! "Switchover, promotion").

use std::collections::BTreeSet;

use super::replica::{Meta, Standing};
use super::{Action, Campaign, ClientId, Engine};
use crate::error::Error;
use crate::message::{Promote, PromoteAck, Request, Response, VoteRequest, VoteResponse};
use crate::observe::{ElectionCause, Observation};
use crate::types::{MemberKind, NodeId, Role, Term};

/// Which round of an election a campaign runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Round {
    /// Asks whether a vote would be granted; changes no one's term or vote.
    PreVote,
    /// The real vote, at `term + 1`.
    Vote,
}

/// Why a node campaigns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cause {
    /// Its election timer ran out.
    Timer,
    /// The primary handed over to it (TimeoutNow).
    Handover,
    /// An operator asked (answered with `AdminDone` for this id).
    Operator(ClientId),
}

/// How a node became primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mandate {
    /// Elected by a majority.
    Elected,
    /// Forced without one (an operator, or the unsafe witness-less option).
    Forced,
}

/// Whether the standby took part in the election that made this node primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StandbySeen {
    /// It answered: it is most likely up.
    Answered,
    /// It answered nothing: degraded sync may start at once.
    Silent,
}

impl Engine {
    /// The voters: data nodes and the witness (a learner is not one, but the config
    /// does not know that; its refusals simply do not count).
    pub(super) fn voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.cfg.peers.iter().map(|m| m.id).collect();
        v.push(self.id);
        v
    }

    pub(super) fn majority(&self) -> usize {
        self.voters().len() / 2 + 1
    }

    /// A standby that missed the primary for its randomised timeout runs a pre-vote.
    pub(super) fn follower_tick(&mut self) {
        if self.kind != MemberKind::Data || !self.hs.voter {
            return;
        }
        if self.now < self.election_deadline {
            return;
        }
        // The deadline passed: the campaign (if any) is over either way.
        if let Some(c) = self.campaign.take() {
            self.emit(Action::Observe(Observation::ElectionLost {
                term: c.term,
                pre_vote: c.pre_vote,
                granted: c.granted.iter().copied().collect(),
                responded: c.responded.iter().copied().collect(),
            }));
            if let Some(id) = c.admin {
                self.emit(Action::AdminDone(id, Err(Error::Timeout)));
            }
            if self.role == Role::Candidate {
                self.set_role(Role::Standby, None);
            }
        }
        self.reset_election_deadline();
        if self.failover_paused() || self.in_startup_window() || self.behind_own_floor() {
            return;
        }
        if self.witness_less_failover() {
            // Two voters and no witness: nobody can win a majority once the primary
            // is gone. The loudly named unsafe option promotes without one.
            self.force_promote();
            return;
        }
        self.start_campaign(Round::PreVote, Cause::Timer);
    }

    fn witness_less_failover(&self) -> bool {
        self.cfg.witness().is_none()
            && self.cfg.unsafe_auto_failover_without_witness
            && self.cfg.auto_failover
    }

    pub(super) fn start_campaign(&mut self, round: Round, cause: Cause) {
        let pre_vote = round == Round::PreVote;
        let transfer = cause == Cause::Handover;
        let admin = match cause {
            Cause::Operator(id) => Some(id),
            Cause::Timer | Cause::Handover => None,
        };
        let term = self.hs.current_term.next_for(self.id);
        self.emit(Action::Observe(Observation::ElectionStarted {
            term,
            pre_vote,
            cause: match cause {
                Cause::Timer => ElectionCause::Timer,
                Cause::Handover => ElectionCause::Handover,
                Cause::Operator(_) => ElectionCause::Operator,
            },
        }));
        if !pre_vote {
            self.hs.current_term = term;
            self.hs.voted_for = Some(self.id);
            self.persist_hard_state();
            self.set_role(Role::Candidate, None);
        }
        let mut granted = BTreeSet::new();
        granted.insert(self.id);
        let responded = self
            .campaign
            .as_ref()
            .filter(|c| c.term == term)
            .map(|c| c.responded.clone())
            .unwrap_or_default();
        self.campaign = Some(Campaign {
            term,
            pre_vote,
            granted,
            responded,
            transfer,
            admin,
        });
        self.reset_election_deadline();
        let last = self.log.last();
        for peer in self.cfg.peers.iter().map(|m| m.id).collect::<Vec<_>>() {
            self.send(
                peer,
                Request::Vote(VoteRequest {
                    pre_vote,
                    campaign_term: term,
                    last,
                    transfer,
                }),
            );
        }
        self.check_campaign();
    }

    pub(super) fn on_vote_request(&mut self, meta: Meta, v: VoteRequest) {
        let Meta { from, rid, .. } = meta;
        let granted = if v.pre_vote {
            self.decide_pre_vote(from, &v)
        } else {
            self.decide_vote(meta, &v)
        };
        self.emit(Action::Observe(Observation::VoteCast {
            term: v.campaign_term,
            candidate: from,
            pre_vote: v.pre_vote,
            granted,
        }));
        self.respond(
            from,
            rid,
            Response::Vote(VoteResponse {
                campaign_term: v.campaign_term,
                granted,
                pre_vote: v.pre_vote,
            }),
        );
    }

    /// Checks every rule a real vote checks, and changes nothing.
    fn decide_pre_vote(&mut self, from: NodeId, v: &VoteRequest) -> bool {
        if v.campaign_term.node != from || v.campaign_term <= self.hs.current_term {
            return false;
        }
        self.may_vote_now(from) && self.candidate_up_to_date(from, v)
    }

    /// A real vote, after the term rule ([`Engine::term_rule`]) adopted its term or
    /// dropped it.
    fn decide_vote(&mut self, meta: Meta, v: &VoteRequest) -> bool {
        let from = meta.from;
        if v.campaign_term != meta.term || v.campaign_term.node != from {
            return false;
        }
        let transfer_target = match meta.standing {
            Standing::Handover => true,
            Standing::Current => false,
            Standing::Stale | Standing::Dropped => return false,
        };
        // A voter that heard from a live primary refuses in its current term too;
        // only the primary handing over to this target votes at once.
        if !transfer_target && !self.may_vote_now(from) {
            return false;
        }
        if self.hs.voted_for.is_some_and(|n| n != from) {
            return false;
        }
        // Even the handover target must hold this node's whole log: a caught-up
        // target does (the primary stopped taking writes), and one that is not
        // must not win on this vote (`cargo xtask sim --seed 7208 --mode sync`).
        let skip_log_check = transfer_target && self.mutations.transfer_without_catch_up;
        if !skip_log_check && !self.candidate_up_to_date(from, v) {
            return false;
        }
        if self.hs.voted_for != Some(from) {
            self.hs.voted_for = Some(from);
            // Persisted before the reply leaves (actions run in order).
            self.persist_hard_state();
        }
        self.reset_election_deadline();
        true
    }

    /// The start-up window, the voter's membership and the lease rule.
    pub(super) fn may_vote_now(&self, candidate: NodeId) -> bool {
        if !self.hs.voter || self.in_startup_window() {
            return false;
        }
        if self.leader_state.is_some() {
            return false;
        }
        if self
            .cfg
            .member(candidate)
            .is_none_or(|m| m.kind != MemberKind::Data)
        {
            return false;
        }
        match self.last_leader_contact {
            Some(t) => self.now >= t.plus(self.cfg.failover_timeout),
            None => true,
        }
    }

    /// A data node that resynced from scratch (async mode) has not yet caught up
    /// with what it held before: it must not campaign (protocol.md, "Replication
    /// and commit").
    pub(super) fn behind_own_floor(&self) -> bool {
        self.kind == MemberKind::Data && self.log.last() < self.hs.floor(self.id)
    }

    /// A data node votes for a log at least as up to date as its own (and as what
    /// it held before a resync from scratch); the witness for one that reached the
    /// candidate's floor.
    fn candidate_up_to_date(&self, candidate: NodeId, v: &VoteRequest) -> bool {
        match self.kind {
            MemberKind::Data => {
                self.mutations.vote_without_log_check
                    || v.last >= self.log.last().max(self.hs.floor(self.id))
            }
            MemberKind::Witness => {
                self.mutations.witness_skips_floor_check || v.last >= self.hs.floor(candidate)
            }
        }
    }

    pub(super) fn on_vote_response(&mut self, from: NodeId, from_term: Term, v: VoteResponse) {
        let Some(c) = self.campaign.as_mut() else {
            return;
        };
        if v.campaign_term != c.term {
            return;
        }
        c.responded.insert(from);
        if v.pre_vote != c.pre_vote {
            return;
        }
        let (term, pre_vote) = (c.term, c.pre_vote);
        let counts = v.granted && (pre_vote || from_term == term);
        self.emit(Action::Observe(Observation::VoteReceived {
            term,
            from,
            pre_vote,
            granted: counts,
        }));
        let Some(c) = self.campaign.as_mut() else {
            return;
        };
        if !v.granted {
            return;
        }
        if !c.pre_vote && from_term != c.term {
            return;
        }
        c.granted.insert(from);
        self.check_campaign();
    }

    fn check_campaign(&mut self) {
        let majority = self.majority();
        let Some(c) = self.campaign.as_ref() else {
            return;
        };
        if c.granted.len() < majority {
            return;
        }
        let (pre_vote, transfer, admin) = (c.pre_vote, c.transfer, c.admin);
        let peer_answered = self
            .cfg
            .data_peer()
            .is_some_and(|p| c.responded.contains(&p.id));
        if pre_vote {
            // The term may have moved while the pre-vote ran; campaign from the
            // current one.
            let cause = match (transfer, admin) {
                (_, Some(id)) => Cause::Operator(id),
                (true, None) => Cause::Handover,
                (false, None) => Cause::Timer,
            };
            self.start_campaign(Round::Vote, cause);
        } else {
            let votes = c.granted.iter().copied().collect();
            self.campaign = None;
            self.emit(Action::Observe(Observation::ElectionWon {
                term: self.hs.current_term,
                votes,
            }));
            let standby = if peer_answered {
                StandbySeen::Answered
            } else {
                StandbySeen::Silent
            };
            self.become_leader(Mandate::Elected, standby);
            if let Some(id) = admin {
                self.emit(Action::AdminDone(id, Ok(())));
            }
        }
    }

    /// Leadership transfer: the primary asks its caught-up target to campaign now.
    pub(super) fn on_promote(&mut self, meta: Meta, p: Promote) {
        let Meta {
            from, term, rid, ..
        } = meta;
        let valid = meta.standing == Standing::Current
            && term == self.hs.current_term
            && self.leader == Some(from)
            && self.kind == MemberKind::Data
            && self.hs.voter
            && (self.mutations.transfer_without_catch_up || self.log.last() == p.last);
        if !valid {
            self.respond(
                from,
                rid,
                Response::PromoteAck(PromoteAck { started: false }),
            );
            return;
        }
        self.respond(
            from,
            rid,
            Response::PromoteAck(PromoteAck { started: true }),
        );
        self.start_campaign(Round::Vote, Cause::Handover);
    }

    pub(super) fn admin_promote(&mut self, id: ClientId) {
        if self.kind != MemberKind::Data || !self.hs.voter {
            self.emit(Action::AdminDone(
                id,
                Err(Error::Rejected(
                    "only a caught-up data node can be promoted".into(),
                )),
            ));
            return;
        }
        if self.leader_state.is_some() {
            self.emit(Action::AdminDone(id, Ok(())));
            return;
        }
        // An ordinary election obeys the same rules as one on the timer: not in the
        // start-up window, and not while a live primary is heard (it may hold a
        // lease). A planned handover is the primary's switchover.
        let primary_heard = self
            .last_leader_contact
            .is_some_and(|t| self.now < t.plus(self.cfg.failover_timeout));
        if self.behind_own_floor() {
            let why = "catching up after a resync; try again once it has caught up";
            self.emit(Action::AdminDone(id, Err(Error::Rejected(why.into()))));
            return;
        }
        if self.in_startup_window() || primary_heard {
            let why = if primary_heard {
                "a primary is alive; ask it for a switchover instead"
            } else {
                "still in the start-up window; try again after one failover timeout"
            };
            self.emit(Action::AdminDone(id, Err(Error::Rejected(why.into()))));
            return;
        }
        self.start_campaign(Round::PreVote, Cause::Operator(id));
    }

    pub(super) fn admin_force_promote(&mut self, id: ClientId) {
        if self.kind != MemberKind::Data || !self.hs.voter {
            self.emit(Action::AdminDone(
                id,
                Err(Error::Rejected(
                    "only a data node that has caught up (a voter) can be promoted".into(),
                )),
            ));
            return;
        }
        if self.leader_state.is_none() {
            tracing::warn!(node = %self.id, "forced promotion without a majority: acknowledged writes may be lost");
            self.force_promote();
        }
        self.emit(Action::AdminDone(id, Ok(())));
    }

    /// Becomes primary in a fresh term of its own, without votes. The term names this
    /// node, so its entries can never pass for another primary's.
    fn force_promote(&mut self) {
        self.campaign = None;
        self.hs.current_term = self.hs.current_term.next_for(self.id);
        self.hs.voted_for = Some(self.id);
        self.persist_hard_state();
        self.emit(Action::Observe(Observation::ForcedPromotion {
            term: self.hs.current_term,
        }));
        self.become_leader(Mandate::Forced, StandbySeen::Silent);
    }
}
