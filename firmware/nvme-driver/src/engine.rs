//! The I/O path over a set of queue pairs, shared by a controller's own I/O queues
//! ([`crate::Controller`]) and a queue pair handed to another core ([`crate::CoreQueue`]):
//! command slots with their PRP list pages, requests split at the transfer limit, completions
//! parked per namespace. Nothing here talks to the admin queue or knows the controller's
//! state: the owner checks that before it submits, and decides what a timeout leads to.

use crate::Registers;
use crate::controller::{Namespace, block_error};
use crate::dma::{Dma, DmaRegion};
use crate::queue::QueuePair;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use keel_nvme::io::{DsmCommand, DsmRange, RwCommand};
use keel_nvme::{IoOpcode, Sqe};
use keel_storage::{BlockCompletion, BlockError, BlockOp, BlockRequest, RejectReason, Rejected};

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) busy: bool,
    pub(crate) parent: u16,
    pub(crate) deadline: u64,
    pub(crate) abort_deadline: Option<u64>,
    /// This command's PRP list page (also holds a Dataset Management range).
    prp: DmaRegion,
}

#[derive(Debug)]
pub(crate) struct IoQueue {
    pub(crate) qp: QueuePair,
    pub(crate) slots: Vec<Slot>,
    pub(crate) free: Vec<u16>,
}

impl IoQueue {
    /// Allocates a queue pair of `depth` entries and one PRP list page per command slot
    /// (`depth - 1`: one entry stays free).
    pub(crate) fn new(
        dma: &mut dyn Dma,
        qid: u16,
        depth: u16,
        page: usize,
        dstrd: u8,
    ) -> Option<Self> {
        let qp = QueuePair::new(dma, qid, depth, page, dstrd)?;
        let mut slots = Vec::with_capacity(depth as usize - 1);
        for _ in 0..depth - 1 {
            slots.push(Slot {
                busy: false,
                parent: 0,
                deadline: 0,
                abort_deadline: None,
                prp: dma.alloc(page, page)?,
            });
        }
        let free = (0..depth - 1).rev().collect();
        Some(Self { qp, slots, free })
    }
}

#[derive(Debug, Default)]
pub(crate) struct Parent {
    pub(crate) req: Option<BlockRequest>,
    pub(crate) ns: u16,
    remaining: u16,
    error: Option<BlockError>,
    /// CPU range of read data to sync for the CPU when done.
    read_sync: Option<(usize, usize)>,
    /// The caller asked for an abort ([`crate::Controller::abort`]): a command completed with
    /// Command Abort Requested fails the request with [`BlockError::Aborted`] (an abort sent
    /// because of a timeout fails it with [`BlockError::Internal`]).
    pub(crate) abort_requested: bool,
}

/// What the I/O path needs to know of its controller (fixed once it is up).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IoParams {
    /// Memory page size (CC.MPS).
    pub(crate) page: usize,
    /// Largest transfer per command in bytes.
    pub(crate) max_transfer: u32,
    /// A command not completed after this long has timed out.
    pub(crate) io_timeout_ns: u64,
    /// The zero buffer (device address, length) that emulated Write Zeroes writes from.
    pub(crate) zero: Option<(u64, usize)>,
    /// The sink buffer (device address, length) emulated Verify reads into (never read by
    /// the CPU, so several queues may share it).
    pub(crate) sink: Option<(u64, usize)>,
}

/// Counters of the I/O path (a subset of [`crate::DriveStats`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IoCounters {
    pub(crate) commands: u64,
    pub(crate) requests_done: u64,
    pub(crate) errors: u64,
    pub(crate) failed_by_reset: u64,
    pub(crate) spurious: u64,
    /// Requests refused as busy because the queues had no room (no free slot or SQ entry,
    /// or the namespace's completions waiting to be taken fill their queue).
    pub(crate) queue_full: u64,
    pub(crate) last_error: Option<keel_nvme::Status>,
}

/// Requests, command slots and parked completions over `io`.
#[derive(Debug, Default)]
pub(crate) struct IoEngine {
    pub(crate) io: Vec<IoQueue>,
    pub(crate) parents: Vec<Parent>,
    parent_free: Vec<u16>,
    stash: Vec<VecDeque<BlockCompletion>>,
    in_flight: Vec<usize>,
    stash_cap: usize,
    next_queue: usize,
    pub(crate) counters: IoCounters,
}

