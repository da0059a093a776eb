//! Token buckets refilled from the monotonic clock.
//!
//! A bucket holds up to `burst` tokens and gains `per_sec` tokens per second, computed from
//! the nanoseconds that passed (no time slices: a limit of 10 IOPS is 10 IOPS, not "1000 or
//! nothing"). The arithmetic is exact, in 64-bit integers, with no division on the
//! per-command path:
//!
//! - **Units.** A bucket counts in units of `1/k` token, `k = 10⁹ / gcd(per_sec, 10⁹)`. It
//!   then gains exactly `r = per_sec / gcd(per_sec, 10⁹)` units per nanosecond, an integer:
//!   nothing is lost to rounding however often the bucket is looked at. (A limit of 3 IOPS
//!   counts in 10⁻⁹ operation and gains 3 a nanosecond; 100 GB/s counts in bytes and gains
//!   100.)
//! - **No refill step.** The state is one number, the *full time* `tat`: the moment, in
//!   units of scaled time `s(t) = t × r` (`t` in ns since the owner's epoch), at which the
//!   bucket is full again. The deficit below full at `t` is `max(tat, s(t)) - s(t)`; taking
//!   `c` tokens moves `tat` to `max(tat, s(t)) + c × k`. The `max` is the burst cap: time in
//!   which the bucket was full gains nothing. (This is the virtual-scheduling form of the
//!   token bucket, the GCRA of ITU-T I.371 / ATM, with integer units.)
//! - **Epoch.** `t × r` must stay below 2⁶², so the owner ([`crate::Limiter`]) moves its
//!   epoch forward before `t` reaches [`Bucket::span`] ([`Bucket::rebase`]): every 4.6 ms
//!   for the worst rate (10¹² per second less a few, sharing no factor with 10⁹), every 1.5
//!   years at 100 GB/s.
//!
//! A request of cost `c` may start when the bucket holds at least `min(c, burst)` tokens; it
//! is then charged its **full** cost, and the level may go below zero (a debt the refill pays
//! back before anything else starts). So one large I/O never lets a stream exceed its limit
//! over time, and a request larger than the burst still gets through instead of waiting
//! forever. In units: `deficit + c × k ≤ max(cap, c × k)`, `cap = burst × k`.
//!
//! Bounds that keep every sum below 2⁶⁴: `per_sec` is at most [`MAX_RATE`]; the burst at most
//! `2⁶¹ / k` tokens and one request's charge at most `2⁶² / k` tokens (2.3 × 10⁹ and 4.6 ×
//! 10⁹ when the rate shares no factor with 10⁹, 2.3 × 10¹⁸ and 4.6 × 10¹⁸ when it is a
//! multiple of 10⁹; an NVMe command moves far less, MDTS and the Copy limit bound it).

/// Largest rate, tokens per second (10¹²: 1 TB/s). Larger rates are lowered to it.
pub const MAX_RATE: u64 = 1_000_000_000_000;
/// Largest `burst × k` (units).
const MAX_CAP: u64 = 1 << 61;
/// `t × r` stays below this.
const MAX_SCALED: u64 = 1 << 62;
/// Largest deficit (units): `tat` stays below `MAX_SCALED + MAX_DEFICIT` < 2⁶⁴, and a
/// deficit plus one cost below 2⁶⁴.
const MAX_DEFICIT: u64 = MAX_SCALED + MAX_CAP;
const NS_PER_SEC: u64 = 1_000_000_000;

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let r = a % b;
        a = b;
        b = r;
    }
    a
}

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

/// One token bucket (see the module documentation). Its clock is `t`, nanoseconds since an
/// epoch its owner keeps; a new bucket is full at `t` = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// The rate in force (`per_sec` and `burst` within the bounds above).
    rate: Rate,
    /// Units per token (`k`).
    unit: u64,
    /// Units gained per nanosecond (`r`).
    per_ns: u64,
    /// `burst × k`.
    cap: u64,
    /// The largest cost charged, `2⁶² / k` tokens.
    max_cost: u64,
    /// Scaled time at which the bucket is full again (see the module documentation).
    tat: u64,
}

