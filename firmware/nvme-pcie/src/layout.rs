//! The window: one shared-memory file per emulated function, seen by the firmware through an
//! `ivshmem-plain` BAR and by `keelctl host` through `mmap`. Both sides use these constants.
//!
//! ```text
//! 0x0000..0x1000  NVMe BAR0 registers as the host sees them (NVMe base 2.0 §3.1.3, Figure 35):
//!                 CAP 0x00 (8), VS 0x08, INTMS 0x0C, INTMC 0x10, CC 0x14, CSTS 0x1C,
//!                 NSSR 0x20, AQA 0x24, ASQ 0x28 (8), ACQ 0x30 (8). Little endian.
//!                 The host writes CC, AQA, ASQ, ACQ (and INTMS/INTMC/NSSR, ignored); the
//!                 function writes CAP, VS and CSTS.
//! 0x1000..0x2000  doorbells, stride 4 bytes (CAP.DSTRD = 0, §3.1.3.25-26): SQ y tail at
//!                 0x1000 + 8y, CQ y head at 0x1000 + 8y + 4. Written by the host only.
//! 0x2000..0x3000  interrupt area: one little-endian u32 counter per vector at 0x2000 + 4v
//!                 (1024 vectors at most). The function increments a vector's counter
//!                 (wrapping) for every interrupt; the host polls it, or sleeps until an
//!                 `ivshmem-doorbell` rings it (see [`interrupt_target`]).
//! 0x3000..0x3040  header (written by the function's side at start): magic, version, sizes
//!                 (see [`header`]). The host waits for the magic before touching registers.
//! 0x3040..0x3044  interrupt target (written by the host, read by the function): where the
//!                 function also rings the host's interrupt vectors through an ivshmem
//!                 doorbell (see [`interrupt_target`]); 0 = the host polls the counters.
//! 0x3044..0x10000 reserved (zero).
//! 0x10000..size   host memory: the host's queues, PRP lists and data buffers.
//! ```
//!
//! # Host addresses
//!
//! Every address the host puts in ASQ, ACQ, PRP1/PRP2, PRP list entries and Create I/O
//! SQ/CQ is a *host address*: `HOST_BASE + offset into the window`. With `HOST_BASE = 0` a host
//! address is simply a byte offset in the file. Only `[HOST_AREA_OFFSET, size)` is reachable
//! by DMA; anything else (the register pages, beyond the end, an overflowing range) is refused
//! by the endpoint's DMA routine with [`crate::DmaError`]. The memory page size is 4 KiB
//! (CAP.MPSMIN = CAP.MPSMAX = 0), so page-aligned means 4 KiB aligned *as a host address*.

/// Host address of window offset 0.
pub const HOST_BASE: u64 = 0;
/// Size of the register page.
pub const REGS_SIZE: usize = 0x1000;
/// Offset of the doorbell page.
pub const DOORBELL_OFFSET: usize = 0x1000;
/// Doorbell stride in bytes (CAP.DSTRD = 0).
pub const DOORBELL_STRIDE: usize = 4;
/// Number of doorbell registers in the doorbell page (SQ tail + CQ head per queue).
pub const DOORBELLS: usize = 0x1000 / DOORBELL_STRIDE;
/// Largest queue identifier the doorbell page can serve.
pub const MAX_QID: u16 = (DOORBELLS / 2 - 1) as u16;
/// Offset of the interrupt area.
pub const INTERRUPT_OFFSET: usize = 0x2000;
/// Number of interrupt vectors (u32 counters) in the interrupt area.
pub const MAX_VECTORS: u16 = 1024;
/// Offset of the header.
pub const HEADER_OFFSET: usize = 0x3000;
/// Offset of the interrupt target word (see [`interrupt_target`]).
pub const INTERRUPT_TARGET_OFFSET: usize = 0x3040;
/// Offset of the host memory area.
pub const HOST_AREA_OFFSET: usize = 0x10000;
/// Smallest usable window (the fixed pages plus 64 KiB of host memory).
pub const MIN_WINDOW_SIZE: usize = HOST_AREA_OFFSET + 0x10000;
/// Memory page size (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

/// Doorbell index of SQ `qid`'s tail doorbell (offset `DOORBELL_OFFSET + 4 * index`).
pub const fn sq_tail_doorbell(qid: u16) -> u16 {
    qid * 2
}

/// Doorbell index of CQ `qid`'s head doorbell.
pub const fn cq_head_doorbell(qid: u16) -> u16 {
    qid * 2 + 1
}

