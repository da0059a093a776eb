//! Bad input from the host, end to end: the release firmware in QEMU serves an emulated NVMe
//! function on an `ivshmem` window, and this test is a hostile host that writes the window's
//! registers, doorbells, queue entries and PRPs byte by byte (no driver library in between, so
//! nothing "fixes" the bad values on the way). After every abuse the firmware must still be
//! alive: no panic or CPU exception on its console, a fresh reset + Identify through the
//! `keelctl host` driver works, and NVMe/TCP on the same firmware still serves.
//!
//! Expected behaviour (NVMe base 2.0 and `keel_nvme_pcie`'s documentation): bad AQA/ASQ/ACQ
//! or CC at enable → CSTS.CFS, cleared by CC.EN = 0; Create I/O CQ/SQ with a bad QID, size,
//! base, vector or CQ → the spec's status; a doorbell value beyond its queue → CSTS.CFS; PRPs
//! outside host memory → Data Transfer Error (and no DMA outside it); misaligned PRP entries →
//! PRP Offset Invalid; commands on a deleted queue are never fetched.

use keel_host_tools::host::{HostConfig, HostController, Window};
use keel_host_tools::nvme::{Controller, Params, default_host_identity};
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, ScratchFile, free_port};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Window size (a power of two, as ivshmem requires).
const WINDOW: u64 = 16 << 20;
/// Bound on any single wait for the firmware (TCG on a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(20);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(700);

// Registers (NVMe base 2.0 §3.1.3) and window layout (keel_nvme_pcie::layout).
const CAP: usize = 0x00;
const CC: usize = 0x14;
const CSTS: usize = 0x1C;
const AQA: usize = 0x24;
const ASQ: usize = 0x28;
const ACQ: usize = 0x30;
const DOORBELLS: usize = 0x1000;
const INTERRUPTS: usize = 0x2000;
const HEADER: usize = 0x3000;
const HOST_AREA: u64 = 0x10000;
const PAGE: u64 = 4096;

/// CC.EN = 1, IOSQES = 6, IOCQES = 4, CSS NVM, MPS 4 KiB, AMS round robin.
const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);

// Fixed host-memory addresses of this test's queues and buffers (all inside the host area).
const ASQ_ADDR: u64 = 0x10000;
const ACQ_ADDR: u64 = 0x11000;
const ADMIN_DATA: u64 = 0x12000;
const IO_SQ: u64 = 0x20000;
const IO_CQ: u64 = 0x28000;
const PRP_LIST: u64 = 0x30000;
const IO_DATA: u64 = 0x40000;
const ADMIN_ENTRIES: u16 = 32;

// Admin opcodes.
const DELETE_SQ: u8 = 0x00;
const CREATE_SQ: u8 = 0x01;
const DELETE_CQ: u8 = 0x04;
const CREATE_CQ: u8 = 0x05;
const IDENTIFY: u8 = 0x06;
const SET_FEATURES: u8 = 0x09;
// I/O opcodes.
const WRITE: u8 = 0x01;
const READ: u8 = 0x02;

/// (SCT, SC) of the statuses this test expects.
type St = (u8, u8);
const SUCCESS: St = (0, 0x00);
const INVALID_FIELD: St = (0, 0x02);
const DATA_TRANSFER_ERROR: St = (0, 0x04);
const PRP_OFFSET_INVALID: St = (0, 0x13);
const CQ_INVALID: St = (1, 0x00);
const INVALID_QID: St = (1, 0x01);
const INVALID_QSIZE: St = (1, 0x02);
const INVALID_VECTOR: St = (1, 0x08);
const INVALID_DELETION: St = (1, 0x0C);

fn doorbell(index: u16) -> usize {
    DOORBELLS + index as usize * 4
}

fn sq_tail(qid: u16) -> usize {
    doorbell(qid * 2)
}

fn cq_head(qid: u16) -> usize {
    doorbell(qid * 2 + 1)
}

/// A completion entry, decoded.
#[derive(Debug, Clone, Copy)]
struct Cqe {
    dw0: u32,
    sqid: u16,
    cid: u16,
    st: St,
}

/// A 64-byte submission entry.
#[derive(Clone, Copy)]
struct Sqe([u8; 64]);

