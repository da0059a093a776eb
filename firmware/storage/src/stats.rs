//! Per-namespace I/O statistics. Time is always passed in (nanoseconds); nothing here reads a
//! clock or allocates.

/// Kind of operation for statistics. The split follows the SMART / Health log (NVMe base 2.0
/// §5.16.1.3): host read commands are Read and Compare, host write commands are Write; Data
/// Units Read count the blocks of Read, Compare and Verify, Data Units Written those of Write
/// only (Write Zeroes "shall not impact" it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read and Compare.
    Read,
    /// Write.
    Write,
    /// Verify: its blocks count as data read, the command is not a host read command.
    Verify,
    /// Everything else (Flush, Write Zeroes, Dataset Management, Copy).
    Other,
}

/// A latency histogram with log2 buckets: bucket `i` counts samples `v` with
/// `2^i <= v < 2^(i+1)` (bucket 0 also holds 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u64; 64],
    count: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; 64],
            count: 0,
            max: 0,
        }
    }
}

impl LatencyHistogram {
    /// Records one sample in nanoseconds.
    pub fn record(&mut self, ns: u64) {
        let i = (63 - (ns | 1).leading_zeros()) as usize;
        if let Some(b) = self.buckets.get_mut(i) {
            *b = b.saturating_add(1);
        }
        self.count = self.count.saturating_add(1);
        self.max = self.max.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bucket counts.
    pub fn buckets(&self) -> &[u64; 64] {
        &self.buckets
    }

    /// A histogram from its parts (another core's, read back from where it published them).
    pub fn from_parts(buckets: [u64; 64], count: u64, max: u64) -> Self {
        Self {
            buckets,
            count,
            max,
        }
    }

    /// Adds `other`'s samples: the histogram of both sets of samples.
    pub fn add(&mut self, other: &LatencyHistogram) {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *b = b.saturating_add(*o);
        }
        self.count = self.count.saturating_add(other.count);
        self.max = self.max.max(other.max);
    }

    /// Upper bound (inclusive, capped at the maximum sample) of the bucket holding the
    /// `per_million`-th quantile; 0 without samples. `quantile(500_000)` is the median.
    pub fn quantile(&self, per_million: u32) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let p = per_million.min(1_000_000) as u128;
        // Rank of the sample (1-based), rounded up.
        let rank = ((self.count as u128 * p).div_ceil(1_000_000)).max(1);
        let mut seen: u128 = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n as u128;
            if seen >= rank {
                let upper = if i >= 63 {
                    u64::MAX
                } else {
                    (1u64 << (i + 1)) - 1
                };
                return upper.min(self.max);
            }
        }
        self.max
    }

    /// Median.
    pub fn p50(&self) -> u64 {
        self.quantile(500_000)
    }
    /// 99th percentile.
    pub fn p99(&self) -> u64 {
        self.quantile(990_000)
    }
    /// 99.9th percentile.
    pub fn p999(&self) -> u64 {
        self.quantile(999_000)
    }
}

/// Statistics of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsStats {
    /// Completed read commands.
    pub reads: u64,
    /// Completed write commands.
    pub writes: u64,
    /// Completed other commands.
    pub others: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Commands that failed.
    pub errors: u64,
    /// Failures that were media and data integrity errors (unrecovered reads, write faults,
    /// data digest errors): the SMART log's Media and Data Integrity Errors.
    pub media_errors: u64,
    /// Read latency.
    pub read_latency: LatencyHistogram,
    /// Write latency.
    pub write_latency: LatencyHistogram,
    /// Latency of other commands.
    pub other_latency: LatencyHistogram,
}

