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

/// The buckets a request of direction `dir` draws from, as a bit mask over the six of
/// [`Limits`] (in that order): the combined ones (0: IOPS, 3: bandwidth) always, the read
/// ones (1, 4) for reads, the write ones (2, 5) for writes. A write is not held back by the
/// read limits.
const fn draws(dir: Dir) -> u8 {
    match dir {
        Dir::Read => 0b01_1011,
        Dir::Write => 0b10_1101,
        Dir::Other => 0b00_1001,
    }
}

/// What a request costs bucket `i`: one operation (0-2) or its bytes (3-5).
#[inline(always)]
fn cost_in(i: usize, cost: Cost) -> u64 {
    if i < 3 { 1 } else { cost.bytes }
}

/// Per direction, what the per-command path needs (see [`Limiter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct DirFast {
    /// Where its operations and bytes are summed in [`Limiter::acc`]: its own IOPS and
    /// bandwidth bucket (1, 4 or 2, 5; 6, 7 for [`Dir::Other`]: slots never read).
    ops: usize,
    bytes: usize,
    /// The longest time one operation takes to refill in the IOPS buckets it draws from,
    /// `⌈k / r⌉` ns.
    op_ns: u64,
    /// The longest time one byte takes to refill in the bandwidth buckets it draws from, in
    /// `2^-shift` ns, rounded up (`⌈k × 2^shift / r⌉`).
    byte_q: u64,
}

/// The directions in the order of their discriminants (the index of [`Limiter::dirs`]).
const DIRS: [Dir; 3] = [Dir::Read, Dir::Write, Dir::Other];
const _: () =
    assert!(Dir::Read as usize == 0 && Dir::Write as usize == 1 && Dir::Other as usize == 2);

/// `batch_t` when no takes wait to be applied (`t` stays below 2⁶²).
const NO_BATCH: u64 = u64::MAX;

/// The buckets of one [`Limits`], on one clock. (What it admitted is counted by the
/// [`crate::Scheduler`]: [`crate::LimiterStats`].)
///
/// Per command ([`Limiter::admit`]) it reads the clock once (nanoseconds since its epoch,
/// moved forward when a bucket's [`Bucket::span`] would be passed). No division, no 128-bit
/// arithmetic. Two ways through:
///
/// - **While no limit is near** (the common case), it does not touch the buckets. It keeps
///   `full_at`, a time by which every bucket is certainly full again, and the takes of one
///   instant (`batch_t`) summed per bucket (`acc`). A command at a `t` at or after `full_at`
///   finds every bucket full: the previous instant's takes are paid back (dropped), and a
///   new instant begins. A command of the same instant is admitted while the instant's sums
///   stay within the smallest burst of each kind (a full bucket holds its burst). Takes of
///   one instant compose exactly (`max(max(tat, s) + a, s) + b = max(tat, s) + a + b`), so
///   applying the sums later gives the buckets exactly the state taking them one by one
///   would have. Admission here implies admission by every bucket; the decisions are those
///   of the buckets.
/// - **Otherwise** it applies the instant's sums to the buckets and takes from each bucket
///   the command draws from ([`Bucket::take`]), then recomputes `full_at` from the buckets.
///
/// In the firmware, every command of one poll pass carries that pass's timestamp, so a pass
/// is one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limiter {
    limits: Limits,
    buckets: [Bucket; 6],
    /// Bit `i`: bucket `i` is set.
    set: u8,
    /// The buckets' `t` = 0, in ns of the monotonic clock.
    epoch: u64,
    /// The epoch moves before `now - epoch` reaches this.
    span: u64,
    /// Every set bucket is full at this `t` or later (an upper bound).
    full_at: u64,
    /// The instant whose takes `acc` holds, not yet applied to the buckets ([`NO_BATCH`]:
    /// none).
    batch_t: u64,
    /// Tokens taken at `batch_t`, per bucket (slots 6, 7: see [`DirFast`]).
    acc: [u64; 8],
    /// The smallest burst of the IOPS buckets set (`u64::MAX`: none).
    ops_room: u64,
    /// The smallest burst of the bandwidth buckets set (`u64::MAX`: none), lowered if need
    /// be so that `byte_room × byte_q` stays below 2⁶².
    byte_room: u64,
    /// The fixed point of [`DirFast::byte_q`].
    shift: u32,
    dirs: [DirFast; 3],
}

