//! Planned switchover on the primary's side (protocol.md, "Switchover and
//! promotion").

use super::leader::Transfer;
use super::{Action, ClientId, Engine};
use crate::error::Error;
use crate::message::{Promote, Request};
use crate::observe::Observation;

impl Engine {
    pub(super) fn admin_switchover(&mut self, id: ClientId) {
        let deadline = self.now.plus(self.cfg.failover_timeout * 2);
        let target = self.cfg.data_peer().map(|m| m.id);
        let Some(ls) = self.leader_state.as_mut() else {
            let err = self.not_leader_error();
            self.emit(Action::AdminDone(id, Err(err)));
            return;
        };
        let Some(target) = target else {
            self.actions.push(Action::AdminDone(
                id,
                Err(Error::Rejected("no standby to hand over to".into())),
            ));
            return;
        };
        if ls.transfer.is_some() {
            self.actions.push(Action::AdminDone(
                id,
                Err(Error::Rejected("a switchover is already running".into())),
            ));
            return;
        }
        // Stop writes and lease reads for the rest of this term.
        self.actions
            .push(Action::Observe(Observation::SwitchoverStarted {
                term: self.hs.current_term,
                target,
            }));
        ls.transfer = Some(Transfer {
            target,
            admin: id,
            deadline,
            promote_sent: false,
        });
        let reads = std::mem::take(&mut ls.pending_reads);
        for (rid, _) in reads {
            let err = Error::NotLeader {
                leader: Some(target),
                leader_addr: None,
            };
            self.actions.push(Action::ReadReady(rid, Err(err)));
        }
    }

    /// Once the target holds the last index durably, tell it to campaign now.
    pub(super) fn drive_transfer(&mut self) {
        let last = self.log.last();
        let durable = self.durable;
        let Some(ls) = self.leader_state.as_mut() else {
            return;
        };
        let Some(t) = ls.transfer.as_mut() else {
            return;
        };
        let caught_up = self.mutations.transfer_without_catch_up
            || ls
                .peer
                .as_ref()
                .is_some_and(|p| p.id == t.target && p.matched >= last.index);
        if t.promote_sent || !caught_up || durable < last.index || !ls.pending_writes.is_empty() {
            return;
        }
        t.promote_sent = true;
        let target = t.target;
        self.send(
            target,
            Request::Promote(Promote {
                reason: "switchover".into(),
                last,
            }),
        );
    }
}
