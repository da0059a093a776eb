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

use keel_tests::{
    BOOT_TIMEOUT, Build, IvshmemServer, Qemu, ScratchFile, assert_hostvm_passed,
    boot_on_window_server, free_port, keelctl, keelctl_ok, monitor_command, root, run_bounded,
    wait_for_function_cap,
};
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
        wait_for_function_cap(win.path());
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
    assert_hostvm_passed(
        &r,
        &[
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
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("KEEL-HOSTVM: DONE pass=13 fail=0"),
        "{r:?}"
    );
    let c = fw.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(!c.contains(bad), "{bad:?} on the firmware console:\n{c}");
    }
}

/// The host VM sees functions come and go (issue 18): the firmware boots with three free
/// function slots; the host VM boots with three hot-plug slots (PCIe root ports, the windows
/// as memory backends, no device). For each slot the test creates a function on the firmware
/// (`keelctl function create`: the PF with two namespaces and a write limit, two VFs) and
/// hot-plugs its window into the VM (`device_add ivshmem-plain` on the VM's monitor). Inside,
/// `lspci`'s sysfs shows them appear; each is identified and written, each reads its own data
/// and not another's, one is a ublk block device. Then VF 1 is removed on the firmware and
/// unplugged from the VM (`device_del`): it disappears from sysfs and the other two keep their
/// data and keep working.
#[test]
fn host_vm_sees_functions_created_and_removed_live() {
    let wins: Vec<ScratchFile> = (0..3)
        .map(|i| ScratchFile::new(&format!("hostvm-hp{i}"), 64 << 20))
        .collect();
    let paths: Vec<String> = wins
        .iter()
        .map(|w| w.path().to_str().expect("path").to_string())
        .collect();
    let mport = free_port();
    let addr = format!("127.0.0.1:{mport}");
    let mport = mport.to_string();
    let mut fw = Qemu::boot(
        Build::Release,
        &[
            "--mgmt-port",
            &mport,
            "--window",
            &paths[0],
            "--window",
            &paths[1],
            "--window",
            &paths[2],
            "--append",
            "keel.fn.boot=0",
        ],
    );
    fw.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    let dir = root().join(format!(
        "target/qemu-tests/scratch/{}-hostvm-hotplug",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let monitor = dir.join("monitor.sock");
    let pidfile = dir.join("qemu.pid");
    let mut cmd = Command::new(root().join("qemu/hostvm/run"));
    cmd.env("KEEL_HOSTVM_KEELCTL", keelctl())
        .args(["--hotplug", "--mode", "hotplug", "--timeout"])
        .arg(VM_TIMEOUT_S.to_string())
        .arg("--monitor")
        .arg(&monitor);
    for p in &paths {
        cmd.args(["--window", p]);
    }
    cmd.arg("--").arg("-pidfile").arg(&pidfile);
    let mut vm = VmGuard(Qemu::spawn(cmd, false), pidfile);
    vm.0.wait_for(
        "KEEL-HOSTVM: hotplug: waiting for functions (0 ivshmem",
        Duration::from_secs(VM_TIMEOUT_S),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let key = root()
        .join("qemu/dev-keys/provision.key")
        .display()
        .to_string();
    let function = |args: &[&str]| {
        let mut all = vec!["function", args[0], "--device", &addr, "--key", &key];
        all.extend_from_slice(&args[1..]);
        keelctl_ok(&all)
    };
    for i in 0..3u16 {
        let slot = i.to_string();
        let nqn = format!("nqn.2026-12.test.hostvm:fn{i}");
        let t0 = Instant::now();
        let mut args = vec![
            "create",
            "--slot",
            &slot,
            "--nqn",
            &nqn,
            "--ns",
            "ram:32MiB",
        ];
        if i == 0 {
            args.extend(["--ns", "ram:8MiB", "--limit", "write_iops=50000"]);
        }
        let out = function(&args);
        assert!(out.contains("created"), "{out}");
        let answer = monitor_command(
            &monitor,
            &format!("device_add ivshmem-plain,memdev=keelwin{i},bus=rp{i},id=fn{i}"),
        );
        assert!(!answer.contains("Error"), "device_add: {answer}");
        eprintln!(
            "function {i}: created and hot-plugged in {:?}",
            t0.elapsed()
        );
    }
    vm.0.wait_for(
        "KEEL-HOSTVM: hotplug: ready for removal",
        Duration::from_secs(VM_TIMEOUT_S),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let out = function(&["remove", "--slot", "1"]);
    assert!(out.contains("removed"), "{out}");
    let answer = monitor_command(&monitor, "device_del fn1");
    assert!(!answer.contains("Error"), "device_del: {answer}");
    vm.0.wait_for(
        "KEEL-HOSTVM: hotplug: a function goes",
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "function 1 removed and gone from the VM in {:?}",
        t0.elapsed()
    );
    let (done, _) =
        vm.0.wait_for("KEEL-HOSTVM: DONE", Duration::from_secs(VM_TIMEOUT_S))
            .unwrap_or_else(|e| panic!("{e}"));
    let console = vm.0.console();
    for l in console.lines().filter(|l| l.contains("KEEL-HOSTVM")) {
        eprintln!("{l}");
    }
    assert!(done.contains("fail=0"), "{console}");
    for check in [
        "hotplug: three functions appear PASS",
        "hotplug: isolated PASS",
        "hotplug: a function goes PASS",
        "hotplug: the others keep their data and work PASS",
    ] {
        assert!(console.contains(check), "{check}: no PASS\n{console}");
    }
    assert!(console.contains("hotplug: ublk on"), "{console}");
    // The device that went is the one whose function was removed (VF 1's subsystem).
    let gone = console
        .split("hotplug: a function goes PASS (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("the removed BDF");
    assert!(
        console.contains(&format!(
            "hotplug: {gone} identify, write, read PASS ( subnqn nqn.2026-12.test.hostvm:fn1)"
        )),
        "{gone} was not function 1:\n{console}"
    );
    assert_eq!(
        console.matches("identify, write, read PASS").count(),
        3,
        "{console}"
    );
    let s = keel_tests::mgmt_status(&addr);
    assert_eq!(s.function_slots[1].state, keel_mgmt::SlotState::Free);
    let c = fw.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(!c.contains(bad), "{bad:?} on the firmware console:\n{c}");
    }
}

/// The host VM: `qemu/hostvm/run` pipes QEMU's console through a filter, so its QEMU is
/// killed by the PID QEMU wrote (`-pidfile`) when the test ends early.
struct VmGuard(Qemu, std::path::PathBuf);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.1) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            let _ = std::fs::remove_file(&self.1);
        }
        self.0.kill();
    }
}

