//! The split of a rate limit across schedulers (cores) that enforce it together.
//!
//! A namespace with an IOPS limit served on several cores has a [`crate::Limiter`] on each;
//! each core takes a part of every rate (and burst) of the limits by its demand, once a pass
//! (the firmware's `shares::DemandRow` carries the demands). [`rate_share`] is the
//! arithmetic, [`limits_share`] applies it to the six rates of a [`Limits`].
//!
//! Guarantees, for parts computed from the same demands (proved by the tests and the
//! property tests in `tests/split.rs`):
//! - their sum is at most the rate when the rate is at least the number of schedulers
//!   (a bucket cannot hold less than one token a second: below that, each idle one keeps 1);
//! - a scheduler alone gets the whole rate;
//! - an idle scheduler (no demand) among busy ones gets 1 token a second (and a burst of
//!   1): the smallest rate a bucket holds, taken off the rate before the busy ones split
//!   the rest. It publishes its demand at its next pass, before it starts anything;
//! - busy ones split the rest in proportion to their demands, rounded down;
//! - when nobody is busy, each gets an even part (rounded down).
//!
//! Parts computed from figures of different passes can sum above the rate while demand moves:
//! a core whose demand grew takes its larger part at once, the others lower theirs at their
//! next pass. The excess is at most the grown part for one pass of the others (plus, for the
//! burst, the tokens a core's bucket held, clamped to its new burst when its part shrinks).

use crate::bucket::Rate;
use crate::limiter::Limits;

/// Schedulers counted (more are ignored, as in [`crate::cap_share`]).
pub const MAX_SPLIT: usize = 64;

/// Scheduler `mine`'s part of `rate` (tokens a second, or a burst in tokens) shared by the
/// schedulers whose demands are `demands` (`mine` among them); see the module documentation.
/// No allocation, no division by zero; at least 1 unless `rate` is 0.
pub fn rate_share(rate: u64, mine: usize, demands: &[u32]) -> u64 {
    let demands = &demands[..demands.len().min(MAX_SPLIT)];
    let n = demands.len() as u64;
    if n <= 1 || rate == 0 {
        return rate;
    }
    let total: u64 = demands.iter().map(|&d| u64::from(d)).sum();
    let me = u64::from(demands.get(mine).copied().unwrap_or(0));
    let part = if total == 0 {
        rate / n
    } else if me == 0 {
        1
    } else {
        let idle = demands.iter().filter(|&&d| d == 0).count() as u64;
        let pool = rate.saturating_sub(idle);
        // pool × me / total without overflow: pool < 2⁶⁴, me ≤ total < 2³⁸.
        ((u128::from(pool) * u128::from(me)) / u128::from(total)) as u64
    };
    part.max(1)
}

/// `limits` with every rate and burst replaced by scheduler `mine`'s part ([`rate_share`]);
/// unset limits stay unset.
pub fn limits_share(limits: Limits, mine: usize, demands: &[u32]) -> Limits {
    let part = |r: Option<Rate>| {
        r.map(|r| Rate {
            per_sec: rate_share(r.per_sec, mine, demands),
            burst: rate_share(r.burst, mine, demands),
        })
    };
    Limits {
        iops: part(limits.iops),
        read_iops: part(limits.read_iops),
        write_iops: part(limits.write_iops),
        bps: part(limits.bps),
        read_bps: part(limits.read_bps),
        write_bps: part(limits.write_bps),
    }
}

