//! CFI NOR flash with the Intel/Sharp command set (primary vendor command set 0x0001), as
//! QEMU's `cfi.pflash01` implements it for the `virt` machine's two 64 MiB banks: a 32-bit
//! bank of two interleaved 16-bit devices, 256 KiB erase blocks.
//!
//! Commands are written to any address in the block they concern, replicated on both 16-bit
//! lanes (`0x00XX00XX`); status is read back the same way, one status register per lane.
//! References: Intel "Common Flash Interface (CFI) and Command Sets" (AP-646), Intel StrataFlash
//! command definitions (Read Array 0xFF, Read Status 0x70, Clear Status 0x50, Block Erase
//! 0x20/0xD0, Word Program 0x40).
//!
//! The bank is mapped as Device memory (writes reach the chip in order and are never merged,
//! which the command sequences need), so every access is an aligned 32-bit volatile access:
//! Device memory faults on unaligned accesses, and reads copy into a caller's buffer.
//! Errors are returned, never panicked on: a status error, a timeout, or an out-of-range or
//! misaligned request.

use core::fmt;

/// Status register bits (per lane).
mod sr {
    /// Write state machine ready.
    pub const READY: u32 = 1 << 7;
    /// Erase error.
    pub const ERASE_ERROR: u32 = 1 << 5;
    /// Program error.
    pub const PROGRAM_ERROR: u32 = 1 << 4;
    /// Programming voltage low.
    pub const VPP_LOW: u32 = 1 << 3;
    /// Block locked.
    pub const LOCKED: u32 = 1 << 1;
}

/// Commands (replicated on both lanes when written).
mod cmd {
    pub const READ_ARRAY: u32 = 0xFF;
    pub const READ_STATUS: u32 = 0x70;
    pub const CLEAR_STATUS: u32 = 0x50;
    pub const BLOCK_ERASE: u32 = 0x20;
    pub const CONFIRM: u32 = 0xD0;
    pub const WORD_PROGRAM: u32 = 0x40;
}

const fn both_lanes(c: u32) -> u32 {
    c | (c << 16)
}

/// Why a flash operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashError {
    /// Offset or length outside the bank, or not aligned as the operation needs.
    OutOfRange {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
    },
    /// The chip did not become ready in time.
    Timeout {
        /// Offset of the operation.
        offset: usize,
    },
    /// The chip reported an error (status register, both lanes).
    Status {
        /// Offset of the operation.
        offset: usize,
        /// The status word read.
        status: u32,
    },
    /// What was programmed does not read back.
    Verify {
        /// First offset that differs.
        offset: usize,
    },
}

impl fmt::Display for FlashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FlashError::OutOfRange { offset, len } => {
                write!(
                    f,
                    "flash: {len} bytes at {offset:#x} out of range or misaligned"
                )
            }
            FlashError::Timeout { offset } => write!(f, "flash: timeout at {offset:#x}"),
            FlashError::Status { offset, status } => {
                let lanes = status | (status >> 16);
                write!(f, "flash: error at {offset:#x} (status {status:#010x}:")?;
                for (bit, name) in [
                    (sr::ERASE_ERROR, " erase error"),
                    (sr::PROGRAM_ERROR, " program error"),
                    (sr::VPP_LOW, " VPP low"),
                    (sr::LOCKED, " block locked"),
                ] {
                    if lanes & bit != 0 {
                        f.write_str(name)?;
                    }
                }
                f.write_str(")")
            }
            FlashError::Verify { offset } => {
                write!(f, "flash: read-back differs at {offset:#x}")
            }
        }
    }
}

/// How long one word program or block erase may take before it counts as failed: status
/// polls (QEMU completes them at once; real parts take microseconds to about a second).
const PROGRAM_POLLS: u32 = 1_000_000;
const ERASE_POLLS: u32 = 50_000_000;

/// A CFI flash bank (Intel command set, 32-bit wide).
#[derive(Debug)]
pub struct CfiFlash {
    base: usize,
    size: usize,
    sector: usize,
}