/// Builds PRP1/PRP2 for `len` bytes at device address `addr` (NVMe base 2.0 §4.1.1),
/// writing a PRP list into `list` when the transfer spans more than two memory pages.
fn prps(dma: &mut dyn Dma, page: usize, list: &mut DmaRegion, addr: u64, len: usize) -> (u64, u64) {
    let off = (addr % page as u64) as usize;
    let first = len.min(page - off);
    if len <= first {
        return (addr, 0);
    }
    let second = addr - off as u64 + page as u64;
    let rest = len - first;
    if rest <= page {
        return (addr, second);
    }
    let n = rest.div_ceil(page);
    for i in 0..n {
        list.write_u64(i * 8, second + (i * page) as u64);
    }
    dma.sync_for_device(list.cpu_addr(), n * 8);
    (addr, list.dev_addr())
}

fn reject(req: BlockRequest, reason: RejectReason) -> Result<(), Rejected> {
    Err(Rejected { reason, req })
}

impl IoEngine {
    /// The request of namespace index `ns` tagged `tag` still outstanding (its index).
    pub(crate) fn parent_of(&self, ns: usize, tag: u64) -> Option<usize> {
        self.parents
            .iter()
            .position(|p| p.ns as usize == ns && p.req.as_ref().is_some_and(|r| r.tag == tag))
    }

    /// Sizes the request table and the per-namespace completion queues for the queues in
    /// `io` and `namespaces` namespaces.
    pub(crate) fn size_tables(&mut self, namespaces: usize) {
        let total: usize = self.io.iter().map(|q| q.slots.len()).sum();
        self.parents = (0..total).map(|_| Parent::default()).collect();
        self.parent_free = (0..total as u16).rev().collect();
        self.stash_cap = total + 32;
        self.stash = (0..namespaces)
            .map(|_| VecDeque::with_capacity(self.stash_cap))
            .collect();
        self.in_flight = alloc::vec![0; namespaces];
    }

