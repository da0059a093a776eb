//! The emulated NVMe function's endpoint on QEMU: an `ivshmem-plain` PCI device (Red Hat
//! 1af4:1110) whose BAR2 is memory shared with a host process (`keelctl host`). The window
//! layout is `keel_nvme_pcie::layout`: the NVMe register page, doorbells, an interrupt area, a
//! header, then the host's memory. A real DPU's PCIe endpoint controller is another
//! implementation of the same `EndpointFunction` seam.
//!
//! The firmware maps BAR2 as normal memory (it is RAM on the QEMU side). The host process
//! writes registers and doorbells concurrently: 32-bit registers, doorbells and interrupt
//! counters are accessed as atomics (acquire loads, release stores); bulk DMA copies happen
//! between fences, the completion entry's status dword (phase tag) is published last with a
//! single release store. Every DMA is bounds-checked against the host area before any byte
//! moves.

use core::ops::Range;
use core::sync::atomic::{AtomicU32, Ordering, fence};
use keel_nvme_pcie::endpoint::{DmaError, EndpointFunction};
use keel_nvme_pcie::layout;

/// PCI vendor and device of `ivshmem-plain`.
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

/// One ivshmem window.
#[derive(Debug)]
pub struct IvshmemWindow {
    base: *mut u8,
    len: usize,
}

// SAFETY: the window is plain memory owned by this driver; moving the handle to another core
// does not change what it points at.
unsafe impl Send for IvshmemWindow {}

/// Why a window cannot serve as an emulated function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// Smaller than the layout's minimum.
    TooSmall(usize),
    /// Not page aligned.
    Misaligned,
}

impl core::fmt::Display for WindowError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooSmall(n) => write!(
                f,
                "window of {n} bytes is smaller than {}",
                layout::MIN_WINDOW_SIZE
            ),
            Self::Misaligned => f.write_str("window is not page aligned"),
        }
    }
}

impl IvshmemWindow {
    /// Takes the window at `base..base + len` (BAR2 of an ivshmem-plain function).
    ///
    /// # Safety
    /// The range must be the function's shared memory BAR, mapped as normal memory for the
    /// rest of the firmware's life, and used by nothing else in the firmware.
    pub unsafe fn new(base: usize, len: usize) -> Result<Self, WindowError> {
        if len < layout::MIN_WINDOW_SIZE {
            return Err(WindowError::TooSmall(len));
        }
        if !base.is_multiple_of(layout::PAGE_SIZE) {
            return Err(WindowError::Misaligned);
        }
        Ok(Self {
            base: base as *mut u8,
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty (never: `new` refuses small windows).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn word(&self, offset: usize) -> Option<&AtomicU32> {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above), inside memory this driver owns for
        // the firmware's life; AtomicU32 has the layout of u32 and the other agent (the host
        // process) only makes aligned 32-bit accesses to these words.
        Some(unsafe { &*(self.base.add(offset) as *const AtomicU32) })
    }

    /// Clears the register, doorbell, interrupt and header pages: no host may use the window
    /// until [`IvshmemWindow::publish`] (CC = 0, CSTS = 0).
    pub fn clear(&mut self) {
        for off in (0..layout::HOST_AREA_OFFSET).step_by(4) {
            if let Some(w) = self.word(off) {
                w.store(0, Ordering::Relaxed);
            }
        }
        fence(Ordering::Release);
    }

    /// Publishes the header (with its magic): a host waiting for it may start. Call it once the
    /// function has written CAP and VS.
    pub fn publish(&mut self, function: u16) {
        let header = layout::Header::new(self.len as u64, function).encode();
        for (i, chunk) in header.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            if let Some(w) = self.word(layout::HEADER_OFFSET + 4 * i) {
                w.store(u32::from_le_bytes(b), Ordering::Release);
            }
        }
    }
}

impl EndpointFunction for IvshmemWindow {
    fn reset_pages(&mut self) {
        IvshmemWindow::clear(self)
    }

    fn publish(&mut self, function: u16) {
        IvshmemWindow::publish(self, function)
    }

    fn unpublish(&mut self) {
        // The magic first: a host that reads the header from here on sees no function.
        for i in 0..layout::header::SIZE / 4 {
            if let Some(w) = self.word(layout::HEADER_OFFSET + 4 * i) {
                w.store(0, Ordering::Release);
            }
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let off = offset as usize;
        if off >= layout::REGS_SIZE {
            return 0;
        }
        self.word(off).map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        let off = offset as usize;
        if off < layout::REGS_SIZE
            && let Some(w) = self.word(off)
        {
            w.store(value, Ordering::Release);
        }
    }

    fn read_doorbell(&mut self, index: u16) -> u32 {
        if usize::from(index) >= layout::DOORBELLS {
            return 0;
        }
        self.word(layout::doorbell_offset(index))
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn write_doorbell(&mut self, index: u16, value: u32) {
        if usize::from(index) < layout::DOORBELLS
            && let Some(w) = self.word(layout::doorbell_offset(index))
        {
            w.store(value, Ordering::Release);
        }
    }

    fn host_area(&self) -> Range<u64> {
        layout::host_area(self.len as u64)
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        let off = layout::translate(addr, len, self.len as u64)
            .ok_or(DmaError::OutOfRange { addr, len })?;
        fence(Ordering::Acquire);
        // SAFETY: `translate` checked that `off..off + len` lies inside the host area of the
        // window (inside `base..base + self.len`); `buf` is a distinct firmware buffer.
        unsafe { core::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), len) };
        Ok(())
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len();
        let off = layout::translate(addr, len, self.len as u64)
            .ok_or(DmaError::OutOfRange { addr, len })?;
        // Everything written before (e.g. a completion's first 12 bytes, read data) is
        // visible before this.
        fence(Ordering::Release);
        if len == 4
            && let Some(w) = self.word(off)
        {
            w.store(
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                Ordering::Release,
            );
            return Ok(());
        }
        // SAFETY: as in `dma_read`, for the destination.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), len) };
        Ok(())
    }

    fn raise_interrupt(&mut self, vector: u16) {
        if vector < layout::MAX_VECTORS
            && let Some(w) = self.word(layout::interrupt_offset(vector))
        {
            w.fetch_add(1, Ordering::Release);
        }
    }

    fn vectors(&self) -> u16 {
        layout::MAX_VECTORS
    }
}
