//! Rule-by-rule tests of the sans-IO engine (docs/protocol.md), driving single
//! engines with hand-made messages and asserting the actions they emit.
//!
//! Longer than 800 lines because it is one rule book: one test per rule of
//! docs/protocol.md over the same few message-building helpers at the top.

use std::time::Duration;

use ha_core::engine::{Action, Admin, Engine, Event, InitialState};
use ha_core::log_store::{CatchUpBatch, Snapshot};
use ha_core::message::{
    AckResult, Envelope, Fence, Heartbeat, Promote, RaiseFloor, Request, Response, VoteRequest,
    WalBatch,
};
use ha_core::{
    Command, Config, HardState, Instant, LogIndex, Member, MemberKind, NodeId, Payload, Position,
    Role, StorageError, Term, WalEntry,
};

const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const W: NodeId = NodeId(3);
const OUTSIDER: NodeId = NodeId(9);

fn member(id: NodeId) -> Member {
    let kind = if id == W {
        MemberKind::Witness
    } else {
        MemberKind::Data
    };
    Member {
        id,
        addr: format!("127.0.0.1:{}", 7000 + id.0),
        kind,
    }
}

fn config(id: NodeId) -> Config {
    let kind = if id == W {
        MemberKind::Witness
    } else {
        MemberKind::Data
    };
    let peers = [N1, N2, W]
        .into_iter()
        .filter(|p| *p != id)
        .map(member)
        .collect();
    Config::new(id, kind, format!("127.0.0.1:{}", 7000 + id.0), peers)
}

fn ms(n: u64) -> Instant {
    Instant(n * 1_000_000)
}

fn term(n: u64, node: NodeId) -> Term {
    Term { number: n, node }
}

fn entry(t: Term, i: u64) -> WalEntry {
    WalEntry::new(
        Position::new(t, LogIndex(i)),
        Payload::Command(Command(vec![i as u8])),
    )
}

fn engine_with(id: NodeId, hs: HardState, entries: Vec<WalEntry>) -> Engine {
    Engine::new(
        config(id),
        InitialState {
            hard_state: hs,
            snapshot: None,
            entries,
            applied: LogIndex::ZERO,
        },
        ms(0),
        7,
    )
}

fn fresh(id: NodeId) -> Engine {
    engine_with(id, HardState::bootstrap(), Vec::new())
}

fn req(from: NodeId, to: NodeId, t: Term, rid: u64, body: Request) -> Event {
    Event::Request(Envelope {
        from,
        to,
        term: t,
        request_id: rid,
        body,
    })
}

fn responses(actions: &[Action]) -> Vec<Envelope<Response>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Respond(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn sent(actions: &[Action]) -> Vec<Envelope<Request>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn vote_req(pre_vote: bool, campaign: Term, last: Position) -> Request {
    Request::Vote(VoteRequest {
        pre_vote,
        campaign_term: campaign,
        last,
        transfer: false,
    })
}

fn granted(actions: &[Action]) -> Option<bool> {
    responses(actions).iter().find_map(|r| match &r.body {
        Response::Vote(v) => Some(v.granted),
        _ => None,
    })
}

fn batch(prev: Position, entries: Vec<WalEntry>, commit: u64) -> Request {
    Request::WalBatch(WalBatch {
        prev,
        entries,
        commit: LogIndex(commit),
    })
}

fn wal_ack(actions: &[Action]) -> Option<AckResult> {
    responses(actions).iter().find_map(|r| match &r.body {
        Response::WalAck(a) => Some(a.result),
        _ => None,
    })
}

/// Elects n1 (with the witness's vote) and returns it in its first term.
fn elected_n1() -> Engine {
    elect(fresh(N1))
}

/// Elects `e` (node n1, in term 0) with the witness's vote: term 1.
fn elect(mut e: Engine) -> Engine {
    let t0 = ms(400);
    e.step(t0, Event::Tick);
    let pre = sent(&e.take_actions());
    let pv = pre
        .iter()
        .find(|s| s.to == W)
        .expect("pre-vote sent to the witness");
    e.step(
        t0,
        Event::Response(Envelope {
            from: W,
            to: N1,
            term: Term::ZERO,
            request_id: pv.request_id,
            body: Response::Vote(ha_core::message::VoteResponse {
                campaign_term: term(1, N1),
                granted: true,
                pre_vote: true,
            }),
        }),
    );
    let acts = e.take_actions();
    assert!(acts.iter().any(|a| matches!(a, Action::PersistHardState(hs) if hs.current_term == term(1, N1) && hs.voted_for == Some(N1))));
    let v = sent(&acts)
        .into_iter()
        .find(|s| s.to == W)
        .expect("vote sent to the witness");
    e.step(
        t0,
        Event::Response(Envelope {
            from: W,
            to: N1,
            term: term(1, N1),
            request_id: v.request_id,
            body: Response::Vote(ha_core::message::VoteResponse {
                campaign_term: term(1, N1),
                granted: true,
                pre_vote: false,
            }),
        }),
    );
    assert_eq!(e.role(), Role::Primary);
    e
}

#[test]
fn every_node_starts_as_follower_and_waits_one_election_timeout() {
    let mut e = fresh(N1);
    assert_eq!(e.role(), Role::Standby);
    e.step(ms(100), Event::Tick);
    assert!(
        sent(&e.take_actions()).is_empty(),
        "no campaign inside the start-up window"
    );
    e.step(
        ms(100),
        req(
            N2,
            N1,
            term(1, N2),
            1,
            vote_req(false, term(1, N2), Position::ZERO),
        ),
    );
    assert_eq!(
        granted(&e.take_actions()),
        Some(false),
        "no vote inside the start-up window"
    );
    assert_eq!(
        e.term(),
        Term::ZERO,
        "a refused vote inside the window does not adopt the term"
    );
}

#[test]
fn pre_vote_changes_no_term_or_vote() {
    let mut e = fresh(W);
    e.step(
        ms(400),
        req(
            N2,
            W,
            Term::ZERO,
            1,
            vote_req(true, term(1, N2), Position::ZERO),
        ),
    );
    let acts = e.take_actions();
    assert_eq!(granted(&acts), Some(true));
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::PersistHardState(_))));
    assert_eq!(e.term(), Term::ZERO);
    assert_eq!(e.hard_state().voted_for, None);
}

