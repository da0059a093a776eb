//! Scheduler properties over long simulated runs (issue 16 "Proof"): rates stay within ±2% of
//! their limits, bursts within their bounds, weights are honoured under saturation, no flow
//! starves, a QD1 flow never waits behind a deep one, sharing is work-conserving, and each
//! flow's commands start in arrival order.
//!
//! The simulator is exact: the clock jumps to the next event (a completion or the moment a
//! limited command may start, from `next_wakeup`), so runs of minutes of simulated time take
//! milliseconds.

use keel_qos::{Admit, Cost, Dir, FlowId, LimiterStats, Limits, Rate, Scheduler};
use proptest::prelude::*;
use std::collections::{BTreeMap, VecDeque};

const READ4K: Cost = Cost {
    dir: Dir::Read,
    bytes: 4096,
};

/// Starts everything that may start at `now`, returning (handle, flow) in order.
fn drain(s: &mut Scheduler, now: u64) -> Vec<(u32, FlowId)> {
    let mut v = Vec::new();
    while let Some(x) = s.next(now) {
        v.push(x);
    }
    v
}

/// One flow with an endless backlog and an instant backend: returns the start times.
fn saturate_one(limits: Limits, cost: Cost, duration_ns: u64) -> Vec<u64> {
    let mut s = Scheduler::new(64);
    let d = s.add_domain(0).unwrap();
    let l = s.add_limiter(limits, 0).unwrap();
    let f = s.add_flow(d, 1, &[l]).unwrap();
    let mut free: Vec<u32> = (0..64).collect();
    let mut starts = Vec::new();
    let mut now = 0;
    while now <= duration_ns {
        // Keep the flow's queue full.
        while let Some(h) = free.pop() {
            match s.enqueue(now, f, h, cost).unwrap() {
                Admit::Now => {
                    starts.push(now);
                    s.completed(d);
                    free.push(h);
                    break;
                }
                Admit::Queued => {}
            }
        }
        for (h, _) in drain(&mut s, now) {
            starts.push(now);
            s.completed(d);
            free.push(h);
        }
        if !free.is_empty() {
            continue; // refill the queue at the same instant
        }
        now = s.next_wakeup(now).expect("a limited flow has a wake-up");
    }
    starts
}

