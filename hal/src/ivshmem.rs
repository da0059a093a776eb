//! The emulated NVMe function's endpoint on QEMU: an `ivshmem-plain` or `ivshmem-doorbell` PCI
//! device (Red Hat 1af4:1110) whose BAR2 is memory shared with a host process (`keelctl host`). The window
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
//!
//! # Interrupts toward the host: `ivshmem-doorbell`
//!
//! Every interrupt increments the vector's counter in the window (the host may poll it). When
//! the device is an `ivshmem-doorbell` (connected to an ivshmem server, QEMU
//! `docs/specs/ivshmem-spec.rst`; it has the MSI-X BAR1 that `ivshmem-plain` lacks) the
//! firmware also attaches its BAR0 registers ([`IvshmemRegisters`]), and once the host has
//! written its peer ID into the window's interrupt target word
//! ([`keel_nvme_pcie::layout::interrupt_target`]) each interrupt also writes the Doorbell
//! register with `peer << 16 | vector`: QEMU signals that peer's eventfd for the vector, a
//! real interrupt toward the host (an eventfd a host process waits on, or an MSI-X vector of
//! a host VM's ivshmem device). One register write per interrupt, no allocation, no log.

use core::ops::Range;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering, fence};
use keel_nvme_pcie::endpoint::{DmaError, EndpointFunction};
use keel_nvme_pcie::layout::{self, interrupt_target};
use safe_mmio::UniqueMmioPointer;
use safe_mmio::fields::{ReadPure, ReadPureWrite, ReadWrite, WriteOnly};

/// PCI vendor and device of `ivshmem-plain` and `ivshmem-doorbell`.
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

/// BAR0 of an ivshmem device (ivshmem-spec.rst "PCI device registers"), 256 bytes of MMIO.
#[derive(Debug)]
#[repr(C)]
pub struct Registers {
    /// 0x00 Interrupt Mask (INTx of revision 0 devices; reserved on revision 1).
    pub intr_mask: ReadPureWrite<u32>,
    /// 0x04 Interrupt Status (reading clears it).
    pub intr_status: ReadWrite<u32>,
    /// 0x08 IVPosition: this device's peer ID (0 when not configured for interrupts).
    pub iv_position: ReadPure<u32>,
    /// 0x0C Doorbell: `peer << 16 | vector` interrupts that peer's vector.
    pub doorbell: WriteOnly<u32>,
    /// 0x10..0x100 reserved.
    pub reserved: [ReadPure<u32>; 60],
}

/// A Doorbell register value: interrupt vector `vector` of peer `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbell(u32);

impl Doorbell {
    /// The value ringing `vector` of `peer` (bits 31..16 the peer ID, 15..0 the vector).
    pub const fn new(peer: u16, vector: u16) -> Self {
        Self(((peer as u32) << 16) | vector as u32)
    }

    /// The register value.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

/// The registers of an `ivshmem-doorbell` device, through `safe-mmio` (no references to
/// device memory).
#[derive(Debug)]
pub struct IvshmemRegisters {
    regs: UniqueMmioPointer<'static, Registers>,
}

impl IvshmemRegisters {
    /// Wraps BAR0 at `base` of `size` bytes; `None` for a null base or a BAR smaller than the
    /// 256 bytes of registers.
    ///
    /// # Safety
    /// `base..base + size` must be the assigned BAR0 of an ivshmem device, mapped as device
    /// memory for the rest of the program, and driven by nothing else.
    pub unsafe fn new(base: usize, size: usize) -> Option<Self> {
        if size < core::mem::size_of::<Registers>() {
            return None;
        }
        let ptr = NonNull::new(base as *mut Registers)?;
        // SAFETY: guaranteed by the caller: a valid, exclusively owned MMIO region of at
        // least the size of `Registers`, for `'static`.
        let regs = unsafe { UniqueMmioPointer::new(ptr) };
        Some(Self { regs })
    }

    /// Wraps registers the caller already holds (a `Registers` in RAM).
    #[cfg(test)]
    fn from_pointer(regs: UniqueMmioPointer<'static, Registers>) -> Self {
        Self { regs }
    }