#[test]
fn vote_is_persisted_before_the_reply_and_given_once_per_term() {
    let mut e = fresh(W);
    e.step(
        ms(400),
        req(
            N2,
            W,
            term(1, N2),
            1,
            vote_req(false, term(1, N2), Position::ZERO),
        ),
    );
    let acts = e.take_actions();
    let persist = acts
        .iter()
        .position(|a| matches!(a, Action::PersistHardState(hs) if hs.voted_for == Some(N2)));
    let reply = acts.iter().position(|a| matches!(a, Action::Respond(_)));
    assert!(
        persist.is_some() && reply.is_some() && persist < reply,
        "persist before reply: {acts:?}"
    );
    assert_eq!(granted(&acts), Some(true));
    // Same term, another candidate cannot exist (the term names n2); a repeat is fine.
    e.step(
        ms(401),
        req(
            N2,
            W,
            term(1, N2),
            2,
            vote_req(false, term(1, N2), Position::ZERO),
        ),
    );
    assert_eq!(
        granted(&e.take_actions()),
        Some(true),
        "a repeated request from the same candidate"
    );
}

#[test]
fn data_node_refuses_a_candidate_with_a_shorter_log() {
    let t1 = term(1, N1);
    let mut e = engine_with(
        N2,
        HardState {
            current_term: t1,
            ..HardState::bootstrap()
        },
        vec![entry(t1, 1), entry(t1, 2)],
    );
    e.step(
        ms(400),
        req(
            N1,
            N2,
            term(2, N1),
            1,
            vote_req(false, term(2, N1), Position::new(t1, LogIndex(1))),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(false));
    e.step(
        ms(401),
        req(
            N1,
            N2,
            term(3, N1),
            2,
            vote_req(false, term(3, N1), Position::new(t1, LogIndex(2))),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(true));
}

#[test]
fn witness_grants_only_to_a_candidate_at_or_above_its_floor() {
    let t1 = term(1, N1);
    let mut hs = HardState {
        current_term: t1,
        ..HardState::bootstrap()
    };
    hs.raise_floor(N2, Position::new(t1, LogIndex(10)));
    let mut e = engine_with(W, hs, Vec::new());
    e.step(
        ms(400),
        req(
            N2,
            W,
            term(2, N2),
            1,
            vote_req(false, term(2, N2), Position::new(t1, LogIndex(9))),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(false), "below its floor");
    e.step(
        ms(401),
        req(
            N2,
            W,
            term(3, N2),
            2,
            vote_req(false, term(3, N2), Position::new(t1, LogIndex(10))),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(true), "at its floor");
}

#[test]
fn voter_that_heard_a_live_primary_drops_a_vote_without_adopting_its_term() {
    let t1 = term(1, N1);
    let mut e = engine_with(
        W,
        HardState {
            current_term: t1,
            ..HardState::bootstrap()
        },
        Vec::new(),
    );
    e.step(
        ms(400),
        req(
            N1,
            W,
            t1,
            1,
            Request::Heartbeat(Heartbeat {
                commit: LogIndex(0),
                last: Position::ZERO,
            }),
        ),
    );
    e.take_actions();
    e.step(
        ms(450),
        req(
            N2,
            W,
            term(2, N2),
            2,
            vote_req(false, term(2, N2), Position::ZERO),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(false));
    assert_eq!(e.term(), t1, "term not adopted");
    // After an election timeout without the primary, the vote is granted.
    e.step(
        ms(600),
        req(
            N2,
            W,
            term(2, N2),
            3,
            vote_req(false, term(2, N2), Position::ZERO),
        ),
    );
    assert_eq!(granted(&e.take_actions()), Some(true));
}

#[test]
fn lower_term_is_rejected_and_higher_term_adopted() {
    let t2 = term(2, N1);
    let mut e = engine_with(
        N2,
        HardState {
            current_term: t2,
            ..HardState::bootstrap()
        },
        Vec::new(),
    );
    e.step(
        ms(400),
        req(
            N1,
            N2,
            term(1, N1),
            1,
            batch(Position::ZERO, vec![entry(term(1, N1), 1)], 0),
        ),
    );
    let acts = e.take_actions();
    assert_eq!(wal_ack(&acts), Some(AckResult::StaleTerm));
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Append(_))),
        "stale batch appended: {acts:?}"
    );
    let t3 = term(3, N1);
    e.step(
        ms(401),
        req(
            N1,
            N2,
            t3,
            2,
            Request::Heartbeat(Heartbeat {
                commit: LogIndex(0),
                last: Position::ZERO,
            }),
        ),
    );
    let acts = e.take_actions();
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::PersistHardState(hs) if hs.current_term == t3)));
    assert_eq!(e.term(), t3);
    assert_eq!(e.leader(), Some(N1));
}

#[test]
fn fence_with_a_stale_term_or_from_a_non_member_is_ignored() {
    let mut p = elected_n1();
    p.take_actions();
    p.step(
        ms(401),
        req(
            N2,
            N1,
            Term::ZERO,
            9,
            Request::Fence(Fence {
                reason: "stale".into(),
            }),
        ),
    );
    assert_eq!(p.role(), Role::Primary, "stale fence ignored");
    p.step(
        ms(401),
        req(
            OUTSIDER,
            N1,
            term(5, OUTSIDER),
            10,
            Request::Fence(Fence { reason: "x".into() }),
        ),
    );
    assert_eq!(p.role(), Role::Primary, "non-member fence ignored");
    let acts = p.take_actions();
    assert!(responses(&acts)
        .iter()
        .any(|r| matches!(r.body, Response::Error(_)) && r.to == OUTSIDER));
    p.step(
        ms(402),
        req(
            N2,
            N1,
            term(2, N2),
            11,
            Request::Fence(Fence {
                reason: "newer".into(),
            }),
        ),
    );
    assert_eq!(p.role(), Role::Standby, "a newer term fences");
    assert_eq!(p.leader(), Some(N2));
}