/// Interrupts toward the host OS: `keelctl host ivshmem-server` hands out the window, the
/// firmware's QEMU joins it with an `ivshmem-doorbell` device, and so does the host VM's
/// (`--window-server`, with an emulated IOMMU). Inside, `keelctl host --pci --vfio` takes the
/// device through VFIO, names its IVPosition in the window and sleeps on eventfds bound to
/// the device's MSI-X vectors: a verify, a QD1 bench and a ublk disk (4 MiB written and read
/// back) receive the function's interrupts (`--mode doorbell`), after the same bench polled
/// through the same device.
#[test]
fn host_vm_takes_the_function_s_msix_through_vfio() {
    let win = ScratchFile::new("hostvm-doorbell", 64 << 20);
    let dir = root().join(format!(
        "target/qemu-tests/scratch/{}-hostvm-doorbell",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let sock = dir.join("ivshmem.sock");
    let _server = IvshmemServer::start(win.path(), &sock);
    let mut fw = boot_on_window_server(win.path(), &sock);
    let s = sock.to_str().expect("path");
    let r = run_bounded(
        Command::new(root().join("qemu/hostvm/run"))
            .env("KEEL_HOSTVM_KEELCTL", keelctl())
            .args([
                "--window-server",
                s,
                "--mode",
                "doorbell",
                "--seconds",
                "2",
                "--timeout",
                &VM_TIMEOUT_S.to_string(),
            ]),
        Duration::from_secs(VM_TIMEOUT_S + 300),
    );
    assert_hostvm_passed(
        &r,
        &[
            "doorbell-bench-polled",
            "doorbell-vfio-verify",
            "doorbell-bench-vfio",
            "doorbell-vfio-ublk",
        ],
    );
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("KEEL-DOORBELL: mode=vfio"))
        .unwrap_or_else(|| panic!("no vfio bench line\n{r:?}"));
    let received: u64 = line
        .split("doorbell: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count in {line}"));
    assert!(received > 0, "{line}");
    assert_eq!(r.code, 0, "{r:?}");
    fw.kill();
    std::fs::remove_dir_all(&dir).ok();
}