impl Sqe {
    fn new(opcode: u8) -> Self {
        let mut b = [0u8; 64];
        b[0] = opcode;
        Sqe(b)
    }
    fn nsid(mut self, nsid: u32) -> Self {
        self.0[4..8].copy_from_slice(&nsid.to_le_bytes());
        self
    }
    fn prps(mut self, p1: u64, p2: u64) -> Self {
        self.0[24..32].copy_from_slice(&p1.to_le_bytes());
        self.0[32..40].copy_from_slice(&p2.to_le_bytes());
        self
    }
    fn cdw(mut self, n: usize, v: u32) -> Self {
        let o = 40 + (n - 10) * 4;
        self.0[o..o + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    /// Read/Write of `blocks` 512-byte blocks at `lba` of namespace 1.
    fn rw(opcode: u8, lba: u64, blocks: u32) -> Self {
        Sqe::new(opcode)
            .nsid(1)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, blocks - 1)
    }
    fn create_cq(qid: u16, entries: u16, base: u64, vector: u16, flags: u32) -> Self {
        Sqe::new(CREATE_CQ)
            .prps(base, 0)
            .cdw(10, ((entries as u32).wrapping_sub(1) << 16) | qid as u32)
            .cdw(11, ((vector as u32) << 16) | flags)
    }
    fn create_sq(qid: u16, entries: u16, base: u64, cqid: u16, flags: u32) -> Self {
        Sqe::new(CREATE_SQ)
            .prps(base, 0)
            .cdw(10, ((entries as u32).wrapping_sub(1) << 16) | qid as u32)
            .cdw(11, ((cqid as u32) << 16) | flags)
    }
}

/// One SQ/CQ pair in host memory, driven by hand.
#[derive(Debug)]
struct RawQ {
    qid: u16,
    sq: u64,
    cq: u64,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    next_cid: u16,
}

impl RawQ {
    fn new(win: &Window, qid: u16, sq: u64, cq: u64, entries: u16) -> Self {
        win.zero(cq as usize, entries as usize * 16);
        RawQ {
            qid,
            sq,
            cq,
            entries,
            tail: 0,
            head: 0,
            phase: true,
            next_cid: 0,
        }
    }

    /// Writes the entry at the tail and rings the SQ tail doorbell; returns the CID.
    fn submit(&mut self, win: &Window, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        win.write((self.sq + self.tail as u64 * 64) as usize, &sqe.0);
        self.tail = (self.tail + 1) % self.entries;
        win.store32(sq_tail(self.qid), self.tail as u32);
        cid
    }

    fn poll(&mut self, win: &Window) -> Option<Cqe> {
        let at = (self.cq + self.head as u64 * 16) as usize;
        let dw3 = win.load32(at + 12);
        if ((dw3 >> 16) & 1 != 0) != self.phase {
            return None;
        }
        let status = (dw3 >> 17) as u16;
        let cqe = Cqe {
            dw0: win.load32(at),
            sqid: (win.load32(at + 8) >> 16) as u16,
            cid: dw3 as u16,
            st: (((status >> 8) & 7) as u8, status as u8),
        };
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        win.store32(cq_head(self.qid), self.head as u32);
        Some(cqe)
    }

