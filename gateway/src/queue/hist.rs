//! Fixed-bucket histograms that the writer thread fills without locks, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (µs) of the fdatasync latency buckets: from a fast NVMe flush to an SD card's
/// worst stalls.
pub const FSYNC_US_BOUNDS: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
/// Upper bounds of the records-per-group-commit buckets.
pub const BATCH_RECORDS_BOUNDS: &[u64] = &[1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000];

/// Counts per bucket (`bounds.len() + 1`, the last one unbounded) and the sum of observations.
#[derive(Debug)]
pub(crate) struct Buckets {
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Buckets {
    pub(crate) fn new(bounds: &'static [u64]) -> Buckets {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Histogram {
        Histogram {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// A histogram read at one moment: `counts[i]` observations were at most `bounds[i]` (and above
/// the bound before); the last count is everything above the last bound.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Histogram {
    pub bounds: &'static [u64],
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, cumulative count)` per finite bucket, as Prometheus wants them.
    pub fn cumulative(&self) -> Vec<(u64, u64)> {
        let mut acc = 0;
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(&b, &c)| {
                acc += c;
                (b, acc)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_is_not_below_them() {
        let b = Buckets::new(&[10, 100]);
        for v in [0, 10, 11, 100, 101, 5_000] {
            b.observe(v);
        }
        let h = b.snapshot();
        assert_eq!(h.counts, vec![2, 2, 2]);
        assert_eq!(h.sum, 5_222);
        assert_eq!(h.count(), 6);
        assert_eq!(h.cumulative(), vec![(10, 2), (100, 4)]);
    }
}
