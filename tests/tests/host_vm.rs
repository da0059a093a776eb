//! The emulated NVMe function seen by a real host operating system: the release firmware in
//! QEMU serves a function on a window file, and a second QEMU, the host VM (Debian's x86_64
//! Linux 6.12 from bookworm-backports, `qemu/hostvm/`), gets the same file as an
//! `ivshmem-plain` PCI device. Inside it, `keelctl host --pci` (a static binary in the
//! initramfs) drives the function:
//!
//! - `keelctl host ublk` makes it `/dev/ublkb0`: `mkfs.ext4`, mount, files written, unmount,
//!   `e2fsck -f -n` clean, the files read back; fio random writes with crc32c verification at
//!   queue depth 32; discard and write zeroes read back as zeroes; a clean stop on SIGTERM.
//! - a second function (its own window, subsystem and RAM namespace) beside the first as
//!   `/dev/ublkb1`: it reads zeroes where the first has its file system, keeps its own data,
//!   and the first one's files are unchanged;
//! - the kernel's NBD client (`nbd.ko`, Debian's nbd-client) against `keelctl host nbd`: the
//!   same file system mounted, files checked, `e2fsck` clean.
//!
//! One boot of each QEMU for all of it (65-110 s here under TCG, by the machine's load).
//! Needs, on the first run, the Debian mirror (the 6.12 kernel package, busybox; fio,
//! e2fsprogs, nbd-client and qemu-system-x86 are installed with `qemu/deps` as root); the VM
//! gets the harness's own keelctl with its libraries (`KEEL_HOSTVM_KEELCTL`). When something
//! is missing the test fails and says why.

use keel_host_tools::host::Window;
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, ScratchFile, keelctl, root, run_bounded};
use std::process::Command;
use std::time::{Duration, Instant};

/// The host VM's own bound (its `timeout -s KILL`); the test waits a little longer.
const VM_TIMEOUT_S: u64 = 600;

#[test]
fn host_vm_ublk_file_system_fio_and_kernel_nbd() {
    let wins = [
        ScratchFile::new("hostvm-win0", 64 << 20),
        ScratchFile::new("hostvm-win1", 64 << 20),
    ];
    let paths: Vec<String> = wins
        .iter()
        .map(|w| w.path().to_str().expect("path").to_string())
        .collect();
    let mut fw = Qemu::boot(
        Build::Release,
        &["--window", &paths[0], "--window", &paths[1]],
    );
    fw.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Each function publishes CAP after its first poll.
    for win in &wins {
        let w = Window::open(win.path()).expect("window");
        let t0 = Instant::now();
        while w.load64(0) & 0xFFFF == 0 {
            assert!(t0.elapsed() < BOOT_TIMEOUT, "CAP never set");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    let r = run_bounded(
        Command::new(root().join("qemu/hostvm/run"))
            // The harness's keelctl goes into the VM (with its libraries): no musl build.
            .env("KEEL_HOSTVM_KEELCTL", keelctl())
            .args([
                "--window",
                &paths[0],
                "--window",
                &paths[1],
                "--mode",
                "check",
                "--timeout",
                &VM_TIMEOUT_S.to_string(),
            ]),
        Duration::from_secs(VM_TIMEOUT_S + 300),
    );
    let console = &r.stdout;
    for check in [
        "identify",
        "ublk",
        "mkfs.ext4",
        "mount, write files, unmount",
        "fsck",
        "files read back",
        "fio randwrite+verify QD32",
        "discard and write zeroes",
        "two functions isolated",
        "ublk stop",
        "nbd: files read back",
        "nbd: fsck",
        "nbd stop",
    ] {
        assert!(
            console.contains(&format!("KEEL-HOSTVM: {check} PASS")),
            "{check}: no PASS\n{r:?}"
        );
    }
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        console.contains("KEEL-HOSTVM: DONE pass=13 fail=0"),
        "{r:?}"
    );
    let c = fw.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(!c.contains(bad), "{bad:?} on the firmware console:\n{c}");
    }
}