#[test]
fn standby_acks_the_last_entry_of_each_batch_after_it_is_durable() {
    let t1 = term(1, N1);
    let mut s = fresh(N2);
    s.step(
        ms(10),
        req(
            N1,
            N2,
            t1,
            1,
            batch(Position::ZERO, vec![entry(t1, 1), entry(t1, 2)], 0),
        ),
    );
    let acts = s.take_actions();
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Append(v) if v.len() == 2)));
    assert_eq!(wal_ack(&acts), None, "no ack before durability");
    s.step(ms(11), Event::Persisted(Position::new(t1, LogIndex(2))));
    assert_eq!(
        wal_ack(&s.take_actions()),
        Some(AckResult::Durable(Position::new(t1, LogIndex(2))))
    );
    // A duplicate is idempotent and acks its own last position, not 0.
    s.step(
        ms(12),
        req(N1, N2, t1, 2, batch(Position::ZERO, vec![entry(t1, 1)], 0)),
    );
    let acts = s.take_actions();
    assert!(!acts.iter().any(|a| matches!(a, Action::Append(_))));
    assert_eq!(
        wal_ack(&acts),
        Some(AckResult::Durable(Position::new(t1, LogIndex(1))))
    );
}

#[test]
fn gap_is_refused_with_a_resend_hint() {
    let t1 = term(1, N1);
    let mut s = fresh(N2);
    s.step(
        ms(10),
        req(
            N1,
            N2,
            t1,
            1,
            batch(Position::new(t1, LogIndex(4)), vec![entry(t1, 5)], 0),
        ),
    );
    let acts = s.take_actions();
    assert_eq!(
        wal_ack(&acts),
        Some(AckResult::Mismatch {
            next: LogIndex(1),
            conflict_term: None
        })
    );
    assert!(!acts.iter().any(|a| matches!(a, Action::Append(_))));
}

#[test]
fn conflicting_suffix_is_truncated_but_never_at_or_below_commit() {
    let (t1, t2) = (term(1, N1), term(2, N2));
    let mut s = engine_with(
        N1,
        HardState {
            current_term: t1,
            ..HardState::bootstrap()
        },
        vec![entry(t1, 1), entry(t1, 2), entry(t1, 3)],
    );
    // n2 leads term 2 and holds (t1,1) then its own entries from 2.
    s.step(
        ms(10),
        req(
            N2,
            N1,
            t2,
            1,
            batch(Position::new(t1, LogIndex(1)), vec![entry(t2, 2)], 1),
        ),
    );
    let acts = s.take_actions();
    let trunc = acts
        .iter()
        .position(|a| matches!(a, Action::Truncate(LogIndex(2))));
    let append = acts.iter().position(
        |a| matches!(a, Action::Append(v) if v[0].position == Position::new(t2, LogIndex(2))),
    );
    assert!(
        trunc.is_some() && append.is_some() && trunc < append,
        "{acts:?}"
    );
    assert_eq!(s.last_position(), Position::new(t2, LogIndex(2)));

    // Commit index 2 is now known; a batch that conflicts at 2 is refused.
    s.step(ms(11), Event::Persisted(Position::new(t2, LogIndex(2))));
    s.step(
        ms(12),
        req(
            N2,
            N1,
            t2,
            2,
            batch(Position::new(t2, LogIndex(2)), vec![], 2),
        ),
    );
    s.take_actions();
    assert_eq!(s.commit_index(), LogIndex(2));
    let t3 = term(3, N2);
    s.step(
        ms(13),
        req(
            N2,
            N1,
            t3,
            3,
            batch(Position::new(t1, LogIndex(1)), vec![entry(t3, 2)], 2),
        ),
    );
    let acts = s.take_actions();
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Truncate(_))),
        "committed entry truncated: {acts:?}"
    );
    assert_eq!(s.safety_alarms(), 1);
}

#[test]
fn new_primary_commits_a_noop_of_its_term_first() {
    let mut p = elected_n1();
    let acts = p.take_actions();
    let noop = acts.iter().find_map(|a| match a {
        Action::Append(v) => v.first().cloned(),
        _ => None,
    });
    assert_eq!(
        noop.map(|e| (e.position, e.payload)),
        Some((Position::new(term(1, N1), LogIndex(1)), Payload::Noop))
    );
}

#[test]
fn primary_acks_a_write_only_after_the_standby_is_durable_and_under_a_lease() {
    let t1 = term(1, N1);
    let mut p = elected_n1();
    let acts = p.take_actions();
    let hb_w = sent(&acts)
        .into_iter()
        .find(|s| s.to == W && matches!(s.body, Request::Heartbeat(_)))
        .expect("heartbeat");
    p.step(
        ms(401),
        Event::ClientWrites(vec![(77, Command(b"x".to_vec()))]),
    );
    p.step(ms(401), Event::Persisted(Position::new(t1, LogIndex(2))));
    let acts = p.take_actions();
    assert!(
        !acts.iter().any(|a| matches!(a, Action::WriteDone(77, _))),
        "acked with no standby: {acts:?}"
    );
    // Lease from the witness's heartbeat ack; still no standby ack.
    p.step(
        ms(402),
        Event::Response(Envelope {
            from: W,
            to: N1,
            term: t1,
            request_id: hb_w.request_id,
            body: Response::HeartbeatAck(ha_core::message::HeartbeatAck {
                accepted: true,
                last: Position::ZERO,
                applied: LogIndex(0),
                voter: true,
            }),
        }),
    );
    assert!(p.has_lease(ms(402)));
    let later = p.take_actions();
    assert!(!later.iter().any(|a| matches!(a, Action::WriteDone(77, _))));
    // The standby acks the batch durably: now the write is acknowledged. (The
    // batch with the write left with the first step after `wal_batch_timeout`:
    // the no-op's batch was still in flight when the write arrived.)
    let wal = sent(&acts)
        .into_iter()
        .chain(sent(&later))
        .rfind(|s| s.to == N2 && matches!(&s.body, Request::WalBatch(b) if b.entries.iter().any(|e| e.index() == LogIndex(2))));
    let rid = wal.expect("batch sent to the standby").request_id;
    p.step(
        ms(403),
        Event::Response(Envelope {
            from: N2,
            to: N1,
            term: t1,
            request_id: rid,
            body: Response::WalAck(ha_core::message::WalAck {
                batch_term: t1,
                result: AckResult::Durable(Position::new(t1, LogIndex(2))),
                applied: LogIndex(0),
            }),
        }),
    );
    let acts = p.take_actions();
    assert!(
        acts.iter().any(|a| matches!(a, Action::WriteDone(77, Ok(pos)) if *pos == Position::new(t1, LogIndex(2)))),
        "{acts:?}"
    );
    // Past the lease, acks stop.
    assert!(!p.has_lease(ms(402).plus(Duration::from_millis(200))));
}

