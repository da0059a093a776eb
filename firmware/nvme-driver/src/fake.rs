//! A fake NVMe controller for host tests: registers over a shared state, queues and PRPs in
//! "device memory" that is host memory (the fake `Dma` hands out host addresses as device
//! addresses), namespaces backed by `Vec`s, and fault injection. Commands are processed when
//! their SQ tail doorbell is written, or on [`FakeCtrl::tick`] in deferred mode.

use crate::dma::{DmaRegion, host};
use crate::{Dma, Registers};
use keel_nvme::cqe::{command_specific, generic};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyController, IdentifyNamespace, LbaFormat, Oncs, Vwc, cns,
    encode_active_ns_list,
};
use keel_nvme::regs::{Cap, Cc, Csts, Vs};
use keel_nvme::{AdminOpcode, Cqe, IoOpcode, Sqe, Status};
use keel_storage::IoBuf;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

#[derive(Debug, Clone)]
pub struct FakeNs {
    pub nsid: u32,
    pub lbads: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    size: u16,
    cqid: u16,
    head: u16,
    tail: u16,
}

#[derive(Debug, Clone, Copy)]
struct Cq {
    base: u64,
    size: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

/// One processed command: queue, the command, the data segments its PRPs described.
#[derive(Debug, Clone)]
pub struct Logged {
    pub sqid: u16,
    pub sqe: Sqe,
    pub segments: Vec<(u64, usize)>,
    pub prp_list: Vec<u64>,
}

#[derive(Debug)]
pub struct FakeCtrl {
    pub cap: Cap,
    pub cc: u32,
    pub csts: Csts,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    /// Every non-doorbell register write: (offset, value).
    pub reg_writes: Vec<(usize, u32)>,
    /// Every doorbell write: (offset, value).
    pub doorbells: Vec<(usize, u32)>,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    /// Create I/O CQ CDW11 values seen (IEN must be 0).
    pub cq_flags: Vec<u32>,
    pub mdts: u8,
    pub oncs: Oncs,
    pub vwc: Vwc,
    pub acl: u8,
    pub max_queues: u16,
    pub namespaces: Vec<FakeNs>,
    pub no_ns_list: bool,
    // Faults.
    pub refuse_enable: bool,
    /// Never report shutdown complete.
    pub ignore_shutdown: bool,
    pub stuck_rdy: bool,
    /// I/O commands are accepted and never completed (kept in `held`).
    pub hold_io: bool,
    pub held: Vec<(u16, Sqe)>,
    /// Abort completes a held command with Abort Requested.
    pub abort_works: bool,
    /// The next command with this opcode (I/O) fails with this status.
    pub fail_next: VecDeque<(u8, Status)>,
    /// I/O commands wait for `tick` instead of the doorbell.
    pub deferred: bool,
    pub log: Vec<Logged>,
    pub admin_log: Vec<Sqe>,
    regions: Vec<(u64, usize)>,
    pub flushes: usize,
    pub enables: usize,
}

pub type Shared = Rc<RefCell<FakeCtrl>>;

/// Data segments (address, length) and PRP list entries of a command.
pub type Segments = (Vec<(u64, usize)>, Vec<u64>);

impl FakeCtrl {
    pub fn new(namespaces: Vec<FakeNs>) -> Shared {
        Rc::new(RefCell::new(Self {
            cap: Cap::new(1023, true, 0, 4, 0, false, 1, 0, 4),
            cc: 0,
            csts: Csts(0),
            aqa: 0,
            asq: 0,
            acq: 0,
            reg_writes: Vec::new(),
            doorbells: Vec::new(),
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            cq_flags: Vec::new(),
            mdts: 5,
            oncs: Oncs::COMPARE | Oncs::DSM | Oncs::WRITE_ZEROES,
            vwc: Vwc::PRESENT,
            acl: 3,
            max_queues: 64,
            namespaces,
            no_ns_list: false,
            refuse_enable: false,
            ignore_shutdown: false,
            stuck_rdy: false,
            hold_io: false,
            held: Vec::new(),
            abort_works: true,
            fail_next: VecDeque::new(),
            deferred: false,
            log: Vec::new(),
            admin_log: Vec::new(),
            regions: Vec::new(),
            flushes: 0,
            enables: 0,
        }))
    }

