//! The key-value service's commands, queries and their answers, as they travel
//! through the replicated log (postcard; bytes as bytes).
//!
//! A command that does not decode is an output ([`KvOutput::Invalid`]), never a
//! failure: every node applies the same log to the same state.

use serde::{Deserialize, Serialize};

/// The longest key the store takes (the API refuses longer ones with `414`).
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value the store takes (the API refuses larger ones with `413`).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The most items one listing returns.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// A write, as appended to the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The new value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Compare-and-set: the key's current `mod_index` must be this (0: the
        /// key must not exist).
        if_mod_index: Option<u64>,
    },
    /// Removes `key` (removing an absent key is not an error).
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Compare-and-set, as for [`KvCommand::Put`].
        if_mod_index: Option<u64>,
    },
}

impl KvCommand {
    /// The command as log bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing owned bytes and integers into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes log bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The key it writes.
    pub fn key(&self) -> &[u8] {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key, .. } => key,
        }
    }

    /// Its compare-and-set condition.
    pub fn if_mod_index(&self) -> Option<u64> {
        match self {
            KvCommand::Put { if_mod_index, .. } | KvCommand::Delete { if_mod_index, .. } => {
                *if_mod_index
            }
        }
    }
}

/// What applying a [`KvCommand`] gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOutput {
    /// Applied; `existed` says whether the key had a value before.
    Done {
        /// The key had a value before this write.
        existed: bool,
    },
    /// The compare-and-set condition did not hold; nothing changed.
    Mismatch {
        /// The key's current `mod_index` (0: absent).
        current: u64,
    },
    /// The entry was not a key-value command; nothing changed.
    Invalid(String),
}

impl KvOutput {
    /// The output as bytes for the client.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes an output.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvQuery {
    /// One key.
    Get {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Keys with a prefix, in key order, after `start_after`, at most `limit`.
    List {
        /// Only keys starting with this.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        /// Only keys after this one (pagination).
        start_after: Option<serde_bytes::ByteBuf>,
        /// At most this many (capped at [`MAX_LIST_LIMIT`]).
        limit: u32,
    },
}

impl KvQuery {
    /// The query as bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a query.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A key with its value and the index of its last write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Its value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The log index of its last write.
    pub mod_index: u64,
}

/// The answer to a [`KvQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvAnswer {
    /// For [`KvQuery::Get`].
    Value(Option<Item>),
    /// For [`KvQuery::List`]: the items, and whether more follow.
    List {
        /// The items, in key order.
        items: Vec<Item>,
        /// More keys with the prefix follow the last item.
        more: bool,
    },
    /// The query did not decode, or the store failed to read.
    Invalid(String),
}

impl KvAnswer {
    /// The answer as bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes an answer.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_queries_and_answers_round_trip() {
        let c = KvCommand::Put {
            key: b"k".to_vec(),
            value: vec![0, 255, 7],
            if_mod_index: Some(0),
        };
        assert_eq!(KvCommand::decode(&c.encode()), Ok(c));
        let q = KvQuery::List {
            prefix: b"p".to_vec(),
            start_after: Some(serde_bytes::ByteBuf::from(b"pa".to_vec())),
            limit: 3,
        };
        assert_eq!(KvQuery::decode(&q.encode()), Ok(q));
        let a = KvAnswer::Value(Some(Item {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            mod_index: 9,
        }));
        assert_eq!(KvAnswer::decode(&a.encode()), Ok(a));
    }

    #[test]
    fn garbage_does_not_decode_as_a_command() {
        assert!(KvCommand::decode(&[200, 1, 2]).is_err());
    }
}
