//! A submission / completion queue pair (NVMe base 2.0 §3.3.1 circular queues, §4.2.4 phase
//! tag). The submission queue tail doorbell is written by [`QueuePair::ring`] once per batch;
//! the completion queue head doorbell by [`QueuePair::ack`] once per poll batch.

use crate::Registers;
use crate::dma::{Dma, DmaRegion};
use crate::doorbell;
use keel_nvme::{Cqe, Sqe};

/// One queue pair: SQ and CQ memory, indexes and phase.
#[derive(Debug)]
pub struct QueuePair {
    /// Queue identifier (0 = admin).
    pub qid: u16,
    /// Entries in each queue.
    pub depth: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    sq_tail: u16,
    /// SQ head as last reported by the controller (CQE SQHD).
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    /// Entries written since the last tail doorbell.
    unrung: u16,
    /// Entries consumed since the last head doorbell.
    unacked: u16,
    /// Doorbell writes (SQ tail, CQ head), for statistics and tests.
    pub doorbells: (u64, u64),
}

impl QueuePair {
    /// Allocates memory for a pair of `depth` entries (page aligned, zeroed).
    pub fn new(dma: &mut dyn Dma, qid: u16, depth: u16, page: usize, dstrd: u8) -> Option<Self> {
        let sq = dma.alloc(depth as usize * Sqe::SIZE, page)?;
        let cq = dma.alloc(depth as usize * Cqe::SIZE, page)?;
        Some(Self {
            qid,
            depth,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_db: doorbell::sq_tail(qid, dstrd),
            cq_db: doorbell::cq_head(qid, dstrd),
            unrung: 0,
            unacked: 0,
            doorbells: (0, 0),
        })
    }

    /// Device address of the submission queue.
    pub fn sq_addr(&self) -> u64 {
        self.sq.dev_addr()
    }

    /// Device address of the completion queue.
    pub fn cq_addr(&self) -> u64 {
        self.cq.dev_addr()
    }

    /// Back to the state after creation (after a controller reset): memory zeroed, indexes 0,
    /// phase 1.
    pub fn reset(&mut self, dma: &mut dyn Dma) {
        self.sq.zero();
        self.cq.zero();
        dma.sync_for_device(self.cq.cpu_addr(), self.cq.len());
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        self.unrung = 0;
        self.unacked = 0;
    }

    fn next(&self, i: u16) -> u16 {
        if i + 1 == self.depth { 0 } else { i + 1 }
    }

    /// True when one more entry would make the queue full (tail + 1 == head).
    pub fn is_full(&self) -> bool {
        self.next(self.sq_tail) == self.sq_head
    }

    /// Writes `sqe` at the tail. The doorbell is not written (see [`QueuePair::ring`]).
    /// False when the queue is full.
    pub fn push(&mut self, dma: &mut dyn Dma, sqe: &Sqe) -> bool {
        if self.is_full() {
            return false;
        }
        let off = self.sq_tail as usize * Sqe::SIZE;
        self.sq.write_bytes(off, &sqe.to_bytes());
        dma.sync_for_device(self.sq.cpu_addr() + off, Sqe::SIZE);
        self.sq_tail = self.next(self.sq_tail);
        self.unrung += 1;
        true
    }

    /// Writes the SQ tail doorbell if entries were added since the last time.
    pub fn ring(&mut self, regs: &mut dyn Registers) -> bool {
        if self.unrung == 0 {
            return false;
        }
        regs.write32(self.sq_db, self.sq_tail as u32);
        self.unrung = 0;
        self.doorbells.0 += 1;
        true
    }

    /// Entries written but not yet announced by a doorbell.
    pub fn unrung(&self) -> u16 {
        self.unrung
    }

    /// The next completion, if the controller has posted one (its phase tag matches).
    pub fn pop(&mut self, dma: &mut dyn Dma) -> Option<Cqe> {
        let off = self.cq_head as usize * Cqe::SIZE;
        let status = self.cq.read_u32(off + 12);
        if ((status >> 16) & 1 != 0) != self.phase {
            return None;
        }
        // The rest of the entry is read only after the phase tag said it is complete.
        dma.sync_for_cpu(self.cq.cpu_addr() + off, Cqe::SIZE);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        let mut b = [0u8; Cqe::SIZE];
        self.cq.read_bytes(off, &mut b);
        let cqe = Cqe::from_bytes(&b);
        self.cq_head = self.next(self.cq_head);
        if self.cq_head == 0 {
            self.phase = !self.phase;
        }
        if cqe.sqhd < self.depth {
            self.sq_head = cqe.sqhd;
        }
        self.unacked += 1;
        Some(cqe)
    }

    /// Writes the CQ head doorbell if completions were consumed since the last time.
    pub fn ack(&mut self, regs: &mut dyn Registers) -> bool {
        if self.unacked == 0 {
            return false;
        }
        regs.write32(self.cq_db, self.cq_head as u32);
        self.unacked = 0;
        self.doorbells.1 += 1;
        true
    }
}
