//! [`WalMetrics`]: counters of the group-commit writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ha_core::histogram::{Histogram, HistogramReading};

/// The writer's counters, shared with the [`Wal`](crate::Wal) handle.
#[derive(Debug)]
pub(crate) struct Counters {
    appends: AtomicU64,
    fsyncs: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    fsync_seconds: Histogram,
    entries_per_fsync: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            fsync_seconds: Histogram::durations(),
            entries_per_fsync: Histogram::counts(),
        }
    }
}

/// Histograms of the group-commit writer's fsyncs.
#[derive(Clone, Debug, PartialEq)]
pub struct FsyncHistograms {
    /// How long each `fdatasync` of a group commit took, in seconds.
    pub duration: HistogramReading,
    /// Entries made durable by each.
    pub entries: HistogramReading,
}

impl Counters {
    /// Records one `fdatasync` of a group of `entries`.
    pub(crate) fn fsynced(&self, took: Duration, entries: u64) {
        self.fsync_seconds.record_duration(took);
        self.entries_per_fsync.record(entries as f64);
    }

    pub(crate) fn histograms(&self) -> FsyncHistograms {
        FsyncHistograms {
            duration: self.fsync_seconds.read(),
            entries: self.entries_per_fsync.read(),
        }
    }

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
