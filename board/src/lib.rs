//! Keel board support: board profiles and platform discovery from the device tree.
//!
//! The firmware learns its platform from the flattened device tree (Devicetree Specification
//! v0.4, §2-§4; bindings: `arm,pl011`, `arm,gic-400`/`arm,cortex-a15-gic`/`arm,gic-v3`,
//! `arm,armv8-timer`, `arm,psci`, cpu nodes with `enable-method`, `pci-host-ecam-generic`, `cfi-flash`), never from constants.
//! A [`Profile`] holds the little a board must know before it has a device tree: its name and
//! where the device tree lies when the loader passed none.
//!
//! Adding a board: add a module with its [`Profile`] and a cargo feature, a MEMORY file in
//! `linker/`, and a device tree fixture test here.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod platform;
pub mod qemu_virt;

pub use platform::{
    CpuNode, EnableMethod, Gic, IntxRoute, MAX_CPUS, PciSpace, PciWindow, PcieHost, Platform,
    PlatformError, PsciMethod, Region, fdt_total_size,
};

/// What a board must know before it has a device tree.
#[derive(Debug)]
pub struct Profile {
    /// Short name printed in the banner and stored in image headers.
    pub name: &'static str,
    /// Root `compatible` strings of device trees for this board.
    pub compatible: &'static [&'static str],
    /// Where the device tree is when the loader passed none in x0 (booting from flash).
    pub dtb_fallback: usize,
}

/// The board this build is for.
#[cfg(feature = "qemu-virt")]
pub const BOARD: &Profile = &qemu_virt::PROFILE;

#[cfg(not(feature = "qemu-virt"))]
compile_error!("keel-board: enable exactly one board feature (qemu-virt)");
