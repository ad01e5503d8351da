//! Latency samples and their percentiles.

use std::time::Duration;

/// A set of latency samples (one per operation, or one mean per batch of
/// operations when a single operation is too short to time on its own).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    values: Vec<Duration>,
}

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, value: Duration) {
        self.values.push(value);
    }

    /// Adds the mean of a batch of `ops` operations that took `elapsed` in
    /// total (`ops` of zero counts as one).
    pub fn push_batch(&mut self, elapsed: Duration, ops: u32) {
        self.values.push(elapsed / ops.max(1));
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `p`-th percentile (0–100, nearest rank), or `None` without
    /// samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        let mut sorted = self.values.clone();
        sorted.sort_unstable();
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        let index = rank.saturating_sub(1).min(sorted.len() - 1);
        Some(sorted[index])
    }

    /// The median.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(50.0)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(99.0)
    }

    /// The largest sample.
    pub fn max(&self) -> Option<Duration> {
        self.values.iter().max().copied()
    }

    /// The smallest sample.
    pub fn min(&self) -> Option<Duration> {
        self.values.iter().min().copied()
    }

    /// The arithmetic mean.
    pub fn mean(&self) -> Option<Duration> {
        if self.values.is_empty() {
            return None;
        }
        let total: Duration = self.values.iter().sum();
        Some(total / self.values.len() as u32)
    }
}

/// `ours / raw`, or `None` when `raw` is zero.
pub fn ratio(ours: Duration, raw: Duration) -> Option<f64> {
    if raw.is_zero() {
        None
    } else {
        Some(ours.as_secs_f64() / raw.as_secs_f64())
    }
}

/// A duration with three significant digits and a fitting unit: `850 ns`,
/// `12.3 µs`, `1.25 ms`, `2.50 s`.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (value, unit) = if ns < 1_000.0 {
        (ns, "ns")
    } else if ns < 1_000_000.0 {
        (ns / 1_000.0, "µs")
    } else if ns < 1_000_000_000.0 {
        (ns / 1_000_000.0, "ms")
    } else {
        (ns / 1_000_000_000.0, "s")
    };
    if value >= 100.0 {
        format!("{value:.0} {unit}")
    } else if value >= 10.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        assert_eq!(s.p50(), None);
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert_eq!(s.p50(), Some(Duration::from_millis(50)));
        assert_eq!(s.p99(), Some(Duration::from_millis(99)));
        assert_eq!(s.percentile(100.0), Some(Duration::from_millis(100)));
        assert_eq!(s.percentile(0.0), Some(Duration::from_millis(1)));
        assert_eq!(s.max(), Some(Duration::from_millis(100)));
        assert_eq!(s.min(), Some(Duration::from_millis(1)));
        assert_eq!(s.mean(), Some(Duration::from_micros(50_500)));
    }

    #[test]
    fn batches_and_ratios() {
        let mut s = Samples::default();
        s.push_batch(Duration::from_micros(10), 1000);
        s.push_batch(Duration::from_micros(10), 0);
        assert_eq!(s.min(), Some(Duration::from_nanos(10)));
        assert_eq!(s.max(), Some(Duration::from_micros(10)));
        assert_eq!(ratio(Duration::from_millis(3), Duration::ZERO), None);
        let r = ratio(Duration::from_millis(3), Duration::from_millis(2)).unwrap();
        assert!((r - 1.5).abs() < 1e-9);
    }

    #[test]
    fn durations_print_with_three_digits() {
        assert_eq!(fmt_duration(Duration::from_nanos(850)), "850 ns");
        assert_eq!(fmt_duration(Duration::from_nanos(12_345)), "12.3 µs");
        assert_eq!(fmt_duration(Duration::from_micros(1_250)), "1.25 ms");
        assert_eq!(fmt_duration(Duration::from_millis(2_500)), "2.50 s");
    }
}