    /// The next completion; fails on CSTS.CFS or after [`WAIT`].
    fn wait(&mut self, win: &Window) -> Result<Cqe, String> {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.poll(win) {
                return Ok(c);
            }
            let csts = win.load32(CSTS);
            if csts & 2 != 0 {
                return Err(format!("CSTS.CFS set (CSTS {csts:#x})"));
            }
            if t0.elapsed() > WAIT {
                return Err(format!(
                    "no completion on queue {} within {WAIT:?}",
                    self.qid
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Submits and waits for that command's completion.
    fn run(&mut self, win: &Window, sqe: Sqe) -> Cqe {
        let opcode = sqe.0[0];
        let cid = self.submit(win, sqe);
        let c = self
            .wait(win)
            .unwrap_or_else(|e| panic!("opcode {opcode:#04x} on queue {}: {e}", self.qid));
        assert_eq!(c.cid, cid, "completion for another command: {c:?}");
        assert_eq!(c.sqid, self.qid, "completion names another SQ: {c:?}");
        c
    }

    /// Watches the CQ for [`QUIET`]; returns what was posted.
    fn quiet(&mut self, win: &Window) -> Option<Cqe> {
        let t0 = Instant::now();
        while t0.elapsed() < QUIET {
            if let Some(c) = self.poll(win) {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

/// Waits until `f(CSTS)` holds; returns CSTS.
fn wait_csts(win: &Window, what: &str, f: impl Fn(u32) -> bool) -> u32 {
    let t0 = Instant::now();
    loop {
        let c = win.load32(CSTS);
        if f(c) {
            return c;
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out waiting for {what} (CSTS {c:#x})"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// CC.EN = 0 and wait for CSTS = 0 (RDY and CFS clear): the recovery from any fatal state.
fn disable(win: &Window) {
    win.store32(CC, 0);
    let c = wait_csts(win, "CSTS = 0 after CC.EN = 0", |c| c & 3 == 0);
    assert_eq!(c & 0xF, 0, "CSTS after reset {c:#x}");
}

/// Programs AQA/ASQ/ACQ, writes CC and waits for RDY or CFS; returns CSTS.
fn try_enable(win: &Window, aqa: u32, asq: u64, acq: u64, cc: u32) -> u32 {
    disable(win);
    win.zero(ACQ_ADDR as usize, PAGE as usize);
    win.store32(AQA, aqa);
    win.store64(ASQ, asq);
    win.store64(ACQ, acq);
    win.store32(CC, cc);
    wait_csts(win, "CSTS.RDY or CSTS.CFS after enable", |c| c & 3 != 0)
}

/// Enables with a good admin queue; returns it.
fn enable(win: &Window) -> RawQ {
    let n = ADMIN_ENTRIES as u32 - 1;
    let c = try_enable(win, (n << 16) | n, ASQ_ADDR, ACQ_ADDR, CC_ENABLE);
    assert_eq!(c & 3, 1, "enable with a good admin queue: CSTS {c:#x}");
    RawQ::new(win, 0, ASQ_ADDR, ACQ_ADDR, ADMIN_ENTRIES)
}

/// Set Features Number of Queues (n pairs); returns what was granted.
fn set_queues(win: &Window, admin: &mut RawQ, n: u16) -> u16 {
    let m = n as u32 - 1;
    let c = admin.run(
        win,
        Sqe::new(SET_FEATURES).cdw(10, 7).cdw(11, (m << 16) | m),
    );
    assert_eq!(c.st, SUCCESS, "Set Features Number of Queues");
    (c.dw0 & 0xFFFF) as u16 + 1
}

/// Creates I/O pair `qid` at the test's fixed addresses.
fn create_pair(win: &Window, admin: &mut RawQ, qid: u16, entries: u16) -> RawQ {
    let c = admin.run(win, Sqe::create_cq(qid, entries, IO_CQ, 1, 0b11));
    assert_eq!(c.st, SUCCESS, "Create I/O CQ {qid}");
    let c = admin.run(win, Sqe::create_sq(qid, entries, IO_SQ, qid, 1));
    assert_eq!(c.st, SUCCESS, "Create I/O SQ {qid}");
    RawQ::new(win, qid, IO_SQ, IO_CQ, entries)
}

/// The firmware is alive and well: no crash report on the console, a fresh reset + Identify
/// through the host driver, and (optionally) NVMe/TCP still answering.
fn assert_alive(q: &Qemu, win: &Arc<Window>, tcp: &str, step: &str) {
    let console = q.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(
            !console.contains(bad),
            "after {step}: {bad:?} on the console:\n{console}"
        );
    }
    let mut c = HostController::open(
        win.clone(),
        &HostConfig {
            queues: 1,
            depth: 1,
            timeout: WAIT,
        },
    )
    .unwrap_or_else(|e| panic!("after {step}: reset + identify failed: {e:#}"));
    let subnqn = String::from_utf8_lossy(&c.id.subnqn)
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(subnqn, "nqn.2026-11.dev.keel:fn0", "after {step}");
    assert_eq!(
        c.active_namespaces().expect("active namespaces"),
        vec![1],
        "after {step}"
    );
    assert_eq!(c.geometry(1).expect("geometry"), (512, (64 << 20) / 512));
    c.shutdown()
        .unwrap_or_else(|e| panic!("after {step}: shutdown: {e:#}"));
    let (hostnqn, hostid) = default_host_identity();
    let ctrl = Controller::connect(Params {
        hostid,
        kato: Duration::from_secs(10),
        timeout: WAIT,
        ..Params::new(tcp, "nqn.2026-11.dev.keel:default", &hostnqn)
    })
    .unwrap_or_else(|e| panic!("after {step}: NVMe/TCP connect: {e}"));
    assert_eq!(
        ctrl.active_namespaces().expect("NVMe/TCP identify"),
        vec![1]
    );
    ctrl.close().expect("NVMe/TCP disconnect");
    eprintln!("ok: {step}");
}

fn boot() -> (Qemu, Arc<Window>, String, ScratchFile) {
    let file = ScratchFile::new("abuse-window", WINDOW);
    let port = free_port();
    let path = file.path().display().to_string();
    let mut q = Qemu::boot(
        Build::Release,
        &["--window", &path, "--nvmf-port", &port.to_string()],
    );
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let win = Arc::new(Window::open(file.path()).expect("mapping the window"));
    // CAP is written before the header is published; the wait stays as a bound.
    let t0 = Instant::now();
    while win.load64(CAP) & 0xFFFF == 0 {
        assert!(t0.elapsed() < WAIT, "CAP never set by the function");
        std::thread::sleep(Duration::from_millis(5));
    }
    (q, win, format!("127.0.0.1:{port}"), file)
}

#[test]
fn bad_admin_queue_or_cc_at_enable_sets_cfs_and_reset_recovers() {
    let (q, win, tcp, _file) = boot();
    // The function has initialised the window: CAP with 4 KiB pages and stride 4.
    assert_alive(&q, &win, &tcp, "boot");
    let cap = win.load64(CAP);
    assert_eq!((cap >> 32) & 0xF, 0, "CAP.DSTRD {cap:#x}");
    assert_eq!((cap >> 48) & 0xF, 0, "CAP.MPSMIN {cap:#x}");
    let n = ADMIN_ENTRIES as u32 - 1;
    let good = (n << 16) | n;
    let end = WINDOW;
    let cases: &[(&str, u32, u64, u64, u32)] = &[
        (
            "AQA.ASQS = 0 (1 entry)",
            n << 16,
            ASQ_ADDR,
            ACQ_ADDR,
            CC_ENABLE,
        ),
        ("AQA.ACQS = 0 (1 entry)", n, ASQ_ADDR, ACQ_ADDR, CC_ENABLE),
        (
            "ASQ not page aligned",
            good,
            ASQ_ADDR + 64,
            ACQ_ADDR,
            CC_ENABLE,
        ),
        (
            "ACQ not page aligned",
            good,
            ASQ_ADDR,
            ACQ_ADDR + 16,
            CC_ENABLE,
        ),
        ("ASQ in the register page", good, 0, ACQ_ADDR, CC_ENABLE),
        (
            "ACQ in the doorbell page",
            good,
            ASQ_ADDR,
            0x1000,
            CC_ENABLE,
        ),
        ("ASQ beyond the window", good, end, ACQ_ADDR, CC_ENABLE),
        (
            "ACQ beyond the window",
            good,
            ASQ_ADDR,
            end + PAGE,
            CC_ENABLE,
        ),
        ("ASQ at u64::MAX page", good, !0xFFFu64, ACQ_ADDR, CC_ENABLE),
        (
            "ASQ of 4096 entries running past the end",
            (n << 16) | 0xFFF,
            end - PAGE,
            ACQ_ADDR,
            CC_ENABLE,
        ),
        (
            "CC.IOSQES = 5",
            good,
            ASQ_ADDR,
            ACQ_ADDR,
            1 | (5 << 16) | (4 << 20),
        ),
        (
            "CC.MPS = 8 KiB",
            good,
            ASQ_ADDR,
            ACQ_ADDR,
            CC_ENABLE | (1 << 7),
        ),
        (
            "CC.CSS = 3 (reserved)",
            good,
            ASQ_ADDR,
            ACQ_ADDR,
            CC_ENABLE | (3 << 4),
        ),
    ];
    for &(what, aqa, asq, acq, cc) in cases {
        let c = try_enable(&win, aqa, asq, acq, cc);
        assert_eq!(
            c & 3,
            2,
            "{what}: expected CSTS.CFS without RDY, CSTS {c:#x}"
        );
        // Nothing was written into the register, doorbell, interrupt or header pages.
        assert_eq!(win.load64(CAP), cap, "{what}: CAP changed");
        let mut hdr = [0u8; 8];
        win.read(HEADER, &mut hdr);
        assert_eq!(&hdr, b"KEELNVMW", "{what}: header overwritten");
        // CC.EN = 0 clears CFS; a good enable then works.
        disable(&win);
        let mut admin = enable(&win);
        let c = admin.run(&win, Sqe::new(IDENTIFY).prps(ADMIN_DATA, 0).cdw(10, 1));
        assert_eq!(c.st, SUCCESS, "{what}: Identify after recovery");
        disable(&win);
        assert_alive(&q, &win, &tcp, what);
    }
}

#[test]
fn queue_management_errors_get_the_spec_statuses() {
    let (q, win, tcp, _file) = boot();
    let cap = win.load64(CAP);
    let mqes = (cap & 0xFFFF) as u16;
    assert!(
        mqes >= 255,
        "CAP.MQES {mqes}: at least 256 entries per queue"
    );
    let mut admin = enable(&win);
    assert_eq!(set_queues(&win, &mut admin, 2), 2);
    let cases: Vec<(&str, Sqe, St)> = vec![
        ("CQ QID 0", Sqe::create_cq(0, 16, IO_CQ, 1, 3), INVALID_QID),
        (
            "CQ QID 3 > granted 2",
            Sqe::create_cq(3, 16, IO_CQ, 1, 3),
            INVALID_QID,
        ),
        (
            "CQ QID 0xFFFF",
            Sqe::create_cq(0xFFFF, 16, IO_CQ, 1, 3),
            INVALID_QID,
        ),
        (
            "CQ QSIZE 0",
            Sqe::create_cq(1, 1, IO_CQ, 1, 3),
            INVALID_QSIZE,
        ),
        (
            "CQ QSIZE > MQES",
            Sqe::create_cq(1, mqes.wrapping_add(2), IO_CQ, 1, 3),
            INVALID_QSIZE,
        ),
        (
            "CQ 0xFFFF entries",
            Sqe::create_cq(1, 0, IO_CQ, 1, 3),
            INVALID_QSIZE,
        ),
        (
            "CQ base not page aligned",
            Sqe::create_cq(1, 16, IO_CQ + 16, 1, 3),
            PRP_OFFSET_INVALID,
        ),
        (
            "CQ vector beyond the vectors",
            Sqe::create_cq(1, 16, IO_CQ, 4096, 3),
            INVALID_VECTOR,
        ),
        (
            "CQ not physically contiguous",
            Sqe::create_cq(1, 16, IO_CQ, 1, 2),
            INVALID_FIELD,
        ),
        (
            "CQ in the register page",
            Sqe::create_cq(1, 16, 0, 1, 3),
            INVALID_FIELD,
        ),
        (
            "CQ beyond the window",
            Sqe::create_cq(1, 16, WINDOW, 1, 3),
            INVALID_FIELD,
        ),
        (
            "SQ on a CQ that does not exist",
            Sqe::create_sq(1, 16, IO_SQ, 1, 1),
            CQ_INVALID,
        ),
        (
            "SQ on the admin CQ",
            Sqe::create_sq(1, 16, IO_SQ, 0, 1),
            CQ_INVALID,
        ),
        (
            "delete SQ never created",
            Sqe::new(DELETE_SQ).cdw(10, 1),
            INVALID_QID,
        ),
        (
            "delete CQ never created",
            Sqe::new(DELETE_CQ).cdw(10, 2),
            INVALID_QID,
        ),
        (
            "delete admin SQ",
            Sqe::new(DELETE_SQ).cdw(10, 0),
            INVALID_QID,
        ),
        (
            "delete admin CQ",
            Sqe::new(DELETE_CQ).cdw(10, 0),
            INVALID_QID,
        ),
    ];
    let mut failures = Vec::new();
    for (what, sqe, want) in cases {
        let c = admin.run(&win, sqe);
        if c.st != want {
            failures.push(format!("{what}: status {:?}, expected {want:?}", c.st));
        }
    }
    // A real CQ 1, then the errors that need one.
    let c = admin.run(&win, Sqe::create_cq(1, 16, IO_CQ, 1, 3));
    assert_eq!(c.st, SUCCESS, "Create I/O CQ 1; earlier: {failures:#?}");
    for (what, sqe, want) in [
        (
            "CQ 1 again",
            Sqe::create_cq(1, 16, IO_CQ + 0x1000, 1, 3),
            INVALID_QID,
        ),
        ("SQ QID 0", Sqe::create_sq(0, 16, IO_SQ, 1, 1), INVALID_QID),
        (
            "SQ QSIZE 0",
            Sqe::create_sq(1, 1, IO_SQ, 1, 1),
            INVALID_QSIZE,
        ),
        (
            "SQ QSIZE > MQES",
            Sqe::create_sq(1, mqes.wrapping_add(2), IO_SQ, 1, 1),
            INVALID_QSIZE,
        ),
        (
            "SQ base not page aligned",
            Sqe::create_sq(1, 16, IO_SQ + 64, 1, 1),
            PRP_OFFSET_INVALID,
        ),
        (
            "SQ not physically contiguous",
            Sqe::create_sq(1, 16, IO_SQ, 1, 0),
            INVALID_FIELD,
        ),
        (
            "SQ beyond the window",
            Sqe::create_sq(1, 16, WINDOW, 1, 1),
            INVALID_FIELD,
        ),
        (
            "SQ QID 3 > granted 2",
            Sqe::create_sq(3, 16, IO_SQ, 1, 1),
            INVALID_QID,
        ),
    ] {
        let c = admin.run(&win, sqe);
        if c.st != want {
            failures.push(format!("{what}: status {:?}, expected {want:?}", c.st));
        }
    }
    let c = admin.run(&win, Sqe::create_sq(1, 16, IO_SQ, 1, 1));
    assert_eq!(c.st, SUCCESS, "Create I/O SQ 1");
    for (what, sqe, want) in [
        (
            "SQ 1 again",
            Sqe::create_sq(1, 16, IO_SQ + 0x2000, 1, 1),
            INVALID_QID,
        ),
        (
            "delete CQ 1 while SQ 1 uses it",
            Sqe::new(DELETE_CQ).cdw(10, 1),
            INVALID_DELETION,
        ),
    ] {
        let c = admin.run(&win, sqe);
        if c.st != want {
            failures.push(format!("{what}: status {:?}, expected {want:?}", c.st));
        }
    }
    // The queue that was created works.
    let mut io = RawQ::new(&win, 1, IO_SQ, IO_CQ, 16);
    win.write(IO_DATA as usize, &[0x3c; 4096]);
    let c = io.run(&win, Sqe::rw(WRITE, 8, 8).prps(IO_DATA, 0));
    assert_eq!(c.st, SUCCESS, "write on the new queue");
    // The function raises the interrupt just after posting the completion: allow it a moment.
    let t0 = Instant::now();
    while win.load32(INTERRUPTS + 4) == 0 && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        win.load32(INTERRUPTS + 4) > 0,
        "CQ 1's vector 1 counted interrupts"
    );
    assert!(
        failures.is_empty(),
        "wrong statuses:\n{}",
        failures.join("\n")
    );
    assert_eq!(win.load32(CSTS) & 3, 1, "still ready, no CFS");
    disable(&win);
    assert_alive(&q, &win, &tcp, "queue management errors");
}

#[test]
fn doorbells_beyond_the_queue_set_cfs_and_reset_recovers() {
    let (q, win, tcp, _file) = boot();
    // (what, doorbell offset as a function of the queues, value)
    type Case = (&'static str, fn() -> (usize, u32));
    let cases: [Case; 6] = [
        ("admin SQ tail = queue size", || {
            (sq_tail(0), ADMIN_ENTRIES as u32)
        }),
        ("admin SQ tail = 0xFFFFFFFF", || (sq_tail(0), u32::MAX)),
        ("admin CQ head beyond the queue", || (cq_head(0), 1000)),
        ("admin CQ head past the entries posted", || (cq_head(0), 5)),
        ("I/O SQ tail = queue size", || (sq_tail(1), 16)),
        ("I/O CQ head beyond the queue", || (cq_head(1), 17)),
    ];
    for (what, f) in cases {
        let mut admin = enable(&win);
        assert_eq!(set_queues(&win, &mut admin, 1), 1);
        let mut io = create_pair(&win, &mut admin, 1, 16);
        let (off, value) = f();
        win.store32(off, value);
        let c = wait_csts(&win, "CSTS.CFS", |c| c & 2 != 0);
        assert_eq!(c & 2, 2, "{what}: CSTS {c:#x}");
        // A fatal controller processes nothing: a command submitted now is never completed.
        win.store32(sq_tail(1), 0);
        io.tail = 0;
        win.write(IO_DATA as usize, &[0x77; 512]);
        io.submit(&win, Sqe::rw(WRITE, 100, 1).prps(IO_DATA, 0));
        assert!(
            io.quiet(&win).is_none(),
            "{what}: a fatal controller completed a command"
        );
        disable(&win);
        // Doorbells read 0 after the reset.
        for qid in 0..=8u16 {
            assert_eq!(
                win.load32(sq_tail(qid)),
                0,
                "{what}: SQ {qid} tail doorbell"
            );
            assert_eq!(
                win.load32(cq_head(qid)),
                0,
                "{what}: CQ {qid} head doorbell"
            );
        }
        assert_alive(&q, &win, &tcp, what);
    }
    // Doorbells of queues that do not exist are never read: no CFS, nothing happens.
    let mut admin = enable(&win);
    win.store32(sq_tail(5), 12345);
    win.store32(cq_head(7), 999);
    win.store32(doorbell(1023), u32::MAX);
    assert!(admin.quiet(&win).is_none());
    assert_eq!(win.load32(CSTS) & 3, 1, "doorbells of absent queues: CSTS");
    let c = admin.run(&win, Sqe::new(IDENTIFY).prps(ADMIN_DATA, 0).cdw(10, 1));
    assert_eq!(c.st, SUCCESS);
    disable(&win);
    assert_alive(&q, &win, &tcp, "doorbells of absent queues");
}

/// What, how to prepare the PRP list page, the command, the expected status.
type PrpCase = (&'static str, Box<dyn Fn(&Window)>, Sqe, St);

#[test]
fn prps_outside_host_memory_and_deleted_queues() {
    let (q, win, tcp, _file) = boot();
    let mut admin = enable(&win);
    assert_eq!(set_queues(&win, &mut admin, 1), 1);
    let mut io = create_pair(&win, &mut admin, 1, 64);
    // Known data at LBA 0..16 (8 KiB), read back through a PRP list.
    let data: Vec<u8> = (0..16 * 512u32).map(|i| (i * 13 % 251) as u8).collect();
    win.write(IO_DATA as usize, &data);
    let c = io.run(&win, Sqe::rw(WRITE, 0, 16).prps(IO_DATA, IO_DATA + PAGE));
    assert_eq!(c.st, SUCCESS, "write 8 KiB");

    let snapshot = |w: &Window| {
        let mut fixed = vec![0u8; HOST_AREA as usize];
        w.read(0, &mut fixed);
        fixed
    };
    let before = snapshot(&win);
    let last = WINDOW - PAGE;
    // PRP list page: three entries, one of them outside the window.
    let list = |w: &Window, entries: &[u64]| {
        let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        w.write(PRP_LIST as usize, &b);
    };
    let cases: Vec<PrpCase> = vec![
        (
            "read into the register page",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 8).prps(0, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read into the doorbell page",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 8).prps(0x1000, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read into the interrupt page",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 1).prps(0x2000, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read into the header",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 1).prps(HEADER as u64, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read beyond the window",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 8).prps(WINDOW, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read at a huge address",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 8).prps(!0xFFFu64, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read with PRP2 beyond the window",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 16).prps(last, WINDOW),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read with a PRP list beyond the window",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 16 + 8).prps(IO_DATA, WINDOW),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read with a PRP list entry in the register page",
            Box::new(move |w| list(w, &[IO_DATA + PAGE, 0, IO_DATA + 3 * PAGE])),
            Sqe::rw(READ, 0, 32).prps(IO_DATA, PRP_LIST),
            DATA_TRANSFER_ERROR,
        ),
        (
            "read with a PRP list entry beyond the window",
            Box::new(move |w| list(w, &[IO_DATA + PAGE, WINDOW + PAGE, IO_DATA + 3 * PAGE])),
            Sqe::rw(READ, 0, 32).prps(IO_DATA, PRP_LIST),
            DATA_TRANSFER_ERROR,
        ),
        (
            "write from the register page",
            Box::new(|_| {}),
            Sqe::rw(WRITE, 0, 8).prps(0, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "write from beyond the window",
            Box::new(|_| {}),
            Sqe::rw(WRITE, 0, 8).prps(WINDOW, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "write with PRP1 not dword aligned",
            Box::new(|_| {}),
            Sqe::rw(WRITE, 0, 1).prps(IO_DATA + 2, 0),
            PRP_OFFSET_INVALID,
        ),
        (
            "read with PRP2 not page aligned",
            Box::new(|_| {}),
            Sqe::rw(READ, 0, 16).prps(IO_DATA, IO_DATA + PAGE + 8),
            PRP_OFFSET_INVALID,
        ),
        (
            "read with a misaligned PRP list entry",
            Box::new(move |w| {
                list(
                    w,
                    &[IO_DATA + PAGE, IO_DATA + 2 * PAGE + 512, IO_DATA + 3 * PAGE],
                )
            }),
            Sqe::rw(READ, 0, 32).prps(IO_DATA, PRP_LIST),
            PRP_OFFSET_INVALID,
        ),
    ];
    let mut failures = Vec::new();
    for (what, setup, sqe, want) in cases {
        setup(&win);
        let c = io.run(&win, sqe);
        if c.st != want {
            failures.push(format!("{what}: status {:?}, expected {want:?}", c.st));
        }
        assert_eq!(
            win.load32(CSTS) & 3,
            1,
            "{what}: the controller must stay ready"
        );
    }
    // Nothing below the host area changed except the doorbells and interrupt counters that
    // the protocol itself writes (compare the register page and the header).
    let after = snapshot(&win);
    assert_eq!(
        &after[..0x1000],
        &before[..0x1000],
        "register page changed by bad PRPs"
    );
    assert_eq!(
        &after[HEADER..],
        &before[HEADER..],
        "header/reserved area changed by bad PRPs"
    );
    // The data on the namespace was not changed by the refused writes.
    win.zero(IO_DATA as usize, 16 * 512);
    let c = io.run(&win, Sqe::rw(READ, 0, 16).prps(IO_DATA, IO_DATA + PAGE));
    assert_eq!(c.st, SUCCESS);
    let mut back = vec![0u8; data.len()];
    win.read(IO_DATA as usize, &mut back);
    assert!(back == data, "namespace data changed by refused writes");
    assert!(
        failures.is_empty(),
        "wrong statuses:\n{}",
        failures.join("\n")
    );

    // Commands on a deleted queue: delete SQ 1 and CQ 1, then ring the old SQ's doorbell.
    assert_eq!(admin.run(&win, Sqe::new(DELETE_SQ).cdw(10, 1)).st, SUCCESS);
    assert_eq!(admin.run(&win, Sqe::new(DELETE_CQ).cdw(10, 1)).st, SUCCESS);
    win.write(IO_DATA as usize, &[0xEE; 4096]);
    for _ in 0..3 {
        io.submit(&win, Sqe::rw(WRITE, 0, 8).prps(IO_DATA, 0));
    }
    assert!(
        io.quiet(&win).is_none(),
        "a deleted queue's command was completed"
    );
    assert_eq!(win.load32(CSTS) & 3, 1, "deleted queue doorbell: CSTS");
    // Deleting again: Invalid Queue Identifier.
    assert_eq!(
        admin.run(&win, Sqe::new(DELETE_SQ).cdw(10, 1)).st,
        INVALID_QID
    );
    assert_eq!(
        admin.run(&win, Sqe::new(DELETE_CQ).cdw(10, 1)).st,
        INVALID_QID
    );
    // The data is still the old data: nothing from the deleted queue was executed.
    let mut io = create_pair(&win, &mut admin, 1, 16);
    win.zero(IO_DATA as usize, 16 * 512);
    let c = io.run(&win, Sqe::rw(READ, 0, 16).prps(IO_DATA, IO_DATA + PAGE));
    assert_eq!(c.st, SUCCESS);
    win.read(IO_DATA as usize, &mut back);
    assert!(
        back == data,
        "a deleted queue's write reached the namespace"
    );
    disable(&win);
    assert_alive(&q, &win, &tcp, "bad PRPs and deleted queues");
}
