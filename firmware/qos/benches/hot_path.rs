//! What the QoS check costs per I/O on the host (a plain timing loop, not a test): the
//! scheduler calls of the controller core's per-command path, `Scheduler::enqueue` (answering
//! `Admit::Now`) and `Scheduler::completed`, for a flow held by three limiters (namespace,
//! controller, group) as the controller core sets them up:
//!
//! - `unlimited`: no limit set (every namespace without a `qos` rule), a domain with no cap;
//! - `drive-domain`: the same in a drive's domain (`max_inflight` 64, not reached);
//! - `limits-not-binding`: all six limits set on all three limiters, far above the load;
//! - `limits-not-binding-pass`: the same, 32 commands per timestamp (the firmware reads the
//!   clock once per poll pass; every command of the pass carries that time);
//! - `one-limit-not-binding`: a typical `qos` rule, IOPS and bandwidth on the namespace's
//!   limiter only, far above the load;
//! - `baseline`: the loop alone (clock and handle arithmetic).
//!
//! Each I/O comes 1 µs after the one before (4 GB/s, 1 M IOPS of 4 KiB), alternately a read
//! and a write.
//!
//! ```sh
//! cargo bench -p keel-qos --bench hot_path            # ns per I/O, 2 s per case
//! cargo bench -p keel-qos --bench hot_path -- 5       # 5 s per case
//! # instructions per I/O (x86_64): run a case a fixed number of times under callgrind, twice,
//! # and divide the difference by the difference of the counts
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/deps/hot_path-* --ios 100000 --case unlimited
//! ```

use keel_qos::{Admit, Cost, Dir, Limits, Rate, Scheduler};
use std::hint::black_box;
use std::time::{Duration, Instant};

const CASES: [&str; 6] = [
    "baseline",
    "unlimited",
    "drive-domain",
    "limits-not-binding",
    "limits-not-binding-pass",
    "one-limit-not-binding",
];

/// A scheduler set up like the controller core's for one host and one namespace, and the
/// per-I/O work of the case: returns a closure doing one I/O at time `now`.
fn setup(case: &str) -> impl FnMut(u64) {
    let mut s = Scheduler::new(256);
    let (cap, limits) = match case {
        "unlimited" | "baseline" => (0, Limits::NONE),
        "drive-domain" => (64, Limits::NONE),
        "one-limit-not-binding" => (
            64,
            Limits {
                iops: Some(Rate::new(10_000_000)),
                bps: Some(Rate::new(40_000_000_000)),
                ..Limits::NONE
            },
        ),
        _ => {
            let r = Some(Rate::new(1 << 40));
            (
                64,
                Limits {
                    iops: r,
                    read_iops: r,
                    write_iops: r,
                    bps: r,
                    read_bps: r,
                    write_bps: r,
                },
            )
        }
    };
    let d = s.add_domain(cap).unwrap();
    let ls: Vec<_> = (0..3)
        .map(|k| {
            let l = if k > 0 && case == "one-limit-not-binding" {
                Limits::NONE
            } else {
                limits
            };
            s.add_limiter(l, 0).unwrap()
        })
        .collect();

    let f = s.add_flow(d, 1, &ls).unwrap();
    let baseline = case == "baseline";
    let mut h = 0u32;
    move |now| {
        h = (h + 1) & 255;
        let dir = if h & 1 == 0 { Dir::Read } else { Dir::Write };
        let cost = black_box(Cost { dir, bytes: 4096 });
        if baseline {
            black_box((now, h, cost));
            return;
        }
        let admit = s.enqueue(now, f, h, cost);
        assert_eq!(admit, Ok(Admit::Now));
        s.completed(d);
    }
}

/// The clock of I/O number `i`: 1 µs apart, or the same for each run of 32 (one poll pass).
fn clock(case: &str) -> impl Fn(u64) -> u64 {
    let mask = if case == "limits-not-binding-pass" {
        !31
    } else {
        !0
    };
    move |i| (i & mask) * 1_000
}

fn ns_per_io(case: &str, secs: f64) -> f64 {
    let mut io = setup(case);
    let at = clock(case);
    let mut i = 0u64;
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        i += 1;
        io(at(i));
    }
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1024 {
            i += 1;
            io(at(i));
        }
        n += 1024;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    if let (Some(ios), Some(case)) = (opt("--ios"), opt("--case")) {
        // A fixed number of I/Os, for instruction counting under valgrind.
        let ios: u64 = ios.parse().expect("--ios N");
        let mut io = setup(case);
        let at = clock(case);
        for i in 0..ios {
            io(at(i));
        }
        return;
    }
    let secs: f64 = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    println!("QoS hot path on the host: Scheduler::enqueue (Admit::Now) + completed, 4 KiB");
    for case in CASES {
        println!("{case:<20} {:>6.1} ns per I/O", ns_per_io(case, secs));
    }
}
