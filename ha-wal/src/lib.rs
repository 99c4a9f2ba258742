//! `ha-wal`: the durable write-ahead log of the HA replication system.
//!
//! [`Wal`] implements [`ha_core::log_store::LogStore`] over a data directory:
//!
//! - **Segmented record files.** Each record carries its length, CRC-32s of its
//!   header and body, its `(term, index)` and the postcard-encoded
//!   [`WalEntry`](ha_core::types::WalEntry); each segment starts with a header naming
//!   a magic and the format version. Segments roll at [`WalConfig::segment_size`].
//!   The formats are described in [`mod@format`].
//! - **Group commit.** A dedicated writer thread takes every queued operation,
//!   writes all queued appends with one write and one `fdatasync`, then tells each
//!   appender its entries are durable. [`Wal::metrics`] counts entries per fsync.
//! - **Atomic small files.** The hard state, the snapshot pointer and the log
//!   metadata are replaced by writing a temporary file, fsyncing it, renaming it
//!   over the old one and fsyncing the directory.
//! - **Streamed snapshots.** A snapshot is a data file of its own (`snap-<gen>.snap`)
//!   written through a `SnapshotWriter` (fsynced, then renamed into place) and
//!   read back as a CRC-checked stream or in chunks for a peer; the pointer names
//!   the log's snapshot and the one kept before it. No snapshot is ever held in
//!   memory whole.
//! - **Recovery.** [`Wal::open`] verifies every record. A torn record at the very
//!   tail of the last segment (a write that was never acknowledged) is truncated;
//!   any other damage refuses to open with an error naming the file and byte offset.
//! - **A lock file** (`LOCK`): a second open of the same directory fails.
//! - **Retention.** [`Retention`] (in [`WalConfig::retention`]) says how far
//!   `purge_prefix` may go while keeping entries for a lagging standby, with a hard
//!   cap; the driver asks through `LogStore::purge_point`.
//! - **Streaming.** [`WalStreamer`] reads catch-up batches for a lagging standby
//!   (bounded by entries and bytes, with the batch's `prev` position) and entry
//!   ranges without holding up the writer; the log's `read` and `read_batch` use it.

mod config;
pub mod format;
mod fsutil;
mod lock;
mod metrics;
mod recovery;
mod retention;
mod snapfiles;
mod state;
mod streamer;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod testutil;
mod wal;
mod writer;

pub use config::WalConfig;
pub use lock::LOCK_FILE;
pub use metrics::{FsyncHistograms, WalMetrics};
pub use retention::{RetainedLog, Retention};
pub use streamer::WalStreamer;
pub use wal::{Wal, WalGauges};
