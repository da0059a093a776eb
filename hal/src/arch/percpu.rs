//! Per-core data through TPIDR_EL1 (Arm ARM D19.2.142: a software thread ID register of
//! EL1, unused by the hardware).
//!
//! Every core's TPIDR_EL1 holds the address of its own [`PerCore`] record, written once when
//! the core starts (the boot core in [`init_boot_core`], each secondary by its entry code
//! before any Rust runs) and never changed. Reading it is one `mrs`: [`index`] is two
//! instructions and takes no lock, so hot code (allocation counters, per-core statistics
//! slots) can afford it.
//!
//! - [`index`]: this core's index (0 = the boot core; secondaries 1.. in device tree order).
//! - [`info`] / [`cores`]: what every core is (MPIDR, stacks), read-only and shared.
//! - [`set_local`] / [`with_local`]: one typed per-core slot for the firmware's own per-core
//!   state (its poll loop's struct), reachable from deep code without passing it around.
//!   Only the owning core ever touches its slot, and a flag refuses re-entrant borrows, so
//!   the slot needs no lock and no `static mut`.

extern crate alloc;

use alloc::boxed::Box;
use core::any::Any;
use core::cell::RefCell;

pub use crate::MAX_CORES;

/// What a core is: fixed before it starts, then read-only (shared by every core).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreInfo {
    /// Index: 0 for the boot core, 1.. for the secondaries.
    pub index: usize,
    /// MPIDR_EL1 affinity fields (the device tree's `reg`).
    pub mpidr: u64,
    /// Main stack (SP_EL0), `bottom..top`, guard page excluded.
    pub stack: (usize, usize),
    /// Exception stack (SP_EL1), guard page excluded.
    pub exc_stack: (usize, usize),
}

/// A core's own record; TPIDR_EL1 points at it. Not `Sync`: only its core touches it.
#[derive(Debug)]
#[repr(C)]
pub struct PerCore {
    /// First field: [`index`] reads it with one load after the `mrs`.
    index: usize,
    info: &'static CoreInfo,
    local: RefCell<Option<Box<dyn Any>>>,
}

impl PerCore {
    /// A record for the core `info` describes, to be installed on that core.
    pub fn new(info: &'static CoreInfo) -> Self {
        Self {
            index: info.index,
            info,
            local: RefCell::new(None),
        }
    }
}

static CORES: spin::Once<&'static [CoreInfo]> = spin::Once::new();

/// Publishes the table of every core (once, on the boot core, before any secondary starts).
pub fn set_cores(cores: &'static [CoreInfo]) {
    CORES.call_once(|| cores);
}

/// Every core the firmware knows (empty before [`set_cores`]).
pub fn cores() -> &'static [CoreInfo] {
    CORES.get().copied().unwrap_or(&[])
}

fn record() -> *const PerCore {
    let p: usize;
    // SAFETY: reading TPIDR_EL1 has no side effects. entry.S zeroes it on the boot core and
    // secondary cores set it before any Rust code runs, so it is either 0 or a `PerCore`.
    unsafe {
        core::arch::asm!("mrs {}, tpidr_el1", out(reg) p, options(nomem, nostack, preserves_flags))
    };
    p as *const PerCore
}

/// This core's index: 0 on the boot core (also before [`init_boot_core`]), 1.. on the others.
#[inline]
pub fn index() -> usize {
    let p = record();
    if p.is_null() {
        0
    } else {
        // SAFETY: a non-null TPIDR_EL1 is this core's leaked, never-freed `PerCore`.
        unsafe { (*p).index }
    }
}

/// This core's description, once per-core data is set up on it.
pub fn info() -> Option<&'static CoreInfo> {
    let p = record();
    // SAFETY: as in `index`.
    (!p.is_null()).then(|| unsafe { (*p).info })
}

/// Installs the boot core's record (once, on the boot core, after the heap is up).
pub fn init_boot_core(info: &'static CoreInfo) {
    if !record().is_null() {
        return;
    }
    let rec: &'static PerCore = Box::leak(Box::new(PerCore::new(info)));
    // SAFETY: the record is leaked, so it lives as long as the core; TPIDR_EL1 is ours.
    unsafe { set_tpidr(rec) };
}

/// Points TPIDR_EL1 of the running core at `rec`.
///
/// # Safety
/// `rec` must be this core's record and never be freed; call before anything reads it.
pub(crate) unsafe fn set_tpidr(rec: &'static PerCore) {
    // SAFETY: guaranteed by the caller; writing TPIDR_EL1 affects only `record()`.
    unsafe {
        core::arch::asm!("msr tpidr_el1, {}", in(reg) rec as *const PerCore as usize, options(nostack, preserves_flags))
    };
}

/// Why [`set_local`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalError {
    /// Per-core data is not set up on this core yet.
    NoRecord,
    /// This core's slot is in use (borrowed by [`with_local`]).
    Busy,
}

/// Puts this core's per-core state in its slot (replacing what was there).
pub fn set_local<T: 'static>(value: T) -> Result<(), LocalError> {
    let p = record();
    if p.is_null() {
        return Err(LocalError::NoRecord);
    }
    // SAFETY: as in `index`; only this core reaches its record, so the `RefCell` and `Cell`
    // are never used from two cores.
    let rec = unsafe { &*p };
    let mut slot = rec.local.try_borrow_mut().map_err(|_| LocalError::Busy)?;
    *slot = Some(Box::new(value));
    Ok(())
}

/// Runs `f` on this core's per-core state of type `T`; `None` if the slot is empty, holds
/// another type, or is already borrowed (a re-entrant call).
pub fn with_local<T: 'static, R>(f: impl FnOnce(&mut T) -> R) -> Option<R> {
    let p = record();
    if p.is_null() {
        return None;
    }
    // SAFETY: as in `set_local`.
    let rec = unsafe { &*p };
    let mut slot = rec.local.try_borrow_mut().ok()?;
    let value = slot.as_mut()?.downcast_mut::<T>()?;
    Some(f(value))
}
