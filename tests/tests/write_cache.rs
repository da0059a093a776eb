//! The volatile write cache tells the truth, and drive faults surface as the right NVMe
//! status, on the real path: the real image in QEMU over a QEMU NVMe drive whose block backend
//! caches writes (`cache=writeback`) and injects I/O errors (QEMU's `blkdebug` driver between
//! the drive and its file). QEMU's trace of the NVMe commands the drive receives
//! (`-trace pci_nvme_io_cmd`) shows what reached it.
//!
//! - Identify VWC is the drive's: the firmware keeps no cache of its own (a write or Flush is
//!   completed to the host with the drive's own result: a Flush the drive fails fails).
//! - Flush over NVMe/TCP reaches the drive.
//! - FUA is carried to the drive's command (checked on the submission queue entry against the
//!   fake controller in `keel-nvme-driver`, and in `keel-controller`'s write-through test):
//!   QEMU 7.2's NVMe device hands writes to its block layer without flags (its flush counter
//!   in `query-blockstats` does not count NVMe Flush either), so QEMU cannot show it.
//! - A read error on one sector is Unrecovered Read Error (media errors 81h) for the commands
//!   that cover it, a write error Write Fault (80h), each with the More bit and an Error
//!   Information log entry; the neighbours keep working, nothing hangs.

use keel_host_tools::nvme::{Controller, IoQueue, Params};
use keel_nvme::identify::{Vwc, cns};
use keel_nvme::io::{FeaturesCommand, RwCommand};
use keel_nvme::{IoOpcode, Sqe, Status};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, blkdebug_nvme_args, error_log, free_port, logged_status,
};
use std::time::{Duration, Instant};

/// Volatile Write Cache feature (NVMe Base 2.0 Figure 294, FID 06h).
const FID_VWC: u8 = 0x06;
/// The sector whose reads fail, and the one whose writes fail.
const BAD_READ: u64 = 4000;
const BAD_WRITE: u64 = 6000;

/// blkdebug rules (QEMU docs/devel/blkdebug.txt): errors become armed when their event fires
/// and hit the I/O of their type covering their sector; the first flush to disk fails once.
fn blkdebug_config() -> String {
    format!(
        "[inject-error]\nevent = \"read_aio\"\niotype = \"read\"\nerrno = \"5\"\nsector = \"{BAD_READ}\"\n\n\
         [inject-error]\nevent = \"write_aio\"\niotype = \"write\"\nerrno = \"5\"\nsector = \"{BAD_WRITE}\"\n\n\
         [inject-error]\nevent = \"flush_to_disk\"\niotype = \"flush\"\nerrno = \"5\"\nonce = \"on\"\n"
    )
}

