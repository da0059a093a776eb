//! DMA memory: the [`Dma`] seam and [`DmaRegion`], the driver's only access to memory a device
//! also reads or writes. This is the crate's one module with `unsafe` code.
//!
//! A region is never turned into a Rust reference: the device may write it at any time (a
//! completion queue entry, read data), so every access is a volatile access through the raw
//! pointer, bounds checked against the region.

use core::ptr::NonNull;

/// Physically contiguous memory a device can reach, with the cache maintenance a non-coherent
/// system needs.
///
/// # Safety
/// Implementations guarantee that every region returned by [`Dma::alloc`] is valid for reads
/// and writes of `len` bytes at its CPU address for the rest of the program (the driver never
/// frees it: controllers live as long as the firmware), is used by nothing else, is zeroed, is
/// aligned to the requested alignment in both address spaces, and that the device reaches its
/// byte `i` at `dev_addr() + i` (physically contiguous).
pub unsafe trait Dma {
    /// Allocates `size` zeroed bytes aligned to `align` (a power of two). `None` when out of
    /// memory.
    fn alloc(&mut self, size: usize, align: usize) -> Option<DmaRegion>;
    /// Makes CPU writes to `[cpu_addr, cpu_addr + len)` visible to the device and drops stale
    /// lines before the device writes it (clean + invalidate on a non-coherent system).
    /// Called before a command that reads or writes the memory is handed to the device.
    fn sync_for_device(&mut self, cpu_addr: usize, len: usize);
    /// Makes device writes to `[cpu_addr, cpu_addr + len)` visible to the CPU (invalidate on a
    /// non-coherent system; a read barrier, `dmb oshld` on Arm, in any case). Called after a
    /// completion says the device is done, before the CPU reads the data.
    fn sync_for_cpu(&mut self, cpu_addr: usize, len: usize);
}

/// A piece of DMA memory: CPU pointer, device address and length.
pub struct DmaRegion {
    cpu: NonNull<u8>,
    dev: u64,
    len: usize,
}

impl core::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaRegion")
            .field("cpu", &self.cpu)
            .field("dev", &format_args!("{:#x}", self.dev))
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: a region is memory owned by it alone (and the device), like a `Box<[u8]>` whose
// every access is volatile: moving it to another thread moves that ownership; it holds no
// reference to anything thread-bound.
unsafe impl Send for DmaRegion {}

