//! The messages peers exchange: requests, responses and the envelope that carries
//! every one of them.
//!
//! Every message names its sender and the sender's current term (docs/protocol.md).
//! Every request carries a request id and every response echoes it, so a response is
//! always matched to its request. A handler that fails still answers, with
//! [`Response::Error`].

use serde::{Deserialize, Serialize};

use crate::types::{LogIndex, NodeId, Position, Term, WalEntry};

/// The version of this wire format; transports name it in their ALPN / handshake.
pub const WIRE_VERSION: u32 = 1;

/// A message with its sender, the sender's term and the request id it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// The sending node.
    pub from: NodeId,
    /// The intended receiver.
    pub to: NodeId,
    /// The sender's current term.
    pub term: Term,
    /// Chosen by the requester; a response echoes its request's id.
    pub request_id: u64,
    /// The message itself.
    pub body: T,
}

/// Which stream a request travels on. WAL data never delays control traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The long-lived, ordered, windowed WAL stream.
    Wal,
    /// Heartbeats, votes, fences, floors and leadership transfer.
    Control,
}

/// A request from one peer to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A WAL batch: the Raft AppendEntries request.
    WalBatch(WalBatch),
    /// A primary's liveness signal, carrying its commit index.
    Heartbeat(Heartbeat),
    /// A term-carrying order to step down.
    Fence(Fence),
    /// A pre-vote or a vote (Raft RequestVote).
    Vote(VoteRequest),
    /// Leadership transfer: "campaign now" (Raft TimeoutNow); the seed's promote.
    Promote(Promote),
    /// Ask the witness to record a floor for a data node.
    RaiseFloor(RaiseFloor),
    /// A snapshot for a peer that needs entries already compacted.
    InstallSnapshot(InstallSnapshot),
}

impl Request {
    /// The stream this request belongs on.
    pub fn channel(&self) -> Channel {
        match self {
            Request::WalBatch(_) | Request::InstallSnapshot(_) => Channel::Wal,
            _ => Channel::Control,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::WalBatch(_) => "wal_batch",
            Request::Heartbeat(_) => "heartbeat",
            Request::Fence(_) => "fence",
            Request::Vote(v) if v.pre_vote => "pre_vote",
            Request::Vote(_) => "vote",
            Request::Promote(_) => "promote",
            Request::RaiseFloor(_) => "raise_floor",
            Request::InstallSnapshot(_) => "install_snapshot",
        }
    }
}

/// A response to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::WalBatch`].
    WalAck(WalAck),
    /// Answer to [`Request::Heartbeat`].
    HeartbeatAck(HeartbeatAck),
    /// Answer to [`Request::Fence`].
    FenceAck(FenceAck),
    /// Answer to [`Request::Vote`].
    Vote(VoteResponse),
    /// Answer to [`Request::Promote`].
    PromoteAck(PromoteAck),
    /// Answer to [`Request::RaiseFloor`].
    FloorAck(FloorAck),
    /// Answer to [`Request::InstallSnapshot`].
    SnapshotAck(SnapshotAck),
    /// The handler failed or refused; the reason is for logs.
    Error(RpcError),
}

/// Why a handler could not answer normally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcError {
    /// The receiver is shutting down.
    ShuttingDown,
    /// The receiver did not answer within its deadline.
    Timeout,
    /// The sender is not a configured member, or claimed another identity.
    NotAMember,
    /// The request could not be decoded or was too large.
    Malformed(String),
}

/// A batch of WAL entries (the Raft AppendEntries request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalBatch {
    /// The position just before the first entry (or the last entry, if empty).
    pub prev: Position,
    /// The entries, in index order, contiguous after `prev`.
    pub entries: Vec<WalEntry>,
    /// The primary's commit index; receivers apply only up to it.
    pub commit: LogIndex,
}

/// The standby's answer to a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalAck {
    /// The batch's term, echoed (the envelope carries the responder's term).
    pub batch_term: Term,
    /// What happened.
    pub result: AckResult,
    /// The highest index the responder has applied (for `sync-apply`).
    pub applied: LogIndex,
}

/// The outcome of a batch at the standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckResult {
    /// Durable up to this position: the last entry of the batch.
    Durable(Position),
    /// The standby does not hold `prev`; resend from `next` (a gap or a conflict).
    Mismatch {
        /// Where the primary should resume.
        next: LogIndex,
        /// The term of the responder's conflicting entry, if any (a conflict hint).
        conflict_term: Option<Term>,
    },
    /// The batch came from a stale term and was refused.
    StaleTerm,
}

/// A primary's liveness signal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The primary's commit index (advisory at the witness).
    pub commit: LogIndex,
    /// The primary's last log position, for lag reporting.
    pub last: Position,
}

