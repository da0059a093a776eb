//! The device keeps serving other namespaces while a drive fails (issue 13, "Faults from the
//! network and from the drive"): the real image in QEMU with three namespaces,
//!
//! 1. a healthy QEMU NVMe drive (drive 0, `--disk`),
//! 2. a failing QEMU NVMe drive (drive 1): QEMU's `blkdebug` driver between it and its file
//!    fails every read and every write with EIO,
//! 3. a RAM namespace.
//!
//! While a host hammers namespace 2 (reads and writes, 16 in flight), verifying workloads
//! (`keelctl nvme bench --verify`: stamped blocks, every read checked, everything read back)
//! run on namespaces 1 and 3 with a 30 s command timeout (Linux's default I/O timeout). They
//! must finish with no failed command and no verify error; every command on namespace 2 must
//! complete (none hangs) with the NVMe media status QEMU's error maps to (Unrecovered Read
//! Error for reads, Write Fault for writes, NVM Command Set 1.0 Figure 80 via base 2.0
//! Figure 104), the More bit set and an Error Information log entry naming NSID 2; afterwards
//! the device is back at rest (management status).

use keel_host_tools::nvme::{Controller, IoQueue, Params};
use keel_nvme::io::RwCommand;
use keel_nvme::{IoOpcode, Status};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, assert_back_at_rest, blkdebug_nvme_args, error_log,
    free_port, keelctl_in_background, logged_status, mgmt_status,
};
use std::time::Duration;

/// blkdebug rules (QEMU docs/devel/blkdebug.txt): with no sector, every I/O of the type
/// fails, from the first one on.
const RULES: &str = "[inject-error]\nevent = \"read_aio\"\niotype = \"read\"\nerrno = \"5\"\n\n\
                     [inject-error]\nevent = \"write_aio\"\niotype = \"write\"\nerrno = \"5\"\n";

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d71fe000-0000-4000-8000-0000000000d2";
const FAULTY: u32 = 2;
const BS: u32 = 512;

/// Submits `n` commands at once to the faulty namespace (reads and writes alternating, 8
/// blocks each, spread over it), waits for all: (reads, writes) completed, each checked.
fn hammer(io: &mut IoQueue, round: u64, n: u64, blocks: u64) -> (u64, u64) {
    let (mut reads, mut writes) = (0, 0);
    let mut kinds = std::collections::HashMap::new();
    for i in 0..n {
        let lba = ((round * n + i) * 4099 * 8) % (blocks - 8);
        let write = i % 2 == 1;
        // The data of a write, room for a read's.
        let op = if write {
            IoOpcode::Write
        } else {
            IoOpcode::Read
        };
        let data = Some((vec![0xa5; 8 * BS as usize], 8 * BS));
        let sqe = RwCommand::simple(lba, 8).to_sqe(op as u8, 0, FAULTY);
        let cid = io
            .submit_command(sqe, data)
            .expect("submit to the faulty namespace");
        kinds.insert(cid, (write, lba));
    }
    for _ in 0..n {
        // Bounded by the queue's command timeout: a hang fails here.
        let (cid, done) = io
            .next_completion()
            .expect("a command on the faulty namespace did not complete");
        let (write, lba) = kinds.remove(&cid).expect("a completion per command");
        let s = done.cqe.status;
        let want = if write {
            Status::WRITE_FAULT
        } else {
            Status::UNRECOVERED_READ_ERROR
        };
        assert!(s.more, "{s:?}: no Error Information log entry (More)");
        assert_eq!(
            Status { more: false, ..s },
            want,
            "{} LBA {lba} on the failing drive",
            if write { "Write" } else { "Read" }
        );
        if write {
            writes += 1;
        } else {
            reads += 1;
        }
    }
    (reads, writes)
}