fn within(measured: f64, expected: f64, tolerance: f64) -> bool {
    (measured - expected).abs() <= expected * tolerance
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn iops_limits_hold_within_2_percent(per_sec in 5u64..200_000, burst_frac in 1u64..50) {
        let burst = (per_sec * burst_frac / 100).max(1);
        // Long enough for 20000 commands (or 60 s for slow limits).
        let secs = (20_000 / per_sec).clamp(1, 60);
        let limits = Limits { iops: Some(Rate::new(per_sec).with_burst(burst)), ..Limits::NONE };
        let starts = saturate_one(limits, READ4K, secs * 1_000_000_000);
        let expected = (per_sec * secs + burst) as f64;
        prop_assert!(within(starts.len() as f64, expected, 0.02),
            "{} starts, expected {expected}", starts.len());
    }

    #[test]
    fn bandwidth_limits_hold_with_large_requests(mib_per_sec in 1u64..400, kib in 4u64..1024) {
        // A request larger than the burst still passes, and is charged in full.
        let per_sec = mib_per_sec << 20;
        let cost = Cost { dir: Dir::Write, bytes: kib << 10 };
        let limits = Limits {
            write_bps: Some(Rate::new(per_sec).with_burst(64 << 10)),
            ..Limits::NONE
        };
        let secs = 20;
        let starts = saturate_one(limits, cost, secs * 1_000_000_000);
        let bytes = starts.len() as f64 * cost.bytes as f64;
        // At most one request's worth over the limit (the debt of the last one).
        let expected = (per_sec * secs) as f64;
        prop_assert!(within(bytes, expected, 0.02) || (bytes - expected).abs() <= cost.bytes as f64 + (64 << 10) as f64,
            "{bytes} bytes, expected {expected}");
    }

    #[test]
    fn bursts_stay_within_their_bounds(per_sec in 10u64..10_000, burst in 1u64..500) {
        let limits = Limits { iops: Some(Rate::new(per_sec).with_burst(burst)), ..Limits::NONE };
        let starts = saturate_one(limits, READ4K, 5_000_000_000);
        // In any window of w ns at most burst + per_sec * w / 1e9 (+1 for the edge) start.
        for w in [1_000_000u64, 10_000_000, 100_000_000, 1_000_000_000] {
            let bound = burst + per_sec * w / 1_000_000_000 + 1;
            let mut j = 0;
            for i in 0..starts.len() {
                while starts[i] - starts[j] >= w { j += 1; }
                prop_assert!((i - j + 1) as u64 <= bound,
                    "{} starts within {w} ns, bound {bound}", i - j + 1);
            }
        }
    }

    #[test]
    fn weights_are_honoured_under_saturation(weights in proptest::collection::vec(1u32..20, 2..5),
                                             capacity in 1u32..16) {
        // Every flow has an endless backlog; the backend takes `capacity` commands at once and
        // each takes 100 µs.
        let n = weights.len();
        let mut s = Scheduler::new(4096);
        let d = s.add_domain(capacity).unwrap();
        let flows: Vec<FlowId> = weights.iter().map(|w| s.add_flow(d, *w, &[]).unwrap()).collect();
        let mut next_handle = 0u32;
        let mut free: Vec<u32> = Vec::new();
        let mut done_at: BTreeMap<(u64, u32), FlowId> = BTreeMap::new();
        let mut started = vec![0u64; n];
        let mut now = 0u64;
        let mut alloc = |free: &mut Vec<u32>| free.pop().unwrap_or_else(|| { next_handle += 1; next_handle - 1 });
        // Fill each flow with 200 commands.
        for f in &flows {
            for _ in 0..200 {
                let h = alloc(&mut free);
                if s.enqueue(now, *f, h, READ4K).unwrap() == Admit::Now {
                    started[f.0 as usize] += 1;
                    done_at.insert((now + 100_000, h), *f);
                }
            }
        }
        let total = 20_000u64;
        while started.iter().sum::<u64>() < total {
            for (h, f) in drain(&mut s, now) {
                started[f.0 as usize] += 1;
                done_at.insert((now + 100_000, h), f);
            }
            let (&(t, h), &f) = done_at.iter().next().unwrap();
            done_at.remove(&(t, h));
            now = t;
            s.completed(d);
            // The finished command's flow submits another (endless backlog).
            free.push(h);
            let h2 = alloc(&mut free);
            if s.enqueue(now, f, h2, READ4K).unwrap() == Admit::Now {
                started[f.0 as usize] += 1;
                done_at.insert((now + 100_000, h2), f);
            }
        }
        let wsum: u32 = weights.iter().sum();
        let all: u64 = started.iter().sum();
        for i in 0..n {
            let share = started[i] as f64 / all as f64;
            let want = weights[i] as f64 / wsum as f64;
            prop_assert!((share - want).abs() <= 0.02 + want * 0.03,
                "flow {i} weight {} got {share:.4}, want {want:.4} ({started:?})", weights[i]);
        }
    }

    #[test]
    fn each_flow_starts_in_arrival_order(ops in proptest::collection::vec((0u8..4, 0usize..3), 1..400)) {
        // Random enqueues, starts, busy refusals, completions and removals over three flows
        // sharing a domain of two slots, against a model of one FIFO per flow.
        let mut s = Scheduler::new(1024);
        let d = s.add_domain(2).unwrap();
        let flows: Vec<FlowId> = (0..3).map(|_| s.add_flow(d, 1, &[]).unwrap()).collect();
        let mut model: Vec<VecDeque<u32>> = vec![VecDeque::new(); 3];
        let mut running: Vec<(u32, usize)> = Vec::new();
        let mut next_h = 0u32;
        for (op, fi) in ops {
            match op {
                0 => {
                    let h = next_h; next_h += 1;
                    match s.enqueue(0, flows[fi], h, READ4K).unwrap() {
                        Admit::Now => { prop_assert!(model[fi].is_empty()); running.push((h, fi)) }
                        Admit::Queued => model[fi].push_back(h),
                    }
                }
                1 => {
                    for (h, f) in drain(&mut s, 0) {
                        let fi = f.0 as usize;
                        prop_assert_eq!(model[fi].pop_front(), Some(h));
                        running.push((h, fi));
                    }
                }
                2 => {
                    // The backend refuses the newest running command of this flow as busy.
                    if let Some(p) = running.iter().rposition(|r| r.1 == fi) {
                        let (h, fi) = running.remove(p);
                        s.requeue_busy(flows[fi], h, READ4K).unwrap();
                        model[fi].push_front(h);
                    } else if let Some(p) = running.iter().position(|_| true) {
                        running.remove(p);
                        s.completed(d);
                    }
                }
                _ => {
                    // Remove the middle waiting command of the flow (an Abort).
                    if !model[fi].is_empty() {
                        let k = model[fi].len() / 2;
                        let h = model[fi].remove(k).unwrap();
                        prop_assert!(s.remove(h));
                        prop_assert!(!s.is_queued(h));
                    }
                }
            }
            let waiting: usize = model.iter().map(VecDeque::len).sum();
            prop_assert_eq!(s.waiting() as usize, waiting);
        }
    }
}

