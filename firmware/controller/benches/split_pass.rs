//! What the split of QoS limits across cores costs a core's poll pass on the host (a plain
//! timing loop, not a test). Once a pass, a core serving limited namespaces that other cores
//! serve too (`firmware/src/shares.rs` `LimitSharing::tend`) walks
//! `Target::shared_limits_for_pass` (each limited namespace's key: an FNV-1a hash of its subsystem NQN
//! and NSID, and its limiter's demand), publishes each demand in its row, reads the other
//! running cores' rows (16 slots each) for the same key and sets its part
//! (`Target::set_limit_split`). This loop does the same with `n` limited namespaces of one
//! subsystem, the other core's row emulated by 16 atomics with its demand for every key:
//!
//! - `walk-N`: `shared_limits` alone (the keys and demands);
//! - `pass-N`: the whole per-pass work for N limited namespaces (N = 1, 4, 16), its demand
//!   moving every pass (each part changes);
//! - `steady-N`: the same with demands that stay (each part stays);
//! - `none`: a target with no limit (what every pass costs when no `qos` rule is set);
//! - `steady-N-hH`: `steady-N` with H hosts connected (a controller each: a flow per
//!   controller and namespace, which a limiter's demand walks);
//! - `before-N-hH`: the same as every pass did it before `shared_limits_for_pass`: one walk
//!   over the flows per limit (`Target::shared_limits`).
//!
//! ```sh
//! cargo bench -p keel-controller --bench split_pass            # ns per pass, 1 s per case
//! cargo bench -p keel-controller --bench split_pass -- 3       # 3 s per case
//! ```

use keel_controller::{
    Instant, IoBuf, Limits, NamespaceConfig, NamespaceQos, QosLimits, Rate, Request,
    SubsystemConfig, Target, TargetConfig,
};
use keel_nvme::fabrics::{CNTLID_DYNAMIC, ConnectCommand, ConnectData};
use keel_storage::RamBackend;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const NQN: &str = "nqn.2026-12.io.keel:dpu0-tenant-a";
const SLOTS: usize = 16;

/// A target with `limited` namespaces with limits (or one without) and `hosts` controllers
/// (one flow per controller and namespace: a limiter's demand walks the flows).
fn target(limited: u32, hosts: u16) -> Target {
    let namespaces = (1..=limited.max(1))
        .map(|nsid| NamespaceConfig {
            nsid,
            backend: Box::new(RamBackend::new(512, 64, 32).unwrap()),
            nguid: [nsid as u8; 16],
            uuid: [0xa0 | nsid as u8; 16],
            eui64: [0; 8],
            qos: NamespaceQos {
                limits: if limited == 0 {
                    QosLimits::NONE
                } else {
                    QosLimits {
                        iops: Some(Rate::new(20_000).with_burst(200)),
                        bps: Some(Rate::new(400 << 20)),
                        ..QosLimits::NONE
                    }
                },
                ..Default::default()
            },
        })
        .collect();
    let mut t = Target::new(TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "KEEL0001".into(),
            model: "Keel RAM".into(),
            allowed_hosts: vec![],
            namespaces,
        }],
        limits: Limits {
            max_controllers: 64,
            ..Limits::default()
        },
        ..Default::default()
    })
    .unwrap();
    for h in 0..hosts {
        let q = t.open_queue().unwrap();
        let sqe = ConnectCommand {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 0,
        }
        .to_sqe(1);
        let mut b = IoBuf::leak_zeroed(1024);
        ConnectData::new(
            [h as u8; 16],
            CNTLID_DYNAMIC,
            NQN,
            &format!("nqn.2026-12.io.keel:host-{h}"),
        )
        .write(b.as_mut_slice());
        let now = Instant::from_millis(1);
        let r = t.submit(
            now,
            q,
            Request {
                sqe,
                buf: Some(b),
                data_len: 1024,
                cookie: 1,
            },
        );
        assert!(r.is_some_and(|r| r.cqe.status.is_success()), "connect");
    }
    t
}

