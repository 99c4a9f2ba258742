//! Helpers of the crate's unit tests.

use std::future::Future;
use std::path::Path;

use ha_core::log_store::LogStore;
use ha_core::types::{Command, LogIndex, NodeId, Payload, Position, Term, WalEntry};

use crate::config::WalConfig;
use crate::format::{LogMeta, META_MAGIC};
use crate::fsutil::{encode_payload, write_small_file};
use crate::wal::Wal;
use crate::writer::META_FILE;

pub(crate) fn term(n: u64) -> Term {
    Term {
        number: n,
        node: NodeId(1),
    }
}

pub(crate) fn entry(t: u64, i: u64) -> WalEntry {
    WalEntry::new(
        Position::new(term(t), LogIndex(i)),
        Payload::Command(Command(vec![i as u8; 20])),
    )
}

pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

pub(crate) fn cfg() -> WalConfig {
    WalConfig::default().with_segment_size(200)
}

/// A log with entries 1..=6 in term 1 over several segments, closed.
pub(crate) fn six(dir: &Path) {
    let wal = Wal::open(dir, cfg()).unwrap();
    block_on(wal.append((1..=6).map(|i| entry(1, i)).collect())).unwrap();
    assert!(wal.segment_count() > 2);
}

/// Replaces the log's metadata, as a crash in the middle of an operation
/// leaves it.
pub(crate) fn write_meta(dir: &Path, meta: &LogMeta) {
    write_small_file(
        dir,
        META_FILE,
        META_MAGIC,
        &encode_payload("m", meta).unwrap(),
        true,
    )
    .unwrap();
}
