//! [`DriveBackend`]: one namespace of a drive as a `keel_storage::BlockBackend`.
//!
//! Requests travel to the controller by value; the data buffer's `IoBuf::dma_addr()` plus the
//! request's `buf_offset` is what the PRPs point at (buffers are physically contiguous), so no
//! byte is copied between the caller's buffer and the drive. Operations map as follows:
//!
//! | `BlockOp` | drive has it | drive lacks it |
//! |---|---|---|
//! | Read, Write (FUA) | Read, Write (FUA bit) split at MDTS | — |
//! | Compare | Compare (ONCS bit 0) | refused: `Unsupported` |
//! | Flush | Flush when VWC is present | success without a command (no volatile cache) |
//! | WriteZeroes | Write Zeroes (ONCS bit 3), DEAC/FUA | Writes from a zero buffer |
//! | Deallocate | Dataset Management, AD (ONCS bit 2) | refused: `Unsupported` |
//! | Verify | Verify (ONCS bit 7) | Reads into a sink buffer (data discarded) |
//!
//! `abort` sends the drive an Abort command for each of the request's outstanding commands
//! (see `Controller::abort`).
//!
//! Slices (one drive cut into per-tenant volumes) are `keel_storage::SliceBackend` and
//! `SharedBackend` around a `DriveBackend`.

use crate::Registers;
use crate::controller::{Controller, Namespace};
use crate::dma::Dma;
use alloc::rc::Rc;
use core::cell::RefCell;
use core::fmt;
use keel_storage::{
    BlockBackend, BlockCompletion, BlockRequest, Capabilities, Geometry, RejectReason, Rejected,
};

/// A namespace of a drive, as a block backend. `submit` queues commands (the doorbell is
/// written by the next `poll`, once per batch); `poll` rings, reaps and hands back this
/// namespace's completions. Timeouts and recovery advance in [`crate::Drive::poll`], which
/// the poll loop calls with the time.
pub struct DriveBackend<R: Registers, D: Dma> {
    ctrl: Rc<RefCell<Controller<R, D>>>,
    index: usize,
    ns: Namespace,
}

impl<R: Registers, D: Dma> fmt::Debug for DriveBackend<R, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriveBackend")
            .field("nsid", &self.ns.nsid)
            .field("geometry", &self.ns.geometry)
            .finish()
    }
}

impl<R: Registers, D: Dma> DriveBackend<R, D> {
    pub(crate) fn new(ctrl: Rc<RefCell<Controller<R, D>>>, index: usize, ns: Namespace) -> Self {
        Self { ctrl, index, ns }
    }

    /// The namespace served.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// Submits on I/O queue index `queue` (see [`Controller::submit_on`]).
    pub fn submit_on(&mut self, queue: usize, req: BlockRequest) -> Result<(), Rejected> {
        match self.ctrl.try_borrow_mut() {
            Ok(mut c) => c.submit_on(self.index, queue, req),
            Err(_) => Err(Rejected {
                reason: RejectReason::Busy,
                req,
            }),
        }
    }

    /// Writes the SQ doorbells now instead of at the next `poll`.
    pub fn ring(&mut self) {
        if let Ok(mut c) = self.ctrl.try_borrow_mut() {
            c.ring();
        }
    }
}

impl<R: Registers, D: Dma> BlockBackend for DriveBackend<R, D> {
    fn geometry(&self) -> Geometry {
        self.ns.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.ns.caps
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        match self.ctrl.try_borrow_mut() {
            Ok(mut c) => c.submit(self.index, req),
            Err(_) => Err(Rejected {
                reason: RejectReason::Busy,
                req,
            }),
        }
    }

    fn abort(&mut self, tag: u64) -> bool {
        self.ctrl
            .try_borrow_mut()
            .is_ok_and(|mut c| c.abort(self.index, tag))
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        if let Ok(mut c) = self.ctrl.try_borrow_mut() {
            c.service();
        }
        // Deliver one at a time with the controller released, so `done` may submit.
        let i = self.index;
        keel_storage::deliver_shared(&self.ctrl, |c| c.take_completion(i), done)
    }
}
