//! The Armv8.5 random number generator (FEAT_RNG): `RNDR` returns 64 bits from a
//! conditioned entropy source (Arm ARM D17.2.xx, RNDR; ID_AA64ISAR0_EL1.RNDR, bits 63:60).
//! QEMU's `-cpu max` implements it (from the host's getrandom).

use aarch64_cpu::registers::{ID_AA64ISAR0_EL1, Readable};

/// Whether this CPU implements RNDR (ID_AA64ISAR0_EL1.RNDR ≥ 1).
pub fn available() -> bool {
    (ID_AA64ISAR0_EL1.get() >> 60) & 0xf >= 1
}

/// 64 random bits, or `None` when the CPU has no RNDR or the generator could not deliver
/// in reasonable time (PSTATE.Z set: the architecture allows transient failures). Retries
/// a few times before giving up.
pub fn rndr() -> Option<u64> {
    if !available() {
        return None;
    }
    for _ in 0..16 {
        let value: u64;
        let failed: u64;
        // SAFETY: RNDR (S3_3_C2_C4_0) is implemented (checked above), is readable at EL1 and
        // EL0, and only writes the destination register and NZCV; CSET reads NZCV.
        unsafe {
            core::arch::asm!(
                "mrs {v}, s3_3_c2_c4_0",
                "cset {f}, eq",
                v = out(reg) value,
                f = out(reg) failed,
                options(nomem, nostack),
            );
        }
        if failed == 0 {
            return Some(value);
        }
    }
    None
}
