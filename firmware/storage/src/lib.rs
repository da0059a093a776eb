//! Keel's block layer: data buffers, the non-blocking [`BlockBackend`] trait, backends and
//! per-namespace statistics.
//!
//! Layering: transports (NVMe/TCP, emulated PCIe) and the controller core move data in
//! [`IoBuf`]s, which travel *by value* through a [`BlockRequest`] into a backend and come back
//! in the [`BlockCompletion`], so an asynchronous backend (a poll-mode NVMe drive, a remote
//! NVMe/TCP volume) can hold them until the I/O finishes. Nothing here blocks, reads a clock or
//! allocates per I/O: [`BufPool`] carves its buffers once, backends size their queues at
//! construction, and time is passed in as nanoseconds.
//!
//! Semantics follow the NVM Command Set 1.0 commands the controller maps onto backends:
//! Read (§3.2.4), Write (§3.2.6, FUA), Flush (NVMe base 2.0 §7.1), Write Zeroes (§3.2.8, with
//! Deallocate), Dataset Management deallocate (§3.2.3), Compare (§3.2.1) and Verify (§3.3.6).
//! [`BlockBackend::abort`] lets a backend abort a request it holds (NVMe base 2.0 §5.1).
//! A backend whose medium is memory also moves data synchronously, without a buffer
//! ([`BlockBackend::moves_data_now`], [`BlockBackend::read_now`], [`BlockBackend::write_now`]):
//! the transports then read straight into their send window and write straight from what
//! they received, one copy instead of two.
//! Statistics feed the SMART / Health log (NVMe base 2.0 §5.16.1.3: data units, host
//! commands, media and data integrity errors).
//!
//! - [`buf`]: [`IoBuf`] and [`BufPool`].
//! - [`backend`]: the [`BlockBackend`] trait and request/completion types.
//! - [`memory`]: what memory backends share (requests run against a medium, their queue).
//! - [`ram`]: [`RamBackend`], heap memory, completes in `poll`.
//! - [`slice`]: [`SliceBackend`] (bounds-checked window) and [`SharedBackend`] (one backend
//!   shared by several handles, e.g. one drive cut into per-tenant volumes).
//! - [`stats`]: [`NsStats`] and [`LatencyHistogram`].
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod backend;
pub mod buf;
pub mod memory;
#[allow(unsafe_code)] // uninitialised RAM-disk memory, read only where written
pub mod ram;
pub mod slice;
pub mod stats;

pub use backend::{
    BlockBackend, BlockCompletion, BlockError, BlockOp, BlockRequest, Capabilities, Geometry,
    NowIo, RejectReason, Rejected, deliver_shared,
};
pub use buf::{BufPool, IoBuf, PoolError};
pub use ram::RamBackend;
pub use slice::{SharedBackend, SharedHandle, SliceBackend};
pub use stats::{LatencyHistogram, NsStats, OpKind};
