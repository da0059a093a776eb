//! Interrupts toward the host through `ivshmem-doorbell`: `keelctl host ivshmem-server` hands
//! out a window file, the release firmware's QEMU joins it with an `ivshmem-doorbell` device
//! (`qemu/run --window-server SOCK`), and `keelctl host --doorbell SOCK` joins as a peer and
//! sleeps on its eventfds. The firmware rings the host's vector (BAR0 Doorbell register) after
//! it posts completions; the test checks that interrupts arrive on the eventfds, as many as
//! the window's counters show, that I/O verifies, that the same firmware still serves a host
//! that polls (no peer named in the window, or a peer that does not exist, or garbage), and
//! that a client sending garbage to the server breaks nothing. One QEMU, bounded; the server and QEMU are killed by PID.

use keel_host_tools::host::Window;
use keel_nvme_pcie::layout::interrupt_target;
use keel_tests::{
    IvshmemServer, Run, ScratchFile, boot_on_window_server, keelctl, root, run_bounded,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn host(window: &Path, sock: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(keelctl());
    cmd.arg("host").arg("--window").arg(window);
    if let Some(s) = sock {
        cmd.arg("--doorbell").arg(s);
    }
    let r = run_bounded(cmd.args(args), RUN_TIMEOUT);
    assert_eq!(r.code, 0, "keelctl host {args:?}: {}", r.stderr);
    r
}

/// (interrupts received on the eventfds, interrupts the counters show) from the report.
fn interrupts(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("keelctl host: doorbell:"))
        .unwrap_or_else(|| panic!("no doorbell report in {stderr}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 3, "{line}");
    (nums[0], nums[2])
}

#[test]
fn doorbell_interrupts_reach_a_host_peer() {
    let win = ScratchFile::new("doorbell-win", 64 << 20);
    let dir: PathBuf = root().join(format!(
        "target/qemu-tests/scratch/{}-doorbell",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let sock = dir.join("ivshmem.sock");
    let server = IvshmemServer::start(win.path(), &sock);
    let mut fw = boot_on_window_server(win.path(), &sock);
    assert!(
        fw.console().contains("has a doorbell (ivshmem-doorbell"),
        "{}",
        fw.console()
    );
    let w = Window::open(win.path()).expect("window");

    // Writes and reads verified, every interrupt on an eventfd and on a counter.
    let r = host(
        win.path(),
        Some(&sock),
        &["verify", "--nsid", "1", "--lba", "0", "--count", "20000"],
    );
    let (got, counted) = interrupts(&r.stderr);
    assert!(got > 0, "{}", r.stderr);
    assert_eq!(got, counted, "{}", r.stderr);
    // Two queues at depth 8 for a second: both vectors.
    let r = host(
        win.path(),
        Some(&sock),
        &[
            "bench",
            "--rw",
            "mix",
            "--qd",
            "8",
            "--queues",
            "2",
            "--duration",
            "1",
        ],
    );
    let (got, counted) = interrupts(&r.stderr);
    assert!(got > 100, "{}", r.stderr);
    assert_eq!(got, counted, "{}", r.stderr);
    // The host is gone: the window names no peer any more.
    assert_eq!(w.load32(keel_nvme_pcie::layout::INTERRUPT_TARGET_OFFSET), 0);

    // A client that speaks out of turn, one that leaves at once: the server drops them.
    for junk in [&b"\x01\x02garbage from a peer"[..], b""] {
        let mut g = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let _ = g.write_all(junk);
    }
    // The same firmware with a host that polls (no peer in the window): as with ivshmem-plain;
    // and with a peer that does not exist, or garbage, in the target word (a host's bug): the
    // firmware rings nobody (QEMU drops a doorbell to an unknown peer) and keeps working.
    for target in [0, interrupt_target::encode(0x7fff), 0x1234_5678] {
        w.store32(keel_nvme_pcie::layout::INTERRUPT_TARGET_OFFSET, target);
        let r = host(
            win.path(),
            None,
            &["verify", "--nsid", "1", "--lba", "100", "--count", "2000"],
        );
        assert!(!r.stderr.contains("doorbell:"), "{}", r.stderr);
    }
    w.store32(keel_nvme_pcie::layout::INTERRUPT_TARGET_OFFSET, 0);
    // And a doorbell host again after all that.
    let r = host(
        win.path(),
        Some(&sock),
        &[
            "read",
            "--nsid",
            "1",
            "--lba",
            "0",
            "--count",
            "8",
            "-o",
            "/dev/null",
        ],
    );
    let (got, counted) = interrupts(&r.stderr);
    assert!(got > 0 && got == counted, "{}", r.stderr);
    fw.kill();
    drop(server);
    assert!(!sock.exists() || std::fs::remove_file(&sock).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}
