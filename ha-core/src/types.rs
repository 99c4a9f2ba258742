//! Identifiers, terms, log positions and WAL entries.
//!
//! These are the values every other module speaks in. They are plain data: no I/O,
//! no clock. Their serde form is part of the wire and on-disk format, so a change to
//! a field is a format change (see `message::WIRE_VERSION`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A cluster member's identity. In a TLS deployment it is also the name in the
/// member's certificate.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A term: an election number paired with the node that owns it.
///
/// Ordered by number first, then node. Because the node is part of the term, two
/// primaries can never write entries that look alike, even after a forced promotion
/// (protocol.md, "Terms, votes, start-up"): a position names its writer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Term {
    /// The election number; each election raises it by one.
    pub number: u64,
    /// The node that campaigned (and, if it won, leads) in this term.
    pub node: NodeId,
}

impl Term {
    /// The term every fresh cluster starts in; nobody leads it.
    pub const ZERO: Term = Term {
        number: 0,
        node: NodeId(0),
    };

    /// The next term that `node` would campaign in.
    pub fn next_for(self, node: NodeId) -> Term {
        Term {
            number: self.number + 1,
            node,
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.number, self.node)
    }
}

/// The index of an entry in the write-ahead log. Index 0 is the empty log's position;
/// the first entry has index 1.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogIndex(pub u64);

impl LogIndex {
    /// The position before the first entry.
    pub const ZERO: LogIndex = LogIndex(0);

    /// The following index.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }

    /// The preceding index, saturating at zero.
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL position: the term an entry was written in and its index. Compared term
/// first, so a position written by a later primary is always greater.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The term the entry was written in.
    pub term: Term,
    /// The entry's index.
    pub index: LogIndex,
}

impl Position {
    /// The position of the empty log.
    pub const ZERO: Position = Position {
        term: Term::ZERO,
        index: LogIndex::ZERO,
    };

    /// Builds a position.
    pub fn new(term: Term, index: LogIndex) -> Self {
        Position { term, index }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.term, self.index)
    }
}

/// An opaque client command. The state machine gives it meaning.
///
/// Encoded as a byte string (`serde_bytes`): with postcard that is the same bytes as
/// a sequence of `u8` (a varint length, then the bytes), copied in one piece
/// instead of one element at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl From<Vec<u8>> for Command {
    fn from(v: Vec<u8>) -> Self {
        Command(v)
    }
}

impl From<&[u8]> for Command {
    fn from(v: &[u8]) -> Self {
        Command(v.to_vec())
    }
}

/// What a WAL entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Payload {
    /// The entry a new primary commits first in its term (docs/protocol.md,
    /// "Replication and commit"). It changes no state.
    Noop,
    /// A client command.
    Command(Command),
}

/// One record of the write-ahead log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WalEntry {
    /// Where the entry sits and who wrote it.
    pub position: Position,
    /// What it carries.
    pub payload: Payload,
    /// CRC-32 of the position and payload, set by [`WalEntry::new`].
    pub checksum: u32,
}

impl WalEntry {
    /// Builds an entry and computes its checksum.
    pub fn new(position: Position, payload: Payload) -> Self {
        let checksum = Self::compute_checksum(&position, &payload);
        WalEntry {
            position,
            payload,
            checksum,
        }
    }

    /// A no-op entry at `position`.
    pub fn noop(position: Position) -> Self {
        Self::new(position, Payload::Noop)
    }

    /// True if the stored checksum matches the content.
    pub fn verify(&self) -> bool {
        self.checksum == Self::compute_checksum(&self.position, &self.payload)
    }

    /// The entry's index.
    pub fn index(&self) -> LogIndex {
        self.position.index
    }

    /// The entry's term.
    pub fn term(&self) -> Term {
        self.position.term
    }

    /// Approximate encoded size in bytes, used to bound batches.
    pub fn approx_size(&self) -> usize {
        let body = match &self.payload {
            Payload::Noop => 0,
            Payload::Command(c) => c.0.len(),
        };
        body + 40
    }

    fn compute_checksum(position: &Position, payload: &Payload) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&position.term.number.to_le_bytes());
        h.update(&position.term.node.0.to_le_bytes());
        h.update(&position.index.0.to_le_bytes());
        match payload {
            Payload::Noop => h.update(&[0]),
            Payload::Command(c) => {
                h.update(&[1]);
                h.update(&(c.0.len() as u64).to_le_bytes());
                h.update(&c.0);
            }
        }
        h.finalize()
    }
}

/// The role a node plays right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Accepts writes and streams the WAL.
    Primary,
    /// Receives and applies the WAL; may be elected.
    Standby,
    /// Running a pre-vote or an election.
    Candidate,
    /// Votes and keeps floors; stores no log.
    Witness,
    /// Has an empty data directory and is catching up before it may vote.
    Learner,
}

