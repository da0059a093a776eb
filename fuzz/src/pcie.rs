//! The emulated NVMe PCIe function fed by a hostile host: register writes (CC, AQA, ASQ,
//! ACQ, anything), doorbells, queue entries (typed or 64 raw bytes), queue creation and
//! deletion, PRP entries and PRP lists, shutdown and reset, over a [`MemWindow`] with a real
//! controller core behind it.
//!
//! The harness plays a host driver with a model of its queues (bases from a fixed layout,
//! tails, heads, phases, the CIDs it submitted). While the model is in step with the function
//! (no raw register, doorbell or queue-creating write since the last enable) it checks that
//! every completion answers a command submitted on an SQ bound to that CQ, at most once, and
//! that every command except an Asynchronous Event Request completes. Always: the function
//! writes no register but CAP, VS and CSTS, clears doorbells only, never writes host memory
//! outside the completion queues and data area the host gave it (while the model holds), and
//! after a reset every buffer is back and the core holds no queue.

use arbitrary::Arbitrary;
use keel_controller::{Instant, Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use keel_nvme::regs::{Cc, Csts, offset};
use keel_nvme::{Cqe, Sqe};
use keel_nvme_pcie::layout::{self, PAGE_SIZE};
use keel_nvme_pcie::{
    DmaError, EndpointFunction, FunctionConfig, FunctionState, MemWindow, PcieFunction,
};
use keel_storage::{BufPool, RamBackend};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

const NQN: &str = "nqn.2026-11.dev.keel:fuzz-fn";
const WINDOW: usize = 0x80000;
const PS: u64 = PAGE_SIZE as u64;
const ADMIN_SQ: u64 = 0x10000;
const ADMIN_CQ: u64 = 0x11000;
const IO_BASE: u64 = 0x12000;
const LISTS: u64 = 0x22000;
const LIST_PAGES: u64 = 8;
const DATA: u64 = 0x2A000;
const DATA_LEN: u64 = WINDOW as u64 - DATA;
const MAX_IO_QUEUES: u16 = 8;
/// Admin opcodes: Delete/Create I/O SQ/CQ, Get Log Page, Identify, Abort, Set/Get Features,
/// AER, Keep Alive, fabrics, an unknown one.
const ADMIN_OPS: [u8; 13] = [
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18, 0x7F, 0x81,
];
/// I/O opcodes: Flush, Write, Read, Compare, Write Zeroes, Dataset Management, unknown.
const IO_OPS: [u8; 7] = [0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x33];

/// The function's data buffers, carved once and handed from one input to the next (in a
/// `static`, never dropped, so LeakSanitizer sees the memory reachable).
static POOL: Mutex<Option<BufPool>> = Mutex::new(None);

/// A whole fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Commands fetched per SQ per poll (1..=8).
    pub burst: u8,
    /// What the host does, in order.
    pub ops: Vec<Op>,
}

