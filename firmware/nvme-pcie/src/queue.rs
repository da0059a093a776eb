//! The queues of a function and what is done to one entry of them, written once for both
//! places a queue is served: [`crate::PcieFunction`] (the admin queue and the I/O queues
//! served where the function is polled) and [`IoPair`] (one I/O queue pair moved to another
//! core: its SQ, its CQ, and the commands in flight on them).
//!
//! # An I/O queue pair on another core
//!
//! The core that polls a function keeps its registers, its admin queue, Create/Delete I/O
//! SQ/CQ, resets and shutdown. When the function is told it may spread its I/O queues over
//! `n` cores ([`crate::PcieFunction::set_cores`]), an I/O SQ created on a CQ of its own (no
//! other SQ on that CQ) goes to core `qid % n` if that is not core 0: the function takes the
//! SQ and the CQ out of its tables (a placeholder keeps their IDs, sizes and the controller
//! core's queue, so the IDs stay in use) and hands them out as an [`IoPair`] through
//! [`crate::Handover::Export`]. The core that receives it serves it from its own replica of
//! the controller ([`keel_controller::Target::adopt_io_queue`]) through an endpoint handle
//! restricted to the pair's two doorbells, its interrupt vector and DMA ([`crate::QueuePort`]),
//! with its own data buffers: [`IoPair::poll`] each pass, [`IoPair::complete`] for every
//! completion of its replica queue. Nothing is shared with the function's core while it
//! serves: no lock, no message, no allocation per command.
//!
//! Taking it back is always the function's decision ([`crate::Handover::Recall`]), for a
//! Delete I/O SQ or a Create I/O SQ on the pair's CQ (the admin command waits in its SQ
//! until the pair is home), a shutdown (CC.SHN), a controller reset (CC.EN = 0), a removal
//! or [`crate::PcieFunction::set_cores`]`(1)`. The serving core then stops fetching
//! ([`IoPair::stop`]); to *drain* it waits until no command of the pair is in flight
//! ([`IoPair::outstanding`] = 0; completions still go out), to *discard* (reset, removal) it
//! drops them at once ([`IoPair::discard`]: nothing more is posted, their buffers come back
//! to that core's pool through its replica's events). Either way it closes its replica queue
//! and sends the pair back; [`crate::PcieFunction::give_back`] puts it where the placeholder
//! was, so SQ head, CQ tail, phase and completions not yet posted carry on unchanged. A
//! controller reset does not report CSTS.RDY = 0 and a removed function's slot is not reused
//! until every pair it handed out is back ([`crate::PcieFunction::abroad`]): afterwards nothing
//! on another core touches the window.
//!
//! A host's Abort of a command on a pair abroad is parked by the controller core (the
//! function marks the pair's queue `served_elsewhere` while it is away) and handed out as
//! [`crate::Handover::Abort`]; the serving core's replica decides and the caller gives the
//! verdict to the function's target. A pair coming home answers its Aborts still parked "not
//! aborted" (at the function's next poll).

