//! The receiving side of a chunked snapshot transfer: which chunk is next.
//! Chunks are taken in order (their bytes go to the log store with
//! [`super::Action::StageSnapshot`], never into the engine's memory) and the
//! snapshot is installed only once its last chunk arrived (protocol.md,
//! "Fencing, rejoin, catch-up").

use crate::message::InstallSnapshot;
use crate::types::Position;

/// A snapshot being received: how much of it was staged, in order.
#[derive(Debug)]
pub(super) struct Staging {
    at: Position,
    size: u64,
    have: u64,
}

/// What became of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Staged {
    /// The chunk follows what was staged: stage it. `done`: it is the last.
    Take {
        /// The last chunk: the snapshot is complete once it is written.
        done: bool,
    },
    /// Not the chunk expected (nothing to stage): the sender should go on
    /// from this offset.
    Wants(u64),
    /// The chunk contradicts itself (its end past the announced size, or `done`
    /// not at the end); nothing was staged.
    Invalid(&'static str),
}

impl Staging {
    /// Takes one chunk into `staging`: a chunk of another snapshot (or of
    /// another size) restarts the staging from its first chunk; a chunk that
    /// does not follow what is staged (a duplicate, or one after a lost one) is
    /// answered with where the staging stands.
    pub(super) fn take(staging: &mut Option<Staging>, chunk: &InstallSnapshot) -> Staged {
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
            have: 0,
        });
        if chunk.offset != s.have {
            return Staged::Wants(s.have);
        }
        s.have = end;
        if chunk.done {
            *staging = None;
        }
        Staged::Take { done: chunk.done }
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

    const TAKE: Staged = Staged::Take { done: false };
    const LAST: Staged = Staged::Take { done: true };

    fn take(st: &mut Option<Staging>, c: InstallSnapshot) -> Staged {
        Staging::take(st, &c)
    }

    #[test]
    fn chunks_in_order_are_taken_up_to_the_last() {
        let mut st = None;
        assert_eq!(take(&mut st, chunk(9, 6, 0, b"ab")), TAKE);
        assert_eq!(take(&mut st, chunk(9, 6, 2, b"cd")), TAKE);
        assert_eq!(take(&mut st, chunk(9, 6, 4, b"ef")), LAST);
        assert!(st.is_none(), "a completed staging is over");
    }

    #[test]
    fn duplicated_lost_and_reordered_chunks_are_answered_with_the_staged_offset() {
        let mut st = None;
        // A later chunk before the first: start from the beginning.
        assert_eq!(take(&mut st, chunk(9, 6, 2, b"cd")), Staged::Wants(0));
        assert_eq!(take(&mut st, chunk(9, 6, 0, b"ab")), TAKE);
        // A duplicate of the first: nothing staged twice.
        assert_eq!(take(&mut st, chunk(9, 6, 0, b"ab")), Staged::Wants(2));
        // One after a lost chunk: go on from what is staged.
        assert_eq!(take(&mut st, chunk(9, 6, 4, b"ef")), Staged::Wants(2));
        assert_eq!(take(&mut st, chunk(9, 6, 2, b"cd")), TAKE);
        assert_eq!(take(&mut st, chunk(9, 6, 4, b"ef")), LAST);
    }

    #[test]
    fn a_chunk_of_another_snapshot_restarts_the_staging() {
        let mut st = None;
        assert_eq!(take(&mut st, chunk(9, 6, 0, b"ab")), TAKE);
        assert_eq!(take(&mut st, chunk(12, 4, 2, b"zz")), Staged::Wants(0));
        assert_eq!(take(&mut st, chunk(12, 4, 0, b"wx")), TAKE);
        assert_eq!(take(&mut st, chunk(12, 4, 2, b"yz")), LAST);
    }

    #[test]
    fn a_chunk_that_contradicts_itself_is_refused() {
        let mut st = None;
        let mut past_end = chunk(9, 3, 2, b"cd");
        past_end.done = true;
        assert!(matches!(take(&mut st, past_end), Staged::Invalid(_)));
        let mut early_done = chunk(9, 6, 0, b"ab");
        early_done.done = true;
        assert!(matches!(take(&mut st, early_done), Staged::Invalid(_)));
        let mut overflow = chunk(9, 6, u64::MAX, b"ab");
        overflow.done = false;
        assert!(matches!(take(&mut st, overflow), Staged::Invalid(_)));
        assert!(st.is_none(), "nothing staged");
        // An empty snapshot is one empty chunk.
        assert_eq!(take(&mut st, chunk(9, 0, 0, b"")), LAST);
    }
}
