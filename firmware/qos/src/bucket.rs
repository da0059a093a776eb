//! Token buckets refilled from the monotonic clock.
//!
//! A bucket holds up to `burst` tokens and gains `per_sec` tokens per second, computed from
//! the nanoseconds that passed (no time slices: a limit of 10 IOPS is 10 IOPS, not "1000 or
//! nothing"). Levels are kept in units of 10⁻⁹ token, so `elapsed_ns × per_sec` is exact
//! integer arithmetic and nothing is lost to rounding however often the bucket is looked at.
//!
//! A request of cost `c` may start when the bucket holds at least `min(c, burst)` tokens; it
//! is then charged its **full** cost, and the level may go below zero (a debt the refill pays
//! back before anything else starts). So one large I/O never lets a stream exceed its limit
//! over time, and a request larger than the burst still gets through instead of waiting
//! forever.

/// A limit: `per_sec` tokens per second, at most `burst` tokens saved up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained rate, tokens per second (operations or bytes). At least 1.
    pub per_sec: u64,
    /// Largest number of tokens saved while idle (the burst allowance). At least 1.
    pub burst: u64,
}

impl Rate {
    /// A rate with a burst of `per_sec / 10` (100 ms worth), at least 1.
    pub const fn new(per_sec: u64) -> Self {
        let b = per_sec / 10;
        Self {
            per_sec,
            burst: if b == 0 { 1 } else { b },
        }
    }

    /// The same rate with another burst allowance.
    pub const fn with_burst(self, burst: u64) -> Self {
        Self {
            per_sec: self.per_sec,
            burst,
        }
    }

    /// Whether the rate can be enforced (both fields at least 1).
    pub const fn is_valid(&self) -> bool {
        self.per_sec >= 1 && self.burst >= 1
    }
}

const SCALE: i128 = 1_000_000_000;

/// One token bucket. Starts full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    rate: Rate,
    /// Tokens × 10⁹; may be negative (debt).
    level: i128,
    /// When `level` was last brought up to date (ns).
    last_ns: u64,
}

impl Bucket {
    /// A full bucket for `rate` at time `now_ns`. A rate with a zero field is raised to 1.
    pub fn new(rate: Rate, now_ns: u64) -> Self {
        let rate = Rate {
            per_sec: rate.per_sec.max(1),
            burst: rate.burst.max(1),
        };
        Self {
            rate,
            level: rate.burst as i128 * SCALE,
            last_ns: now_ns,
        }
    }

    /// The bucket's rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn cap(&self) -> i128 {
        self.rate.burst as i128 * SCALE
    }

    fn need(&self, cost: u64) -> i128 {
        cost.min(self.rate.burst) as i128 * SCALE
    }

    /// Brings the level up to `now_ns` (time never runs backwards here: an earlier `now_ns`
    /// adds nothing).
    pub fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        if dt == 0 {
            return;
        }
        self.last_ns = now_ns;
        let gained = dt as i128 * self.rate.per_sec as i128;
        self.level = (self.level + gained).min(self.cap());
    }

    /// Whether a request of `cost` may start at `now_ns`.
    pub fn ready(&mut self, now_ns: u64, cost: u64) -> bool {
        self.refill(now_ns);
        self.level >= self.need(cost)
    }

    /// Nanoseconds from the last refill until a request of `cost` may start (0: now).
    pub fn wait_ns(&self, cost: u64) -> u64 {
        let missing = self.need(cost) - self.level;
        if missing <= 0 {
            return 0;
        }
        let per = self.rate.per_sec as i128;
        u64::try_from((missing + per - 1) / per).unwrap_or(u64::MAX)
    }

    /// Charges a request's full cost (the level may go negative).
    pub fn charge(&mut self, cost: u64) {
        self.level -= cost as i128 * SCALE;
    }

    /// Tokens available now (rounded down; negative while in debt).
    pub fn tokens(&self) -> i64 {
        i64::try_from(self.level / SCALE).unwrap_or(if self.level < 0 {
            i64::MIN
        } else {
            i64::MAX
        })
    }

    /// Changes the rate live: the level is brought up to date under the old rate, then
    /// clamped to the new burst (a debt is kept).
    pub fn set_rate(&mut self, rate: Rate, now_ns: u64) {
        self.refill(now_ns);
        self.rate = Rate {
            per_sec: rate.per_sec.max(1),
            burst: rate.burst.max(1),
        };
        self.level = self.level.min(self.cap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_and_refills_exactly() {
        let mut b = Bucket::new(Rate::new(100).with_burst(5), 0);
        for _ in 0..5 {
            assert!(b.ready(0, 1));
            b.charge(1);
        }
        assert!(!b.ready(0, 1));
        // 100 per second: one token every 10 ms.
        assert_eq!(b.wait_ns(1), 10_000_000);
        assert!(!b.ready(9_999_999, 1));
        assert!(b.ready(10_000_000, 1));
        b.charge(1);
        // Refilled in many tiny steps, nothing is lost to rounding.
        let mut t = 10_000_000;
        for _ in 0..10_000 {
            t += 1_000;
            b.refill(t);
        }
        assert!(b.ready(t, 1));
        assert_eq!(b.tokens(), 1);
    }

    #[test]
    fn large_requests_go_into_debt() {
        // 1 MB/s with 64 KiB of burst: a 1 MiB write starts (the bucket is full) and the next
        // request waits until the whole MiB is paid for.
        let mut b = Bucket::new(Rate::new(1_000_000).with_burst(65_536), 0);
        assert!(b.ready(0, 1 << 20));
        b.charge(1 << 20);
        assert!(b.tokens() < 0);
        let wait = b.wait_ns(4096);
        // (1 MiB - 64 KiB + 4 KiB) at 1 MB/s.
        assert_eq!(wait, ((1u64 << 20) - 65_536 + 4096) * 1_000);
        assert!(!b.ready(wait - 1, 4096));
        assert!(b.ready(wait, 4096));
    }

    #[test]
    fn slow_limits_work() {
        // 3 operations per second, no burst beyond one; the caller looks again exactly when
        // `wait_ns` says.
        let mut b = Bucket::new(Rate::new(3).with_burst(1), 0);
        let mut started = 0;
        let mut t = 0;
        // (A microsecond of slack: waits are rounded up to whole nanoseconds.)
        while t <= 10_000_001_000 {
            if b.ready(t, 1) {
                b.charge(1);
                started += 1;
            }
            t += b.wait_ns(1).max(1);
        }
        // One at t=0 from the full bucket, then 3 per second for 10 s.
        assert_eq!(started, 31);
        // Looked at only every 1 ms, a full bucket overflows in between: never more.
        let mut b = Bucket::new(Rate::new(3).with_burst(1), 0);
        let mut started = 0;
        let mut t = 0;
        while t <= 10_000_000_000 {
            if b.ready(t, 1) {
                b.charge(1);
                started += 1;
            }
            t += 1_000_000;
        }
        assert!((30..=31).contains(&started), "{started}");
    }

    #[test]
    fn live_rate_change_clamps_to_new_burst() {
        let mut b = Bucket::new(Rate::new(1000).with_burst(1000), 0);
        b.set_rate(Rate::new(10).with_burst(2), 0);
        assert_eq!(b.tokens(), 2);
        b.charge(2);
        assert!(!b.ready(0, 1));
        assert!(b.ready(100_000_000, 1));
    }
}
