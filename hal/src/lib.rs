//! Keel's hardware abstraction layer: the only code (with `keel-board`) that touches hardware.
//!
//! - [`arch`] (bare-metal aarch64 only): entry from any arm64 Linux-style loader or from flash,
//!   exception vectors with crash reports, MMU, generic timer, PSCI power control.
//! - [`console`]: PL011 console: plain text, defmt log frames (the `log` facade bridged into
//!   them) and an emergency writer.
//! - [`gic`]: interrupt controller bring-up, per-core CPU interfaces, doorbells between cores.
//! - [`heap`]: the global allocator (one heap, its lock kept off the I/O path; per-core
//!   counters prove it).
//! - [`pcie`]: ECAM enumeration and BAR assignment (portable logic, tested on the host).
//! - [`vring`]: when to notify a virtio device, and recovery from a lost notification
//!   (portable logic, tested on the host).
//!
//! Generic code above this crate sees typed drivers and traits, never addresses: addresses
//! come from the device tree through `keel-board`.
#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;
pub mod console;
pub mod flash;
#[cfg(target_arch = "aarch64")]
pub mod gic;
pub mod heap;
pub mod ivshmem;
pub mod netcsum;
pub mod netrx;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod nvme;
pub mod pcie;
pub mod pl011;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod virtio_net;
pub mod vring;

/// The most cores the firmware runs on (device tree cpu nodes beyond are left off).
pub const MAX_CORES: usize = 64;
