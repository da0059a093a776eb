//! Secondary cores: stacks with guard pages, PSCI CPU_ON (Arm DEN 0022 §5.6), and the path
//! from `keel_secondary_entry` (entry.S) to the firmware's per-core function.
//!
//! The boot core, in order:
//! 1. [`reserve_stacks`] before it builds the final page table: one area per secondary,
//!    `[guard][exception stack][guard][main stack]`, from the heap; the firmware leaves every
//!    [`CoreStacks::guards`] page out of the map, so an overflow faults as on the boot core;
//! 2. [`describe`] the cores (publishes the [`CoreInfo`] table, installs its own per-core
//!    record);
//! 3. [`start`] each secondary with a closure: CPU_ON with the entry point and a boot block
//!    that carries the boot core's translation regime (MAIR, TCR, TTBR0, SCTLR), the core's
//!    stacks and per-core record. The secondary drops from EL2 if it starts there, turns its
//!    MMU on with the same (identity) map, installs the exception vectors, brings up its GIC
//!    interface and timer, reports in, and runs the closure forever.
//!
//! [`start`] returns once the core has reported in (or fails after [`START_TIMEOUT_NS`]),
//! with the core's [`Doorbell`] so others can wake it.

extern crate alloc;

use super::percpu::{self, CoreInfo, PerCore};
use super::{power, timer};
use crate::gic::{CpuInterface, Doorbell, GicCpu, GicError};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering, fence};

/// A secondary's main stack (SP_EL0): as large as the boot core's (linker/image.ld).
pub const STACK_SIZE: usize = 512 * 1024;
/// A secondary's exception stack (SP_EL1): as the boot core's.
pub const EXC_STACK_SIZE: usize = 64 * 1024;
const PAGE: usize = 4096;
/// Bytes of one secondary's stack area: `[guard][exception stack][guard][main stack]`.
pub const STACK_AREA: usize = PAGE + EXC_STACK_SIZE + PAGE + STACK_SIZE;
/// How long [`start`] waits for a core to report in.
pub const START_TIMEOUT_NS: u64 = 2_000_000_000;

/// One secondary's stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreStacks {
    /// Exception stack, `bottom..top`.
    pub exc: (usize, usize),
    /// Main stack, `bottom..top`.
    pub main: (usize, usize),
    /// The guard page below each stack: leave them out of the page table.
    pub guards: [usize; 2],
}

impl CoreStacks {
    /// Lays the stacks out in `area` (page aligned, [`STACK_AREA`] bytes).
    pub fn carve(area: usize) -> Self {
        let exc_bottom = area + PAGE;
        let main_guard = exc_bottom + EXC_STACK_SIZE;
        let main_bottom = main_guard + PAGE;
        Self {
            exc: (exc_bottom, main_guard),
            main: (main_bottom, main_bottom + STACK_SIZE),
            guards: [area, main_guard],
        }
    }
}

/// Reserves stacks for `count` secondaries from the heap (never freed). Call before the final
/// page table is built and leave the guard pages out of it.
pub fn reserve_stacks(count: usize) -> Vec<CoreStacks> {
    if count == 0 {
        return Vec::new();
    }
    let layout = Layout::from_size_align(STACK_AREA * count, PAGE).expect("stack layout");
    // SAFETY: the layout's size is non-zero.
    let base = unsafe { alloc::alloc::alloc(layout) };
    if base.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    (0..count)
        .map(|i| CoreStacks::carve(base as usize + i * STACK_AREA))
        .collect()
}

/// Publishes the table of cores: the boot core (index 0) with its linker-script stacks,
/// then one secondary per `(mpidr, stacks)`, and installs the boot core's per-core record.
/// Returns the table (leaked: it lives as long as the firmware).
pub fn describe(
    boot_mpidr: u64,
    layout: &super::ImageLayout,
    secondaries: &[(u64, CoreStacks)],
) -> &'static [CoreInfo] {
    let mut cores = Vec::with_capacity(secondaries.len() + 1);
    cores.push(CoreInfo {
        index: 0,
        mpidr: boot_mpidr,
        stack: layout.stack,
        exc_stack: layout.exc_stack,
    });
    for (i, (mpidr, s)) in secondaries.iter().enumerate() {
        cores.push(CoreInfo {
            index: i + 1,
            mpidr: *mpidr,
            stack: s.main,
            exc_stack: s.exc,
        });
    }
    let table: &'static [CoreInfo] = Box::leak(cores.into_boxed_slice());
    percpu::set_cores(table);
    percpu::init_boot_core(&table[0]);
    table
}