impl Limiter {
    /// Buckets for `limits`, full at `now_ns`.
    pub fn new(limits: Limits, now_ns: u64) -> Self {
        let mut l = Self {
            limits: Limits::NONE,
            buckets: [Bucket::new(Rate::new(1)); 6],
            set: 0,
            epoch: now_ns,
            span: u64::MAX,
            full_at: 0,
            batch_t: NO_BATCH,
            acc: [0; 8],
            ops_room: u64::MAX,
            byte_room: u64::MAX,
            shift: 0,
            dirs: [DirFast::default(); 3],
        };
        l.set(limits, now_ns);
        l
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether any limit is set.
    #[inline]
    pub fn is_limited(&self) -> bool {
        self.set != 0
    }

    /// The bucket of limit `i` (in the order of [`Limits`]: IOPS, read IOPS, write IOPS,
    /// bandwidth, read and write bandwidth), if set, with its clock `t` at `now_ns`.
    pub fn bucket(&mut self, i: usize, now_ns: u64) -> Option<(Bucket, u64)> {
        let t = self.clock(now_ns);
        self.apply_batch();
        (self.set & (1 << i) != 0).then(|| (self.buckets[i], t))
    }

    /// Replaces the limits live. Buckets that stay keep their level (clamped to the new
    /// burst), new ones start full, removed ones go.
    pub fn set(&mut self, limits: Limits, now_ns: u64) {
        self.rebase(now_ns);
        self.apply_batch();
        let mut set = 0;
        for (i, rate) in limits.rates().into_iter().enumerate() {
            let Some(r) = rate else { continue };
            let b = &mut self.buckets[i];
            if self.set & (1 << i) != 0 {
                b.set_rate(r);
            } else {
                *b = Bucket::new(r);
            }
            set |= 1 << i;
        }
        self.limits = limits;
        self.set = set;
        self.span = u64::MAX;
        self.ops_room = u64::MAX;
        self.byte_room = u64::MAX;
        let mut dirs = [DirFast::default(); 3];
        for (d, x) in dirs.iter_mut().enumerate() {
            (x.ops, x.bytes) = [(1, 4), (2, 5), (6, 7)][d];
        }
        for (i, b) in self.buckets.iter().enumerate() {
            if set & (1 << i) == 0 {
                continue;
            }
            self.span = self.span.min(b.span());
            if i < 3 {
                self.ops_room = self.ops_room.min(b.rate().burst);
            } else {
                self.byte_room = self.byte_room.min(b.rate().burst);
            }
            for (d, dir) in DIRS.into_iter().enumerate() {
                if i < 3 && draws(dir) & (1 << i) != 0 {
                    dirs[d].op_ns = dirs[d].op_ns.max(b.unit().div_ceil(b.per_ns()));
                }
            }
        }
        // The finest fixed point (up to 2⁻³² ns) in which a command of `byte_room` bytes
        // cannot overflow: `byte_room × byte_q < 2⁶²`. A burst too large even at 2⁰ is
        // lowered (the fast way then takes only smaller commands; the buckets decide the
        // rest).
        let q = |sh: u32, dir: Dir| {
            let mut q = 0u64;
            for (i, b) in self.buckets.iter().enumerate().skip(3) {
                if set & draws(dir) & (1 << i) != 0 {
                    q = q.max(((b.unit() as u128) << sh).div_ceil(b.per_ns() as u128) as u64);
                }
            }
            q
        };
        let fits = |sh: u32, room: u64| {
            DIRS.into_iter()
                .all(|dir| (room as u128) * (q(sh, dir) as u128) < 1 << 62)
        };
        let mut shift = 32;
        while shift > 0 && !fits(shift, self.byte_room) {
            shift -= 1;
        }
        while !fits(0, self.byte_room) {
            self.byte_room /= 2;
        }
        for (d, dir) in DIRS.into_iter().enumerate() {
            dirs[d].byte_q = q(shift, dir);
        }
        self.shift = shift;
        self.dirs = dirs;
        self.full_at = self.exact_full_at();
    }

    /// Nanoseconds since the epoch at `now_ns`, below every bucket's span.
    #[inline(always)]
    fn clock(&mut self, now_ns: u64) -> u64 {
        let t = now_ns.wrapping_sub(self.epoch);
        if t < self.span {
            t
        } else {
            self.rebase(now_ns)
        }
    }

    /// Moves the epoch to `now_ns` and returns the clock there (0). The clock wraps: `now_ns`
    /// below the epoch by up to 2⁶³ ns means time went backwards (or a request of an earlier
    /// poll pass), and counts as the epoch itself, adding nothing.
    #[cold]
    #[inline(never)]
    fn rebase(&mut self, now_ns: u64) -> u64 {
        let t = now_ns.wrapping_sub(self.epoch);
        if (t as i64) < 0 {
            return 0;
        }
        self.apply_batch();
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if self.set & (1 << i) != 0 {
                b.rebase(t);
            }
        }
        self.full_at = self.full_at.saturating_sub(t);
        self.epoch = now_ns;
        0
    }

