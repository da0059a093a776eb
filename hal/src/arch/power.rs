//! Power control through PSCI (Arm DEN 0022: §5.6 CPU_ON, §5.10 SYSTEM_OFF, §5.11
//! SYSTEM_RESET), and the semihosting exit a test build uses to hand QEMU its pass/fail code.

use core::sync::atomic::{AtomicU8, Ordering};
use smccc::{Hvc, Smc, psci};

/// How PSCI calls reach the firmware below us (device tree `/psci` `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// HVC: PSCI is implemented at EL2 (QEMU without EL2 emulation).
    Hvc,
    /// SMC: PSCI is implemented at EL3 (or QEMU with virtualization enabled).
    Smc,
}

const NONE: u8 = 0;
const HVC: u8 = 1;
const SMC: u8 = 2;
static CONDUIT: AtomicU8 = AtomicU8::new(NONE);

/// Records the PSCI conduit the device tree named.
pub fn set_conduit(c: Conduit) {
    CONDUIT.store(if c == Conduit::Hvc { HVC } else { SMC }, Ordering::Relaxed);
}

fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfe();
    }
}

/// Why PSCI did not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciError {
    /// The device tree names no PSCI conduit.
    NoConduit,
    /// The PSCI implementation refused (its error code).
    Refused(psci::Error),
}

impl core::fmt::Display for PsciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoConduit => f.write_str("no PSCI conduit in the device tree"),
            Self::Refused(e) => write!(f, "PSCI: {e}"),
        }
    }
}

/// PSCI CPU_ON (64-bit): starts the core with affinity `mpidr` at physical address `entry`
/// with `context` in x0, MMU and caches off, at the highest non-secure exception level
/// (EL2 when the hypervisor level exists, else EL1).
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), PsciError> {
    match CONDUIT.load(Ordering::Relaxed) {
        HVC => psci::cpu_on::<Hvc>(mpidr, entry, context),
        SMC => psci::cpu_on::<Smc>(mpidr, entry, context),
        _ => return Err(PsciError::NoConduit),
    }
    .map_err(PsciError::Refused)
}

/// Turns the system off; never returns (parks the core if PSCI is missing or fails).
pub fn system_off() -> ! {
    let _ = match CONDUIT.load(Ordering::Relaxed) {
        HVC => psci::system_off::<Hvc>(),
        SMC => psci::system_off::<Smc>(),
        _ => Ok(()),
    };
    park()
}

/// Resets the system; never returns.
pub fn system_reset() -> ! {
    let _ = match CONDUIT.load(Ordering::Relaxed) {
        HVC => psci::system_reset::<Hvc>(),
        SMC => psci::system_reset::<Smc>(),
        _ => Ok(()),
    };
    park()
}

/// Ends a QEMU run with `code` as QEMU's exit status through Arm semihosting SYS_EXIT
/// (QEMU needs `-semihosting-config enable=on`). Only test builds call this: on a board
/// without a debugger attached the HLT would be an undefined instruction.
pub fn semihosting_exit(code: u32) -> ! {
    const SYS_EXIT: u64 = 0x18;
    const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;
    let block = [ADP_STOPPED_APPLICATION_EXIT, u64::from(code)];
    // SAFETY: the semihosting call reads the two-word block we pass and ends the program;
    // it touches no other memory.
    unsafe {
        core::arch::asm!(
            "hlt #0xf000",
            in("x0") SYS_EXIT,
            in("x1") block.as_ptr(),
            options(nostack, readonly)
        );
    }
    park()
}

/// How the firmware ends after a fatal error or when asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// PSCI SYSTEM_OFF.
    PowerOff,
    /// PSCI SYSTEM_RESET.
    Reset,
    /// Semihosting exit with the given code (test builds under QEMU).
    QemuExit,
}

static ON_FATAL: AtomicU8 = AtomicU8::new(0);

/// Chooses what [`fatal`] does.
pub fn set_fatal_ending(e: Ending) {
    ON_FATAL.store(e as u8, Ordering::Relaxed);
}

/// Ends the firmware after a fatal error; `code` becomes QEMU's exit status in test builds.
///
/// A fault while ending (for example semihosting without a debugger) parks the core instead
/// of looping through the crash report.
pub fn fatal(code: u32) -> ! {
    static ENDING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    if ENDING.swap(true, Ordering::AcqRel) {
        park();
    }
    match ON_FATAL.load(Ordering::Relaxed) {
        x if x == Ending::Reset as u8 => system_reset(),
        x if x == Ending::QemuExit as u8 => semihosting_exit(code),
        _ => system_off(),
    }
}