impl Bucket {
    /// A full bucket for `rate` at `t` = 0. A zero field is raised to 1; a rate above
    /// [`MAX_RATE`] is lowered to it, a burst above `2⁶¹ / k` to that.
    pub const fn new(rate: Rate) -> Self {
        let per_sec = if rate.per_sec == 0 {
            1
        } else if rate.per_sec > MAX_RATE {
            MAX_RATE
        } else {
            rate.per_sec
        };
        let g = gcd(per_sec, NS_PER_SEC);
        let unit = NS_PER_SEC / g;
        let max_burst = MAX_CAP / unit;
        let burst = if rate.burst == 0 {
            1
        } else if rate.burst > max_burst {
            max_burst
        } else {
            rate.burst
        };
        Self {
            rate: Rate { per_sec, burst },
            unit,
            per_ns: per_sec / g,
            cap: burst * unit,
            max_cost: MAX_SCALED / unit,
            tat: 0,
        }
    }

    /// The rate in force (after the bounds of [`Bucket::new`]).
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Units per token (`k`).
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Units gained per nanosecond (`r`).
    pub fn per_ns(&self) -> u64 {
        self.per_ns
    }

    /// `t` must stay below this many nanoseconds: [`Bucket::rebase`] before.
    pub fn span(&self) -> u64 {
        MAX_SCALED / self.per_ns
    }

    /// Units below full at `t`, and `s(t)`. `t < span()`.
    #[inline(always)]
    fn deficit(&self, t: u64) -> (u64, u64) {
        let s = t * self.per_ns;
        (self.tat.max(s) - s, s)
    }

    /// `c × k`, at most 2⁶².
    #[inline(always)]
    fn units(&self, cost: u64) -> u64 {
        cost.min(self.max_cost) * self.unit
    }

    /// Whether a request of `cost` may start at `t`.
    #[inline(always)]
    pub fn ready(&self, t: u64, cost: u64) -> bool {
        let (d, _) = self.deficit(t);
        let ck = self.units(cost);
        d + ck <= self.cap.max(ck)
    }

    /// Starts a request of `cost` at `t` if it may ([`Bucket::ready`]), charging its full
    /// cost; returns whether it did.
    #[inline(always)]
    pub fn take(&mut self, t: u64, cost: u64) -> bool {
        let (d, s) = self.deficit(t);
        let ck = self.units(cost);
        if d + ck > self.cap.max(ck) {
            return false;
        }
        self.tat = s + d + ck;
        true
    }

    /// Gives back what a [`Bucket::take`] of `cost` took (an admission undone because another
    /// limit held the request back). The state is then the one the take found.
    #[inline]
    pub fn untake(&mut self, cost: u64) {
        self.tat -= self.units(cost);
    }

    /// Charges a request's full cost at `t` whatever the level (the level may go below
    /// zero). Meant for after [`Bucket::ready`] said yes (then it equals
    /// [`Bucket::take`]); charged again and again without, the deficit stops growing at
    /// 2⁶² + 2⁶¹ units.
    pub fn charge(&mut self, t: u64, cost: u64) {
        let (d, s) = self.deficit(t);
        self.tat = s + (d + self.units(cost)).min(MAX_DEFICIT);
    }

    /// Nanoseconds from `t` until a request of `cost` may start (0: now).
    pub fn wait_ns(&self, t: u64, cost: u64) -> u64 {
        let (d, _) = self.deficit(t);
        let ck = self.units(cost);
        let allowed = self.cap.max(ck) - ck;
        d.saturating_sub(allowed).div_ceil(self.per_ns)
    }

    /// The first `t` at which the bucket is full.
    pub fn full_at(&self) -> u64 {
        self.tat.div_ceil(self.per_ns)
    }

    /// Tokens available at `t` (rounded down; negative while in debt).
    pub fn tokens(&self, t: u64) -> i64 {
        let (d, _) = self.deficit(t);
        (self.cap as i128 - d as i128).div_euclid(self.unit as i128) as i64
    }

    /// Moves the epoch to `t` (any `t`, also beyond [`Bucket::span`]): afterwards `t` is 0.
    pub fn rebase(&mut self, t: u64) {
        self.tat = self.tat.saturating_sub(t.saturating_mul(self.per_ns));
    }

