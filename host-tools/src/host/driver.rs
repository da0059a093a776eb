//! A user-space NVMe host driver over a window: what an OS driver does over PCIe (NVMe base
//! 2.0 §3.5.1 initialization, §3.6 shutdown, §5.3-5.6 queue management, §4.1.1 PRPs,
//! §4.2.4 phase tags), on memory shared with the emulated function.

use super::window::Window;
use anyhow::{Context, Result, anyhow, bail};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyController, IdentifyNamespace, NsIdentifiers, cns, nsid_list,
};
use keel_nvme::io::{DsmCommand, DsmRange, RwCommand};
use keel_nvme::regs::{Cap, Cc, Csts, offset};
use keel_nvme::{AdminOpcode, Cqe, IoOpcode, Sqe, Status};
use keel_nvme_pcie::layout::{self, PAGE_SIZE};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PS: u64 = PAGE_SIZE as u64;

fn round_up(n: u64) -> u64 {
    n.div_ceil(PS) * PS
}

/// A failed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandError {
    /// Opcode.
    pub opcode: u8,
    /// Queue.
    pub qid: u16,
    /// Status.
    pub status: Status,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "opcode {:#04x} on queue {} failed: {}",
            self.opcode,
            self.qid,
            crate::nvme::error::describe_status(self.status)
        )
    }
}

impl std::error::Error for CommandError {}

/// Data of a command.
#[derive(Debug)]
pub enum Data<'a> {
    /// None.
    None,
    /// Host to controller.
    Out(&'a [u8]),
    /// Controller to host, this many bytes (fetch them with [`Queue::data`]).
    In(usize),
}

/// A completion.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The entry.
    pub cqe: Cqe,
    /// Opcode of the command.
    pub opcode: u8,
}

/// One SQ/CQ pair with its own data buffers (one per command slot, PRP list page included).
#[derive(Debug)]
pub struct Queue {
    win: Arc<Window>,
    qid: u16,
    entries: u16,
    sq: u64,
    cq: u64,
    tail: u16,
    head: u16,
    phase: bool,
    buf_size: usize,
    bufs: u64,
    lists: u64,
    free: Vec<u16>,
    opcodes: Vec<u8>,
    vector: u16,
    timeout: Duration,
}

impl Queue {
    /// Bytes of host memory a queue of `entries` entries with `buf_size`-byte buffers uses.
    fn footprint(entries: u16, buf_size: usize) -> u64 {
        let slots = entries as u64 - 1;
        round_up(entries as u64 * 64)
            + round_up(entries as u64 * 16)
            + slots * round_up(buf_size as u64)
            + slots * PS
    }

    fn carve(
        win: Arc<Window>,
        base: u64,
        qid: u16,
        entries: u16,
        buf_size: usize,
        timeout: Duration,
    ) -> Self {
        let sq = base;
        let cq = sq + round_up(entries as u64 * 64);
        let bufs = cq + round_up(entries as u64 * 16);
        let slots = entries - 1;
        let lists = bufs + slots as u64 * round_up(buf_size as u64);
        win.zero((cq - layout::HOST_BASE) as usize, entries as usize * 16);
        Self {
            win,
            qid,
            entries,
            sq,
            cq,
            tail: 0,
            head: 0,
            phase: true,
            buf_size,
            bufs,
            lists,
            free: (0..slots).rev().collect(),
            opcodes: vec![0; slots as usize],
            vector: qid.min(layout::MAX_VECTORS - 1),
            timeout,
        }
    }