#[test]
fn isolated_primary_steps_down_after_losing_its_lease_for_an_election_timeout() {
    let mut p = elected_n1();
    p.take_actions();
    for t in (400..1_000).step_by(5) {
        p.step(ms(t), Event::Tick);
    }
    assert_eq!(p.role(), Role::Standby);
    let acts = p.take_actions();
    let last_hb = acts
        .iter()
        .rposition(|a| matches!(a, Action::Send(e) if matches!(e.body, Request::Heartbeat(_))));
    let stepped = acts.iter().position(|a| {
        matches!(
            a,
            Action::RoleChanged {
                role: Role::Standby,
                ..
            }
        )
    });
    assert!(
        stepped.is_some() && last_hb < stepped,
        "no heartbeat after stepping down"
    );
}

#[test]
fn witness_floor_only_rises_and_only_for_the_current_primary() {
    let t2 = term(2, N1);
    let mut w = engine_with(
        W,
        HardState {
            current_term: t2,
            ..HardState::bootstrap()
        },
        Vec::new(),
    );
    let raise = |pos: Position| {
        Request::RaiseFloor(RaiseFloor {
            floors: vec![(N2, pos)],
            commit: LogIndex(0),
            rewrite: false,
        })
    };
    w.step(
        ms(400),
        req(N1, W, t2, 1, raise(Position::new(t2, LogIndex(5)))),
    );
    assert_eq!(w.hard_state().floor(N2), Position::new(t2, LogIndex(5)));
    w.step(
        ms(401),
        req(N1, W, t2, 2, raise(Position::new(t2, LogIndex(3)))),
    );
    assert_eq!(
        w.hard_state().floor(N2),
        Position::new(t2, LogIndex(5)),
        "floors never go down"
    );
    w.step(
        ms(402),
        req(N1, W, term(1, N1), 3, raise(Position::new(t2, LogIndex(9)))),
    );
    assert_eq!(
        w.hard_state().floor(N2),
        Position::new(t2, LogIndex(5)),
        "stale term refused"
    );
}

#[test]
fn timeout_now_only_from_the_current_primary_and_only_when_caught_up() {
    let t1 = term(1, N1);
    let mut s = engine_with(
        N2,
        HardState {
            current_term: t1,
            ..HardState::bootstrap()
        },
        vec![entry(t1, 1)],
    );
    s.step(
        ms(400),
        req(
            N1,
            N2,
            t1,
            1,
            Request::Heartbeat(Heartbeat {
                commit: LogIndex(1),
                last: Position::new(t1, LogIndex(1)),
            }),
        ),
    );
    s.take_actions();
    let promote = |last| {
        Request::Promote(Promote {
            reason: "test".into(),
            last,
        })
    };
    s.step(
        ms(401),
        req(N1, N2, t1, 2, promote(Position::new(t1, LogIndex(2)))),
    );
    assert_eq!(s.role(), Role::Standby, "not caught up");
    s.step(
        ms(402),
        req(N1, N2, t1, 3, promote(Position::new(t1, LogIndex(1)))),
    );
    assert_eq!(
        s.role(),
        Role::Candidate,
        "caught-up target campaigns at once"
    );
    assert_eq!(s.term(), term(2, N2));
}

#[test]
fn switchover_hands_over_and_the_old_primary_stops_serving() {
    let mut p = elected_n1();
    let acts = p.take_actions();
    // The standby holds the no-op durably, so the Promote leaves at once.
    p.step(
        ms(400),
        Event::Persisted(Position::new(term(1, N1), LogIndex(1))),
    );
    ack_batches(&mut p, &acts, 0, ms(400));
    p.take_actions();
    p.step(ms(401), Event::Admin(5, Admin::Switchover));
    assert!(
        !p.has_lease(ms(401)),
        "a primary handing over holds no lease"
    );
    p.step(ms(401), Event::ClientWrites(vec![(6, Command(vec![1]))]));
    let acts = p.take_actions();
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::WriteDone(
            6,
            Err(ha_core::Error::NotLeader {
                leader: Some(N2),
                ..
            })
        )
    )));
    assert!(
        sent(&acts)
            .iter()
            .any(|s| s.to == N2 && matches!(s.body, Request::Promote(_))),
        "{acts:?}"
    );
    // The target's vote request is granted at once by the handing-over primary.
    p.step(
        ms(402),
        transfer_vote(Position::new(term(1, N1), LogIndex(1))),
    );
    let acts = p.take_actions();
    assert_eq!(granted(&acts), Some(true));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::AdminDone(5, Ok(())))));
    assert_eq!(p.role(), Role::Standby);
}

#[test]
fn forced_promotion_uses_a_term_that_names_the_node() {
    let mut s = fresh(N2);
    s.step(ms(10), Event::Admin(1, Admin::ForcePromote));
    assert_eq!(s.role(), Role::Primary);
    assert_eq!(s.term(), term(1, N2));
}

#[test]
fn without_a_witness_automatic_failover_is_off() {
    let mut c = config(N1);
    c.peers.retain(|m| m.kind == MemberKind::Data);
    let mut e = Engine::new(
        c,
        InitialState {
            hard_state: HardState::bootstrap(),
            snapshot: None,
            entries: vec![],
            applied: LogIndex::ZERO,
        },
        ms(0),
        1,
    );
    for t in (0..2_000).step_by(5) {
        e.step(ms(t), Event::Tick);
    }
    assert!(sent(&e.take_actions()).is_empty());
    assert_eq!(e.role(), Role::Standby);
}

