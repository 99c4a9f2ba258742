//! [`WalMetrics`]: counters of the group-commit writer.

use std::sync::atomic::{AtomicU64, Ordering};

/// The writer's counters, shared with the [`Wal`](crate::Wal) handle.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    appends: AtomicU64,
    fsyncs: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    /// Records one group commit.
    pub(crate) fn group(&self, appends: u64, entries: u64, bytes: u64) {
        self.appends.fetch_add(appends, Ordering::Relaxed);
        self.entries.fetch_add(entries, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if bytes > 0 {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> WalMetrics {
        WalMetrics {
            appends: self.appends.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// A reading of the append counters since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalMetrics {
    /// `append` calls that completed (durably).
    pub appends: u64,
    /// Group commits: each is one write and, with [`WalConfig::sync`](crate::WalConfig::sync),
    /// one `fdatasync` covering every append in the group.
    pub fsyncs: u64,
    /// Entries made durable.
    pub entries: u64,
    /// Record bytes written (headers included).
    pub bytes: u64,
}

impl WalMetrics {
    /// Entries per group commit (per fsync): how well group commit works.
    pub fn entries_per_fsync(&self) -> f64 {
        if self.fsyncs == 0 {
            0.0
        } else {
            self.entries as f64 / self.fsyncs as f64
        }
    }

    /// The counts between an `earlier` reading and this one.
    pub fn since(&self, earlier: &WalMetrics) -> WalMetrics {
        WalMetrics {
            appends: self.appends.saturating_sub(earlier.appends),
            fsyncs: self.fsyncs.saturating_sub(earlier.fsyncs),
            entries: self.entries.saturating_sub(earlier.entries),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}
