//! An I/O queue pair handed to another core (SPDK's one queue pair per thread): the
//! controller, which keeps the admin queue, creates it (Create I/O Completion Queue, Create
//! I/O Submission Queue) next to its own, and [`crate::Controller::take_core_queue`] moves
//! its memory, its slots and a handle on its two doorbells into a [`CoreQueue`] that the
//! receiving core alone polls: no lock and no message per I/O. Its namespaces are the
//! controller's ([`CoreBackend`] per namespace).
//!
//! What stays with the controller: the admin queue, so Abort, and every reset. A command
//! that times out on a core queue makes that core ask the controller for a reset
//! ([`QueueLink`]); the reset fails every outstanding request of every queue with the
//! internal error a reset gives on the controller's own queues (a timed-out command there
//! fails with the same error whether its Abort succeeds or the reset follows). A host's
//! Abort of a command on a core queue is asked of the controller ([`QueueLink`]'s abort
//! mailbox), which sends the drive the Abort command for that queue's SQID and CID.
//!
//! ## Reset handshake and memory ordering
//!
//! [`QueueLink`] is the only state both cores touch; every field is an atomic:
//! - `state` = generation << 2 | `UP` / `DOWN` / `DEAD`, stored by the controller only.
//!   `DOWN` is stored (`Release`) once CSTS.RDY reads 0 after CC.EN was cleared: the
//!   controller is idle and will not touch the queue's memory again until it is created anew.
//! - `ack`: the generation whose `DOWN` the core has acted on, stored by the core only
//!   (`Release`) after it failed its outstanding requests and zeroed its queue memory (phase
//!   tags back to 0, indexes to 0).
//! - The controller loads `ack` (`Acquire`) and sends Create I/O CQ for that queue only once
//!   it equals the generation: the core's zeroing happens before that load, and the admin
//!   doorbell write that follows is preceded by `dmb oshst` (see `keel_hal::nvme::Bar0`),
//!   which is cumulative on Arm: stores this core observed (the zeroing, through the
//!   acquire) are ordered before the doorbell for the device too. A core that does not
//!   acknowledge within the admin timeout gets its queue marked `DEAD`.
//! - After Create I/O SQ succeeds the controller stores `UP` (`Release`); the core, having
//!   loaded it (`Acquire`), submits again.
//! - `reset`: a core sets it (`Relaxed`: it carries no data) when one of its commands timed
//!   out; the controller swaps it back and starts a reset.
//! - When the controller is given up on it stores `DEAD`: the core fails what it has
//!   outstanding and refuses new requests with an internal error, as the controller does.
//! - `abort`: 0, or the CID + 1 of one command of the core's queue the core wants aborted
//!   (a host's Abort). The core stores it (compare-and-swap from 0, `Release`) after it rang
//!   the SQ doorbell that gave the command to the drive and a full barrier; the controller
//!   swaps it back to 0 (`Acquire`) and sends the drive Abort (SQID, CID). One at a time per
//!   queue: a second one finds the mailbox full and is not passed on ("not aborted"). The
//!   command's completion, aborted or not, comes back on the core's queue as usual.

use crate::Registers;
use crate::controller::Namespace;
use crate::dma::Dma;
use crate::engine::{IoEngine, IoParams};
use alloc::rc::Rc;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockRequest, Capabilities, Geometry, RejectReason,
    Rejected,
};

const UP: u64 = 0;
const DOWN: u64 = 1;
const DEAD: u64 = 2;

/// What the controller and the core owning a handed-out queue share (see the module doc
/// for who stores what, and the ordering).
#[derive(Debug)]
pub struct QueueLink {
    state: AtomicU64,
    ack: AtomicU64,
    reset: AtomicBool,
    abort: AtomicU64,
}