/// Answers every heartbeat `p` sent to `from` (accepted, as a voter).
fn ack_heartbeats(p: &mut Engine, acts: &[Action], from: NodeId, at: Instant) {
    let term = p.term();
    for s in sent(acts) {
        if s.to == from && matches!(s.body, Request::Heartbeat(_)) {
            p.step(
                at,
                Event::Response(Envelope {
                    from,
                    to: p.id(),
                    term,
                    request_id: s.request_id,
                    body: Response::HeartbeatAck(ha_core::message::HeartbeatAck {
                        accepted: true,
                        last: Position::ZERO,
                        applied: LogIndex(0),
                        voter: true,
                    }),
                }),
            );
        }
    }
}

/// Acks durably every batch `p` sent to the standby, reporting `applied`.
fn ack_batches(p: &mut Engine, acts: &[Action], applied: u64, at: Instant) {
    let term = p.term();
    for s in sent(acts) {
        if let (N2, Request::WalBatch(b)) = (s.to, &s.body) {
            let last = b.entries.last().map(|e| e.position).unwrap_or(b.prev);
            p.step(
                at,
                Event::Response(Envelope {
                    from: N2,
                    to: p.id(),
                    term,
                    request_id: s.request_id,
                    body: Response::WalAck(ha_core::message::WalAck {
                        batch_term: term,
                        result: AckResult::Durable(last),
                        applied: LogIndex(applied),
                    }),
                }),
            );
        }
    }
}

fn write_done(acts: &[Action], id: u64) -> Option<Result<Position, ha_core::Error>> {
    acts.iter().find_map(|a| match a {
        Action::WriteDone(i, r) if *i == id => Some(r.clone()),
        _ => None,
    })
}

#[test]
fn switchover_acknowledges_writes_in_flight_before_handing_over() {
    let t1 = term(1, N1);
    let mut p = elected_n1();
    let acts = p.take_actions();
    ack_heartbeats(&mut p, &acts, W, ms(400));
    // The no-op's batch is acked, so the write's batch leaves at once.
    ack_batches(&mut p, &acts, 0, ms(400));
    p.take_actions();
    p.step(ms(401), Event::ClientWrites(vec![(7, Command(vec![7]))]));
    p.step(ms(401), Event::Admin(8, Admin::Switchover));
    p.step(ms(401), Event::Persisted(Position::new(t1, LogIndex(2))));
    let acts = p.take_actions();
    assert!(
        !sent(&acts)
            .iter()
            .any(|s| matches!(s.body, Request::Promote(_))),
        "promote before the write is safe"
    );
    ack_batches(&mut p, &acts, 0, ms(402));
    let acts = p.take_actions();
    assert_eq!(
        write_done(&acts, 7),
        Some(Ok(Position::new(t1, LogIndex(2)))),
        "{acts:?}"
    );
    p.step(ms(407), Event::Tick);
    let acts = p.take_actions();
    assert!(
        sent(&acts)
            .iter()
            .any(|s| s.to == N2 && matches!(s.body, Request::Promote(_))),
        "{acts:?}"
    );
    assert!(
        !p.has_lease(ms(407)),
        "the lease is given up with the promote"
    );
}

#[test]
fn manual_promote_is_refused_while_a_primary_is_heard_or_during_start_up() {
    let t1 = term(1, N1);
    let mut s = engine_with(
        N2,
        HardState {
            current_term: t1,
            ..HardState::bootstrap()
        },
        Vec::new(),
    );
    s.step(ms(10), Event::Admin(1, Admin::Promote));
    let acts = s.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::AdminDone(1, Err(ha_core::Error::Rejected(_))))),
        "{acts:?}"
    );
    s.step(
        ms(400),
        req(
            N1,
            N2,
            t1,
            1,
            Request::Heartbeat(Heartbeat {
                commit: LogIndex(0),
                last: Position::ZERO,
            }),
        ),
    );
    s.take_actions();
    s.step(ms(401), Event::Admin(2, Admin::Promote));
    let acts = s.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::AdminDone(2, Err(ha_core::Error::Rejected(_))))),
        "{acts:?}"
    );
    assert!(
        sent(&acts).is_empty(),
        "no vote requested while the primary is heard"
    );
    assert_eq!(s.term(), t1);
    // Once the primary has been silent for a failover timeout, promote campaigns.
    s.step(ms(600), Event::Admin(3, Admin::Promote));
    assert!(sent(&s.take_actions())
        .iter()
        .any(|r| matches!(&r.body, Request::Vote(v) if v.pre_vote)));
}

#[test]
fn sync_apply_acknowledges_through_a_witness_floor_when_the_standby_stops_applying() {
    let t1 = term(1, N1);
    let mut c = config(N1);
    c.commit_mode = ha_core::CommitMode::SyncApply;
    let mut p = Engine::new(
        c,
        InitialState {
            hard_state: HardState::bootstrap(),
            snapshot: None,
            entries: vec![],
            applied: LogIndex::ZERO,
        },
        ms(0),
        7,
    );
    p.step(ms(10), Event::Admin(0, Admin::ForcePromote));
    let acts = p.take_actions();
    p.step(ms(10), Event::Persisted(Position::new(t1, LogIndex(1))));
    ack_heartbeats(&mut p, &acts, W, ms(11)); // a lease from the witness
    ack_batches(&mut p, &acts, 1, ms(11)); // the standby follows: an ordinary primary now
    p.take_actions();
    // A write the standby holds durably but never applies (it dies).
    p.step(ms(20), Event::ClientWrites(vec![(9, Command(vec![9]))]));
    p.step(ms(20), Event::Persisted(Position::new(t1, LogIndex(2))));
    let acts = p.take_actions();
    ack_batches(&mut p, &acts, 1, ms(21));
    assert_eq!(
        write_done(&p.take_actions(), 9),
        None,
        "waits for the standby to apply"
    );
    // After degrade_timeout the primary asks the witness for a floor instead.
    p.step(ms(130), Event::Tick);
    let acts = p.take_actions();
    let raise = sent(&acts)
        .into_iter()
        .find(|s| s.to == W && matches!(s.body, Request::RaiseFloor(_)));
    let raise = raise.expect("floor requested from the witness");
    ack_heartbeats(&mut p, &acts, W, ms(130));
    p.step(
        ms(131),
        Event::Response(Envelope {
            from: W,
            to: N1,
            term: t1,
            request_id: raise.request_id,
            body: Response::FloorAck(ha_core::message::FloorAck {
                floors: vec![(N2, Position::new(t1, LogIndex(2)))],
                accepted: true,
            }),
        }),
    );
    assert_eq!(
        write_done(&p.take_actions(), 9),
        Some(Ok(Position::new(t1, LogIndex(2))))
    );
}

