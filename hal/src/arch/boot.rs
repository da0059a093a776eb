//! From the assembly entry to the firmware's `main`.
//!
//! `entry.S` leaves us at EL1 on the main stack with BSS zeroed, FP/SIMD enabled and the
//! vectors installed. Here the boot identity map turns the MMU and caches on, then control
//! passes to the function the firmware named with [`entry!`](crate::entry).

use super::{ImageLayout, mmu, timer};

/// What the firmware's `main` learns about how it was started.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Device tree address from x0 (0 when the loader passed none, e.g. started from flash).
    pub dtb: usize,
    /// Exception level at entry (1 or 2); the firmware always runs at EL1.
    pub entry_el: u8,
    /// Where the image lives.
    pub layout: ImageLayout,
    /// Generic timer count when Rust code started.
    pub counter_at_start: u64,
}

/// Names the firmware's main function: `keel_hal::entry!(main)` with `fn main(BootInfo) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(export_name = "__keel_main")]
        fn __keel_main(info: $crate::arch::boot::BootInfo) -> ! {
            $main(info)
        }
    };
}

unsafe extern "Rust" {
    /// Defined by the firmware through [`entry!`](crate::entry).
    fn __keel_main(info: BootInfo) -> !;
}

/// Called by `entry.S` once, with the device tree address and the entry exception level.
#[unsafe(no_mangle)]
extern "C" fn keel_hal_boot(dtb: usize, entry_el: u64) -> ! {
    let counter_at_start = timer::counter();
    let layout = ImageLayout::get();
    // SAFETY: this runs once, first, on the boot core with the MMU off; the boot map covers
    // the image (normal memory) with identical addresses, so nothing the program uses moves.
    unsafe { mmu::enable_boot_map(&layout) };
    let info = BootInfo {
        dtb,
        entry_el: entry_el as u8,
        layout,
        counter_at_start,
    };
    // SAFETY: `__keel_main` is defined by the `entry!` macro with exactly this signature.
    unsafe { __keel_main(info) }
}
