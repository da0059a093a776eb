//! The controller's logs and offload commands against the release firmware in QEMU, through
//! NVMe/TCP with the initiator library (raw SQEs where the library has no helper), on a RAM
//! namespace, a namespace of QEMU's NVMe drive and an AES-XTS namespace:
//!
//! - a failed command has its Error Information log entry (newest first, the More bit set in
//!   its completion), and SMART / Health counts the I/O done;
//! - Verify and Copy run on the device (QEMU's drive receives Verify itself), Write Zeroes on
//!   the encrypted namespace reads back zeroes, and Identify says what each namespace does;
//! - power cycles and unsafe shutdowns persist in the flash's health area across a kill, a
//!   clean reboot and a new QEMU;
//! - an Abort of a command outstanding on a (throttled, slow) QEMU NVMe drive is passed to the
//!   drive, and its answer says what happened to the command.

use keel_host_tools::nvme::{Controller, IoQueue, Params};
use keel_nvme::identify::{IdentifyController, Lpa, Ocfs, Oncs};
use keel_nvme::io::{AbortCommand, CopyCommand, CopyRange, RwCommand};
use keel_nvme::log::{ErrorLogEntry, SmartLog};
use keel_nvme::{Cqe, IoOpcode, Sqe};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, boot_nvmf, build_release_keelctl, free_port,
    keelctl_ok, root,
};
use std::time::Duration;

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:c4f70000-7e57-4d0e-a11d-0000000e1106";
/// An XTS-AES-256 development key.
const KEY: &str = concat!(
    "8f3a1c5e9b7d2460f1e3c5a79b8d0f21436587a9cbed0f1e2d3c4b5a69788796",
    "0a1b2c3d4e5f60718293a4b5c6d7e8f9f8e7d6c5b4a3928170f6e5d4c3b2a190"
);

fn params(port: u16) -> Params {
    Params {
        timeout: Duration::from_secs(30),
        ..Params::new(format!("127.0.0.1:{port}"), SUBNQN, HOSTNQN)
    }
}

/// Runs one I/O command to its completion (the status is not checked).
fn run(io: &mut IoQueue, sqe: Sqe, data: Option<(Vec<u8>, u32)>) -> (Cqe, Option<Vec<u8>>) {
    let cid = io.submit_command(sqe, data).expect("submit");
    let (got, done) = io.next_completion().expect("completion");
    assert_eq!(got, cid);
    (done.cqe, done.buf)
}

fn rw(op: IoOpcode, nsid: u32, lba: u64, blocks: u32) -> Sqe {
    RwCommand::simple(lba, blocks).to_sqe(op as u8, 0, nsid)
}

fn copy(nsid: u32, sdlba: u64, ranges: &[(u64, u32)]) -> (Sqe, Option<(Vec<u8>, u32)>) {
    let mut list = Vec::new();
    for &(slba, n) in ranges {
        let r = CopyRange {
            slba,
            nlb: (n - 1) as u16,
        };
        list.extend_from_slice(&r.to_bytes());
    }
    let len = list.len() as u32;
    (
        CopyCommand::simple(sdlba, ranges.len()).to_sqe(0, nsid),
        Some((list, len)),
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(37) ^ (i as u8) ^ seed)
        .collect()
}

fn smart(c: &Controller, nsid: u32) -> SmartLog {
    let b = c
        .get_log_page(0x02, nsid, 0, 512)
        .expect("SMART / Health log");
    SmartLog::decode(b[..512].try_into().unwrap())
}

fn error_log(c: &Controller, entries: usize) -> Vec<ErrorLogEntry> {
    let b = c
        .get_log_page(0x01, 0, 0, (entries * 64) as u32)
        .expect("Error Information log");
    b.chunks_exact(64)
        .map(|e| ErrorLogEntry::decode(e.try_into().unwrap()))
        .collect()
}

fn lines_with(console: &str, what: &str) -> usize {
    console.lines().filter(|l| l.contains(what)).count()
}

