//! AArch64 support: entry, exception vectors and crash reports, MMU, generic timer, PSCI,
//! secondary cores and per-core data, CPU identification, and semihosting exit for test
//! builds.
//!
//! The firmware runs at EL1 (entered at EL2 it drops to EL1; EL3 entry is not supported),
//! on SP_EL0, with exceptions on their own stack (SP_EL1), on every core.

pub mod boot;
pub mod cpu;
pub mod exceptions;
pub mod mmu;
pub mod percpu;
pub mod power;
pub mod rng;
pub mod smp;
pub mod timer;

core::arch::global_asm!(
    include_str!("entry.S"),
    bb_mair = const smp::offsets::MAIR,
    bb_tcr = const smp::offsets::TCR,
    bb_ttbr0 = const smp::offsets::TTBR0,
    bb_sctlr = const smp::offsets::SCTLR,
    bb_exc_top = const smp::offsets::EXC_TOP,
    bb_stack_top = const smp::offsets::STACK_TOP,
    bb_percore = const smp::offsets::PERCORE,
);
core::arch::global_asm!(include_str!("vectors.S"));
// `memcpy` and `memset` with q registers, replacing compiler_builtins' weak ones (see the
// file). `raw`: the file's register lists are in braces, not format arguments.
core::arch::global_asm!(include_str!("memcpy.S"), options(raw));

/// Symbols the linker script defines.
pub(crate) mod layout {
    unsafe extern "C" {
        pub static __image_start: u8;
        pub static __text_end: u8;
        pub static __rodata_end: u8;
        pub static __image_bss_end: u8;
        pub static __exc_stack_guard: u8;
        pub static __exc_stack_bottom: u8;
        pub static __exc_stack_top: u8;
        pub static __stack_guard: u8;
        pub static __stack_bottom: u8;
        pub static __stack_top: u8;
    }

    /// The address of a linker symbol.
    macro_rules! addr {
        ($sym:ident) => {
            // The symbol is only used for its address; it is never read.
            (&raw const $crate::arch::layout::$sym) as usize
        };
    }
    pub(crate) use addr;
}

/// Address ranges of the running image, from the linker script.
#[derive(Clone, Copy, Debug)]
pub struct ImageLayout {
    /// Start of the image (its link address).
    pub start: usize,
    /// End of executable code (page aligned).
    pub text_end: usize,
    /// End of read-only data (page aligned).
    pub rodata_end: usize,
    /// End of everything the image occupies: data, BSS and stacks (page aligned).
    pub end: usize,
    /// Exception stack (SP_EL1), guard page excluded.
    pub exc_stack: (usize, usize),
    /// Main stack (SP_EL0), guard page excluded.
    pub stack: (usize, usize),
    /// The guard pages left unmapped.
    pub guards: [usize; 2],
}

impl ImageLayout {
    /// The layout of the running image.
    pub fn get() -> Self {
        use layout::addr;
        Self {
            start: addr!(__image_start),
            text_end: addr!(__text_end),
            rodata_end: addr!(__rodata_end),
            end: addr!(__image_bss_end),
            exc_stack: (addr!(__exc_stack_bottom), addr!(__exc_stack_top)),
            stack: (addr!(__stack_bottom), addr!(__stack_top)),
            guards: [addr!(__exc_stack_guard), addr!(__stack_guard)],
        }
    }
}
