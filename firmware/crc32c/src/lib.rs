//! CRC32C (Castagnoli, reflected polynomial `0x82F63B78`), as used for the NVMe/TCP header and
//! data digests (NVMe/TCP 1.0 §3.6.1.3: "CRC32C ... initial value `FFFFFFFFh`, final XOR
//! `FFFFFFFFh`", transmitted little-endian).
//!
//! Two implementations share one streaming API:
//! * a portable slicing-by-8 table implementation (8 × 256 `u32` tables built at compile time);
//! * the Armv8 `CRC32CX`/`CRC32CB` instructions, selected at compile time when building for
//!   `aarch64` with `target_feature = "crc"` (e.g. `-C target-feature=+crc`). This is the only
//!   module of the crate allowed to contain `unsafe`; [`set_hardware`] lets the firmware fall
//!   back to the tables on a CPU without the instructions.
//!
//! The streaming state is the *un-inverted* register: start with [`Crc32c::new`], feed pieces
//! with [`Crc32c::update`], finish with [`Crc32c::finish`]. [`copy_and_crc`] copies and digests
//! in a single pass over the source, which is how payload bytes move between the wire and the
//! application's buffers.
//!
//! Used by `keel-nvmf-tcp` (digests, re-exported as `keel_nvmf_tcp::crc32c`) and
//! `keel-provision` (configuration copies and the identity block).

#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

/// Reflected CRC32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// Slicing-by-8 tables; `TABLES[0]` is the classic byte-wise table.
static TABLES: [[u32; 256]; 8] = build_tables();

const fn build_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            k += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

/// Portable slicing-by-8 update of the raw (un-inverted) register.
pub fn update_sw(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = TABLES[7][(lo & 0xFF) as usize]
            ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xFF) as usize]
            ^ TABLES[2][((hi >> 8) & 0xFF) as usize]
            ^ TABLES[1][((hi >> 16) & 0xFF) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLES[0][((crc ^ b as u32) & 0xFF) as usize];
    }
    crc
}

#[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
#[allow(unsafe_code)]
mod hw {
    use core::arch::aarch64::{__crc32cb, __crc32cd};

    /// Armv8 CRC32C instructions, 8 bytes per step.
    pub fn update(mut crc: u32, data: &[u8]) -> u32 {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            // SAFETY: this module is only compiled when the `crc` target feature is enabled
            // (cfg above) and only called while `HARDWARE` is true: the firmware clears it at
            // boot on a CPU whose ID_AA64ISAR0_EL1 lacks CRC32, so the instruction exists
            // whenever it runs; the intrinsic takes values, not pointers.
            crc = unsafe { __crc32cd(crc, v) };
        }
        for &b in chunks.remainder() {
            // SAFETY: as above.
            crc = unsafe { __crc32cb(crc, b) };
        }
        crc
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
static HARDWARE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Chooses the implementation at run time: the firmware passes whether the CPU has the
/// CRC32 instructions (ID_AA64ISAR0_EL1.CRC32). Without them compiled in, this does nothing.
pub fn set_hardware(available: bool) {
    #[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
    HARDWARE.store(available, core::sync::atomic::Ordering::Relaxed);
    let _ = available;
}

/// Whether the CRC32C instructions are in use.
pub fn hardware() -> bool {
    #[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
    {
        HARDWARE.load(core::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(all(target_arch = "aarch64", target_feature = "crc")))]
    {
        false
    }
}

/// Update the raw register with the fastest implementation available.
#[inline]
pub fn update_raw(crc: u32, data: &[u8]) -> u32 {
    #[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
    if HARDWARE.load(core::sync::atomic::Ordering::Relaxed) {
        return hw::update(crc, data);
    }
    update_sw(crc, data)
}

/// Streaming CRC32C state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// Fresh state (register seeded with `!0`).
    pub const fn new() -> Self {
        Crc32c(!0)
    }
    /// Feed one piece of the message.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.0 = update_raw(self.0, data);
    }
    /// The digest of everything fed so far (final inversion applied; the state is unchanged).
    #[inline]
    pub const fn finish(&self) -> u32 {
        !self.0
    }
}

/// One-shot CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}

/// Copy `src` into the front of `dst` and fold the copied bytes into `state`, in one pass over
/// the data (in cache-sized blocks: each block is digested while still hot from the copy).
/// Copies `min(dst.len(), src.len())` bytes and returns that count.
pub fn copy_and_crc(dst: &mut [u8], src: &[u8], state: &mut Crc32c) -> usize {
    const BLOCK: usize = 256;
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        d.copy_from_slice(s);
        state.update(d);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3720_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let asc: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(crc32c(&asc), 0x46DD_794E);
        let desc: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
        assert_eq!(crc32c(&desc), 0x113F_DB5C);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn streaming_equals_one_shot_and_bytewise() {
        let data: [u8; 1000] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let one = crc32c(&data);
        for cut in [0, 1, 3, 7, 8, 9, 63, 500, 999, 1000] {
            let mut s = Crc32c::new();
            s.update(&data[..cut]);
            s.update(&data[cut..]);
            assert_eq!(s.finish(), one);
        }
        let mut bytewise = !0u32;
        for &b in &data {
            bytewise = (bytewise >> 8) ^ TABLES[0][((bytewise ^ b as u32) & 0xFF) as usize];
        }
        assert_eq!(!bytewise, one);
    }

    #[test]
    fn copy_and_crc_copies_and_digests() {
        let src: [u8; 777] = core::array::from_fn(|i| (i * 31) as u8);
        let mut dst = [0u8; 800];
        let mut st = Crc32c::new();
        assert_eq!(copy_and_crc(&mut dst, &src, &mut st), 777);
        assert_eq!(&dst[..777], &src[..]);
        assert_eq!(st.finish(), crc32c(&src));
        let mut small = [0u8; 5];
        let mut st = Crc32c::new();
        assert_eq!(copy_and_crc(&mut small, &src, &mut st), 5);
        assert_eq!(st.finish(), crc32c(&src[..5]));
    }
}