/// What a started core's function receives.
#[derive(Debug)]
pub struct CoreContext {
    /// The core.
    pub info: &'static CoreInfo,
    /// Its GIC interface (brought up), if the machine has a GIC.
    pub gic: Option<GicCpu>,
    /// The exception level the core started at (the firmware runs at EL1).
    pub entry_el: u8,
}

/// A secondary core's function: its poll loop, which should never return (if it does, the
/// core parks in WFE).
pub type CoreMain = Box<dyn FnOnce(CoreContext) + Send>;

/// Why a core did not start.
#[derive(Debug)]
pub enum StartError {
    /// PSCI refused CPU_ON (or there is no PSCI).
    Psci(power::PsciError),
    /// The core did not report in within [`START_TIMEOUT_NS`].
    Timeout,
    /// The core started but its GIC interface could not be brought up.
    Gic(GicError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Psci(e) => write!(f, "CPU_ON: {e}"),
            Self::Timeout => f.write_str("the core did not report in"),
            Self::Gic(e) => write!(f, "GIC: {e}"),
        }
    }
}

const STARTING: u32 = 0;
const RUNNING: u32 = 1;
const GIC_FAILED: u32 = 2;

/// What the boot core hands a secondary. The fields before `info` are read by entry.S with
/// the MMU off (offsets passed to the assembly as constants); the rest by Rust once the MMU
/// is on.
#[repr(C, align(64))]
pub(crate) struct BootBlock {
    pub(crate) mair: u64,
    pub(crate) tcr: u64,
    pub(crate) ttbr0: u64,
    pub(crate) sctlr: u64,
    pub(crate) exc_top: u64,
    pub(crate) stack_top: u64,
    pub(crate) percore: u64,
    info: &'static CoreInfo,
    gic: Option<CpuInterface>,
    /// Taken by the secondary (written by the boot core before CPU_ON only).
    main: UnsafeCell<Option<CoreMain>>,
    /// Written by the secondary before it publishes `state` (Release); read by the boot core
    /// after it sees `RUNNING` (Acquire).
    doorbell: UnsafeCell<Option<Doorbell>>,
    gic_error: UnsafeCell<Option<GicError>>,
    state: AtomicU32,
}

// SAFETY: `main` is written by the boot core before CPU_ON and read once by the secondary
// after it (CPU_ON is the hand-over, with a DSB and fences around it); `doorbell` and
// `gic_error` are written by the secondary before its Release store of `state` and read by
// the boot core only after an Acquire load sees that store. Nothing is accessed from two cores
// at once.
unsafe impl Sync for BootBlock {}

/// Offsets of the fields entry.S reads (passed to `global_asm!` as constants).
pub(crate) mod offsets {
    use super::BootBlock;
    use core::mem::offset_of;
    pub(crate) const MAIR: usize = offset_of!(BootBlock, mair);
    pub(crate) const TCR: usize = offset_of!(BootBlock, tcr);
    pub(crate) const TTBR0: usize = offset_of!(BootBlock, ttbr0);
    pub(crate) const SCTLR: usize = offset_of!(BootBlock, sctlr);
    pub(crate) const EXC_TOP: usize = offset_of!(BootBlock, exc_top);
    pub(crate) const STACK_TOP: usize = offset_of!(BootBlock, stack_top);
    pub(crate) const PERCORE: usize = offset_of!(BootBlock, percore);
    /// Everything the assembly reads fits in the block's first 64 bytes.
    const _: () = assert!(PERCORE + 8 <= 64);
}

unsafe extern "C" {
    /// entry.S: where CPU_ON starts a secondary.
    fn keel_secondary_entry();
}

fn sysreg_regime() -> (u64, u64, u64, u64) {
    use aarch64_cpu::registers::{MAIR_EL1, Readable, SCTLR_EL1, TCR_EL1, TTBR0_EL1};
    (
        MAIR_EL1.get(),
        TCR_EL1.get(),
        TTBR0_EL1.get(),
        SCTLR_EL1.get(),
    )
}

