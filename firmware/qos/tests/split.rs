//! A rate limit shared by several schedulers (one per core): each takes its part of every
//! rate and burst by its demand ([`rate_share`], [`Scheduler::set_limiter_split`]), so that
//! together they admit no more than the limit and each gets its demand's share.

use keel_qos::{Admit, Cost, Dir, FlowId, LimiterId, Limits, Rate, Scheduler, rate_share};
use proptest::prelude::*;

const READ4K: Cost = Cost {
    dir: Dir::Read,
    bytes: 4096,
};

proptest! {
    /// Parts computed from the same demands never sum above the rate (when the rate is at
    /// least the number of schedulers), each is at least 1, one alone gets the whole rate,
    /// busy ones get parts in proportion to their demands (within the rounding and the one
    /// token of each idle one), idle ones 1 while others are busy.
    #[test]
    fn rate_parts_sum_within_the_rate_and_follow_demand(
        rate in 1u64..2_000_000_000_000,
        demands in proptest::collection::vec(prop_oneof![Just(0u32), 1u32..100_000], 1..12),
    ) {
        let n = demands.len();
        let parts: Vec<u64> = (0..n).map(|i| rate_share(rate, i, &demands)).collect();
        prop_assert!(parts.iter().all(|&p| p >= 1));
        if rate >= n as u64 {
            prop_assert!(parts.iter().sum::<u64>() <= rate, "{parts:?}");
        }
        if n == 1 {
            prop_assert_eq!(parts[0], rate);
        }
        let total: u64 = demands.iter().map(|&d| u64::from(d)).sum();
        let idle = demands.iter().filter(|&&d| d == 0).count() as u64;
        if total > 0 && n > 1 && rate > idle {
            let pool = (rate - idle) as f64;
            for (i, &d) in demands.iter().enumerate() {
                if d == 0 {
                    prop_assert_eq!(parts[i], 1);
                } else {
                    let want = pool * f64::from(d) / total as f64;
                    prop_assert!((parts[i] as f64 - want).abs() <= 1.0 + want * 1e-9,
                        "part {} of {rate}: {} for {want}", i, parts[i]);
                }
            }
        }
    }
}

/// One core's target reduced to its scheduler: one namespace limiter and its flows (QD
/// `depth` each), a backend that completes every command at the next pass.
struct Core {
    s: Scheduler,
    l: LimiterId,
    flows: Vec<FlowId>,
    depth: u32,
    free: Vec<u32>,
    inflight: Vec<(u32, FlowId)>,
    done: u64,
    /// Its host sends nothing more.
    stopped: bool,
}

impl Core {
    fn new(flows: u32, depth: u32, limits: Limits) -> Self {
        let mut s = Scheduler::new(flows * depth);
        let d = s.add_domain(0).unwrap();
        let l = s.add_limiter(limits, 0).unwrap();
        let flows = (0..flows)
            .map(|_| s.add_flow(d, 1, &[l]).unwrap())
            .collect();
        Self {
            s,
            l,
            flows,
            depth,
            free: Vec::new(),
            inflight: Vec::new(),
            done: 0,
            stopped: false,
        }
    }

    /// Its flows start `busy` (all handles free) or idle.
    fn busy(mut self, busy: bool) -> Self {
        if busy {
            self.free = (0..self.flows.len() as u32 * self.depth).collect();
        }
        self
    }

    /// One pass at `now`: completions, its part from `demands` (its own at `mine`, as
    /// fresh as it is), new commands, then what its limiter lets start.
    fn pass(&mut self, now: u64, mine: usize, demands: &[u32], count: bool) {
        for (h, f) in self.inflight.drain(..) {
            self.s.finished(f);
            if !self.stopped {
                self.free.push(h);
            }
        }
        self.s
            .set_limiter_split(self.l, mine, demands, now)
            .unwrap();
        for h in core::mem::take(&mut self.free) {
            let f = self.flows[(h / self.depth) as usize];
            if self.s.enqueue(now, f, h, READ4K).unwrap() == Admit::Now {
                self.inflight.push((h, f));
            }
        }
        while let Some((h, f)) = self.s.next(now) {
            self.inflight.push((h, f));
        }
        if count {
            self.done += self.inflight.len() as u64;
        }
    }
}

