//! Every core (issue #17, hardware half): the real image at `--smp 1`, `2` and `4`, with
//! GICv2 and GICv3, entered at EL1 and EL2. Each core reports at boot (index, MPIDR, stacks,
//! GIC interface), runs a poll loop of its own, and answers messages from core 0 over the
//! SPSC rings (`keel.test=cores`: a stream of 20000 pings per core, every pong checked, and no
//! allocator call in a secondary's loop). A secondary's stack overflow hits its guard page.

use keel_tests::{BOOT_TIMEOUT, Build, Qemu};
use std::time::Duration;

/// The selftest streams messages to every core under TCG on a loaded machine.
const SELFTEST_TIMEOUT: Duration = Duration::from_secs(120);

fn boot(smp: u32, gic: u32, el2: bool, test: &str) -> Qemu {
    let (smp, gic) = (smp.to_string(), gic.to_string());
    let append = format!("keel.test={test}");
    let mut args = vec!["--smp", &smp, "--gic", &gic, "--append", &append];
    if el2 {
        args.push("--el2");
    }
    Qemu::boot(Build::Test, &args)
}

/// Boots, runs the ring selftest, and checks every core's report.
fn every_core_reports_and_answers(smp: usize, gic: u32, el2: bool) {
    let mut q = boot(smp as u32, gic, el2, "cores");
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.wait_exit(SELFTEST_TIMEOUT), Ok(0), "{}", q.console());
    let c = q.console();
    let el = if el2 { 2 } else { 1 };
    let interface = if gic == 2 {
        "GICv2 CPU interface 0x8010000 (banked)".to_string()
    } else {
        "GICv3 redistributor 0x".to_string()
    };
    let mut redistributors = Vec::new();
    for core in 0..smp {
        let prefix = format!("core {core}: MPIDR {core:#x}, stack 0x");
        let line = c
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no report from core {core}:\n{c}"));
        assert!(line.contains(", SP_EL1 stack 0x"), "{line}");
        assert!(line.contains(&interface), "{line}");
        assert!(line.ends_with(&format!("entered at EL{el}")), "{line}");
        if gic == 3 {
            redistributors.push(line.split("redistributor ").nth(1).unwrap().to_string());
        }
    }
    // GICv3: each core found its own redistributor (128 KiB frames, by MPIDR).
    redistributors.sort();
    redistributors.dedup();
    assert_eq!(redistributors.len(), if gic == 3 { smp } else { 0 }, "{c}");
    assert!(
        c.contains(&format!("cores: {smp} of {smp} running a poll loop each")),
        "{c}"
    );
    for core in 1..smp {
        assert!(
            c.contains(&format!(
                "core {core}: ring round trip from core 0 and back in "
            )),
            "{c}"
        );
        assert!(
            c.contains(&format!(
                "cores: core {core}: 20000 messages there and back in order, "
            )),
            "{c}"
        );
    }
    // The I/O path of a secondary takes no heap lock: none of its loops allocated.
    let loop_lines: Vec<&str> = c
        .lines()
        .filter(|l| l.starts_with("cores: core "))
        .collect();
    assert_eq!(loop_lines.len(), smp - 1, "{c}");
    assert!(
        loop_lines
            .iter()
            .all(|l| l.ends_with(" 0 allocator calls in its loop")),
        "{c}"
    );
    assert!(
        c.contains(&format!(
            "keel: cores selftest PASS ({} secondary core(s))",
            smp - 1
        )),
        "{c}"
    );
    assert!(!c.contains("CPU exception"), "{c}");
}

#[test]
fn one_core_reports_and_runs_alone() {
    every_core_reports_and_answers(1, 2, false);
}

#[test]
fn two_cores_with_gicv3_entered_at_el2() {
    every_core_reports_and_answers(2, 3, true);
}

#[test]
fn four_cores_with_gicv2() {
    every_core_reports_and_answers(4, 2, false);
}

#[test]
fn four_cores_with_gicv3() {
    every_core_reports_and_answers(4, 3, false);
}

#[test]
fn a_secondary_stack_overflow_hits_its_guard_page() {
    let mut q = boot(2, 3, false, "core-overflow");
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(3), "{}", q.console());
    let c = q.console();
    assert!(c.contains("keel: test stack overflow on core 1"), "{c}");
    assert!(c.contains("core: 1 (MPIDR 0x1)"), "{c}");
    assert!(c.contains("fault: translation fault on write"), "{c}");
    // The fault address is in the guard page just below core 1's stack.
    let stack_bottom = c
        .lines()
        .find(|l| l.starts_with("core 1: MPIDR 0x1, stack 0x"))
        .and_then(|l| l.split("stack 0x").nth(1))
        .and_then(|s| s.split("..").next())
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .unwrap_or_else(|| panic!("no stack in core 1's report:\n{c}"));
    let far = c
        .lines()
        .find_map(|l| l.split("FAR: 0x").nth(1))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("no FAR:\n{c}"));
    assert!(
        (stack_bottom - 4096..stack_bottom).contains(&far),
        "FAR {far:#x} not in the guard page below {stack_bottom:#x}"
    );
}