/// A QD1 reader beside a writer that keeps 256 commands queued, equal weights, on a backend
/// that takes 8 at once and 200 µs each: the reader's command never waits for more than the
/// next free slot, i.e. never behind the writer's backlog.
#[test]
fn qd1_never_waits_behind_qd256() {
    let mut s = Scheduler::new(1024);
    let d = s.add_domain(8).unwrap();
    let a = s.add_flow(d, 1, &[]).unwrap();
    let b = s.add_flow(d, 1, &[]).unwrap();
    let service = 200_000u64;
    let mut done_at: BTreeMap<(u64, u32), FlowId> = BTreeMap::new();
    let mut now = 0;
    for h in 1..=256u32 {
        if s.enqueue(0, b, h, READ4K).unwrap() == Admit::Now {
            done_at.insert((service, h), b);
        }
    }
    // The reader's single command (handle 0), submitted again as soon as it completes.
    let mut a_submitted = 0u64;
    assert_eq!(s.enqueue(0, a, 0, READ4K).unwrap(), Admit::Queued);
    let mut waits = Vec::new();
    while waits.len() < 2000 {
        for (h, f) in drain(&mut s, now) {
            if f == a {
                waits.push(now - a_submitted);
            }
            done_at.insert((now + service, h), f);
        }
        let (&(t, h), &f) = done_at.iter().next().unwrap();
        done_at.remove(&(t, h));
        now = t;
        s.completed(d);
        let admit = s.enqueue(now, f, h, READ4K).unwrap();
        if f == a {
            a_submitted = now;
        }
        if admit == Admit::Now {
            if f == a {
                waits.push(0);
            }
            done_at.insert((now + service, h), f);
        }
    }
    let worst = *waits.iter().max().unwrap();
    // The next free slot comes within one service time of 8 in flight.
    assert!(worst <= service, "the QD1 reader waited {worst} ns");
}

