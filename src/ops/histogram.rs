//! A Prometheus histogram with fixed latency buckets, for the ack and Kafka
//! delivery latencies: plain atomics, like the rest of the metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histograms' buckets, in seconds: from a
/// Kafka confirmation on a LAN to an fsync on a slow SD card.
const LATENCY_BOUNDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram with fixed buckets: one relaxed add per bucket,
/// sum and count per observation.
#[derive(Default)]
pub struct Histogram {
    /// Per bucket, not cumulative (the last: above every bound).
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// `n` observations of `d` (a turn's acks share one latency).
    pub fn observe(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(n, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64 * n, Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Sum (seconds), count, and per bucket its upper bound and count (not
    /// cumulative; the last bound is `f64::MAX`, which encoders print as
    /// `+Inf`).
    pub(crate) fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::MAX),
                    b.load(Relaxed),
                )
            })
            .collect();
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        (sum, self.count.load(Relaxed), buckets)
    }
}