    pub fn page(&self) -> usize {
        4096 << Cc(self.cc).mps()
    }

    fn stride(&self) -> usize {
        4 << self.cap.dstrd()
    }

    pub fn register(&mut self, addr: u64, len: usize) {
        self.regions.push((addr, len));
    }

    fn valid(&self, addr: u64, len: usize) -> bool {
        self.regions
            .iter()
            .any(|&(a, l)| addr >= a && addr + len as u64 <= a + l as u64)
    }

    fn dev_read(&self, addr: u64, out: &mut [u8]) -> bool {
        if !self.valid(addr, out.len()) {
            return false;
        }
        // SAFETY: inside a registered region (fake DMA allocation or test buffer), which
        // the driver does not touch while the command is outstanding.
        unsafe { host::read(addr, out) };
        true
    }

    fn dev_write(&self, addr: u64, data: &[u8]) -> bool {
        if !self.valid(addr, data.len()) {
            return false;
        }
        // SAFETY: as in `dev_read`.
        unsafe { host::write(addr, data) };
        true
    }

    fn u64_at(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.dev_read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// The data segments described by PRP1/PRP2 for `len` bytes (§4.1.1), checking the
    /// rules: PRP1 dword aligned, later entries page aligned; plus the list entries.
    pub fn prp_segments(&self, prp1: u64, prp2: u64, len: usize) -> Result<Segments, Status> {
        let page = self.page() as u64;
        if !prp1.is_multiple_of(4) {
            return Err(Status::generic(generic::INVALID_PRP_OFFSET));
        }
        let off = prp1 % page;
        let first = (len as u64).min(page - off) as usize;
        let mut segs = vec![(prp1, first)];
        let mut list = Vec::new();
        let mut rest = len - first;
        if rest == 0 {
            return Ok((segs, list));
        }
        if rest <= page as usize {
            if !prp2.is_multiple_of(page) {
                return Err(Status::generic(generic::INVALID_PRP_OFFSET));
            }
            segs.push((prp2, rest));
            return Ok((segs, list));
        }
        let mut entry = prp2;
        if !entry.is_multiple_of(8) {
            return Err(Status::generic(generic::INVALID_PRP_OFFSET));
        }
        while rest > 0 {
            let last_in_page = (entry + 8).is_multiple_of(page);
            let e = self
                .u64_at(entry)
                .ok_or(Status::generic(generic::DATA_TRANSFER_ERROR))?;
            if last_in_page && rest > page as usize {
                // Chained to the next list page.
                entry = e;
                continue;
            }
            if e % page != 0 {
                return Err(Status::generic(generic::INVALID_PRP_OFFSET));
            }
            list.push(e);
            let n = rest.min(page as usize);
            segs.push((e, n));
            rest -= n;
            entry += 8;
        }
        Ok((segs, list))
    }

    fn read_reg(&self, off: usize) -> u32 {
        match off {
            0x00 => self.cap.0 as u32,
            0x04 => (self.cap.0 >> 32) as u32,
            0x08 => Vs::V1_4.0,
            0x14 => self.cc,
            0x1C => self.csts.0,
            0x24 => self.aqa,
            0x28 => self.asq as u32,
            0x2C => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: usize, v: u32) {
        if off >= 0x1000 {
            self.doorbells.push((off, v));
            let idx = (off - 0x1000) / self.stride();
            let qid = (idx / 2) as u16;
            if idx.is_multiple_of(2) {
                if let Some(sq) = self.sqs.get_mut(&qid) {
                    sq.tail = v as u16;
                }
                if !self.deferred || qid == 0 {
                    self.process(qid);
                }
            } else if let Some(cq) = self.cqs.get_mut(&qid) {
                cq.head = v as u16;
            }
            return;
        }
        self.reg_writes.push((off, v));
        match off {
            0x14 => {
                let old = Cc(self.cc);
                let new = Cc(v);
                self.cc = v;
                if new.en() && !old.en() {
                    self.enables += 1;
                    if self.refuse_enable || self.csts.cfs() {
                        return;
                    }
                    let asqs = (self.aqa & 0xFFF) as u16 + 1;
                    let acqs = ((self.aqa >> 16) & 0xFFF) as u16 + 1;
                    self.sqs.insert(
                        0,
                        Sq {
                            base: self.asq,
                            size: asqs,
                            cqid: 0,
                            head: 0,
                            tail: 0,
                        },
                    );
                    self.cqs.insert(
                        0,
                        Cq {
                            base: self.acq,
                            size: acqs,
                            tail: 0,
                            head: 0,
                            phase: true,
                        },
                    );
                    self.csts.set_rdy(true);
                } else if new.en() && new.shn() != Cc::SHN_NONE && !self.ignore_shutdown {
                    // Shutdown (§3.6.1): completes at once; RDY stays set.
                    self.csts.set_shst(Csts::SHST_COMPLETE);
                } else if !new.en() && old.en() {
                    self.sqs.clear();
                    self.cqs.clear();
                    self.held.clear();
                    if !self.stuck_rdy {
                        self.csts = Csts(0);
                    }
                }
            }
            0x24 => self.aqa = v,
            0x28 => self.asq = (self.asq & !0xFFFF_FFFF) | v as u64,
            0x2C => self.asq = (self.asq & 0xFFFF_FFFF) | ((v as u64) << 32),
            0x30 => self.acq = (self.acq & !0xFFFF_FFFF) | v as u64,
            0x34 => self.acq = (self.acq & 0xFFFF_FFFF) | ((v as u64) << 32),
            _ => {}
        }
    }

    /// Processes every submission queue (deferred mode).
    pub fn tick(&mut self) {
        let ids: Vec<u16> = self.sqs.keys().copied().collect();
        for q in ids {
            self.process(q);
        }
    }

    /// Executes and completes every held I/O command (the drive was slow, not stuck).
    pub fn release_held(&mut self) {
        for (qid, sqe) in core::mem::take(&mut self.held) {
            let st = self.io_exec(qid, sqe);
            let cqid = self.sqs.get(&qid).map_or(qid, |s| s.cqid);
            self.post(cqid, qid, sqe.cid, st, 0);
        }
    }

    /// Entries waiting in SQ `qid` (written and rung, not yet fetched).
    pub fn pending(&self, qid: u16) -> usize {
        self.sqs.get(&qid).map_or(0, |s| {
            (s.tail as usize + s.size as usize - s.head as usize) % s.size as usize
        })
    }

    fn process(&mut self, qid: u16) {
        if self.csts.cfs() || !self.csts.rdy() {
            return;
        }
        loop {
            let Some(sq) = self.sqs.get(&qid).copied() else {
                return;
            };
            if sq.head == sq.tail {
                return;
            }
            let mut b = [0u8; 64];
            let ok = self.dev_read(sq.base + sq.head as u64 * 64, &mut b);
            assert!(ok, "SQ {qid} entry outside DMA memory");
            let head = (sq.head + 1) % sq.size;
            self.sqs.get_mut(&qid).unwrap().head = head;
            let sqe = Sqe::from_bytes(&b);
            let result = if qid == 0 {
                self.admin_log.push(sqe);
                Some(self.admin(sqe))
            } else {
                self.io(qid, sqe)
            };
            if let Some((status, dw0)) = result {
                self.post(sq.cqid, qid, sqe.cid, status, dw0);
            }
        }
    }

    fn post(&mut self, cqid: u16, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let sqhd = self.sqs.get(&sqid).map_or(0, |s| s.head);
        let Some(cq) = self.cqs.get(&cqid).copied() else {
            return;
        };
        let next = (cq.tail + 1) % cq.size;
        assert_ne!(
            next, cq.head,
            "CQ {cqid} overflow: the driver outran its queue"
        );
        let cqe = Cqe {
            dw0,
            dw1: 0,
            sqhd,
            sqid,
            cid,
            phase: cq.phase,
            status,
        };
        self.dev_write(cq.base + cq.tail as u64 * 16, &cqe.to_bytes());
        let c = self.cqs.get_mut(&cqid).unwrap();
        c.tail = next;
        if next == 0 {
            c.phase = !c.phase;
        }
    }

    fn identify_out(&self, sqe: &Sqe, data: &[u8; IDENTIFY_LEN]) -> Status {
        match self.prp_segments(sqe.prp1(), sqe.prp2(), IDENTIFY_LEN) {
            Ok((segs, _)) => {
                let mut off = 0;
                for (a, l) in segs {
                    if !self.dev_write(a, &data[off..off + l]) {
                        return Status::generic(generic::DATA_TRANSFER_ERROR);
                    }
                    off += l;
                }
                Status::SUCCESS
            }
            Err(s) => s,
        }
    }

    fn admin(&mut self, sqe: Sqe) -> (Status, u32) {
        let mut buf = [0u8; IDENTIFY_LEN];
        match AdminOpcode::from_u8(sqe.opcode) {
            Some(AdminOpcode::Identify) => match sqe.cdw[0] as u8 {
                cns::CONTROLLER => {
                    let id = IdentifyController {
                        vid: 0x1b36,
                        sn: keel_nvme::identify::ascii_field("FAKE-SN-1"),
                        mn: keel_nvme::identify::ascii_field("Keel fake NVMe"),
                        fr: keel_nvme::identify::ascii_field("1.0"),
                        mdts: self.mdts,
                        acl: self.acl,
                        sqes: 0x66,
                        cqes: 0x44,
                        nn: self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0),
                        oncs: self.oncs,
                        vwc: self.vwc,
                        ..Default::default()
                    };
                    id.encode(&mut buf);
                    (self.identify_out(&sqe, &buf), 0)
                }
                cns::ACTIVE_NS_LIST if self.no_ns_list => (Status::INVALID_FIELD, 0),
                cns::ACTIVE_NS_LIST => {
                    let ids: Vec<u32> = self.namespaces.iter().map(|n| n.nsid).collect();
                    encode_active_ns_list(sqe.nsid, &ids, &mut buf);
                    (self.identify_out(&sqe, &buf), 0)
                }
                cns::NAMESPACE => {
                    if let Some(ns) = self.namespaces.iter().find(|n| n.nsid == sqe.nsid) {
                        let blocks = (ns.data.len() >> ns.lbads) as u64;
                        let mut lbaf = [LbaFormat::default(); 16];
                        lbaf[0].lbads = ns.lbads;
                        IdentifyNamespace {
                            nsze: blocks,
                            ncap: blocks,
                            nuse: blocks,
                            dlfeat: 1,
                            lbaf,
                            ..Default::default()
                        }
                        .encode(&mut buf);
                    }
                    (self.identify_out(&sqe, &buf), 0)
                }
                _ => (Status::INVALID_FIELD, 0),
            },
            Some(AdminOpcode::SetFeatures) if sqe.cdw[0] as u8 == 7 => {
                let want = (sqe.cdw[1] & 0xFFFF) as u16 + 1;
                let n = want.min(self.max_queues) - 1;
                (Status::SUCCESS, n as u32 | ((n as u32) << 16))
            }
            Some(AdminOpcode::CreateIoCq) => {
                let qid = sqe.cdw[0] as u16;
                let size = (sqe.cdw[0] >> 16) as u16 + 1;
                self.cq_flags.push(sqe.cdw[1]);
                if qid == 0 || qid > self.max_queues || self.cqs.contains_key(&qid) {
                    return (
                        Status::command_specific(command_specific::INVALID_QUEUE_IDENTIFIER),
                        0,
                    );
                }
                self.cqs.insert(
                    qid,
                    Cq {
                        base: sqe.prp1(),
                        size,
                        tail: 0,
                        head: 0,
                        phase: true,
                    },
                );
                (Status::SUCCESS, 0)
            }
            Some(AdminOpcode::CreateIoSq) => {
                let qid = sqe.cdw[0] as u16;
                let size = (sqe.cdw[0] >> 16) as u16 + 1;
                let cqid = (sqe.cdw[1] >> 16) as u16;
                if !self.cqs.contains_key(&cqid) {
                    return (
                        Status::command_specific(command_specific::COMPLETION_QUEUE_INVALID),
                        0,
                    );
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        base: sqe.prp1(),
                        size,
                        cqid,
                        head: 0,
                        tail: 0,
                    },
                );
                (Status::SUCCESS, 0)
            }
            Some(AdminOpcode::Abort) => {
                let sqid = sqe.cdw[0] as u16;
                let cid = (sqe.cdw[0] >> 16) as u16;
                let pos = self
                    .held
                    .iter()
                    .position(|&(q, s)| q == sqid && s.cid == cid);
                match pos {
                    Some(i) if self.abort_works => {
                        self.held.remove(i);
                        let cqid = self.sqs.get(&sqid).map_or(sqid, |s| s.cqid);
                        self.post(
                            cqid,
                            sqid,
                            cid,
                            Status::generic(generic::ABORT_REQUESTED),
                            0,
                        );
                        (Status::SUCCESS, 0)
                    }
                    _ => (Status::SUCCESS, 1),
                }
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    fn io(&mut self, qid: u16, sqe: Sqe) -> Option<(Status, u32)> {
        if let Some(i) = self.fail_next.iter().position(|&(op, _)| op == sqe.opcode) {
            let (_, s) = self.fail_next.remove(i).unwrap();
            self.log.push(Logged {
                sqid: qid,
                sqe,
                segments: Vec::new(),
                prp_list: Vec::new(),
            });
            return Some((s, 0));
        }
        if self.hold_io {
            self.held.push((qid, sqe));
            return None;
        }
        let r = self.io_exec(qid, sqe);
        Some((r, 0))
    }

    fn io_exec(&mut self, qid: u16, sqe: Sqe) -> Status {
        let mut logged = Logged {
            sqid: qid,
            sqe,
            segments: Vec::new(),
            prp_list: Vec::new(),
        };
        let Some(ni) = self.namespaces.iter().position(|n| n.nsid == sqe.nsid) else {
            self.log.push(logged);
            return Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT);
        };
        let bs = 1usize << self.namespaces[ni].lbads;
        let slba = sqe.cdw[0] as u64 | ((sqe.cdw[1] as u64) << 32);
        let blocks = (sqe.cdw[2] & 0xFFFF) as usize + 1;
        let in_range = |s: &Self| (slba as usize + blocks) * bs <= s.namespaces[ni].data.len();
        let status = match IoOpcode::from_u8(sqe.opcode) {
            Some(IoOpcode::Flush) => {
                self.flushes += 1;
                Status::SUCCESS
            }
            Some(op @ (IoOpcode::Read | IoOpcode::Write | IoOpcode::Compare)) => {
                let len = blocks * bs;
                let mdts = if self.mdts == 0 {
                    usize::MAX
                } else {
                    self.page() << self.mdts
                };
                if op == IoOpcode::Compare && !self.oncs.contains(Oncs::COMPARE) {
                    Status::INVALID_OPCODE
                } else if !in_range(self) {
                    Status::LBA_OUT_OF_RANGE
                } else if len > mdts {
                    Status::INVALID_FIELD
                } else {
                    match self.prp_segments(sqe.prp1(), sqe.prp2(), len) {
                        Err(s) => s,
                        Ok((segs, list)) => {
                            logged.segments = segs.clone();
                            logged.prp_list = list;
                            let start = slba as usize * bs;
                            let mut off = start;
                            let mut st = Status::SUCCESS;
                            for (a, l) in segs {
                                let ok = match op {
                                    IoOpcode::Read => {
                                        let d = self.namespaces[ni].data[off..off + l].to_vec();
                                        self.dev_write(a, &d)
                                    }
                                    IoOpcode::Write => {
                                        let mut d = vec![0u8; l];
                                        let ok = self.dev_read(a, &mut d);
                                        self.namespaces[ni].data[off..off + l].copy_from_slice(&d);
                                        ok
                                    }
                                    _ => {
                                        let mut d = vec![0u8; l];
                                        let ok = self.dev_read(a, &mut d);
                                        if d != self.namespaces[ni].data[off..off + l] {
                                            st = Status::COMPARE_FAILURE;
                                        }
                                        ok
                                    }
                                };
                                if !ok {
                                    st = Status::generic(generic::DATA_TRANSFER_ERROR);
                                    break;
                                }
                                off += l;
                            }
                            st
                        }
                    }
                }
            }
            Some(IoOpcode::Verify) if self.oncs.contains(Oncs::VERIFY) => {
                if in_range(self) {
                    Status::SUCCESS
                } else {
                    Status::LBA_OUT_OF_RANGE
                }
            }
            Some(IoOpcode::WriteZeroes) if self.oncs.contains(Oncs::WRITE_ZEROES) => {
                if in_range(self) {
                    let s = slba as usize * bs;
                    self.namespaces[ni].data[s..s + blocks * bs].fill(0);
                    Status::SUCCESS
                } else {
                    Status::LBA_OUT_OF_RANGE
                }
            }
            Some(IoOpcode::DatasetManagement) if self.oncs.contains(Oncs::DSM) => {
                let nr = (sqe.cdw[0] & 0xFF) as usize + 1;
                let mut b = vec![0u8; nr * 16];
                if !self.dev_read(sqe.prp1(), &mut b) {
                    Status::generic(generic::DATA_TRANSFER_ERROR)
                } else {
                    let mut st = Status::SUCCESS;
                    for i in 0..nr {
                        let r = keel_nvme::io::DsmRange::read(&b, i).unwrap();
                        let s = r.slba as usize * bs;
                        let e = s + r.nlb as usize * bs;
                        if e > self.namespaces[ni].data.len() {
                            st = Status::LBA_OUT_OF_RANGE;
                            break;
                        }
                        self.namespaces[ni].data[s..e].fill(0);
                    }
                    st
                }
            }
            _ => Status::INVALID_OPCODE,
        };
        self.log.push(logged);
        status
    }
}

/// The register seam over a fake controller.
#[derive(Debug, Clone)]
pub struct FakeRegs(pub Shared);

impl Registers for FakeRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        self.0.borrow().read_reg(offset)
    }
    fn write32(&mut self, offset: usize, value: u32) {
        self.0.borrow_mut().write_reg(offset, value);
    }
}

/// Fake DMA: leaked host memory, device address = host address, registered with the fake
/// controller so it refuses to touch anything else.
#[derive(Debug, Clone)]
pub struct FakeDma {
    pub ctrl: Shared,
    pub syncs_for_device: Rc<RefCell<usize>>,
    pub syncs_for_cpu: Rc<RefCell<usize>>,
}

impl FakeDma {
    pub fn new(ctrl: &Shared) -> Self {
        Self {
            ctrl: ctrl.clone(),
            syncs_for_device: Rc::default(),
            syncs_for_cpu: Rc::default(),
        }
    }
}

// SAFETY: regions come from `host::alloc` (zeroed, aligned, leaked, unique) and the fake
// device reaches byte i at address + i.
unsafe impl Dma for FakeDma {
    fn alloc(&mut self, size: usize, align: usize) -> Option<DmaRegion> {
        let r = host::alloc(size, align)?;
        self.ctrl.borrow_mut().register(r.dev_addr(), r.len());
        Some(r)
    }
    fn sync_for_device(&mut self, _cpu: usize, _len: usize) {
        *self.syncs_for_device.borrow_mut() += 1;
    }
    fn sync_for_cpu(&mut self, _cpu: usize, _len: usize) {
        *self.syncs_for_cpu.borrow_mut() += 1;
    }
}

/// A test data buffer of `len` bytes starting `misalign` bytes after a page boundary,
/// registered with the fake controller.
pub fn iobuf(ctrl: &Shared, len: usize, misalign: usize) -> IoBuf {
    let v: &'static mut [u8] = vec![0u8; len + misalign + 8192].leak();
    let start = v.as_ptr().align_offset(4096) + misalign;
    let mem = &mut v[start..start + len];
    let addr = mem.as_ptr().addr() as u64;
    let mut b = IoBuf::new(mem, addr);
    // The fake device reads and writes the buffer through its address as a DMA engine would:
    // expose the buffer's own pointer for that (a pointer derived from `mem` before the
    // buffer took it over is not valid for the device's writes, as Miri reports).
    b.as_mut_ptr().expose_provenance();
    ctrl.borrow_mut().register(addr, len);
    b
}
