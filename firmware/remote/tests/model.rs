//! Property test: random workloads under random faults, checked against a model.
//!
//! Each case builds one or two paths (one target with two ports, or two targets sharing the
//! namespace) with random transport parameters (MDTS, in-capsule size, MAXH2CDATA, digests,
//! segment sizes, queue depth, policy, ANA), runs a random mix of reads, writes, write
//! zeroes and deallocates, and injects random faults: connection resets, refused connects,
//! partitions, target crashes and outages, ANA state changes. Then it heals everything and
//! checks that
//! - every request completed exactly once (the workload panics on a second or unknown
//!   completion, and everything drains within the loss timeouts);
//! - the only errors are path errors (no usable path within `ctrl_loss_tmo`);
//! - every read returned data some write put there, and after the run every block of the
//!   target's medium holds its last acknowledged data, or the data of a write that failed
//!   after it (which may or may not have landed).
//!
//! `KEEL_REMOTE_CASES=N` runs more cases (CI runs the default 12).

mod common;
use common::*;
use keel_nvme::log::ana::AnaState;
use keel_nvmf_tcp::Digests;
use keel_remote::Policy;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Fault {
    ResetOne(usize),
    ResetAll(usize),
    Refuse(usize, u64),
    Partition(usize, u64),
    Restart(usize),
    Down(usize, u64),
    Ana(usize, u8),
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    two_paths: bool,
    two_targets: bool,
    mdts: u8,
    in_capsule: u32,
    maxh2cdata: u32,
    digests: (bool, bool),
    segment: usize,
    depth: u16,
    queue_depth_policy: bool,
    ana: bool,
    block_size: u32,
    faults: Vec<(u64, Fault)>,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => (0usize..2).prop_map(Fault::ResetOne),
        2 => (0usize..2).prop_map(Fault::ResetAll),
        1 => (0usize..2, 50u64..1500).prop_map(|(p, d)| Fault::Refuse(p, d)),
        2 => (0usize..2, 50u64..4000).prop_map(|(p, d)| Fault::Partition(p, d)),
        1 => (0usize..2).prop_map(Fault::Restart),
        1 => (0usize..2, 100u64..4000).prop_map(|(p, d)| Fault::Down(p, d)),
        2 => (0usize..2, 0u8..5).prop_map(|(p, s)| Fault::Ana(p, s)),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (any::<u64>(), any::<bool>(), any::<bool>()),
        prop_oneof![Just(0u8), Just(1), Just(2), Just(5)],
        prop_oneof![Just(0u32), Just(4096), Just(8192)],
        prop_oneof![Just(4096u32), Just(16384), Just(131072)],
        (any::<bool>(), any::<bool>()),
        prop_oneof![1 => Just(7usize), 2 => Just(100), 3 => Just(1500), 3 => Just(9000)],
        prop_oneof![Just(1u16), Just(4), Just(16)],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(512u32), Just(4096)],
        proptest::collection::vec((0u64..4500, fault()), 0..8),
    )
        .prop_map(
            |(
                (seed, two_paths, two_targets),
                mdts,
                in_capsule,
                maxh2cdata,
                digests,
                segment,
                depth,
                qd,
                ana,
                block_size,
                mut faults,
            )| {
                faults.sort_by_key(|f| f.0);
                Case {
                    seed,
                    two_paths,
                    two_targets,
                    mdts,
                    in_capsule,
                    maxh2cdata,
                    digests,
                    segment,
                    depth,
                    queue_depth_policy: qd,
                    ana,
                    block_size,
                    faults,
                }
            },
        )
}