#[test]
fn a_forced_primary_follows_ordinary_rules_once_the_standby_follows_it() {
    let t1 = term(1, N1);
    let mut p = fresh(N1);
    p.step(ms(10), Event::Admin(0, Admin::ForcePromote));
    assert!(p.has_lease(ms(10)), "forced: serves without a majority");
    let acts = p.take_actions();
    p.step(ms(10), Event::Persisted(Position::new(t1, LogIndex(1))));
    ack_batches(&mut p, &acts, 0, ms(11));
    p.take_actions();
    assert!(
        !p.has_lease(ms(12)),
        "no heartbeat acknowledged yet: no lease"
    );
}

#[test]
fn the_primary_refuses_writes_beyond_the_uncommitted_limit() {
    let mut c = config(N1);
    c.max_uncommitted_entries = 3;
    let mut p = Engine::new(
        c,
        InitialState {
            hard_state: HardState::bootstrap(),
            snapshot: None,
            entries: vec![],
            applied: LogIndex::ZERO,
        },
        ms(0),
        7,
    );
    p.step(ms(10), Event::Admin(0, Admin::ForcePromote));
    p.take_actions();
    p.step(
        ms(10),
        Event::ClientWrites(vec![(1, Command(vec![1])), (2, Command(vec![2]))]),
    );
    assert_eq!(
        write_done(&p.take_actions(), 1),
        None,
        "within the limit: accepted"
    );
    p.step(ms(10), Event::ClientWrites(vec![(3, Command(vec![3]))]));
    // Refused with the typed backpressure error (it was `Rejected` with a text).
    assert!(matches!(
        write_done(&p.take_actions(), 3),
        Some(Err(ha_core::Error::Busy { .. }))
    ));
}

fn wal_ack_from_n2(p: &mut Engine, at: Instant, request_id: u64, result: AckResult) {
    let term = p.term();
    p.step(
        at,
        Event::Response(Envelope {
            from: N2,
            to: N1,
            term,
            request_id,
            body: Response::WalAck(ha_core::message::WalAck {
                batch_term: term,
                result,
                applied: LogIndex::ZERO,
            }),
        }),
    );
}

fn read_request(acts: &[Action]) -> Option<(u64, LogIndex)> {
    acts.iter().find_map(|a| match a {
        Action::ReadEntries { read_id, next, .. } => Some((*read_id, *next)),
        _ => None,
    })
}

/// An elected primary whose in-memory log starts after its snapshot at 50 (entries
/// 51 to 60), the actions of its election, and its first batch to the standby.
fn primary_with_snapshot_at_50() -> (Engine, Snapshot, Vec<Action>, Envelope<Request>) {
    let t1 = term(1, N1);
    let snapshot = Snapshot {
        last_included: Position::new(t1, LogIndex(50)),
        size: 11,
    };
    let e = Engine::new(
        config(N1),
        InitialState {
            hard_state: HardState::bootstrap(),
            snapshot: Some(snapshot),
            entries: (51..=60).map(|i| entry(t1, i)).collect(),
            applied: LogIndex(50),
        },
        ms(0),
        7,
    );
    let mut p = elect(e);
    let acts = p.take_actions();
    let first = sent(&acts)
        .into_iter()
        .find(|s| s.to == N2 && matches!(s.body, Request::WalBatch(_)))
        .expect("a batch to the standby");
    (p, snapshot, acts, first)
}