    /// This device's peer ID (IVPosition).
    pub fn iv_position(&self) -> u32 {
        safe_mmio::field_shared!(self.regs, iv_position).read()
    }

    /// Rings `bell`: the server's peer named in it gets an interrupt on its vector. Stores
    /// to the window made before are visible to that peer before the interrupt.
    pub fn ring(&mut self, bell: Doorbell) {
        order_window_writes();
        safe_mmio::field!(self.regs, doorbell).write(bell.bits());
    }

    /// Gives up the registers for their Doorbell register alone, which any number of
    /// [`SharedBell`]s (one per core that raises interrupts) may then write.
    pub fn into_bell(mut self) -> SharedBell {
        let reg = safe_mmio::field!(self.regs, doorbell)
            .ptr_nonnull()
            .cast::<u32>();
        SharedBell { reg }
    }
}

/// Orders the completion entries and the counter written to the window before the register
/// write that signals them (Linux's `writel`).
fn order_window_writes() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: no memory access, no stack, no flags.
    unsafe {
        core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
    };
}

/// The Doorbell register of an `ivshmem-doorbell` device, shared by the cores that raise the
/// function's interrupts (the window's owner, and each core serving one of its I/O queue
/// pairs through a [`VectorBell`]).
///
/// Why not a `safe_mmio::UniqueMmioPointer`: several cores write this one register. It is
/// write-only and stateless (ivshmem-spec.rst: each write asks the server's peer named in it
/// to be signalled on the vector named in it), every access is one complete 32-bit volatile
/// store, and nothing ever reads it, so two cores' writes are two independent doorbells and
/// no interleaving can change what either means. It is made by consuming the device's
/// [`IvshmemRegisters`] ([`IvshmemRegisters::into_bell`]): no unique pointer to the register
/// remains. No Rust reference to device memory is ever formed.
#[derive(Debug, Clone, Copy)]
pub struct SharedBell {
    reg: NonNull<u32>,
}

// SAFETY: the register is device memory mapped for the rest of the program (the contract of
// `IvshmemRegisters::new`), reachable from any core; see the type's documentation for why
// concurrent writes from several cores are sound.
unsafe impl Send for SharedBell {}

impl SharedBell {
    /// Rings `bell` (see [`IvshmemRegisters::ring`]).
    pub fn ring(&self, bell: Doorbell) {
        order_window_writes();
        // SAFETY: `reg` is the Doorbell register of a device mapped as device memory for the
        // rest of the program (`IvshmemRegisters::new`'s contract), 4-byte aligned (offset
        // 0x0C of the register block); a single volatile 32-bit store to a write-only
        // register that other cores may write the same way (see the type's documentation).
        unsafe { core::ptr::write_volatile(self.reg.as_ptr(), bell.bits()) };
    }

    /// A handle that rings only `vector`.
    pub fn vector(&self, vector: u16) -> VectorBell {
        VectorBell {
            bell: *self,
            vector,
        }
    }
}

/// The Doorbell register for one interrupt vector: a core serving one queue pair of a
/// function may signal that pair's vector to whichever peer the host named, and nothing else
/// (as [`crate::nvme::QueueDoorbells`] writes only one drive queue pair's doorbells).
#[derive(Debug)]
pub struct VectorBell {
    bell: SharedBell,
    vector: u16,
}

impl VectorBell {
    /// Signals the vector to host peer `peer`.
    pub fn ring(&self, peer: u16) {
        self.bell.ring(Doorbell::new(peer, self.vector));
    }

    /// The vector.
    pub fn vector(&self) -> u16 {
        self.vector
    }
}

/// Which interrupts a window handle may raise.
#[derive(Debug)]
enum Interrupts {
    /// Every vector; counters only (`ivshmem-plain`).
    Counters,
    /// Every vector, counters and the Doorbell register (`ivshmem-doorbell`).
    All(SharedBell),
    /// One vector only (a queue pair's view), its counter and, on `ivshmem-doorbell`, its
    /// [`VectorBell`]; `None` vector: none at all (the host asked for no interrupts).
    One(Option<u16>, Option<VectorBell>),
}

