//! The limiter against a plain model of token buckets: levels in 10⁻⁹ token, 128-bit,
//! refilled at every look (the arithmetic Keel used before the 64-bit rewrite), for random
//! limits, directions, sizes and times, with many commands at one instant (one poll pass)
//! and gaps across epochs. Every admission decision, every wait and every level must be the
//! same: the limiter's short way (no bucket touched while no limit is near) and its 64-bit
//! units change the cost, not the outcome.

use keel_qos::{Cost, Dir, Limiter, Limits, Rate};
use proptest::prelude::*;

const SCALE: i128 = 1_000_000_000;

#[derive(Debug, Clone)]
struct ModelBucket {
    per_sec: i128,
    burst: i128,
    /// Tokens × 10⁹.
    level: i128,
    last: u64,
}

impl ModelBucket {
    fn refill(&mut self, now: u64) {
        if now > self.last {
            self.level =
                (self.level + (now - self.last) as i128 * self.per_sec).min(self.burst * SCALE);
            self.last = now;
        }
    }
    fn need(&self, c: u64) -> i128 {
        (c as i128).min(self.burst) * SCALE
    }
    fn wait(&self, c: u64) -> u64 {
        let missing = self.need(c) - self.level;
        if missing <= 0 {
            0
        } else {
            ((missing + self.per_sec - 1) / self.per_sec) as u64
        }
    }
}

/// The six buckets of a limiter, in the order of `Limits`.
struct Model {
    buckets: [Option<ModelBucket>; 6],
}

fn draws(dir: Dir) -> [bool; 6] {
    let (r, w) = (dir == Dir::Read, dir == Dir::Write);
    [true, r, w, true, r, w]
}

impl Model {
    fn new(l: &Limits, now: u64) -> Self {
        let rates = [
            l.iops,
            l.read_iops,
            l.write_iops,
            l.bps,
            l.read_bps,
            l.write_bps,
        ];
        Self {
            buckets: rates.map(|r| {
                r.map(|r| ModelBucket {
                    per_sec: r.per_sec as i128,
                    burst: r.burst as i128,
                    level: r.burst as i128 * SCALE,
                    last: now,
                })
            }),
        }
    }
    fn cost_in(i: usize, c: Cost) -> u64 {
        if i < 3 { 1 } else { c.bytes }
    }
    fn wait(&mut self, now: u64, c: Cost) -> u64 {
        let d = draws(c.dir);
        let mut w = 0;
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if let Some(b) = b
                && d[i]
            {
                b.refill(now);
                w = w.max(b.wait(Self::cost_in(i, c)));
            }
        }
        w
    }
    fn admit(&mut self, now: u64, c: Cost) -> bool {
        if self.wait(now, c) > 0 {
            return false;
        }
        let d = draws(c.dir);
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if let Some(b) = b
                && d[i]
            {
                b.level -= Self::cost_in(i, c) as i128 * SCALE;
            }
        }
        true
    }
    fn tokens(&mut self, i: usize, now: u64) -> Option<i64> {
        let b = self.buckets[i].as_mut()?;
        b.refill(now);
        Some(b.level.div_euclid(SCALE) as i64)
    }
}

fn rate() -> impl Strategy<Value = Option<Rate>> {
    let per_sec = prop_oneof![
        1u64..100,
        100u64..1_000_000,
        Just(1_000_000_000u64),
        // No factor in common with 10⁹: units of 10⁻⁹ token, short epochs (4.6 ms).
        Just(999_999_999_989u64),
        1_000_000u64..100_000_000_000,
    ];
    proptest::option::weighted(0.7, (per_sec, 1u64..2_000_000))
        .prop_map(|r| r.map(|(p, b)| Rate::new(p).with_burst(b)))
}

fn limits() -> impl Strategy<Value = Limits> {
    [rate(), rate(), rate(), rate(), rate(), rate()].prop_map(|r| Limits {
        iops: r[0],
        read_iops: r[1],
        write_iops: r[2],
        bps: r[3],
        read_bps: r[4],
        write_bps: r[5],
    })
}

/// A step: time advance (0: the same instant), direction, bytes.
fn steps() -> impl Strategy<Value = Vec<(u64, u8, u64)>> {
    let gap = prop_oneof![
        4 => Just(0u64),
        3 => 1u64..5_000,
        2 => 5_000u64..10_000_000,
        1 => 10_000_000u64..20_000_000_000,
    ];
    let bytes = prop_oneof![Just(4096u64), Just(0), 1u64..3_000_000];
    proptest::collection::vec((gap, 0u8..3, bytes), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decisions_match_the_model(l in limits(), start in any::<u64>(), steps in steps()) {
        // Any starting time, also one the clock wraps after.
        let mut lim = Limiter::new(l, start);
        let mut model = Model::new(&l, 0);
        let mut t = 0u64;
        for (k, (gap, dir, bytes)) in steps.into_iter().enumerate() {
            t += gap;
            let now = start.wrapping_add(t);
            let dir = [Dir::Read, Dir::Write, Dir::Other][dir as usize];
            let c = Cost { dir, bytes };
            if k % 7 == 3 {
                // The scheduler asks how long before it takes (a command at a queue's head).
                prop_assert_eq!(lim.wait_ns(now, c), model.wait(t, c).max(
                    if model.wait(t, c) > 0 { 1 } else { 0 }), "wait at step {}", k);
            }
            let got = lim.admit(now, c);
            prop_assert_eq!(got, model.admit(t, c), "admit at step {} (t {})", k, t);
            if k % 11 == 5 {
                for i in 0..6 {
                    let ours = lim.bucket(i, now).map(|(b, bt)| b.tokens(bt));
                    prop_assert_eq!(ours, model.tokens(i, t), "bucket {} at step {}", i, k);
                }
            }
        }
    }
}

/// Commands of one poll pass (one instant) are admitted while the smallest burst lasts, the
/// next pass finds the buckets refilled, and a refund gives back exactly what was taken.
#[test]
fn one_instant_many_commands() {
    // 1000 IOPS with a burst of 8, 1 MB/s with a burst of 64 KiB.
    let l = Limits {
        iops: Some(Rate::new(1000).with_burst(8)),
        bps: Some(Rate::new(1_000_000).with_burst(65_536)),
        ..Limits::NONE
    };
    let mut lim = Limiter::new(l, 5_000);
    let r4k = Cost {
        dir: Dir::Read,
        bytes: 4096,
    };
    // 8 operations (the IOPS burst; 32 KiB of the 64 KiB) at one instant, not a 9th.
    for _ in 0..8 {
        assert!(lim.admit(5_000, r4k));
    }
    assert!(!lim.admit(5_000, r4k));
    // One operation refills in 1 ms; 4096 B in 4.096 ms: the bandwidth decides.
    assert_eq!(lim.wait_ns(5_000, r4k), 1_000_000);
    lim.refund(r4k);
    assert_eq!(lim.bucket(0, 5_000).unwrap().0.tokens(0), 1);
    assert_eq!(lim.bucket(3, 5_000).unwrap().0.tokens(0), 65_536 - 7 * 4096);
    // 8 × 4096 B = 32768 B take 32.768 ms to refill at 1 MB/s.
    assert!(lim.admit(5_000 + 1_000_000, r4k));
    assert_eq!(
        lim.bucket(3, 5_000 + 1_000_000)
            .unwrap()
            .0
            .tokens(1_000_000),
        65_536 - 8 * 4096 + 1000
    );
}
