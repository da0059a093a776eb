//! Host tests: a minimal host NVMe driver over a [`MemWindow`] against [`PcieFunction`] with a
//! real controller core and RAM namespaces.

use crate::layout::{self, HOST_AREA_OFFSET, PAGE_SIZE};
use crate::*;
use keel_controller::{Instant, Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use keel_nvme::identify::{IdentifyController, IdentifyNamespace, ctrl_field};
use keel_nvme::regs::{Cap, Cc, Csts, offset};
use keel_nvme::sqe::Psdt;
use keel_nvme::{Cqe, Sqe, Status};
use keel_storage::{BufPool, RamBackend};
use proptest::prelude::*;

const NQN_A: &str = "nqn.2026-11.dev.keel:pcie-a";
const NQN_B: &str = "nqn.2026-11.dev.keel:pcie-b";
const WIN: usize = 16 << 20;
const BLOCKS: u64 = 8192; // 4 MiB of 512-byte blocks

/// A status without the More bit the core sets on failures it logs.
fn without_more(s: Status) -> Status {
    Status { more: false, ..s }
}

fn subsystem(nqn: &str) -> SubsystemConfig {
    let ram = RamBackend::new(512, BLOCKS, 1024).unwrap();
    SubsystemConfig {
        nqn: nqn.into(),
        serial: "SN1".into(),
        model: "Keel emulated NVMe".into(),
        allowed_hosts: vec![],
        namespaces: vec![NamespaceConfig {
            nsid: 1,
            backend: Box::new(ram),
            nguid: [1; 16],
            uuid: [0; 16],
            eui64: [0; 8],
            qos: Default::default(),
        }],
    }
}

fn target(subs: Vec<SubsystemConfig>) -> Target {
    Target::new(TargetConfig {
        subsystems: subs,
        limits: Limits {
            max_queue_depth: 1024,
            max_io_queues: 8,
            ..Limits::default()
        },
        ..TargetConfig::default()
    })
    .unwrap()
}

fn function(nqn: &str, buffers: usize) -> PcieFunction {
    owned_function(nqn, buffers, 0)
}

/// A function whose core queues carry owner `owner`.
fn owned_function(nqn: &str, buffers: usize, owner: u16) -> PcieFunction {
    PcieFunction::new(
        FunctionConfig {
            owner,
            ..FunctionConfig::new(nqn)
        },
        BufPool::from_heap(buffers, 128 << 10, 0).unwrap(),
    )
    .unwrap()
}

/// One host, one function, one target.
struct Rig {
    w: MemWindow,
    f: PcieFunction,
    t: Target,
    now: u64,
    next: u64,
    admin: Queue,
    /// Another core serving the I/O queue pairs the function hands out.
    core1: Option<Core1>,
}

/// A second core in a host test: a replica target over the same namespace, its own buffers,
/// and the pairs it serves (with their replica queues).
struct Core1 {
    t: Target,
    pool: BufPool,
    pairs: Vec<(IoPair, keel_controller::QueueId)>,
    /// Pairs asked back: (SQ ID, discard).
    recalls: Vec<(u16, bool)>,
    stats: PairStats,
    /// Adoptions seen.
    adopted: u32,
    /// Hold its pairs (no pass) while true: a core that is slow to answer.
    paused: bool,
    /// Aborts asked of it and not yet looked at (SQ ID, CID, token): looked at in its pass.
    aborts: Vec<(u16, u16, u32)>,
    /// Verdicts it gave (token, aborted).
    verdicts: Vec<(u32, bool)>,
    /// Verdicts on their way to the function's core: handed over in order with the pairs
    /// given back, as the ring does, except those of `aborts_late`, which arrive at its next
    /// pass (after the function's core saw its pair home).
    ring: Vec<(u32, bool)>,
    /// Looks at the Aborts after giving back the pairs asked back: an Abort that arrives
    /// after its pair left.
    aborts_late: bool,
}

impl Core1 {
    /// The Aborts asked of it: its replica decides now, or once the command completed
    /// (`take_abort_verdicts` in its pass), as `fnq::FnCore` does.
    fn look_at_aborts(&mut self, now: Instant) {
        for (qid, cid, token) in core::mem::take(&mut self.aborts) {
            let verdict = match self.pairs.iter().find(|(p, _)| p.qid() == qid) {
                Some(&(_, q)) => self.t.abort_for_holder(now, q, cid, token),
                None => Some(false),
            };
            if let Some(aborted) = verdict {
                self.verdicts.push((token, aborted));
                self.ring.push((token, aborted));
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    qid: u16,
    sq: u64,
    cq: u64,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

impl Queue {
    fn new(qid: u16, sq: u64, cq: u64, entries: u16) -> Self {
        Self {
            qid,
            sq,
            cq,
            entries,
            tail: 0,
            head: 0,
            phase: true,
        }
    }
}

impl Rig {
    fn new() -> Self {
        Self::with(function(NQN_A, 64), target(vec![subsystem(NQN_A)]))
    }

    fn with(f: PcieFunction, t: Target) -> Self {
        let mut r = Self {
            w: MemWindow::new(WIN),
            f,
            t,
            now: 0,
            next: HOST_AREA_OFFSET as u64,
            admin: Queue::new(0, 0, 0, 32),
            core1: None,
        };
        r.step();
        r
    }

    fn step(&mut self) {
        self.now += 10_000;
        self.f
            .poll_with_target(Instant::from_nanos(self.now), &mut self.t, &mut self.w);
        self.core1_pass();
    }

    /// The second core's pass: handovers from the function, its pairs, their completions,
    /// pairs given back.
    fn core1_pass(&mut self) {
        let Some(c) = self.core1.as_mut() else { return };
        let now = Instant::from_nanos(self.now);
        for (token, aborted) in c.ring.drain(..) {
            self.t.abort_verdict_from_elsewhere(token, aborted);
        }
        while let Some(h) = self.f.take_handover() {
            match h {
                Handover::Export { core, pair } => {
                    assert_eq!(core, 1);
                    let q = c.t.open_queue_for(9).unwrap();
                    let a = self
                        .t
                        .adoption(self.f.core_queue(pair.qid()).unwrap())
                        .unwrap();
                    assert_eq!(a.qid, pair.qid());
                    assert_eq!(a.sqsize, pair.sqsize());
                    c.t.adopt_io_queue(now, q, &a).unwrap();
                    c.adopted += 1;
                    c.pairs.push((pair, q));
                }
                Handover::Recall { core, qid, discard } => {
                    assert_eq!(core, 1);
                    // No more fetching from here on (as `fnq::FnCore` does).
                    if let Some((p, _)) = c.pairs.iter_mut().find(|(p, _)| p.qid() == qid) {
                        p.stop();
                    }
                    c.recalls.push((qid, discard));
                }
                Handover::Abort {
                    core,
                    qid,
                    cid,
                    token,
                } => {
                    assert_eq!(core, 1);
                    c.aborts.push((qid, cid, token));
                }
            }
        }
        if c.paused {
            return;
        }
        if !c.aborts_late {
            c.look_at_aborts(now);
            for (token, aborted) in c.ring.drain(..) {
                self.t.abort_verdict_from_elsewhere(token, aborted);
            }
        }
        for (pair, q) in c.pairs.iter_mut() {
            let (sq, cq, v) = (pair.qid(), pair.cqid(), pair.vector());
            let mut port = QueuePort::new(&mut self.w, sq, cq, v);
            if let Err(why) = pair.poll(now, &mut c.t, *q, &mut port, &mut c.pool, 32, &mut c.stats)
            {
                self.f.core_fatal(sq, why);
            }
        }
        let (pairs, pool, stats, w) = (&mut c.pairs, &mut c.pool, &mut c.stats, &mut self.w);
        c.t.poll(now, &mut |ev| match ev {
            keel_controller::Event::Completion(q, resp) => {
                match pairs.iter_mut().find(|(_, pq)| *pq == q) {
                    Some((pair, _)) => {
                        let (sq, cq, v) = (pair.qid(), pair.cqid(), pair.vector());
                        let mut port = QueuePort::new(&mut *w, sq, cq, v);
                        pair.complete(&mut port, pool, resp, stats).unwrap();
                    }
                    None => {
                        if let Some(b) = resp.buf {
                            assert!(pool.put(b).is_ok(), "a buffer of core 1's pool");
                        }
                    }
                }
            }
            keel_controller::Event::BufferReleased { buf, .. } => {
                assert!(pool.put(buf).is_ok(), "a buffer of core 1's pool")
            }
            keel_controller::Event::QueueTerminated(_) => {}
        });
        let (verdicts, t) = (&mut c.verdicts, &mut self.t);
        c.t.take_abort_verdicts(&mut |token, aborted| {
            verdicts.push((token, aborted));
            t.abort_verdict_from_elsewhere(token, aborted);
        });
        // Recalls: a discard drops at once, a drain waits for the commands in flight.
        for (qid, discard) in core::mem::take(&mut c.recalls) {
            let Some(i) = c.pairs.iter().position(|(p, _)| p.qid() == qid) else {
                continue;
            };
            let pair = &mut c.pairs[i].0;
            if discard {
                pair.discard();
            } else {
                pair.stop();
            }
            if pair.outstanding() > 0 {
                c.recalls.push((qid, discard));
                continue;
            }
            let (pair, q) = c.pairs.swap_remove(i);
            c.t.close_queue(q).unwrap();
            self.f.give_back(pair);
        }
        if c.aborts_late {
            c.look_at_aborts(now);
        }
    }

    /// Serves I/O queue pairs on a second core too (queue q on core q % 2), with a replica
    /// target over `ns` (the backend the function's target reaches through another handle).
    fn with_core1(&mut self, ns: Box<dyn keel_storage::BlockBackend>) {
        let mut sub = subsystem(NQN_A);
        sub.namespaces[0].backend = ns;
        self.core1 = Some(Core1 {
            t: target(vec![sub]),
            pool: BufPool::from_heap(16, 128 << 10, 0).unwrap(),
            pairs: Vec::new(),
            recalls: Vec::new(),
            stats: PairStats::default(),
            adopted: 0,
            paused: false,
            aborts: Vec::new(),
            verdicts: Vec::new(),
            ring: Vec::new(),
            aborts_late: false,
        });
        self.f.set_cores(2);
    }

    fn steps(&mut self, n: usize) {
        for _ in 0..n {
            self.step();
        }
    }

    fn alloc(&mut self, bytes: usize) -> u64 {
        let a = self.next;
        self.next += bytes.div_ceil(PAGE_SIZE) as u64 * PAGE_SIZE as u64;
        assert!(self.next <= WIN as u64, "test window exhausted");
        a
    }

    fn csts(&self) -> Csts {
        Csts(self.w.host_reg(offset::CSTS))
    }

    fn cc(&mut self, cc: u32) {
        self.w.host_set_reg(offset::CC, cc);
    }

    fn wait_csts(&mut self, f: impl Fn(Csts) -> bool) -> Csts {
        for _ in 0..100 {
            self.step();
            if f(self.csts()) {
                return self.csts();
            }
        }
        panic!("CSTS stuck at {:#x}", self.csts().0);
    }

    /// Reset then enable with a 32-entry admin queue.
    fn enable(&mut self) {
        self.cc(0);
        self.wait_csts(|c| !c.rdy());
        let sq = self.alloc(32 * 64);
        let cq = self.alloc(32 * 16);
        self.admin = Queue::new(0, sq, cq, 32);
        self.w.host_set_reg(offset::AQA, (31 << 16) | 31);
        self.w.host_set_reg64(offset::ASQ, sq);
        self.w.host_set_reg64(offset::ACQ, cq);
        self.cc(Cc::new(true, 0, 0, 0, 0, 6, 4).0);
        let c = self.wait_csts(|c| c.rdy() || c.cfs());
        assert!(c.rdy() && !c.cfs(), "enable failed: {:#x}", c.0);
    }

    fn push(&mut self, q: &mut Queue, sqe: &Sqe) {
        self.w
            .host_write(q.sq + q.tail as u64 * 64, &sqe.to_bytes());
        q.tail = (q.tail + 1) % q.entries;
        self.w
            .host_doorbell(layout::sq_tail_doorbell(q.qid), q.tail as u32);
    }

    fn reap(&mut self, q: &mut Queue) -> Option<Cqe> {
        let mut b = [0u8; 16];
        self.w.host_read(q.cq + q.head as u64 * 16, &mut b);
        let c = Cqe::from_bytes(&b);
        if c.phase != q.phase {
            return None;
        }
        q.head += 1;
        if q.head == q.entries {
            q.head = 0;
            q.phase = !q.phase;
        }
        self.w
            .host_doorbell(layout::cq_head_doorbell(q.qid), q.head as u32);
        Some(c)
    }

    fn wait(&mut self, q: &mut Queue) -> Cqe {
        for _ in 0..200 {
            if let Some(c) = self.reap(q) {
                return c;
            }
            self.step();
        }
        panic!(
            "no completion on queue {} (CSTS {:#x})",
            q.qid,
            self.csts().0
        );
    }

    fn cmd(&mut self, q: &mut Queue, sqe: Sqe) -> Cqe {
        self.push(q, &sqe);
        let c = self.wait(q);
        assert_eq!(c.cid, sqe.cid);
        assert_eq!(c.sqid, q.qid);
        c
    }

    fn admin(&mut self, sqe: Sqe) -> Cqe {
        let mut q = self.admin;
        let c = self.cmd(&mut q, sqe);
        self.admin = q;
        c
    }

    fn identify(&mut self, cns: u8, nsid: u32) -> (Cqe, Vec<u8>) {
        let buf = self.alloc(4096);
        let c = self.admin(
            Sqe::new(0x06, 1)
                .with_nsid(nsid)
                .with_cdw(10, cns as u32)
                .with_prps(buf, 0),
        );
        let mut v = vec![0u8; 4096];
        self.w.host_read(buf, &mut v);
        (c, v)
    }

    fn create_cq(&mut self, qid: u16, entries: u16, flags: u32, base: u64) -> Status {
        self.admin(
            Sqe::new(0x05, 2)
                .with_cdw(10, ((entries as u32 - 1) << 16) | qid as u32)
                .with_cdw(11, flags)
                .with_prps(base, 0),
        )
        .status
    }

    fn create_sq(&mut self, qid: u16, entries: u16, cqid: u16, base: u64) -> Status {
        self.admin(
            Sqe::new(0x01, 3)
                .with_cdw(10, ((entries as u32 - 1) << 16) | qid as u32)
                .with_cdw(11, ((cqid as u32) << 16) | 1)
                .with_prps(base, 0),
        )
        .status
    }

    fn delete(&mut self, opcode: u8, qid: u16) -> Status {
        self.admin(Sqe::new(opcode, 4).with_cdw(10, qid as u32))
            .status
    }

    /// Creates I/O queue pair `qid` with `entries` entries.
    fn io_queue(&mut self, qid: u16, entries: u16) -> Queue {
        let cq = self.alloc(entries as usize * 16);
        let sq = self.alloc(entries as usize * 64);
        assert_eq!(
            self.create_cq(qid, entries, 0b11 | ((qid as u32) << 16), cq),
            Status::SUCCESS
        );
        assert_eq!(self.create_sq(qid, entries, qid, sq), Status::SUCCESS);
        Queue::new(qid, sq, cq, entries)
    }

    /// PRPs for a buffer of `len` bytes at `addr` (page aligned except the first).
    fn prps(&mut self, addr: u64, len: usize) -> (u64, u64) {
        let first = PAGE_SIZE - (addr as usize % PAGE_SIZE);
        if len <= first {
            return (addr, 0);
        }
        let rest = len - first;
        let p2 = addr + first as u64;
        if rest <= PAGE_SIZE {
            return (addr, p2);
        }
        let pages = rest.div_ceil(PAGE_SIZE);
        let list = self.alloc(pages * 8);
        for i in 0..pages {
            self.w.host_write(
                list + i as u64 * 8,
                &(p2 + (i * PAGE_SIZE) as u64).to_le_bytes(),
            );
        }
        (addr, list)
    }

    /// I/O queue 1 (64 entries) with `n` 8 KiB writes and reads alternating, fetched and
    /// submitted by the function but not yet completed by the backend.
    fn io_at_backend(&mut self, n: u16) -> Queue {
        let mut q = self.io_queue(1, 64);
        let buf = self.alloc(n as usize * 8192);
        for k in 0..n {
            let (p1, p2) = self.prps(buf + k as u64 * 8192, 8192);
            let sqe = Sqe::new(if k % 2 == 0 { 0x01 } else { 0x02 }, k)
                .with_nsid(1)
                .with_cdw(10, k as u32 * 16)
                .with_cdw(12, 15)
                .with_prps(p1, p2);
            self.push(&mut q, &sqe);
        }
        self.now += 1000;
        self.f
            .poll(Instant::from_nanos(self.now), &mut self.t, &mut self.w);
        assert!(self.f.buffers_available() < self.f.buffers_total());
        q
    }

    fn rw(&mut self, q: &mut Queue, write: bool, lba: u64, blocks: u32, buf: u64, cid: u16) -> Cqe {
        let (p1, p2) = self.prps(buf, blocks as usize * 512);
        let sqe = Sqe::new(if write { 0x01 } else { 0x02 }, cid)
            .with_nsid(1)
            .with_cdw(10, lba as u32)
            .with_cdw(11, (lba >> 32) as u32)
            .with_cdw(12, blocks - 1)
            .with_prps(p1, p2);
        self.cmd(q, sqe)
    }
}

#[test]
fn enable_and_identify() {
    let mut r = Rig::new();
    let cap = Cap(r.w.host_reg64(offset::CAP));
    assert_eq!(cap.mqes(), 1023);
    assert!(cap.cqr());
    assert_eq!((cap.dstrd(), cap.mpsmin(), cap.css() & 1), (0, 0, 1));
    assert_eq!(r.w.host_reg(offset::VS), 0x0001_0400);
    r.enable();
    let (c, page) = r.identify(0x01, 0);
    assert_eq!(c.status, Status::SUCCESS);
    let id = IdentifyController::decode(page.as_slice().try_into().unwrap());
    assert!(id.subnqn.starts_with(NQN_A.as_bytes()));
    assert_eq!(id.sgls, 0, "PCIe: PRPs only");
    assert_eq!(id.kas, 0);
    assert!(
        page[ctrl_field::IOCCSZ..ctrl_field::PSD0]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!((id.sqes, id.cqes), (0x66, 0x44));
    let (c, page) = r.identify(0x00, 1);
    assert_eq!(c.status, Status::SUCCESS);
    let ns = IdentifyNamespace::decode(page.as_slice().try_into().unwrap());
    assert_eq!((ns.nsze, ns.block_size()), (BLOCKS, 512));
    let (c, page) = r.identify(0x02, 0);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(&page[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // Interrupt vector 0 counted the admin completions.
    assert!(r.w.host_interrupts(0) >= 3);
    assert_eq!(r.w.refused_dma, 0);
}

/// CSTS is read-only to the host: a host's write to it (the window is memory it can write)
/// is undone at the next pass, so the host reads the controller's state again (found by the
/// pcie_function fuzz target: a scribbled CSTS.CFS made a ready controller look failed).
#[test]
fn a_host_write_to_csts_is_undone() {
    let mut r = Rig::new();
    r.enable();
    assert!(r.csts().rdy() && !r.csts().cfs());
    r.w.host_set_reg(offset::CSTS, 0xFF00_D77A);
    r.step();
    let c = r.csts();
    assert!(c.rdy() && !c.cfs(), "{c:?}");
    assert_eq!(c.shst(), 0);
    let (c, _) = r.identify(0x01, 0);
    assert_eq!(c.status, Status::SUCCESS);
}

#[test]
fn admin_commands_through_the_core() {
    let mut r = Rig::new();
    r.enable();
    // Number of Queues: 8 granted.
    let c = r.admin(Sqe::new(0x09, 5).with_cdw(10, 7).with_cdw(11, 0x0003_0003));
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 0x0003_0003));
    let c = r.admin(Sqe::new(0x0A, 6).with_cdw(10, 7));
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 0x0003_0003));
    // Only 4 CQs now.
    let base = r.alloc(4096);
    assert_eq!(
        r.create_cq(5, 16, 0b11, base),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    // Arbitration, AEC, VWC (the RAM disk has none → Invalid Field).
    assert_eq!(
        r.admin(Sqe::new(0x09, 7).with_cdw(10, 1).with_cdw(11, 3))
            .status,
        Status::SUCCESS
    );
    assert_eq!(
        r.admin(Sqe::new(0x09, 7).with_cdw(10, 0x0B).with_cdw(11, 1 << 8))
            .status,
        Status::SUCCESS
    );
    assert_eq!(r.admin(Sqe::new(0x0A, 7).with_cdw(10, 0x0B)).dw0, 1 << 8);
    // Keep Alive Timer is not a PCIe feature here.
    assert_eq!(
        r.admin(Sqe::new(0x09, 8).with_cdw(10, 0x0F).with_cdw(11, 1000))
            .status,
        Status::INVALID_FIELD
    );
    // SMART log (512 bytes = 128 dwords).
    let buf = r.alloc(4096);
    let c = r.admin(
        Sqe::new(0x02, 9)
            .with_nsid(0xFFFF_FFFF)
            .with_cdw(10, (127 << 16) | 2)
            .with_prps(buf, 0),
    );
    assert_eq!(c.status, Status::SUCCESS);
    // Fabrics opcode and SGLs are refused.
    assert_eq!(
        r.admin(Sqe::fabrics(0x04, 10)).status,
        Status::INVALID_OPCODE
    );
    let mut s = Sqe::new(0x06, 11).with_cdw(10, 1);
    s.set_psdt(Psdt::SglContiguousMetadata);
    assert_eq!(r.admin(s).status, Status::INVALID_FIELD);
    // Unknown opcode: the core's Invalid Opcode.
    // The core logs it in the Error Information log: the More bit is set.
    let st = r.admin(Sqe::new(0xC0, 12)).status;
    assert!(st.more);
    assert_eq!(without_more(st), Status::INVALID_OPCODE);
    // AER stays outstanding; Abort of it completes both.
    let mut q = r.admin;
    r.push(&mut q, &Sqe::new(0x0C, 13));
    r.steps(3);
    assert!(r.reap(&mut q).is_none());
    r.push(&mut q, &Sqe::new(0x08, 14).with_cdw(10, 13 << 16));
    let a = r.wait(&mut q);
    let b = r.wait(&mut q);
    let (aer, abort) = if a.cid == 13 { (a, b) } else { (b, a) };
    assert_eq!(aer.status, Status::ABORT_REQUESTED);
    assert_eq!(abort.status, Status::SUCCESS);
    r.admin = q;
}

#[test]
fn bad_enable_sets_cfs_and_reset_recovers() {
    let mut r = Rig::new();
    let sq = r.alloc(4096);
    let cq = r.alloc(4096);
    let good_cc = Cc::new(true, 0, 0, 0, 0, 6, 4).0;
    let cases: [(u32, u64, u64, u32); 7] = [
        (0, sq, cq, good_cc),                       // ASQS = 0 (one entry)
        ((31 << 16) | 31, sq + 64, cq, good_cc),    // ASQ not page aligned
        ((31 << 16) | 31, 0x1000, cq, good_cc),     // ASQ in the doorbell page
        ((31 << 16) | 31, sq, WIN as u64, good_cc), // ACQ beyond the window
        ((31 << 16) | 31, sq, !0xFFFu64, good_cc),
        ((31 << 16) | 31, sq, cq, Cc::new(true, 0, 0, 0, 0, 7, 4).0), // IOSQES
        ((31 << 16) | 31, sq, cq, Cc::new(true, 0, 1, 0, 0, 6, 4).0), // MPS 8 KiB
    ];
    for (aqa, asq, acq, cc) in cases {
        r.w.host_set_reg(offset::AQA, aqa);
        r.w.host_set_reg64(offset::ASQ, asq);
        r.w.host_set_reg64(offset::ACQ, acq);
        r.cc(cc);
        let c = r.wait_csts(|c| c.cfs());
        assert!(!c.rdy(), "{aqa:#x} {asq:#x} {acq:#x}");
        r.cc(0);
        let c = r.wait_csts(|c| c.0 == 0);
        assert_eq!(c.0, 0);
    }
    assert_eq!(r.w.refused_dma, 0);
    r.enable();
    assert_eq!(r.identify(1, 0).0.status, Status::SUCCESS);
}

#[test]
fn queue_management_statuses() {
    let mut r = Rig::new();
    r.enable();
    let b = r.alloc(64 << 10);
    let mqes_over = 1025;
    let cqi = Status::command_specific(0x00).with_dnr();
    let iqd = Status::command_specific(0x0C).with_dnr();
    let iiv = Status::command_specific(0x08).with_dnr();
    // Create I/O CQ.
    assert_eq!(
        r.create_cq(0, 16, 0b11, b),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(
        r.create_cq(9, 16, 0b11, b),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(r.create_cq(1, 1, 0b11, b), Status::INVALID_QUEUE_SIZE);
    assert_eq!(
        r.create_cq(1, mqes_over, 0b11, b),
        Status::INVALID_QUEUE_SIZE
    );
    assert_eq!(r.create_cq(1, 16, 0b11, b + 8), Status::INVALID_PRP_OFFSET);
    assert_eq!(r.create_cq(1, 16, 0b11 | (1024 << 16), b), iiv);
    assert_eq!(r.create_cq(1, 16, 0b10, b), Status::INVALID_FIELD, "PC = 0");
    assert_eq!(
        r.create_cq(1, 16, 0b11, 0x2000),
        Status::INVALID_FIELD,
        "in the registers"
    );
    assert_eq!(
        r.create_cq(1, 1024, 0b11, WIN as u64 - 4096),
        Status::INVALID_FIELD
    );
    assert_eq!(r.create_cq(1, 16, 0b11, b), Status::SUCCESS);
    assert_eq!(
        r.create_cq(1, 16, 0b11, b),
        Status::INVALID_QUEUE_IDENTIFIER,
        "in use"
    );
    // Create I/O SQ.
    let s = b + 0x4000;
    assert_eq!(r.create_sq(1, 16, 0, s), cqi);
    assert_eq!(r.create_sq(1, 16, 2, s), cqi);
    assert_eq!(r.create_sq(0, 16, 1, s), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.create_sq(9, 16, 1, s), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.create_sq(1, 1, 1, s), Status::INVALID_QUEUE_SIZE);
    assert_eq!(r.create_sq(1, mqes_over, 1, s), Status::INVALID_QUEUE_SIZE);
    assert_eq!(r.create_sq(1, 16, 1, s + 4), Status::INVALID_PRP_OFFSET);
    assert_eq!(r.create_sq(1, 16, 1, WIN as u64), Status::INVALID_FIELD);
    let pc0 = r.admin(
        Sqe::new(0x01, 3)
            .with_cdw(10, (15 << 16) | 1)
            .with_cdw(11, 1 << 16)
            .with_prps(s, 0),
    );
    assert_eq!(pc0.status, Status::INVALID_FIELD);
    assert_eq!(r.create_sq(1, 16, 1, s), Status::SUCCESS);
    assert_eq!(r.create_sq(1, 16, 1, s), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(
        r.create_sq(2, 16, 1, s + 0x1000),
        Status::SUCCESS,
        "two SQs on one CQ"
    );
    // Delete.
    assert_eq!(r.delete(0x04, 1), iqd, "CQ with SQs");
    assert_eq!(r.delete(0x00, 0), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.delete(0x00, 3), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.delete(0x04, 0), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.delete(0x00, 1), Status::SUCCESS);
    assert_eq!(r.delete(0x00, 1), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(r.delete(0x04, 1), iqd);
    assert_eq!(r.delete(0x00, 2), Status::SUCCESS);
    assert_eq!(r.delete(0x04, 1), Status::SUCCESS);
    assert_eq!(r.delete(0x04, 1), Status::INVALID_QUEUE_IDENTIFIER);
    // Commands on a deleted queue: its doorbell is not even read.
    let mut dead = Queue::new(1, s, b, 16);
    r.push(
        &mut dead,
        &Sqe::new(0x02, 1).with_nsid(1).with_prps(b + 0x8000, 0),
    );
    r.steps(5);
    assert!(r.reap(&mut dead).is_none());
    assert!(!r.csts().cfs());
    // Queues come back.
    let mut q = r.io_queue(1, 16);
    let buf = r.alloc(4096);
    assert_eq!(r.rw(&mut q, false, 0, 8, buf, 7).status, Status::SUCCESS);
    assert_eq!(r.w.refused_dma, 0);
}

#[test]
fn eight_queue_pairs_of_depth_256_under_load() {
    let mut r = Rig::with(function(NQN_A, 16), target(vec![subsystem(NQN_A)]));
    r.enable();
    let mut qs: Vec<Queue> = (1..=8).map(|qid| r.io_queue(qid, 257)).collect();
    let bufs = r.alloc(8 * 256 * 4096);
    for (i, q) in qs.iter_mut().enumerate() {
        for k in 0..256u16 {
            let buf = bufs + ((i * 256 + k as usize) * 4096) as u64;
            let lba = ((i * 256 + k as usize) * 8) as u64 % BLOCKS;
            let sqe = Sqe::new(0x01, k)
                .with_nsid(1)
                .with_cdw(10, lba as u32)
                .with_cdw(12, 7)
                .with_prps(buf, 0);
            r.w.host_write(q.sq + q.tail as u64 * 64, &sqe.to_bytes());
            q.tail = (q.tail + 1) % q.entries;
        }
        r.w.host_doorbell(layout::sq_tail_doorbell(q.qid), q.tail as u32);
    }
    let mut done = 0;
    for _ in 0..2000 {
        r.step();
        for q in qs.iter_mut() {
            while let Some(c) = r.reap(q) {
                assert_eq!(c.status, Status::SUCCESS);
                done += 1;
            }
        }
        if done == 8 * 256 {
            break;
        }
    }
    assert_eq!(done, 8 * 256);
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    assert!(!r.csts().cfs());
}

#[test]
fn hostile_prps_and_doorbells() {
    let mut r = Rig::new();
    r.enable();
    let mut q = r.io_queue(1, 64);
    let buf = r.alloc(64 << 10);
    let before_regs = r.w.bytes()[..layout::DOORBELL_OFFSET].to_vec();
    let read = |lba: u32, nlb: u32, p1: u64, p2: u64, cid: u16| {
        Sqe::new(0x02, cid)
            .with_nsid(1)
            .with_cdw(10, lba)
            .with_cdw(12, nlb - 1)
            .with_prps(p1, p2)
    };
    // Misaligned PRP1, PRP2 page, list entries.
    assert_eq!(
        r.cmd(&mut q, read(0, 1, buf + 2, 0, 1)).status,
        Status::INVALID_PRP_OFFSET
    );
    assert_eq!(
        r.cmd(&mut q, read(0, 16, buf, buf + 0x1010, 2)).status,
        Status::INVALID_PRP_OFFSET
    );
    let list = r.alloc(4096);
    r.w.host_write(list, &(buf + 0x1000).to_le_bytes());
    r.w.host_write(list + 8, &(buf + 0x2004).to_le_bytes());
    assert_eq!(
        r.cmd(&mut q, read(0, 24, buf, list, 3)).status,
        Status::INVALID_PRP_OFFSET
    );
    // Out of host memory: PRP1 on the register page, a list entry on the doorbells, a list
    // beyond the window, a buffer running off its end.
    assert_eq!(
        r.cmd(&mut q, read(0, 8, 0, 0, 4)).status,
        Status::DATA_TRANSFER_ERROR
    );
    r.w.host_write(list + 8, &0x1000u64.to_le_bytes());
    assert_eq!(
        r.cmd(&mut q, read(0, 24, buf, list, 5)).status,
        Status::DATA_TRANSFER_ERROR
    );
    assert_eq!(
        r.cmd(&mut q, read(0, 24, buf, WIN as u64 - 8, 6)).status,
        Status::DATA_TRANSFER_ERROR
    );
    assert_eq!(
        r.cmd(&mut q, read(0, 8, WIN as u64 - 2048, 0, 7)).status,
        Status::DATA_TRANSFER_ERROR
    );
    // Writes from outside host memory never reach the disk.
    let w = Sqe::new(0x01, 8)
        .with_nsid(1)
        .with_cdw(12, 7)
        .with_prps(0x2000, 0);
    assert_eq!(r.cmd(&mut q, w).status, Status::DATA_TRANSFER_ERROR);
    // Nothing outside host memory changed but CSTS/doorbells/interrupt counters.
    assert_eq!(&r.w.bytes()[..layout::DOORBELL_OFFSET], &before_regs[..]);
    // A transfer beyond the buffer size (MDTS) is Invalid Field.
    assert_eq!(
        r.cmd(&mut q, read(0, 257, buf, list, 9)).status,
        Status::INVALID_FIELD
    );
    // Data length through the core: LBA out of range, invalid namespace.
    assert_eq!(
        without_more(r.cmd(&mut q, read(BLOCKS as u32, 1, buf, 0, 10)).status),
        Status::LBA_OUT_OF_RANGE
    );
    let bad_ns = Sqe::new(0x02, 11).with_nsid(7).with_prps(buf, 0);
    assert_eq!(
        without_more(r.cmd(&mut q, bad_ns).status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
    assert!(!r.csts().cfs());
    // SQ tail doorbell beyond the queue: CFS, and nothing processed after.
    r.w.host_doorbell(layout::sq_tail_doorbell(1), 64);
    let c = r.wait_csts(|c| c.cfs());
    assert!(c.rdy());
    assert!(matches!(
        r.f.fatal_reason(),
        Some(FatalReason::SqTailDoorbell { qid: 1, value: 64 })
    ));
    // Reset recovers.
    r.enable();
    let mut q = r.io_queue(1, 64);
    assert_eq!(r.rw(&mut q, false, 0, 8, buf, 1).status, Status::SUCCESS);
    // CQ head beyond what was posted: CFS.
    r.w.host_doorbell(layout::cq_head_doorbell(1), 5);
    r.wait_csts(|c| c.cfs());
    assert!(matches!(
        r.f.fatal_reason(),
        Some(FatalReason::CqHeadDoorbell { .. })
    ));
    r.enable();
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
}

#[test]
fn reset_mid_io_returns_every_buffer() {
    let mut r = Rig::new();
    r.enable();
    r.io_at_backend(32);
    r.cc(0);
    r.wait_csts(|c| c.0 == 0);
    r.steps(3);
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    assert_eq!(r.f.state(), FunctionState::Disabled);
    assert_eq!(r.w.host_reg(layout::doorbell_offset(2) as u32), 0);
    // A fresh controller: features are back to defaults, queues are gone.
    r.enable();
    let c = r.admin(Sqe::new(0x0A, 1).with_cdw(10, 7));
    assert_eq!(c.dw0, 0x0007_0007);
    assert_eq!(r.delete(0x00, 1), Status::INVALID_QUEUE_IDENTIFIER);
}

/// Hot unplug with commands at the backend: CSTS.CFS, the header gone, no completion ever
/// posted (the host's CQ stays as it was), every buffer back through the core's events, and a
/// host that writes CC or doorbells afterwards starts nothing (the function is not polled:
/// its events are all it still takes).
#[test]
fn removal_mid_io_posts_nothing_and_returns_every_buffer() {
    let mut r = Rig::new();
    r.enable();
    let q = r.io_at_backend(16);
    let cq_before = r.w.bytes()[q.cq as usize..q.cq as usize + 64 * 16].to_vec();
    assert!(r.f.remove(&mut r.t, &mut r.w), "a host had it enabled");
    assert_eq!(r.f.state(), FunctionState::Fatal);
    assert_eq!(r.f.fatal_reason(), Some(FatalReason::Removed));
    assert!(r.csts().cfs());
    let hdr: [u8; layout::header::SIZE] = r.w.bytes()
        [layout::HEADER_OFFSET..layout::HEADER_OFFSET + layout::header::SIZE]
        .try_into()
        .unwrap();
    assert!(
        layout::Header::decode(&hdr, WIN as u64).is_err(),
        "header cleared"
    );
    // The host keeps going: CC.EN off and on, doorbells. Only the target runs.
    r.w.host_set_reg(offset::CC, 0);
    r.w.host_doorbell(layout::sq_tail_doorbell(1), 3);
    for _ in 0..20 {
        r.now += 10_000;
        let (f, w) = (&mut r.f, &mut r.w);
        r.t.poll(Instant::from_nanos(r.now), &mut |ev| {
            assert!(f.handle_event(ev, w).is_none(), "an event not taken");
        });
    }
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    assert_eq!(
        &r.w.bytes()[q.cq as usize..q.cq as usize + 64 * 16],
        &cq_before[..],
        "a completion was posted after the removal"
    );
    assert_eq!(r.t.controller_count(), 0);
}

#[test]
fn shutdown_completes_writes_then_reports_complete() {
    let mut r = Rig::new();
    r.enable();
    let mut q = r.io_queue(1, 64);
    let buf = r.alloc(16 * 4096);
    r.w.host_write(buf, &[0xA5; 16 * 4096]);
    for k in 0..16u16 {
        let sqe = Sqe::new(0x01, k)
            .with_nsid(1)
            .with_cdw(10, k as u32 * 8)
            .with_cdw(12, 7)
            .with_prps(buf + k as u64 * 4096, 0);
        r.push(&mut q, &sqe);
    }
    r.now += 1000;
    r.f.poll(Instant::from_nanos(r.now), &mut r.t, &mut r.w);
    r.cc(Cc::new(true, 0, 0, 0, Cc::SHN_NORMAL, 6, 4).0);
    r.now += 1000;
    r.f.poll(Instant::from_nanos(r.now), &mut r.t, &mut r.w);
    assert_eq!(r.csts().shst(), Csts::SHST_OCCURRING);
    let c = r.wait_csts(|c| c.shst() == Csts::SHST_COMPLETE);
    assert!(c.rdy() && !c.cfs());
    let mut n = 0;
    while let Some(c) = r.reap(&mut q) {
        assert_eq!(c.status, Status::SUCCESS);
        n += 1;
    }
    assert_eq!(n, 16, "every write completed before SHST = complete");
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    // Data is on the disk after a reset.
    r.enable();
    let mut q = r.io_queue(1, 16);
    let rb = r.alloc(4096);
    assert_eq!(r.rw(&mut q, false, 120, 8, rb, 1).status, Status::SUCCESS);
    let mut got = [0u8; 4096];
    r.w.host_read(rb, &mut got);
    assert!(got.iter().all(|&b| b == 0xA5));
}

#[test]
fn shutdown_executes_commands_submitted_but_not_yet_fetched() {
    // 48 writes rung, then CC.SHN before the function ever polled: every one of them was
    // submitted before the notification, so each executes and completes before SHST = complete
    // (the fetch burst is 32, so a whole burst is still in the SQ at the notification).
    let mut r = Rig::new();
    r.enable();
    let mut q = r.io_queue(1, 64);
    let buf = r.alloc(48 * 4096);
    r.w.host_write(buf, &[0x5A; 48 * 4096]);
    for k in 0..48u16 {
        let sqe = Sqe::new(0x01, k)
            .with_nsid(1)
            .with_cdw(10, k as u32 * 8)
            .with_cdw(12, 7)
            .with_prps(buf + k as u64 * 4096, 0);
        r.push(&mut q, &sqe);
    }
    r.cc(Cc::new(true, 0, 0, 0, Cc::SHN_NORMAL, 6, 4).0);
    let c = r.wait_csts(|c| c.shst() == Csts::SHST_COMPLETE);
    assert!(c.rdy() && !c.cfs());
    let mut n = 0;
    while let Some(c) = r.reap(&mut q) {
        assert_eq!(c.status, Status::SUCCESS);
        n += 1;
    }
    assert_eq!(n, 48, "every write submitted before CC.SHN completed");
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
}

#[test]
fn two_functions_are_isolated_on_one_target() {
    let mut t = target(vec![subsystem(NQN_A), subsystem(NQN_B)]);
    let mut a = Rig::with(
        owned_function(NQN_A, 16, 1),
        target(vec![subsystem("nqn.x:unused")]),
    );
    let mut b = Rig::with(
        owned_function(NQN_B, 16, 2),
        target(vec![subsystem("nqn.y:unused")]),
    );
    // Both functions on one shared target; each event goes to the owner recorded for its
    // queue (admin and I/O queues alike), and that function must consume it.
    let mut now = 0u64;
    let mut step = |a: &mut Rig, b: &mut Rig, t: &mut Target| {
        now += 10_000;
        let n = Instant::from_nanos(now);
        a.f.poll(n, t, &mut a.w);
        b.f.poll(n, t, &mut b.w);
        t.poll(n, &mut |ev| {
            let left = match ev.owner() {
                o if o == a.f.owner() => a.f.handle_event(ev, &mut a.w),
                o if o == b.f.owner() => b.f.handle_event(ev, &mut b.w),
                o => panic!("an event of owner {o}: {ev:?}"),
            };
            assert!(left.is_none(), "the owner refused its event: {left:?}");
        });
    };
    for r in [&mut a, &mut b] {
        let sq = r.alloc(4096);
        let cq = r.alloc(4096);
        r.admin = Queue::new(0, sq, cq, 16);
        r.w.host_set_reg(offset::AQA, (15 << 16) | 15);
        r.w.host_set_reg64(offset::ASQ, sq);
        r.w.host_set_reg64(offset::ACQ, cq);
        r.cc(Cc::new(true, 0, 0, 0, 0, 6, 4).0);
    }
    for _ in 0..3 {
        step(&mut a, &mut b, &mut t);
    }
    assert!(a.csts().rdy() && b.csts().rdy());
    let mut run = |r: &mut Rig, other: &mut Rig, t: &mut Target, sqe: Sqe, q: &mut Queue| -> Cqe {
        r.push(q, &sqe);
        for _ in 0..50 {
            step(r, other, t);
            if let Some(c) = r.reap(q) {
                return c;
            }
        }
        panic!("no completion");
    };
    let mut qa = a.admin;
    let mut qb = b.admin;
    let (ba, bb) = (a.alloc(4096), b.alloc(4096));
    let ida = run(
        &mut a,
        &mut b,
        &mut t,
        Sqe::new(6, 1).with_cdw(10, 1).with_prps(ba, 0),
        &mut qa,
    );
    let idb = run(
        &mut b,
        &mut a,
        &mut t,
        Sqe::new(6, 1).with_cdw(10, 1).with_prps(bb, 0),
        &mut qb,
    );
    assert_eq!((ida.status, idb.status), (Status::SUCCESS, Status::SUCCESS));
    let mut pa = [0u8; 4096];
    let mut pb = [0u8; 4096];
    a.w.host_read(ba, &mut pa);
    b.w.host_read(bb, &mut pb);
    assert!(pa[768..].starts_with(NQN_A.as_bytes()));
    assert!(pb[768..].starts_with(NQN_B.as_bytes()));
    // I/O queues on both; A writes a pattern to its NSID 1, B reads its NSID 1: zeroes.
    let mk = |r: &mut Rig| {
        let cq = r.alloc(4096);
        let sq = r.alloc(4096);
        (cq, sq)
    };
    let (cqa, sqa) = mk(&mut a);
    let (cqb, sqb) = mk(&mut b);
    let cq_cmd = |base: u64| {
        Sqe::new(5, 2)
            .with_cdw(10, (15 << 16) | 1)
            .with_cdw(11, 3)
            .with_prps(base, 0)
    };
    let sq_cmd = |base: u64| {
        Sqe::new(1, 3)
            .with_cdw(10, (15 << 16) | 1)
            .with_cdw(11, (1 << 16) | 1)
            .with_prps(base, 0)
    };
    assert_eq!(
        run(&mut a, &mut b, &mut t, cq_cmd(cqa), &mut qa).status,
        Status::SUCCESS
    );
    assert_eq!(
        run(&mut a, &mut b, &mut t, sq_cmd(sqa), &mut qa).status,
        Status::SUCCESS
    );
    assert_eq!(
        run(&mut b, &mut a, &mut t, cq_cmd(cqb), &mut qb).status,
        Status::SUCCESS
    );
    assert_eq!(
        run(&mut b, &mut a, &mut t, sq_cmd(sqb), &mut qb).status,
        Status::SUCCESS
    );
    let mut ioa = Queue::new(1, sqa, cqa, 16);
    let mut iob = Queue::new(1, sqb, cqb, 16);
    a.w.host_write(ba, &[0x5A; 4096]);
    let wr = Sqe::new(1, 9).with_nsid(1).with_cdw(12, 7).with_prps(ba, 0);
    assert_eq!(
        run(&mut a, &mut b, &mut t, wr, &mut ioa).status,
        Status::SUCCESS
    );
    b.w.host_write(bb, &[0xEE; 4096]);
    let rd = Sqe::new(2, 9).with_nsid(1).with_cdw(12, 7).with_prps(bb, 0);
    assert_eq!(
        run(&mut b, &mut a, &mut t, rd, &mut iob).status,
        Status::SUCCESS
    );
    b.w.host_read(bb, &mut pb);
    assert!(pb.iter().all(|&x| x == 0), "B sees its own (empty) disk");
    let rd = Sqe::new(2, 10)
        .with_nsid(1)
        .with_cdw(12, 7)
        .with_prps(ba + 8192, 0);
    let _ = a.alloc(16384);
    assert_eq!(
        run(&mut a, &mut b, &mut t, rd, &mut ioa).status,
        Status::SUCCESS
    );
    a.w.host_read(ba + 8192, &mut pa);
    assert!(pa.iter().all(|&x| x == 0x5A));
    assert_eq!(a.w.refused_dma + b.w.refused_dma, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        lba: u64,
        blocks: u32,
        off: u16,
        seed: u8,
    },
    Read {
        lba: u64,
        blocks: u32,
        off: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let lba = 0..(BLOCKS - 256);
    prop_oneof![
        (lba.clone(), 1u32..=256, 0u16..1024, any::<u8>()).prop_map(|(lba, blocks, off, seed)| {
            Op::Write {
                lba,
                blocks,
                off: off * 4,
                seed,
            }
        }),
        (lba, 1u32..=256, 0u16..1024).prop_map(|(lba, blocks, off)| Op::Read {
            lba,
            blocks,
            off: off * 4
        }),
    ]
}

// Regressions found by the `pcie_function` fuzz target (fuzz/src/pcie.rs).

/// A host rang the admin SQ tail doorbell while the controller was disabled; after the
/// enable the function fetched the (zeroed) entry there as a Delete I/O SQ command and posted
/// a completion for a command the host never submitted. Doorbells now start at 0 on enable.
#[test]
fn doorbell_written_while_disabled_submits_nothing() {
    let mut r = Rig::new();
    r.w.host_doorbell(layout::sq_tail_doorbell(0), 1);
    r.w.host_doorbell(layout::cq_head_doorbell(0), 3);
    r.enable();
    r.steps(5);
    let mut b = [0u8; 16];
    r.w.host_read(r.admin.cq, &mut b);
    assert!(
        !Cqe::from_bytes(&b).phase,
        "a command nobody submitted completed"
    );
    assert_eq!(r.f.stats().commands, 0);
    assert_eq!(r.f.state(), FunctionState::Ready);
    let (c, _) = r.identify(0x01, 0);
    assert_eq!(c.status, Status::SUCCESS);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn io_with_prp_lists_matches_a_model(ops in proptest::collection::vec(op(), 1..24)) {
        let mut r = Rig::new();
        r.enable();
        let mut q = r.io_queue(1, 32);
        let mut model = vec![0u8; BLOCKS as usize * 512];
        let buf = r.alloc(256 * 512 + 8192);
        let start = r.next;
        for (i, op) in ops.into_iter().enumerate() {
            r.next = start; // reuse the PRP list pages
            match op {
                Op::Write { lba, blocks, off, seed } => {
                    let len = blocks as usize * 512;
                    let data: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(31) ^ seed).collect();
                    r.w.host_write(buf + off as u64, &data);
                    let c = r.rw(&mut q, true, lba, blocks, buf + off as u64, i as u16);
                    prop_assert_eq!(c.status, Status::SUCCESS);
                    model[lba as usize * 512..][..len].copy_from_slice(&data);
                }
                Op::Read { lba, blocks, off } => {
                    let len = blocks as usize * 512;
                    let c = r.rw(&mut q, false, lba, blocks, buf + off as u64, i as u16);
                    prop_assert_eq!(c.status, Status::SUCCESS);
                    let mut got = vec![0u8; len];
                    r.w.host_read(buf + off as u64, &mut got);
                    prop_assert_eq!(&got[..], &model[lba as usize * 512..][..len]);
                }
            }
        }
        prop_assert_eq!(r.w.refused_dma, 0);
        prop_assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    }
}

/// A rig whose namespace both cores reach (one RAM backend shared by the function's target
/// and the second core's replica).
fn two_core_rig() -> Rig {
    let shared =
        keel_storage::SharedBackend::new(RamBackend::new(512, BLOCKS, 1024).unwrap(), 1024);
    let mut sub = subsystem(NQN_A);
    sub.namespaces[0].backend = Box::new(shared.handle().unwrap());
    let mut r = Rig::with(function(NQN_A, 64), target(vec![sub]));
    r.with_core1(Box::new(shared.handle().unwrap()));
    r
}

fn core1(r: &Rig) -> &Core1 {
    r.core1.as_ref().unwrap()
}

/// I/O queue 1 goes to core 1 (1 % 2), queue 2 stays (2 % 2 = 0): each serves its queue's
/// reads and writes with the same data, completions and interrupts on the right CQ, the
/// function's core fetching none of queue 1's commands; Delete I/O SQ waits until the pair
/// is back, then completes, and the queue IDs can be used again.
#[test]
fn io_queue_pairs_are_served_on_their_core_and_come_back_on_delete() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let mut q2 = r.io_queue(2, 64);
    assert_eq!(core1(&r).adopted, 1, "queue 1 went to core 1");
    assert_eq!(r.f.abroad(), 1);
    let fetched_here = r.f.stats().commands;
    let buf = r.alloc(64 * 1024);
    let pattern: Vec<u8> = (0..32 * 1024).map(|i| (i * 7 + 3) as u8).collect();
    r.w.host_write(buf, &pattern);
    // Written on core 1 (a PRP list: 32 KiB), read back on core 0's queue 2.
    assert_eq!(r.rw(&mut q1, true, 100, 64, buf, 1).status, Status::SUCCESS);
    assert_eq!(
        r.f.stats().commands,
        fetched_here,
        "queue 1 fetched on core 1 only"
    );
    assert_eq!(core1(&r).stats.commands, 1);
    let back = buf + 32 * 1024;
    assert_eq!(
        r.rw(&mut q2, false, 100, 64, back, 2).status,
        Status::SUCCESS
    );
    let mut got = vec![0u8; 32 * 1024];
    r.w.host_read(back, &mut got);
    assert_eq!(got, pattern);
    // Many at once on core 1, read back there.
    for k in 0..16u16 {
        let (p1, p2) = r.prps(back, 4096);
        let sqe = Sqe::new(0x02, 100 + k)
            .with_nsid(1)
            .with_cdw(10, 100 + k as u32 * 8)
            .with_cdw(12, 7)
            .with_prps(p1, p2);
        r.push(&mut q1, &sqe);
    }
    for _ in 0..16 {
        let c = r.wait(&mut q1);
        assert_eq!(c.status, Status::SUCCESS);
        assert_eq!(c.sqid, 1);
    }
    assert_eq!(core1(&r).stats.commands, 17);
    assert!(core1(&r).stats.interrupts > 0);
    assert!(
        r.w.host_interrupts(1) > 0,
        "queue 1's vector raised by core 1"
    );
    // The replica counted them, the function's target did not.
    let ns = core1(&r).t.namespace_stats(NQN_A, 1).unwrap();
    assert_eq!((ns.reads, ns.writes), (16, 1));
    // Delete I/O SQ 1: asked back, completes once home.
    assert_eq!(r.delete(0x00, 1), Status::SUCCESS);
    assert_eq!(r.f.abroad(), 0);
    assert!(core1(&r).pairs.is_empty());
    assert_eq!(r.delete(0x04, 1), Status::SUCCESS);
    // Recreated: goes to core 1 again and works.
    let mut q1 = r.io_queue(1, 64);
    assert_eq!(core1(&r).adopted, 2);
    assert_eq!(
        r.rw(&mut q1, false, 100, 64, back, 3).status,
        Status::SUCCESS
    );
    r.w.host_read(back, &mut got);
    assert_eq!(got, pattern);
    r.steps(3);
    assert_eq!(core1(&r).pool.available(), core1(&r).pool.count());
}

/// A controller reset with a pair on core 1 and commands in flight there: CSTS.RDY stays 1
/// until core 1 has dropped them and given the pair back (a slow core holds it), then the
/// reset completes, every buffer is home on both cores, and a new controller works.
#[test]
fn reset_waits_for_pairs_abroad_and_drops_their_commands() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(64 * 4096);
    r.core1.as_mut().unwrap().paused = true;
    for k in 0..8u16 {
        let sqe = Sqe::new(0x01, k)
            .with_nsid(1)
            .with_cdw(10, k as u32 * 8)
            .with_cdw(12, 7)
            .with_prps(buf + k as u64 * 4096, 0);
        r.push(&mut q1, &sqe);
    }
    r.cc(0);
    r.steps(10);
    assert!(r.csts().rdy(), "RDY stays while the pair is abroad");
    assert_eq!(r.f.abroad(), 1);
    r.core1.as_mut().unwrap().paused = false;
    r.wait_csts(|c| c.0 == 0);
    assert_eq!(r.f.abroad(), 0);
    assert_eq!(r.f.state(), FunctionState::Disabled);
    r.steps(3);
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    assert_eq!(core1(&r).pool.available(), core1(&r).pool.count());
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
}

/// A shutdown with commands submitted to queue 1 on core 1 but not fetched (core 1 paused):
/// the pair comes back with what it had, and the function's core executes the rest before
/// reporting the shutdown complete; every write is in the namespace.
#[test]
fn shutdown_brings_pairs_home_and_executes_what_was_submitted() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(16 * 4096);
    r.w.host_write(buf, &[0x5A; 16 * 4096]);
    r.core1.as_mut().unwrap().paused = true;
    for k in 0..16u16 {
        let sqe = Sqe::new(0x01, k)
            .with_nsid(1)
            .with_cdw(10, k as u32 * 8)
            .with_cdw(12, 7)
            .with_prps(buf + k as u64 * 4096, 0);
        r.push(&mut q1, &sqe);
    }
    r.cc(Cc::new(true, 0, 0, 0, Cc::SHN_NORMAL, 6, 4).0);
    r.steps(5);
    assert_ne!(r.csts().shst(), Csts::SHST_COMPLETE);
    r.core1.as_mut().unwrap().paused = false;
    r.wait_csts(|c| c.shst() == Csts::SHST_COMPLETE);
    assert_eq!(r.f.abroad(), 0);
    let mut seen = 0;
    while let Some(c) = r.reap(&mut q1) {
        assert_eq!(c.status, Status::SUCCESS);
        seen += 1;
    }
    assert_eq!(seen, 16);
    let ns = r.t.namespace_stats(NQN_A, 1).unwrap();
    assert_eq!(
        ns.writes, 16,
        "executed on the function's core after the pair came home"
    );
}

/// Core 1 sees an SQ tail doorbell beyond the queue: the function reports CSTS.CFS; a reset
/// brings the pair home and a new controller works.
#[test]
fn a_bad_doorbell_seen_on_core_1_is_fatal_for_the_function() {
    let mut r = two_core_rig();
    r.enable();
    r.io_queue(1, 64);
    r.w.host_doorbell(layout::sq_tail_doorbell(1), 64);
    r.steps(3);
    assert!(r.csts().cfs());
    assert_eq!(
        r.f.fatal_reason(),
        Some(FatalReason::SqTailDoorbell { qid: 1, value: 64 })
    );
    r.enable();
    assert_eq!(r.f.abroad(), 0);
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(4096);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
}

/// A fatal error seen on the function's own core (the admin SQ tail doorbell beyond the
/// queue) with queue 1 on core 1: core 1 is told to stop and drop, CSTS.CFS shows only once
/// the pair is home (before that, a command submitted on queue 1 could still run there), and
/// a command the host submits on queue 1 after seeing CFS is never completed.
#[test]
fn a_fatal_error_on_core_0_stops_the_pairs_abroad_before_cfs_shows() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(4096);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
    r.core1.as_mut().unwrap().paused = true;
    r.w.host_doorbell(layout::sq_tail_doorbell(0), 1000);
    r.steps(3);
    assert!(r.f.fatal_reason().is_some());
    assert!(
        !r.csts().cfs(),
        "CFS waits for the pair abroad (core 1 has not answered)"
    );
    assert_eq!(r.f.abroad(), 1);
    r.core1.as_mut().unwrap().paused = false;
    r.wait_csts(|c| c.cfs());
    assert_eq!(r.f.abroad(), 0, "home before CFS showed");
    assert!(core1(&r).pairs.is_empty());
    let before = core1(&r).stats.commands + r.f.stats().commands;
    let sqe = Sqe::new(0x01, 77)
        .with_nsid(1)
        .with_cdw(10, 8)
        .with_prps(buf, 0);
    r.push(&mut q1, &sqe);
    r.steps(10);
    assert!(
        r.reap(&mut q1).is_none(),
        "a fatal controller completed a command"
    );
    assert_eq!(core1(&r).stats.commands + r.f.stats().commands, before);
    // A reset brings it back to work, queue 1 on core 1 again.
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    assert_eq!(r.f.abroad(), 1);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 2).status, Status::SUCCESS);
}

/// Removal with a pair abroad: nothing more is posted by either core, the pair comes back
/// dropped, and every buffer is home.
#[test]
fn removal_recalls_pairs_abroad() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(4096);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
    assert!(r.f.remove(&mut r.t, &mut r.w));
    assert_eq!(r.f.abroad(), 1, "until core 1 answers");
    r.core1_pass();
    assert_eq!(r.f.abroad(), 0);
    assert!(core1(&r).pairs.is_empty());
}

/// A second SQ on a CQ abroad, and fewer cores: the pair comes home first and both SQs are
/// then served here; with one core nothing leaves.
#[test]
fn a_shared_cq_and_one_core_keep_queues_home() {
    let mut r = two_core_rig();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    assert_eq!(r.f.abroad(), 1);
    let sq3 = r.alloc(64 * 64);
    assert_eq!(r.create_sq(3, 64, 1, sq3), Status::SUCCESS);
    assert_eq!(r.f.abroad(), 0, "CQ 1 is shared now: served here");
    let buf = r.alloc(4096);
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
    r.f.set_cores(1);
    let mut q5 = r.io_queue(5, 16);
    assert_eq!(r.f.abroad(), 0);
    assert_eq!(r.rw(&mut q5, false, 0, 8, buf, 2).status, Status::SUCCESS);
    assert_eq!(core1(&r).adopted, 1);
}

/// What the test does to [`Held`]: hold its requests, and see the aborts asked of it.
#[derive(Default)]
struct HoldKnobs {
    hold: bool,
    held: std::collections::VecDeque<(keel_storage::BlockRequest, bool)>,
    abort_calls: Vec<u64>,
}

/// Core 1's way to the shared namespace, holding requests while told to (a slow drive) and
/// aborting held ones (they complete with Aborted at its next poll).
struct Held {
    inner: Box<dyn keel_storage::BlockBackend>,
    k: std::rc::Rc<std::cell::RefCell<HoldKnobs>>,
}

impl keel_storage::BlockBackend for Held {
    fn geometry(&self) -> keel_storage::Geometry {
        self.inner.geometry()
    }
    fn capabilities(&self) -> keel_storage::Capabilities {
        self.inner.capabilities()
    }
    fn submit(&mut self, req: keel_storage::BlockRequest) -> Result<(), keel_storage::Rejected> {
        let mut k = self.k.borrow_mut();
        if k.hold {
            k.held.push_back((req, false));
            return Ok(());
        }
        drop(k);
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(keel_storage::BlockCompletion)) -> usize {
        let mut n = 0;
        let go: Vec<_> = {
            let mut k = self.k.borrow_mut();
            let all = !k.hold;
            let held = core::mem::take(&mut k.held);
            let (go, stay): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, a)| all || *a);
            k.held = stay.into_iter().collect();
            go
        };
        for (mut req, aborted) in go {
            if aborted {
                done(keel_storage::BlockCompletion {
                    tag: req.tag,
                    result: Err(keel_storage::BlockError::Aborted),
                    buf: req.buf.take(),
                });
                n += 1;
            } else {
                self.inner.submit(req).map_err(|_| ()).unwrap();
            }
        }
        n + self.inner.poll(done)
    }
    fn abort(&mut self, tag: u64) -> bool {
        let mut k = self.k.borrow_mut();
        k.abort_calls.push(tag);
        match k.held.iter_mut().find(|(r, a)| r.tag == tag && !*a) {
            Some((_, a)) => {
                *a = true;
                true
            }
            None => false,
        }
    }
}

/// [`two_core_rig`] whose second core reaches the namespace through [`Held`].
fn two_core_rig_held() -> (Rig, std::rc::Rc<std::cell::RefCell<HoldKnobs>>) {
    let shared =
        keel_storage::SharedBackend::new(RamBackend::new(512, BLOCKS, 1024).unwrap(), 1024);
    let mut sub = subsystem(NQN_A);
    sub.namespaces[0].backend = Box::new(shared.handle().unwrap());
    let mut r = Rig::with(function(NQN_A, 64), target(vec![sub]));
    let k = std::rc::Rc::new(std::cell::RefCell::new(HoldKnobs::default()));
    r.with_core1(Box::new(Held {
        inner: Box::new(shared.handle().unwrap()),
        k: k.clone(),
    }));
    (r, k)
}

/// Abort (admin opcode 08h) of command `cid` of SQ `sqid`.
fn abort_sqe(cid: u16, sqid: u16, target_cid: u16) -> Sqe {
    Sqe::new(0x08, cid).with_cdw(10, sqid as u32 | (target_cid as u32) << 16)
}

/// A host's Abort of a command outstanding on queue 1, served on core 1: the function's
/// core asks core 1 (one message), whose replica aborts the command at its backend; the
/// command completes on queue 1 with Command Abort Requested and the Abort with DW0 bit 0
/// clear (aborted). An Abort of a command core 1 does not have: asked there too, "not
/// aborted" (DW0 bit 0 set). Queue 1 works on afterwards.
#[test]
fn an_abort_of_a_command_on_core_1_gets_core_1s_verdict() {
    let (mut r, k) = two_core_rig_held();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    assert_eq!(r.f.abroad(), 1);
    let buf = r.alloc(4096);
    k.borrow_mut().hold = true;
    let read = Sqe::new(0x02, 5)
        .with_nsid(1)
        .with_cdw(12, 7)
        .with_prps(buf, 0);
    r.push(&mut q1, &read);
    r.steps(3);
    assert_eq!(k.borrow().held.len(), 1, "the read waits at core 1's drive");
    assert!(r.reap(&mut q1).is_none());
    let c = r.admin(abort_sqe(40, 1, 5));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(c.dw0 & 1, 0, "aborted");
    assert_eq!(k.borrow().abort_calls.len(), 1, "core 1's drive was asked");
    assert_eq!(core1(&r).verdicts.len(), 1);
    assert!(core1(&r).verdicts[0].1);
    let c = r.wait(&mut q1);
    assert_eq!(
        (c.cid, without_more(c.status)),
        (5, Status::ABORT_REQUESTED)
    );
    // A command core 1 does not have.
    let c = r.admin(abort_sqe(41, 1, 77));
    assert_eq!((c.status, c.dw0 & 1), (Status::SUCCESS, 1), "not aborted");
    assert_eq!(core1(&r).verdicts.len(), 2, "asked of core 1 too");
    assert!(!core1(&r).verdicts[1].1);
    k.borrow_mut().hold = false;
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 6).status, Status::SUCCESS);
    r.steps(3);
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    assert_eq!(core1(&r).pool.available(), core1(&r).pool.count());
}

