//! CPU identification: exception level, MIDR, and the ISA features the firmware cares about
//! (ID_AA64ISAR0_EL1, Arm ARM D19.2.61).

use aarch64_cpu::registers::{CurrentEL, ID_AA64ISAR0_EL1, MIDR_EL1, MPIDR_EL1, Readable};
use core::fmt;

/// The exception level the firmware runs at now.
pub fn current_el() -> u8 {
    CurrentEL.read(CurrentEL::EL) as u8
}

/// MIDR_EL1: implementer and part number.
pub fn midr() -> u64 {
    MIDR_EL1.get()
}

/// The affinity fields of MPIDR_EL1 of this core.
pub fn mpidr_affinity() -> u64 {
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

/// ISA features from ID_AA64ISAR0_EL1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// AES instructions (AESE, AESD, AESMC, AESIMC).
    pub aes: bool,
    /// PMULL/PMULL2 on 64-bit elements.
    pub pmull: bool,
    /// SHA-1 instructions.
    pub sha1: bool,
    /// SHA-256 instructions.
    pub sha2: bool,
    /// CRC32 and CRC32C instructions.
    pub crc32: bool,
    /// Large System Extensions atomics.
    pub atomics: bool,
    /// SHA-3 instructions.
    pub sha3: bool,
}

impl Features {
    /// Reads the features of the running CPU.
    pub fn read() -> Self {
        Self::from_isar0(ID_AA64ISAR0_EL1.get())
    }

    /// Decodes an ID_AA64ISAR0_EL1 value.
    pub fn from_isar0(v: u64) -> Self {
        let field = |shift: u32| (v >> shift) & 0xf;
        Self {
            aes: field(4) >= 1,
            pmull: field(4) >= 2,
            sha1: field(8) >= 1,
            sha2: field(12) >= 1,
            crc32: field(16) >= 1,
            atomics: field(20) >= 2,
            sha3: field(32) >= 1,
        }
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (self.aes, "aes"),
            (self.pmull, "pmull"),
            (self.sha1, "sha1"),
            (self.sha2, "sha2"),
            (self.sha3, "sha3"),
            (self.crc32, "crc32"),
            (self.atomics, "lse"),
        ];
        let mut first = true;
        for (_, name) in names.iter().filter(|(on, _)| *on) {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(name)?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}