/// One ivshmem window.
#[derive(Debug)]
pub struct IvshmemWindow {
    base: *mut u8,
    len: usize,
    /// The interrupts this handle raises.
    interrupts: Interrupts,
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
            interrupts: Interrupts::Counters,
        })
    }

    /// Attaches the registers of an `ivshmem-doorbell` device: from now on every interrupt
    /// also rings the host peer named in the window's interrupt target word, if any.
    pub fn attach_doorbell(&mut self, regs: IvshmemRegisters) {
        self.interrupts = Interrupts::All(regs.into_bell());
    }

    /// The window as seen by a core serving I/O queue pair `sqid` (with CQ `cqid`, interrupt
    /// vector `vector` if the host asked for interrupts) away from the core that owns the
    /// function: the pair's SQ tail and CQ head doorbells, DMA within the host area, and
    /// that one vector (its counter, and the doorbell through a [`VectorBell`]); registers
    /// read 0 and are never written ([`keel_nvme_pcie::QueuePort`]).
    ///
    /// The view shares the window's memory: the window's owner must not reuse the function
    /// (clear its pages, start another one) until the view is dropped, which the function's
    /// handshake guarantees (`PcieFunction::abroad`).
    pub fn queue_port(
        &self,
        sqid: u16,
        cqid: u16,
        vector: Option<u16>,
    ) -> keel_nvme_pcie::QueuePort<IvshmemWindow> {
        let bell = match (&self.interrupts, vector) {
            (Interrupts::All(b), Some(v)) => Some(b.vector(v)),
            _ => None,
        };
        let view = IvshmemWindow {
            base: self.base,
            len: self.len,
            interrupts: Interrupts::One(vector, bell),
        };
        keel_nvme_pcie::QueuePort::new(view, sqid, cqid, vector)
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
        if vector >= layout::MAX_VECTORS {
            return;
        }
        if let Interrupts::One(only, _) = &self.interrupts
            && *only != Some(vector)
        {
            return;
        }
        if let Some(w) = self.word(layout::interrupt_offset(vector)) {
            w.fetch_add(1, Ordering::Release);
        }
        if matches!(
            self.interrupts,
            Interrupts::Counters | Interrupts::One(_, None)
        ) {
            return;
        }
        // The host writes the word whenever it likes (a new peer after a reconnect): read
        // it at every interrupt, one load.
        let target = self
            .word(layout::INTERRUPT_TARGET_OFFSET)
            .and_then(|w| interrupt_target::decode(w.load(Ordering::Acquire)));
        let Some(peer) = target else { return };
        match &self.interrupts {
            Interrupts::All(bell) => bell.ring(Doorbell::new(peer, vector)),
            Interrupts::One(_, Some(bell)) => bell.ring(peer),
            _ => {}
        }
    }

    fn vectors(&self) -> u16 {
        layout::MAX_VECTORS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::vec;

    #[test]
    fn doorbell_values_follow_the_spec() {
        // ivshmem-spec.rst: "bit 0..15: vector, bit 16..31: peer ID".
        assert_eq!(Doorbell::new(0, 0).bits(), 0);
        assert_eq!(Doorbell::new(1, 3).bits(), 0x0001_0003);
        assert_eq!(Doorbell::new(0xffff, 0xffff).bits(), u32::MAX);
        assert_eq!(core::mem::size_of::<Registers>(), 256);
    }

    #[test]
    fn interrupts_ring_the_host_peer_only_when_it_asked() {
        let regs: &'static mut Registers = Box::leak(Box::new(Registers {
            intr_mask: ReadPureWrite(0),
            intr_status: ReadWrite(0),
            iv_position: ReadPure(7),
            doorbell: WriteOnly(0),
            reserved: [const { ReadPure(0) }; 60],
        }));
        let raw: *const Registers = regs;
        let mem = vec![0u64; (layout::MIN_WINDOW_SIZE + layout::PAGE_SIZE) / 8].leak();
        let base = (mem.as_mut_ptr() as usize).next_multiple_of(layout::PAGE_SIZE);
        // SAFETY: `base..base + MIN_WINDOW_SIZE` lies inside the leaked buffer, used by
        // nothing else.
        let mut w = unsafe { IvshmemWindow::new(base, layout::MIN_WINDOW_SIZE) }.unwrap();
        let mut r = IvshmemRegisters::from_pointer(UniqueMmioPointer::from(regs));
        assert_eq!(r.iv_position(), 7);
        r.ring(Doorbell::new(2, 9));
        // SAFETY: `raw` points at the leaked registers; nothing writes them concurrently.
        assert_eq!(unsafe { (*raw).doorbell.0 }, 0x0002_0009);
        w.attach_doorbell(r);
        // SAFETY: `raw` points at the leaked registers; nothing writes them concurrently.
        let last_rung = || unsafe { (*raw).doorbell.0 };
        // No target yet: the counter only.
        w.raise_interrupt(1);
        assert_eq!(last_rung(), 0x0002_0009);
        assert_eq!(
            w.word(layout::interrupt_offset(1))
                .unwrap()
                .load(Ordering::Relaxed),
            1
        );
        // Garbage in the target word rings nobody.
        w.word(layout::INTERRUPT_TARGET_OFFSET)
            .unwrap()
            .store(0x1234_5678, Ordering::Relaxed);
        w.raise_interrupt(1);
        assert_eq!(last_rung(), 0x0002_0009);
        w.word(layout::INTERRUPT_TARGET_OFFSET)
            .unwrap()
            .store(interrupt_target::encode(5), Ordering::Relaxed);
        w.raise_interrupt(3);
        assert_eq!(last_rung(), 0x0005_0003);
        assert_eq!(
            w.word(layout::interrupt_offset(3))
                .unwrap()
                .load(Ordering::Relaxed),
            1
        );
        // Beyond the vectors: nothing at all.
        w.raise_interrupt(layout::MAX_VECTORS);
        assert_eq!(last_rung(), 0x0005_0003);

        // A queue pair's view: its two doorbells, its one vector, no register.
        let counter = |w: &IvshmemWindow, v: u16| {
            w.word(layout::interrupt_offset(v))
                .unwrap()
                .load(Ordering::Relaxed)
        };
        w.write_doorbell(layout::sq_tail_doorbell(2), 7);
        w.write_doorbell(layout::cq_head_doorbell(2), 5);
        w.write_doorbell(layout::sq_tail_doorbell(1), 9);
        w.write_reg(0x14, 1);
        let mut p = w.queue_port(2, 2, Some(6));
        assert_eq!(p.read_doorbell(layout::sq_tail_doorbell(2)), 7);
        assert_eq!(p.read_doorbell(layout::cq_head_doorbell(2)), 5);
        assert_eq!(
            p.read_doorbell(layout::sq_tail_doorbell(1)),
            0,
            "another queue's"
        );
        assert_eq!(p.read_reg(0x14), 0, "registers are not the pair's");
        p.write_reg(0x14, 0);
        p.write_doorbell(layout::sq_tail_doorbell(2), 0);
        assert_eq!(w.read_reg(0x14), 1);
        assert_eq!(w.read_doorbell(layout::sq_tail_doorbell(2)), 7);
        p.raise_interrupt(3);
        assert_eq!(last_rung(), 0x0005_0003, "another vector: nothing");
        assert_eq!(counter(&w, 3), 1);
        p.raise_interrupt(6);
        assert_eq!(last_rung(), 0x0005_0006, "its vector, to the host's peer");
        assert_eq!(counter(&w, 6), 1);
        // DMA is the window's, bounds-checked.
        let mut b = [0u8; 4];
        assert!(p.dma_read(layout::HOST_AREA_OFFSET as u64, &mut b).is_ok());
        assert!(p.dma_read(0, &mut b).is_err());
        // No interrupts asked for: none raised.
        let mut quiet = w.queue_port(3, 3, None);
        quiet.raise_interrupt(6);
        assert_eq!(counter(&w, 6), 1);
    }
}