    fn off(addr: u64) -> usize {
        (addr - layout::HOST_BASE) as usize
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that can be in flight at once.
    pub fn depth(&self) -> u16 {
        self.entries - 1
    }

    /// Commands in flight.
    pub fn inflight(&self) -> usize {
        self.depth() as usize - self.free.len()
    }

    /// Largest data transfer of one command.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Interrupts signalled on this queue's vector so far (the interrupt area counter).
    pub fn interrupts(&self) -> u32 {
        self.win.load32(layout::interrupt_offset(self.vector))
    }

    fn slot_buf(&self, cid: u16) -> u64 {
        self.bufs + cid as u64 * round_up(self.buf_size as u64)
    }

    /// PRP1/PRP2 for `len` bytes of slot `cid`'s buffer (a PRP list beyond two pages).
    fn prps(&self, cid: u16, len: usize) -> (u64, u64) {
        let b = self.slot_buf(cid);
        if len <= PAGE_SIZE {
            return (b, 0);
        }
        if len <= 2 * PAGE_SIZE {
            return (b, b + PS);
        }
        let list = self.lists + cid as u64 * PS;
        let n = len.div_ceil(PAGE_SIZE) - 1;
        let mut entries = Vec::with_capacity(n * 8);
        for i in 0..n {
            entries.extend_from_slice(&(b + (i as u64 + 1) * PS).to_le_bytes());
        }
        self.win.write(Self::off(list), &entries);
        (b, list)
    }

    /// Submits `sqe` (CID and data pointer filled in here). Fails when the queue is full or
    /// the data is larger than a slot buffer.
    pub fn submit(&mut self, mut sqe: Sqe, data: Data<'_>) -> Result<u16> {
        let len = match data {
            Data::None => 0,
            Data::Out(d) => d.len(),
            Data::In(n) => n,
        };
        if len > self.buf_size {
            bail!(
                "{len} bytes exceed the queue's {}-byte buffers",
                self.buf_size
            );
        }
        let cid = self
            .free
            .pop()
            .ok_or_else(|| anyhow!("queue {} full", self.qid))?;
        if let Data::Out(d) = data {
            self.win.write(Self::off(self.slot_buf(cid)), d);
        }
        sqe.cid = cid;
        if len > 0 {
            let (p1, p2) = self.prps(cid, len);
            sqe.set_prps(p1, p2);
        }
        self.opcodes[cid as usize] = sqe.opcode;
        self.win
            .write(Self::off(self.sq + self.tail as u64 * 64), &sqe.to_bytes());
        self.tail = (self.tail + 1) % self.entries;
        self.win.store32(
            layout::doorbell_offset(layout::sq_tail_doorbell(self.qid)),
            self.tail as u32,
        );
        Ok(cid)
    }

    /// The next completion, if one was posted (phase tag check, then CQ head doorbell).
    pub fn poll(&mut self) -> Option<Completion> {
        let at = Self::off(self.cq + self.head as u64 * 16);
        let dw3 = self.win.load32(at + 12);
        if ((dw3 >> 16) & 1 != 0) != self.phase {
            return None;
        }
        let mut b = [0u8; 16];
        self.win.read(at, &mut b);
        b[12..].copy_from_slice(&dw3.to_le_bytes());
        let cqe = Cqe::from_bytes(&b);
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.win.store32(
            layout::doorbell_offset(layout::cq_head_doorbell(self.qid)),
            self.head as u32,
        );
        let opcode = self.opcodes.get(cqe.cid as usize).copied().unwrap_or(0);
        if (cqe.cid as usize) < self.opcodes.len() && !self.free.contains(&cqe.cid) {
            self.free.push(cqe.cid);
        }
        Some(Completion { cqe, opcode })
    }

    /// Waits for the next completion (spins, then sleeps briefly), bounded by the timeout;
    /// fails at once if the controller reports a fatal status.
    pub fn wait(&mut self) -> Result<Completion> {
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.poll() {
                return Ok(c);
            }
            spins += 1;
            if spins.is_multiple_of(1024) {
                let csts = Csts(self.win.load32(offset::CSTS as usize));
                if csts.cfs() {
                    bail!("controller fatal status (CSTS {:#x})", csts.0);
                }
                if t0.elapsed() > self.timeout {
                    bail!(
                        "no completion on queue {} within {:?} ({} in flight)",
                        self.qid,
                        self.timeout,
                        self.inflight()
                    );
                }
                if spins > 64 * 1024 {
                    std::thread::sleep(Duration::from_micros(20));
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Copies the first `out.len()` bytes of a completed command's data.
    pub fn data(&self, cid: u16, out: &mut [u8]) {
        let n = out.len().min(self.buf_size);
        self.win.read(Self::off(self.slot_buf(cid)), &mut out[..n]);
    }

    /// Submits one command and waits for it; a non-success status is an error.
    pub fn run(&mut self, sqe: Sqe, data: Data<'_>) -> Result<Completion> {
        let want = sqe.opcode;
        let cid = self.submit(sqe, data)?;
        loop {
            let c = self.wait()?;
            if c.cqe.cid != cid {
                continue;
            }
            if !c.cqe.status.is_success() {
                return Err(CommandError {
                    opcode: want,
                    qid: self.qid,
                    status: c.cqe.status,
                }
                .into());
            }
            return Ok(c);
        }
    }
}

/// I/O operations of [`IoQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read.
    Read,
    /// Write (FUA when true).
    Write(bool),
    /// Write Zeroes (deallocate allowed when true).
    WriteZeroes(bool),
    /// Dataset Management deallocate.
    Deallocate,
    /// Flush.
    Flush,
}

/// An I/O queue pair.
#[derive(Debug)]
pub struct IoQueue {
    q: Queue,
}

impl IoQueue {
    /// The queue.
    pub fn queue(&mut self) -> &mut Queue {
        &mut self.q
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.q.qid
    }

    /// Depth.
    pub fn depth(&self) -> u16 {
        self.q.depth()
    }

    /// Commands in flight.
    pub fn inflight(&self) -> usize {
        self.q.inflight()
    }

    /// Submits one I/O (`data` for writes; `blocks` of `bs` bytes).
    pub fn submit(
        &mut self,
        op: IoOp,
        nsid: u32,
        lba: u64,
        blocks: u32,
        bs: u32,
        data: Option<&[u8]>,
    ) -> Result<u16> {
        let len = blocks as usize * bs as usize;
        let rw = |opcode: u8, fua: bool, deac: bool| {
            let mut c = RwCommand::simple(lba, blocks);
            c.fua = fua;
            c.deac = deac;
            c.to_sqe(opcode, 0, nsid)
        };
        match op {
            IoOp::Read => self
                .q
                .submit(rw(IoOpcode::Read as u8, false, false), Data::In(len)),
            IoOp::Write(fua) => {
                let d = data.ok_or_else(|| anyhow!("write without data"))?;
                self.q.submit(
                    rw(IoOpcode::Write as u8, fua, false),
                    Data::Out(&d[..len.min(d.len())]),
                )
            }
            IoOp::WriteZeroes(deac) => self
                .q
                .submit(rw(IoOpcode::WriteZeroes as u8, false, deac), Data::None),
            IoOp::Deallocate => {
                let r = DsmRange {
                    cattr: 0,
                    nlb: blocks,
                    slba: lba,
                }
                .to_bytes();
                let sqe = DsmCommand {
                    nr: 0,
                    idr: false,
                    idw: false,
                    ad: true,
                }
                .to_sqe(0, nsid);
                self.q.submit(sqe, Data::Out(&r))
            }
            IoOp::Flush => self.q.submit(
                Sqe::new(IoOpcode::Flush as u8, 0).with_nsid(nsid),
                Data::None,
            ),
        }
    }

    /// Next completion.
    pub fn wait(&mut self) -> Result<Completion> {
        self.q.wait()
    }

    /// Data of a completed read.
    pub fn data(&self, cid: u16, out: &mut [u8]) {
        self.q.data(cid, out)
    }

    /// Reads `count` blocks at `lba`, up to the queue depth in flight.
    pub fn read(&mut self, nsid: u32, lba: u64, count: u64, bs: u32) -> Result<Vec<u8>> {
        let mut out = vec![0u8; (count * bs as u64) as usize];
        self.pipeline(
            nsid,
            lba,
            count,
            bs,
            IoOp::Read,
            |off, q, cid, n| {
                q.data(cid, &mut out[off..off + n]);
            },
            None,
        )?;
        Ok(out)
    }

    /// Writes `data` (a multiple of `bs`) at `lba`.
    pub fn write(&mut self, nsid: u32, lba: u64, data: &[u8], bs: u32) -> Result<()> {
        let count = (data.len() / bs as usize) as u64;
        self.pipeline(
            nsid,
            lba,
            count,
            bs,
            IoOp::Write(false),
            |_, _, _, _| {},
            Some(data),
        )
    }

    /// Runs `op` over `count` blocks in chunks of the buffer size, pipelined.
    #[allow(clippy::too_many_arguments)]
    pub fn pipeline(
        &mut self,
        nsid: u32,
        lba: u64,
        count: u64,
        bs: u32,
        op: IoOp,
        mut done: impl FnMut(usize, &Queue, u16, usize),
        data: Option<&[u8]>,
    ) -> Result<()> {
        let per = match op {
            IoOp::Read | IoOp::Write(_) => (self.q.buf_size / bs as usize).max(1) as u64,
            _ => 65536,
        };
        let mut next = 0u64;
        let mut chunks: Vec<(u64, u32)> = vec![(0, 0); self.q.depth() as usize];
        let mut first_err = None;
        while next < count || self.q.inflight() > 0 {
            while next < count && !self.q.free.is_empty() && first_err.is_none() {
                let n = per.min(count - next) as u32;
                let off = (next * bs as u64) as usize;
                let d = data.map(|d| &d[off..off + n as usize * bs as usize]);
                let cid = self.submit(op, nsid, lba + next, n, bs, d)?;
                chunks[cid as usize] = (next, n);
                next += n as u64;
            }
            if self.q.inflight() == 0 {
                break;
            }
            let c = self.q.wait()?;
            let (at, n) = chunks.get(c.cqe.cid as usize).copied().unwrap_or((0, 0));
            if !c.cqe.status.is_success() {
                first_err.get_or_insert(CommandError {
                    opcode: c.opcode,
                    qid: self.q.qid,
                    status: c.cqe.status,
                });
                continue;
            }
            done(
                (at * bs as u64) as usize,
                &self.q,
                c.cqe.cid,
                n as usize * bs as usize,
            );
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// A controller reached through a window.
#[derive(Debug)]
pub struct HostController {
    win: Arc<Window>,
    admin: Queue,
    next: u64,
    timeout: Duration,
    /// CAP.
    pub cap: Cap,
    /// VS.
    pub vs: u32,
    /// Identify Controller.
    pub id: IdentifyController,
    live: Vec<u16>,
}

/// Admin queue entries.
const ADMIN_ENTRIES: u16 = 32;

impl HostController {
    /// Resets the controller (CC.EN = 0, wait CSTS.RDY = 0), sets up the admin queue, enables
    /// it (IOSQES 6, IOCQES 4, MPS 4 KiB), waits for CSTS.RDY and identifies it. Waits up to
    /// `timeout` for the function to initialise the window first.
    pub fn open(win: Arc<Window>, timeout: Duration) -> Result<Self> {
        let t0 = Instant::now();
        let header = loop {
            match win.header() {
                Ok(h) => break h,
                Err(e) if t0.elapsed() > timeout => {
                    return Err(anyhow!("{e}")).context("waiting for the window header");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _ = header;
        let cap = Cap(win.load64(offset::CAP as usize));
        if cap.mqes() == 0 {
            bail!("CAP not set by the function yet");
        }
        if cap.mpsmin() != 0 || cap.dstrd() != 0 {
            bail!(
                "unsupported CAP {:#x} (needs 4 KiB pages, doorbell stride 4)",
                cap.0
            );
        }
        let wait_for = |what: &str, f: &dyn Fn(Csts) -> bool| -> Result<Csts> {
            let t = Instant::now();
            loop {
                let c = Csts(win.load32(offset::CSTS as usize));
                if f(c) {
                    return Ok(c);
                }
                if t.elapsed() > timeout {
                    bail!("timed out waiting for {what} (CSTS {:#x})", c.0);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        win.store32(offset::CC as usize, 0);
        wait_for("CSTS.RDY = 0 after reset", &|c| !c.rdy())?;
        let base = layout::host_area(win.len() as u64).start;
        let admin = Queue::carve(win.clone(), base, 0, ADMIN_ENTRIES, 2 * PAGE_SIZE, timeout);
        let next = base + Queue::footprint(ADMIN_ENTRIES, 2 * PAGE_SIZE);
        let n = ADMIN_ENTRIES as u32 - 1;
        win.store32(offset::AQA as usize, (n << 16) | n);
        win.store64(offset::ASQ as usize, admin.sq);
        win.store64(offset::ACQ as usize, admin.cq);
        win.store32(offset::CC as usize, Cc::new(true, 0, 0, 0, 0, 6, 4).0);
        let c = wait_for("CSTS.RDY = 1", &|c| c.rdy() || c.cfs())?;
        if c.cfs() {
            bail!("controller fatal status on enable (CSTS {:#x})", c.0);
        }
        let mut ctrl = Self {
            vs: win.load32(offset::VS as usize),
            win,
            admin,
            next,
            timeout,
            cap,
            id: IdentifyController::default(),
            live: Vec::new(),
        };
        let page = ctrl.identify(cns::CONTROLLER, 0)?;
        ctrl.id = IdentifyController::decode(&page);
        Ok(ctrl)
    }

    /// The window.
    pub fn window(&self) -> &Arc<Window> {
        &self.win
    }

    /// Largest transfer per command (MDTS; 128 KiB when unlimited).
    pub fn max_transfer(&self) -> u32 {
        match self.id.mdts {
            0 => 128 << 10,
            m => (4096u32 << m.min(12)).min(1 << 20),
        }
    }

    /// Runs an admin command.
    pub fn admin(&mut self, sqe: Sqe, data: Data<'_>) -> Result<Completion> {
        self.admin.run(sqe, data)
    }

    /// Identify with `cns`.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Box<[u8; IDENTIFY_LEN]>> {
        let sqe = Sqe::new(AdminOpcode::Identify as u8, 0)
            .with_nsid(nsid)
            .with_cdw(10, cns as u32);
        let c = self.admin.run(sqe, Data::In(IDENTIFY_LEN))?;
        let mut page = Box::new([0u8; IDENTIFY_LEN]);
        self.admin.data(c.cqe.cid, &mut page[..]);
        Ok(page)
    }

    /// Active namespace ids.
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>> {
        let page = self.identify(cns::ACTIVE_NS_LIST, 0)?;
        Ok(nsid_list(&page[..]).collect())
    }

    /// Identify Namespace.
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<IdentifyNamespace> {
        Ok(IdentifyNamespace::decode(
            &*self.identify(cns::NAMESPACE, nsid)?,
        ))
    }

    /// Namespace Identification Descriptors.
    pub fn namespace_ids(&mut self, nsid: u32) -> Result<NsIdentifiers> {
        Ok(NsIdentifiers::decode(
            &*self.identify(cns::NS_DESCRIPTOR_LIST, nsid)?,
        ))
    }

    /// Block size and block count of an active namespace.
    pub fn geometry(&mut self, nsid: u32) -> Result<(u32, u64)> {
        let id = self.identify_namespace(nsid)?;
        let bs = id.block_size();
        if id.nsze == 0 || bs == 0 {
            bail!("namespace {nsid} is not active on this controller");
        }
        Ok((bs, id.nsze))
    }

    /// Set Features Number of Queues; returns the I/O queue pairs granted.
    pub fn set_io_queues(&mut self, n: u16) -> Result<u16> {
        let m = n.max(1) as u32 - 1;
        let c = self.admin(
            Sqe::new(AdminOpcode::SetFeatures as u8, 0)
                .with_cdw(10, 7)
                .with_cdw(11, (m << 16) | m),
            Data::None,
        )?;
        let nsq = (c.cqe.dw0 & 0xFFFF) as u16 + 1;
        let ncq = (c.cqe.dw0 >> 16) as u16 + 1;
        Ok(nsq.min(ncq))
    }

    /// Creates I/O queue pair `qid` (CQ with interrupts on vector `qid`, then SQ) of
    /// `depth` commands with `buf_size`-byte buffers.
    pub fn create_io_queue(&mut self, qid: u16, depth: u16, buf_size: usize) -> Result<IoQueue> {
        let mqes = self.cap.mqes() as u32 + 1;
        let entries = (depth as u32 + 1).min(mqes);
        if entries < 2 {
            bail!("queue depth must be at least 1");
        }
        let entries = entries as u16;
        let buf_size = buf_size.max(512);
        let need = Queue::footprint(entries, buf_size);
        if self.next + need > self.win.len() as u64 + layout::HOST_BASE {
            bail!(
                "window too small: queue {qid} needs {need} bytes of host memory, {} left",
                (self.win.len() as u64 + layout::HOST_BASE).saturating_sub(self.next)
            );
        }
        let q = Queue::carve(
            self.win.clone(),
            self.next,
            qid,
            entries,
            buf_size,
            self.timeout,
        );
        let qsize = entries as u32 - 1;
        self.admin(
            Sqe::new(AdminOpcode::CreateIoCq as u8, 0)
                .with_cdw(10, (qsize << 16) | qid as u32)
                .with_cdw(11, ((q.vector as u32) << 16) | 0b11)
                .with_prps(q.cq, 0),
            Data::None,
        )
        .with_context(|| format!("Create I/O CQ {qid}"))?;
        let mut sqe = Sqe::new(AdminOpcode::CreateIoSq as u8, 0)
            .with_cdw(10, (qsize << 16) | qid as u32)
            .with_cdw(11, ((qid as u32) << 16) | 1);
        sqe.set_prps(q.sq, 0);
        if let Err(e) = self.admin.run(sqe, Data::None) {
            let _ = self.admin(
                Sqe::new(AdminOpcode::DeleteIoCq as u8, 0).with_cdw(10, qid as u32),
                Data::None,
            );
            return Err(e).with_context(|| format!("Create I/O SQ {qid}"));
        }
        self.next += need;
        self.live.push(qid);
        Ok(IoQueue { q })
    }

    /// Deletes an I/O queue pair (SQ, then CQ). Its host memory is not reused.
    pub fn delete_io_queue(&mut self, q: IoQueue) -> Result<()> {
        let qid = q.qid();
        self.live.retain(|&x| x != qid);
        self.admin(
            Sqe::new(AdminOpcode::DeleteIoSq as u8, 0).with_cdw(10, qid as u32),
            Data::None,
        )
        .with_context(|| format!("Delete I/O SQ {qid}"))?;
        self.admin(
            Sqe::new(AdminOpcode::DeleteIoCq as u8, 0).with_cdw(10, qid as u32),
            Data::None,
        )
        .with_context(|| format!("Delete I/O CQ {qid}"))?;
        Ok(())
    }

    /// Normal shutdown: CC.SHN = 01b, wait for CSTS.SHST = complete.
    pub fn shutdown(self) -> Result<()> {
        let cc = Cc(self.win.load32(offset::CC as usize));
        let cc = Cc::new(cc.en(), cc.css(), cc.mps(), cc.ams(), Cc::SHN_NORMAL, 6, 4);
        self.win.store32(offset::CC as usize, cc.0);
        let t = Instant::now();
        loop {
            let c = Csts(self.win.load32(offset::CSTS as usize));
            if c.shst() == Csts::SHST_COMPLETE {
                return Ok(());
            }
            if c.cfs() {
                bail!("controller fatal status during shutdown (CSTS {:#x})", c.0);
            }
            if t.elapsed() > self.timeout {
                bail!("shutdown did not complete (CSTS {:#x})", c.0);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::window::{Emulator, EmulatorConfig};

    #[test]
    fn driver_against_in_process_function() {
        let win = Arc::new(Window::anonymous(32 << 20).unwrap());
        let emu = Emulator::start(win.clone(), EmulatorConfig::default()).unwrap();
        let mut c = HostController::open(win.clone(), Duration::from_secs(10)).unwrap();
        assert_eq!(c.id.sgls, 0);
        assert_eq!(c.active_namespaces().unwrap(), vec![1]);
        let (bs, n) = c.geometry(1).unwrap();
        assert_eq!((bs, n), (512, (64 << 20) / 512));
        assert_eq!(c.set_io_queues(8).unwrap(), 8);
        // Hostile queue ids get the spec's statuses and the controller keeps going.
        let e = c.create_io_queue(9, 16, 4096).unwrap_err();
        let st = e
            .root_cause()
            .downcast_ref::<CommandError>()
            .unwrap()
            .status;
        assert_eq!(st, Status::INVALID_QUEUE_IDENTIFIER);
        let mut qs: Vec<IoQueue> = (1..=8)
            .map(|qid| c.create_io_queue(qid, 16, 128 << 10).unwrap())
            .collect();
        let mut model = vec![0u8; 4 << 20];
        let mut rng = crate::nvme::pattern::Rng::new(7);
        for i in 0..64u64 {
            let q = &mut qs[(i % 8) as usize];
            let blocks = 1 + rng.below(256);
            let lba = rng.below((model.len() as u64 / 512) - blocks);
            let len = (blocks * 512) as usize;
            let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ i) as u8).collect();
            q.write(1, lba, &data, 512).unwrap();
            model[lba as usize * 512..][..len].copy_from_slice(&data);
            let back = q.read(1, lba, blocks, 512).unwrap();
            assert_eq!(back, data);
        }
        let all = qs[0].read(1, 0, 8192, 512).unwrap();
        assert_eq!(all, model);
        assert!(qs[0].queue().interrupts() > 0, "interrupt counter moves");
        for q in qs {
            c.delete_io_queue(q).unwrap();
        }
        c.shutdown().unwrap();
        emu.stop().unwrap();
    }
}
