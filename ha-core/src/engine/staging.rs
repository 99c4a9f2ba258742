//! The receiving side of a chunked snapshot transfer: chunks are staged in
//! order and the snapshot is handed over only once its last chunk arrived
//! (protocol.md, "Fencing, rejoin, catch-up").

use crate::message::InstallSnapshot;
use crate::types::Position;

/// A snapshot being received: the chunks staged so far, in order.
#[derive(Debug)]
pub(super) struct Staging {
    at: Position,
    size: u64,
    data: Vec<u8>,
}

/// What became of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Staged {
    /// Staged (or not the one expected): the sender should go on from here.
    Wants(u64),
    /// The last chunk: the whole snapshot.
    Complete(Vec<u8>),
    /// The chunk contradicts itself (its end past the announced size, or `done`
    /// not at the end); nothing was staged.
    Invalid(&'static str),
}

impl Staging {
    /// Takes one chunk into `staging`: a chunk of another snapshot (or of
    /// another size) restarts the staging from its first chunk; a chunk that
    /// does not follow what is staged (a duplicate, or one after a lost one) is
    /// answered with where the staging stands.
    pub(super) fn take(staging: &mut Option<Staging>, chunk: InstallSnapshot) -> Staged {
        let len = chunk.data.len() as u64;
        let Some(end) = chunk.offset.checked_add(len).filter(|e| *e <= chunk.size) else {
            return Staged::Invalid("the chunk ends past the snapshot's size");
        };
        if chunk.done != (end == chunk.size) {
            return Staged::Invalid("the chunk's `done` does not match its end");
        }
        let same = staging
            .as_ref()
            .is_some_and(|s| s.at == chunk.last_included && s.size == chunk.size);
        if !same {
            *staging = None;
            if chunk.offset != 0 {
                return Staged::Wants(0);
            }
        }
        let s = staging.get_or_insert_with(|| Staging {
            at: chunk.last_included,
            size: chunk.size,
            data: Vec::new(),
        });
        let have = s.data.len() as u64;
        if chunk.offset != have {
            return Staged::Wants(have);
        }
        s.data.extend_from_slice(&chunk.data);
        if chunk.done {
            let data = staging.take().map(|s| s.data).unwrap_or_default();
            Staged::Complete(data)
        } else {
            Staged::Wants(end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LogIndex, Term};

    fn chunk(at: u64, size: u64, offset: u64, data: &[u8]) -> InstallSnapshot {
        InstallSnapshot {
            last_included: Position::new(Term::ZERO, LogIndex(at)),
            size,
            offset,
            data: data.to_vec(),
            done: offset.wrapping_add(data.len() as u64) == size,
            commit: LogIndex(at),
            leader_last: Position::new(Term::ZERO, LogIndex(at)),
        }
    }

    #[test]
    fn chunks_in_order_give_the_whole_snapshot() {
        let mut st = None;
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 0, b"ab")),
            Staged::Wants(2)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 2, b"cd")),
            Staged::Wants(4)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 4, b"ef")),
            Staged::Complete(b"abcdef".to_vec())
        );
        assert!(st.is_none(), "a completed staging is handed over");
    }

    #[test]
    fn duplicated_lost_and_reordered_chunks_are_answered_with_the_staged_offset() {
        let mut st = None;
        // A later chunk before the first: start from the beginning.
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 2, b"cd")),
            Staged::Wants(0)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 0, b"ab")),
            Staged::Wants(2)
        );
        // A duplicate of the first: nothing staged twice.
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 0, b"ab")),
            Staged::Wants(2)
        );
        // One after a lost chunk: go on from what is staged.
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 4, b"ef")),
            Staged::Wants(2)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 2, b"cd")),
            Staged::Wants(4)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 4, b"ef")),
            Staged::Complete(b"abcdef".to_vec())
        );
    }

    #[test]
    fn a_chunk_of_another_snapshot_restarts_the_staging() {
        let mut st = None;
        assert_eq!(
            Staging::take(&mut st, chunk(9, 6, 0, b"ab")),
            Staged::Wants(2)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(12, 4, 2, b"zz")),
            Staged::Wants(0)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(12, 4, 0, b"wx")),
            Staged::Wants(2)
        );
        assert_eq!(
            Staging::take(&mut st, chunk(12, 4, 2, b"yz")),
            Staged::Complete(b"wxyz".to_vec())
        );
    }

    #[test]
    fn a_chunk_that_contradicts_itself_is_refused() {
        let mut st = None;
        let mut past_end = chunk(9, 3, 2, b"cd");
        past_end.done = true;
        assert!(matches!(
            Staging::take(&mut st, past_end),
            Staged::Invalid(_)
        ));
        let mut early_done = chunk(9, 6, 0, b"ab");
        early_done.done = true;
        assert!(matches!(
            Staging::take(&mut st, early_done),
            Staged::Invalid(_)
        ));
        let mut overflow = chunk(9, 6, u64::MAX, b"ab");
        overflow.done = false;
        assert!(matches!(
            Staging::take(&mut st, overflow),
            Staged::Invalid(_)
        ));
        assert!(st.is_none(), "nothing staged");
        // An empty snapshot is one empty chunk.
        assert_eq!(
            Staging::take(&mut st, chunk(9, 0, 0, b"")),
            Staged::Complete(Vec::new())
        );
    }
}
