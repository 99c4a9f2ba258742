//! [`WalConfig`]: how a [`Wal`](crate::Wal) lays out and syncs its files.

use std::time::Duration;

use crate::retention::Retention;

/// Settings of a [`Wal`](crate::Wal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalConfig {
    /// A segment file is closed and a new one started once appending the next record
    /// would take it past this many bytes (a single larger record gets a segment of
    /// its own). Default 64 MiB.
    pub segment_size: u64,
    /// Whether to fsync. `true` (the default) makes every acknowledged operation
    /// durable. `false` skips every `fdatasync`/`fsync`: **for benchmarks and tests
    /// only**, since an acknowledged append can then be lost by a machine crash.
    pub sync: bool,
    /// The writer thread stops taking queued appends into one group once it holds
    /// this many bytes. Default 8 MiB.
    pub max_group_bytes: usize,
    /// Zeros are written this many bytes ahead of the end of the records in the
    /// active segment (in chunks, with the group write that needs them), so that
    /// most group commits overwrite allocated blocks of unchanged file size and their
    /// `fdatasync` has no file-size change to commit (on ext4 this roughly halves its
    /// cost). Zero disables it; so does `sync: false`, where it would buy nothing.
    /// Default 4 MiB. A zero tail is where the records end; recovery reads it as such.
    pub preallocate: u64,
    /// How long the writer may wait for more appends before writing a group, when
    /// fewer appends are queued than the previous group had (the appenders it just
    /// acknowledged are likely to be back within microseconds). Only with `sync`;
    /// zero disables the wait. Default 100 µs, well under one fsync.
    pub group_wait: Duration,
    /// How much log to keep behind the snapshot for a lagging standby (served from
    /// the log instead of a full snapshot), with a hard cap. Consulted through
    /// [`LogStore::purge_point`](ha_core::log_store::LogStore::purge_point).
    pub retention: Retention,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size: 64 << 20,
            sync: true,
            max_group_bytes: 8 << 20,
            preallocate: 4 << 20,
            group_wait: Duration::from_micros(100),
            retention: Retention::default(),
        }
    }
}

impl WalConfig {
    /// The default settings with another segment size.
    pub fn with_segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    /// These settings with another retention policy.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The default settings with fsync switched on or off (off is for benchmarks and
    /// tests only; see [`WalConfig::sync`]).
    pub fn with_sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }
}