#[test]
fn a_failing_drive_gets_error_statuses_while_the_other_namespaces_keep_serving() {
    let healthy = ScratchFile::new("drive-fault-healthy.img", 32 << 20);
    let failing = ScratchFile::new("drive-fault-failing.img", 32 << 20);
    let rules = ScratchFile::new("drive-fault.blkdebug", 0);
    std::fs::write(rules.path(), RULES).expect("blkdebug rules");
    let port = free_port();
    let mport = free_port();
    let mut args: Vec<String> = vec![
        "--nvmf-port".into(),
        port.to_string(),
        "--mgmt-port".into(),
        mport.to_string(),
        "--disk".into(),
        healthy.path().display().to_string(),
        "--append".into(),
        "keel.ns=drive:0,drive:1,ram:32".into(),
        "--".into(),
    ];
    args.extend(blkdebug_nvme_args("bad0", rules.path(), failing.path(), ""));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::boot(Build::Release, &argv);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mgmt = format!("127.0.0.1:{mport}");
    let idle = mgmt_status(&mgmt);
    let addr = format!("127.0.0.1:{port}");

    let p = Params {
        timeout: Duration::from_secs(30),
        ..Params::new(addr.clone(), keel_host_tools::nvme::DEFAULT_SUBNQN, HOSTNQN)
    };
    let ctrl = Controller::connect(p).expect("connect");
    let blocks = ctrl.identify_namespace(FAULTY).expect("Identify").nsze;
    assert_eq!(
        blocks,
        (32 << 20) / u64::from(BS),
        "namespace 2 is the failing drive"
    );
    ctrl.set_io_queues(1).expect("Number of Queues");
    let mut io = ctrl.io_queue(1, 16).expect("I/O queue");

    // Verifying workloads on the healthy drive (1) and on RAM (3).
    let bench = |nsid: &str| {
        keelctl_in_background(
            &[
                "nvme",
                "bench",
                "--addr",
                &addr,
                "--timeout",
                "30",
                "--nsid",
                nsid,
                "--connections",
                "2",
                "--qd",
                "32",
                "--rw",
                "mix",
                "--mix-read",
                "50",
                "--duration",
                "15",
                "--verify",
                "--json",
            ],
            Duration::from_secs(300),
        )
    };
    let others = [bench("1"), bench("3")];
    let (mut reads, mut writes, mut round) = (0, 0, 0);
    while others.iter().any(|b| !b.is_finished()) {
        let (r, w) = hammer(&mut io, round, 16, blocks);
        reads += r;
        writes += w;
        round += 1;
    }
    eprintln!("faulty namespace: {reads} reads and {writes} writes, each failed as it should");
    assert!(reads > 0 && writes > 0);
    for (nsid, b) in [1, 3].into_iter().zip(others) {
        let r = b.join().expect("bench thread");
        assert_eq!(r.code, 0, "namespace {nsid}: {r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("bench JSON");
        let checked = v["verify"]["load_blocks"].as_u64().unwrap_or(0)
            + v["verify"]["readback_blocks"].as_u64().unwrap_or(0);
        eprintln!(
            "namespace {nsid}: {} commands, {:.0} IOPS, {checked} blocks verified, {} errors",
            v["ios"],
            v["iops"].as_f64().unwrap_or(0.0),
            v["verify"]["errors"]
        );
        assert_eq!(v["verify"]["errors"].as_u64(), Some(0), "{v}");
        assert!(v["reads"].as_u64() > Some(0) && checked > 0, "{v}");
    }

    // The failures are logged against namespace 2 (Error Information log, newest first).
    let logged = error_log(&ctrl);
    assert!(!logged.is_empty());
    for st in [Status::UNRECOVERED_READ_ERROR, Status::WRITE_FAULT] {
        assert!(
            logged
                .iter()
                .any(|e| logged_status(e, st) && e.nsid == FAULTY),
            "{st:?} on NSID {FAULTY}: {logged:#?}"
        );
    }
    assert!(logged.iter().all(|e| e.nsid == FAULTY), "{logged:#?}");
    let _ = io.close();
    let _ = ctrl.close();
    assert_back_at_rest(&q, &mgmt, &idle);
    q.kill();
}