/// How many commands named `opname` the drive has received, waiting up to 10 s for at least
/// `want` (the console is read by another thread).
fn drive_saw(q: &Qemu, opname: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = q
            .console()
            .lines()
            .filter(|l| l.starts_with("pci_nvme_io_cmd") && l.contains(opname))
            .count();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs one command; returns its status type and code (an error must also set More: it has
/// an Error Information log entry).
fn run(io: &mut IoQueue, sqe: Sqe, data: Option<Vec<u8>>) -> Status {
    let data = data.map(|d| {
        let n = d.len() as u32;
        (d, n)
    });
    io.submit_command(sqe, data).expect("submit");
    let (_, done) = io.next_completion().expect("completion");
    let s = done.cqe.status;
    assert_eq!(s.more, !s.is_success(), "More bit of {s:?}");
    Status { more: false, ..s }
}

fn rw(op: IoOpcode, lba: u64, nlb: u32, fua: bool) -> Sqe {
    let mut c = RwCommand::simple(lba, nlb);
    c.fua = fua;
    c.to_sqe(op as u8, 0, 1)
}

#[test]
fn the_write_cache_is_the_drives_and_drive_errors_reach_the_host() {
    let drive = ScratchFile::new("write-cache.img", 64 << 20);
    let rules = ScratchFile::new("write-cache.blkdebug", 0);
    std::fs::write(rules.path(), blkdebug_config()).expect("blkdebug rules");
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--nvmf-port".into(),
        port.to_string(),
        "--append".into(),
        "keel.ns=drive:0".into(),
        "--".into(),
    ];
    args.extend(blkdebug_nvme_args(
        "wb0",
        rules.path(),
        drive.path(),
        ",cache=writeback",
    ));
    args.extend(["-trace".into(), "enable=pci_nvme_io_cmd".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::boot(Build::Release, &argv);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    let p = Params {
        timeout: Duration::from_secs(30),
        ..Params::new(
            format!("127.0.0.1:{port}"),
            keel_host_tools::nvme::DEFAULT_SUBNQN,
            "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-0000-4000-8000-0000000000c0",
        )
    };
    let ctrl = Controller::connect(p).expect("connect");
    // QEMU's NVMe device reports a volatile write cache (hw/nvme/ctrl.c sets VWC present);
    // the firmware passes it on (Identify Controller byte 525 bit 0) with the cache on.
    assert!(ctrl.id.vwc.contains(Vwc::PRESENT), "VWC {:?}", ctrl.id.vwc);
    let wce = ctrl
        .admin_command(
            FeaturesCommand::get_sqe(0, FID_VWC, 0),
            None,
            "Get Features",
        )
        .expect("Get Features 06h")
        .cqe
        .dw0;
    assert_eq!(wce & 1, 1, "the cache is reported off");
    let ns = ctrl
        .identify(cns::NAMESPACE, 1)
        .expect("identify namespace");
    let bs = keel_nvme::identify::IdentifyNamespace::decode(&ns).block_size() as usize;
    assert_eq!(bs, 512, "the blkdebug sectors assume 512-byte blocks");
    let mut io = ctrl.io_queue(1, 8).expect("I/O queue");
    let flush = Sqe::new(IoOpcode::Flush as u8, 0).with_nsid(1);
    let block = |b: u8, n: usize| Some(vec![b; n * bs]);

    // Writes with and without FUA, then the first Flush: the drive fails it, so must we.
    for (i, fua) in [false, true, false].into_iter().enumerate() {
        let s = run(
            &mut io,
            rw(IoOpcode::Write, 8 * i as u64, 8, fua),
            block(1, 8),
        );
        assert_eq!(s, Status::SUCCESS, "write {i}");
    }
    assert_eq!(
        run(&mut io, flush, None),
        Status::WRITE_FAULT,
        "a Flush the drive failed was completed as a success: the firmware acknowledged \
         from a cache of its own"
    );
    assert_eq!(drive_saw(&q, "NVME_NVM_CMD_FLUSH", 1), 1);
    // The next Flushes succeed, each one sent to the drive.
    for n in 2..=4 {
        assert_eq!(run(&mut io, flush, None), Status::SUCCESS);
        assert_eq!(
            drive_saw(&q, "NVME_NVM_CMD_FLUSH", n),
            n,
            "Flush {n} at the drive"
        );
    }

    // A bad sector to read: every read covering it fails, its neighbours read.
    let s = run(
        &mut io,
        rw(IoOpcode::Write, BAD_READ - 4, 9, true),
        block(2, 9),
    );
    assert_eq!(s, Status::SUCCESS);
    for (lba, nlb) in [(BAD_READ, 1), (BAD_READ - 4, 9), (BAD_READ - 1, 2)] {
        assert_eq!(
            run(
                &mut io,
                rw(IoOpcode::Read, lba, nlb, false),
                block(0, nlb as usize)
            ),
            Status::UNRECOVERED_READ_ERROR,
            "read of {nlb} at {lba}"
        );
    }
    for lba in [BAD_READ - 1, BAD_READ + 1] {
        let b = io.read(1, lba, 1, bs as u32).expect("read");
        assert!(
            b.iter().all(|&b| b == 2),
            "LBA {lba} next to the bad sector"
        );
    }

    // A bad sector to write: Write Fault, and the neighbours take their writes.
    assert_eq!(
        run(
            &mut io,
            rw(IoOpcode::Write, BAD_WRITE, 1, false),
            block(3, 1)
        ),
        Status::WRITE_FAULT
    );
    assert_eq!(
        run(
            &mut io,
            rw(IoOpcode::Write, BAD_WRITE - 2, 4, true),
            block(3, 4)
        ),
        Status::WRITE_FAULT
    );
    for lba in [BAD_WRITE - 1, BAD_WRITE + 1] {
        assert_eq!(
            run(&mut io, rw(IoOpcode::Write, lba, 1, true), block(4, 1)),
            Status::SUCCESS
        );
        let b = io.read(1, lba, 1, bs as u32).expect("read");
        assert!(
            b.iter().all(|&b| b == 4),
            "LBA {lba} next to the bad sector"
        );
    }

    // Each failure has its Error Information log entry (LID 01h, 64 bytes each): status,
    // NSID and the LBA of the command.
    let logged = error_log(&ctrl);
    let has = |st: Status, lbas: std::ops::RangeInclusive<u64>| {
        logged
            .iter()
            .any(|e| logged_status(e, st) && e.nsid == 1 && lbas.contains(&e.lba))
    };
    assert!(
        has(Status::UNRECOVERED_READ_ERROR, BAD_READ - 4..=BAD_READ),
        "{logged:#?}"
    );
    assert!(
        has(Status::WRITE_FAULT, BAD_WRITE - 2..=BAD_WRITE),
        "{logged:#?}"
    );

    // The device is still whole: the first writes read back, a Flush succeeds.
    let first = io.read(1, 0, 24, bs as u32).expect("read");
    assert!(first.iter().all(|&b| b == 1), "the first writes changed");
    assert_eq!(run(&mut io, flush, None), Status::SUCCESS);
    let _ = io.close();
    let _ = ctrl.close();
    q.kill();
}