/// Window offset of doorbell `index`.
pub const fn doorbell_offset(index: u16) -> usize {
    DOORBELL_OFFSET + index as usize * DOORBELL_STRIDE
}

/// Window offset of interrupt vector `v`'s counter.
pub const fn interrupt_offset(v: u16) -> usize {
    INTERRUPT_OFFSET + v as usize * 4
}

/// The interrupt target word at [`INTERRUPT_TARGET_OFFSET`]: a host that is a peer of the
/// same ivshmem server as the function's endpoint (QEMU `ivshmem-doorbell`) writes its peer
/// ID there, and the function then also rings that peer's vector (BAR0 Doorbell register,
/// `peer << 16 | vector`) for every interrupt, besides incrementing the vector's counter.
/// The function only sees its BARs, so the host says who it is through the window. Zero (the
/// word as the function clears it, and what a host that polls leaves) means no doorbell.
///
/// ```text
/// bit 31      valid
/// bits 30..16 zero
/// bits 15..0  the host's ivshmem peer ID
/// ```
pub mod interrupt_target {
    /// Bit 31: the word names a peer.
    pub const VALID: u32 = 1 << 31;

    /// The word naming `peer`.
    pub const fn encode(peer: u16) -> u32 {
        VALID | peer as u32
    }

    /// The peer a word names, if it is valid (bit 31 set, bits 30..16 zero); anything else
    /// (zero, or garbage) names none.
    pub const fn decode(word: u32) -> Option<u16> {
        if word & 0xFFFF_0000 == VALID {
            Some(word as u16)
        } else {
            None
        }
    }
}

/// The header at [`HEADER_OFFSET`] (all fields little endian).
pub mod header {
    /// "KEELNVMW" as a little-endian u64 at offset 0.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"KEELNVMW");
    /// Layout version (u32 at offset 8).
    pub const VERSION: u32 = 1;
    /// Field offsets inside the header.
    pub mod field {
        /// u64 magic.
        pub const MAGIC: usize = 0;
        /// u32 layout version.
        pub const VERSION: usize = 8;
        /// u32 header size in bytes.
        pub const HEADER_SIZE: usize = 12;
        /// u64 window size in bytes.
        pub const WINDOW_SIZE: usize = 16;
        /// u64 offset of the host memory area.
        pub const HOST_AREA_OFFSET: usize = 24;
        /// u64 host address of window offset 0.
        pub const HOST_BASE: usize = 32;
        /// u16 number of interrupt vectors.
        pub const VECTORS: usize = 40;
        /// u16 function index (which `--window` of the firmware this is, 0-based).
        pub const FUNCTION: usize = 42;
    }
    /// Header size.
    pub const SIZE: usize = 64;
}

/// What a header says, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Window size in bytes.
    pub window_size: u64,
    /// Offset of the host memory area.
    pub host_area_offset: u64,
    /// Host address of offset 0.
    pub host_base: u64,
    /// Interrupt vectors.
    pub vectors: u16,
    /// Function index.
    pub function: u16,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// No magic yet (the firmware has not initialised the window) or a foreign file.
    NoMagic,
    /// Another layout version.
    Version(u32),
    /// Sizes inconsistent with the file or with this layout.
    BadSize,
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HeaderError::NoMagic => f.write_str("no Keel window magic (function not started?)"),
            HeaderError::Version(v) => write!(f, "window layout version {v}, expected 1"),
            HeaderError::BadSize => f.write_str("window sizes inconsistent"),
        }
    }
}

impl Header {
    /// The header of a window of `window_size` bytes with this layout.
    pub const fn new(window_size: u64, function: u16) -> Self {
        Self {
            window_size,
            host_area_offset: HOST_AREA_OFFSET as u64,
            host_base: HOST_BASE,
            vectors: MAX_VECTORS,
            function,
        }
    }