/// A flow held back by its limit does not hold back the other flow of its domain: the
/// backend stays fully used.
#[test]
fn sharing_is_work_conserving() {
    let mut s = Scheduler::new(1024);
    let d = s.add_domain(4).unwrap();
    let slow = s
        .add_limiter(
            Limits {
                iops: Some(Rate::new(100).with_burst(1)),
                ..Limits::NONE
            },
            0,
        )
        .unwrap();
    let a = s.add_flow(d, 10, &[slow]).unwrap();
    let b = s.add_flow(d, 1, &[]).unwrap();
    let service = 100_000u64; // 4 slots / 100 µs = 40000 per second
    let mut done_at: BTreeMap<(u64, u32), FlowId> = BTreeMap::new();
    let mut next_h = 0u32;
    for f in [a, b] {
        for _ in 0..100 {
            if s.enqueue(0, f, next_h, READ4K).unwrap() == Admit::Now {
                done_at.insert((service, next_h), f);
            }
            next_h += 1;
        }
    }
    let mut now = 0;
    let mut count = [0u64; 2];
    while now < 1_000_000_000 {
        for (h, f) in drain(&mut s, now) {
            count[f.0 as usize] += 1;
            done_at.insert((now + service, h), f);
        }
        let next_done = done_at.keys().next().map(|k| k.0);
        let wake = s.next_wakeup(now);
        let t = match (next_done, wake) {
            (Some(x), Some(y)) => x.min(y),
            (Some(x), None) => x,
            (None, Some(y)) => y,
            (None, None) => break,
        };
        now = t;
        while let Some((&(t2, h), &f)) = done_at.iter().next() {
            if t2 > now {
                break;
            }
            done_at.remove(&(t2, h));
            s.completed(d);
            if s.enqueue(now, f, h, READ4K).unwrap() == Admit::Now {
                count[f.0 as usize] += 1;
                done_at.insert((now + service, h), f);
            }
        }
    }
    // The limited flow gets its 100/s (plus the burst of 1); the other takes the rest of
    // the 40000/s the backend can do.
    assert!(
        count[0] >= 99 && count[0] <= 102,
        "limited flow: {}",
        count[0]
    );
    let total = count[0] + count[1];
    assert!(total >= 39_900, "backend under-used: {total} in 1 s");
    assert!(s.flow_stats(a).unwrap().throttled_ns > 900_000_000);
}

/// A busy refusal puts the command back first in line, charged once.
#[test]
fn busy_refusal_keeps_place_and_charge() {
    let mut s = Scheduler::new(16);
    let d = s.add_domain(0).unwrap();
    let l = s
        .add_limiter(
            Limits {
                iops: Some(Rate::new(10).with_burst(2)),
                ..Limits::NONE
            },
            0,
        )
        .unwrap();
    let f = s.add_flow(d, 1, &[l]).unwrap();
    assert_eq!(s.enqueue(0, f, 0, READ4K).unwrap(), Admit::Now);
    assert_eq!(s.enqueue(0, f, 1, READ4K).unwrap(), Admit::Now);
    assert_eq!(s.enqueue(0, f, 2, READ4K).unwrap(), Admit::Queued);
    // Command 1 is refused as busy: it goes back ahead of 2 and is not charged again.
    s.requeue_busy(f, 1, READ4K).unwrap();
    assert_eq!(s.next(0), None, "saturated until a completion");
    s.completed(d);
    assert_eq!(s.next(0), Some((1, f)));
    // 2 waits for the bucket: 2 tokens were spent on commands 0 and 1 only.
    assert_eq!(s.next(0), None);
    assert_eq!(s.next(100_000_000), Some((2, f)));
    assert_eq!(s.limiter_stats(l).unwrap().admitted_ops, 3);
}

/// `admit_now` starts what `enqueue` would start at once, charged the same, and otherwise
/// changes nothing: no place taken, no charge, nothing counted in flight.
#[test]
fn admit_now_starts_only_what_would_start_at_once() {
    let mut s = Scheduler::new(16);
    let d = s.add_domain(2).unwrap();
    let l = s
        .add_limiter(
            Limits {
                iops: Some(Rate::new(10).with_burst(3)),
                ..Limits::NONE
            },
            0,
        )
        .unwrap();
    let f = s.add_flow(d, 1, &[l]).unwrap();
    assert!(s.admit_now(0, f, READ4K).unwrap());
    assert_eq!(s.enqueue(0, f, 0, READ4K).unwrap(), Admit::Now);
    // The domain is full (2 in flight): refused, nothing changes.
    assert!(!s.admit_now(0, f, READ4K).unwrap());
    assert_eq!((s.inflight(d), s.waiting()), (2, 0));
    s.completed(d);
    // One token left: a command that waits makes the domain's queue non-empty...
    assert!(s.admit_now(0, f, READ4K).unwrap());
    assert_eq!(s.enqueue(0, f, 1, READ4K).unwrap(), Admit::Queued);
    s.completed(d);
    s.completed(d);
    // ...and then nothing overtakes it, though the domain has room.
    assert!(!s.admit_now(0, f, READ4K).unwrap());
    assert_eq!(s.limiter_stats(l).unwrap().admitted_ops, 3);
    assert_eq!(s.next(100_000_000), Some((1, f)));
    assert!(s.admit_now(200_000_000, f, READ4K).unwrap());
    assert!(s.admit_now(0, FlowId(99), READ4K).is_err());
}