impl QueueLink {
    /// A queue not created yet, in the controller's current `generation` (acknowledged:
    /// the first Create needs no handshake).
    pub(crate) fn new(generation: u64) -> Self {
        Self {
            state: AtomicU64::new(generation << 2 | DOWN),
            ack: AtomicU64::new(generation),
            reset: AtomicBool::new(false),
            abort: AtomicU64::new(0),
        }
    }

    /// Core: asks the controller to send the drive an Abort of command `cid` of this queue;
    /// false if one is already waiting.
    fn request_abort(&self, cid: u16) -> bool {
        self.abort
            .compare_exchange(0, u64::from(cid) + 1, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// Controller: whether the core wants a command aborted (one relaxed load).
    pub(crate) fn abort_requested(&self) -> bool {
        self.abort.load(Ordering::Relaxed) != 0
    }

    /// Controller: the CID of the command the core wants aborted, if any (clears it).
    pub(crate) fn take_abort_request(&self) -> Option<u16> {
        match self.abort.swap(0, Ordering::Acquire) {
            0 => None,
            v => Some((v - 1) as u16),
        }
    }

    /// Controller: the queue exists on the drive (generation `generation`).
    pub(crate) fn up(&self, generation: u64) {
        self.state.store(generation << 2 | UP, Ordering::Release);
    }

    /// Controller: the drive is idle; the queue must be reset before it is created again.
    pub(crate) fn down(&self, generation: u64) {
        self.state.store(generation << 2 | DOWN, Ordering::Release);
    }

    /// Controller: given up on.
    pub(crate) fn dead(&self) {
        let g = self.state.load(Ordering::Relaxed) >> 2;
        self.state.store(g << 2 | DEAD, Ordering::Release);
    }

    /// Controller: whether the core reset its queue for `generation`.
    pub(crate) fn acked(&self, generation: u64) -> bool {
        self.ack.load(Ordering::Acquire) == generation
    }

    /// Controller: it reset a queue not handed out yet itself.
    pub(crate) fn acknowledge(&self, generation: u64) {
        self.ack.store(generation, Ordering::Release);
    }

    /// Controller: whether the core asked for a reset (clears the request).
    pub(crate) fn take_reset_request(&self) -> bool {
        self.reset.swap(false, Ordering::Relaxed)
    }
}

/// Where a core queue is, as its core last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Up,
    Down,
    Dead,
}

/// Counters of a core queue (its core reads them; nothing is shared).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreQueueStats {
    /// Commands submitted.
    pub commands: u64,
    /// Requests completed (successfully or not).
    pub requests_done: u64,
    /// Commands that completed with an error status.
    pub errors: u64,
    /// Commands that timed out (each asks the controller for a reset).
    pub timeouts: u64,
    /// Requests failed back because the controller reset or was given up on.
    pub failed_by_reset: u64,
    /// Resets this queue went through.
    pub resets: u64,
    /// SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes.
    pub cq_doorbells: u64,
    /// Requests refused as busy because the queue had no room.
    pub queue_full: u64,
}

/// Where a core queue is, as its core last saw it (status reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreQueueState {
    /// Created on the drive: commands flow.
    Up,
    /// Not created (yet, or again after a reset): requests are refused as busy.
    Down,
    /// The controller was given up on: requests fail.
    Dead,
}

impl CoreQueueState {
    /// `up`, `down` or `dead`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Dead => "dead",
        }
    }
}

/// One I/O queue pair of a drive, owned and polled by one core.
pub struct CoreQueue<R: Registers, D: Dma> {
    regs: R,
    dma: D,
    engine: IoEngine,
    params: IoParams,
    namespaces: Vec<Namespace>,
    link: Arc<QueueLink>,
    seen: Seen,
    /// The generation whose reset this core acknowledged.
    generation: u64,
    now: u64,
    next_scan: u64,
    scan_ns: u64,
    timeouts: u64,
    resets: u64,
}