/// Two cores share a namespace's 2000 IOPS limit: three deep flows on core 0, one on core
/// one. Each pass (10 µs) a core reads the other's demand as published at its last pass (one
/// pass stale), takes its part and starts what its bucket allows. Over 2 s the two together
/// admit at most the limit plus one burst, each about its demand's share (3:1), and core 1
/// alone afterwards gets the whole limit (less the one token a second idle core 0 keeps).
#[test]
fn two_cores_share_a_limit_by_demand_and_never_exceed_it_together() {
    let limits = Limits {
        iops: Some(Rate::new(2000)),
        ..Limits::NONE
    };
    let mut cores = [
        Core::new(3, 32, limits).busy(true),
        Core::new(1, 32, limits).busy(true),
    ];
    let mut published = [0u32; 2];
    let pass_ns = 10_000u64;
    let secs = 2u64;
    let steps = secs * 1_000_000_000 / pass_ns;
    for step in 0..steps {
        let now = step * pass_ns;
        for c in 0..2 {
            let mut d = published;
            d[c] = cores[c].s.limiter_demand(cores[c].l);
            cores[c].pass(now, c, &d, true);
            published[c] = cores[c].s.limiter_demand(cores[c].l);
        }
    }
    let (a, b) = (cores[0].done, cores[1].done);
    // The limit over 2 s, plus the initial burst (200) the first pass found in each bucket
    // before it was split.
    assert!(a + b <= 2000 * secs + 2 * 200, "{a} + {b}");
    assert!(
        a + b >= 2000 * secs * 95 / 100,
        "{a} + {b}: the limit is used"
    );
    let ratio = a as f64 / b as f64;
    assert!((2.7..=3.3).contains(&ratio), "{a} : {b}");
    assert_eq!(
        cores[0]
            .s
            .limiter(cores[0].l)
            .unwrap()
            .limits()
            .iops
            .unwrap()
            .per_sec,
        1500
    );
    assert_eq!(
        cores[1]
            .s
            .limiter(cores[1].l)
            .unwrap()
            .limits()
            .iops
            .unwrap()
            .per_sec,
        500
    );

    // Core 0 goes idle (its commands drain); core 1 alone gets all but the one token a
    // second core 0 keeps.
    let start = steps;
    cores[1].done = 0;
    cores[0].stopped = true;
    for step in start..start + steps {
        let now = step * pass_ns;
        for c in 0..2 {
            let mut d = published;
            d[c] = cores[c].s.limiter_demand(cores[c].l);
            cores[c].pass(now, c, &d, c == 1);
            published[c] = cores[c].s.limiter_demand(cores[c].l);
        }
    }
    let b = cores[1].done;
    assert!(b <= 2000 * secs + 200, "{b}");
    assert!(b >= 1999 * secs * 95 / 100, "{b}: nearly the whole limit");
    assert_eq!(
        cores[1]
            .s
            .limiter(cores[1].l)
            .unwrap()
            .limits()
            .iops
            .unwrap()
            .per_sec,
        1999
    );
    assert_eq!(
        cores[0]
            .s
            .limiter(cores[0].l)
            .unwrap()
            .limits()
            .iops
            .unwrap()
            .per_sec,
        1
    );
}

/// Without a split (the old model: each core's limiter with the whole limit) the same two
/// cores admit about twice the limit: what the split prevents.
#[test]
fn unsplit_limits_on_two_cores_would_double_the_rate() {
    let limits = Limits {
        iops: Some(Rate::new(2000)),
        ..Limits::NONE
    };
    let mut cores = [
        Core::new(3, 32, limits).busy(true),
        Core::new(1, 32, limits).busy(true),
    ];
    for step in 0..100_000u64 {
        for (c, core) in cores.iter_mut().enumerate() {
            core.pass(step * 10_000, c, &[1], true);
        }
    }
    assert!(
        cores[0].done + cores[1].done > 3800,
        "{} + {}",
        cores[0].done,
        cores[1].done
    );
}

/// A live change of a split limit (`Scheduler::set_limits`, a push lowering a namespace's
/// 2000 IOPS to 1000 while two cores split it evenly): the part in force follows the new
/// limit at once in proportion (500, not the whole 1000 until the next split), the next
/// split computes it from the new limit, and the bucket keeps its level (clamped to the
/// new, smaller burst): no command more than the new part's burst starts at once.
#[test]
fn a_split_limit_changed_live_is_split_from_its_new_value() {
    let iops = |per_sec| Limits {
        iops: Some(Rate::new(per_sec)),
        ..Limits::NONE
    };
    let mut s = Scheduler::new(1024);
    let d = s.add_domain(0).unwrap();
    let l = s.add_limiter(iops(2000), 0).unwrap();
    let f = s.add_flow(d, 1, &[l]).unwrap();
    let in_force = |s: &Scheduler| s.limiter(l).unwrap().limits().iops.unwrap();
    assert!(s.set_limiter_split(l, 0, &[1, 1], 0).unwrap());
    assert_eq!(in_force(&s).per_sec, 1000);
    s.set_limits(l, iops(1000), 0).unwrap();
    assert_eq!(s.limiter_base(l), Some(iops(1000)));
    assert_eq!(
        in_force(&s),
        Rate {
            per_sec: 500,
            burst: 50
        },
        "half of the new limit at once"
    );
    // The next split, from the same demands: the same part, from the new limit.
    assert!(!s.set_limiter_split(l, 0, &[1, 1], 0).unwrap());
    assert!(s.set_limiter_split(l, 0, &[3, 1], 0).unwrap());
    assert_eq!(in_force(&s).per_sec, 750);
    // Raised back: the part grows in proportion, and the bucket does not refill.
    s.set_limits(l, iops(4000), 0).unwrap();
    assert_eq!(in_force(&s).per_sec, 3000);
    let mut started = 0;
    for h in 0..1024 {
        if s.enqueue(0, f, h, READ4K).unwrap() == Admit::Now {
            started += 1;
        }
    }
    while s.next(0).is_some() {
        started += 1;
    }
    assert!(
        started <= 50,
        "{started} started at once: at most the level the bucket kept (50, clamped when lowered)"
    );
    // Alone again: the whole new limit.
    assert!(s.set_limiter_split(l, 0, &[5], 0).unwrap());
    assert_eq!(in_force(&s).per_sec, 4000);
}
