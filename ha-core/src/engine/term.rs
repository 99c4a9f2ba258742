//! The term rule, in one place (protocol.md, "Terms, votes, start-up"), and the
//! dispatch of peer messages to their handlers once it has classified them.

use super::replica::{Meta, Standing};
use super::Engine;
use crate::message::{Envelope, Request, Response, RpcError};
use crate::types::{MemberKind, NodeId};

impl Engine {
    /// The term rule, in one place (protocol.md, "Terms, votes, start-up"): a
    /// request of an older term is refused, a newer one is adopted (stepping down)
    /// before the handler runs, with the rule's named exceptions: a pre-vote changes
    /// no term (it is judged on its campaign term), a voter that heard a live primary
    /// drops a vote without adopting its term (leader stickiness), and a primary
    /// handing over votes for its target at once (switchover).
    fn term_rule(&mut self, env: &Envelope<Request>) -> Standing {
        let term = env.term;
        if let Request::Vote(v) = &env.body {
            if v.pre_vote {
                return Standing::Current;
            }
            // A vote is for its sender's own campaign, in the term it is sent in;
            // anything else is malformed and adopts nothing.
            if v.campaign_term != term || term.node != env.from {
                return Standing::Dropped;
            }
        }
        match term.cmp(&self.hs.current_term) {
            std::cmp::Ordering::Less if self.mutations.accept_stale_terms => {
                self.stale_reply_term = Some(term);
                Standing::Current
            }
            std::cmp::Ordering::Less => Standing::Stale,
            std::cmp::Ordering::Equal => match &env.body {
                Request::Vote(_) if self.is_handover_target(env.from) => Standing::Handover,
                _ => Standing::Current,
            },
            std::cmp::Ordering::Greater => match &env.body {
                Request::Vote(_) if self.is_handover_target(env.from) => {
                    self.adopt_term(term);
                    Standing::Handover
                }
                Request::Vote(_) if !self.may_vote_now(env.from) => Standing::Dropped,
                _ => {
                    self.adopt_term(term);
                    Standing::Current
                }
            },
        }
    }

    /// True if this node is the primary handing over to `candidate` and has told
    /// it to campaign. A campaign of the target's own (before the Promote, or from
    /// an older election round) is not a handover.
    fn is_handover_target(&self, candidate: NodeId) -> bool {
        self.leader_state
            .as_ref()
            .and_then(|ls| ls.promoted_target())
            == Some(candidate)
    }

    /// Requests only a member of the right kind may receive.
    fn misdirected(&self, body: &Request) -> Option<&'static str> {
        match (body, self.kind) {
            (Request::WalBatch(_) | Request::InstallSnapshot(_), MemberKind::Witness) => {
                Some("the witness stores no log")
            }
            (Request::RaiseFloor(_), MemberKind::Data) => Some("only the witness keeps floors"),
            _ => None,
        }
    }

    pub(super) fn on_request(&mut self, env: Envelope<Request>) {
        if !self.is_member(env.from) || env.to != self.id {
            self.respond(
                env.from,
                env.request_id,
                Response::Error(RpcError::NotAMember),
            );
            return;
        }
        self.note_contact(env.from);
        if let Some(why) = self.misdirected(&env.body) {
            let malformed = Response::Error(RpcError::Malformed(why.into()));
            self.respond(env.from, env.request_id, malformed);
            return;
        }
        // Every request but a vote comes from a primary, whose term names it.
        let from_primary = !matches!(env.body, Request::Vote(_));
        if from_primary && env.term.node != env.from {
            let malformed = RpcError::Malformed("term does not name its primary".into());
            self.respond(env.from, env.request_id, Response::Error(malformed));
            return;
        }
        let standing = match self.term_rule(&env) {
            // While this node leads, a primary's message of its own term can only
            // come from a node that believes it leads the same term, which the
            // term naming its primary rules out: refused.
            Standing::Current if from_primary && self.leader_state.is_some() => Standing::Stale,
            standing => standing,
        };
        let meta = Meta {
            from: env.from,
            term: env.term,
            rid: env.request_id,
            standing,
        };
        match env.body {
            Request::Vote(v) => self.on_vote_request(meta, v),
            Request::WalBatch(b) => self.on_wal_batch(meta, b),
            Request::Heartbeat(h) => self.on_heartbeat(meta, h),
            Request::Fence(f) => self.on_fence(meta, f),
            Request::Promote(p) => self.on_promote(meta, p),
            Request::RaiseFloor(r) => self.on_raise_floor(meta, r),
            Request::InstallSnapshot(s) => self.on_install_snapshot(meta, s),
        }
    }

    /// The term rule for responses: a newer term is adopted (and the response
    /// then means nothing to this node's new state); an older one is ignored,
    /// except a pre-vote's answer, which is judged on its campaign term.
    pub(super) fn on_response(&mut self, env: Envelope<Response>) {
        if !self.is_member(env.from) || env.to != self.id {
            return;
        }
        self.note_contact(env.from);
        let pre_vote = matches!(&env.body, Response::Vote(v) if v.pre_vote);
        match env.term.cmp(&self.hs.current_term) {
            std::cmp::Ordering::Greater => {
                self.adopt_term(env.term);
                return;
            }
            std::cmp::Ordering::Less if !pre_vote => return,
            _ => {}
        }
        match env.body {
            Response::Vote(v) => self.on_vote_response(env.from, env.term, v),
            Response::FenceAck(_) | Response::PromoteAck(_) | Response::Error(_) => {}
            leaders_only => self.on_leader_response(env.from, env.request_id, leaders_only),
        }
    }
}
