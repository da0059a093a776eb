//! `qemu/bench-remote` (issue 15's benchmark) in its short form, so that it cannot rot: it
//! broke once without anyone noticing (the initiator's log lines became defmt frames and the
//! script waited for text that never came). Two Keels boot (a remote serving RAM, an
//! initiator whose emulated function 0 is that remote namespace and function 1 its own RAM),
//! and every Keel case completes with a rate, latencies and an instruction count (2 s per
//! case, `--no-linux`: the Linux host rows are the long form's).

use keel_tests::{root, run_bounded};
use std::process::Command;
use std::time::Duration;

/// Two boots, two 64 MiB fills, 12 cases of 2 s under the instruction-counting plugin.
const TIMEOUT: Duration = Duration::from_secs(420);

#[test]
fn bench_remote_short_measures_every_keel_case() {
    let r = run_bounded(
        Command::new(root().join("qemu/bench-remote")).args(["--short", "--no-linux"]),
        TIMEOUT,
    );
    assert_eq!(
        r.code, 0,
        "qemu/bench-remote --short --no-linux failed: {r:?}"
    );
    assert!(
        !r.stdout.contains("FAILED") && !r.stderr.contains("FAILED"),
        "{r:?}"
    );
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("| remote directly") || l.starts_with("| Keel: "))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    // 3 paths x read/write x QD1/QD32.
    assert_eq!(rows.len(), 12, "{}", r.stdout);
    for row in &rows {
        let iops: f64 = row[3].parse().unwrap_or(0.0);
        assert!(iops > 0.0, "no rate: {row:?}");
        let lat: Vec<f64> = row[4].split(" / ").filter_map(|v| v.parse().ok()).collect();
        assert!(
            lat.len() == 3 && lat.iter().all(|&v| v > 0.0),
            "latencies: {row:?}"
        );
        // The initiator is instrumented (its instructions per I/O); the remote is not.
        if row[0].starts_with("Keel: ") {
            let insns: f64 = row[5].parse().unwrap_or(0.0);
            assert!(insns > 0.0, "no instruction count: {row:?}");
        }
    }
    // The summary: latency added going remote and instructions per forwarded I/O.
    for case in ["| randread | 1 |", "| randwrite | 32 |"] {
        assert!(
            r.stdout.contains(case),
            "no summary row {case}: {}",
            r.stdout
        );
    }
}
