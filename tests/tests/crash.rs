//! Crash consistency of the real image in QEMU (the model and its rules:
//! `keel_tests::crash`): a verifiable workload of Write, Write with FUA, Flush, Write Zeroes
//! and Deallocate against a drive namespace (QEMU's NVMe device on a file), QEMU killed with
//! SIGKILL at a random moment, the same image booted on the same file, every block checked.
//! Over NVMe/TCP plain and with AES-XTS, and through the emulated PCIe function.
//!
//! CI runs the short form (10 kills in all). `tests/crash --runs N` runs N kills per path
//! (`KEEL_CRASH_RUNS`); `KEEL_CRASH_SEED` replays a workload.

use keel_tests::crash::{Path_, Tally, campaign, runs, seed};
use std::time::Duration;

fn run(path: Path_, kills: u64) -> Tally {
    let seed = seed();
    let t = campaign(
        path,
        runs(kills),
        seed,
        (Duration::from_millis(300), Duration::from_millis(2500)),
        None,
    );
    eprintln!("KEEL-CRASH {path:?} seed {seed}: {t}");
    assert!(t.clean(), "{path:?} (seed {seed}): {t}\n{:#?}", t.problems);
    assert!(
        t.writes_acked > 0 && t.fua_acked > 0 && t.flushes_acked > 0 && t.durable_checked > 0,
        "{path:?}: the workload proved little: {t}"
    );
    t
}

#[test]
fn nvme_tcp_drive_namespace_survives_kills() {
    let t = run(Path_::Tcp, 4);
    assert!(t.others_acked > 0, "no Write Zeroes or Deallocate ran: {t}");
}

#[test]
fn nvme_tcp_encrypted_drive_namespace_survives_kills() {
    run(Path_::TcpXts, 3);
}

#[test]
fn emulated_function_drive_namespace_survives_kills() {
    let t = run(Path_::Function, 3);
    assert!(t.others_acked > 0, "no Write Zeroes or Deallocate ran: {t}");
}

/// The checks are not vacuous: blocks of the drive file put back to zeroes between the kill
/// and the next boot (a drive that lost acknowledged data) are found.
#[test]
fn a_drive_that_loses_acknowledged_writes_is_caught() {
    let zero_blocks = |drive: &std::path::Path| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(drive)
            .expect("drive file");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(&[0u8; 64 * 512]).expect("write");
    };
    let t = campaign(
        Path_::Tcp,
        1,
        seed(),
        (Duration::from_millis(1500), Duration::from_millis(2500)),
        Some(&zero_blocks),
    );
    eprintln!("with 64 blocks zeroed behind the target's back: {t}");
    assert!(t.lost > 0, "the lost blocks went unnoticed: {t}");
}