impl CfiFlash {
    /// A driver for the bank at `base` of `size` bytes with erase blocks of `sector` bytes.
    ///
    /// # Safety
    /// `base..base + size` must be a CFI flash bank (Intel command set, 32-bit bus) mapped as
    /// Device memory, driven by nothing else while this value lives (code must not execute
    /// from it while a command is in progress).
    pub unsafe fn new(base: usize, size: usize, sector: usize) -> Self {
        Self { base, size, sector }
    }

    /// Size of the bank.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Size of an erase block.
    pub fn sector_size(&self) -> usize {
        self.sector
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<(), FlashError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size)
            || !offset.is_multiple_of(align)
            || !len.is_multiple_of(align)
        {
            return Err(FlashError::OutOfRange { offset, len });
        }
        Ok(())
    }

    fn write32(&mut self, offset: usize, v: u32) {
        // SAFETY: callers check `offset` is 4-byte aligned and inside the bank, which `new`'s
        // contract says is flash mapped as Device memory and ours alone.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, v) }
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: as in `write32`.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    /// Returns the bank to read-array mode (after a command, or if another agent left it in
    /// another mode).
    pub fn read_array(&mut self) {
        self.write32(0, both_lanes(cmd::READ_ARRAY));
    }

    /// Copies `buf.len()` bytes from `offset` (any alignment; reads are aligned words).
    pub fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), FlashError> {
        self.check(offset, buf.len(), 1)?;
        self.read_array();
        let mut i = 0;
        while i < buf.len() {
            let at = offset + i;
            let word = self.read32(at & !3).to_le_bytes();
            let skip = at & 3;
            let n = (4 - skip).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[skip..skip + n]);
            i += n;
        }
        Ok(())
    }

    /// Waits for the write state machine at `offset`; on error clears the status and
    /// returns it. Leaves the bank in read-array mode.
    fn wait(&mut self, offset: usize, polls: u32) -> Result<(), FlashError> {
        let ready = both_lanes(sr::READY);
        let errors = both_lanes(sr::ERASE_ERROR | sr::PROGRAM_ERROR | sr::VPP_LOW | sr::LOCKED);
        for _ in 0..polls {
            self.write32(offset, both_lanes(cmd::READ_STATUS));
            let status = self.read32(offset);
            if status & ready == ready {
                if status & errors != 0 {
                    self.write32(offset, both_lanes(cmd::CLEAR_STATUS));
                    self.read_array();
                    return Err(FlashError::Status { offset, status });
                }
                self.read_array();
                return Ok(());
            }
            core::hint::spin_loop();
        }
        self.read_array();
        Err(FlashError::Timeout { offset })
    }

    /// Erases the blocks covering `offset..offset + len` (both multiples of the block size).
    pub fn erase(&mut self, offset: usize, len: usize) -> Result<(), FlashError> {
        self.check(offset, len, self.sector)?;
        let mut at = offset;
        while at < offset + len {
            self.write32(at, both_lanes(cmd::CLEAR_STATUS));
            self.write32(at, both_lanes(cmd::BLOCK_ERASE));
            self.write32(at, both_lanes(cmd::CONFIRM));
            self.wait(at, ERASE_POLLS)?;
            at += self.sector;
        }
        Ok(())
    }

    /// Programs `data` at `offset` (4-byte aligned; the tail is padded with 0xFF, which
    /// leaves erased bytes as they are) one 32-bit word at a time, then reads it back. The
    /// range must have been erased.
    pub fn program(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        self.check(offset, data.len().next_multiple_of(4), 4)?;
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut w = [0xffu8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            let word = u32::from_le_bytes(w);
            if word == u32::MAX {
                continue;
            }
            let at = offset + 4 * i;
            self.write32(at, both_lanes(cmd::WORD_PROGRAM));
            self.write32(at, word);
            self.wait(at, PROGRAM_POLLS)?;
        }
        self.read_array();
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i;
            let got = self.read32(at).to_le_bytes();
            if got[..chunk.len()] != *chunk {
                return Err(FlashError::Verify { offset: at });
            }
        }
        Ok(())
    }
}
