//! The replication engine: the protocol of docs/protocol.md as a deterministic,
//! sans-IO state machine.
//!
//! Feed it [`Event`]s with [`Engine::step`]; it answers with [`Action`]s, drained with
//! [`Engine::take_actions`]. It never reads a clock (every step carries `now`), never
//! touches a socket or a file, and draws its randomness from a seed, so the same
//! inputs always give the same outputs: the simulator and the real node run it
//! unchanged.
//!
//! # The driver's contract
//! Actions are executed in the order they are emitted ([`crate::executor`] is the
//! one implementation, shared by the tokio driver and the simulator):
//! - [`Action::PersistHardState`], [`Action::Truncate`], [`Action::InstallSnapshot`],
//!   [`Action::ResetLog`] and [`Action::Compact`] are durable before any later
//!   action is executed.
//! - [`Action::Append`] may complete asynchronously (in order with the other log
//!   operations); the driver reports completion with [`Event::Persisted`]. Acks that
//!   depend on those entries are only emitted after that event.
//! - [`Action::Apply`] applies entries to the state machine, in order, before the
//!   next action; [`Action::WriteDone`] and [`Action::ReadReady`] refer to that state,
//!   and leave only if the lease still holds when they are sent.
//! - [`Action::TakeSnapshot`] captures the state machine at once; its save may
//!   complete asynchronously and is reported with [`Event::SnapshotTaken`], unless a
//!   later replacement of the state machine superseded it.
//! - [`Action::ReadEntries`] may complete asynchronously; the driver reports the
//!   entries (or the failure) with [`Event::EntriesRead`], always, exactly once.
//!   So may [`Action::ReadSnapshot`], reported with [`Event::SnapshotRead`].
//! - [`Action::StageSnapshot`] writes its chunk before the next action.
//!
//! # Memory and the durable log
//! The engine keeps in memory only the entries after its latest snapshot. A peer
//! that needs older entries is served from the durable log: the engine asks for them
//! with [`Action::ReadEntries`] and sends them when they arrive; if the log no longer
//! holds them (its retention policy purged them) the peer gets the snapshot, one
//! chunk at a time, each read from the log store ([`Action::ReadSnapshot`]) and
//! written into the peer's ([`Action::StageSnapshot`]): the engine holds a
//! snapshot's position and size, never its bytes.

mod acks;
mod commit;
mod election;
mod events;
mod leader;
mod log;
mod progress;
mod replica;
mod replication;
mod staging;
mod term;
mod transfer;

use std::collections::BTreeSet;

use crate::config::{Config, ConfiguredRole};
use crate::error::Error;
use crate::health::{HealthStatus, PeerStatus};
use crate::log_store::Snapshot;
use crate::message::{Envelope, Request, Response};
use crate::types::{
    Command, HardState, Instant, LogIndex, MemberKind, NodeId, Position, Role, Term, WalEntry,
};

/// Test-only rule switches: public with the `testkit` feature only.
#[cfg(feature = "testkit")]
pub use self::events::Mutations;
#[cfg(not(feature = "testkit"))]
pub(crate) use self::events::Mutations;
pub use self::events::{Action, Admin, Event, InitialState};
use self::leader::LeaderState;
use self::log::Log;

/// Most entries handed to the state machine in one step.
const MAX_APPLY_PER_STEP: u64 = 4096;

/// A client request's identity, chosen by the driver; echoed in replies.
pub type ClientId = u64;

/// An election in progress (pre-vote or vote).
#[derive(Clone, Debug)]
struct Campaign {
    term: Term,
    pre_vote: bool,
    granted: BTreeSet<NodeId>,
    /// Peers that answered at all (granted or not).
    responded: BTreeSet<NodeId>,
    transfer: bool,
    admin: Option<ClientId>,
}

/// A follower's ack that waits for its entries to be durable.
#[derive(Clone, Debug)]
struct PendingAck {
    to: NodeId,
    request_id: u64,
    batch_term: Term,
    last: Position,
}