/// A flow that was idle while another used the backend alone gets its fair share when it
/// comes back, not the whole backend until it "catches up": no credit is banked while idle.
#[test]
fn idle_flows_bank_no_credit() {
    let mut s = Scheduler::new(4096);
    let d = s.add_domain(1).unwrap();
    let a = s.add_flow(d, 1, &[]).unwrap();
    let b = s.add_flow(d, 1, &[]).unwrap();
    let mut h = 0u32;
    // B alone for 1000 commands, one at a time.
    for _ in 0..1000 {
        s.enqueue(0, b, h, READ4K).unwrap();
        h += 1;
    }
    for _ in 0..999 {
        s.completed(d);
        assert_eq!(s.next(0).map(|x| x.1), Some(b));
    }
    // A arrives with 500; B keeps 500 more queued.
    for _ in 0..500 {
        s.enqueue(0, a, h, READ4K).unwrap();
        h += 1;
        s.enqueue(0, b, h, READ4K).unwrap();
        h += 1;
    }
    let mut got = [0u32; 2];
    for _ in 0..200 {
        s.completed(d);
        let (_, f) = s.next(0).unwrap();
        got[f.0 as usize] += 1;
    }
    assert!(got[0].abs_diff(got[1]) <= 2, "{got:?}");
}

/// A domain's cap changes live (`[qos] drive_max_inflight` pushed): a higher cap starts
/// waiting commands at once, a lower one starts nothing until completions bring the domain
/// below it. Nothing is dropped; order stays arrival order.
#[test]
fn a_domain_cap_changes_live() {
    let mut s = Scheduler::new(16);
    let d = s.add_domain(2).unwrap();
    let f = s.add_flow(d, 1, &[]).unwrap();
    let admits: Vec<Admit> = (0..8)
        .map(|h| s.enqueue(0, f, h, READ4K).unwrap())
        .collect();
    assert_eq!(admits.iter().filter(|a| **a == Admit::Now).count(), 2);
    assert_eq!(s.inflight(d), 2);
    s.set_max_inflight(d, 4).unwrap();
    assert_eq!(drain(&mut s, 0), [(2, f), (3, f)]);
    s.set_max_inflight(d, 1).unwrap();
    for _ in 0..3 {
        s.completed(d);
        assert_eq!(drain(&mut s, 0), [], "still at or above the new cap");
    }
    s.completed(d);
    assert_eq!(drain(&mut s, 0), [(4, f)]);
    s.set_max_inflight(d, 0).unwrap();
    assert_eq!(drain(&mut s, 0), [(5, f), (6, f), (7, f)], "0: no cap");
    assert_eq!(
        s.set_max_inflight(keel_qos::DomainId(9), 1),
        Err(keel_qos::SchedError::Unknown)
    );
}