impl NsStats {
    /// Records a finished command: kind, bytes moved, success, submit and completion times in
    /// nanoseconds. Failed commands count as errors and not as reads/writes.
    pub fn record(&mut self, kind: OpKind, bytes: u64, ok: bool, start_ns: u64, end_ns: u64) {
        if !ok {
            self.errors = self.errors.saturating_add(1);
            return;
        }
        let lat = end_ns.saturating_sub(start_ns);
        match kind {
            OpKind::Read => {
                self.reads = self.reads.saturating_add(1);
                self.read_bytes = self.read_bytes.saturating_add(bytes);
                self.read_latency.record(lat);
            }
            OpKind::Write => {
                self.writes = self.writes.saturating_add(1);
                self.write_bytes = self.write_bytes.saturating_add(bytes);
                self.write_latency.record(lat);
            }
            OpKind::Verify => {
                self.others = self.others.saturating_add(1);
                self.read_bytes = self.read_bytes.saturating_add(bytes);
                self.other_latency.record(lat);
            }
            OpKind::Other => {
                self.others = self.others.saturating_add(1);
                self.other_latency.record(lat);
            }
        }
    }

    /// Records one media and data integrity error (counted on top of [`NsStats::record`]'s
    /// failure, or for a command that failed before it reached the namespace's backend, such
    /// as a data digest error).
    pub fn record_media_error(&mut self) {
        self.media_errors = self.media_errors.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.p50(), 0);
        for _ in 0..990 {
            h.record(1000); // bucket 9: 512..1023
        }
        for _ in 0..9 {
            h.record(100_000); // bucket 16
        }
        h.record(10_000_000); // bucket 23
        assert_eq!(h.count(), 1000);
        assert_eq!(h.p50(), 1023);
        assert_eq!(h.p99(), 1023);
        assert_eq!(h.p999(), 131_071);
        assert_eq!(h.quantile(1_000_000), 10_000_000);
        h.record(0);
        assert_eq!(h.buckets()[0], 1);
        h.record(u64::MAX);
        assert_eq!(h.buckets()[63], 1);
    }

    #[test]
    fn merged_histograms_hold_both_sets_of_samples() {
        let (mut a, mut b, mut both) = (
            LatencyHistogram::default(),
            LatencyHistogram::default(),
            LatencyHistogram::default(),
        );
        for (i, v) in [5u64, 700, 70_000, 9, 1 << 40, 3_000_000]
            .iter()
            .enumerate()
        {
            if i % 2 == 0 {
                a.record(*v)
            } else {
                b.record(*v)
            }
            both.record(*v);
        }
        let back = LatencyHistogram::from_parts(*b.buckets(), b.count(), b.max());
        assert_eq!(back, b);
        a.add(&back);
        assert_eq!(a, both);
        assert_eq!((a.count(), a.max(), a.p50()), (6, 1 << 40, 1023));
    }

    #[test]
    fn ns_stats() {
        let mut s = NsStats::default();
        s.record(OpKind::Read, 4096, true, 100, 1100);
        s.record(OpKind::Write, 512, true, 0, 10);
        s.record(OpKind::Write, 512, false, 0, 10);
        s.record(OpKind::Other, 0, true, 5, 1);
        assert_eq!((s.reads, s.writes, s.others, s.errors), (1, 1, 1, 1));
        assert_eq!((s.read_bytes, s.write_bytes), (4096, 512));
        // Verify: data read, not a read command.
        s.record(OpKind::Verify, 1024, true, 3, 3);
        assert_eq!((s.reads, s.others, s.read_bytes), (1, 2, 5120));
        s.record_media_error();
        assert_eq!((s.errors, s.media_errors), (1, 1));
        assert_eq!(s.read_latency.p50(), 1000);
        assert_eq!(s.other_latency.max(), 0);
    }

    proptest! {
        #[test]
        fn quantile_bounds_true_value(samples in proptest::collection::vec(any::<u64>(), 1..200), q in 1u32..=1_000_000) {
            let mut h = LatencyHistogram::default();
            for &s in &samples { h.record(s); }
            let mut sorted = samples.clone();
            sorted.sort();
            let rank = ((samples.len() as u128 * q as u128).div_ceil(1_000_000)).max(1) as usize;
            let exact = sorted[rank - 1];
            let est = h.quantile(q);
            // The estimate is the top of the exact value's bucket: >= exact, < 2 * exact + 2.
            prop_assert!(est >= exact);
            prop_assert!((est as u128) <= 2 * exact as u128 + 1);
        }
    }
}