/// Verify and Read commands the drive received so far (QEMU's `pci_nvme_io_cmd` trace).
fn drive_reads(q: &Qemu) -> (usize, usize) {
    // The trace is written by QEMU's stderr reader thread; give it a moment to catch up.
    std::thread::sleep(Duration::from_millis(300));
    let c = q.console();
    (
        lines_with(&c, "NVME_NVM_CMD_VERIFY"),
        lines_with(&c, "NVME_NVM_CMD_READ"),
    )
}

#[test]
fn error_log_smart_verify_copy_and_zeroes_on_ram_drive_and_xts() {
    let disk = ScratchFile::new("health-drive.img", 32 << 20);
    let append = format!("keel.ns=ram:64,drive:0,ram:32 keel.xts=3:{KEY}");
    let (q, port) = boot_nvmf(&[
        "--disk",
        disk.path().to_str().unwrap(),
        "--append",
        &append,
        "--",
        "-trace",
        "pci_nvme_io_cmd",
    ]);
    let c = Controller::connect(params(port)).unwrap_or_else(|e| panic!("connect: {e}"));
    let id = IdentifyController::decode(&c.identify(1, 0).unwrap());
    let want = Oncs::VERIFY | Oncs::COPY | Oncs::WRITE_ZEROES | Oncs::DSM | Oncs::COMPARE;
    assert!(id.oncs.contains(want), "ONCS {:?}", id.oncs);
    assert_eq!(
        (id.ocfs, id.elpe, id.lpa.contains(Lpa::SMART_PER_NAMESPACE)),
        (Ocfs::FORMAT_0, 63, true)
    );
    // DLFEAT: RAM reads deallocated blocks as zeroes; the encrypted namespace reports nothing.
    assert_eq!(c.identify_namespace(1).unwrap().dlfeat, 0x09);
    assert_eq!(c.identify_namespace(3).unwrap().dlfeat, 0x00);
    let n1 = c.identify_namespace(1).unwrap();
    assert!(n1.mssrl > 0 && n1.mcl >= n1.mssrl as u32 && n1.msrc > 0);
    c.set_io_queues(1).unwrap();
    let mut io = c.io_queue(1, 16).unwrap();

    // A read past the end fails; its entry is the newest of the Error Information log.
    let blocks1 = n1.nsze;
    let (cqe, _) = run(
        &mut io,
        rw(IoOpcode::Read, 1, blocks1 - 1, 2),
        Some((vec![0; 1024], 1024)),
    );
    assert_eq!((cqe.status.sct, cqe.status.sc), (0, 0x80));
    assert!(cqe.status.more, "More: the error log has details");
    let log = error_log(&c, 64);
    let e = log[0];
    assert_eq!(e.error_count, 1);
    assert_eq!((e.sqid, e.cid, e.nsid), (1, cqe.cid, 1));
    assert_eq!((e.status >> 1) & 0xFF, 0x80);
    assert_eq!((e.param_error_location, e.lba), (40, blocks1 - 1));
    assert!(log[1..].iter().all(|e| e.error_count == 0));

    for nsid in [1u32, 2, 3] {
        let what = format!("NSID {nsid}");
        // Copy: two ranges, in reverse order, within the namespace.
        let src = pattern(64 * 512, nsid as u8);
        io.write(nsid, 100, &src, 512).unwrap();
        let (sqe, data) = copy(nsid, 1000, &[(132, 32), (100, 32)]);
        let (cqe, _) = run(&mut io, sqe, data);
        assert!(cqe.status.is_success(), "Copy on {what}: {}", cqe.status);
        let back = io.read(nsid, 1000, 64, 512).unwrap();
        assert!(back[..16384] == src[16384..], "Copy on {what}: first range");
        assert!(
            back[16384..] == src[..16384],
            "Copy on {what}: second range"
        );
        // Verify reads; past the end it is refused. On the drive: a Verify of its own if it
        // offers the command, else Reads (into a sink buffer): either way the drive reads.
        let before = drive_reads(&q);
        let (cqe, _) = run(&mut io, rw(IoOpcode::Verify, nsid, 0, 4096), None);
        assert!(cqe.status.is_success(), "Verify on {what}: {}", cqe.status);
        if nsid == 2 {
            let after = drive_reads(&q);
            assert!(
                after.0 > before.0 || after.1 >= before.1 + 16,
                "the drive did not read for Verify: {before:?} -> {after:?}"
            );
        }
        let nsze = c.identify_namespace(nsid).unwrap().nsze;
        let (cqe, _) = run(&mut io, rw(IoOpcode::Verify, nsid, nsze - 1, 2), None);
        assert_eq!((cqe.status.sct, cqe.status.sc), (0, 0x80), "{what}");
        // Write Zeroes reads back zeroes (on the encrypted namespace: encrypted zeroes).
        let (cqe, _) = run(&mut io, rw(IoOpcode::WriteZeroes, nsid, 110, 40), None);
        assert!(
            cqe.status.is_success(),
            "Write Zeroes on {what}: {}",
            cqe.status
        );
        let back = io.read(nsid, 100, 64, 512).unwrap();
        assert!(back[..5120] == src[..5120], "{what}: before the zeroes");
        assert!(back[5120..25600].iter().all(|&b| b == 0), "{what}: zeroes");
        assert!(back[25600..] == src[25600..], "{what}: after the zeroes");
    }

    // SMART / Health, per namespace and for the controller.
    let s1 = smart(&c, 1);
    // NSID 1: 64 blocks written, 2 x 64 blocks read back, 4096 verified (Copy's own reads
    // and writes are not host commands).
    assert_eq!((s1.host_write_commands, s1.host_read_commands), (1, 2));
    assert_eq!(s1.data_units_written, 1);
    assert_eq!(s1.data_units_read, (128u128 + 4096).div_ceil(1000));
    let all = smart(&c, 0xFFFF_FFFF);
    assert_eq!(all.host_write_commands, 3);
    assert_eq!(all.host_read_commands, 6);
    assert_eq!(
        all.num_error_log_entries, 4,
        "the read and three Verify past the end"
    );
    assert_eq!(all.composite_temperature, 0, "no sensor under QEMU");
    assert_eq!((all.power_cycles, all.unsafe_shutdowns), (1, 0));
    assert_eq!(all.media_errors, 0);
    io.close().unwrap();
    c.close().unwrap();
}