/// The answer to a heartbeat; the envelope's request id says which one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// True if the responder accepted the sender as primary of its term.
    pub accepted: bool,
    /// The responder's last log position (data nodes).
    pub last: Position,
    /// The responder's applied index.
    pub applied: LogIndex,
    /// False if the responder has not caught up after joining empty.
    pub voter: bool,
}

/// A term-carrying order to step down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// Why, for logs.
    pub reason: String,
}

/// The answer to a fence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAck {
    /// True if the receiver is now a follower in the fence's term or later.
    pub fenced: bool,
}

/// A pre-vote or a vote request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRequest {
    /// A pre-vote changes nobody's term or vote (protocol.md, "Election").
    pub pre_vote: bool,
    /// The term the candidate campaigns in. For a real vote this equals the
    /// envelope's term; for a pre-vote the envelope carries the current term.
    pub campaign_term: Term,
    /// The candidate's last log position.
    pub last: Position,
    /// True when the current primary asked for this election (switchover); only
    /// then may a voter that heard from that primary recently still vote.
    pub transfer: bool,
}

/// The answer to a vote request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteResponse {
    /// The campaign term this answers.
    pub campaign_term: Term,
    /// Whether the vote (or pre-vote) is granted.
    pub granted: bool,
    /// Echo of the request's kind.
    pub pre_vote: bool,
}

/// Leadership transfer: the primary tells its caught-up target to campaign now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promote {
    /// Why, for logs.
    pub reason: String,
    /// The primary's last position; the target must hold it.
    pub last: Position,
}

/// The answer to [`Promote`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteAck {
    /// True if the target started an election.
    pub started: bool,
}

/// Ask the witness to record floors for data nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaiseFloor {
    /// The floors to raise, one per data node named.
    pub floors: Vec<(NodeId, Position)>,
    /// The primary's commit index, advisory.
    pub commit: LogIndex,
    /// True when the primary rewrites the whole record of a witness that joined with
    /// an empty directory; afterwards the witness votes again.
    pub rewrite: bool,
}

/// The witness's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorAck {
    /// The floors the witness now holds durably for the nodes asked about (each may
    /// be higher than asked).
    pub floors: Vec<(NodeId, Position)>,
    /// False if the request's term was stale.
    pub accepted: bool,
}

/// One chunk of a state-machine snapshot (Raft's InstallSnapshot with
/// `offset`/`done`): a snapshot of any size travels as chunks of at most
/// [`crate::Config::snapshot_chunk_bytes`], one request each, which the
/// receiver stages and installs only once the last one arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallSnapshot {
    /// The last entry the snapshot includes: names the snapshot (a chunk of
    /// another one restarts the staging).
    pub last_included: Position,
    /// The whole snapshot's size in bytes.
    pub size: u64,
    /// Where this chunk starts in the snapshot.
    pub offset: u64,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// True for the last chunk (`offset + data.len() == size`).
    pub done: bool,
    /// The primary's commit index.
    pub commit: LogIndex,
    /// The primary's last log position when it sent the chunk. In async mode a
    /// standby whose own snapshot is newer than this one keeps it (and answers
    /// `installed: false` with its last position, so the primary probes from there)
    /// while the primary's log reaches that far: log matching can then tell whether
    /// the standby's snapshot agrees with the primary's log.
    pub leader_last: Position,
}

/// The answer to a snapshot chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAck {
    /// The snapshot's term, echoed.
    pub snapshot_term: Term,
    /// True if the snapshot was installed (or the receiver already held it).
    pub installed: bool,
    /// The receiver's last position afterwards.
    pub last: Position,
    /// Not installed yet but staging: the offset of the next chunk the receiver
    /// wants (after the chunk it just staged, or where its staging stands when
    /// the chunk did not follow it). `None` when it refused the snapshot.
    pub next_offset: Option<u64>,
}

/// Raft's name for [`WalBatch`]: the primary's AppendEntries request.
pub type AppendEntriesRequest = WalBatch;
/// Raft's name for [`WalAck`]: the AppendEntries response, with conflict hints in
/// [`AckResult::Mismatch`].
pub type AppendEntriesResponse = WalAck;
/// Raft's RequestVote (and, with `pre_vote`, the pre-vote) request.
pub type RequestVote = VoteRequest;
/// Raft's TimeoutNow, used for leadership transfer: [`Promote`].
pub type TimeoutNow = Promote;

/// A fence from node 1 to node 2 with request id `id`, for unit tests.
#[cfg(test)]
pub(crate) fn test_request(id: u64) -> Envelope<Request> {
    Envelope {
        from: NodeId(1),
        to: NodeId(2),
        term: Term::ZERO,
        request_id: id,
        body: Request::Fence(Fence {
            reason: "test".into(),
        }),
    }
}
