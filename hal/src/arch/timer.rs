//! Generic timer (Arm ARM D11): the monotonic clock of the poll loop and an embedded-hal
//! `DelayNs`.

use aarch64_cpu::registers::{
    CNTFRQ_EL0, CNTP_CTL_EL0, CNTP_CVAL_EL0, CNTPCT_EL0, Readable, Writeable,
};
use core::sync::atomic::{AtomicU64, Ordering};

static FREQ_HZ: AtomicU64 = AtomicU64::new(0);

/// The physical counter (counts from reset on QEMU and on most boards).
#[inline]
pub fn counter() -> u64 {
    // An ISB orders the read after earlier instructions (Arm ARM D11.2.2).
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    CNTPCT_EL0.get()
}

/// Sets the counter frequency: from the device tree's `clock-frequency` when it has one,
/// otherwise from CNTFRQ_EL0 as firmware left it.
pub fn init(dt_frequency: Option<u32>) -> u64 {
    let hz = match dt_frequency {
        Some(hz) if hz > 0 => u64::from(hz),
        _ => CNTFRQ_EL0.get() & 0xffff_ffff,
    };
    let hz = if hz == 0 { 62_500_000 } else { hz };
    FREQ_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// Counter frequency in Hz.
pub fn frequency() -> u64 {
    match FREQ_HZ.load(Ordering::Relaxed) {
        0 => init(None),
        hz => hz,
    }
}

/// Converts counter ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(frequency())) as u64
}

/// Converts nanoseconds to counter ticks (rounded up).
pub fn ns_to_ticks(ns: u64) -> u64 {
    let hz = u128::from(frequency());
    (u128::from(ns) * hz).div_ceil(1_000_000_000) as u64
}

/// Nanoseconds since reset.
pub fn now_ns() -> u64 {
    ticks_to_ns(counter())
}

/// Busy-wait delays on the generic timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delay;

impl embedded_hal::delay::DelayNs for Delay {
    fn delay_ns(&mut self, ns: u32) {
        let end = counter().saturating_add(ns_to_ticks(u64::from(ns)));
        while counter() < end {
            core::hint::spin_loop();
        }
    }
}

/// Arms the EL1 physical timer to fire (raise its interrupt) at counter value `deadline`.
/// Used only to end a WFI: the interrupt stays masked at the CPU.
pub fn arm_wakeup(deadline: u64) {
    CNTP_CVAL_EL0.set(deadline);
    CNTP_CTL_EL0.write(CNTP_CTL_EL0::ENABLE::SET + CNTP_CTL_EL0::IMASK::CLEAR);
}

/// Stops the wake-up timer (its interrupt line drops).
pub fn disarm_wakeup() {
    CNTP_CTL_EL0.write(CNTP_CTL_EL0::ENABLE::CLEAR + CNTP_CTL_EL0::IMASK::SET);
}

/// Waits for an interrupt (or any wake-up event). Interrupts stay masked; a pending one ends
/// the wait without being taken.
pub fn wait_for_interrupt() {
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
    aarch64_cpu::asm::wfi();
}
