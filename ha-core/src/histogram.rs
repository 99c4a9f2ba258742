//! [`Histogram`]: a fixed-bucket histogram updated with atomics, so any thread
//! records into it without a lock and any handle reads it, for metrics that an
//! exporter (ha-node's `/metrics`) publishes as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds for durations, in seconds: 50 µs to 10 s.
pub const DURATION_BOUNDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Bucket bounds for counts (entries per fsync and the like): 1 to 4096.
pub const COUNT_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A histogram over fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound, then one for the values above the last.
    buckets: Vec<AtomicU64>,
    /// The sum of the values, as `f64` bits.
    sum_bits: AtomicU64,
}

/// A reading of a [`Histogram`].
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramReading {
    /// The buckets' upper bounds (the last bucket, above them, is `+Inf`).
    pub bounds: &'static [f64],
    /// Values per bucket (not cumulative); one more than `bounds`.
    pub buckets: Vec<u64>,
    /// The sum of every value recorded.
    pub sum: f64,
}

impl HistogramReading {
    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// `(upper bound, cumulative count)` per bucket, ending with `(+Inf, count)`:
    /// the Prometheus shape.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (k, n) in self.buckets.iter().enumerate() {
            total += n;
            out.push((self.bounds.get(k).copied().unwrap_or(f64::INFINITY), total));
        }
        out
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// A histogram of durations ([`DURATION_BOUNDS`]).
    pub fn durations() -> Self {
        Histogram::new(DURATION_BOUNDS)
    }

    /// A histogram of counts ([`COUNT_BOUNDS`]).
    pub fn counts() -> Self {
        Histogram::new(COUNT_BOUNDS)
    }

    /// Records one value.
    pub fn record(&self, value: f64) {
        let k = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[k].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// Records a duration, in seconds.
    pub fn record_duration(&self, d: Duration) {
        self.record(d.as_secs_f64());
    }

    /// The counts so far.
    pub fn read(&self) -> HistogramReading {
        HistogramReading {
            bounds: self.bounds,
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_bucket_of_their_bound_and_sum_up() {
        let h = Histogram::new(&[1.0, 10.0]);
        h.record(0.5);
        h.record(1.0);
        h.record(5.0);
        h.record(100.0);
        let r = h.read();
        assert_eq!(r.buckets, vec![2, 1, 1]);
        assert_eq!(r.count(), 4);
        assert!((r.sum - 106.5).abs() < 1e-9);
        assert_eq!(
            r.cumulative(),
            vec![(1.0, 2), (10.0, 3), (f64::INFINITY, 4)]
        );
    }

    #[test]
    fn durations_are_recorded_in_seconds() {
        let h = Histogram::durations();
        h.record_duration(Duration::from_millis(3));
        let r = h.read();
        assert_eq!(r.count(), 1);
        // 3 ms falls in the 5 ms bucket.
        let k = DURATION_BOUNDS
            .iter()
            .position(|b| *b == 0.005)
            .expect("a 5 ms bound");
        assert_eq!(r.buckets[k], 1);
    }
}