/// The replication engine of one node. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    id: NodeId,
    kind: MemberKind,
    hs: HardState,
    role: Role,
    leader: Option<NodeId>,
    log: Log,
    /// Highest index durably in the local log (and still in it).
    durable: LogIndex,
    commit: LogIndex,
    applied: LogIndex,
    /// Highest index known to match the current leader's log.
    leader_verified: LogIndex,
    /// The primary's last index, from its heartbeats (for lag reporting).
    leader_last: LogIndex,
    now: Instant,
    started_at: Instant,
    election_deadline: Instant,
    last_leader_contact: Option<Instant>,
    failover_paused: bool,
    rng: u64,
    next_request_id: u64,
    pending_acks: Vec<PendingAck>,
    campaign: Option<Campaign>,
    leader_state: Option<LeaderState>,
    snapshot: Option<Snapshot>,
    /// A snapshot being received, chunk by chunk.
    staging: Option<staging::Staging>,
    /// When the snapshot being staged got its first chunk (for the transfer's
    /// duration).
    staging_began: Option<(Position, Instant)>,
    /// The applied index when the last snapshot was asked for (or the state
    /// machine replaced): the next is due `snapshot_every` entries later.
    snapshot_base: LogIndex,
    /// A snapshot was asked for ([`Action::TakeSnapshot`]) and not yet reported.
    snapshot_requested: bool,
    last_peer_contact: Vec<(NodeId, Instant)>,
    mutations: Mutations,
    /// Mutation `accept_stale_terms` only: answer in the stale sender's term.
    stale_reply_term: Option<Term>,
    safety_alarms: u64,
    actions: Vec<Action>,
}

impl Engine {
    /// Builds an engine from durable state. Every node starts as a follower (or
    /// witness), whatever its config says, and for one failover timeout neither
    /// campaigns nor votes (protocol.md, "Terms, votes, start-up").
    pub fn new(cfg: Config, init: InitialState, now: Instant, seed: u64) -> Self {
        let snapshot_pos = init
            .snapshot
            .as_ref()
            .map(|s| s.last_included)
            .unwrap_or(Position::ZERO);
        let log = Log::new(snapshot_pos, init.entries);
        let durable = log.last().index;
        let applied = init.applied.max(snapshot_pos.index).min(durable);
        let kind = cfg.kind;
        let role = Role::follower(kind, init.hard_state.voter);
        let mut e = Engine {
            id: cfg.node_id,
            kind,
            hs: init.hard_state,
            role,
            leader: None,
            log,
            durable,
            commit: applied,
            applied,
            leader_verified: LogIndex::ZERO,
            leader_last: LogIndex::ZERO,
            now,
            started_at: now,
            election_deadline: now,
            last_leader_contact: None,
            failover_paused: false,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15 ^ cfg.node_id.0.wrapping_mul(0xBF58_476D_1CE4_E5B9),
            next_request_id: 1,
            pending_acks: Vec::new(),
            campaign: None,
            leader_state: None,
            snapshot: init.snapshot,
            staging: None,
            staging_began: None,
            snapshot_base: applied,
            snapshot_requested: false,
            last_peer_contact: Vec::new(),
            mutations: Mutations::default(),
            stale_reply_term: None,
            safety_alarms: 0,
            actions: Vec::new(),
            cfg,
        };
        // Request ids start at a random point so a restarted node's requests are
        // not confused with answers still in flight to its previous incarnation.
        e.next_request_id = (e.random_u64() >> 16).max(1);
        e.reset_election_deadline();
        if e.cfg.role == ConfiguredRole::Primary {
            // The configured primary campaigns first when the cluster has none.
            e.election_deadline = now.plus(e.cfg.failover_timeout);
        }
        e
    }

    /// Switches protocol rules off, for mutation tests only.
    #[cfg(feature = "testkit")]
    pub fn set_mutations(&mut self, m: Mutations) {
        self.mutations = m;
    }

    /// Processes one event at time `now` (monotonic; a smaller `now` is treated as
    /// the last one seen).
    pub fn step(&mut self, now: Instant, event: Event) {
        if now > self.now {
            self.now = now;
        }
        match event {
            Event::Tick => self.on_tick(),
            Event::Request(env) => self.on_request(env),
            Event::Response(env) => self.on_response(env),
            Event::ClientWrites(writes) => self.on_client_writes(writes),
            Event::ClientRead(id) => self.on_client_read(id),
            Event::Persisted(pos) => self.on_persisted(pos),
            Event::SnapshotTaken(snap) => self.on_snapshot_taken(snap),
            Event::Admin(id, admin) => self.on_admin(id, admin),
            Event::EntriesRead { read_id, result } => self.on_entries_read(read_id, result),
            Event::SnapshotRead { read_id, result } => self.on_snapshot_read(read_id, result),
        }
        self.stale_reply_term = None;
        self.after_step();
    }