/// A limiter's counters cover every flow it holds, and keep what a flow admitted through it
/// after the flow leaves it (new limiters, or the flow removed), and what another scheduler
/// carried over to it.
#[test]
fn limiter_counters_follow_flows() {
    let mut s = Scheduler::new(64);
    let d = s.add_domain(0).unwrap();
    let ns = s.add_limiter(Limits::NONE, 0).unwrap();
    let group = s
        .add_limiter(
            Limits {
                iops: Some(Rate::new(1_000_000)),
                ..Limits::NONE
            },
            0,
        )
        .unwrap();
    let a = s.add_flow(d, 1, &[ns, group]).unwrap();
    let b = s.add_flow(d, 1, &[ns]).unwrap();
    let mut h = 0;
    let mut run = |s: &mut Scheduler, f: FlowId, n: u32| {
        for _ in 0..n {
            assert_eq!(s.enqueue(0, f, h, READ4K).unwrap(), Admit::Now);
            s.completed(d);
            h += 1;
        }
    };
    run(&mut s, a, 3);
    run(&mut s, b, 2);
    let ops = |s: &Scheduler, l| s.limiter_stats(l).unwrap().admitted_ops;
    assert_eq!((ops(&s, ns), ops(&s, group)), (5, 3));
    assert_eq!(s.limiter_stats(ns).unwrap().admitted_bytes, 5 * 4096);
    // Flow a leaves the group: the group keeps its 3.
    s.set_flow_limiters(a, &[ns]).unwrap();
    run(&mut s, a, 1);
    assert_eq!((ops(&s, ns), ops(&s, group)), (6, 3));
    // Flow b goes: the namespace limiter keeps its 2.
    s.remove_flow(b).unwrap();
    assert_eq!(ops(&s, ns), 6);
    // Back into the group: counted from now on.
    s.set_flow_limiters(a, &[ns, group]).unwrap();
    run(&mut s, a, 2);
    assert_eq!((ops(&s, ns), ops(&s, group)), (8, 5));
    // What another scheduler's part of the group admitted (a replica that ended) adds to
    // the group's counters, beside what its flows keep counting.
    let carried = LimiterStats {
        admitted_ops: 40,
        admitted_bytes: 40 * 4096,
        throttled_ns: 7,
    };
    s.add_limiter_counts(group, &carried).unwrap();
    run(&mut s, a, 1);
    assert_eq!((ops(&s, ns), ops(&s, group)), (9, 46));
    let g = s.limiter_stats(group).unwrap();
    assert_eq!(g.admitted_bytes, 46 * 4096);
    assert!(g.throttled_ns >= 7);
    s.remove_limiter(ns);
    assert!(s.add_limiter_counts(ns, &carried).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The demands taken in one walk over the flows (`tally_limiter_demands`, once a pass for
    /// the split across cores) are each limiter's own walk (`limiter_demand`), whatever the
    /// flows hold, wait for and have in flight, after flows and a limiter went.
    #[test]
    fn tallied_demands_are_each_limiter_s_demand(
        flows in proptest::collection::vec((0u8..16, 0u32..24, 0u32..24, any::<bool>()), 1..16),
        drop_limiter in 0usize..5,
    ) {
        let mut s = Scheduler::new(4096);
        let d = s.add_domain(8).unwrap();
        let lims: Vec<_> = (0..4)
            .map(|k| {
                let l = if k % 2 == 0 {
                    Limits { iops: Some(Rate::new(1_000_000)), ..Limits::NONE }
                } else {
                    Limits::NONE
                };
                s.add_limiter(l, 0).unwrap()
            })
            .collect();
        let mut h = 0u32;
        let mut made = Vec::new();
        for &(mask, queued, done, remove) in &flows {
            let held: Vec<_> = (0..4).filter(|k| mask & (1 << k) != 0).map(|k| lims[k]).take(3).collect();
            let f = s.add_flow(d, 1, &held).unwrap();
            for _ in 0..queued {
                let _ = s.enqueue(0, f, h, READ4K).unwrap();
                h += 1;
            }
            made.push((f, done, remove));
        }
        // Some start and some of those finish.
        let mut started = Vec::new();
        while let Some((_, f)) = s.next(0) {
            started.push(f);
        }
        for (f, done, _) in &made {
            for _ in 0..*done {
                if let Some(i) = started.iter().position(|x| x == f) {
                    s.finished(started.swap_remove(i));
                }
            }
        }
        for (f, _, remove) in &made {
            if *remove {
                let _ = s.remove_flow(*f);
            }
        }
        if let Some(&l) = lims.get(drop_limiter) {
            s.remove_limiter(l);
        }
        s.tally_limiter_demands();
        for &l in &lims {
            prop_assert_eq!(s.tallied_demand(l), s.limiter_demand(l), "{:?}", l);
        }
    }
}