#[test]
fn power_cycles_and_unsafe_shutdowns_persist_in_flash() {
    // The release image in a flash file of our own (a flash boot writes to it).
    // qemu/run's flash boots make the development identity with the release keelctl.
    build_release_keelctl();
    let flash = ScratchFile::new("health.flash", 64 << 20);
    std::fs::copy(keel_tests::flash_image(Build::Release), flash.path()).expect("copy flash");
    let key = root().join("qemu/dev-keys/provision.key");
    let boot_flash = || {
        let nport = free_port();
        let mport = free_port();
        let args = [
            "--flash".to_string(),
            flash.path().display().to_string(),
            "--nvmf-port".into(),
            nport.to_string(),
            "--mgmt-port".into(),
            mport.to_string(),
            "--".into(),
            "-action".into(),
            "reboot=reset".into(),
        ];
        let mut q = Qemu::start(&args);
        q.wait_for("keel: ready", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        (q, nport, format!("127.0.0.1:{mport}"))
    };
    let counts = |port: u16| {
        let c = Controller::connect(params(port)).unwrap_or_else(|e| panic!("connect: {e}"));
        let s = smart(&c, 0xFFFF_FFFF);
        c.close().unwrap();
        (s.power_cycles, s.unsafe_shutdowns)
    };

    // A fresh flash: the first power cycle.
    let (mut q, port, _) = boot_flash();
    assert!(
        q.console()
            .contains("health: power cycle 1, 0 unsafe shutdown(s)"),
        "{}",
        q.console()
    );
    assert_eq!(counts(port), (1, 0));
    // Killed: no clean shutdown record.
    q.kill();
    let (mut q, port, mgmt) = boot_flash();
    assert_eq!(counts(port), (2, 1));
    // An orderly reboot records its clean shutdown; the next power cycle is not unsafe.
    keelctl_ok(&["reboot", "--device", &mgmt, "--key", key.to_str().unwrap()]);
    q.wait_for("health: clean shutdown recorded", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    q.wait_for("health: power cycle 3, 1 unsafe shutdown(s)", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.console().matches("keel: ready").count(), 2);
    assert_eq!(counts(port), (3, 1));
    q.kill();
    // The counts live in the file: a new QEMU reads them.
    let (mut q, port, _) = boot_flash();
    assert_eq!(counts(port), (4, 2));
    q.kill();
}

#[test]
fn abort_of_a_command_outstanding_on_a_slow_drive_reaches_the_drive() {
    // A drive throttled to 32 KiB/s of reads: the first 128 KiB read passes, the next one
    // waits several seconds in QEMU, long enough to abort it.
    let disk = ScratchFile::new("health-slow.img", 8 << 20);
    let drive = format!(
        "if=none,id=slow,format=raw,file={},throttling.bps-read=32768",
        disk.path().display()
    );
    let (q, port) = boot_nvmf(&[
        "--append",
        "keel.ns=drive:0",
        "--",
        "-drive",
        &drive,
        "-device",
        "nvme,serial=keel-slow,drive=slow",
        "-trace",
        "pci_nvme_admin_cmd",
    ]);
    let c = Controller::connect(params(port)).unwrap_or_else(|e| panic!("connect: {e}"));
    c.set_io_queues(1).unwrap();
    let mut io = c.io_queue(1, 4).unwrap();
    let len = 128 << 10;
    let first = io
        .submit_command(
            rw(IoOpcode::Read, 1, 0, 256),
            Some((vec![0; len], len as u32)),
        )
        .unwrap();
    let second = io
        .submit_command(
            rw(IoOpcode::Read, 1, 256, 256),
            Some((vec![0; len], len as u32)),
        )
        .unwrap();
    // QEMU's throttle lets one of the two through first (which one is QEMU's choice); the
    // other waits several seconds.
    let (got, done) = io.next_completion().unwrap();
    assert!(got == first || got == second, "cid {got}");
    assert!(done.cqe.status.is_success());
    let slow = if got == first { second } else { first };
    // Abort the one QEMU holds.
    let abort = AbortCommand {
        sqid: io.qid(),
        cid: slow,
    }
    .to_sqe(0);
    let acid = c.submit_admin(abort, None).unwrap();
    let (got, done) = io.next_completion().unwrap();
    assert_eq!(got, slow);
    let a = c
        .wait_admin(acid, Duration::from_secs(30), "Abort")
        .unwrap()
        .expect("the Abort completes");
    // The drive decides: aborted (Command Abort Requested, DW0 bit 0 clear) or finished
    // anyway (success, DW0 bit 0 set: QEMU 7.2 cannot cancel a throttled read).
    let st = done.cqe.status;
    if st.is_success() {
        assert_eq!(a.cqe.dw0 & 1, 1, "completed, so not aborted");
    } else {
        assert_eq!((st.sct, st.sc), (0, 0x07), "{st}");
        assert_eq!(a.cqe.dw0 & 1, 0, "aborted");
    }
    // The firmware sent the drive an Abort for it.
    let console = q.console();
    assert!(
        console.contains("(host request)"),
        "no Abort sent to the drive:\n{console}"
    );
    assert!(
        lines_with(&console, "NVME_ADM_CMD_ABORT") >= 1,
        "QEMU's drive saw no Abort"
    );
    io.close().unwrap();
    c.close().unwrap();
}
