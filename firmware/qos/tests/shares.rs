//! A capped domain shared by several schedulers (one per core, issue 17): each scheduler's
//! demand on the domain (the weights of its busy flows, [`Scheduler::domain_demand`]) is
//! kept exactly as commands come and go, and each takes its weighted part of the cap
//! ([`cap_share`], [`Scheduler::set_share`]), so that flows get the same service whichever
//! scheduler holds them and the backend never holds more than the cap.

use keel_qos::{Admit, Cost, Dir, DomainId, FlowId, Scheduler, Share, cap_share};
use proptest::prelude::*;
use std::collections::VecDeque;

const READ4K: Cost = Cost {
    dir: Dir::Read,
    bytes: 4096,
};

/// Every scheduler's part from (demand, want, in flight) triples.
fn parts(cap: u32, all: &[(u32, u32, u32)]) -> Vec<u32> {
    let all: Vec<Share> = all
        .iter()
        .map(|&(demand, want, inflight)| Share {
            demand,
            want,
            inflight,
        })
        .collect();
    (0..all.len()).map(|i| cap_share(cap, i, &all)).collect()
}

#[test]
fn cap_share_is_the_weighted_part_rounded_down() {
    // Five flows on one core, three on the other, every one deep, cap 64: 40 + 24.
    assert_eq!(parts(64, &[(5, 640, 0), (3, 384, 0)]), [40, 24]);
    // Alone: the whole cap, whatever it has now.
    assert_eq!(parts(64, &[(4, 10, 0)]), [64]);
    assert_eq!(parts(64, &[(4, 10, 0), (0, 0, 0)]), [64, 1]);
    // A tiny part still gets one command; no demand of its own: one (its first command
    // starts, then its demand counts).
    assert_eq!(parts(64, &[(1, 100, 0), (999, 5000, 0)]), [1, 63]);
    assert_eq!(parts(64, &[(0, 0, 0), (7, 100, 0)]), [1, 64]);
    assert_eq!(parts(64, &[(0, 0, 0), (0, 0, 0)]), [1, 1]);
    // Rounded down: 64 × 1/3 and 64 × 2/3.
    assert_eq!(parts(64, &[(1, 500, 0), (2, 500, 0)]), [21, 42]);
    // Work-conserving: a QD1 tenant leaves the rest to a deep one; when everyone wants less
    // than the cap, the rest goes by weight.
    assert_eq!(parts(64, &[(1, 1, 0), (1, 128, 0)]), [1, 63]);
    assert_eq!(parts(64, &[(1, 10, 0), (1, 20, 0)]), [27, 37]);
    assert_eq!(
        parts(64, &[(1, 10, 0), (1, 40, 0), (2, 100, 0)]),
        [10, 18, 36]
    );
    // Lowered to the room the others leave while they drain, never below one.
    assert_eq!(parts(64, &[(3, 384, 0), (5, 640, 50)]), [14, 40]);
    assert_eq!(parts(64, &[(3, 384, 0), (5, 640, 64)]), [1, 40]);
    assert_eq!(parts(64, &[(3, 384, 0), (5, 640, 1000)]), [1, 40]);
    // No cap stays no cap.
    assert_eq!(parts(0, &[(1, 5, 0), (1, 5, 0)]), [0, 0]);
    // No overflow at the largest values.
    assert_eq!(
        parts(4096, &[(64_000, u32::MAX, 0), (64_000, u32::MAX, 0)]),
        [2048, 2048]
    );
    assert_eq!(parts(u32::MAX, &[(u32::MAX, u32::MAX, 0)]), [u32::MAX]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Parts computed from the same figures never add up to more than the cap, but for the
    /// one command a busy scheduler whose part rounds to 0 still gets; deep schedulers (each
    /// wants the whole cap) get their weighted part rounded down (or 1); and the parts use
    /// the cap (but for rounding) when the schedulers want that much in all.
    #[test]
    fn parts_never_exceed_the_cap(
        cap in 1u32..=4096,
        all in proptest::collection::vec((1u32..=8000, 1u32..=8192), 1..8),
    ) {
        let triples: Vec<(u32, u32, u32)> = all.iter().map(|&(d, w)| (d, w, 0)).collect();
        let p = parts(cap, &triples);
        let ones = p.iter().filter(|&&x| x == 1).count() as u32;
        let sum: u32 = p.iter().sum();
        prop_assert!(sum <= cap + ones, "{p:?} of {cap} for {all:?}");
        let wants: u64 = all.iter().map(|&(_, w)| u64::from(w)).sum();
        if wants >= u64::from(cap) {
            prop_assert!(u64::from(sum) + all.len() as u64 >= u64::from(cap), "{p:?} of {cap} for {all:?}");
        }
        let total: u64 = all.iter().map(|&(d, _)| u64::from(d)).sum();
        let deep: Vec<(u32, u32, u32)> = all.iter().map(|&(d, _)| (d, cap, 0)).collect();
        for (&(d, _, _), &x) in deep.iter().zip(&parts(cap, &deep)) {
            let exact = u64::from(cap) * u64::from(d) / total;
            prop_assert!(u64::from(x) == exact.max(1) || deep.len() == 1 && x == cap);
        }
    }
}

/// What the test knows of a flow: its weight and its commands in flight.
#[derive(Clone, Copy)]
struct Model {
    flow: FlowId,
    weight: u32,
    live: bool,
    inflight: u32,
}

fn expected_demand(s: &Scheduler, flows: &[Model]) -> u32 {
    flows
        .iter()
        .filter(|m| m.live)
        .filter(|m| m.inflight > 0 || s.flow_stats(m.flow).unwrap().queued > 0)
        .map(|m| m.weight)
        .sum()
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    Next,
    Finish(usize),
    Busy(usize),
    NextStep(usize),
    Remove(usize),
    Weight(usize, u32),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4).prop_map(Op::Enqueue),
        3 => Just(Op::Next),
        3 => (0usize..64).prop_map(Op::Finish),
        1 => (0usize..64).prop_map(Op::Busy),
        1 => (0usize..64).prop_map(Op::NextStep),
        1 => (0usize..64).prop_map(Op::Remove),
        1 => ((0usize..4), 1u32..=1000).prop_map(|(f, w)| Op::Weight(f, w)),
        1 => (0usize..4).prop_map(Op::Drop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens to commands (start at once, wait, start later, finish, refused as
    /// busy, a next step, taken out, a weight change, a flow removed with commands at the
    /// backend), a domain's demand is the sum of the weights of its flows with commands
    /// waiting or in flight.
    #[test]
    fn demand_is_the_weight_of_busy_flows(cap in 0u32..6, ops in proptest::collection::vec(op(), 1..300)) {
        let mut s = Scheduler::new(64);
        let d = s.add_domain(cap).unwrap();
        let mut flows: Vec<Model> = (0..4u32)
            .map(|i| Model { flow: s.add_flow(d, i + 1, &[]).unwrap(), weight: i + 1, live: true, inflight: 0 })
            .collect();
        // Handles: free, waiting, or started (with their flow index).
        let mut free: Vec<u32> = (0..64).rev().collect();
        let mut waiting: Vec<(u32, usize)> = Vec::new();
        let mut started: Vec<(u32, usize)> = Vec::new();
        let index = |flows: &[Model], f: FlowId| flows.iter().position(|m| m.live && m.flow == f).unwrap();
        for op in ops {
            match op {
                Op::Enqueue(fi) => {
                    if !flows[fi].live { continue; }
                    let Some(h) = free.pop() else { continue };
                    match s.enqueue(0, flows[fi].flow, h, READ4K).unwrap() {
                        Admit::Now => { flows[fi].inflight += 1; started.push((h, fi)); }
                        Admit::Queued => waiting.push((h, fi)),
                    }
                }
                Op::Next => {
                    while let Some((h, f)) = s.next(0) {
                        let fi = index(&flows, f);
                        waiting.retain(|&(x, _)| x != h);
                        flows[fi].inflight += 1;
                        started.push((h, fi));
                    }
                }
                Op::Finish(k) if !started.is_empty() => {
                    let (h, fi) = started.remove(k % started.len());
                    if flows[fi].live {
                        s.finished(flows[fi].flow);
                        flows[fi].inflight -= 1;
                    } else {
                        s.completed(d);
                    }
                    free.push(h);
                }
                Op::Busy(k) if !started.is_empty() => {
                    let i = k % started.len();
                    let (h, fi) = started[i];
                    if !flows[fi].live { continue; }
                    started.remove(i);
                    s.requeue_busy(flows[fi].flow, h, READ4K).unwrap();
                    flows[fi].inflight -= 1;
                    waiting.push((h, fi));
                }
                Op::NextStep(k) if !started.is_empty() => {
                    let i = k % started.len();
                    let (h, fi) = started[i];
                    if !flows[fi].live { continue; }
                    started.remove(i);
                    // The step completes, then the command waits for its next step.
                    s.completed(d);
                    s.release(flows[fi].flow);
                    flows[fi].inflight -= 1;
                    s.requeue_next_step(flows[fi].flow, h, READ4K).unwrap();
                    waiting.push((h, fi));
                }
                Op::Remove(k) if !waiting.is_empty() => {
                    let (h, _) = waiting.remove(k % waiting.len());
                    prop_assert!(s.remove(h));
                    free.push(h);
                }
                Op::Weight(fi, w) => {
                    if !flows[fi].live { continue; }
                    s.set_weight(flows[fi].flow, w).unwrap();
                    flows[fi].weight = w;
                }
                Op::Drop(fi) => {
                    // Its waiting commands go first (as a queue teardown does), then the
                    // flow, with whatever it has at the backend.
                    if !flows[fi].live { continue; }
                    for &(h, _) in waiting.iter().filter(|&&(_, f)| f == fi) {
                        prop_assert!(s.remove(h));
                        free.push(h);
                    }
                    waiting.retain(|&(_, f)| f != fi);
                    s.remove_flow(flows[fi].flow).unwrap();
                    flows[fi].live = false;
                }
                _ => {}
            }
            prop_assert_eq!(s.domain_demand(d), expected_demand(&s, &flows));
        }
        // Everything finishes: no demand is left.
        for (h, _) in waiting.drain(..) {
            prop_assert!(s.remove(h));
        }
        for (_, fi) in started.drain(..) {
            if flows[fi].live {
                s.finished(flows[fi].flow);
            } else {
                s.completed(d);
            }
        }
        prop_assert_eq!(s.domain_demand(d), 0);
        prop_assert_eq!(s.inflight(d), 0);
    }
}

/// One core of the simulation: a scheduler, its flows (`depth` handles each), what they
/// completed.
struct Core {
    s: Scheduler,
    d: DomainId,
    flows: Vec<FlowId>,
    free: Vec<u32>,
    done: Vec<u64>,
}

/// Cores whose flows (weights) keep `depth` commands outstanding each on one drive that
/// completes its oldest command every tick (a FIFO: the same latency for every command).
/// Each pass, every core first takes in its flows' new commands; then (when `share`) each
/// publishes its demand and what it has at the drive and takes its part of the cap
/// ([`cap_share`]) before it starts what it may. Returns the commands each flow completed
/// (in its last `measure` ticks) and the most the drive held.
fn run(
    weights: &[&[u32]],
    cap: u32,
    depth: u32,
    ticks: usize,
    measure: usize,
    share: bool,
) -> (Vec<Vec<u64>>, usize) {
    let mut cores: Vec<Core> = weights
        .iter()
        .map(|w| {
            let handles = w.len() as u32 * depth;
            let mut s = Scheduler::new(handles);
            let d = s.add_domain(cap).unwrap();
            if share {
                // Idle with others about: one command until its demand counts.
                s.set_share(d, cap_share(cap, 0, &[Share::default()]))
                    .unwrap();
            }
            let flows = w.iter().map(|&w| s.add_flow(d, w, &[]).unwrap()).collect();
            Core {
                s,
                d,
                flows,
                free: (0..handles).rev().collect(),
                done: vec![0; w.len()],
            }
        })
        .collect();
    // The drive: (core, flow index, handle), oldest first.
    let mut drive: VecDeque<(usize, usize, u32)> = VecDeque::new();
    let mut most = 0;
    for tick in 0..ticks {
        if let Some((c, fi, h)) = drive.pop_front() {
            let core = &mut cores[c];
            core.s.finished(core.flows[fi]);
            if tick >= ticks - measure {
                core.done[fi] += 1;
            }
            core.free.push(h);
        }
        for (c, core) in cores.iter_mut().enumerate() {
            let mut spare = std::mem::take(&mut core.free);
            spare.sort_unstable();
            for h in spare {
                let fi = (h / depth) as usize;
                if let Admit::Now = core.s.enqueue(0, core.flows[fi], h, READ4K).unwrap() {
                    drive.push_back((c, fi, h));
                }
            }
        }
        let table: Vec<Share> = cores
            .iter()
            .map(|c| Share {
                demand: c.s.domain_demand(c.d),
                want: c.s.domain_want(c.d),
                inflight: c.s.inflight(c.d),
            })
            .collect();
        for (c, core) in cores.iter_mut().enumerate() {
            if share {
                core.s.set_share(core.d, cap_share(cap, c, &table)).unwrap();
            }
            while let Some((h, f)) = core.s.next(0) {
                let fi = core.flows.iter().position(|&x| x == f).unwrap();
                drive.push_back((c, fi, h));
            }
            most = most.max(drive.len());
        }
    }
    (cores.into_iter().map(|c| c.done).collect(), most)
}

fn spread(v: &[f64]) -> f64 {
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    max / min.max(1.0)
}

/// Eight flows of weight 1 at QD128, five on one core and three on the other, on a drive
/// capped at 64 (the QEMU test `eight_connections_share_a_saturated_drive_evenly` at
/// `--smp 2`): with shares every flow gets the same service; the drive never holds more than
/// the cap, also while the cores start up. Without shares each core fills the cap on its own:
/// the drive holds twice the cap and a flow of the three gets 5/3 of a flow of the five.
#[test]
fn flows_share_a_drive_evenly_across_cores() {
    let (done, most) = run(&[&[1; 5], &[1; 3]], 64, 128, 40_000, 30_000, true);
    let per_flow: Vec<f64> = done.concat().iter().map(|&n| n as f64).collect();
    assert!(spread(&per_flow) <= 1.05, "{done:?}");
    assert!(most <= 64, "the drive held {most}");

    let (done, most) = run(&[&[1; 5], &[1; 3]], 64, 128, 40_000, 30_000, false);
    let per_flow: Vec<f64> = done.concat().iter().map(|&n| n as f64).collect();
    assert!(spread(&per_flow) >= 1.5, "{done:?}");
    assert_eq!(most, 128);
}

/// Weights hold across cores: one flow of weight 3 alone on a core, three of weight 1 on
/// another: the weight-3 flow gets three times a weight-1 flow's service.
#[test]
fn weights_hold_across_cores() {
    let (done, most) = run(&[&[3], &[1, 1, 1]], 64, 128, 40_000, 30_000, true);
    let heavy = done[0][0] as f64;
    for &n in &done[1] {
        let r = heavy / n as f64;
        assert!((2.8..=3.2).contains(&r), "{done:?}");
    }
    assert!(most <= 64, "the drive held {most}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any weights on up to four cores, any cap: the drive holds at most the cap plus the one
    /// command each core gets at least, and every flow's service is proportional to its
    /// weight within 10% (where the cap leaves each core more than a few commands and no
    /// flow's queue is shallower than its part).
    #[test]
    fn service_follows_weights_on_any_cores(
        weights in proptest::collection::vec(proptest::collection::vec(1u32..=8, 1..4), 2..5),
        cap in 16u32..=128,
    ) {
        let w: Vec<&[u32]> = weights.iter().map(|v| v.as_slice()).collect();
        let (done, most) = run(&w, cap, 64, 30_000, 20_000, true);
        prop_assert!(most <= (cap + weights.len() as u32) as usize, "held {most} of {cap}");
        let total_w: u32 = weights.iter().flatten().sum();
        // Where every core's part is many commands, rounding costs little; and where every
        // flow's queue is deeper than its part (else it takes less, and the others more).
        let fine = weights.iter().all(|c| cap * c.iter().sum::<u32>() / total_w >= 8)
            && weights.iter().flatten().all(|&w| cap * w / total_w < 48);
        if fine {
            let per_weight: Vec<f64> = weights
                .iter()
                .flatten()
                .zip(done.iter().flatten())
                .map(|(&w, &n)| n as f64 / f64::from(w))
                .collect();
            // A core's part is rounded down to whole commands: it may lose up to one command
            // of its exact part (1/9.9 for the smallest part allowed here), beyond 5% noise.
            // (Found by CI: parts of 9.9 commands gave a spread of 1.104 against a flat 1.10.)
            let smallest = weights
                .iter()
                .map(|c| f64::from(cap) * f64::from(c.iter().sum::<u32>()) / f64::from(total_w))
                .fold(f64::MAX, f64::min);
            let allowed = 1.05 + 1.0 / smallest;
            prop_assert!(
                spread(&per_weight) <= allowed,
                "{weights:?} cap {cap}: {done:?} (spread {}, allowed {allowed})",
                spread(&per_weight)
            );
        }
    }
}