/// One host action.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Reset, then set up an admin queue pair from the layout and enable.
    Enable {
        /// ASQS - 1 (taken modulo the layout's room).
        asqs: u8,
        /// ACQS - 1.
        acqs: u8,
        /// CC to enable with (None: EN, MPS 4 KiB, IOSQES 6, IOCQES 4).
        cc: Option<u32>,
    },
    /// Any register write.
    Reg {
        /// Register offset / 4 (within the register page).
        index: u16,
        /// Value.
        value: u32,
    },
    /// CC.SHN: normal (1) or abrupt (2) shutdown notification.
    Shutdown {
        /// Abrupt.
        abrupt: bool,
    },
    /// CC.EN = 0.
    Reset,
    /// Create I/O CQ at the layout's address for `qid`.
    CreateCq {
        /// QID.
        qid: u8,
        /// QSIZE (0's based).
        size: u8,
        /// CDW11 bits: PC (1), IEN (2).
        flags: u8,
        /// Interrupt vector.
        iv: u16,
    },
    /// Create I/O SQ at the layout's address for `qid`.
    CreateSq {
        /// QID.
        qid: u8,
        /// QSIZE (0's based, at most 63 here: the layout's room).
        size: u8,
        /// CQ it completes to.
        cqid: u8,
        /// Physically contiguous.
        pc: bool,
    },
    /// Delete I/O SQ.
    DeleteSq {
        /// QID.
        qid: u8,
    },
    /// Delete I/O CQ.
    DeleteCq {
        /// QID.
        qid: u8,
    },
    /// A typed command on SQ `sq` (0: admin).
    Cmd {
        /// SQ.
        sq: u8,
        /// The command.
        cmd: Cmd,
    },
    /// 64 raw bytes on SQ `sq`.
    RawSqe {
        /// SQ.
        sq: u8,
        /// The entry.
        sqe: [u8; 64],
    },
    /// Any doorbell, any value.
    Doorbell {
        /// Doorbell index.
        index: u8,
        /// Value.
        value: u16,
    },
    /// Host writes into its PRP-list and data pages.
    Scribble {
        /// Offset from the first PRP-list page.
        at: u32,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// The function and core are polled.
    Step {
        /// Polls.
        n: u8,
    },
    /// The host reaps its completion queues.
    Reap,
}

/// A command with typed fields.
#[derive(Arbitrary, Debug)]
pub struct Cmd {
    /// Opcode: an index into the known ones when `known`, else raw.
    pub opcode: u8,
    /// Pick the opcode from the known ones.
    pub known: bool,
    /// CID.
    pub cid: u16,
    /// NSID (0xFF: all).
    pub nsid: u8,
    /// FUSE/PSDT byte.
    pub flags: u8,
    /// CDW10..CDW15.
    pub cdw: [u32; 6],
    /// Data pointer.
    pub prp: Prp,
}

/// How the data pointer is built.
#[derive(Arbitrary, Debug)]
pub enum Prp {
    /// PRP1 into the data area; PRP2 the next page, or a PRP list (in the list pages) of
    /// data pages, chained when it is long.
    Data {
        /// Offset of PRP1 into the data area.
        offset: u32,
        /// PRP2 points to a list (else to the page after PRP1's).
        list: bool,
        /// Offset of the list into the list pages.
        list_offset: u16,
        /// List entries: data pages (index) and offsets within them.
        entries: Vec<(u8, u16)>,
    },
    /// Any PRP1 and PRP2.
    Raw {
        /// PRP1.
        prp1: u64,
        /// PRP2.
        prp2: u64,
    },
}

#[derive(Debug, Default)]
struct MSq {
    cq: u16,
    base: u64,
    entries: u16,
    tail: u16,
    /// CID -> (count, opcode).
    outstanding: HashMap<u16, (u32, u8)>,
    /// Deleted (kept: its aborted commands' completions may still be on their CQ).
    deleted: bool,
    /// Commands of a deleted SQ of the same QID: they may complete (aborted) or not at all.
    stale: HashMap<u16, u32>,
}

impl MSq {
    fn count(&self) -> u32 {
        self.outstanding.values().map(|v| v.0).sum()
    }
}

#[derive(Debug, Default)]
struct MCq {
    base: u64,
    entries: u16,
    head: u16,
    phase: bool,
}

/// What a completed admin command changes in the model.
#[derive(Debug, Clone, Copy)]
enum Effect {
    CreateCq(u16, u16),
    CreateSq(u16, u16, u16),
    DeleteSq(u16),
    DeleteCq(u16),
}

/// The endpoint seen by the function: the window plus the checks of what the function writes.
struct Checked {
    w: MemWindow,
    /// Host memory the function may write while the model holds: the CQs and the data area.
    writable: Vec<Range<u64>>,
    strict: bool,
}

