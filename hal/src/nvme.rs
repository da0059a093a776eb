//! NVMe drives over PCIe: the register and DMA seams of `keel-nvme-driver` for the firmware.
//!
//! - [`Bar0`]: the controller's registers (NVMe base 2.0 §3.1) in BAR0, through `safe-mmio`
//!   (no references to device memory). Every write is preceded by `dmb oshst`, so queue
//!   entries written to RAM are visible to the device before the doorbell that announces
//!   them (what Linux's `writel` does).
//! - [`HeapDma`]: DMA memory from the heap, which the firmware identity-maps (device address =
//!   CPU address) as normal cacheable memory. QEMU's devices are cache coherent, so cache
//!   maintenance is empty; a non-coherent board must clean (`dc cvac`, or `dc civac` before
//!   the device writes) every line of the range in `sync_for_device` and invalidate
//!   (`dc ivac`) in `sync_for_cpu`, each followed by `dsb sy`, and must give the driver
//!   cache-line aligned buffers.

extern crate alloc;

use core::alloc::Layout;
use core::ptr::NonNull;
pub use keel_nvme_driver as driver;
use keel_nvme_driver::{Dma, DmaRegion, Registers};
use safe_mmio::{UniqueMmioPointer, fields::ReadWrite};

/// A drive as the poll loop keeps it.
pub type NvmeDrive = keel_nvme_driver::Drive<Bar0, HeapDma>;
/// One namespace of a drive as a block backend.
pub type NvmeBackend = keel_nvme_driver::DriveBackend<Bar0, HeapDma>;

/// BAR0 of an NVMe function.
#[derive(Debug)]
pub struct Bar0 {
    regs: UniqueMmioPointer<'static, [ReadWrite<u32>]>,
    base: usize,
    size: usize,
}

impl Bar0 {
    /// Wraps BAR0 at `base` (CPU address) of `size` bytes. `None` for a null base or a BAR
    /// too small to hold the registers and the admin doorbells.
    ///
    /// # Safety
    /// `base..base + size` must be the assigned BAR0 of an NVMe controller, mapped as device
    /// memory for the rest of the program, and driven by nothing else.
    pub unsafe fn new(base: usize, size: usize) -> Option<Self> {
        if size < 0x1008 {
            return None;
        }
        let ptr = NonNull::new(base as *mut ReadWrite<u32>)?;
        let slice = NonNull::slice_from_raw_parts(ptr, size / 4);
        // SAFETY: guaranteed by the caller.
        let regs = unsafe { UniqueMmioPointer::new(slice) };
        Some(Self { regs, base, size })
    }

    /// The two doorbells of I/O queue `qid` (SQ tail, CQ head; NVMe base 2.0 §3.1.4) for
    /// doorbell stride `dstrd`, as registers of their own for the core that owns the queue
    /// (`keel_nvme_driver::CoreQueue`). `None` if they lie outside the BAR.
    ///
    /// # Safety
    /// The controller driving this BAR must never write these two registers (the driver
    /// leaves the doorbells of a queue it handed out alone), and at most one handle may
    /// exist per queue.
    pub unsafe fn queue_doorbells(&self, qid: u16, dstrd: u8) -> Option<QueueDoorbells> {
        let sq_off = keel_nvme_driver::doorbell::sq_tail(qid, dstrd);
        let cq_off = keel_nvme_driver::doorbell::cq_head(qid, dstrd);
        if qid == 0 || cq_off + 4 > self.size {
            return None;
        }
        let at = |off: usize| NonNull::new((self.base + off) as *mut ReadWrite<u32>);
        // SAFETY: both registers are inside this BAR (checked above), which the caller of
        // `Bar0::new` guaranteed is mapped as device memory for the rest of the program;
        // nothing else writes them (this function's contract).
        let (sq, cq) = unsafe {
            (
                UniqueMmioPointer::new(at(sq_off)?),
                UniqueMmioPointer::new(at(cq_off)?),
            )
        };
        Some(QueueDoorbells {
            sq,
            cq,
            sq_off,
            cq_off,
        })
    }
}

/// The SQ tail and CQ head doorbells of one I/O queue pair, moved to the core that owns the
/// queue: its only access to the drive's registers. Writes to any other offset are dropped
/// and reads return all ones. Like [`Bar0`], every write is preceded by `dmb oshst`.
#[derive(Debug)]
pub struct QueueDoorbells {
    sq: UniqueMmioPointer<'static, ReadWrite<u32>>,
    cq: UniqueMmioPointer<'static, ReadWrite<u32>>,
    sq_off: usize,
    cq_off: usize,
}

impl Registers for QueueDoorbells {
    fn read32(&mut self, _offset: usize) -> u32 {
        u32::MAX
    }

    fn write32(&mut self, offset: usize, value: u32) {
        // Queue entries written to RAM before the doorbell that announces them (and, for the
        // CQ head, the entries read before the slots are given back).
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a barrier instruction: no memory access, no stack, no flags.
        unsafe {
            core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
        };
        if offset == self.sq_off {
            self.sq.write(value);
        } else if offset == self.cq_off {
            self.cq.write(value);
        }
    }
}

/// One namespace of a drive served through a queue pair of the core serving it.
pub type CoreNvmeBackend = keel_nvme_driver::CoreBackend<QueueDoorbells, HeapDma>;
/// A drive's I/O queue pair owned by one core.
pub type CoreNvmeQueue = keel_nvme_driver::CoreQueue<QueueDoorbells, HeapDma>;

impl Registers for Bar0 {
    fn read32(&mut self, offset: usize) -> u32 {
        if !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        match self.regs.get(offset / 4) {
            Some(mut r) => r.read(),
            None => u32::MAX,
        }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        if !offset.is_multiple_of(4) {
            return;
        }
        // Order earlier stores to DMA memory (queue entries, PRP lists) before the register
        // write that makes the device read them.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a barrier instruction: no memory access, no stack, no flags.
        unsafe {
            core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
        };
        if let Some(mut r) = self.regs.get(offset / 4) {
            r.write(value);
        }
    }
}

/// Identity-mapped, coherent DMA memory from the heap.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeapDma;

// SAFETY: `alloc` returns zeroed memory from the global allocator, aligned as asked, leaked
// (never freed, so valid forever) and owned by nothing else; the firmware identity-maps RAM,
// so the device reaches byte i at `address + i`.
unsafe impl Dma for HeapDma {
    fn alloc(&mut self, size: usize, align: usize) -> Option<DmaRegion> {
        let layout = Layout::from_size_align(size.max(1).next_multiple_of(align), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        // SAFETY: freshly allocated and never freed, used only through this region and by the
        // device, at its identity-mapped physical address.
        Some(unsafe { DmaRegion::new(ptr, ptr.as_ptr() as u64, size) })
    }

    fn sync_for_device(&mut self, _cpu_addr: usize, _len: usize) {
        // Coherent (QEMU virt): nothing to clean. The store ordering before the doorbell is
        // in `Bar0::write32`.
    }

    fn sync_for_cpu(&mut self, _cpu_addr: usize, _len: usize) {
        // Coherent: no invalidation, but later loads must not pass the load that saw the
        // completion (Linux's dma_rmb).
        #[cfg(target_arch = "aarch64")]
        // SAFETY: a barrier instruction: no memory access, no stack, no flags.
        unsafe {
            core::arch::asm!("dmb oshld", options(nostack, preserves_flags))
        };
    }
}