/// The other core's row: a (key, demand) word per slot, as `DemandRow::publish_limit` packs it.
struct Row([AtomicU64; SLOTS]);

impl Row {
    fn read(&self, key: u32) -> Option<u32> {
        let want = u64::from(key | 1 << 31);
        self.0.iter().find_map(|s| {
            let v = s.load(Ordering::Relaxed);
            (v >> 32 == want).then_some(v as u32)
        })
    }
}

/// One pass of case kind `kind` (`walk`, `steady`, `pass`, `before`): returns how many
/// limits it split.
fn pass(t: &mut Target, mine: &Row, other: &Row, round: u32, kind: &str) -> usize {
    let mut lims = [(0u32, keel_qos::LimiterId(0), 0u32); SLOTS];
    let mut n = 0;
    let mut keep = |l: keel_controller::SharedLimit| {
        if n < SLOTS {
            lims[n] = (l.key, l.limiter, l.demand);
            n += 1;
        }
    };
    if kind == "before" {
        // One walk over the flows per limit (`shared_limits`, as every pass did before).
        t.shared_limits().for_each(&mut keep);
    } else {
        t.shared_limits_for_pass().for_each(&mut keep);
    }
    let moving = kind == "pass";
    if kind == "walk" {
        return black_box(n);
    }
    for (i, &(key, _, d)) in lims[..n].iter().enumerate() {
        let v = u64::from(key | 1 << 31) << 32 | u64::from(d);
        if mine.0[i].load(Ordering::Relaxed) != v {
            mine.0[i].store(v, Ordering::Relaxed);
        }
    }
    for &(key, limiter, d) in &lims[..n] {
        let theirs = other.read(key).unwrap_or(0);
        let d = if moving { d + (round & 7) } else { d };
        t.set_limit_split(limiter, 0, &[d, theirs]);
    }
    n
}

fn ns_per_pass(case: &str, secs: f64) -> (f64, usize) {
    // "KIND-N" or "KIND-N-hH": N limited namespaces, H controllers.
    let (limited, kind, hosts) = match case {
        "none" => (0, "pass", 0),
        c => {
            let mut p = c.split('-');
            let kind = p.next().unwrap();
            let n = p.next().unwrap().parse().unwrap();
            let h = p
                .next()
                .map_or(0, |h| h.trim_start_matches('h').parse().unwrap());
            (n, kind, h)
        }
    };
    let mut t = target(limited, hosts);
    let mine = Row([const { AtomicU64::new(0) }; SLOTS]);
    let other = Row([const { AtomicU64::new(0) }; SLOTS]);
    for (i, l) in t.shared_limits().take(SLOTS).enumerate() {
        other.0[i].store(u64::from(l.key | 1 << 31) << 32 | 24, Ordering::Relaxed);
    }
    let mut round = 0u32;
    let mut split = 0;
    let warm = std::time::Instant::now();
    while warm.elapsed() < Duration::from_millis(100) {
        round = round.wrapping_add(1);
        split = pass(&mut t, &mine, &other, round, kind);
    }
    let budget = Duration::from_secs_f64(secs);
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..256 {
            round = round.wrapping_add(1);
            black_box(pass(&mut t, &mine, &other, round, kind));
        }
        n += 256;
    }
    (start.elapsed().as_nanos() as f64 / n as f64, split)
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1.0);
    println!("| case | limits split | ns per pass | ns per limit |");
    println!("|---|---|---|---|");
    for case in [
        "none",
        "walk-1",
        "steady-1",
        "pass-1",
        "walk-4",
        "steady-4",
        "pass-4",
        "walk-16",
        "steady-16",
        "pass-16",
        "steady-1-h8",
        "steady-4-h8",
        "steady-16-h8",
        "steady-16-h32",
        "before-1-h8",
        "before-4-h8",
        "before-16-h8",
        "before-16-h32",
    ] {
        let (ns, split) = ns_per_pass(case, secs);
        let per = if split > 0 {
            format!("{:.0}", ns / split as f64)
        } else {
            "-".into()
        };
        println!("| {case} | {split} | {ns:.0} | {per} |");
    }
}