    /// Encodes the 64 header bytes.
    pub fn encode(&self) -> [u8; header::SIZE] {
        use header::field::*;
        let mut b = [0u8; header::SIZE];
        b[MAGIC..MAGIC + 8].copy_from_slice(&header::MAGIC.to_le_bytes());
        b[VERSION..VERSION + 4].copy_from_slice(&header::VERSION.to_le_bytes());
        b[HEADER_SIZE..HEADER_SIZE + 4].copy_from_slice(&(header::SIZE as u32).to_le_bytes());
        b[WINDOW_SIZE..WINDOW_SIZE + 8].copy_from_slice(&self.window_size.to_le_bytes());
        b[HOST_AREA_OFFSET..HOST_AREA_OFFSET + 8]
            .copy_from_slice(&self.host_area_offset.to_le_bytes());
        b[HOST_BASE..HOST_BASE + 8].copy_from_slice(&self.host_base.to_le_bytes());
        b[VECTORS..VECTORS + 2].copy_from_slice(&self.vectors.to_le_bytes());
        b[FUNCTION..FUNCTION + 2].copy_from_slice(&self.function.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the real size of the mapping.
    pub fn decode(b: &[u8; header::SIZE], mapped_size: u64) -> Result<Self, HeaderError> {
        use header::field::*;
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        if u64_at(MAGIC) != header::MAGIC {
            return Err(HeaderError::NoMagic);
        }
        let v = u32_at(VERSION);
        if v != header::VERSION {
            return Err(HeaderError::Version(v));
        }
        let h = Self {
            window_size: u64_at(WINDOW_SIZE),
            host_area_offset: u64_at(HOST_AREA_OFFSET),
            host_base: u64_at(HOST_BASE),
            vectors: u16_at(VECTORS),
            function: u16_at(FUNCTION),
        };
        if h.window_size > mapped_size
            || h.window_size < MIN_WINDOW_SIZE as u64
            || h.host_area_offset != crate::layout::HOST_AREA_OFFSET as u64
            || h.host_base != crate::layout::HOST_BASE
            || h.vectors == 0
            || h.vectors > MAX_VECTORS
        {
            return Err(HeaderError::BadSize);
        }
        Ok(h)
    }
}

/// Host addresses reachable by DMA in a window of `window_size` bytes.
pub const fn host_area(window_size: u64) -> core::ops::Range<u64> {
    HOST_BASE + HOST_AREA_OFFSET as u64..HOST_BASE + window_size
}

/// The window offset of `len` bytes at host address `addr`, if they lie entirely inside the
/// host memory area of a window of `window_size` bytes (never panics, never overflows).
pub fn translate(addr: u64, len: usize, window_size: u64) -> Option<usize> {
    let area = host_area(window_size);
    let end = addr.checked_add(len as u64)?;
    if addr < area.start || end > area.end {
        return None;
    }
    usize::try_from(addr - HOST_BASE).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(doorbell_offset(sq_tail_doorbell(0)), 0x1000);
        assert_eq!(doorbell_offset(cq_head_doorbell(0)), 0x1004);
        assert_eq!(doorbell_offset(sq_tail_doorbell(1)), 0x1008);
        assert_eq!(doorbell_offset(cq_head_doorbell(MAX_QID)), 0x1FFC);
        assert_eq!(interrupt_offset(MAX_VECTORS - 1), 0x2FFC);
    }

    #[test]
    fn interrupt_target_words() {
        assert_eq!(INTERRUPT_TARGET_OFFSET, HEADER_OFFSET + header::SIZE);
        assert_eq!(interrupt_target::encode(0), 0x8000_0000);
        assert_eq!(interrupt_target::encode(0x1234), 0x8000_1234);
        assert_eq!(interrupt_target::decode(0x8000_0000), Some(0));
        assert_eq!(interrupt_target::decode(0x8000_ffff), Some(0xffff));
        assert_eq!(interrupt_target::decode(0), None);
        assert_eq!(interrupt_target::decode(0x0000_0001), None);
        assert_eq!(interrupt_target::decode(0x8001_0001), None);
        assert_eq!(interrupt_target::decode(u32::MAX), None);
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let h = Header::new(1 << 20, 1);
        let b = h.encode();
        assert_eq!(Header::decode(&b, 1 << 20), Ok(h));
        assert_eq!(Header::decode(&b, 1 << 19), Err(HeaderError::BadSize));
        assert_eq!(Header::decode(&[0; 64], 1 << 20), Err(HeaderError::NoMagic));
        let mut v = b;
        v[8] = 2;
        assert_eq!(Header::decode(&v, 1 << 20), Err(HeaderError::Version(2)));
    }

    #[test]
    fn translate_bounds() {
        let size = 0x20000;
        assert_eq!(translate(0x10000, 16, size), Some(0x10000));
        assert_eq!(translate(0x1FFF0, 16, size), Some(0x1FFF0));
        assert_eq!(translate(0x1FFF1, 16, size), None);
        assert_eq!(translate(0xFFFF, 1, size), None);
        assert_eq!(translate(0, 0, size), None);
        assert_eq!(translate(u64::MAX - 3, 16, size), None);
        assert_eq!(translate(0x20000, 0, size), Some(0x20000));
    }
}