/// The primary keeps only the entries after its snapshot in memory: a standby that
/// needs older ones is served from the durable log (a read, then a batch whose
/// `prev` the read supplied), and gets the snapshot once the log cannot serve it.
#[test]
fn a_standby_behind_the_in_memory_log_is_served_from_the_durable_log_then_the_snapshot() {
    let t1 = term(1, N1);
    let (mut p, snapshot, acts, first) = primary_with_snapshot_at_50();
    assert_eq!(
        read_request(&acts),
        None,
        "the standby's position is unknown yet"
    );

    // The standby holds only up to 10: far below the in-memory log.
    wal_ack_from_n2(
        &mut p,
        ms(401),
        first.request_id,
        AckResult::Mismatch {
            next: LogIndex(11),
            conflict_term: None,
        },
    );
    let acts = p.take_actions();
    let (read_id, next) = read_request(&acts).expect("a read of the durable log");
    assert_eq!(next, LogIndex(11));
    assert!(!sent(&acts)
        .iter()
        .any(|s| matches!(s.body, Request::WalBatch(_) | Request::InstallSnapshot(_))));

    // An answer to another read is ignored.
    p.step(
        ms(402),
        Event::EntriesRead {
            read_id: read_id + 1_000,
            result: Err(StorageError::Io("not mine".into())),
        },
    );
    assert!(sent(&p.take_actions()).is_empty());

    // The read comes back: a batch with the prev the read supplied, then the next
    // read for what follows.
    let entries: Vec<WalEntry> = (11..=15).map(|i| entry(t1, i)).collect();
    p.step(
        ms(403),
        Event::EntriesRead {
            read_id,
            result: Ok(CatchUpBatch {
                prev: Position::new(t1, LogIndex(10)),
                entries: entries.clone(),
            }),
        },
    );
    let acts = p.take_actions();
    let b = sent(&acts)
        .into_iter()
        .find_map(|s| match s.body {
            Request::WalBatch(b) if s.to == N2 => Some((s.request_id, b)),
            _ => None,
        })
        .expect("the batch read from disk");
    assert_eq!(b.1.prev, Position::new(t1, LogIndex(10)));
    assert_eq!(b.1.entries, entries);
    let (read_id, next) = read_request(&acts).expect("the next read");
    assert_eq!(next, LogIndex(16));

    // Its ack counts although the in-memory log does not hold that position.
    wal_ack_from_n2(
        &mut p,
        ms(404),
        b.0,
        AckResult::Durable(Position::new(t1, LogIndex(15))),
    );
    assert_eq!(p.health(ms(404)).peers[0].match_index, Some(LogIndex(15)));

    // The log purged the rest: the snapshot goes instead.
    p.step(
        ms(405),
        Event::EntriesRead {
            read_id,
            result: Err(StorageError::Invalid("entries up to 40 were purged".into())),
        },
    );
    // Read from the log store, a chunk at a time (the engine holds no bytes).
    let acts = p.take_actions();
    let (read_id, read) = acts
        .iter()
        .find_map(|a| match a {
            Action::ReadSnapshot {
                read_id,
                snapshot,
                offset,
                ..
            } => Some((*read_id, (*snapshot, *offset))),
            _ => None,
        })
        .expect("a read of the snapshot");
    assert_eq!(read, (snapshot, 0));
    p.step(
        ms(406),
        Event::SnapshotRead {
            read_id,
            result: Ok(b"state at 50".to_vec()),
        },
    );
    let acts = p.take_actions();
    let snap = sent(&acts)
        .into_iter()
        .find_map(|s| match s.body {
            Request::InstallSnapshot(i) if s.to == N2 => Some(i),
            _ => None,
        })
        .expect("the snapshot");
    assert_eq!(snap.last_included, snapshot.last_included);
    assert_eq!((snap.offset, snap.size, snap.done), (0, 11, true));
    assert_eq!(snap.data, b"state at 50".to_vec());
}

fn async_standby_with_snapshot_at_50() -> Engine {
    let t1 = term(1, N1);
    let mut cfg = config(N2);
    cfg.commit_mode = ha_core::CommitMode::Async;
    cfg.max_lag_on_failover = Some(8);
    Engine::new(
        cfg,
        InitialState {
            hard_state: HardState::bootstrap(),
            snapshot: Some(Snapshot {
                last_included: Position::new(t1, LogIndex(50)),
                size: 11,
            }),
            entries: (51..=60).map(|i| entry(t1, i)).collect(),
            applied: LogIndex(60),
        },
        ms(0),
        7,
    )
}

fn install(older_at: u64, leader_last: Position) -> Request {
    Request::InstallSnapshot(ha_core::message::InstallSnapshot {
        last_included: Position::new(term(1, N1), LogIndex(older_at)),
        size: 11,
        offset: 0,
        data: b"older state".to_vec(),
        done: true,
        commit: LogIndex(older_at),
        leader_last,
    })
}

/// The async standby with its snapshot at 50 is offered the primary's snapshot at
/// 30 by a primary (term 2) whose log ends at `leader_last`.
fn offer_snapshot_at_30(leader_last: u64) -> (Engine, Vec<Action>) {
    let mut s = async_standby_with_snapshot_at_50();
    let t2 = term(2, N1);
    let last = Position::new(t2, LogIndex(leader_last));
    s.step(ms(400), req(N1, N2, t2, 5, install(30, last)));
    let acts = s.take_actions();
    (s, acts)
}

/// Async mode (the bug of `cargo xtask sim --seed 71474 --mode async`): a primary
/// whose snapshot is older than the standby's own must not make it discard applied
/// entries while log matching can still compare them: the standby keeps its
/// snapshot and answers with its last position, and the primary probes from there.
#[test]
fn async_standby_keeps_its_newer_snapshot_while_the_primary_log_reaches_it() {
    let (s, acts) = offer_snapshot_at_30(61);
    assert!(
        !acts.iter().any(|a| matches!(
            a,
            Action::InstallSnapshot(_) | Action::Discarded(_) | Action::ResetLog
        )),
        "the older snapshot must not replace applied entries: {acts:?}"
    );
    let ack = responses(&acts)
        .into_iter()
        .find_map(|r| match r.body {
            Response::SnapshotAck(a) => Some(a),
            _ => None,
        })
        .expect("a snapshot ack");
    assert!(!ack.installed);
    assert_eq!(ack.last, Position::new(term(1, N1), LogIndex(60)));
    assert_eq!(s.applied_index(), LogIndex(60));
}

/// The other side of the same rule: a standby whose snapshot reaches past the
/// primary's whole log holds entries the primary never had (async mode): it takes
/// the primary's snapshot.
#[test]
fn async_standby_installs_an_older_snapshot_when_it_is_ahead_of_the_primary_log() {
    let (_, acts) = offer_snapshot_at_30(45);
    assert!(acts.iter().any(
        |a| matches!(a, Action::InstallSnapshot(snap) if snap.last_included.index == LogIndex(30))
    ));
    assert!(acts.iter().any(|a| matches!(a, Action::Discarded(_))));
}

fn snapshot_ack_from_n2(p: &mut Engine, at: Instant, term: Term, request_id: u64, last: Position) {
    p.step(
        at,
        Event::Response(Envelope {
            from: N2,
            to: N1,
            term,
            request_id,
            body: Response::SnapshotAck(ha_core::message::SnapshotAck {
                snapshot_term: last.term,
                installed: true,
                last,
                next_offset: None,
            }),
        }),
    );
}

/// Answers the engine's snapshot chunk reads among `acts` (with bytes of the
/// right length) and returns the actions that follow, with the rest of `acts`.
fn serve_snapshot_reads(p: &mut Engine, now: Instant, acts: Vec<Action>) -> Vec<Action> {
    let mut out = Vec::new();
    for a in acts {
        if let Action::ReadSnapshot {
            read_id,
            snapshot,
            offset,
            max_bytes,
        } = a
        {
            let len = ((snapshot.size - offset) as usize).min(max_bytes);
            p.step(
                now,
                Event::SnapshotRead {
                    read_id,
                    result: Ok(vec![7; len]),
                },
            );
            out.extend(p.take_actions());
        } else {
            out.push(a);
        }
    }
    out
}