/// A scheduler's part of new limits `new` while its part of the old ones (`base`) was
/// `part`, until its next split computes it from demands: every rate and burst of `new`
/// scaled by the fraction of it it had (`part / base`, of the same rate's rate or burst when
/// `base` had it, else of the first rate both have; none: not split, the whole of `new`),
/// rounded down, at least 1. Unchanged limits give the same part; the parts of schedulers
/// that split `base` from the same demands sum to at most `new` (as far as theirs summed to
/// at most `base`): a live change of a split limit takes effect on every scheduler at once,
/// in proportion, without a pass at the whole new limits.
pub fn rescale_part(base: Limits, part: Limits, new: Limits) -> Limits {
    let pairs = [
        (base.iops, part.iops),
        (base.read_iops, part.read_iops),
        (base.write_iops, part.write_iops),
        (base.bps, part.bps),
        (base.read_bps, part.read_bps),
        (base.write_bps, part.write_bps),
    ];
    // (rate's fraction, burst's fraction) as (numerator, denominator).
    let fraction = |i: usize| match pairs[i] {
        (Some(b), Some(p)) => Some(((p.per_sec, b.per_sec.max(1)), (p.burst, b.burst.max(1)))),
        _ => None,
    };
    let Some((any, _)) = (0..6).find_map(fraction) else {
        return new;
    };
    let f = |x: u64, (num, den): (u64, u64)| {
        (((u128::from(x) * u128::from(num)) / u128::from(den)) as u64).clamp(1, x.max(1))
    };
    let scale = |i: usize, r: Option<Rate>| {
        r.map(|r| {
            let (rate, burst) = fraction(i).unwrap_or((any, any));
            Rate {
                per_sec: f(r.per_sec, rate),
                burst: f(r.burst, burst),
            }
        })
    };
    Limits {
        iops: scale(0, new.iops),
        read_iops: scale(1, new.read_iops),
        write_iops: scale(2, new.write_iops),
        bps: scale(3, new.bps),
        read_bps: scale(4, new.read_bps),
        write_bps: scale(5, new.write_bps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_rescaled_to_new_limits_keeps_its_proportion() {
        let l = |per_sec| Limits {
            iops: Some(Rate::new(per_sec)),
            ..Limits::NONE
        };
        let demands = [3, 1];
        let parts = [0, 1].map(|i| limits_share(l(2000), i, &demands));
        // Unchanged limits: the same part.
        assert_eq!(rescale_part(l(2000), parts[0], l(2000)), parts[0]);
        // Lowered: each in proportion, together within the new limits.
        let new = [0, 1].map(|i| rescale_part(l(2000), parts[i], l(1000)).iops.unwrap());
        assert_eq!(new.map(|r| r.per_sec), [750, 250]);
        assert!(new.iter().map(|r| r.burst).sum::<u64>() <= 100);
        // Not split: the whole new limits; a rate appearing takes the others' fraction.
        assert_eq!(rescale_part(l(2000), l(2000), l(10)), l(10));
        assert_eq!(rescale_part(Limits::NONE, Limits::NONE, l(10)), l(10));
        let with_bw = Limits {
            bps: Some(Rate::new(4000)),
            ..l(1000)
        };
        let r = rescale_part(l(2000), parts[1], with_bw);
        assert_eq!(r.bps.unwrap().per_sec, 1000);
    }

    #[test]
    fn alone_gets_the_whole_rate() {
        assert_eq!(rate_share(2000, 0, &[5]), 2000);
        assert_eq!(rate_share(2000, 0, &[0]), 2000);
        assert_eq!(rate_share(2000, 0, &[]), 2000);
    }

    #[test]
    fn busy_ones_split_by_demand_and_idle_ones_keep_one() {
        assert_eq!(rate_share(2000, 0, &[3, 1]), 1500);
        assert_eq!(rate_share(2000, 1, &[3, 1]), 500);
        // Core 1 idle: it keeps one token a second, core 0 the rest.
        assert_eq!(rate_share(2000, 0, &[4, 0]), 1999);
        assert_eq!(rate_share(2000, 1, &[4, 0]), 1);
        // Nobody busy: even parts.
        assert_eq!(rate_share(2001, 0, &[0, 0]), 1000);
        assert_eq!(rate_share(2001, 1, &[0, 0]), 1000);
        // Rounded down: the sum stays within the rate.
        let parts: u64 = (0..3).map(|i| rate_share(1000, i, &[1, 1, 1])).sum();
        assert_eq!(parts, 999);
    }

    #[test]
    fn limits_split_each_rate_and_burst_and_leave_unset_ones() {
        let l = Limits {
            iops: Some(Rate::new(2000)),
            write_bps: Some(Rate::new(10_000_000).with_burst(1_000_000)),
            ..Limits::NONE
        };
        let p = limits_share(l, 1, &[1, 1]);
        assert_eq!(p.iops, Some(Rate::new(1000).with_burst(100)));
        assert_eq!(p.write_bps, Some(Rate::new(5_000_000).with_burst(500_000)));
        assert_eq!(p.read_iops, None);
        assert_eq!(limits_share(l, 0, &[7]), l);
    }
}
