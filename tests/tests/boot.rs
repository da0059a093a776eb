//! Boot: the real image in QEMU, started every way a board starts it.

use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, assert_qemu_run_refuses, flash_image, qemu_run_dry,
};

fn ready(q: &mut Qemu) -> String {
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

#[test]
fn release_image_boots_to_ready_with_kernel_option() {
    let mut q = Qemu::boot(Build::Release, &[]);
    let line = ready(&mut q);
    assert!(line.starts_with("keel: ready in "), "{line}");
    let c = q.console();
    assert!(c.contains("release build"), "{c}");
    assert!(c.contains("board: qemu-virt"), "{c}");
    assert!(c.contains("running at EL1 (entered at EL1)"), "{c}");
    assert!(
        c.contains("memory: 0x40000000..0x80000000 (1024 MiB)"),
        "{c}"
    );
    // -cpu max has the crypto and CRC extensions the data path will use.
    assert!(c.contains("cpu features: aes pmull"), "{c}");
    assert!(c.contains("crc32"), "{c}");
    assert!(c.contains("psci: Some(Hvc)"), "{c}");
    // Log records arrive as defmt frames; the harness decodes them with the release ELF.
    assert!(
        c.contains("] INFO  nvmf: namespace 1 = RAM 256 MiB: 256 MiB, 512-byte blocks"),
        "{c}"
    );
    assert!(!c.contains("[defmt frame"), "{c}");
}

#[test]
fn release_image_boots_from_pflash() {
    let flash = flash_image(Build::Release);
    let mut q = Qemu::start(&["--flash", flash.to_str().unwrap()]);
    ready(&mut q);
    let c = q.console();
    // Started in place from flash at address 0 with no device tree pointer: it found QEMU's
    // device tree at the start of RAM and copied itself to its link address.
    assert!(c.contains("image: 0x40200000.."), "{c}");
    assert!(!c.contains("bootargs:"), "{c}");
}

#[test]
fn enters_at_el2_with_gicv3_two_cores_and_2g() {
    let mut q = Qemu::boot(
        Build::Test,
        &[
            "--el2",
            "--gic",
            "3",
            "--smp",
            "2",
            "--mem",
            "2G",
            "--append",
            "keel.test=exit",
        ],
    );
    ready(&mut q);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(0));
    let c = q.console();
    assert!(
        c.contains("2 core(s), running at EL1 (entered at EL2)"),
        "{c}"
    );
    assert!(c.contains("interrupt controller: Some(GICv3)"), "{c}");
    assert!(c.contains("psci: Some(Smc)"), "{c}");
    assert!(
        c.contains("memory: 0x40000000..0xc0000000 (2048 MiB)"),
        "{c}"
    );
    // The heap spans the gigabyte above the boot map's first one.
    assert!(c.contains("heap: 0x48100000..0xc0000000"), "{c}");
}

#[test]
fn pci_table_lists_the_devices_passed() {
    let disk = ScratchFile::new("pci-table.img", 16 << 20);
    let mut q = Qemu::boot(
        Build::Test,
        &[
            "--disk",
            disk.path().to_str().unwrap(),
            "--append",
            "keel.test=exit",
        ],
    );
    ready(&mut q);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(0));
    let c = q.console();
    let table: Vec<&str> = c.lines().filter(|l| l.starts_with("  00:")).collect();
    assert!(
        table
            .iter()
            .any(|l| l.contains("1b36:0008") && l.contains("host bridge")),
        "{c}"
    );
    let nvme = table
        .iter()
        .find(|l| l.contains("1b36:0010"))
        .unwrap_or_else(|| panic!("no NVMe row:\n{c}"));
    assert!(
        nvme.contains("010802") && nvme.contains("NVMe controller"),
        "{nvme}"
    );
    // NVMe BAR0 is a 64-bit BAR placed in a host bridge window.
    assert!(nvme.contains("0m64:0x"), "{nvme}");
    let net = table
        .iter()
        .find(|l| l.contains("1af4:1041"))
        .unwrap_or_else(|| panic!("no virtio-net row:\n{c}"));
    assert!(
        net.contains("Ethernet controller") && net.contains("4m64:0x8000000000"),
        "{net}"
    );
}

