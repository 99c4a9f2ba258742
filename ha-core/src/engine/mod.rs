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
//!
//! # Memory and the durable log
//! The engine keeps in memory only the entries after its latest snapshot. A peer
//! that needs older entries is served from the durable log: the engine asks for them
//! with [`Action::ReadEntries`] and sends them when they arrive; if the log no longer
//! holds them (its retention policy purged them) the peer gets the snapshot.

mod election;
mod leader;
mod log;
mod progress;
mod replica;

use std::collections::BTreeSet;

use crate::config::{Config, ConfiguredRole};
use crate::error::{Error, StorageError};
use crate::health::{HealthStatus, PeerStatus};
use crate::log_store::{CatchUpBatch, Snapshot};
use crate::message::{Envelope, Request, Response, RpcError};
use crate::types::{
    Command, HardState, Instant, LogIndex, MemberKind, NodeId, Position, Role, Term, WalEntry,
};

use self::leader::LeaderState;
use self::log::Log;
use self::replica::{Meta, Standing};

/// Most entries handed to the state machine in one step.
const MAX_APPLY_PER_STEP: u64 = 4096;

/// A client request's identity, chosen by the driver; echoed in replies.
pub type ClientId = u64;

/// Something that happened, fed to [`Engine::step`].
#[derive(Clone, Debug)]
pub enum Event {
    /// Time passed. Drivers tick every `tick_interval`.
    Tick,
    /// A request from a peer (already authenticated by the transport).
    Request(Envelope<Request>),
    /// A response to a request this engine sent.
    Response(Envelope<Response>),
    /// Client writes to replicate.
    ClientWrites(Vec<(ClientId, Command)>),
    /// A linearizable read: answered with [`Action::ReadReady`] once it may be served.
    ClientRead(ClientId),
    /// The log store made entries durable up to this position.
    Persisted(Position),
    /// The snapshot asked for by [`Action::TakeSnapshot`] is durable in the log
    /// store.
    SnapshotTaken(Snapshot),
    /// An operator's request.
    Admin(ClientId, Admin),
    /// The answer to [`Action::ReadEntries`] with the same `read_id`: the batch
    /// read from the durable log, or why it could not be read (purged, I/O).
    EntriesRead {
        /// The id the action carried.
        read_id: u64,
        /// The batch, or the failure.
        result: Result<CatchUpBatch, StorageError>,
    },
}

/// Operator requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    /// Run an election now (still needs a majority).
    Promote,
    /// Become primary without a majority. May lose acknowledged writes.
    ForcePromote,
    /// Hand over to the caught-up standby with zero loss.
    Switchover,
    /// Do not start elections on this node's own timer.
    PauseFailover,
    /// Undo `PauseFailover`.
    ResumeFailover,
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replace the hard state durably before executing any later action.
    PersistHardState(HardState),
    /// Append entries to the log store; report [`Event::Persisted`] when durable.
    Append(Vec<WalEntry>),
    /// Remove log entries with index `>= from`, durably.
    Truncate(LogIndex),
    /// Replace log and state machine with a snapshot received from the primary.
    InstallSnapshot(Snapshot),
    /// Reset the state machine to its empty initial state; the engine then replays
    /// the log with [`Action::Apply`] (async-mode rewind after a failover).
    ResetStateMachine,
    /// Restore the state machine (not the log) from this local snapshot; the engine
    /// then replays the log after it (async-mode rewind after a failover).
    RestoreStateMachine(Snapshot),
    /// Drop the whole log and snapshot: the store then holds an empty log at
    /// position zero (async mode, when a failover discarded entries that the local
    /// snapshot already holds; the node then resyncs from the primary). Always
    /// preceded by [`Action::ResetStateMachine`].
    ResetLog,
    /// A durable snapshot covers the entries up to and including `upto`: the log
    /// store may purge them, keeping what its retention policy keeps for a lagging
    /// standby, which needs the entries from `keep_from` on (`None`: no standby to
    /// keep entries for). See [`crate::log_store::LogStore::purge_point`].
    Compact {
        /// The snapshot's index: nothing after it may be purged.
        upto: LogIndex,
        /// The standby's match index, if this node leads one: the last entry it is
        /// known to hold, whose position the next batch names as `prev`.
        keep_from: Option<LogIndex>,
    },
    /// Capture the state machine's state after the entry at this position (the
    /// last one applied: every [`Action::Apply`] before it ran), save it to the log
    /// store as the snapshot, and report it with [`Event::SnapshotTaken`] once it
    /// is durable. The engine asks every `snapshot_every` applied entries, one at a
    /// time; a snapshot overtaken by a replacement of the state machine
    /// ([`Action::InstallSnapshot`], [`Action::ResetStateMachine`],
    /// [`Action::RestoreStateMachine`]) is never reported.
    TakeSnapshot(Position),
    /// Read a catch-up batch from the durable log
    /// ([`crate::log_store::LogStore::read_batch`]) and report it with
    /// [`Event::EntriesRead`]: the engine streams from there to a peer that needs
    /// entries older than its in-memory log.
    ReadEntries {
        /// Echoed in [`Event::EntriesRead`].
        read_id: u64,
        /// The peer's next needed index: the batch starts there.
        next: LogIndex,
        /// At most this many entries.
        max_entries: usize,
        /// The byte bound (by [`WalEntry::approx_size`]).
        max_bytes: usize,
    },
    /// Send a request to a peer; deliver its response as [`Event::Response`].
    Send(Envelope<Request>),
    /// Answer a request received from a peer.
    Respond(Envelope<Response>),
    /// Apply committed entries to the state machine, in order.
    Apply(Vec<WalEntry>),
    /// A client write finished: committed at this position (whose term is the
    /// fencing token), or failed.
    WriteDone(ClientId, Result<Position, Error>),
    /// A linearizable read may be served from the state machine now, or failed.
    ReadReady(ClientId, Result<Term, Error>),
    /// An operator request finished.
    AdminDone(ClientId, Result<(), Error>),
    /// Writes this node had acknowledged (async mode) were discarded by a failover.
    /// When the divergence reaches into the local snapshot, the snapshot's
    /// position stands for the discarded entries it holds (their count is then a
    /// lower bound).
    Discarded(Vec<Position>),
    /// The node's role, term or known primary changed.
    RoleChanged {
        /// The new role.
        role: Role,
        /// The current term.
        term: Term,
        /// The primary it follows, if known.
        leader: Option<NodeId>,
    },
}