impl DmaRegion {
    /// Wraps memory handed out by a [`Dma`] implementation.
    ///
    /// # Safety
    /// `cpu` must be valid for volatile reads and writes of `len` bytes for the rest of the
    /// program, used by nothing but this region and the device, and reached by the device at
    /// `dev` (contiguously).
    pub unsafe fn new(cpu: NonNull<u8>, dev: u64, len: usize) -> Self {
        Self { cpu, dev, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of the first byte.
    pub fn dev_addr(&self) -> u64 {
        self.dev
    }

    /// CPU address of the first byte (for cache maintenance).
    pub fn cpu_addr(&self) -> usize {
        self.cpu.as_ptr() as usize
    }

    fn check(&self, off: usize, len: usize, align: usize) -> bool {
        let ok = off.checked_add(len).is_some_and(|end| end <= self.len)
            && (self.cpu_addr() + off).is_multiple_of(align);
        debug_assert!(
            ok,
            "DMA access {off}+{len} outside a {}-byte region",
            self.len
        );
        ok
    }

    /// Reads a little-endian u32 at byte offset `off` (4-byte aligned); 0 when out of bounds.
    pub fn read_u32(&self, off: usize) -> u32 {
        if !self.check(off, 4, 4) {
            return 0;
        }
        // SAFETY: `off + 4 <= len` and the address is 4-byte aligned (checked); the region is
        // valid for reads (constructor contract). Volatile: the device may write it.
        u32::from_le(unsafe { self.cpu.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Writes a little-endian u64 at byte offset `off` (8-byte aligned); ignored when out of
    /// bounds.
    pub fn write_u64(&mut self, off: usize, v: u64) {
        if !self.check(off, 8, 8) {
            return;
        }
        // SAFETY: `off + 8 <= len`, 8-byte aligned (checked), valid for writes (constructor
        // contract).
        unsafe {
            self.cpu
                .as_ptr()
                .add(off)
                .cast::<u64>()
                .write_volatile(v.to_le())
        };
    }

    /// Copies `out.len()` bytes at `off` into `out`; false (and nothing copied) when out of
    /// bounds.
    pub fn read_bytes(&self, off: usize, out: &mut [u8]) -> bool {
        if !self.check(off, out.len(), 1) {
            return false;
        }
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `off + i < off + out.len() <= len` (checked); valid for reads.
            *b = unsafe { self.cpu.as_ptr().add(off + i).read_volatile() };
        }
        true
    }

    /// Copies `data` to `off`, 8 bytes per access when aligned; false when out of bounds.
    pub fn write_bytes(&mut self, off: usize, data: &[u8]) -> bool {
        if !self.check(off, data.len(), 1) {
            return false;
        }
        if (self.cpu_addr() + off).is_multiple_of(8) {
            let mut chunks = data.chunks_exact(8);
            let mut o = off;
            for c in &mut chunks {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                self.write_u64(o, u64::from_le_bytes(w));
                o += 8;
            }
            for (i, b) in chunks.remainder().iter().enumerate() {
                // SAFETY: inside `off..off + data.len()` (checked above); valid for writes.
                unsafe { self.cpu.as_ptr().add(o + i).write_volatile(*b) };
            }
        } else {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: inside `off..off + data.len()` (checked above); valid for writes.
                unsafe { self.cpu.as_ptr().add(off + i).write_volatile(*b) };
            }
        }
        true
    }

    /// Zeroes the whole region.
    pub fn zero(&mut self) {
        let mut off = 0;
        let head = self.cpu_addr().next_multiple_of(8) - self.cpu_addr();
        while off < self.len && (off < head || self.len - off < 8) {
            // SAFETY: `off < len`; valid for writes.
            unsafe { self.cpu.as_ptr().add(off).write_volatile(0) };
            off += 1;
        }
        while off + 8 <= self.len {
            self.write_u64(off, 0);
            off += 8;
        }
        while off < self.len {
            // SAFETY: `off < len`; valid for writes.
            unsafe { self.cpu.as_ptr().add(off).write_volatile(0) };
            off += 1;
        }
    }
}

/// Test support: the fake controller reaches "device addresses", which the fake [`Dma`] makes
/// equal to host addresses, through these two functions.
#[cfg(test)]
pub(crate) mod host {
    /// Copies `out.len()` bytes from device address `addr`.
    ///
    /// # Safety
    /// `addr..addr + out.len()` must lie in live memory (the fake checks it against its
    /// registry of DMA regions and test buffers) that no Rust code accesses meanwhile: the
    /// contract a real device's DMA has (the driver holds a request's buffer untouched while
    /// its command is outstanding).
    pub(crate) unsafe fn read(addr: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: guaranteed by the caller.
            *b = unsafe { (addr as usize as *const u8).add(i).read_volatile() };
        }
    }

    /// Copies `data` to device address `addr`.
    ///
    /// # Safety
    /// As for [`read`], and the memory must be writable.
    pub(crate) unsafe fn write(addr: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            // SAFETY: guaranteed by the caller.
            unsafe { (addr as usize as *mut u8).add(i).write_volatile(*b) };
        }
    }

    /// Allocates `size` zeroed bytes aligned to `align`, leaked, as a region.
    pub(crate) fn alloc(size: usize, align: usize) -> Option<super::DmaRegion> {
        let layout = std::alloc::Layout::from_size_align(size.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = core::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        // SAFETY: freshly allocated, leaked (valid forever), owned by nothing else; the fake
        // device reaches it at its host address.
        Some(unsafe { super::DmaRegion::new(p, p.as_ptr() as u64, size) })
    }
}
