//! Fatal errors: stable exit codes, the panic handler, boot failures.
//!
//! Exit codes (QEMU's exit status for test builds, printed before power-off otherwise):
//! 0 clean power-off, 2 panic, 3 CPU exception, 16+ boot failures ([`BootError::code`]).

use core::fmt::{self, Write};
use keel_hal::{arch::power, console::Emergency};

/// Exit code after a panic.
pub const EXIT_PANIC: u32 = 2;

/// Why boot stopped; each has a stable code.
#[derive(Debug)]
pub enum BootError {
    /// No device tree at the address the loader gave (or the board's fallback).
    NoDeviceTree(usize),
    /// The device tree could not be used.
    Platform(keel_board::PlatformError),
    /// The device tree names no PL011 console.
    NoConsole,
    /// No free RAM for the heap.
    NoHeap,
    /// The final page table could not be built.
    Map(keel_hal::arch::mmu::MapError),
}

impl BootError {
    /// The stable code printed and used as exit status.
    pub fn code(&self) -> u32 {
        match self {
            Self::NoDeviceTree(_) => 16,
            Self::Platform(_) => 17,
            Self::NoConsole => 18,
            Self::NoHeap => 19,
            Self::Map(_) => 20,
        }
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDeviceTree(a) => write!(f, "no device tree at {a:#x}"),
            Self::Platform(e) => write!(f, "device tree: {e}"),
            Self::NoConsole => f.write_str("the device tree names no PL011 console"),
            Self::NoHeap => f.write_str("no free RAM for the heap"),
            Self::Map(e) => write!(f, "page table: {e}"),
        }
    }
}

/// Reports a boot failure (if there is a console yet) and stops.
pub fn boot_failed(e: BootError) -> ! {
    let _ = writeln!(
        Emergency::get(),
        "keel: boot failed: {e} (code {})",
        e.code()
    );
    power::fatal(e.code())
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut w = Emergency::get();
    match info.location() {
        Some(l) => {
            let _ = write!(
                w,
                "\n*** keel: panic at {}:{}:{}: ",
                l.file(),
                l.line(),
                l.column()
            );
        }
        None => {
            let _ = write!(w, "\n*** keel: panic: ");
        }
    }
    let _ = writeln!(w, "{}", info.message());
    power::fatal(EXIT_PANIC)
}