    /// Queues a request for namespace index `ns` (on queue index `queue`, or the next one
    /// with room). The caller checked that the controller is online.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submit(
        &mut self,
        dma: &mut dyn Dma,
        p: &IoParams,
        namespaces: &[Namespace],
        now: u64,
        ns: usize,
        queue: Option<usize>,
        mut req: BlockRequest,
    ) -> Result<(), Rejected> {
        let Some(n) = namespaces.get(ns).copied() else {
            return reject(req, RejectReason::Invalid(BlockError::Internal));
        };
        let range = match req.validate(n.geometry, n.caps) {
            Ok(r) => r,
            Err(e) => return reject(req, RejectReason::Invalid(e)),
        };
        if self.stash[ns].len() + self.in_flight[ns] >= self.stash_cap {
            self.counters.queue_full += 1;
            return reject(req, RejectReason::Busy);
        }
        let bs = n.geometry.block_size as u64;
        let max_blocks = (p.max_transfer as u64 / bs).clamp(1, 65536) as u32;
        // (opcode, blocks per command, data source)
        enum Data {
            None,
            Buf(u64),
            Zero,
            Sink,
        }
        let (opcode, per_cmd, data) = match req.op {
            BlockOp::Flush if !n.caps.volatile_write_cache => {
                // No volatile write cache: every completed write is already durable.
                self.stash[ns].push_back(BlockCompletion {
                    tag: req.tag,
                    result: Ok(()),
                    buf: req.buf.take(),
                });
                return Ok(());
            }
            BlockOp::Flush => (IoOpcode::Flush, u32::MAX, Data::None),
            BlockOp::Deallocate => (IoOpcode::DatasetManagement, u32::MAX, Data::None),
            BlockOp::WriteZeroes { .. } if n.native_write_zeroes => {
                (IoOpcode::WriteZeroes, 65536, Data::None)
            }
            BlockOp::WriteZeroes { .. } => {
                let zl = p.zero.map_or(0, |z| z.1) as u64;
                let blocks = (zl / bs).clamp(1, max_blocks as u64) as u32;
                if zl < bs {
                    return reject(req, RejectReason::Invalid(BlockError::Unsupported));
                }
                (IoOpcode::Write, blocks, Data::Zero)
            }
            BlockOp::Verify if n.native_verify => (IoOpcode::Verify, 65536, Data::None),
            BlockOp::Verify => {
                let sl = p.sink.map_or(0, |z| z.1) as u64;
                if sl < bs {
                    return reject(req, RejectReason::Invalid(BlockError::Unsupported));
                }
                let blocks = (sl / bs).clamp(1, max_blocks as u64) as u32;
                (IoOpcode::Read, blocks, Data::Sink)
            }
            BlockOp::Read | BlockOp::Write { .. } | BlockOp::Compare => {
                let op = match req.op {
                    BlockOp::Read => IoOpcode::Read,
                    BlockOp::Compare => IoOpcode::Compare,
                    _ => IoOpcode::Write,
                };
                let base = req.buf.as_ref().map_or(0, |b| b.dma_addr()) + range.start as u64;
                if !base.is_multiple_of(4) {
                    // PRP entries must be dword aligned (§4.1.1).
                    return reject(req, RejectReason::Invalid(BlockError::BufferTooSmall));
                }
                (op, max_blocks, Data::Buf(base))
            }
        };
        let count = if per_cmd == u32::MAX {
            1
        } else {
            req.blocks.div_ceil(per_cmd) as usize
        };
        if count > self.io.first().map_or(0, |q| q.slots.len()) {
            return reject(req, RejectReason::Invalid(BlockError::Unsupported));
        }
        let nq = self.io.len();
        let room = |q: &IoQueue| q.free.len() >= count && !q.qp.is_full();
        let pick = match queue {
            Some(q) => room(&self.io[q]).then_some(q),
            None => (0..nq)
                .map(|i| (self.next_queue + i) % nq)
                .find(|&i| room(&self.io[i])),
        };
        let Some(qi) = pick else {
            self.counters.queue_full += 1;
            return reject(req, RejectReason::Busy);
        };
        let Some(pi) = self.parent_free.pop() else {
            self.counters.queue_full += 1;
            return reject(req, RejectReason::Busy);
        };
        self.next_queue = (qi + 1) % nq;
        let fua = match req.op {
            BlockOp::Write { fua } | BlockOp::WriteZeroes { fua, .. } => fua,
            _ => false,
        };
        let deac = matches!(
            req.op,
            BlockOp::WriteZeroes {
                deallocate: true,
                ..
            }
        );
        // Data buffer: visible to the device before any command referencing it is.
        let mut read_sync = None;
        if let (Data::Buf(_), Some(b)) = (&data, req.buf.as_mut()) {
            let cpu = b.as_mut_ptr().addr() + range.start;
            dma.sync_for_device(cpu, range.len());
            if req.op == BlockOp::Read {
                read_sync = Some((cpu, range.len()));
            }
        }
        let deadline = now.saturating_add(p.io_timeout_ns);
        let q = &mut self.io[qi];
        for i in 0..count {
            let Some(cid) = q.free.pop() else { break };
            let slot = &mut q.slots[cid as usize];
            let lba = req.lba + i as u64 * per_cmd as u64;
            let blocks = if per_cmd == u32::MAX {
                req.blocks
            } else {
                per_cmd.min(req.blocks - i as u32 * per_cmd)
            };
            let rw = RwCommand {
                slba: lba,
                nlb: blocks.saturating_sub(1) as u16,
                deac,
                fua,
                lr: false,
                prinfo: 0,
            };
            let sqe = match (&data, req.op) {
                (_, BlockOp::Flush) => Sqe::new(opcode as u8, cid).with_nsid(n.nsid),
                (_, BlockOp::Deallocate) => {
                    let r = DsmRange {
                        cattr: 0,
                        nlb: blocks,
                        slba: lba,
                    };
                    slot.prp.write_bytes(0, &r.to_bytes());
                    dma.sync_for_device(slot.prp.cpu_addr(), DsmRange::SIZE);
                    DsmCommand {
                        nr: 0,
                        idr: false,
                        idw: false,
                        ad: true,
                    }
                    .to_sqe(cid, n.nsid)
                    .with_prps(slot.prp.dev_addr(), 0)
                }
                (Data::None, _) => rw.to_sqe(opcode as u8, cid, n.nsid),
                (Data::Buf(base), _) => {
                    let addr = base + (i as u64 * per_cmd as u64 * bs);
                    let (p1, p2) = prps(
                        dma,
                        p.page,
                        &mut slot.prp,
                        addr,
                        blocks as usize * bs as usize,
                    );
                    rw.to_sqe(opcode as u8, cid, n.nsid).with_prps(p1, p2)
                }
                (Data::Zero | Data::Sink, _) => {
                    let region = match data {
                        Data::Zero => p.zero,
                        _ => p.sink,
                    };
                    let addr = region.map_or(0, |z| z.0);
                    let (p1, p2) = prps(
                        dma,
                        p.page,
                        &mut slot.prp,
                        addr,
                        blocks as usize * bs as usize,
                    );
                    rw.to_sqe(opcode as u8, cid, n.nsid).with_prps(p1, p2)
                }
            };
            slot.busy = true;
            slot.parent = pi;
            slot.deadline = deadline;
            slot.abort_deadline = None;
            q.qp.push(dma, &sqe);
            self.counters.commands += 1;
        }
        self.parents[pi as usize] = Parent {
            req: Some(req),
            ns: ns as u16,
            remaining: count as u16,
            error: None,
            read_sync,
            abort_requested: false,
        };
        self.in_flight[ns] += 1;
        Ok(())
    }

    /// Writes the SQ tail doorbell of every queue with new entries (once per batch).
    pub(crate) fn ring(&mut self, regs: &mut dyn Registers) {
        for q in self.io.iter_mut() {
            q.qp.ring(regs);
        }
    }

    fn finish(&mut self, dma: &mut dyn Dma, pi: u16) {
        let Some(p) = self.parents.get_mut(pi as usize) else {
            return;
        };
        let Some(req) = p.req.take() else { return };
        let result = match p.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let (Ok(()), Some((cpu, len))) = (result, p.read_sync.take()) {
            dma.sync_for_cpu(cpu, len);
        }
        let ns = p.ns as usize;
        self.in_flight[ns] -= 1;
        self.stash[ns].push_back(BlockCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
        self.parent_free.push(pi);
        self.counters.requests_done += 1;
    }

    /// Reaps every queue's completions and writes their CQ head doorbells; returns how many
    /// completions were reaped.
    pub(crate) fn reap(&mut self, dma: &mut dyn Dma, regs: &mut dyn Registers) -> usize {
        let mut n = 0;
        for qi in 0..self.io.len() {
            while let Some(cqe) = self.io[qi].qp.pop(dma) {
                n += 1;
                let q = &mut self.io[qi];
                let Some(slot) = q.slots.get_mut(cqe.cid as usize).filter(|s| s.busy) else {
                    self.counters.spurious += 1;
                    continue;
                };
                slot.busy = false;
                let pi = slot.parent;
                q.free.push(cqe.cid);
                let p = &mut self.parents[pi as usize];
                if !cqe.status.is_success() {
                    let e = match block_error(cqe.status) {
                        BlockError::Aborted if !p.abort_requested => BlockError::Internal,
                        e => e,
                    };
                    p.error.get_or_insert(e);
                    self.counters.errors += 1;
                    self.counters.last_error = Some(cqe.status);
                }
                p.remaining = p.remaining.saturating_sub(1);
                if p.remaining == 0 {
                    self.finish(dma, pi);
                }
            }
            self.io[qi].qp.ack(regs);
        }
        n
    }

    /// Fails every outstanding request with an internal error (the controller stopped, or
    /// was given up on: nothing it was given will be touched again).
    pub(crate) fn fail_all(&mut self, dma: &mut dyn Dma) {
        for q in self.io.iter_mut() {
            for (cid, s) in q.slots.iter_mut().enumerate() {
                if s.busy {
                    s.busy = false;
                    q.free.push(cid as u16);
                }
            }
        }
        for pi in 0..self.parents.len() {
            if self.parents[pi].req.is_some() {
                let p = &mut self.parents[pi];
                p.error.get_or_insert(BlockError::Internal);
                p.read_sync = None;
                self.counters.failed_by_reset += 1;
                self.finish(dma, pi as u16);
            }
        }
    }

    /// The next parked completion of namespace index `ns`.
    pub(crate) fn take_completion(&mut self, ns: usize) -> Option<BlockCompletion> {
        self.stash.get_mut(ns)?.pop_front()
    }

    /// Commands outstanding on the queues.
    pub(crate) fn outstanding(&self) -> usize {
        self.io.iter().map(|q| q.slots.len() - q.free.len()).sum()
    }

    /// SQ tail and CQ head doorbell writes of the queues.
    pub(crate) fn doorbells(&self) -> (u64, u64) {
        self.io.iter().fold((0, 0), |(s, c), q| {
            (s + q.qp.doorbells.0, c + q.qp.doorbells.1)
        })
    }
}
