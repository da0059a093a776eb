//! Poll-mode NVMe host driver for PCIe-attached drives (NVMe Base Specification 2.0, PCIe
//! transport), in the SPDK style: no interrupts, completions found by polling the phase tag,
//! doorbells written once per batch, no allocation per I/O.
//!
//! Layering: this crate is portable and host-tested. It touches hardware only through two
//! injected seams, [`Registers`] (BAR0) and [`Dma`] (physically contiguous memory and cache
//! maintenance); `keel-hal` implements them for the firmware (`keel_hal::nvme`), and the tests
//! implement them with a fake controller that plays the device over fake registers and memory
//! (the virtio-drivers `FakeTransport` pattern). Time is always passed in as nanoseconds; the
//! driver never reads a clock (boot-time bring-up takes a clock closure for its bounded waits).
//!
//! Specification references (NVMe Base 2.0 unless noted):
//! - §3.1.3 controller registers: CAP (MQES, TO, DSTRD, MPSMIN, CSS), CC, CSTS (RDY, CFS), AQA,
//!   ASQ, ACQ; §3.1.4 doorbells at `0x1000 + (2y (+1)) * (4 << CAP.DSTRD)` (see [`doorbell`]).
//! - §3.3 queue mechanics: circular queues, full/empty rules, phase tag (§4.2.4, Figure 89).
//! - §3.5.1 controller initialization, §3.5.2 shutdown/reset: CC.EN=0 and CSTS.RDY=0 bounded
//!   by CAP.TO × 500 ms, admin queues, CC (IOSQES 6, IOCQES 4, MPS = CAP.MPSMIN), enable.
//! - §4.1.1 PRP entries and PRP lists (PRP1 with an offset, later entries page aligned, a PRP
//!   list page when the transfer spans more than two pages).
//! - §5 admin commands: Identify (§5.17: controller CNS 01h, active namespace list CNS 02h,
//!   namespace CNS 00h), Set Features Number of Queues (§5.27.1.5), Create I/O Completion
//!   Queue (§5.4, IEN = 0) and Submission Queue (§5.5), Abort (§5.1).
//! - NVM Command Set 1.0 §3.2: Read, Write (FUA), Flush, Compare, Write Zeroes, Dataset
//!   Management (deallocate); ONCS and VWC in Identify Controller decide what is passed
//!   through and what is emulated (see [`backend`]).
//! - §10.1 error recovery: a command timeout leads to Abort, then a controller reset; CSTS.CFS
//!   leads to a reset; every outstanding request is failed back, never lost.
//!
//! Modules: [`dma`] (the only `unsafe` code: access to DMA memory), [`queue`] (submission /
//! completion queue pairs), [`controller`] (init, admin, I/O, timeouts and recovery),
//! [`backend`] ([`DriveBackend`]: a `keel_storage::BlockBackend` per namespace).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

extern crate alloc;

pub mod backend;
pub mod controller;
pub mod corequeue;
pub mod dma;
mod engine;
pub mod queue;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use backend::DriveBackend;
pub use controller::{
    Config, Controller, ControllerInfo, Drive, DriveStats, InitError, Namespace, State,
};
pub use corequeue::{CoreBackend, CoreQueue, CoreQueueState, CoreQueueStats, QueueLink};
pub use dma::{Dma, DmaRegion};

/// Access to the controller's registers (BAR0 of the PCI function, NVMe base 2.0 §3.1).
///
/// Offsets are byte offsets into BAR0. Implementations must perform each access as a single
/// access of the given width (64-bit accesses may be split into two 32-bit accesses, low half
/// first, which §3.1 allows for CAP, ASQ and ACQ), and a write must be ordered after every
/// earlier write of the CPU to DMA memory (the driver writes queue entries, then rings a
/// doorbell; on Arm this is a `dmb oshst` before the store, as Linux's `writel`).
pub trait Registers {
    /// Reads a 32-bit register.
    fn read32(&mut self, offset: usize) -> u32;
    /// Writes a 32-bit register.
    fn write32(&mut self, offset: usize, value: u32);
    /// Reads a 64-bit register (default: low then high 32-bit halves).
    fn read64(&mut self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }
    /// Writes a 64-bit register (default: low then high 32-bit halves).
    fn write64(&mut self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// Doorbell register offsets (NVMe base 2.0 §3.1.4, Figures 55-56).
pub mod doorbell {
    /// Offset of the Submission Queue `qid` Tail Doorbell for doorbell stride `dstrd`.
    pub const fn sq_tail(qid: u16, dstrd: u8) -> usize {
        0x1000 + (2 * qid as usize) * (4 << dstrd)
    }
    /// Offset of the Completion Queue `qid` Head Doorbell for doorbell stride `dstrd`.
    pub const fn cq_head(qid: u16, dstrd: u8) -> usize {
        0x1000 + (2 * qid as usize + 1) * (4 << dstrd)
    }
}