    /// Takes the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The current term.
    pub fn term(&self) -> Term {
        self.hs.current_term
    }

    /// The durable hard state as last emitted.
    pub fn hard_state(&self) -> &HardState {
        &self.hs
    }

    /// The primary this node follows (itself, if primary).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// The highest index this node knows to be committed.
    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }

    /// The highest index this node has emitted for applying.
    pub fn applied_index(&self) -> LogIndex {
        self.applied
    }

    /// The last position in the log.
    pub fn last_position(&self) -> Position {
        self.log.last()
    }

    /// The entry at `index`, if the in-memory log holds it.
    pub fn entry(&self, index: LogIndex) -> Option<&WalEntry> {
        self.log.get(index)
    }

    /// The term of the entry at `index`, if known (including the snapshot's).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term_at(index)
    }

    /// The snapshot position the log starts after.
    pub fn snapshot_position(&self) -> Position {
        self.log.snapshot()
    }

    /// True if this node is the primary and holds a lease at `now` (its own clock):
    /// it may acknowledge writes and serve linearizable reads.
    pub fn has_lease(&self, now: Instant) -> bool {
        self.lease_expiry().is_some_and(|end| now < end)
    }

    /// True if this node is the primary and commits without the standby through
    /// witness floors (degraded sync).
    pub fn degraded(&self) -> bool {
        self.leader_state.as_ref().is_some_and(|ls| ls.degraded)
    }

    /// When this primary steps down for want of a lease (an election timeout after
    /// its lease ran out), on its own clock; `None` if not primary or forced.
    pub fn step_down_at(&self) -> Option<Instant> {
        self.leader_state
            .as_ref()
            .and_then(|ls| ls.step_down_at(&self.cfg, self.mutations))
    }

    /// When this node's lease runs out, on its own clock: it holds the lease while
    /// `now` is before this instant ([`Self::has_lease`]). `None` without a lease
    /// (not primary, or handing over).
    pub fn lease_expiry(&self) -> Option<Instant> {
        self.leader_state
            .as_ref()
            .and_then(|ls| ls.lease_expiry(&self.cfg, self.mutations))
    }

    /// Times a safety assertion fired (a truncation at or below the commit index in a
    /// sync mode was refused). Always 0 unless something is badly wrong.
    pub fn safety_alarms(&self) -> u64 {
        self.safety_alarms
    }

    /// True while elections on this node's own timer are paused.
    pub fn failover_paused(&self) -> bool {
        self.failover_paused || !self.cfg.auto_failover_enabled()
    }

    /// True if this node is the primary, holds a lease at `now` and accepts
    /// writes (no switchover under way).
    pub fn writable(&self, now: Instant) -> bool {
        self.has_lease(now)
            && self
                .leader_state
                .as_ref()
                .is_some_and(|l| l.accepting_writes())
    }

    /// The node's replication state as seen at `now`.
    pub fn health(&self, now: Instant) -> HealthStatus {
        let ls = self.leader_state.as_ref();
        let leader_last = ls.map(|_| self.log.last().index);
        let peers = self
            .cfg
            .peers
            .iter()
            .map(|m| {
                let contact = self
                    .last_peer_contact
                    .iter()
                    .find(|(n, _)| *n == m.id)
                    .map(|(_, t)| *t);
                PeerStatus {
                    id: m.id,
                    addr: m.addr.clone(),
                    kind: m.kind,
                    healthy: contact.is_some_and(|t| now.since(t) < self.cfg.failover_timeout),
                    last_contact: contact.map(|t| now.since(t)),
                    match_index: ls.and_then(|ls| ls.match_index(m.id)),
                }
            })
            .collect();
        let lag = match leader_last {
            Some(_) => 0,
            None => self.leader_last.0.saturating_sub(self.durable.0),
        };
        HealthStatus {
            running: true,
            node_id: self.id,
            role: self.role,
            term: self.hs.current_term,
            leader: self.leader,
            writable: self.writable(now),
            lease_remaining: self
                .lease_expiry()
                .filter(|end| now < *end)
                .map(|end| end.since(now)),
            commit_mode: self.cfg.commit_mode,
            last_position: self.log.last(),
            commit_index: self.commit,
            applied_index: self.applied,
            durable_index: self.durable,
            lag,
            degraded: ls.is_some_and(|l| l.degraded),
            failover_paused: self.failover_paused(),
            peers,
        }
    }

    /// The config the engine runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ----- shared plumbing -------------------------------------------------------

    fn emit(&mut self, a: Action) {
        if matches!(
            a,
            Action::InstallSnapshot(_) | Action::ResetStateMachine | Action::RestoreStateMachine(_)
        ) {
            // The state machine is replaced: a snapshot asked for before is void
            // (the executor never reports it), and the count starts over.
            self.snapshot_requested = false;
            self.snapshot_base = self.applied;
        }
        self.actions.push(a);
    }

    /// A data node that resynced from scratch recorded what it held as its own
    /// floor; once its durable log has passed it, the floor has done its job.
    fn clear_own_floor(&mut self) {
        let own = self.hs.floor(self.id);
        if own > Position::ZERO && self.log.last() >= own && self.durable >= self.log.last().index {
            self.hs.floors.retain(|(n, _)| *n != self.id);
            self.persist_hard_state();
        }
    }

    /// Asks for a snapshot once `snapshot_every` entries were applied since the
    /// last one (and none is being taken): at the end of a step, after every
    /// entry of it was applied and every client answered.
    fn maybe_take_snapshot(&mut self) {
        if self.snapshot_requested
            || self.applied.0 < self.snapshot_base.0.saturating_add(self.cfg.snapshot_every)
        {
            return;
        }
        let Some(at) = self.log.position_at(self.applied) else {
            return;
        };
        let progress_since = Instant(
            self.now
                .0
                .saturating_sub(2 * self.cfg.rpc_timeout.as_nanos() as u64),
        );
        if self
            .leader_state
            .as_ref()
            .and_then(|ls| ls.peer.as_ref())
            .is_some_and(|p| p.snapshot_transfer_active(progress_since))
        {
            // Not while a transfer makes progress (`Progress::snapshot_transfer_active`).
            return;
        }
        self.snapshot_requested = true;
        self.snapshot_base = self.applied;
        self.emit(Action::TakeSnapshot(at));
    }

    fn next_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    fn random_u64(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, no dependency.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn reset_election_deadline(&mut self) {
        let jitter = self.cfg.failover_jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            self.random_u64() % jitter
        };
        self.election_deadline = self
            .now
            .plus(self.cfg.failover_timeout)
            .plus(std::time::Duration::from_nanos(extra));
    }

    fn send(&mut self, to: NodeId, body: Request) -> u64 {
        let request_id = self.next_request_id();
        self.emit(Action::Send(Envelope {
            from: self.id,
            to,
            term: self.hs.current_term,
            request_id,
            body,
        }));
        request_id
    }

    fn respond(&mut self, to: NodeId, request_id: u64, body: Response) {
        let term = self.stale_reply_term.take().unwrap_or(self.hs.current_term);
        self.emit(Action::Respond(Envelope {
            from: self.id,
            to,
            term,
            request_id,
            body,
        }));
    }

    fn persist_hard_state(&mut self) {
        self.emit(Action::PersistHardState(self.hs.clone()));
    }

    fn note_contact(&mut self, peer: NodeId) {
        let now = self.now;
        match self.last_peer_contact.iter_mut().find(|(n, _)| *n == peer) {
            Some((_, t)) => *t = now,
            None => self.last_peer_contact.push((peer, now)),
        }
    }

    fn in_startup_window(&self) -> bool {
        !self.mutations.no_startup_window
            && self.now < self.started_at.plus(self.cfg.failover_timeout)
    }

    /// Adopts a higher term: persist it with no vote, and stop leading or
    /// campaigning. Leader-only messages then name the new primary.
    fn adopt_term(&mut self, term: Term) {
        debug_assert!(term > self.hs.current_term);
        self.hs.current_term = term;
        self.hs.voted_for = None;
        self.persist_hard_state();
        self.become_follower(None);
    }

    fn become_follower(&mut self, leader: Option<NodeId>) {
        if let Some(ls) = self.leader_state.take() {
            let err = Error::Fenced {
                term: self.hs.current_term,
            };
            self.fail_leader_requests(ls, err);
        }
        if let Some(c) = self.campaign.take() {
            if let Some(id) = c.admin {
                self.emit(Action::AdminDone(
                    id,
                    Err(Error::Rejected("election lost to a newer term".into())),
                ));
            }
        }
        let role = Role::follower(self.kind, self.hs.voter);
        self.leader_verified = LogIndex::ZERO;
        self.set_role(role, leader);
    }

    fn set_role(&mut self, role: Role, leader: Option<NodeId>) {
        if self.role != role || self.leader != leader {
            self.role = role;
            self.leader = leader;
            self.emit(Action::RoleChanged {
                role,
                term: self.hs.current_term,
                leader,
            });
        }
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.cfg.member(id).is_some()
    }

    /// The common term rule (docs/protocol.md): a lower term is rejected, a higher
    /// one adopted. Returns false if the message must be refused as stale.
    fn on_tick(&mut self) {
        if self.leader_state.is_some() {
            self.leader_tick();
        } else {
            self.follower_tick();
        }
    }

    fn on_client_writes(&mut self, writes: Vec<(ClientId, Command)>) {
        if self.leader_state.is_none() {
            for (id, _) in writes {
                let err = self.not_leader_error();
                self.emit(Action::WriteDone(id, Err(err)));
            }
            return;
        }
        self.leader_append(writes);
    }

    fn on_client_read(&mut self, id: ClientId) {
        if self.leader_state.is_none() {
            let err = self.not_leader_error();
            self.emit(Action::ReadReady(id, Err(err)));
            return;
        }
        self.leader_read(id);
    }

    fn not_leader_error(&self) -> Error {
        match self.kind {
            MemberKind::Witness => Error::StandbyMode,
            MemberKind::Data => {
                let leader = self.leader.filter(|l| *l != self.id);
                Error::NotLeader {
                    leader,
                    leader_addr: leader
                        .and_then(|l| self.cfg.member(l))
                        .map(|m| m.addr.clone()),
                }
            }
        }
    }

    fn on_persisted(&mut self, pos: Position) {
        if self.kind != MemberKind::Data || !self.log.holds(pos) || pos.index <= self.durable {
            return;
        }
        self.durable = pos.index;
        self.flush_pending_acks();
    }

    fn on_snapshot_taken(&mut self, snap: Snapshot) {
        self.snapshot_requested = false;
        if snap.last_included.index > self.applied || !self.log.holds(snap.last_included) {
            return;
        }
        let upto = snap.last_included.index;
        self.snapshot = Some(snap);
        // The in-memory log starts after the snapshot; what a lagging standby still
        // needs is the durable log's to keep (its retention policy), and is read
        // back from there (protocol.md, "Fencing, rejoin, catch-up": a
        // standby that needs purged entries gets the snapshot).
        if upto > self.log.snapshot().index {
            self.log.compact(upto);
            let keep_from = self
                .leader_state
                .as_ref()
                .and_then(|ls| ls.data_peer_match());
            self.emit(Action::Compact { upto, keep_from });
        }
    }

    fn on_admin(&mut self, id: ClientId, admin: Admin) {
        match admin {
            Admin::PauseFailover => {
                self.failover_paused = true;
                self.emit(Action::AdminDone(id, Ok(())));
            }
            Admin::ResumeFailover => {
                self.failover_paused = false;
                self.reset_election_deadline();
                self.emit(Action::AdminDone(id, Ok(())));
            }
            Admin::Promote => self.admin_promote(id),
            Admin::ForcePromote => self.admin_force_promote(id),
            Admin::Switchover => self.admin_switchover(id),
        }
    }

    /// Runs after every event: commit, apply, then emit what became possible.
    fn after_step(&mut self) {
        self.log.free_some();
        if self.kind != MemberKind::Data {
            return;
        }
        if self.leader_state.is_some() {
            self.advance_commit();
        }
        // Bounded per step so a long replay does not stall the driver's task; the
        // rest follows on the next step.
        let upto = self
            .commit
            .min(self.durable)
            .min(LogIndex(self.applied.0 + MAX_APPLY_PER_STEP));
        if upto > self.applied {
            let mut batch = Vec::new();
            let mut i = self.applied.next();
            while i <= upto {
                match self.log.get(i) {
                    Some(e) => batch.push(e.clone()),
                    None => break,
                }
                i = i.next();
            }
            if let Some(last) = batch.last() {
                self.applied = last.index();
                self.emit(Action::Apply(batch));
            }
        }
        if self.leader_state.is_some() {
            self.leader_after_apply();
        } else {
            self.flush_pending_acks();
        }
        self.clear_own_floor();
        self.maybe_take_snapshot();
    }
}
