//! `keelctl`'s library: everything the command does, usable from the integration tests.
//!
//! - [`image`]: turns the firmware ELF into the raw image loaders boot (`-kernel`, booti) and
//!   into a flash image for QEMU `virt`'s pflash.
//! - [`console`]: the firmware console's defmt log frames decoded into text with the image's
//!   ELF (`keelctl console decode`, `qemu/run`, the test harness).
//! - [`blockdev`]: the block-device interface read, write, verify and bench run on, for both
//!   of the following.
//! - [`nvme`]: the NVMe/TCP initiator (discovery, identify, read/write, verify, bench).
//! - [`host`]: the emulated PCIe function's host side (window, NVMe driver, NBD export).
//! - [`mgmt`]: the management client (`status`, `provision push`, `reboot`, `metrics`).
//! - [`provision`]: keys, device descriptions, signed bundles, flashing (formats in
//!   `keel_provision`).
#![warn(missing_docs)]

pub mod blockdev;
pub mod console;
pub mod host;
pub mod image;
pub mod mgmt;
pub mod nvme;
pub mod provision;