    /// Changes the rate live at `t` = 0 (call [`Bucket::rebase`] first): the level is kept,
    /// converted to the new units (rounded down, so at most one unit of the new rate is
    /// lost), then clamped to the new burst (a debt is kept, up to 2⁶¹ units).
    pub fn set_rate(&mut self, rate: Rate) {
        let (level, old_unit) = (self.cap as i128 - self.tat as i128, self.unit as i128);
        *self = Bucket::new(rate);
        let level = (level * self.unit as i128).div_euclid(old_unit);
        let deficit = (self.cap as i128 - level).clamp(0, MAX_CAP as i128);
        self.tat = deficit as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_and_refills_exactly() {
        let mut b = Bucket::new(Rate::new(100).with_burst(5));
        // gcd(100, 10⁹) = 100: units of 10⁻⁷ token, one unit a nanosecond.
        assert_eq!((b.unit(), b.per_ns()), (10_000_000, 1));
        for _ in 0..5 {
            assert!(b.take(0, 1));
        }
        assert!(!b.take(0, 1));
        // 100 per second: one token every 10 ms.
        assert_eq!(b.wait_ns(0, 1), 10_000_000);
        assert!(!b.ready(9_999_999, 1));
        assert!(b.take(10_000_000, 1));
        // Looked at every microsecond for 10 ms, nothing is lost to rounding: one token.
        let mut t = 10_000_000;
        for _ in 0..10_000 {
            t += 1_000;
            assert_eq!(b.ready(t, 1), t == 20_000_000);
        }
        assert_eq!(b.tokens(t), 1);
    }

    #[test]
    fn large_requests_go_into_debt() {
        // 1 MB/s with 64 KiB of burst: a 1 MiB write starts (the bucket is full) and the next
        // request waits until the whole MiB is paid for.
        let mut b = Bucket::new(Rate::new(1_000_000).with_burst(65_536));
        assert!(b.take(0, 1 << 20));
        assert!(b.tokens(0) < 0);
        let wait = b.wait_ns(0, 4096);
        // (1 MiB - 64 KiB + 4 KiB) at 1 MB/s.
        assert_eq!(wait, ((1u64 << 20) - 65_536 + 4096) * 1_000);
        assert!(!b.take(wait - 1, 4096));
        assert!(b.take(wait, 4096));
    }

    #[test]
    fn slow_limits_work() {
        // 3 operations per second, no burst beyond one; the caller looks again exactly when
        // `wait_ns` says.
        let mut b = Bucket::new(Rate::new(3).with_burst(1));
        let mut started = 0;
        let mut t = 0;
        // (A microsecond of slack: waits are rounded up to whole nanoseconds.)
        while t <= 10_000_001_000 {
            if b.take(t, 1) {
                started += 1;
            }
            t += b.wait_ns(t, 1).max(1);
        }
        // One at t=0 from the full bucket, then 3 per second for 10 s.
        assert_eq!(started, 31);
        // Looked at only every 1 ms, a full bucket overflows in between: never more.
        let mut b = Bucket::new(Rate::new(3).with_burst(1));
        let mut started = 0;
        let mut t = 0;
        while t <= 10_000_000_000 {
            if b.take(t, 1) {
                started += 1;
            }
            t += 1_000_000;
        }
        assert!((30..=31).contains(&started), "{started}");
    }

    #[test]
    fn one_iops() {
        // gcd(1, 10⁹) = 1: units of 10⁻⁹ operation, one a nanosecond.
        let mut b = Bucket::new(Rate::new(1));
        assert_eq!(
            b.rate(),
            Rate {
                per_sec: 1,
                burst: 1
            }
        );
        assert_eq!((b.unit(), b.per_ns()), (1_000_000_000, 1));
        assert!(b.take(0, 1));
        assert!(!b.take(0, 1));
        assert_eq!(b.wait_ns(0, 1), 1_000_000_000);
        assert_eq!(b.wait_ns(999_999_999, 1), 1);
        assert!(!b.take(999_999_999, 1));
        assert!(b.take(1_000_000_000, 1));
        // A 5-operation request (more than the burst) starts on a full bucket and leaves a
        // debt of 4: the next one waits 5 s.
        assert!(b.take(2_000_000_000, 5));
        assert_eq!(b.tokens(2_000_000_000), -4);
        assert_eq!(b.wait_ns(2_000_000_000, 1), 5_000_000_000);
    }

    #[test]
    fn a_hundred_gigabytes_per_second() {
        // 10¹¹ B/s: gcd = 10⁹, units are bytes, 100 a nanosecond; burst 10¹⁰ B (100 ms).
        let mut b = Bucket::new(Rate::new(100_000_000_000));
        assert_eq!(b.rate().burst, 10_000_000_000);
        assert_eq!((b.unit(), b.per_ns()), (1, 100));
        assert!(b.take(0, 10_000_000_000));
        assert!(!b.take(0, 4096));
        // 4096 B at 100 B/ns: ⌈40.96⌉ = 41 ns.
        assert_eq!(b.wait_ns(0, 4096), 41);
        assert!(!b.take(40, 4096), "4000 B after 40 ns");
        assert!(b.take(41, 4096), "4100 B after 41 ns");
        assert_eq!(b.tokens(41), 4);
        // 1 s later it is full again, with no more than the burst.
        assert_eq!(b.tokens(1_000_000_041), 10_000_000_000);
        // The epoch comes every 2⁶² / 100 ns, about 1.46 years.
        assert_eq!(b.span(), (1u64 << 62) / 100);
    }

    #[test]
    fn bursts_saturate() {
        // 1000 IOPS, burst 10: idle for an hour, still exactly 10 at once, then one per ms.
        let mut b = Bucket::new(Rate::new(1000).with_burst(10));
        let t = 3_600_000_000_000;
        assert_eq!(b.tokens(t), 10);
        for _ in 0..10 {
            assert!(b.take(t, 1));
        }
        assert!(!b.take(t, 1));
        assert_eq!(b.wait_ns(t, 1), 1_000_000);
        // A request larger than the burst starts only on a full bucket.
        assert!(!b.ready(t + 9_999_999, 12));
        assert!(b.ready(t + 10_000_000, 12));
    }

    #[test]
    fn bounds_of_units() {
        // A rate sharing no factor with 10⁹ counts in 10⁻⁹ token: its burst is capped at
        // ⌊2⁶¹ / 10⁹⌋ = 2305843009 tokens.
        let b = Bucket::new(Rate::new(999_999_999_989));
        assert_eq!((b.unit(), b.per_ns()), (1_000_000_000, 999_999_999_989));
        assert_eq!(b.rate().burst, 2_305_843_009);
        assert_eq!(b.span(), (1u64 << 62) / 999_999_999_989);
        // Above 10¹² per second the rate is lowered; zero fields are raised to 1.
        assert_eq!(Bucket::new(Rate::new(u64::MAX)).rate().per_sec, MAX_RATE);
        assert_eq!(
            Bucket::new(Rate {
                per_sec: 0,
                burst: 0
            })
            .rate(),
            Rate {
                per_sec: 1,
                burst: 1
            }
        );
        // One request is charged at most 2⁶² / k tokens: at 1 B/s (k = 10⁹),
        // ⌊4 611 686 018 427 387 904 / 10⁹⌋ = 4 611 686 018 B, as many seconds of debt.
        let mut b = Bucket::new(Rate::new(1).with_burst(1));
        assert!(b.take(0, u64::MAX));
        assert_eq!(b.wait_ns(0, 1), 4_611_686_018 * 1_000_000_000);
    }

    #[test]
    fn rebase_keeps_the_level() {
        // 999 999 999 989 B/s (1 unit = 10⁻⁹ B): empty the 10⁶ B burst, then 500 ns later
        // 500 × 999 999 999 989 units = 499 999.999 994 5 B are back.
        let mut b = Bucket::new(Rate::new(999_999_999_989).with_burst(1_000_000));
        assert!(b.take(0, 1_000_000));
        assert_eq!(b.tokens(500), 499_999);
        let before = b;
        b.rebase(500);
        assert_eq!(b.tokens(0), 499_999);
        // Same decisions from the new epoch as from the old: 499 999 B may start now,
        // 500 000 B 1 ns later (5500 units missing, 999 999 999 989 units a ns).
        assert!(b.ready(0, 499_999) && before.ready(500, 499_999));
        assert!(!b.ready(0, 500_000) && !before.ready(500, 500_000));
        assert_eq!(b.wait_ns(0, 500_000), 1);
        assert_eq!(before.wait_ns(500, 500_000), 1);
        // A gap far beyond the span (2⁶³ ns): full, never more.
        b.rebase(1 << 63);
        assert_eq!(b.tokens(0), 1_000_000);
    }

    #[test]
    fn live_rate_change_clamps_to_new_burst() {
        let mut b = Bucket::new(Rate::new(1000).with_burst(1000));
        b.set_rate(Rate::new(10).with_burst(2));
        assert_eq!(b.tokens(0), 2);
        assert!(b.take(0, 2));
        assert!(!b.ready(0, 1));
        assert!(b.ready(100_000_000, 1));
        // A debt is kept across a change of units: 1 op/s (10⁻⁹) to 1000 op/s (10⁻⁶).
        let mut b = Bucket::new(Rate::new(1).with_burst(1));
        assert!(b.take(0, 3));
        b.set_rate(Rate::new(1000).with_burst(10));
        assert_eq!(b.tokens(0), -2);
        assert_eq!(b.wait_ns(0, 1), 3_000_000);
    }
}