impl Role {
    /// The role a member that is not leading or campaigning has: the witness is a
    /// witness; a data node a standby while it votes, a learner until it has
    /// caught up (after joining with an empty data directory).
    pub fn follower(kind: MemberKind, voter: bool) -> Role {
        match (kind, voter) {
            (MemberKind::Witness, _) => Role::Witness,
            (MemberKind::Data, true) => Role::Standby,
            (MemberKind::Data, false) => Role::Learner,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Candidate => "candidate",
            Role::Witness => "witness",
            Role::Learner => "learner",
        };
        f.write_str(s)
    }
}

/// What a member is in the cluster's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberKind {
    /// Stores the log and may become primary.
    Data,
    /// Votes and stores floors only.
    Witness,
}

/// How far a write must travel before its client is told it succeeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommitMode {
    /// After the primary's own fsync; a failover may lose up to
    /// `max_lag_on_failover` acknowledged writes.
    Async,
    /// After the primary's and the standby's fsync (the default).
    #[default]
    Sync,
    /// As `Sync`, and the standby has applied the write.
    SyncApply,
}

/// The durable record every node replaces atomically before it replies to the message
/// that changed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub current_term: Term,
    /// Whom it voted for in `current_term`.
    pub voted_for: Option<NodeId>,
    /// False for a node that joined with an empty data directory and has not caught
    /// up yet; such a node neither votes nor campaigns.
    pub voter: bool,
    /// On the witness: the lowest position each data node's log must reach before
    /// the witness votes for it; these floors never go down. On a data node: at
    /// most its own entry, the position it held before an async-mode resync from
    /// scratch, which its log must pass again before it campaigns or votes for a
    /// candidate below it (cleared once passed).
    pub floors: Vec<(NodeId, Position)>,
}

impl HardState {
    /// The state of a node created by an explicit bootstrap.
    pub fn bootstrap() -> Self {
        HardState {
            current_term: Term::ZERO,
            voted_for: None,
            voter: true,
            floors: Vec::new(),
        }
    }

    /// The state of a node that joins an existing cluster with an empty directory.
    pub fn joining() -> Self {
        HardState {
            current_term: Term::ZERO,
            voted_for: None,
            voter: false,
            floors: Vec::new(),
        }
    }

    /// The floor recorded for `node`, or the empty position.
    pub fn floor(&self, node: NodeId) -> Position {
        self.floors
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, p)| *p)
            .unwrap_or(Position::ZERO)
    }

    /// Raises the floor for `node` to `pos` if that is higher; returns true if it
    /// changed.
    pub fn raise_floor(&mut self, node: NodeId, pos: Position) -> bool {
        match self.floors.iter_mut().find(|(n, _)| *n == node) {
            Some((_, p)) if *p >= pos => false,
            Some((_, p)) => {
                *p = pos;
                true
            }
            None => {
                self.floors.push((node, pos));
                self.floors.sort();
                true
            }
        }
    }
}

/// A point on a monotonic clock, in nanoseconds from an arbitrary origin. The engine
/// never reads a clock; every event carries one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// `self + d`, saturating.
    pub fn plus(self, d: std::time::Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Instant) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-string encoding of a command is the one the WAL files and the
    /// wire carried before: a varint length, then the bytes.
    #[test]
    fn a_command_encodes_as_a_length_and_its_bytes() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let bytes = postcard::to_allocvec(&Command(payload.clone())).expect("encode");
        let mut want = vec![0xAC, 0x02]; // 300 as a varint
        want.extend_from_slice(&payload);
        assert_eq!(bytes, want);
        let as_seq = postcard::to_allocvec(&payload).expect("encode");
        assert_eq!(bytes, as_seq, "same bytes as a Vec<u8> sequence");
        let back: Command = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, Command(payload));
    }

    #[test]
    fn positions_compare_term_first() {
        let a = Position::new(
            Term {
                number: 2,
                node: NodeId(1),
            },
            LogIndex(1),
        );
        let b = Position::new(
            Term {
                number: 1,
                node: NodeId(2),
            },
            LogIndex(100),
        );
        assert!(a > b);
        let c = Position::new(
            Term {
                number: 2,
                node: NodeId(2),
            },
            LogIndex(1),
        );
        assert!(c > a, "same number, higher node id is a later term");
    }

    #[test]
    fn checksum_detects_a_changed_payload() {
        let mut e = WalEntry::new(
            Position::new(Term::ZERO, LogIndex(1)),
            Payload::Command(Command(vec![1, 2])),
        );
        assert!(e.verify());
        e.payload = Payload::Command(Command(vec![1, 3]));
        assert!(!e.verify());
    }

    #[test]
    fn floors_never_go_down() {
        let mut hs = HardState::bootstrap();
        let hi = Position::new(
            Term {
                number: 3,
                node: NodeId(1),
            },
            LogIndex(9),
        );
        let lo = Position::new(
            Term {
                number: 3,
                node: NodeId(1),
            },
            LogIndex(4),
        );
        assert!(hs.raise_floor(NodeId(2), hi));
        assert!(!hs.raise_floor(NodeId(2), lo));
        assert_eq!(hs.floor(NodeId(2)), hi);
        assert_eq!(hs.floor(NodeId(1)), Position::ZERO);
    }
}
