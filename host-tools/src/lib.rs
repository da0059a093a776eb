//! `keelctl`'s library: everything the command does, usable from the integration tests.
//!
//! - [`image`]: turns the firmware ELF into the raw image loaders boot (`-kernel`, booti) and
//!   into a flash image for QEMU `virt`'s pflash.
#![warn(missing_docs)]

pub mod image;
