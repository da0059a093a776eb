//! Local NVMe drives: the firmware brings up QEMU's NVMe controllers (`-device nvme`,
//! `-device nvme-ns`) with its poll-mode driver and reports each drive and namespace.
//! The data path over NVMe/TCP is in `drive_data.rs`.

use keel_tests::{BOOT_TIMEOUT, Build, Qemu, ScratchFile};

fn boot(args: &[&str]) -> String {
    let mut q = Qemu::boot(Build::Release, args);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    q.console()
}

fn line<'a>(c: &'a str, needle: &str) -> &'a str {
    c.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{c}"))
}

#[test]
fn drive_from_qemu_run_disk_is_initialised() {
    let disk = ScratchFile::new("drive-one.img", 64 << 20);
    let c = boot(&["--disk", disk.path().to_str().unwrap()]);
    let l = line(&c, "nvme: 00:02.0 QEMU NVMe Ctrl serial keel-disk0");
    assert!(l.contains("NVMe 1.4"), "{l}");
    assert!(l.contains("I/O queue(s) x "), "{l}");
    assert!(l.contains("max transfer 512 KiB"), "{l}");
    assert!(
        c.contains("nvme: 00:02.0 namespace 1: 64 MiB (131072 blocks of 512 bytes)"),
        "{c}"
    );
    assert!(!c.contains("drive not used"), "{c}");
}

#[test]
fn several_namespaces_with_different_block_sizes() {
    let a = ScratchFile::new("drive-ns1.img", 32 << 20);
    let b = ScratchFile::new("drive-ns3.img", 48 << 20);
    let d1 = format!("if=none,id=d1,format=raw,file={}", a.path().display());
    let d2 = format!("if=none,id=d2,format=raw,file={}", b.path().display());
    let c = boot(&[
        "--",
        "-device",
        "nvme,id=nvme9,serial=keel-multi",
        "-drive",
        &d1,
        "-device",
        "nvme-ns,drive=d1,bus=nvme9,nsid=1",
        "-drive",
        &d2,
        "-device",
        "nvme-ns,drive=d2,bus=nvme9,nsid=3,logical_block_size=4096,physical_block_size=4096",
    ]);
    let l = line(&c, "serial keel-multi");
    let bdf = l
        .split("nvme: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or_else(|| panic!("{l}"));
    assert!(
        c.contains(&format!(
            "nvme: {bdf} namespace 1: 32 MiB (65536 blocks of 512 bytes)"
        )),
        "{c}"
    );
    assert!(
        c.contains(&format!(
            "nvme: {bdf} namespace 3: 48 MiB (12288 blocks of 4096 bytes)"
        )),
        "{c}"
    );
    assert!(!c.contains(&format!("nvme: {bdf} namespace 2")), "{c}");
}

#[test]
fn two_drives_and_one_without_namespaces() {
    let a = ScratchFile::new("drive-a.img", 16 << 20);
    let b = ScratchFile::new("drive-b.img", 8 << 20);
    let c = boot(&[
        "--disk",
        a.path().to_str().unwrap(),
        "--disk",
        b.path().to_str().unwrap(),
        "--",
        "-device",
        "nvme,serial=keel-empty",
    ]);
    assert!(c.contains("serial keel-disk0"), "{c}");
    assert!(c.contains("serial keel-disk1"), "{c}");
    assert!(
        c.contains("namespace 1: 16 MiB (32768 blocks of 512 bytes)"),
        "{c}"
    );
    assert!(
        c.contains("namespace 1: 8 MiB (16384 blocks of 512 bytes)"),
        "{c}"
    );
    let l = line(&c, "serial keel-empty");
    let bdf = l.split("nvme: ").nth(1).unwrap().split(' ').next().unwrap();
    assert!(
        c.contains(&format!("nvme: {bdf}: no usable namespace")),
        "{c}"
    );
}

#[test]
fn namespace_with_metadata_is_skipped_and_the_firmware_carries_on() {
    let a = ScratchFile::new("drive-md.img", 16 << 20);
    let b = ScratchFile::new("drive-plain.img", 16 << 20);
    let d1 = format!("if=none,id=m1,format=raw,file={}", a.path().display());
    let d2 = format!("if=none,id=m2,format=raw,file={}", b.path().display());
    let c = boot(&[
        "--",
        "-device",
        "nvme,id=nvme8,serial=keel-md",
        "-drive",
        &d1,
        "-device",
        "nvme-ns,drive=m1,bus=nvme8,nsid=1,ms=8",
        "-drive",
        &d2,
        "-device",
        "nvme-ns,drive=m2,bus=nvme8,nsid=2",
    ]);
    let l = line(&c, "namespace 1: LBA format with 8 metadata bytes");
    assert!(l.contains("not supported; skipped"), "{l}");
    assert!(
        c.contains("namespace 2: 16 MiB (32768 blocks of 512 bytes)"),
        "{c}"
    );
}