    /// Applies the takes of the current instant to the buckets.
    fn apply_batch(&mut self) {
        if self.batch_t == NO_BATCH {
            return;
        }
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if self.set & (1 << i) != 0 && self.acc[i] != 0 {
                b.charge(self.batch_t, self.acc[i]);
            }
        }
        self.batch_t = NO_BATCH;
    }

    /// The first `t` at which every set bucket is full (from the buckets; the batch applied).
    fn exact_full_at(&self) -> u64 {
        let mut at = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            if self.set & (1 << i) != 0 {
                at = at.max(b.full_at());
            }
        }
        at
    }

    /// Admits `cost` at `now_ns` if every bucket it draws from allows it, charging them
    /// all. Otherwise changes nothing and returns false ([`Limiter::wait_ns`] says for how
    /// long).
    #[inline]
    pub fn admit(&mut self, now_ns: u64, cost: Cost) -> bool {
        self.set == 0 || self.take(now_ns, cost)
    }

    /// The per-command path (see the type's documentation); [`Limiter::admit`] of a limiter
    /// with a limit set.
    #[inline]
    pub(crate) fn take(&mut self, now_ns: u64, cost: Cost) -> bool {
        let t = self.clock(now_ns);
        if t != self.batch_t {
            if t < self.full_at {
                return self.take_slow(t, cost);
            }
            // Every bucket is full at `t`: the takes of the last instant are paid back.
            self.batch_t = t;
            self.full_at = t;
            self.acc = [0; 8];
        }
        let c = cost.bytes;
        if self.acc[0] >= self.ops_room || c > self.byte_room - self.acc[3] {
            return self.take_slow(t, cost);
        }
        let d = &self.dirs[cost.dir as usize];
        // How long this command takes to refill, rounded up: ⌈c × k / r⌉ ≤
        // ⌊c × q / 2^shift⌋ + 1 (no overflow: c ≤ byte_room).
        let refill = d.op_ns.max(((c * d.byte_q) >> self.shift) + 1);
        let (o, b) = (d.ops & 7, d.bytes & 7);
        self.acc[0] += 1;
        self.acc[o] += 1;
        self.acc[3] += c;
        self.acc[b] += c;
        // No overflow: an instant starts at t < 2⁶² with `full_at = t`, and its takes add at
        // most `byte_room × byte_q / 2^shift` (< 2⁶²) and `ops_room × op_ns` (≤ burst × (k / r
        // + 1) of one IOPS bucket, ≤ 2⁶²).
        self.full_at += refill;
        true
    }

    /// The buckets' way: each bucket the command draws from decides.
    #[cold]
    #[inline(never)]
    fn take_slow(&mut self, t: u64, cost: Cost) -> bool {
        self.apply_batch();
        let m = self.set & draws(cost.dir);
        let mut rest = m;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            if !self.buckets[i].take(t, cost_in(i, cost)) {
                self.untake(m & ((1 << i) - 1), cost);
                return false;
            }
            rest &= rest - 1;
        }
        self.full_at = self.exact_full_at();
        true
    }

    fn untake(&mut self, mut m: u8, cost: Cost) {
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            self.buckets[i].untake(cost_in(i, cost));
            m &= m - 1;
        }
    }

    /// Undoes an [`Limiter::admit`] of `cost` (another limiter held the request back): the
    /// buckets are as the admission found them.
    pub fn refund(&mut self, cost: Cost) {
        self.apply_batch();
        self.untake(self.set & draws(cost.dir), cost);
    }

    /// 0 when `cost` may start at `now_ns`, else how many nanoseconds until it may (as far
    /// as this limiter is concerned).
    pub fn wait_ns(&mut self, now_ns: u64, cost: Cost) -> u64 {
        if self.set == 0 {
            return 0;
        }
        let t = self.clock(now_ns);
        self.apply_batch();
        let mut m = self.set & draws(cost.dir);
        let mut wait = 0;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            let b = &self.buckets[i];
            if !b.ready(t, cost_in(i, cost)) {
                wait = wait.max(b.wait_ns(t, cost_in(i, cost)).max(1));
            }
            m &= m - 1;
        }
        wait
    }

    /// Charges `cost` to every bucket it draws from, whatever their level (after
    /// [`Limiter::wait_ns`] said 0 at the same `now_ns`, this is [`Limiter::admit`]).
    pub fn charge(&mut self, now_ns: u64, cost: Cost) {
        if self.set == 0 {
            return;
        }
        let t = self.clock(now_ns);
        self.apply_batch();
        let mut m = self.set & draws(cost.dir);
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            self.buckets[i].charge(t, cost_in(i, cost));
            m &= m - 1;
        }
        self.full_at = self.exact_full_at();
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
        l.charge(0, R4K);
        assert!(l.wait_ns(0, R4K) > 0);
        for _ in 0..100 {
            assert_eq!(l.wait_ns(0, W4K), 0);
            l.charge(0, W4K);
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
        l.charge(0, W4K);
        assert_eq!(l.wait_ns(0, W4K), 10_000_000);
    }

    #[test]
    fn unlimited_never_waits() {
        let mut l = Limiter::new(Limits::NONE, 0);
        assert!(!l.is_limited());
        for _ in 0..1000 {
            assert_eq!(l.wait_ns(0, W4K), 0);
            assert!(l.admit(0, W4K));
        }
    }

    fn iops(per_sec: u64, burst: u64) -> Limits {
        Limits {
            iops: Some(Rate::new(per_sec).with_burst(burst)),
            ..Limits::NONE
        }
    }

    #[test]
    fn the_clock_may_wrap() {
        // 1000 IOPS, burst 1, created 0.5 ms before the 64-bit nanosecond clock wraps.
        let t0 = u64::MAX - 499_999;
        let mut l = Limiter::new(iops(1000, 1), t0);
        assert!(l.admit(t0, R4K));
        // 1 ms later the clock reads 500 000 (wrapped): one operation is back then, not
        // before.
        assert!(!l.admit(t0.wrapping_add(999_999), R4K));
        assert_eq!(l.wait_ns(t0.wrapping_add(999_999), R4K), 1);
        assert_eq!(t0.wrapping_add(1_000_000), 500_000);
        assert!(l.admit(500_000, R4K));
    }

    #[test]
    fn a_long_gap_refills_to_the_burst_only() {
        // 1 IOPS, burst 2 (units of 10⁻⁹ operation): emptied, then idle for 2⁶³ - 1 ns, far
        // beyond an epoch; exactly the burst is back.
        let mut l = Limiter::new(iops(1, 2), 7);
        assert!(l.admit(7, R4K) && l.admit(7, W4K));
        assert!(!l.admit(7, R4K));
        let later = 7 + (u64::MAX >> 1);
        assert!(l.admit(later, R4K) && l.admit(later, R4K));
        assert!(!l.admit(later, R4K));
        assert_eq!(l.wait_ns(later, R4K), 1_000_000_000);
    }

    #[test]
    fn an_earlier_time_adds_nothing() {
        // 1000 IOPS, burst 1 (units of 10⁻⁶ operation): taken at 1 s, a look at 1 s - 1 ns
        // finds the bucket as empty as at 1 s; it waits until 1 ms after 1 s.
        let mut l = Limiter::new(iops(1000, 1), 0);
        assert!(l.admit(1_000_000_000, R4K));
        assert!(!l.admit(999_999_999, R4K));
        assert_eq!(l.wait_ns(999_999_999, R4K), 1_000_001);
        assert!(l.admit(1_001_000_000, R4K));
    }

    #[test]
    fn a_refused_command_takes_nothing() {
        // IOPS 10 with a burst of 2, write bandwidth 1000 B/s with a burst of 1000 B.
        let mut l = Limiter::new(
            Limits {
                iops: Some(Rate::new(10).with_burst(2)),
                write_bps: Some(Rate::new(1000).with_burst(1000)),
                ..Limits::NONE
            },
            0,
        );
        let w1k = Cost {
            dir: Dir::Write,
            bytes: 1000,
        };
        assert!(l.admit(0, w1k));
        // The IOPS bucket allows a second write, the bandwidth does not: the IOPS token is
        // given back, and a read (no bandwidth limit) still gets it.
        assert!(!l.admit(0, w1k));
        assert_eq!(l.bucket(0, 0).map(|(b, t)| b.tokens(t)), Some(1));
        assert!(l.admit(0, R4K));
        assert!(!l.admit(0, R4K));
        // A write larger than the burst starts on a full bucket and leaves a debt: 1 s later
        // the bucket is full again; 2000 B go, then 1 s of debt remains.
        assert!(l.admit(
            1_000_000_000,
            Cost {
                dir: Dir::Write,
                bytes: 2000
            }
        ));
        assert_eq!(
            l.bucket(5, 1_000_000_000).map(|(b, t)| b.tokens(t)),
            Some(-1000)
        );
    }
}