/// An Abort that reaches core 1 after its pair left (one core from now on: the pair is
/// asked home): the pair is home, so the function's core answers the Abort "not aborted"
/// once, and core 1's verdict arriving later is ignored even if it says "aborted"; queue 1
/// then works on core 0. The same crossing a Delete I/O SQ: the Abort once, the Delete. A
/// drained pair with the aborted command held at core 1's drive: the Abort wins there and
/// the pair comes home after.
#[test]
fn an_abort_parked_while_its_pair_comes_home_is_answered_once() {
    let (mut r, k) = two_core_rig_held();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(4096);
    r.core1.as_mut().unwrap().aborts_late = true;
    // Core 1's late verdicts say "aborted" here: only an answer the function's core gave
    // first (the pair home) makes the Abort "not aborted".
    let run = |r: &mut Rig, admin: &mut Queue| {
        let mut cqes = Vec::new();
        for _ in 0..20 {
            r.step();
            for v in r.core1.as_mut().unwrap().ring.iter_mut() {
                v.1 = true;
            }
            while let Some(c) = r.reap(admin) {
                cqes.push(c);
            }
        }
        let mut got: Vec<_> = cqes.iter().map(|c| (c.cid, c.status, c.dw0 & 1)).collect();
        got.sort_by_key(|c| c.0);
        got
    };
    let mut admin = r.admin;
    r.push(&mut admin, &abort_sqe(40, 1, 9));
    r.f.set_cores(1);
    let got = run(&mut r, &mut admin);
    r.admin = admin;
    assert_eq!(got, [(40, Status::SUCCESS, 1)], "once, not aborted");
    assert_eq!(r.f.abroad(), 0);
    let c1 = core1(&r);
    assert_eq!(c1.verdicts, [(c1.verdicts[0].0, false)], "asked of core 1");
    assert!(
        c1.ring.is_empty(),
        "its verdict was delivered (and ignored)"
    );
    assert_eq!(r.rw(&mut q1, true, 0, 8, buf, 1).status, Status::SUCCESS);
    // Crossing a Delete I/O SQ.
    assert_eq!(r.delete(0x00, 1), Status::SUCCESS);
    assert_eq!(r.delete(0x04, 1), Status::SUCCESS);
    r.f.set_cores(2);
    r.io_queue(1, 64);
    assert_eq!(r.f.abroad(), 1);
    let mut admin = r.admin;
    r.push(&mut admin, &abort_sqe(41, 1, 9));
    r.push(&mut admin, &Sqe::new(0x00, 42).with_cdw(10, 1));
    let got = run(&mut r, &mut admin);
    assert_eq!(
        got,
        [(41, Status::SUCCESS, 1), (42, Status::SUCCESS, 0)],
        "the Abort once, not aborted; the Delete"
    );
    assert_eq!(core1(&r).verdicts.len(), 2);
    r.admin = admin;
    assert_eq!(r.delete(0x04, 1), Status::SUCCESS);
    // Again with the command held at core 1's drive and the Abort in time: aborted there,
    // then the drained pair comes home for the Delete.
    let mut q1b = r.io_queue(1, 64);
    r.core1.as_mut().unwrap().aborts_late = false;
    k.borrow_mut().hold = true;
    let read = Sqe::new(0x02, 9)
        .with_nsid(1)
        .with_cdw(12, 7)
        .with_prps(buf, 0);
    r.push(&mut q1b, &read);
    r.steps(3);
    assert_eq!(k.borrow().held.len(), 1);
    let mut admin = r.admin;
    r.push(&mut admin, &abort_sqe(43, 1, 9));
    r.push(&mut admin, &Sqe::new(0x00, 44).with_cdw(10, 1));
    let mut cqes = Vec::new();
    for _ in 0..20 {
        r.step();
        while let Some(c) = r.reap(&mut admin) {
            cqes.push(c);
        }
    }
    r.admin = admin;
    let mut got: Vec<_> = cqes.iter().map(|c| (c.cid, c.status, c.dw0 & 1)).collect();
    got.sort_by_key(|c| c.0);
    assert_eq!(got, [(43, Status::SUCCESS, 0), (44, Status::SUCCESS, 0)]);
    let c = r.reap(&mut q1b).expect("the read's completion");
    assert_eq!(
        (c.cid, without_more(c.status)),
        (9, Status::ABORT_REQUESTED)
    );
}

