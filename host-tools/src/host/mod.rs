//! The host side of the emulated NVMe PCIe function: what the server the DPU is plugged into
//! runs. On QEMU the function's BAR is a window file shared with the firmware's `ivshmem`
//! device (layout in [`keel_nvme_pcie::layout`]).
//!
//! - [`window`]: the mapped window ([`Window`]), the function-side endpoint over it
//!   ([`SharedEndpoint`]) and [`Emulator`], an in-process firmware for tests and
//!   `keelctl host emulate`.
//! - [`driver`]: a user-space NVMe driver doing what an OS driver does over PCIe: reset,
//!   admin queue, Identify, Create/Delete I/O queues, I/O with PRP lists, completions by phase
//!   tag, interrupt counters, shutdown (CC.SHN).
//! - [`nbd`]: an NBD server exporting a namespace through the driver.
//! - [`cli`]: `keelctl host --window FILE identify|read|write|verify|bench|nbd|emulate`.

pub mod cli;
pub mod driver;
pub mod nbd;
pub mod window;

pub use driver::{Completion, Data, HostController, IoOp, IoQueue, Queue};
pub use nbd::Server as NbdServer;
pub use window::{Emulator, EmulatorConfig, SharedEndpoint, Window};
