//! Limits of one namespace, controller or group: IOPS and bandwidth, for reads and writes
//! separately and combined, each a [`Bucket`] with its own burst.

use crate::bucket::{Bucket, Rate};

/// Direction of a request, for the read/write limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Reads (and Compare, Verify: they read the medium).
    Read,
    /// Writes (and Write Zeroes, Deallocate, Copy: they change the medium).
    Write,
    /// Neither (Flush): counts against the combined IOPS limit only.
    Other,
}

/// What a request costs: one operation and `bytes` of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Direction.
    pub dir: Dir,
    /// Data bytes it moves (0 for Flush, Write Zeroes, Deallocate).
    pub bytes: u64,
}

/// The limits of one tenant object. `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Operations per second, reads and writes together.
    pub iops: Option<Rate>,
    /// Read operations per second.
    pub read_iops: Option<Rate>,
    /// Write operations per second.
    pub write_iops: Option<Rate>,
    /// Bytes per second, reads and writes together.
    pub bps: Option<Rate>,
    /// Read bytes per second.
    pub read_bps: Option<Rate>,
    /// Written bytes per second.
    pub write_bps: Option<Rate>,
}

impl Limits {
    /// No limit at all.
    pub const NONE: Limits = Limits {
        iops: None,
        read_iops: None,
        write_iops: None,
        bps: None,
        read_bps: None,
        write_bps: None,
    };

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rates().iter().any(Option::is_some)
    }

    fn rates(&self) -> [Option<Rate>; 6] {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bps,
            self.read_bps,
            self.write_bps,
        ]
    }
}

/// Which of the six buckets a cost draws from, and how much.
fn draws(cost: Cost) -> [u64; 6] {
    let (r, w) = match cost.dir {
        Dir::Read => (1, 0),
        Dir::Write => (0, 1),
        Dir::Other => (0, 0),
    };
    [1, r, w, cost.bytes, r * cost.bytes, w * cost.bytes]
}

/// Whether bucket `i` applies to `cost` at all (a write is not held back by the read limit).
fn applies(i: usize, cost: Cost) -> bool {
    match i {
        0 => true,
        1 | 4 => cost.dir == Dir::Read,
        2 | 5 => cost.dir == Dir::Write,
        _ => true, // 3: combined bandwidth
    }
}

/// The buckets of one [`Limits`], with counters for reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limiter {
    limits: Limits,
    buckets: [Option<Bucket>; 6],
    limited: bool,
    /// Operations and bytes admitted so far.
    pub admitted_ops: u64,
    /// Bytes admitted so far.
    pub admitted_bytes: u64,
    /// Nanoseconds during which a request was held back by this limiter (summed over the
    /// times it was found blocking; see [`crate::Scheduler`]).
    pub throttled_ns: u64,
}

impl Limiter {
    /// Buckets for `limits`, full at `now_ns`.
    pub fn new(limits: Limits, now_ns: u64) -> Self {
        let mut l = Self {
            limits: Limits::NONE,
            buckets: [None; 6],
            limited: false,
            admitted_ops: 0,
            admitted_bytes: 0,
            throttled_ns: 0,
        };
        l.set(limits, now_ns);
        l
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.limited
    }

    /// Replaces the limits live. Buckets that stay keep their level (clamped to the new
    /// burst), new ones start full, removed ones go.
    pub fn set(&mut self, limits: Limits, now_ns: u64) {
        for (slot, rate) in self.buckets.iter_mut().zip(limits.rates()) {
            *slot = match (slot.take(), rate) {
                (Some(mut b), Some(r)) => {
                    b.set_rate(r, now_ns);
                    Some(b)
                }
                (None, Some(r)) => Some(Bucket::new(r, now_ns)),
                (_, None) => None,
            };
        }
        self.limits = limits;
        self.limited = self.buckets.iter().any(Option::is_some);
    }

    /// 0 when `cost` may start at `now_ns`, else how many nanoseconds until it may (as far
    /// as this limiter is concerned).
    pub fn wait_ns(&mut self, now_ns: u64, cost: Cost) -> u64 {
        let d = draws(cost);
        let mut wait = 0;
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if let Some(b) = b
                && applies(i, cost)
                && !b.ready(now_ns, d[i])
            {
                wait = wait.max(b.wait_ns(d[i]).max(1));
            }
        }
        wait
    }

    /// Charges `cost` to every bucket it draws from.
    pub fn charge(&mut self, cost: Cost) {
        let d = draws(cost);
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if let Some(b) = b
                && applies(i, cost)
            {
                b.charge(d[i]);
            }
        }
        self.admitted_ops += 1;
        self.admitted_bytes += cost.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R4K: Cost = Cost {
        dir: Dir::Read,
        bytes: 4096,
    };
    const W4K: Cost = Cost {
        dir: Dir::Write,
        bytes: 4096,
    };

    #[test]
    fn read_limit_does_not_hold_writes() {
        let mut l = Limiter::new(
            Limits {
                read_iops: Some(Rate::new(10).with_burst(1)),
                ..Limits::NONE
            },
            0,
        );
        assert_eq!(l.wait_ns(0, R4K), 0);
        l.charge(R4K);
        assert!(l.wait_ns(0, R4K) > 0);
        for _ in 0..100 {
            assert_eq!(l.wait_ns(0, W4K), 0);
            l.charge(W4K);
        }
    }

    #[test]
    fn the_slowest_bucket_decides() {
        // 1000 IOPS but 409600 B/s: 100 4 KiB requests per second.
        let mut l = Limiter::new(
            Limits {
                iops: Some(Rate::new(1000).with_burst(1)),
                bps: Some(Rate::new(409_600).with_burst(4096)),
                ..Limits::NONE
            },
            0,
        );
        l.charge(W4K);
        assert_eq!(l.wait_ns(0, W4K), 10_000_000);
    }

    #[test]
    fn unlimited_never_waits() {
        let mut l = Limiter::new(Limits::NONE, 0);
        assert!(!l.is_limited());
        for _ in 0..1000 {
            assert_eq!(l.wait_ns(0, W4K), 0);
            l.charge(W4K);
        }
        assert_eq!(l.admitted_ops, 1000);
    }
}