impl EndpointFunction for Checked {
    fn read_reg(&mut self, offset: u32) -> u32 {
        self.w.read_reg(offset)
    }
    fn write_reg(&mut self, o: u32, value: u32) {
        assert!(
            [offset::CAP, offset::CAP + 4, offset::VS, offset::CSTS].contains(&o),
            "the function wrote register {o:#x}"
        );
        self.w.write_reg(o, value);
    }
    fn read_doorbell(&mut self, index: u16) -> u32 {
        self.w.read_doorbell(index)
    }
    fn write_doorbell(&mut self, index: u16, value: u32) {
        assert_eq!(value, 0, "the function wrote doorbell {index} with {value}");
        self.w.write_doorbell(index, value);
    }
    fn host_area(&self) -> Range<u64> {
        self.w.host_area()
    }
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.w.dma_read(addr, buf)
    }
    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let area = self.w.host_area();
        let end = addr.checked_add(data.len() as u64);
        let inside = end.is_some_and(|e| addr >= area.start && e <= area.end);
        if self.strict && inside {
            let e = end.unwrap_or(u64::MAX);
            assert!(
                self.writable.iter().any(|r| addr >= r.start && e <= r.end),
                "the function wrote {} bytes at {addr:#x}, outside the CQs and data area",
                data.len()
            );
        }
        let before = self.w.refused_dma;
        let r = self.w.dma_write(addr, data);
        // The endpoint refuses exactly what lies outside host memory.
        assert_eq!(r.is_err(), !inside, "DMA write at {addr:#x} wrongly judged");
        assert_eq!(self.w.refused_dma, before + u64::from(!inside));
        r
    }
    fn raise_interrupt(&mut self, vector: u16) {
        self.w.raise_interrupt(vector)
    }
    fn vectors(&self) -> u16 {
        self.w.vectors()
    }
}

struct Harness {
    f: PcieFunction,
    t: Target,
    ep: Checked,
    now: u64,
    /// The model: SQs and CQs by QID (index 0: admin), present while the host believes them live.
    sqs: Vec<Option<MSq>>,
    cqs: Vec<Option<MCq>>,
    /// Admin commands whose completion changes the model, by CID.
    effects: HashMap<u16, Effect>,
    /// The model is in step with the function.
    synced: bool,
}

fn namespace(nsid: u32, bs: u32) -> NamespaceConfig {
    NamespaceConfig {
        nsid,
        backend: Box::new(RamBackend::new(bs, (1 << 20) / bs as u64, 64).expect("ram")),
        nguid: [nsid as u8; 16],
        uuid: [0; 16],
        eui64: [0; 8],
        qos: Default::default(),
    }
}

/// A QID for queue management: 0 (the admin queue: refused), 1..=8, or 9 (beyond the
/// granted queues: refused); and whether the model follows it (1..=8).
fn queue_id(q: u8) -> (u16, bool) {
    let qid = q as u16 % (MAX_IO_QUEUES + 2);
    (qid, (1..=MAX_IO_QUEUES).contains(&qid))
}

fn io_sq_base(qid: u16) -> u64 {
    IO_BASE + (qid as u64 - 1) * 2 * PS
}

fn io_cq_base(qid: u16) -> u64 {
    io_sq_base(qid) + PS
}