#[test]
fn deliberate_fault_prints_a_crash_report_and_fails() {
    let mut q = Qemu::boot(Build::Test, &["--append", "keel.test=fault"]);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(3));
    let c = q.console();
    for needle in [
        "*** keel: CPU exception ***",
        "kind: synchronous from current EL, SP_EL0",
        "class: 0x25 (data abort)",
        "fault: translation fault on read",
        "FAR: 0x0000dead00000000",
        "x29 ",
        "backtrace",
        "#0 ",
        "*** end of crash report ***",
    ] {
        assert!(c.contains(needle), "missing {needle:?} in:\n{c}");
    }
}

#[test]
fn stack_overflow_hits_the_guard_page_and_is_reported() {
    let mut q = Qemu::boot(Build::Test, &["--append", "keel.test=overflow"]);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(3));
    let c = q.console();
    assert!(c.contains("fault: translation fault on write"), "{c}");
}

#[test]
fn panic_prints_location_and_exits_with_failure() {
    let mut q = Qemu::boot(Build::Test, &["--append", "keel.test=panic"]);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(2));
    let c = q.console();
    assert!(
        c.contains("*** keel: panic at firmware/src/testhooks.rs:"),
        "{c}"
    );
    assert!(c.contains("deliberate test panic"), "{c}");
}

#[test]
fn qemu_run_rejects_unknown_options_and_missing_files() {
    assert_qemu_run_refuses(&["--bogus"], "unknown option: --bogus");
    assert_qemu_run_refuses(
        &["--disk", "/nonexistent/disk.img"],
        "no such file: /nonexistent/disk.img",
    );
    assert_qemu_run_refuses(&["--nvmf-port", "http"], "not a TCP port");
    // ivshmem needs a power-of-two window.
    let odd = keel_tests::ScratchFile::new("odd-window.img", 3_000_000);
    assert_qemu_run_refuses(
        &["--window", odd.path().to_str().unwrap()],
        "is not a power of two",
    );
}

#[test]
fn qemu_run_forwards_ports_disks_and_extra_arguments() {
    let img = keel_tests::image(Build::Release);
    let disk = ScratchFile::new("dry-run.img", 1 << 20);
    let cmd = qemu_run_dry(&[
        "--image",
        img.to_str().unwrap(),
        "--nvmf-port",
        "14420",
        "--discovery-port",
        "18009",
        "--disk",
        disk.path().to_str().unwrap(),
        "--smp",
        "2",
        "--",
        "-d",
        "guest_errors",
    ]);
    assert!(cmd.contains("hostfwd=tcp:127.0.0.1:14420-:4420"), "{cmd}");
    assert!(cmd.contains("hostfwd=tcp:127.0.0.1:18009-:8009"), "{cmd}");
    assert!(
        cmd.contains("-device nvme,serial=keel-disk0,drive=nvme0"),
        "{cmd}"
    );
    assert!(cmd.contains("-smp 2"), "{cmd}");
    assert!(cmd.trim_end().ends_with("-d guest_errors"), "{cmd}");
}

#[test]
fn psci_system_reset_restarts_the_machine() {
    // `-action reboot=reset` overrides qemu/run's -no-reboot: a SYSTEM_RESET that works makes
    // the machine boot the firmware again (which resets again: the test stops it).
    let mut q = Qemu::boot(
        Build::Test,
        &[
            "--append",
            "keel.test=reset",
            "--",
            "-action",
            "reboot=reset",
        ],
    );
    q.wait_for("keel: test reset", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    q.wait_for("keel: test reset", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("no second boot after SYSTEM_RESET: {e}"));
    let c = q.console();
    assert!(c.matches("Keel 0.1.0").count() >= 2, "{c}");
    assert!(!c.contains("CPU exception"), "{c}");
}