use crate::endpoint::EndpointFunction;
use crate::function::FatalReason;
use crate::prp;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use keel_controller::{Instant, QueueId, Request, Response, Target};
use keel_nvme::sqe::Psdt;
use keel_nvme::{Cqe, IoOpcode, Sqe, Status};
use keel_storage::{BufPool, IoBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Kind {
    #[default]
    Plain,
    IdentifyController,
    NumberOfQueues,
    Aer,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slot {
    pub(crate) busy: bool,
    pub(crate) cid: u16,
    pub(crate) prp1: u64,
    pub(crate) prp2: u64,
    pub(crate) data_len: u32,
    pub(crate) to_host: bool,
    pub(crate) kind: Kind,
}

#[derive(Debug, Default)]
pub(crate) struct Sq {
    pub(crate) live: bool,
    /// Served on another core ([`IoPair`]): this entry is a placeholder.
    pub(crate) away: bool,
    /// Asked back from the other core.
    pub(crate) recalled: bool,
    pub(crate) base: u64,
    pub(crate) entries: u16,
    pub(crate) head: u16,
    /// During a shutdown: the tail the host had rung when it wrote CC.SHN. Commands up to it
    /// were submitted before the notification and are still fetched and completed.
    pub(crate) drain_to: Option<u32>,
    pub(crate) cqid: u16,
    pub(crate) core: Option<QueueId>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) free: Vec<u16>,
}

impl Sq {
    pub(crate) fn open(base: u64, entries: u16, cqid: u16, core: QueueId) -> Self {
        let n = entries.saturating_sub(1);
        let mut slots = Vec::with_capacity(n as usize);
        slots.resize(n as usize, Slot::default());
        Self {
            live: true,
            away: false,
            recalled: false,
            base,
            entries,
            head: 0,
            drain_to: None,
            cqid,
            core: Some(core),
            slots,
            free: (0..n).rev().collect(),
        }
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The placeholder left where an SQ was when it went to another core.
    fn placeholder(&self) -> Self {
        Self {
            live: true,
            away: true,
            base: self.base,
            entries: self.entries,
            cqid: self.cqid,
            core: self.core,
            ..Self::default()
        }
    }

    /// Takes a slot for command `s` fetched at the head (which moves on); `None` when every
    /// slot is busy (the caller checks first).
    pub(crate) fn take_slot(&mut self, s: Slot) -> Option<usize> {
        let slot = self.free.pop()? as usize;
        self.head = ((self.head as u32 + 1) % self.entries as u32) as u16;
        self.slots[slot] = s;
        Some(slot)
    }

    /// Frees slot `slot` (SQ `qid`) and makes its completion entry; `None` if it was not busy.
    pub(crate) fn finish(
        &mut self,
        qid: u16,
        slot: usize,
        status: Status,
        dw0: u32,
        dw1: u32,
    ) -> Option<Cqe> {
        let s = self.slots.get_mut(slot)?;
        if !s.busy {
            return None;
        }
        s.busy = false;
        let cid = s.cid;
        self.free.push(slot as u16);
        Some(Cqe {
            dw0,
            dw1,
            sqhd: self.head,
            sqid: qid,
            cid,
            phase: false,
            status,
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct Cq {
    pub(crate) live: bool,
    /// Served on another core with its one SQ ([`IoPair`]): this entry is a placeholder.
    pub(crate) away: bool,
    pub(crate) base: u64,
    pub(crate) entries: u16,
    pub(crate) head: u16,
    pub(crate) tail: u16,
    pub(crate) phase: bool,
    pub(crate) ien: bool,
    pub(crate) iv: u16,
    pub(crate) sqs: u16,
    pub(crate) backlog: VecDeque<Cqe>,
    pub(crate) irq: bool,
}

impl Cq {
    pub(crate) fn open(base: u64, entries: u16, ien: bool, iv: u16) -> Self {
        Self {
            live: true,
            away: false,
            base,
            entries,
            head: 0,
            tail: 0,
            phase: true,
            ien,
            iv,
            sqs: 0,
            backlog: VecDeque::new(),
            irq: false,
        }
    }

    /// The placeholder left where a CQ was when it went to another core.
    fn placeholder(&self) -> Self {
        Self {
            live: true,
            away: true,
            base: self.base,
            entries: self.entries,
            ien: self.ien,
            iv: self.iv,
            sqs: self.sqs,
            ..Self::default()
        }
    }

    pub(crate) fn full(&self) -> bool {
        (self.tail as u32 + 1) % self.entries as u32 == self.head as u32
    }

    /// Reads CQ `qid`'s head doorbell: whether it moved, or the fatal error of a value beyond
    /// the queue or past the entries posted.
    pub(crate) fn head_doorbell<E: EndpointFunction + ?Sized>(
        &mut self,
        ep: &mut E,
        qid: u16,
    ) -> Result<bool, FatalReason> {
        let v = ep.read_doorbell(crate::layout::cq_head_doorbell(qid));
        if v == self.head as u32 {
            return Ok(false);
        }
        let n = self.entries as u32;
        let used = (self.tail as u32 + n - self.head as u32) % n;
        let adv = (v.wrapping_add(n) - self.head as u32) % n;
        if v >= n || adv > used {
            return Err(FatalReason::CqHeadDoorbell { qid, value: v });
        }
        self.head = v as u16;
        Ok(true)
    }

    /// Writes one completion entry: dwords 0-2 first, then dword 3 with the phase tag; false
    /// if host memory refused it.
    pub(crate) fn post<E: EndpointFunction + ?Sized>(&mut self, ep: &mut E, mut cqe: Cqe) -> bool {
        cqe.phase = self.phase;
        let b = cqe.to_bytes();
        let addr = self.base + self.tail as u64 * 16;
        if ep.dma_write(addr, &b[..12]).is_err() || ep.dma_write(addr + 12, &b[12..]).is_err() {
            return false;
        }
        self.tail += 1;
        if self.tail == self.entries {
            self.tail = 0;
            self.phase = !self.phase;
        }
        self.irq = true;
        true
    }

    /// Posts waiting completions while the queue has room: how many, or the fatal error.
    pub(crate) fn post_backlog<E: EndpointFunction + ?Sized>(
        &mut self,
        ep: &mut E,
    ) -> Result<u64, FatalReason> {
        let mut n = 0;
        while self.live && !self.full() {
            let Some(cqe) = self.backlog.pop_front() else {
                break;
            };
            if !self.post(ep, cqe) {
                return Err(FatalReason::CqPost);
            }
            n += 1;
        }
        Ok(n)
    }

    /// Raises the queue's vector if entries were posted since the last time (one interrupt
    /// per CQ per pass) and the host asked for interrupts; whether it did.
    pub(crate) fn interrupt<E: EndpointFunction + ?Sized>(&mut self, ep: &mut E) -> bool {
        if !core::mem::take(&mut self.irq) || !self.live || !self.ien {
            return false;
        }
        ep.raise_interrupt(self.iv);
        true
    }
}

/// How an I/O command's data is sized: LBA data size of its namespace.
pub(crate) enum Lookup {
    /// Not known yet and no buffer to ask with: try again later.
    Wait,
    /// Not an active namespace: the core answers.
    Inactive,
    /// Log2 of the block size.
    Lbads(u8),
}

/// What to do with a fetched I/O command.
pub(crate) enum IoPlan {
    /// To the core with `data_len` bytes of data, toward the host when `to_host`.
    Run { data_len: u32, to_host: bool },
    /// Answered by the transport.
    Local(Status),
    /// Leave it in the SQ for now.
    Wait,
}

/// Sizes an I/O command's data transfer: Read, Write and Compare move their blocks, Dataset
/// Management its ranges, the rest nothing; larger than `max_transfer` (MDTS) is Invalid
/// Field, SGLs too.
pub(crate) fn io_plan(sqe: &Sqe, max_transfer: usize, lbads: impl FnOnce(u32) -> Lookup) -> IoPlan {
    if sqe.psdt() != Psdt::Prp {
        return IoPlan::Local(Status::INVALID_FIELD);
    }
    let run = |data_len: u32, to_host: bool| IoPlan::Run { data_len, to_host };
    match IoOpcode::from_u8(sqe.opcode) {
        Some(op @ (IoOpcode::Read | IoOpcode::Write | IoOpcode::Compare)) => {
            let lbads = match lbads(sqe.nsid) {
                Lookup::Wait => return IoPlan::Wait,
                Lookup::Inactive => return run(0, false),
                Lookup::Lbads(l) => l,
            };
            let blocks = (sqe.cdw(12) & 0xFFFF) as u64 + 1;
            let bytes = blocks << lbads;
            if bytes > max_transfer as u64 {
                return IoPlan::Local(Status::INVALID_FIELD);
            }
            run(bytes as u32, op == IoOpcode::Read)
        }
        Some(IoOpcode::DatasetManagement) => run(((sqe.cdw(10) & 0xFF) + 1) * 16, false),
        _ => run(0, false),
    }
}

/// The buffer of a command moving `s.data_len` bytes (`None` for none): from the host
/// gathered through its PRPs, toward the host its PRPs checked. A PRP error is the status
/// to complete the command with (the buffer went back to `pool`).
pub(crate) fn load<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    pool: &mut BufPool,
    s: &Slot,
) -> Result<Option<IoBuf>, Status> {
    if s.data_len == 0 {
        return Ok(None);
    }
    let Some(mut b) = pool.get() else {
        return Err(Status::INTERNAL_ERROR);
    };
    b.set_len(s.data_len as usize);
    let r = if s.to_host {
        prp::check(ep, s.prp1, s.prp2, s.data_len as usize)
    } else {
        prp::gather(ep, s.prp1, s.prp2, b.as_mut_slice())
    };
    match r {
        Ok(()) => Ok(Some(b)),
        Err(st) => {
            recycle(pool, Some(b));
            Err(st)
        }
    }
}

/// Moves a response's data to the host through the command's PRPs (`patch` first edits a
/// buffer headed there) and gives the buffer back: the status to complete with, and whether
/// the transfer failed.
pub(crate) fn deliver<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    pool: &mut BufPool,
    s: &Slot,
    resp: &mut Response,
    patch: impl FnOnce(&mut [u8]),
) -> (Status, bool) {
    let mut status = resp.cqe.status;
    let mut failed = false;
    if let Some(mut b) = resp.buf.take() {
        let n = (resp.data_len as usize)
            .min(s.data_len as usize)
            .min(b.len());
        if status.is_success() && s.to_host && n > 0 {
            patch(b.as_mut_slice());
            let data = b.as_slice().get(..n).unwrap_or(&[]);
            if let Err(st) = prp::scatter(ep, s.prp1, s.prp2, data) {
                status = st;
                failed = true;
            }
        }
        recycle(pool, Some(b));
    }
    (status, failed)
}

/// Gives a buffer back to `pool` (a foreign one is dropped: its memory stays leaked).
pub(crate) fn recycle(pool: &mut BufPool, buf: Option<IoBuf>) {
    if let Some(b) = buf {
        let _ = pool.put(b);
    }
}

/// Counters of an [`IoPair`] while it is served away from its function (its serving core
/// publishes them; the function's own [`crate::FunctionStats`] count what it serves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairStats {
    /// Commands fetched.
    pub commands: u64,
    /// Completion entries posted.
    pub completions: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Commands that failed a PRP check or transfer.
    pub prp_errors: u64,
}

/// One I/O queue pair of a function (an SQ and the CQ only it uses) with its commands in
/// flight: what moves between the function's core and the core serving the pair (see the
/// module documentation). Moving it allocates nothing; serving it allocates nothing.
#[derive(Debug)]
pub struct IoPair {
    pub(crate) qid: u16,
    pub(crate) sq: Sq,
    pub(crate) cq: Cq,
    /// No more fetching: it is being taken back.
    stopped: bool,
}

impl IoPair {
    /// Takes SQ `qid` and CQ `sq.cqid` out of a function's tables, leaving placeholders.
    pub(crate) fn take(qid: u16, sq: &mut Sq, cq: &mut Cq) -> Self {
        let ph_sq = sq.placeholder();
        let ph_cq = cq.placeholder();
        let mut sq = core::mem::replace(sq, ph_sq);
        let cq = core::mem::replace(cq, ph_cq);
        // The controller core's queue stays with the function (idle while the pair is away).
        sq.core = None;
        Self {
            qid,
            sq,
            cq,
            stopped: false,
        }
    }

    /// Puts the pair back where its placeholders are (`sq`, `cq`): state and commands carry
    /// on; the placeholders' controller-core queue, SQ count of the CQ and shutdown mark stay.
    pub(crate) fn restore(self, sq: &mut Sq, cq: &mut Cq) {
        let Self {
            sq: mut s,
            cq: mut c,
            ..
        } = self;
        s.core = sq.core;
        s.drain_to = sq.drain_to;
        s.away = false;
        s.recalled = false;
        s.live = true;
        c.sqs = cq.sqs;
        c.away = false;
        c.live = true;
        *sq = s;
        *cq = c;
    }

    /// Its SQ (and queue pair) ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Its CQ's ID.
    pub fn cqid(&self) -> u16 {
        self.sq.cqid
    }

    /// SQ size, 0's based (what a replica's [`keel_controller::Adoption`] needs).
    pub fn sqsize(&self) -> u16 {
        self.sq.entries.saturating_sub(1)
    }

    /// The CQ's interrupt vector, if the host asked for interrupts.
    pub fn vector(&self) -> Option<u16> {
        self.cq.ien.then_some(self.cq.iv)
    }

    /// Commands fetched and not yet completed (their completion entries may still wait to be
    /// posted: they travel with the pair).
    pub fn outstanding(&self) -> usize {
        self.sq.outstanding()
    }

    /// Stops fetching (the pair is being taken back); completions still go out.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether it stopped fetching.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Drops every command in flight and every completion not yet posted (a reset or a
    /// removal took the pair back: nothing more is posted). Close the replica queue too: the
    /// buffers of commands at a backend come back through its events.
    pub fn discard(&mut self) {
        self.stopped = true;
        for s in self.sq.slots.iter_mut() {
            s.busy = false;
        }
        let n = self.sq.slots.len() as u16;
        self.sq.free.clear();
        self.sq.free.extend((0..n).rev());
        self.cq.backlog.clear();
        self.cq.irq = false;
    }

    /// One pass on the serving core: the CQ head doorbell, completions waiting for room,
    /// new commands from the SQ tail doorbell (up to `burst`, unless stopped) to `target`'s
    /// queue `q` (its replica's I/O queue for this pair), then the interrupt. Data buffers
    /// come from `pool` (its buffers bound the largest transfer). Returns whether anything
    /// happened, or the fatal error the function must report (the pair then stops).
    #[allow(clippy::too_many_arguments)]
    pub fn poll<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        q: QueueId,
        ep: &mut E,
        pool: &mut BufPool,
        burst: u16,
        stats: &mut PairStats,
    ) -> Result<bool, FatalReason> {
        let r = self.poll_inner(now, target, q, ep, pool, burst, stats);
        if r.is_err() {
            self.stopped = true;
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn poll_inner<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        q: QueueId,
        ep: &mut E,
        pool: &mut BufPool,
        burst: u16,
        stats: &mut PairStats,
    ) -> Result<bool, FatalReason> {
        let cqid = self.sq.cqid;
        let mut busy = self.cq.head_doorbell(ep, cqid)?;
        let posted = self.cq.post_backlog(ep)?;
        stats.completions += posted;
        busy |= posted > 0;
        if !self.stopped {
            busy |= self.fetch(now, target, q, ep, pool, burst, stats)?;
        }
        if self.cq.interrupt(ep) {
            stats.interrupts += 1;
        }
        Ok(busy)
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        q: QueueId,
        ep: &mut E,
        pool: &mut BufPool,
        burst: u16,
        stats: &mut PairStats,
    ) -> Result<bool, FatalReason> {
        let qid = self.qid;
        let tail = ep.read_doorbell(crate::layout::sq_tail_doorbell(qid));
        if tail >= self.sq.entries as u32 {
            return Err(FatalReason::SqTailDoorbell { qid, value: tail });
        }
        let max_transfer = pool.buf_size();
        let mut n = 0;
        while n < burst {
            if self.sq.head as u32 == tail || self.sq.free.is_empty() || !self.cq.backlog.is_empty()
            {
                break;
            }
            let mut raw = [0u8; 64];
            if ep
                .dma_read(self.sq.base + self.sq.head as u64 * 64, &mut raw)
                .is_err()
            {
                return Err(FatalReason::SqFetch);
            }
            let sqe = Sqe::from_bytes(&raw);
            let plan = io_plan(&sqe, max_transfer, |nsid| match target.lba_shift(q, nsid) {
                Some(l) => Lookup::Lbads(l),
                None => Lookup::Inactive,
            });
            let (data_len, to_host, local) = match plan {
                IoPlan::Wait => break,
                IoPlan::Run { data_len, .. } if data_len > 0 && pool.available() == 0 => break,
                IoPlan::Run { data_len, to_host } => (data_len, to_host, None),
                IoPlan::Local(st) => (0, false, Some(st)),
            };
            let Some(slot) = self.sq.take_slot(Slot {
                busy: true,
                cid: sqe.cid,
                prp1: sqe.prp1(),
                prp2: sqe.prp2(),
                data_len,
                to_host,
                kind: Kind::Plain,
            }) else {
                break;
            };
            stats.commands += 1;
            n += 1;
            if let Some(st) = local {
                self.finish(slot, st, 0, 0);
                continue;
            }
            let s = self.sq.slots[slot];
            let buf = match load(ep, pool, &s) {
                Ok(b) => b,
                Err(st) => {
                    if st != Status::INTERNAL_ERROR {
                        stats.prp_errors += 1;
                    }
                    self.finish(slot, st, 0, 0);
                    continue;
                }
            };
            let req = Request {
                sqe,
                buf,
                data_len,
                cookie: ((qid as u32) << 16) | slot as u32,
            };
            if let Some(resp) = target.submit(now, q, req) {
                self.complete_slot(ep, pool, slot, resp, stats);
            }
        }
        Ok(n > 0)
    }

    /// A completion of its replica queue (an [`keel_controller::Event::Completion`] there):
    /// data to the host, buffer back to `pool`, the completion entry posted (or queued while
    /// the CQ is full) and the interrupt raised. A response for no command in flight only
    /// gives its buffer back. Returns the fatal error of a CQ the host's memory refused.
    pub fn complete<E: EndpointFunction + ?Sized>(
        &mut self,
        ep: &mut E,
        pool: &mut BufPool,
        resp: Response,
        stats: &mut PairStats,
    ) -> Result<(), FatalReason> {
        let qid = (resp.cookie >> 16) as u16;
        let slot = (resp.cookie & 0xFFFF) as usize;
        if qid != self.qid || !self.sq.slots.get(slot).is_some_and(|s| s.busy) {
            recycle(pool, resp.buf);
            return Ok(());
        }
        self.complete_slot(ep, pool, slot, resp, stats);
        let posted = self.cq.post_backlog(ep);
        if let Ok(n) = posted {
            stats.completions += n;
        }
        if self.cq.interrupt(ep) {
            stats.interrupts += 1;
        }
        posted.map(|_| ())
    }

    fn complete_slot<E: EndpointFunction + ?Sized>(
        &mut self,
        ep: &mut E,
        pool: &mut BufPool,
        slot: usize,
        mut resp: Response,
        stats: &mut PairStats,
    ) {
        let s = self.sq.slots[slot];
        let (status, failed) = deliver(ep, pool, &s, &mut resp, |_| {});
        if failed {
            stats.prp_errors += 1;
        }
        self.finish(slot, status, resp.cqe.dw0, resp.cqe.dw1);
    }

    fn finish(&mut self, slot: usize, status: Status, dw0: u32, dw1: u32) {
        if let Some(cqe) = self.sq.finish(self.qid, slot, status, dw0, dw1) {
            self.cq.backlog.push_back(cqe);
        }
    }
}