/// A controller reset while an Abort of a command on core 1 is asked there and not yet
/// answered (core 1 slow): the reset waits for the pair, then completes; the Abort is never
/// completed on the old admin queue (a reset drops it), core 1's late verdict is ignored,
/// and the new controller's Aborts on a pair abroad work.
#[test]
fn a_reset_with_an_abort_asked_of_core_1_drops_it_and_aborts_work_after() {
    let (mut r, k) = two_core_rig_held();
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    let buf = r.alloc(4096);
    k.borrow_mut().hold = true;
    let read = Sqe::new(0x02, 5)
        .with_nsid(1)
        .with_cdw(12, 7)
        .with_prps(buf, 0);
    r.push(&mut q1, &read);
    r.steps(3);
    r.core1.as_mut().unwrap().paused = true;
    let mut admin = r.admin;
    r.push(&mut admin, &abort_sqe(40, 1, 5));
    r.steps(5);
    assert!(r.reap(&mut admin).is_none(), "waits for core 1");
    assert_eq!(core1(&r).aborts.len(), 1, "asked of core 1");
    r.cc(0);
    r.steps(5);
    assert!(r.csts().rdy(), "the reset waits for the pair");
    r.core1.as_mut().unwrap().paused = false;
    r.wait_csts(|c| c.0 == 0);
    r.steps(3);
    assert!(r.reap(&mut admin).is_none(), "dropped by the reset");
    assert_eq!(r.f.abroad(), 0);
    assert_eq!(core1(&r).pool.available(), core1(&r).pool.count());
    k.borrow_mut().hold = false;
    r.steps(3);
    assert_eq!(r.f.buffers_available(), r.f.buffers_total());
    r.enable();
    let mut q1 = r.io_queue(1, 64);
    k.borrow_mut().hold = true;
    r.push(&mut q1, &read);
    r.steps(3);
    let c = r.admin(abort_sqe(41, 1, 5));
    assert_eq!((c.status, c.dw0 & 1), (Status::SUCCESS, 0), "aborted");
    let c = r.wait(&mut q1);
    assert_eq!(
        (c.cid, without_more(c.status)),
        (5, Status::ABORT_REQUESTED)
    );
}