fn run(c: Case) {
    let blocks = if c.block_size == 512 { 2048 } else { 512 };
    let mut disk = Disk::new(c.block_size, blocks);
    let mut net = SimNet::new(c.seed);
    net.faults.segment = c.segment;
    let scfg = ServerCfg {
        mdts: c.mdts,
        in_capsule: c.in_capsule,
        maxh2cdata: c.maxh2cdata,
        ana: c.ana,
        ..ServerCfg::default()
    };
    let paths = if c.two_paths {
        vec![addr(1), addr(2)]
    } else {
        vec![addr(1)]
    };
    // Server index serving each path.
    let server_of: Vec<usize> = if c.two_paths && c.two_targets {
        net.add(Server::new(vec![addr(1)], &disk, scfg));
        net.add(Server::new(vec![addr(2)], &disk, scfg));
        vec![0, 1]
    } else {
        net.add(Server::new(paths.clone(), &disk, scfg));
        vec![0, 0]
    };
    let mut cfg = test_config(paths.clone());
    cfg.queue_depth = c.depth;
    cfg.digests = Digests {
        header: c.digests.0,
        data: c.digests.1,
    };
    if c.queue_depth_policy {
        cfg.policy = Policy::QueueDepth;
    }
    let mut rig = Rig::new(net, cfg);
    rig.connect();
    let mut w = Workload::new(c.seed, c.block_size, blocks);
    w.max_blocks = 80;
    w.max_inflight = 16;
    let mut downs: Vec<(u64, usize)> = Vec::new();
    let start = rig.now;
    let mut next = 0;
    let end = start + 5_000 * MS;
    while rig.now < end {
        while next < c.faults.len() && rig.now >= start + c.faults[next].0 * MS {
            let now = rig.now;
            let pick = |p: usize| paths[p % paths.len()];
            match c.faults[next].1 {
                Fault::ResetOne(p) => {
                    rig.net.reset_one(pick(p));
                }
                Fault::ResetAll(p) => rig.net.reset(pick(p)),
                Fault::Refuse(p, d) => rig.net.faults.refuse.push((pick(p), now + d * MS)),
                Fault::Partition(p, d) => rig.net.faults.partition.push((pick(p), now + d * MS)),
                Fault::Restart(p) => rig.net.restart(server_of[p % paths.len()]),
                Fault::Down(p, d) => {
                    let s = server_of[p % paths.len()];
                    rig.net.set_alive(s, false);
                    downs.push((now + d * MS, s));
                }
                Fault::Ana(p, s) => {
                    let st = [
                        AnaState::Optimized,
                        AnaState::NonOptimized,
                        AnaState::Inaccessible,
                        AnaState::Change,
                        AnaState::Optimized,
                    ][s as usize];
                    let a = pick(p);
                    rig.net.servers[server_of[p % paths.len()]].set_ana(a, st, now);
                }
            }
            next += 1;
        }
        downs.retain(|&(t, s)| {
            if rig.now >= t {
                rig.net.set_alive(s, true);
                false
            } else {
                true
            }
        });
        w.step(&mut rig);
    }
    // Heal everything; paths that gave up are revived.
    rig.net.faults.refuse.clear();
    rig.net.faults.partition.clear();
    for (_, s) in downs.drain(..) {
        rig.net.set_alive(s, true);
    }
    for (i, a) in paths.iter().enumerate() {
        let now = rig.now;
        rig.net.servers[server_of[i]].set_ana(*a, AnaState::Optimized, now);
    }
    // Everything submitted completes within the loss timeouts.
    w.drain(&mut rig, 3_000 + 1_000 + 1_000);
    rig.vol.reconnect(rig.now);
    for _ in 0..800 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 5_000);
    assert_eq!(
        w.failed, w.path_errors,
        "only path errors may reach the caller"
    );
    assert_eq!(w.completed + w.inflight.len() as u64, w.completed);
    w.verify(&mut disk);
    // After healing, the volume serves again.
    let s = rig.vol.snapshot().unwrap();
    assert!(
        s.paths
            .iter()
            .any(|p| p.state == keel_remote::PathState::Live),
        "{s:?}"
    );
    assert!(w.acked_writes > 0 && w.reads_checked > 0);
}

fn cases() -> u32 {
    std::env::var("KEEL_REMOTE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_workloads_under_random_faults(c in case()) {
        run(c);
    }
}

#[test]
fn a_fixed_heavy_case() {
    // Two targets, every fault kind, small MDTS, R2T writes, tiny segments, digests.
    run(Case {
        seed: 99,
        two_paths: true,
        two_targets: true,
        mdts: 1,
        in_capsule: 0,
        maxh2cdata: 4096,
        digests: (true, true),
        segment: 100,
        depth: 4,
        queue_depth_policy: false,
        ana: true,
        block_size: 512,
        faults: vec![
            (300, Fault::ResetOne(0)),
            (800, Fault::Partition(1, 2500)),
            (1200, Fault::Restart(0)),
            (2000, Fault::Ana(0, 2)),
            (2600, Fault::Ana(0, 0)),
            (3000, Fault::Down(1, 3500)),
            (3500, Fault::Refuse(0, 600)),
            (4200, Fault::ResetAll(0)),
            (4400, Fault::ResetOne(1)),
        ],
    });
}