impl Harness {
    fn new(burst: u16) -> Self {
        let t = Target::new(TargetConfig {
            subsystems: vec![SubsystemConfig {
                nqn: NQN.into(),
                serial: "KEELFUZZFN".into(),
                model: "Keel fuzz function".into(),
                allowed_hosts: vec![],
                namespaces: vec![namespace(1, 512), namespace(2, 4096)],
            }],
            limits: Limits {
                max_queue_depth: 256,
                max_io_queues: MAX_IO_QUEUES,
                ..Limits::default()
            },
            ..TargetConfig::default()
        })
        .expect("target");
        let pool = POOL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| BufPool::from_heap(16, 128 << 10, 0).expect("pool"));
        let cfg = FunctionConfig {
            max_io_queues: MAX_IO_QUEUES,
            fetch_burst: burst,
            ..FunctionConfig::new(NQN)
        };
        let f = PcieFunction::new(cfg, pool).expect("function");
        let mut h = Self {
            f,
            t,
            ep: Checked {
                w: MemWindow::new(WINDOW),
                writable: Vec::new(),
                strict: true,
            },
            now: 0,
            sqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
            cqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
            effects: HashMap::new(),
            synced: false,
        };
        h.step(1);
        h
    }

    fn step(&mut self, n: usize) {
        for _ in 0..n {
            self.now += 1_000_000;
            self.f
                .poll_with_target(Instant::from_nanos(self.now), &mut self.t, &mut self.ep);
        }
    }

    fn csts(&self) -> Csts {
        Csts(self.ep.w.host_reg(offset::CSTS))
    }

    /// Forgets every queue (after a reset, or when the model can no longer follow).
    fn forget(&mut self, synced: bool) {
        self.sqs.iter_mut().for_each(|s| *s = None);
        self.cqs.iter_mut().for_each(|c| *c = None);
        self.effects.clear();
        self.synced = synced;
        self.refresh_writable();
    }

    fn desync(&mut self) {
        self.synced = false;
        self.ep.strict = false;
    }

    fn refresh_writable(&mut self) {
        let mut w: Vec<Range<u64>> = Vec::with_capacity(self.cqs.len() + 2);
        w.push(DATA..DATA + DATA_LEN);
        // PRP lists are built here, but a transfer that spans exactly two pages takes PRP2 as
        // the second data page itself (NVMe base 2.0 §4.1.1), wherever the host pointed it.
        w.push(LISTS..LISTS + LIST_PAGES * PS);
        w.extend(
            self.cqs
                .iter()
                .flatten()
                .map(|c| c.base..c.base + c.entries as u64 * 16),
        );
        self.ep.writable = w;
        self.ep.strict = self.synced;
    }

    fn reset(&mut self) {
        self.ep.w.host_set_reg(offset::CC, 0);
        for _ in 0..4 {
            self.step(1);
            if !self.csts().rdy() {
                break;
            }
        }
        self.forget(false);
    }

    fn enable(&mut self, asqs: u8, acqs: u8, cc: Option<u32>) {
        self.reset();
        let asqs = 2 + asqs as u16 % 63;
        let acqs = 2 + acqs as u16 % 255;
        let w = &mut self.ep.w;
        w.bytes_mut()[ADMIN_SQ as usize..(ADMIN_SQ + 2 * PS) as usize].fill(0);
        w.host_set_reg(offset::AQA, ((acqs as u32 - 1) << 16) | (asqs as u32 - 1));
        w.host_set_reg64(offset::ASQ, ADMIN_SQ);
        w.host_set_reg64(offset::ACQ, ADMIN_CQ);
        w.host_set_reg(offset::CC, cc.unwrap_or(Cc::new(true, 0, 0, 0, 0, 6, 4).0));
        self.sqs[0] = Some(MSq {
            cq: 0,
            base: ADMIN_SQ,
            entries: asqs,
            ..MSq::default()
        });
        self.cqs[0] = Some(MCq {
            base: ADMIN_CQ,
            entries: acqs,
            head: 0,
            phase: true,
        });
        self.synced = true;
        self.refresh_writable();
        self.step(1);
    }

    /// Writes `sqe` at SQ `qid`'s tail and rings its doorbell; false when the model has no
    /// such queue or it is full.
    fn submit(&mut self, qid: u16, sqe: Sqe, effect: Option<Effect>) -> bool {
        let Some(Some(sq)) = self.sqs.get_mut(qid as usize) else {
            return false;
        };
        if sq.deleted || sq.count() + 1 >= sq.entries as u32 {
            return false;
        }
        let at = sq.base + sq.tail as u64 * 64;
        sq.tail = (sq.tail + 1) % sq.entries;
        sq.outstanding.entry(sqe.cid).or_insert((0, sqe.opcode)).0 += 1;
        let tail = sq.tail;
        self.ep.w.host_write(at, &sqe.to_bytes());
        self.ep
            .w
            .host_doorbell(layout::sq_tail_doorbell(qid), tail as u32);
        if let Some(e) = effect {
            self.effects.insert(sqe.cid, e);
        }
        true
    }

    /// A queue-management command (Create/Delete I/O SQ/CQ) for `qid` on the admin queue.
    /// Its CID is derived from opcode and QID: the model follows one of each at a time.
    fn queue_command(
        &mut self,
        opcode: u8,
        qid: u16,
        size: u8,
        cdw11: u32,
        prp1: u64,
        e: Option<Effect>,
    ) {
        let cid = 0x100 * (1 + opcode as u16) + qid;
        if e.is_some() && self.effects.contains_key(&cid) {
            return;
        }
        let mut sqe = Sqe::new(opcode, cid)
            .with_cdw(10, ((size as u32) << 16) | qid as u32)
            .with_cdw(11, cdw11);
        sqe.set_prps(prp1, 0);
        self.submit(0, sqe, e);
    }

    /// Reaps every CQ the model knows and checks each entry against what was submitted.
    fn reap(&mut self) {
        if !self.synced || self.csts().cfs() {
            return;
        }
        for cqid in 0..self.cqs.len() {
            while let Some(Some(cq)) = self.cqs.get(cqid) {
                let at = cq.base + cq.head as u64 * 16;
                let mut b = [0u8; 16];
                self.ep.w.host_read(at, &mut b);
                let c = Cqe::from_bytes(&b);
                if c.phase != cq.phase {
                    break;
                }
                let cq = self.cqs[cqid].as_mut().expect("cq");
                cq.head += 1;
                if cq.head == cq.entries {
                    cq.head = 0;
                    cq.phase = !cq.phase;
                }
                let head = cq.head;
                self.ep
                    .w
                    .host_doorbell(layout::cq_head_doorbell(cqid as u16), head as u32);
                self.completed(cqid as u16, &c);
            }
        }
    }

    fn completed(&mut self, cqid: u16, c: &Cqe) {
        let sq = self
            .sqs
            .get_mut(c.sqid as usize)
            .and_then(|s| s.as_mut())
            .unwrap_or_else(|| {
                panic!("completion for SQ {} the host does not have: {c:?}", c.sqid)
            });
        assert_eq!(sq.cq, cqid, "completion of SQ {} on CQ {cqid}", c.sqid);
        if let Some(e) = sq.outstanding.get_mut(&c.cid) {
            e.0 -= 1;
            if e.0 == 0 {
                sq.outstanding.remove(&c.cid);
            }
        } else if let Some(n) = sq.stale.get_mut(&c.cid) {
            *n -= 1;
            if *n == 0 {
                sq.stale.remove(&c.cid);
            }
        } else {
            panic!(
                "completion for CID {:#x} not outstanding on SQ {}: {c:?}",
                c.cid, c.sqid
            );
        }
        if c.sqid != 0 {
            return;
        }
        let Some(effect) = self.effects.remove(&c.cid) else {
            return;
        };
        if !c.status.is_success() {
            return;
        }
        match effect {
            Effect::CreateCq(qid, entries) => {
                self.cqs[qid as usize] = Some(MCq {
                    base: io_cq_base(qid),
                    entries,
                    head: 0,
                    phase: true,
                });
            }
            Effect::CreateSq(qid, entries, cq) => {
                let mut stale = HashMap::new();
                if let Some(old) = self.sqs[qid as usize].take() {
                    stale = old.stale;
                    for (cid, (n, _)) in old.outstanding {
                        *stale.entry(cid).or_insert(0) += n;
                    }
                }
                self.sqs[qid as usize] = Some(MSq {
                    cq,
                    base: io_sq_base(qid),
                    entries,
                    stale,
                    ..MSq::default()
                });
            }
            // Commands it never fetched are dropped with it; those it aborted may still be
            // on their CQ (before or after this completion).
            Effect::DeleteSq(qid) => {
                if let Some(sq) = self.sqs[qid as usize].as_mut() {
                    sq.deleted = true;
                }
            }
            Effect::DeleteCq(qid) => self.cqs[qid as usize] = None,
        }
        self.refresh_writable();
    }

    fn prp(&mut self, p: &Prp) -> (u64, u64) {
        match p {
            Prp::Raw { prp1, prp2 } => {
                self.desync();
                (*prp1, *prp2)
            }
            Prp::Data {
                offset,
                list,
                list_offset,
                entries,
            } => {
                let prp1 = DATA + *offset as u64 % DATA_LEN;
                if !list {
                    return (prp1, (prp1 & !(PS - 1)) + PS);
                }
                let at = LISTS + *list_offset as u64 % (LIST_PAGES * PS);
                let mut b = Vec::with_capacity(entries.len() * 8);
                for &(page, off) in entries.iter().take(512) {
                    let e = DATA + (page as u64 % (DATA_LEN / PS)) * PS + off as u64 % PS;
                    b.extend_from_slice(&e.to_le_bytes());
                }
                let room = (LISTS + LIST_PAGES * PS - at) as usize;
                b.truncate(room);
                self.ep.w.host_write(at, &b);
                (prp1, at)
            }
        }
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Enable { asqs, acqs, cc } => self.enable(asqs, acqs, cc),
            Op::Reg { index, value } => {
                let o = (index as u32 * 4) % layout::REGS_SIZE as u32;
                self.ep.w.host_set_reg(o, value);
                if [
                    offset::CC,
                    offset::AQA,
                    offset::ASQ,
                    offset::ASQ + 4,
                    offset::ACQ,
                    offset::ACQ + 4,
                ]
                .contains(&o)
                {
                    self.desync();
                }
            }
            Op::Shutdown { abrupt } => {
                let cc = self.ep.w.host_reg(offset::CC) & !(3 << 14);
                self.ep
                    .w
                    .host_set_reg(offset::CC, cc | (1 + abrupt as u32) << 14);
            }
            Op::Reset => self.reset(),
            Op::CreateCq {
                qid,
                size,
                flags,
                iv,
            } => {
                let (qid, io) = queue_id(qid);
                let base = if io { io_cq_base(qid) } else { ADMIN_CQ };
                let e = io.then_some(Effect::CreateCq(qid, size as u16 + 1));
                // A host zeroes a new CQ's memory (stale phase tags would look like entries).
                if io && self.cqs[qid as usize].is_none() {
                    let o = base as usize;
                    self.ep.w.bytes_mut()[o..o + PAGE_SIZE].fill(0);
                }
                let cdw11 = ((iv as u32) << 16) | (flags & 3) as u32;
                self.queue_command(0x05, qid, size, cdw11, base, e);
            }
            Op::CreateSq {
                qid,
                size,
                cqid,
                pc,
            } => {
                let (qid, io) = queue_id(qid);
                let (size, (cqid, _)) = (size % 64, queue_id(cqid));
                let base = if io { io_sq_base(qid) } else { ADMIN_SQ };
                let e = io.then_some(Effect::CreateSq(qid, size as u16 + 1, cqid));
                let cdw11 = ((cqid as u32) << 16) | pc as u32;
                self.queue_command(0x01, qid, size, cdw11, base, e);
            }
            Op::DeleteSq { qid } => {
                let (qid, io) = queue_id(qid);
                self.queue_command(0x00, qid, 0, 0, 0, io.then_some(Effect::DeleteSq(qid)));
            }
            Op::DeleteCq { qid } => {
                let (qid, io) = queue_id(qid);
                self.queue_command(0x04, qid, 0, 0, 0, io.then_some(Effect::DeleteCq(qid)));
            }
            Op::Cmd { sq, cmd } => {
                let qid = sq as u16 % (MAX_IO_QUEUES + 1);
                let opcode = match (cmd.known, qid) {
                    (true, 0) => ADMIN_OPS[cmd.opcode as usize % ADMIN_OPS.len()],
                    (true, _) => IO_OPS[cmd.opcode as usize % IO_OPS.len()],
                    (false, _) => cmd.opcode,
                };
                // Queue management goes through the typed operations (the model follows them).
                if qid == 0 && matches!(opcode, 0x00 | 0x01 | 0x04 | 0x05) {
                    return;
                }
                // CIDs 0x100.. are the model's queue-management commands (queue_command).
                let cid = cmd.cid & 0xFF;
                let (prp1, prp2) = self.prp(&cmd.prp);
                let mut sqe = Sqe::new(opcode, cid);
                sqe.nsid = if cmd.nsid == 0xFF {
                    u32::MAX
                } else {
                    cmd.nsid as u32 % 4
                };
                sqe.cdw = cmd.cdw;
                sqe.set_prps(prp1, prp2);
                sqe.flags |= cmd.flags & 0xC3;
                self.submit(qid, sqe, None);
            }
            Op::RawSqe { sq, sqe } => {
                let qid = sq as u16 % (MAX_IO_QUEUES + 1);
                let sqe = Sqe::from_bytes(&sqe);
                if qid == 0 && matches!(sqe.opcode, 0x00 | 0x01 | 0x04 | 0x05) {
                    self.desync();
                }
                if sqe.cid >= 0x100 {
                    self.desync();
                }
                // Data pointers may point anywhere, so may the function's writes.
                self.desync();
                self.submit(qid, sqe, None);
            }
            Op::Doorbell { index, value } => {
                self.ep.w.host_doorbell(index as u16, value as u32);
                self.desync();
            }
            Op::Scribble { at, bytes } => {
                let at = LISTS + at as u64 % (WINDOW as u64 - LISTS);
                let n = bytes.len().min((DATA + DATA_LEN - at) as usize);
                self.ep.w.host_write(at, &bytes[..n]);
            }
            Op::Step { n } => self.step(1 + n as usize % 16),
            Op::Reap => self.reap(),
        }
    }

    /// Every command but AERs completes; then a reset brings every buffer and queue home.
    fn finish(mut self) {
        if self.synced && self.f.state() == FunctionState::Ready {
            for _ in 0..64 {
                self.step(1);
                self.reap();
                if self.f.state() != FunctionState::Ready {
                    break;
                }
            }
            if self.synced && self.f.state() == FunctionState::Ready {
                for (qid, sq) in self.sqs.iter().enumerate() {
                    let Some(sq) = sq.as_ref().filter(|s| !s.deleted) else {
                        continue;
                    };
                    // A CQ the host deleted under the SQ's feet is refused, so the SQ's
                    // CQ is live; AERs legitimately stay outstanding.
                    let stuck: Vec<_> = sq
                        .outstanding
                        .iter()
                        .filter(|(_, (_, op))| !(qid == 0 && *op == 0x0C))
                        .collect();
                    assert!(
                        stuck.is_empty(),
                        "SQ {qid}: commands never completed: {stuck:?}"
                    );
                }
            }
        }
        self.reset();
        self.step(2);
        assert_eq!(
            self.f.state(),
            FunctionState::Disabled,
            "not disabled after CC.EN = 0"
        );
        assert_eq!(
            self.f.buffers_available(),
            self.f.buffers_total(),
            "buffers not back after a reset"
        );
        assert_eq!(
            self.t.open_queue_count(),
            0,
            "core queues left after a reset"
        );
        assert_eq!(
            self.t.controller_count(),
            0,
            "core controller left after a reset"
        );
        let pool = self.f.into_pool();
        *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool);
    }
}

/// The fuzz body.
pub fn run(input: Input) {
    let mut h = Harness::new(1 + (input.burst % 8) as u16);
    for op in input.ops {
        h.op(op);
    }
    h.finish();
}