impl<R: Registers, D: Dma> fmt::Debug for CoreQueue<R, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreQueue")
            .field("qid", &self.qid())
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<R: Registers, D: Dma> CoreQueue<R, D> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        regs: R,
        dma: D,
        engine: IoEngine,
        params: IoParams,
        namespaces: Vec<Namespace>,
        link: Arc<QueueLink>,
        scan_ns: u64,
        now: u64,
    ) -> Self {
        let generation = link.ack.load(Ordering::Acquire);
        Self {
            regs,
            dma,
            engine,
            params,
            namespaces,
            link,
            seen: Seen::Down,
            generation,
            now,
            next_scan: 0,
            scan_ns,
            timeouts: 0,
            resets: 0,
        }
    }

    /// The queue's ID on the drive.
    pub fn qid(&self) -> u16 {
        self.engine.io.first().map_or(0, |q| q.qp.qid)
    }

    /// The drive's namespaces (index `i` is [`CoreBackend`] `i`).
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Follows the controller's state (see [`QueueLink`]).
    fn follow(&mut self) {
        let s = self.link.state.load(Ordering::Acquire);
        let (generation, state) = (s >> 2, s & 3);
        match state {
            UP if generation == self.generation => self.seen = Seen::Up,
            // A generation this core has not reset for: the drive is idle (stored after
            // CSTS.RDY = 0). Fail what was given to it, start the queue afresh, say so.
            DOWN | UP if generation != self.generation => {
                self.engine.fail_all(&mut self.dma);
                for q in self.engine.io.iter_mut() {
                    q.qp.reset(&mut self.dma);
                }
                self.generation = generation;
                self.resets += 1;
                self.seen = Seen::Down;
                self.link.ack.store(generation, Ordering::Release);
            }
            DEAD if self.seen != Seen::Dead => {
                self.engine.fail_all(&mut self.dma);
                self.seen = Seen::Dead;
            }
            _ => {}
        }
    }

    /// One pass with the time: follows the controller's state, rings, reaps, and checks for
    /// commands that timed out (each makes the core ask the controller for a reset).
    /// Returns whether anything happened.
    pub fn poll(&mut self, now: u64) -> bool {
        self.now = now;
        let before = self.seen;
        self.follow();
        if self.seen != Seen::Up {
            return before != self.seen;
        }
        let n = self.service();
        if now >= self.next_scan {
            self.next_scan = now.saturating_add(self.scan_ns);
            let qid = self.qid();
            for q in self.engine.io.iter_mut() {
                for (cid, s) in q.slots.iter_mut().enumerate() {
                    if s.busy && s.abort_deadline.is_none() && now >= s.deadline {
                        // Reported once; the controller's reset fails it.
                        s.abort_deadline = Some(now);
                        self.timeouts += 1;
                        self.link.reset.store(true, Ordering::Relaxed);
                        log::warn!(
                            "nvme: command {cid} on core queue {qid} timed out; asking for a controller reset"
                        );
                    }
                }
            }
        }
        n > 0 || before != self.seen
    }

    /// Rings the SQ doorbell and reaps completions (what a namespace backend's `poll` does).
    pub fn service(&mut self) -> usize {
        if self.seen != Seen::Up {
            return 0;
        }
        self.engine.ring(&mut self.regs);
        self.engine.reap(&mut self.dma, &mut self.regs)
    }

    /// Asks for an Abort of the request of namespace index `ns` tagged `tag` (its first
    /// command still outstanding on the drive): true when the controller will send it (the
    /// request then completes as usual, with [`BlockError::Aborted`] if the drive aborted
    /// it).
    pub fn abort(&mut self, ns: usize, tag: u64) -> bool {
        if self.seen != Seen::Up {
            return false;
        }
        let Some(pi) = self.engine.parent_of(ns, tag) else {
            return false;
        };
        let cid = self.engine.io.first().and_then(|q| {
            q.slots
                .iter()
                .position(|s| s.busy && s.parent as usize == pi)
        });
        let Some(cid) = cid else {
            return false;
        };
        // The command must have reached the drive before the controller's Abort does.
        self.engine.ring(&mut self.regs);
        core::sync::atomic::fence(Ordering::SeqCst);
        if !self.link.request_abort(cid as u16) {
            return false;
        }
        self.engine.parents[pi].abort_requested = true;
        true
    }

    /// Queues a request for namespace index `ns`; the doorbell is written by the next
    /// [`CoreQueue::service`] / [`CoreQueue::poll`].
    pub fn submit(&mut self, ns: usize, req: BlockRequest) -> Result<(), Rejected> {
        self.follow();
        match self.seen {
            Seen::Up => {}
            Seen::Down => {
                return Err(Rejected {
                    reason: RejectReason::Busy,
                    req,
                });
            }
            Seen::Dead => {
                return Err(Rejected {
                    reason: RejectReason::Invalid(BlockError::Internal),
                    req,
                });
            }
        }
        let p = self.params;
        self.engine.submit(
            &mut self.dma,
            &p,
            &self.namespaces,
            self.now,
            ns,
            Some(0),
            req,
        )
    }

    /// The next completion of namespace index `ns`.
    pub fn take_completion(&mut self, ns: usize) -> Option<BlockCompletion> {
        self.engine.take_completion(ns)
    }

    /// Commands outstanding on the drive.
    pub fn outstanding(&self) -> usize {
        self.engine.outstanding()
    }

    /// Counters.
    pub fn stats(&self) -> CoreQueueStats {
        let c = self.engine.counters;
        let (sq_doorbells, cq_doorbells) = self.engine.doorbells();
        CoreQueueStats {
            commands: c.commands,
            requests_done: c.requests_done,
            errors: c.errors,
            timeouts: self.timeouts,
            failed_by_reset: c.failed_by_reset,
            resets: self.resets,
            sq_doorbells,
            cq_doorbells,
            queue_full: c.queue_full,
        }
    }

    /// Where the queue is, as this core last saw it.
    pub fn state(&self) -> CoreQueueState {
        match self.seen {
            Seen::Up => CoreQueueState::Up,
            Seen::Down => CoreQueueState::Down,
            Seen::Dead => CoreQueueState::Dead,
        }
    }

    /// The register seam (tests).
    pub fn regs(&mut self) -> &mut R {
        &mut self.regs
    }
}

