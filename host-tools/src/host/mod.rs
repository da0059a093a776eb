//! The host side of the emulated NVMe PCIe function: what the server the DPU is plugged into
//! runs. On QEMU the function's BAR is a window file shared with the firmware's `ivshmem`
//! device (layout in [`keel_nvme_pcie::layout`]); inside a guest it is the same device's BAR2.
//!
//! - [`window`]: the mapped window ([`Window`]), the function-side endpoint over it
//!   ([`SharedEndpoint`]) and [`Emulator`], an in-process firmware for tests and
//!   `keelctl host emulate`.
//! - [`driver`]: the firmware's NVMe driver (`keel-nvme-driver`) on the window's registers
//!   and host memory: [`HostController`], and [`HostDevice`], a namespace as a
//!   [`crate::blockdev::BlockDevice`].
//! - [`ivshmem`]: interrupts toward the host over `ivshmem-doorbell`: our ivshmem server and
//!   this process as its peer (eventfds the function's doorbell signals).
//! - [`vfio`]: inside a guest, the function's `ivshmem-doorbell` device through VFIO (its
//!   MSI-X vectors as eventfds, its BAR2 as the window).
//! - [`nbd`]: an NBD server exporting a namespace, many requests at once.
//! - [`cli`]: `keelctl host --window FILE identify|read|write|verify|bench|nbd|emulate`.

pub mod cli;
pub mod driver;
pub mod ivshmem;
pub mod nbd;
pub mod signals;
pub mod ublk;
pub mod vfio;
pub mod window;

pub use driver::{HostConfig, HostController, HostDevice, HostTarget};
pub use nbd::{NbdConfig, Server as NbdServer};
pub use window::{Emulator, EmulatorConfig, SharedEndpoint, Window};
