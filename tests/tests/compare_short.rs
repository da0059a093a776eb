//! The Keel-vs-Linux comparison (`qemu/compare`, issue 8) in its short form, so that it cannot
//! rot: both targets (Keel, and Debian's arm64 kernel with nvmet-tcp from
//! `qemu/linux-target/`) must boot on the same emulated machine, answer Identify, and complete
//! every benchmark case (2 s each; the instrumented boots are skipped: `--no-insn`).
//!
//! Needs, on first run, the Debian mirror (qemu/linux-target/prepare downloads the arm64 kernel
//! and busybox packages once into `target/linux-cache`, or `$KEEL_LINUX_CACHE`). When that is
//! impossible the test fails and says why; it never passes without both targets having served.

use keel_tests::root;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on the whole run: build (cached), two boots (Linux ~15-30 s under TCG), 12 cases of 2 s.
const TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `qemu/compare ARGS` bounded by `timeout` (TERM, then KILL: its trap stops its own
/// QEMU by PID); returns its stdout and stderr after checking it exited 0.
fn run_compare(args: &[&str], timeout: Duration) -> (String, String) {
    let t = Instant::now();
    let mut child = Command::new(root().join("qemu/compare"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running qemu/compare");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).ok();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for qemu/compare") {
            break Some(status);
        }
        if t.elapsed() > timeout {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    eprintln!(
        "{stderr}\n{stdout}\ncompare {args:?}: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let status =
        status.unwrap_or_else(|| panic!("qemu/compare {args:?} did not finish within {timeout:?}"));
    assert!(status.success(), "qemu/compare {args:?} failed ({status})");
    (stdout, stderr)
}

#[test]
fn compare_short_serves_both_targets_and_completes_every_case() {
    let (stdout, stderr) = run_compare(&["--short", "--no-insn"], TIMEOUT);

    assert!(
        stderr.contains("done: both targets served, 12 cases completed"),
        "qemu/compare did not report both targets served and every case completed"
    );
    for marker in [
        "qemu/compare: keel (bench): ready",
        "qemu/compare: linux (bench): ready",
    ] {
        assert!(stderr.contains(marker), "no '{marker}' line");
    }
    assert!(!stdout.contains("FAILED"), "a failure in the report");

    // The summary table: a Keel row, a Linux row and the ratio row, every cell a number.
    let row = |prefix: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no table row starting with '{prefix}'"));
        line.trim_matches('|')
            .split('|')
            .skip(1)
            .map(|c| c.trim().trim_end_matches('×').to_string())
            .collect()
    };
    for prefix in ["| Keel |", "| Linux ", "| **Keel/Linux** |"] {
        let cells = row(prefix);
        assert_eq!(cells.len(), 8, "row '{prefix}': {cells:?}");
        for c in &cells {
            let v: f64 = c
                .parse()
                .unwrap_or_else(|_| panic!("row '{prefix}': not a number: '{c}'"));
            assert!(v > 0.0, "row '{prefix}': {c} is not positive");
        }
    }
    // Latency rows: every case measured for both targets.
    for case in [
        "4k-randread-qd1",
        "4k-randwrite-qd1",
        "4k-randread-qd32",
        "4k-randwrite-qd32",
        "128k-seqread-qd8",
        "128k-seqwrite-qd8",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {case} |")))
            .unwrap_or_else(|| panic!("no latency row for {case}"));
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells[1].contains(" / ") && cells[2].contains(" / "),
            "{case}: latency missing for a target: {line}"
        );
    }
}

/// Issue 17's scaling setup in its short form: both targets at `--smp 2`, each on a
/// two-queue tap of its own (Linux's made by qemu/compare, Keel's by qemu/run), 4 connections
/// as 2 controllers of 2 I/O queues, the two QD32 cases.
#[test]
fn compare_on_taps_at_two_cores_with_controllers_of_two_queues() {
    keel_tests::require_tap();
    let (stdout, stderr) = run_compare(
        &[
            "--short",
            "--no-insn",
            "--smp",
            "2",
            "--net",
            "tap",
            "--connections",
            "4",
            "--queues-per-controller",
            "2",
            "--cases",
            "4k-randread-qd32,4k-randwrite-qd32",
        ],
        TIMEOUT,
    );
    assert!(
        stderr.contains("done: both targets served, 4 cases completed"),
        "qemu/compare did not report both targets served and both cases completed"
    );
    assert!(
        stdout.contains("2 core(s)") && stdout.contains("4 (2 controllers of 2 I/O queues)"),
        "the report does not describe the setup"
    );
    // Both on their taps: the report's commands and each target's address.
    assert!(stdout.contains("queues=2") && stdout.contains("mq=on"));
    for t in ["keel", "linux"] {
        for case in ["4k-randread-qd32", "4k-randwrite-qd32"] {
            let line = stderr
                .lines()
                .find(|l| l.starts_with(&format!("qemu/compare: {t} {case}: ")))
                .unwrap_or_else(|| panic!("no result line for {t} {case}"));
            let iops: f64 = line
                .split(": ")
                .nth(2)
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no IOPS in '{line}'"));
            assert!(iops > 0.0, "{t} {case}: {line}");
        }
    }
}