/// Rules that tests can switch off to prove the simulator's checker catches the
/// violation. Every field is `false` in production; the setter exists only with the
/// `testkit` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// The primary behaves as if it always held a lease.
    pub no_lease: bool,
    /// The witness votes without checking the candidate's floor.
    pub witness_skips_floor_check: bool,
    /// Messages with a stale term are processed as if current.
    pub accept_stale_terms: bool,
    /// The primary acknowledges writes after its own fsync alone.
    pub ack_before_standby_persists: bool,
    /// A standby keeps its own entry instead of truncating a conflicting suffix.
    pub no_truncate_on_conflict: bool,
    /// Data nodes grant votes without the up-to-date check.
    pub vote_without_log_check: bool,
    /// The lease is the bound it must stay below (`failover_timeout × (1 −
    /// ρ)/(1 + ρ)`, without the tick) stretched by this many parts per million
    /// (0: the correct lease).
    pub lease_overshoot_ppm: u32,
    /// A restarted node campaigns and votes at once, without the start-up window.
    pub no_startup_window: bool,
    /// The witness sets a floor to whatever a raise asks, lower or not.
    pub witness_floor_may_decrease: bool,
    /// `sync-apply` acknowledges writes once the standby holds them durably, as
    /// `sync` does, without waiting for it to apply them.
    pub sync_apply_skips_apply_wait: bool,
    /// A new primary serves reads before its no-op is applied.
    pub read_before_noop: bool,
    /// Async mode commits what the standby has not acked without a witness floor.
    pub async_commit_without_floor: bool,
    /// A primary without a lease for an election timeout neither steps down nor
    /// stops heartbeating (so its standby never takes over).
    pub never_step_down: bool,
    /// A switchover sends TimeoutNow without waiting for the target to catch up,
    /// and the target campaigns without checking it holds the primary's last entry.
    pub transfer_without_catch_up: bool,
}

/// What the engine needs from durable storage at start-up.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// The stored hard state (for a fresh node: [`HardState::bootstrap`] or
    /// [`HardState::joining`], already persisted by the driver).
    pub hard_state: HardState,
    /// The stored snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The stored entries after the snapshot.
    pub entries: Vec<WalEntry>,
    /// The index the state machine has applied up to: the snapshot's for a state
    /// machine restored from it, further for one that persists its own state (its
    /// applied entries were committed, and are not applied again). Counted from the
    /// snapshot when lower; clipped to the log's last entry (the driver refuses to
    /// start a state machine that is ahead of its log).
    pub applied: LogIndex,
}

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
        self.leader_state
            .as_ref()
            .is_some_and(|ls| ls.lease_valid(now, &self.cfg, self.mutations))
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
            node_id: self.id,
            role: self.role,
            term: self.hs.current_term,
            leader: self.leader,
            writable: self.has_lease(now) && ls.is_some_and(|l| l.accepting_writes()),
            commit_mode: self.cfg.commit_mode,
            last_position: self.log.last(),
            commit_index: self.commit,
            applied_index: self.applied,
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

    /// True if this node is the primary handing over to `candidate`.
    fn is_handover_target(&self, candidate: NodeId) -> bool {
        self.leader_state
            .as_ref()
            .and_then(|ls| ls.transfer_target())
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

    fn on_request(&mut self, env: Envelope<Request>) {
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
        let standing = self.term_rule(&env);
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
    fn on_response(&mut self, env: Envelope<Response>) {
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
            Response::WalAck(a) => self.on_wal_ack(env.from, env.request_id, a),
            Response::HeartbeatAck(a) => self.on_heartbeat_ack(env.from, env.request_id, a),
            Response::FloorAck(a) => self.on_floor_ack(env.from, a),
            Response::SnapshotAck(a) => self.on_snapshot_ack(env.from, env.request_id, a),
            Response::FenceAck(_) | Response::PromoteAck(_) | Response::Error(_) => {}
        }
    }

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
        self.maybe_take_snapshot();
    }
}
