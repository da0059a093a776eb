//! The emulated NVMe PCIe function: the server the DPU is plugged into sees an NVMe
//! controller on PCIe, and every command runs on the DPU through the shared controller core
//! ([`keel_controller::Target`]), the same one NVMe/TCP uses.
//!
//! Layering: a PCIe endpoint (a real DPU endpoint controller, or on QEMU an `ivshmem` window
//! shared with `keelctl host`) is reached only through the [`EndpointFunction`] seam
//! (registers, doorbells, bounds-checked DMA, interrupts). [`PcieFunction`] is the sans-IO,
//! polled, `no_std + alloc` controller emulation on top of it: registers, queues, doorbells,
//! PRPs, completions. Admin and I/O semantics are the core's; this crate implements only what
//! is specific to the PCIe transport (Create/Delete I/O SQ/CQ, PRPs, phase tags, doorbells).
//! [`layout`] documents the window both sides share; [`MemWindow`] is an in-memory
//! [`EndpointFunction`] for host tests. `#![forbid(unsafe_code)]`: the volatile accesses to
//! shared memory belong to the endpoint implementations (in `hal` for the firmware).
//!
//! # Specification coverage (NVMe base 2.0)
//!
//! - §3.1.3 registers: CAP (from [`keel_controller::Target::cap`]: MQES, CQR = 1, TO, DSTRD = 0, CSS NVM,
//!   MPSMIN = MPSMAX = 4 KiB), VS, CC, CSTS, AQA, ASQ, ACQ; doorbells with stride 4 (§3.1.3.25).
//! - §3.5.1 / §3.6: CC.EN 0 → 1 validates AQA (ASQS, ACQS ≥ 1), ASQ/ACQ (page aligned, whole
//!   queue inside host memory) and CC (by the core: CSS, MPS, AMS, IOSQES 6, IOCQES 4); any
//!   failure sets CSTS.CFS. CC.EN 1 → 0 is a Controller Level Reset: every queue and
//!   outstanding command is dropped (buffers come back through the core's
//!   `Event::BufferReleased`), doorbells read 0, CSTS = 0, features back to defaults (a
//!   fresh local controller of the core at the next enable). CC.SHN: no new commands are
//!   fetched, outstanding I/O completes, every active namespace is flushed (Flush through the
//!   core), then CSTS.SHST = 2.
//! - §4.1.1 PRPs: PRP1 dword aligned, PRP2 as second page or PRP list pointer, chained lists;
//!   misaligned entries → PRP Offset Invalid; anything outside host memory → Data Transfer
//!   Error (never a DMA outside it). PSDT ≠ 0 (SGLs) → Invalid Field in Command.
//! - §4.2.4 completion entries: SQ head, SQ id, CID, phase tag (status dword written last);
//!   one interrupt per CQ per pass when IEN (MSI-X style; INTMS/INTMC are ignored).
//! - §5.3 / §5.4 Create I/O CQ / SQ: QID 0, above the granted count or in use → Invalid Queue
//!   Identifier; QSIZE 0 or > MQES → Invalid Queue Size; base not page aligned → PRP Offset
//!   Invalid; IV beyond the vectors → Invalid Interrupt Vector; PC = 0 (CAP.CQR = 1) or a queue
//!   outside host memory → Invalid Field in Command; SQ on CQ 0 or a missing CQ → Completion
//!   Queue Invalid. §5.5 / §5.6 Delete: unknown QID → Invalid Queue Identifier; a CQ with SQs
//!   → Invalid Queue Deletion; an SQ's outstanding commands complete with Command Aborted due
//!   to SQ Deletion.
//! - Everything else (Identify, Get Log Page, Set/Get Features including Number of Queues,
//!   Arbitration, Volatile Write Cache, Asynchronous Event Configuration, Abort, AER, all I/O)
//!   goes to the core. Fabrics commands (opcode 7Fh) are Invalid Opcode; Set Features Keep
//!   Alive Timer is Invalid Field (no keep-alive duty on PCIe). Identify Controller is
//!   returned with the fabrics-only fields (SGLS, KAS, bytes 1792-2047) cleared.
//!
//! # Invalid doorbell writes: CSTS.CFS
//!
//! An SQ tail doorbell ≥ the queue size, or a CQ head doorbell ≥ the queue size or beyond the
//! entries posted, is an Invalid Doorbell Write Value (§3.1.3.25-26). The core has no API to
//! raise an Error asynchronous event, so the function treats it as a fatal controller error:
//! CSTS.CFS = 1, nothing more is processed (no DMA at all) until the host resets the
//! controller with CC.EN = 0. Writes to doorbells of queues that do not exist are never read.
//!
//! # Calling protocol (firmware)
//!
//! ```text
//! let cfg = FunctionConfig { owner: 1, ..FunctionConfig::new(subnqn) };
//! let mut f = PcieFunction::new(cfg, pool)?;              // once per function
//! loop {                                                  // the poll loop
//!     f.poll(now, &mut target, &mut endpoint);            // registers, doorbells, commands
//!     target.poll(now, &mut |ev| match ev.owner() {       // completions from backends,
//!         1 => { f.handle_event(ev, &mut endpoint); }     // routed by the queue's owner
//!         _ => { /* another transport's */ }
//!     });
//! }
//! ```
//! With a target that serves only this function, [`PcieFunction::poll_with_target`] does both.
//! To spread the I/O queues over cores, [`PcieFunction::set_cores`], then deliver every
//! [`PcieFunction::take_handover`] after a poll and give pairs back with
//! [`PcieFunction::give_back`]; [`crate::queue`] describes the handshake.
//! The target's `Limits` set what the host sees: `max_queue_depth` (≥ 256 for CAP.MQES 255),
//! `max_io_queues` (≥ 8), `mdts` (pool buffers must hold 4 KiB << mdts), `max_controllers`
//! (one live controller per function).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod endpoint;
pub mod function;
pub mod layout;
pub mod prp;
pub mod queue;

#[cfg(test)]
mod tests;

pub use endpoint::{DmaError, EndpointFunction, MemWindow, QueuePort};
pub use function::{
    ConfigError, FatalReason, FunctionConfig, FunctionState, FunctionStats, Handover, PcieFunction,
};
pub use queue::{IoPair, PairStats};