/// A namespace of a drive served through a [`CoreQueue`], as a block backend (on the core
/// owning the queue).
pub struct CoreBackend<R: Registers, D: Dma> {
    queue: Rc<RefCell<CoreQueue<R, D>>>,
    index: usize,
    ns: Namespace,
}

impl<R: Registers, D: Dma> fmt::Debug for CoreBackend<R, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreBackend")
            .field("nsid", &self.ns.nsid)
            .finish_non_exhaustive()
    }
}

impl<R: Registers, D: Dma> CoreBackend<R, D> {
    /// Namespace index `index` of `queue`'s drive.
    pub fn new(queue: Rc<RefCell<CoreQueue<R, D>>>, index: usize) -> Option<Self> {
        let ns = *queue.try_borrow().ok()?.namespaces().get(index)?;
        Some(Self { queue, index, ns })
    }
}

impl<R: Registers, D: Dma> BlockBackend for CoreBackend<R, D> {
    fn geometry(&self) -> Geometry {
        self.ns.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.ns.caps
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        match self.queue.try_borrow_mut() {
            Ok(mut q) => q.submit(self.index, req),
            Err(_) => Err(Rejected {
                reason: RejectReason::Busy,
                req,
            }),
        }
    }

    fn abort(&mut self, tag: u64) -> bool {
        // Abort is an admin command: the controller sends it (see `QueueLink`).
        match self.queue.try_borrow_mut() {
            Ok(mut q) => q.abort(self.index, tag),
            Err(_) => false,
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        if let Ok(mut q) = self.queue.try_borrow_mut() {
            q.service();
        }
        let i = self.index;
        keel_storage::deliver_shared(&self.queue, |q| q.take_completion(i), done)
    }
}