/// The term rule covers responses too: a snapshot ack of another term, or one
/// that answers no snapshot in flight, does not raise the standby's match index;
/// only the answer to the snapshot in flight does.
#[test]
fn a_stale_snapshot_ack_is_ignored() {
    let t1 = term(1, N1);
    let (mut p, snapshot, _, first) = primary_with_snapshot_at_50();
    wal_ack_from_n2(
        &mut p,
        ms(401),
        first.request_id,
        AckResult::Mismatch {
            next: LogIndex(11),
            conflict_term: None,
        },
    );
    let (read_id, _) = read_request(&p.take_actions()).expect("a read of the durable log");
    p.step(
        ms(402),
        Event::EntriesRead {
            read_id,
            result: Err(StorageError::Invalid("purged".into())),
        },
    );
    let acts = p.take_actions();
    let acts = serve_snapshot_reads(&mut p, ms(402), acts);
    let rid = sent(&acts)
        .into_iter()
        .find(|s| s.to == N2 && matches!(s.body, Request::InstallSnapshot(_)))
        .expect("the snapshot")
        .request_id;
    let at_50 = snapshot.last_included;
    let now_term = p.term();
    let matched = |p: &Engine| p.health(ms(410)).peers[0].match_index;

    // An ack carrying an older term (a reply from before this primary's term).
    snapshot_ack_from_n2(&mut p, ms(403), Term::ZERO, rid, at_50);
    assert_eq!(
        matched(&p),
        Some(LogIndex::ZERO),
        "a stale-term ack is ignored"
    );
    // An ack of the current term that answers no snapshot in flight.
    snapshot_ack_from_n2(&mut p, ms(404), now_term, rid + 1_000, at_50);
    assert_eq!(
        matched(&p),
        Some(LogIndex::ZERO),
        "an ack of another request is ignored"
    );
    // The answer to the snapshot in flight.
    snapshot_ack_from_n2(&mut p, ms(405), now_term, rid, at_50);
    assert_eq!(matched(&p), Some(LogIndex(50)));
    // A duplicate of it, once nothing is in flight, changes nothing.
    snapshot_ack_from_n2(
        &mut p,
        ms(406),
        now_term,
        rid,
        Position::new(t1, LogIndex(55)),
    );
    assert_eq!(matched(&p), Some(LogIndex(50)));
}

fn snapshot_ack(actions: &[Action]) -> Option<ha_core::message::SnapshotAck> {
    responses(actions).into_iter().find_map(|r| match r.body {
        Response::SnapshotAck(a) => Some(a),
        _ => None,
    })
}

/// A snapshot ack counts toward the primary's commit, so a standby that holds the
/// snapshot's position only in memory (appended, not yet durable) must not claim
/// it: it answers "not installed" with its durable position, and claims the
/// snapshot once the entries are durable.
#[test]
fn a_snapshot_ack_claims_only_what_is_durable() {
    let t1 = term(1, N1);
    let mut s = fresh(N2);
    let entries = (1..=4).map(|i| entry(t1, i)).collect();
    s.step(
        ms(10),
        req(N1, N2, t1, 1, batch(Position::ZERO, entries, 0)),
    );
    assert_eq!(wal_ack(&s.take_actions()), None, "nothing durable yet");
    let at_3 = Position::new(t1, LogIndex(3));
    let offer = |rid| {
        req(
            N1,
            N2,
            t1,
            rid,
            Request::InstallSnapshot(ha_core::message::InstallSnapshot {
                last_included: at_3,
                size: 10,
                offset: 0,
                data: b"state at 3".to_vec(),
                done: true,
                commit: LogIndex(3),
                leader_last: Position::new(t1, LogIndex(4)),
            }),
        )
    };
    s.step(ms(11), offer(2));
    let ack = snapshot_ack(&s.take_actions()).expect("an answer to the snapshot");
    assert!(!ack.installed, "held only in memory: {ack:?}");
    assert_eq!(
        ack.last,
        Position::ZERO,
        "it claims only its durable position"
    );

    s.step(ms(12), Event::Persisted(Position::new(t1, LogIndex(4))));
    s.take_actions();
    s.step(ms(13), offer(3));
    let ack = snapshot_ack(&s.take_actions()).expect("an answer to the snapshot");
    assert!(ack.installed);
    assert_eq!(ack.last, at_3);
}

/// n2's vote request in its switchover campaign (term 2.n2), its log ending at
/// `last`.
fn transfer_vote(last: Position) -> Event {
    req(
        N2,
        N1,
        term(2, N2),
        1,
        Request::Vote(VoteRequest {
            pre_vote: false,
            campaign_term: term(2, N2),
            last,
            transfer: true,
        }),
    )
}

/// A primary handing over votes at once only for the campaign it asked for (after
/// its Promote) and only for a log holding all of its own: a campaign of the
/// target's own while it still catches up (`cargo xtask sim --seed 7208 --mode
/// sync`: an old pre-vote round let a paused, empty standby win on the handing-over
/// primary's vote and lose 12 acknowledged writes) is refused like any other.
#[test]
fn a_handing_over_primary_votes_only_for_the_campaign_it_asked_for() {
    let mut p = elected_n1();
    p.take_actions();
    // The standby has not acked the no-op: no Promote yet.
    p.step(ms(401), Event::Admin(5, Admin::Switchover));
    assert!(!sent(&p.take_actions())
        .iter()
        .any(|s| matches!(s.body, Request::Promote(_))));
    p.step(
        ms(402),
        transfer_vote(Position::new(term(1, N1), LogIndex(1))),
    );
    assert_eq!(granted(&p.take_actions()), Some(false));
    assert_eq!(p.role(), Role::Primary, "the primary goes on handing over");
    // A shorter log is refused too.
    p.step(ms(403), transfer_vote(Position::ZERO));
    assert_eq!(granted(&p.take_actions()), Some(false));
}
