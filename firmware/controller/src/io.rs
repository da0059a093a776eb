//! NVM command set I/O commands (NVM Command Set 1.0 §3, Copy from 2.0 §3.3.1): Read, Write,
//! Compare, Flush, Write Zeroes, Dataset Management, Verify, Copy.
//!
//! Each command is checked here, then becomes either one backend request or a chain of them
//! (see [`crate::chain`]) held by a command slot and submitted by [`Target::try_slot`].

use crate::chain::Chain;
use crate::config::*;
use crate::errlog::{ErrAt, at};
use crate::target::*;
use keel_nvme::io::{CopyCommand, CopyRange, DsmCommand, DsmRange, RwCommand};
use keel_nvme::{IoOpcode, NSID_ALL, Sqe, Status};
use keel_qos::Admit;
use keel_storage::{BlockOp, BlockRequest, Geometry, IoBuf, OpKind};

/// How a decoded command reaches the backend.
enum Work {
    /// One request (its buffer is the host's, for data commands).
    One(BlockOp),
    /// A chain of requests.
    Chain(Chain),
}

/// Where the data of a command run by [`Target::submit_now`] is.
#[derive(Debug)]
pub enum NowData<'a> {
    /// A Read's data goes here (its transfer length exactly).
    Read(&'a mut [u8]),
    /// A Read's data goes through the first slice into the second (together its transfer
    /// length exactly), e.g. a transmit ring's free space where it wraps. Only namespaces
    /// whose backend reads into such a destination
    /// ([`keel_storage::BlockBackend::reads_now_split`]) run it now.
    ReadSplit(&'a mut [u8], &'a mut [u8]),
    /// A Write's data is this.
    Write(&'a [u8]),
}

/// What a command slot holds about its command.
struct Started {
    cid: u16,
    cookie: u32,
    /// (subsystem, namespace) indices.
    ns: (usize, usize),
    nsid: u32,
    lba: u64,
    kind: OpKind,
    bytes: u64,
    read_len: u32,
    flow: Option<keel_qos::FlowId>,
    cost: keel_qos::Cost,
}

/// A decoded I/O command.
struct Decoded {
    work: Work,
    lba: u64,
    blocks: u32,
    kind: OpKind,
    bytes: u64,
    read_len: u32,
}

/// The Copy limits of a namespace: (MSSRL, MCL, MSRC), or `None` when Copy is not offered
/// (no scratch buffers, or buffers smaller than a block).
pub(crate) fn copy_limits(
    limits: &Limits,
    scratch_size: Option<usize>,
    g: Geometry,
) -> Option<(u16, u32, u8)> {
    let size = scratch_size?;
    if size < g.block_size as usize {
        return None;
    }
    let mcl = (limits.copy_max_bytes / g.block_size as u64).clamp(1, u32::MAX as u64) as u32;
    let mssrl = mcl.min(u16::MAX as u32) as u16;
    let msrc = (limits.copy_max_ranges.clamp(1, 256) - 1) as u8;
    Some((mssrl, mcl, msrc))
}

impl Target {
    /// Size of a scratch buffer, if the target has scratch buffers.
    pub(crate) fn scratch_size(&self) -> Option<usize> {
        self.scratch.as_ref().map(|p| p.buf_size())
    }

    /// Whether Write Zeroes works on a namespace: natively, or emulated with zero-filled
    /// writes from scratch buffers.
    pub(crate) fn write_zeroes_ok(&self, caps: keel_storage::Capabilities, g: Geometry) -> bool {
        caps.write_zeroes
            || self
                .scratch_size()
                .is_some_and(|s| s >= g.block_size as usize)
    }

    pub(crate) fn io(
        &mut self,
        now: Instant,
        qi: usize,
        ci: usize,
        mut req: Request,
    ) -> Option<Response> {
        if sqe_is_fabrics(&req.sqe) {
            return Some(self.fabrics_io(qi, ci, req));
        }
        let (ready, si, cache_enabled) = match self.ctrls.get(ci) {
            Some(Some(c)) => (
                c.csts.rdy() && c.csts.shst() == 0 && !c.shutdown_pending,
                c.subsys,
                c.vwc,
            ),
            _ => return Some(self.respond(qi, req, Status::INTERNAL_ERROR, 0)),
        };
        if !ready {
            return Some(self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0));
        }
        if req.sqe.fuse() != 0 {
            let e = ErrAt::field(at::FLAGS, 0);
            return Some(self.respond_at(qi, req, Status::INVALID_FIELD, e));
        }
        let Some(op) = IoOpcode::from_u8(req.sqe.opcode) else {
            return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
        };
        if !matches!(
            op,
            IoOpcode::Read
                | IoOpcode::Write
                | IoOpcode::Compare
                | IoOpcode::Flush
                | IoOpcode::WriteZeroes
                | IoOpcode::DatasetManagement
                | IoOpcode::Verify
                | IoOpcode::Copy
        ) {
            return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
        }
        let nsid = req.sqe.nsid;
        let found = self.subsystems.get(si).and_then(|s| s.find_ns(nsid));
        let Some(ni) = found else {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        };
        if nsid == NSID_ALL {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        }
        let Some(Some(ns)) = self.subsystems.get(si).and_then(|s| s.namespaces.get(ni)) else {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        };
        let (g, caps) = (ns.geometry, ns.caps);
        // The host disabled the volatile write cache (Set Features 06h, WCE = 0): a write
        // completes only once it is on media, so writes to a backend with a cache carry FUA.
        let write_through = caps.volatile_write_cache && caps.fua && !cache_enabled;

        let cid = req.sqe.cid;
        let slot_i = match self.slot_for(qi, cid) {
            Ok(i) => i,
            Err(st) => return Some(self.respond(qi, req, st, 0)),
        };

        let d = match self.decode(op, &mut req, g, caps, write_through) {
            Ok(d) => d,
            Err((st, e)) => return Some(self.respond_at(qi, req, st, e)),
        };
        let Some(d) = d else {
            // Nothing for the backend to do.
            return Some(self.respond(qi, req, Status::SUCCESS, 0));
        };
        let (t, owner) = (self.queues[qi].tag(qi, slot_i), self.queues[qi].owner);
        let Request { buf, cookie, .. } = req;
        let (request, chain) = match d.work {
            Work::One(bop) => {
                let (data_buf, stray) = if bop.has_data() {
                    (buf, None)
                } else {
                    (None, buf)
                };
                if let Some(b) = stray {
                    // A data-less op (Flush, Write Zeroes, Verify) cannot carry the host's
                    // buffer back.
                    self.pending
                        .push_back(Event::BufferReleased { owner, buf: b });
                }
                let r = BlockRequest {
                    tag: t,
                    op: bop,
                    lba: d.lba,
                    blocks: d.blocks,
                    buf: data_buf,
                    buf_offset: 0,
                };
                (Some(r), None)
            }
            Work::Chain(c) => {
                if let Some(b) = buf {
                    // The chain holds the host's buffer it needs (ranges); any other goes back.
                    self.pending
                        .push_back(Event::BufferReleased { owner, buf: b });
                }
                (None, Some(c))
            }
        };
        let flow = match self.ctrls.get(ci) {
            Some(Some(c)) => c.flows.get(ni).copied().flatten(),
            _ => None,
        };
        let writes = matches!(
            op,
            IoOpcode::Write | IoOpcode::WriteZeroes | IoOpcode::DatasetManagement | IoOpcode::Copy
        );
        let cost = cost_of(d.kind, d.bytes, writes);
        let started = Started {
            cid,
            cookie,
            ns: (si, ni),
            nsid,
            lba: d.lba,
            kind: d.kind,
            bytes: d.bytes,
            read_len: d.read_len,
            flow,
            cost,
        };
        self.start_slot(now, (qi, slot_i), ci, &started, SlotState::Queued);
        {
            let slot = &mut self.queues[qi].slots[slot_i];
            slot.deferred = request;
            slot.chain = chain;
        }
        // QoS: the command starts now, or waits for its limits, its turn or room at the
        // backend (then `poll` starts it).
        let h = handle(self.hstride, qi, slot_i);
        let admit = match flow {
            Some(fl) => self.sched.enqueue(now.as_nanos(), fl, h, cost),
            None => Ok(Admit::Now),
        };
        match admit {
            Ok(Admit::Queued) => None,
            _ => self.try_slot(qi, slot_i, now).and_then(event_response),
        }
    }

    /// A free command slot of queue `qi` for command `cid`: Command ID Conflict if one of the
    /// queue's commands has that CID, Command Interrupted if the host exceeded the queue size
    /// it connected with.
    fn slot_for(&self, qi: usize, cid: u16) -> Result<usize, Status> {
        let mut free = None;
        for (i, s) in self.queues[qi].slots.iter().enumerate() {
            if s.state == SlotState::Free {
                if free.is_none() {
                    free = Some(i);
                }
            } else if s.cid == cid {
                return Err(Status::COMMAND_ID_CONFLICT);
            }
        }
        free.ok_or(Status::COMMAND_INTERRUPTED)
    }

    /// Puts a command in slot `at` = (queue, slot) of controller `ci`, in state `state`, and
    /// counts it as started (busy time).
    fn start_slot(
        &mut self,
        now: Instant,
        at: (usize, usize),
        ci: usize,
        c: &Started,
        state: SlotState,
    ) {
        let slot = &mut self.queues[at.0].slots[at.1];
        slot.state = state;
        slot.cid = c.cid;
        slot.cookie = c.cookie;
        slot.ns = (c.ns.0 as u16, c.ns.1 as u16);
        slot.nsid = c.nsid;
        slot.lba = c.lba;
        slot.kind = c.kind;
        slot.bytes = c.bytes;
        slot.read_len = c.read_len;
        slot.start = now;
        slot.flow = c.flow;
        slot.cost = c.cost;
        slot.deferred = None;
        slot.chain = None;
        slot.abort_waiter = None;
        slot.holder_abort = None;
        if let Some(Some(c)) = self.ctrls.get_mut(ci) {
            c.io_started(now);
        }
    }

    /// Runs a Read or a Write at once, its data in the caller's memory instead of a buffer:
    /// a read's data goes into `data` (a transport's send window), a write's comes from it
    /// (what the transport received). Only when nothing stands in the way: an I/O queue of a
    /// ready controller, a valid command with exactly `data.len()` bytes, a namespace whose
    /// backend moves data now ([`keel_storage::BlockBackend::moves_data_now`]), a free slot and
    /// QoS letting it start at once ([`keel_qos::Scheduler::admit_now`]). Then it is accounted
    /// exactly as through [`Target::submit`] (SQ head, keep-alive traffic, statistics, error
    /// log) and its response returned: no buffer, `data_len` the bytes read on success. A
    /// failed read leaves anything in `data`: send none of it. Otherwise `None`, and nothing
    /// has changed: submit the command the usual way (which also gives any error its status).
    pub fn submit_now(
        &mut self,
        now: Instant,
        q: QueueId,
        sqe: &Sqe,
        cookie: u32,
        data: NowData<'_>,
    ) -> Option<Response> {
        let qi = self.queue_index(q)?;
        let queue = &self.queues[qi];
        if queue.state != QState::Connected || queue.qid == 0 || sqe.fuse() != 0 {
            return None;
        }
        let ci = self.ctrl_of(qi)?;
        let c = self.ctrls.get(ci)?.as_ref()?;
        if !(c.csts.rdy() && c.csts.shst() == 0 && !c.shutdown_pending) {
            return None;
        }
        let si = c.subsys;
        let op = IoOpcode::from_u8(sqe.opcode)?;
        let (len, kind, writes) = match (op, &data) {
            (IoOpcode::Read, NowData::Read(d)) => (d.len(), OpKind::Read, false),
            (IoOpcode::Read, NowData::ReadSplit(a, b)) => (a.len() + b.len(), OpKind::Read, false),
            (IoOpcode::Write, NowData::Write(d)) => (d.len(), OpKind::Write, true),
            _ => return None,
        };
        if sqe.nsid == NSID_ALL {
            return None;
        }
        let ni = self.subsystems.get(si)?.find_ns(sqe.nsid)?;
        let ns = self.subsystems[si].namespaces.get(ni)?.as_ref()?;
        let can = ns.backend.moves_data_now();
        if !(if writes { can.write } else { can.read }) {
            return None;
        }
        if matches!(data, NowData::ReadSplit(..)) && !ns.backend.reads_now_split() {
            return None;
        }
        let rw = RwCommand::from_sqe(sqe);
        let blocks = rw.blocks();
        let bytes = blocks as u64 * ns.geometry.block_size as u64;
        let mdts_ok = self.limits.mdts == 0 || bytes <= (4096u64 << self.limits.mdts);
        if !ns.geometry.contains(rw.slba, blocks as u64) || !mdts_ok || len as u64 != bytes {
            return None;
        }
        let slot_i = self.slot_for(qi, sqe.cid).ok()?;
        let flow = c.flows.get(ni).copied().flatten();
        let cost = cost_of(kind, bytes, writes);
        if let Some(fl) = flow
            && !self.sched.admit_now(now.as_nanos(), fl, cost).ok()?
        {
            return None;
        }
        // It runs: from here on exactly as `submit` would account it.
        self.now = now;
        self.consume_sqe(now, qi, ci);
        let started = Started {
            cid: sqe.cid,
            cookie,
            ns: (si, ni),
            nsid: sqe.nsid,
            lba: rw.slba,
            kind,
            bytes,
            read_len: if writes { 0 } else { bytes as u32 },
            flow,
            cost,
        };
        self.start_slot(now, (qi, slot_i), ci, &started, SlotState::InFlight);
        let ns = self.subsystems[si].namespaces[ni].as_mut()?;
        let result = match data {
            NowData::Read(d) => ns.backend.read_now(rw.slba, blocks, d),
            NowData::ReadSplit(a, b) => ns.backend.read_now_split(rw.slba, blocks, a, b),
            NowData::Write(d) => ns.backend.write_now(rw.slba, blocks, d),
        };
        if let Some(f) = flow {
            self.sched.finished(f);
        }
        let status = result.map_or_else(block_status, |()| Status::SUCCESS);
        self.finish_slot(qi, slot_i, status, None, now)
            .and_then(event_response)
    }

    /// Checks a command against its namespace and turns it into backend work; `Ok(None)` when
    /// it succeeds without any (Flush without a cache, advisory deallocation with nothing to
    /// do). Errors come with the field they point at.
    fn decode(
        &mut self,
        op: IoOpcode,
        req: &mut Request,
        g: Geometry,
        caps: keel_storage::Capabilities,
        write_through: bool,
    ) -> Result<Option<Decoded>, (Status, ErrAt)> {
        let bs = g.block_size as u64;
        let out_of_range = |lba: u64| (Status::LBA_OUT_OF_RANGE, ErrAt::lba(at::CDW10, lba));
        let one = |op, lba, blocks, kind, bytes, read_len| {
            Ok(Some(Decoded {
                work: Work::One(op),
                lba,
                blocks,
                kind,
                bytes,
                read_len,
            }))
        };
        match op {
            IoOpcode::Read | IoOpcode::Write | IoOpcode::Compare => {
                let rw = RwCommand::from_sqe(&req.sqe);
                let blocks = rw.blocks();
                if !g.contains(rw.slba, blocks as u64) {
                    return Err(out_of_range(rw.slba));
                }
                let bytes = blocks as u64 * bs;
                if self.limits.mdts != 0 && bytes > (4096u64 << self.limits.mdts) {
                    return Err((Status::INVALID_FIELD, ErrAt::field(at::CDW12, 0)));
                }
                let buf_ok = matches!(&req.buf, Some(b) if b.capacity() as u64 >= bytes);
                if req.data_len as u64 != bytes || !buf_ok {
                    return Err((
                        Status::DATA_SGL_LENGTH_INVALID,
                        ErrAt::field(at::SGL_LENGTH, 0),
                    ));
                }
                if op == IoOpcode::Compare && !caps.compare {
                    return Err((Status::INVALID_OPCODE, ErrAt::field(at::OPCODE, 0)));
                }
                let (bop, kind, read_len) = match op {
                    IoOpcode::Read => (BlockOp::Read, OpKind::Read, bytes as u32),
                    IoOpcode::Write => {
                        let fua = rw.fua || write_through;
                        (BlockOp::Write { fua }, OpKind::Write, 0)
                    }
                    _ => (BlockOp::Compare, OpKind::Read, 0),
                };
                one(bop, rw.slba, blocks, kind, bytes, read_len)
            }
            IoOpcode::Flush => {
                if !caps.flush {
                    return Ok(None);
                }
                one(BlockOp::Flush, 0, 0, OpKind::Other, 0, 0)
            }
            IoOpcode::Verify => {
                if !caps.verify {
                    return Err((Status::INVALID_OPCODE, ErrAt::field(at::OPCODE, 0)));
                }
                let rw = RwCommand::from_sqe(&req.sqe);
                let blocks = rw.blocks();
                if !g.contains(rw.slba, blocks as u64) {
                    return Err(out_of_range(rw.slba));
                }
                let bytes = blocks as u64 * bs;
                one(BlockOp::Verify, rw.slba, blocks, OpKind::Verify, bytes, 0)
            }
            IoOpcode::WriteZeroes => {
                if !self.write_zeroes_ok(caps, g) {
                    return Err((Status::INVALID_OPCODE, ErrAt::field(at::OPCODE, 0)));
                }
                let rw = RwCommand::from_sqe(&req.sqe);
                let blocks = rw.blocks();
                if !g.contains(rw.slba, blocks as u64) {
                    return Err(out_of_range(rw.slba));
                }
                if caps.write_zeroes {
                    let op = BlockOp::WriteZeroes {
                        deallocate: rw.deac,
                        fua: rw.fua || write_through,
                    };
                    return one(op, rw.slba, blocks, OpKind::Other, 0, 0);
                }
                // Zero-filled writes; DEAC is a hint the controller may ignore.
                Ok(Some(Decoded {
                    work: Work::Chain(Chain::Zeroes {
                        scratch: None,
                        next: rw.slba,
                        end: rw.slba + blocks as u64,
                        fua: rw.fua || write_through,
                    }),
                    lba: rw.slba,
                    blocks,
                    kind: OpKind::Other,
                    bytes: 0,
                    read_len: 0,
                }))
            }
            IoOpcode::DatasetManagement => {
                let d = DsmCommand::from_sqe(&req.sqe);
                let Some(buf) = range_list(req, d.data_len()) else {
                    return Err((
                        Status::DATA_SGL_LENGTH_INVALID,
                        ErrAt::field(at::SGL_LENGTH, 0),
                    ));
                };
                let mut first = None;
                for i in 0..d.ranges() {
                    let Some(r) = DsmRange::read(buf, i) else {
                        continue;
                    };
                    if !g.contains(r.slba, r.nlb as u64) {
                        return Err((Status::LBA_OUT_OF_RANGE, ErrAt::block(r.slba)));
                    }
                    if first.is_none() && r.nlb > 0 {
                        first = Some(r.slba);
                    }
                }
                // Deallocation is advisory: without support or without work, succeed.
                let Some(lba) = first.filter(|_| d.ad && caps.deallocate) else {
                    return Ok(None);
                };
                let Some(b) = req.buf.take() else {
                    return Ok(None);
                };
                Ok(Some(Decoded {
                    work: Work::Chain(Chain::Dsm {
                        buf: b,
                        next: 0,
                        count: d.ranges() as u16,
                    }),
                    lba,
                    blocks: 0,
                    kind: OpKind::Other,
                    bytes: 0,
                    read_len: 0,
                }))
            }
            _ => self.decode_copy(req, g, write_through),
        }
    }

    /// Copy (NVM Command Set 2.0 §3.3.1), source range descriptor format 0h only, within the
    /// namespace: status codes as the specification orders them (size limits, format, data
    /// length, LBA ranges).
    fn decode_copy(
        &mut self,
        req: &mut Request,
        g: Geometry,
        write_through: bool,
    ) -> Result<Option<Decoded>, (Status, ErrAt)> {
        let Some((mssrl, mcl, msrc)) = copy_limits(&self.limits, self.scratch_size(), g) else {
            return Err((Status::INVALID_OPCODE, ErrAt::field(at::OPCODE, 0)));
        };
        let c = CopyCommand::from_sqe(&req.sqe);
        if c.nr > msrc {
            return Err((
                Status::COMMAND_SIZE_LIMIT_EXCEEDED,
                ErrAt::field(at::CDW12, 0),
            ));
        }
        if c.desfmt != 0 {
            // Descriptor Format: CDW12 bits 11:8, byte 49 bits 3:0.
            return Err((Status::INVALID_FIELD, ErrAt::field(at::CDW12 + 1, 0)));
        }
        let count = c.ranges();
        let Some(list) = range_list(req, c.data_len()) else {
            return Err((
                Status::DATA_SGL_LENGTH_INVALID,
                ErrAt::field(at::SGL_LENGTH, 0),
            ));
        };
        let mut total: u64 = 0;
        for i in 0..count {
            let Some(r) = CopyRange::read(list, i) else {
                return Err((Status::DATA_SGL_LENGTH_INVALID, ErrAt::NONE));
            };
            if r.blocks() > mssrl as u32 {
                let e = ErrAt::block(r.slba);
                return Err((Status::COMMAND_SIZE_LIMIT_EXCEEDED, e));
            }
            total += r.blocks() as u64;
            if total > mcl as u64 {
                let e = ErrAt::block(r.slba);
                return Err((Status::COMMAND_SIZE_LIMIT_EXCEEDED, e));
            }
            if !g.contains(r.slba, r.blocks() as u64) {
                return Err((Status::LBA_OUT_OF_RANGE, ErrAt::block(r.slba)));
            }
        }
        if !g.contains(c.sdlba, total) {
            return Err((Status::LBA_OUT_OF_RANGE, ErrAt::lba(at::CDW10, c.sdlba)));
        }
        let ranges: IoBuf = match req.buf.take() {
            Some(b) => b,
            None => return Err((Status::DATA_SGL_LENGTH_INVALID, ErrAt::NONE)),
        };
        Ok(Some(Decoded {
            work: Work::Chain(Chain::copy(
                ranges,
                count as u16,
                c.sdlba,
                c.fua || write_through,
            )),
            lba: c.sdlba,
            blocks: total.min(u32::MAX as u64) as u32,
            kind: OpKind::Other,
            bytes: 0,
            read_len: 0,
        }))
    }
}

/// The range list of a DSM or Copy command: the first `need` bytes the host sent (`None` when
/// it sent fewer, or the buffer cannot hold them). A longer transfer is taken and its excess
/// ignored: Linux sends every discard with a 4096-byte range buffer (room for 256 ranges,
/// `nvme_setup_discard`) whatever NR says, and Linux's own target accepts that (nvmet checks
/// the transfer is at least the ranges' length).
fn range_list(req: &mut Request, need: usize) -> Option<&[u8]> {
    let data_len = req.data_len as usize;
    match req.buf.as_mut() {
        Some(b) if b.capacity() >= need && data_len >= need => {
            b.set_len(need);
            Some(b.as_slice())
        }
        _ => None,
    }
}

pub(crate) fn event_response(e: Event) -> Option<Response> {
    match e {
        Event::Completion(_, r) => Some(r),
        _ => None,
    }
}