/// Cleans `len` bytes at `addr` to the point of coherency (a core with its MMU and caches off
/// reads memory, not the boot core's cache).
fn clean_to_poc(addr: usize, len: usize) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    let line = 4usize << ((ctr >> 16) & 0xf);
    let mut a = addr & !(line - 1);
    while a < addr + len {
        // SAFETY: DC CVAC on a mapped, normal-memory address writes dirty data back; it
        // changes no memory contents.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack, preserves_flags)) };
        a += line;
    }
    // SAFETY: a barrier has no other effect.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// A started secondary.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    /// The core.
    pub info: &'static CoreInfo,
    /// Wakes it from WFI (rung after putting a message in one of its rings); `None` without
    /// a GIC.
    pub doorbell: Option<Doorbell>,
}

/// Starts the secondary `info` describes with PSCI CPU_ON, its stacks from `stacks`, its GIC
/// interface `gic`, running `main` forever. Returns once it has reported in.
///
/// Call from the boot core after the final map is active and [`describe`] ran.
pub fn start(
    info: &'static CoreInfo,
    gic: Option<CpuInterface>,
    main: CoreMain,
) -> Result<Started, StartError> {
    let (mair, tcr, ttbr0, sctlr) = sysreg_regime();
    let percore: &'static PerCore = Box::leak(Box::new(PerCore::new(info)));
    let block: &'static BootBlock = Box::leak(Box::new(BootBlock {
        mair,
        tcr,
        ttbr0,
        sctlr,
        exc_top: info.exc_stack.1 as u64,
        stack_top: info.stack.1 as u64,
        percore: percore as *const PerCore as u64,
        info,
        gic,
        main: UnsafeCell::new(Some(main)),
        doorbell: UnsafeCell::new(None),
        gic_error: UnsafeCell::new(None),
        state: AtomicU32::new(STARTING),
    }));
    let addr = block as *const BootBlock as usize;
    clean_to_poc(addr, core::mem::size_of::<BootBlock>());
    fence(Ordering::Release);
    power::cpu_on(
        info.mpidr,
        keel_secondary_entry as *const () as usize as u64,
        addr as u64,
    )
    .map_err(StartError::Psci)?;
    let deadline = timer::counter().saturating_add(timer::ns_to_ticks(START_TIMEOUT_NS));
    loop {
        match block.state.load(Ordering::Acquire) {
            RUNNING => {
                // SAFETY: written by the secondary before its Release store of RUNNING,
                // which the Acquire load above saw; it never writes it again.
                let doorbell = unsafe { *block.doorbell.get() };
                return Ok(Started { info, doorbell });
            }
            GIC_FAILED => {
                // SAFETY: as above, published before GIC_FAILED.
                let e = unsafe { (*block.gic_error.get()).take() };
                return Err(StartError::Gic(e.unwrap_or(GicError::RedistributorLayout)));
            }
            _ if timer::counter() > deadline => return Err(StartError::Timeout),
            _ => core::hint::spin_loop(),
        }
    }
}

/// Called by entry.S on a secondary, on its own stacks with the MMU on and TPIDR_EL1 set.
#[unsafe(no_mangle)]
extern "C" fn keel_hal_secondary(block: usize, entry_el: u64) -> ! {
    // SAFETY: entry.S passes the context ID of CPU_ON: the address of the leaked boot block
    // `start` made for this core.
    let block: &'static BootBlock = unsafe { &*(block as *const BootBlock) };
    fence(Ordering::Acquire);
    timer::disarm_wakeup();
    let gic = match block.gic {
        // SAFETY: the boot core named this core's own interface, mapped as device memory; we
        // are that core and this runs once.
        Some(desc) => match unsafe { GicCpu::init(desc) } {
            Ok(mut g) => {
                let bell = g.enable_doorbell();
                // SAFETY: only this core writes `doorbell`, before publishing RUNNING.
                unsafe { *block.doorbell.get() = bell.ok() };
                Some(g)
            }
            Err(e) => {
                // SAFETY: only this core writes `gic_error`, before publishing GIC_FAILED.
                unsafe { *block.gic_error.get() = Some(e) };
                block.state.store(GIC_FAILED, Ordering::Release);
                park()
            }
        },
        None => None,
    };
    // SAFETY: the boot core wrote `main` before CPU_ON and never touches it again.
    let main = unsafe { (*block.main.get()).take() };
    block.state.store(RUNNING, Ordering::Release);
    if let Some(main) = main {
        main(CoreContext {
            info: block.info,
            gic,
            entry_el: entry_el as u8,
        });
    }
    park()
}

fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfe();
    }
}
