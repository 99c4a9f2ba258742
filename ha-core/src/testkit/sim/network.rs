//! The simulated network: loss, duplication, delay (so messages reorder), delay
//! spikes, and links cut one way or both.

use rand::Rng;

use super::world::{Ev, World, MS, WITNESS};
use crate::executor::Input;
use crate::message::{Envelope, Request, Response};
use crate::types::NodeId;

/// A message in flight.
#[derive(Clone, Debug)]
pub(super) enum Msg {
    Req(Envelope<Request>),
    Resp(Envelope<Response>),
}

impl Msg {
    pub(super) fn route(&self) -> (NodeId, NodeId) {
        match self {
            Msg::Req(e) => (e.from, e.to),
            Msg::Resp(e) => (e.from, e.to),
        }
    }

    /// Floor raises and TimeoutNow: the paths whose lateness and duplication the
    /// witness and switchover rules must survive.
    fn control_path(&self) -> bool {
        matches!(
            self,
            Msg::Req(Envelope {
                body: Request::RaiseFloor(_) | Request::Promote(_),
                ..
            })
        )
    }
}

impl Msg {
    /// A snapshot chunk after the first: the transfer is chunked.
    fn later_snapshot_chunk(&self) -> bool {
        matches!(
            self,
            Msg::Req(Envelope {
                body: Request::InstallSnapshot(s),
                ..
            }) if s.offset > 0
        )
    }

    fn asks_witness_for_vote(&self) -> bool {
        matches!(
            self,
            Msg::Req(Envelope {
                to: WITNESS,
                body: Request::Vote(_),
                ..
            })
        )
    }
}

impl World {
    /// Puts a message on the network.
    pub(super) fn send(&mut self, msg: Msg) {
        let (from, to) = msg.route();
        if matches!(
            msg,
            Msg::Req(Envelope {
                body: Request::Heartbeat(_),
                ..
            })
        ) {
            self.check_heartbeat_sender(from);
        }
        if self.links_down.contains(&(from, to)) {
            return;
        }
        let f = self.cfg.faults.clone();
        let extra = if msg.control_path() {
            f.control_path_faults
        } else {
            0.0
        };
        let (drop, dup, spike) = if self.healing {
            (0.0, 0.0, 0.0)
        } else {
            (
                f.drop,
                (f.duplicate + extra).min(1.0),
                (f.delay_spike + extra).min(1.0),
            )
        };
        let chunk = msg.later_snapshot_chunk();
        if chunk {
            self.paths.later_snapshot_chunks += 1;
        }
        if self.rng.random_bool(drop) {
            if chunk {
                self.paths.snapshot_chunks_lost_or_duplicated += 1;
            }
            return;
        }
        let copies = if self.rng.random_bool(dup) { 2 } else { 1 };
        if chunk && copies == 2 {
            self.paths.snapshot_chunks_lost_or_duplicated += 1;
        }
        for copy in 0..copies {
            let mut delay = self.rng.random_range(f.delay_us.0..=f.delay_us.1) * 1_000;
            if self.rng.random_bool(spike) {
                let longest = if msg.control_path() { 300 } else { 80 };
                delay += self.rng.random_range(10..longest) * MS;
                if msg.control_path() {
                    self.paths.late_control_messages += 1;
                }
            }
            if copy == 1 && msg.control_path() {
                self.paths.duplicated_control_messages += 1;
            }
            if copy == 0 && msg.asks_witness_for_vote() {
                self.maybe_restart_before_vote(delay);
            }
            self.schedule(delay, Ev::Deliver(msg.clone()));
        }
    }

    /// A message arrives: it joins the receiver's inbox unless its link is down or
    /// the receiver is dead (a paused receiver finds it when it resumes).
    pub(super) fn deliver(&mut self, msg: Msg) {
        let (from, to) = msg.route();
        if self.links_down.contains(&(from, to)) || !self.live(to) {
            return;
        }
        let input = match msg {
            Msg::Req(e) => Input::Request(e),
            Msg::Resp(e) => Input::Response(e),
        };
        self.push_input(to, input);
    }

    /// Cuts `a -> b` (and `b -> a` if symmetric) for a random time.
    pub(super) fn cut(&mut self, a: NodeId, b: NodeId, symmetric: bool) {
        let d = self.rng.random_range(50..2_000) * MS;
        self.cut_for(a, b, symmetric, d);
    }

    pub(super) fn cut_for(&mut self, a: NodeId, b: NodeId, symmetric: bool, d: u64) {
        self.trace(|| format!("CUT {a}->{b} symmetric={symmetric} for {}ms", d / MS));
        self.links_down.insert((a, b));
        self.schedule(d, Ev::LinkUp(a, b));
        if symmetric {
            self.links_down.insert((b, a));
            self.schedule(d, Ev::LinkUp(b, a));
        }
    }

    pub(super) fn link_up(&mut self, a: NodeId, b: NodeId) {
        self.trace(|| format!("HEAL {a}->{b}"));
        self.links_down.remove(&(a, b));
    }
}
