//! The API's JSON bodies, shared by the server and the client.

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusJson {
    /// This node.
    pub node_id: u64,
    /// `data` or `witness`.
    pub kind: String,
    /// primary, standby, candidate, witness or learner.
    pub role: String,
    /// The current term's number.
    pub term: u64,
    /// The node that started the current term.
    pub term_node: u64,
    /// The primary this node knows of.
    pub leader_id: Option<u64>,
    /// That primary's API URL.
    pub leader_api: Option<String>,
    /// True on the primary while it holds its lease (writes are served).
    pub writable: bool,
    /// On the primary holding its lease: milliseconds the lease still runs (as of
    /// the node's last published status, at most one tick old); `null` otherwise.
    #[serde(default)]
    pub lease_remaining_ms: Option<u64>,
    /// The highest index known committed.
    pub commit_index: u64,
    /// The highest index applied to the store.
    pub applied_index: u64,
    /// The last index in the log.
    pub last_index: u64,
    /// Entries behind the primary (0 on the primary).
    pub lag: u64,
    /// async, sync or sync-apply.
    pub commit_mode: String,
    /// The primary commits without the standby (degraded sync).
    pub degraded: bool,
    /// Automatic failover is paused on this node.
    pub failover_paused: bool,
    /// The engine runs (false after a storage failure or during shutdown).
    pub running: bool,
    /// Every other member as this node sees it.
    pub peers: Vec<PeerJson>,
}

/// One peer in [`StatusJson`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerJson {
    /// Its id.
    pub id: u64,
    /// Its peer address.
    pub address: String,
    /// Its API URL.
    pub api: Option<String>,
    /// `data` or `witness`.
    pub kind: String,
    /// It answered within the failover timeout.
    pub healthy: bool,
    /// Milliseconds since it last answered.
    pub last_contact_ms: Option<u64>,
    /// On the primary: the highest index it durably holds.
    pub match_index: Option<u64>,
}

/// A successful write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteJson {
    /// Its log index.
    pub index: u64,
    /// The term it was committed in (its fencing token).
    pub term: u64,
}

/// One item of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemJson {
    /// The key (UTF-8 as text, else lossy; `key_base64` then holds the bytes).
    pub key: String,
    /// The key's bytes when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    /// The value when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value's bytes when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// The index of its last write.
    pub mod_index: u64,
}

/// `GET /v1/kv?prefix=...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListJson {
    /// The items, in key order.
    pub items: Vec<ItemJson>,
    /// More keys with the prefix follow.
    pub more: bool,
    /// Pass as `start_after` for the next page.
    pub next_start_after: Option<String>,
}
