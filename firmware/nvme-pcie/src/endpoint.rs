//! The `EndpointFunction` seam: everything the controller emulation needs from a PCIe
//! endpoint, and [`MemWindow`], an in-memory implementation for host tests.

use crate::layout;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// A DMA transfer the endpoint refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// Some byte of `[addr, addr + len)` lies outside the host memory the function may
    /// reach (or the range overflows).
    OutOfRange {
        /// Host address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The endpoint hardware reported a failure.
    Fault,
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaError::OutOfRange { addr, len } => {
                write!(f, "DMA of {len} bytes at {addr:#x} outside host memory")
            }
            DmaError::Fault => f.write_str("DMA fault"),
        }
    }
}

/// A PCIe endpoint function as the NVMe controller emulation sees it: the register page of
/// BAR0 as the host sees it, the doorbells, DMA to and from host memory, and interrupts.
///
/// Offsets are those of [`crate::layout`] (register offsets of NVMe base 2.0 Figure 35;
/// doorbell `i` is the 32-bit register at BAR0 0x1000 + 4i). A real DPU endpoint controller
/// and the QEMU `ivshmem` window are two implementations.
///
/// # What implementations must guarantee
///
/// - Register and doorbell accesses are single 32-bit accesses (volatile or atomic when the
///   memory is shared with another agent), never torn.
/// - `dma_read` / `dma_write` touch nothing outside [`EndpointFunction::host_area`]; a
///   transfer that would (in part) is refused whole with [`DmaError::OutOfRange`] and has no
///   effect. They never panic, whatever the address and length.
/// - Ordering: the effects of `dma_write` calls and `raise_interrupt` become visible to the
///   host in call order (a release barrier before each). The emulation writes a completion
///   entry's first 12 bytes and its status dword (with the phase tag) in two calls, so the
///   host never sees a new phase tag with stale contents. A `dma_read` observes host writes
///   that happened before the doorbell value the emulation read last (acquire barrier after
///   reading a doorbell).
pub trait EndpointFunction {
    /// Reads the 32-bit register at `offset` (< 0x1000, 4-byte aligned) of the register page.
    fn read_reg(&mut self, offset: u32) -> u32;
    /// Writes the 32-bit register at `offset` (< 0x1000, 4-byte aligned): the function
    /// writes CAP, VS and CSTS.
    fn write_reg(&mut self, offset: u32, value: u32);
    /// Reads doorbell `index` (see [`layout::sq_tail_doorbell`], [`layout::cq_head_doorbell`]).
    fn read_doorbell(&mut self, index: u16) -> u32;
    /// Writes doorbell `index` (the function only clears doorbells on reset and queue creation).
    fn write_doorbell(&mut self, index: u16, value: u32);
    /// Host addresses reachable by DMA.
    fn host_area(&self) -> Range<u64>;
    /// Copies `buf.len()` bytes of host memory at `addr` into `buf`.
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Copies `data` into host memory at `addr`.
    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError>;
    /// Signals interrupt vector `vector` to the host (MSI-X message, or on QEMU a counter the
    /// host polls).
    fn raise_interrupt(&mut self, vector: u16);
    /// Number of interrupt vectors the function has.
    fn vectors(&self) -> u16;

    /// Clears the register, doorbell and interrupt pages before the function is first used
    /// (an ivshmem window left over from an earlier run); nothing by default.
    fn reset_pages(&mut self) {}

    /// Makes function number `function` visible to the host once its emulation has written
    /// CAP and VS: a QEMU window publishes its header, a real endpoint controller would
    /// enable its link. Nothing by default.
    fn publish(&mut self, _function: u16) {}

    /// Makes the function invisible to the host again (it was removed): a QEMU window clears
    /// its header's magic, a real endpoint controller would take the link down or report a
    /// hot unplug. Nothing by default.
    fn unpublish(&mut self) {}

    /// Reads a 64-bit register as two 32-bit accesses (low dword first).
    fn read_reg64(&mut self, offset: u32) -> u64 {
        let lo = self.read_reg(offset) as u64;
        let hi = self.read_reg(offset + 4) as u64;
        lo | (hi << 32)
    }

    /// Writes a 64-bit register as two 32-bit accesses (low dword first).
    fn write_reg64(&mut self, offset: u32, value: u64) {
        self.write_reg(offset, value as u32);
        self.write_reg(offset + 4, (value >> 32) as u32);
    }
}

/// A whole window in a `Vec` (host tests): the function side through [`EndpointFunction`],
/// the host side through the `host_*` methods. Plain memory, one thread.
#[derive(Clone)]
pub struct MemWindow {
    mem: Vec<u8>,
    /// DMA transfers refused so far (tests check hostile input never got through).
    pub refused_dma: u64,
}

impl fmt::Debug for MemWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemWindow")
            .field("size", &self.mem.len())
            .field("refused_dma", &self.refused_dma)
            .finish()
    }
}

impl MemWindow {
    /// A zeroed window of `size` bytes (at least [`layout::MIN_WINDOW_SIZE`]) with its header.
    pub fn new(size: usize) -> Self {
        let size = size.max(layout::MIN_WINDOW_SIZE);
        let mut mem = vec![0u8; size];
        let h = layout::Header::new(size as u64, 0).encode();
        mem[layout::HEADER_OFFSET..layout::HEADER_OFFSET + h.len()].copy_from_slice(&h);
        Self {
            mem,
            refused_dma: 0,
        }
    }

    /// Window size.
    pub fn size(&self) -> usize {
        self.mem.len()
    }

    /// The whole window (host view).
    pub fn bytes(&self) -> &[u8] {
        &self.mem
    }

    /// The whole window, mutable (host view; tests may scribble anywhere).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem
    }

    fn u32_at(&self, off: usize) -> u32 {
        match self.mem.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    fn put_u32(&mut self, off: usize, v: u32) {
        if let Some(b) = self.mem.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Host: reads a register.
    pub fn host_reg(&self, offset: u32) -> u32 {
        self.u32_at(offset as usize)
    }

    /// Host: reads a 64-bit register.
    pub fn host_reg64(&self, offset: u32) -> u64 {
        self.host_reg(offset) as u64 | ((self.host_reg(offset + 4) as u64) << 32)
    }

    /// Host: writes a register.
    pub fn host_set_reg(&mut self, offset: u32, v: u32) {
        self.put_u32(offset as usize, v);
    }

    /// Host: writes a 64-bit register.
    pub fn host_set_reg64(&mut self, offset: u32, v: u64) {
        self.host_set_reg(offset, v as u32);
        self.host_set_reg(offset + 4, (v >> 32) as u32);
    }

    /// Host: rings doorbell `index`.
    pub fn host_doorbell(&mut self, index: u16, v: u32) {
        self.put_u32(layout::doorbell_offset(index), v);
    }

    /// Host: a vector's interrupt counter.
    pub fn host_interrupts(&self, vector: u16) -> u32 {
        self.u32_at(layout::interrupt_offset(vector))
    }

    /// Host: reads its own memory at host address `addr` (panics outside the window: tests).
    pub fn host_read(&self, addr: u64, buf: &mut [u8]) {
        let o = (addr - layout::HOST_BASE) as usize;
        buf.copy_from_slice(&self.mem[o..o + buf.len()]);
    }

    /// Host: writes its own memory at host address `addr` (panics outside the window: tests).
    pub fn host_write(&mut self, addr: u64, data: &[u8]) {
        let o = (addr - layout::HOST_BASE) as usize;
        self.mem[o..o + data.len()].copy_from_slice(data);
    }
}

impl EndpointFunction for MemWindow {
    fn publish(&mut self, function: u16) {
        let h = layout::Header::new(self.mem.len() as u64, function).encode();
        self.mem[layout::HEADER_OFFSET..layout::HEADER_OFFSET + h.len()].copy_from_slice(&h);
    }

    fn unpublish(&mut self) {
        self.mem[layout::HEADER_OFFSET..layout::HEADER_OFFSET + layout::header::SIZE].fill(0);
    }

    fn reset_pages(&mut self) {
        // As an ivshmem window: registers, doorbells, interrupt counters and header zeroed.
        self.mem[..layout::HOST_AREA_OFFSET].fill(0);
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        if offset as usize >= layout::REGS_SIZE {
            return 0;
        }
        self.u32_at(offset as usize & !3)
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        if (offset as usize) < layout::REGS_SIZE {
            self.put_u32(offset as usize & !3, value);
        }
    }

    fn read_doorbell(&mut self, index: u16) -> u32 {
        if index as usize >= layout::DOORBELLS {
            return 0;
        }
        self.u32_at(layout::doorbell_offset(index))
    }

    fn write_doorbell(&mut self, index: u16, value: u32) {
        if (index as usize) < layout::DOORBELLS {
            self.put_u32(layout::doorbell_offset(index), value);
        }
    }

    fn host_area(&self) -> Range<u64> {
        layout::host_area(self.mem.len() as u64)
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        match layout::translate(addr, buf.len(), self.mem.len() as u64)
            .and_then(|o| self.mem.get(o..o + buf.len()))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => {
                self.refused_dma += 1;
                Err(DmaError::OutOfRange {
                    addr,
                    len: buf.len(),
                })
            }
        }
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let size = self.mem.len() as u64;
        match layout::translate(addr, data.len(), size)
            .and_then(|o| self.mem.get_mut(o..o + data.len()))
        {
            Some(dst) => {
                dst.copy_from_slice(data);
                Ok(())
            }
            None => {
                self.refused_dma += 1;
                Err(DmaError::OutOfRange {
                    addr,
                    len: data.len(),
                })
            }
        }
    }

    fn raise_interrupt(&mut self, vector: u16) {
        if vector < layout::MAX_VECTORS {
            let o = layout::interrupt_offset(vector);
            let v = self.u32_at(o).wrapping_add(1);
            self.put_u32(o, v);
        }
    }

    fn vectors(&self) -> u16 {
        layout::MAX_VECTORS
    }
}

/// An endpoint restricted to one I/O queue pair: what a core serving an [`crate::IoPair`]
/// away from its function may touch. Reads of the pair's SQ tail and CQ head doorbells go
/// through; every other doorbell and every register reads 0 and no register or doorbell is
/// ever written (the function's own core owns them: CC, CSTS, queue creation and resets);
/// DMA is the endpoint's, bounds-checked as always; only the pair's interrupt vector is
/// raised (none if the host asked for no interrupts). The page and header operations do
/// nothing. `E` is a view of the same endpoint (on QEMU, of the same window memory).
#[derive(Debug)]
pub struct QueuePort<E> {
    ep: E,
    sqid: u16,
    cqid: u16,
    vector: Option<u16>,
}

impl<E: EndpointFunction> QueuePort<E> {
    /// The port of SQ `sqid` and CQ `cqid` with interrupt vector `vector` over `ep`.
    pub fn new(ep: E, sqid: u16, cqid: u16, vector: Option<u16>) -> Self {
        Self {
            ep,
            sqid,
            cqid,
            vector,
        }
    }

    /// The SQ it serves.
    pub fn sqid(&self) -> u16 {
        self.sqid
    }
}

impl<E: EndpointFunction> EndpointFunction for QueuePort<E> {
    fn read_reg(&mut self, _offset: u32) -> u32 {
        0
    }

    fn write_reg(&mut self, _offset: u32, _value: u32) {}

    fn read_doorbell(&mut self, index: u16) -> u32 {
        if index == layout::sq_tail_doorbell(self.sqid)
            || index == layout::cq_head_doorbell(self.cqid)
        {
            self.ep.read_doorbell(index)
        } else {
            0
        }
    }

    fn write_doorbell(&mut self, _index: u16, _value: u32) {}

    fn host_area(&self) -> Range<u64> {
        self.ep.host_area()
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.ep.dma_read(addr, buf)
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.ep.dma_write(addr, data)
    }

    fn raise_interrupt(&mut self, vector: u16) {
        if self.vector == Some(vector) {
            self.ep.raise_interrupt(vector);
        }
    }

    fn vectors(&self) -> u16 {
        self.ep.vectors()
    }
}

/// A borrowed endpoint is an endpoint (a [`QueuePort`] over `&mut MemWindow` in host tests).
impl<E: EndpointFunction + ?Sized> EndpointFunction for &mut E {
    fn read_reg(&mut self, offset: u32) -> u32 {
        (**self).read_reg(offset)
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        (**self).write_reg(offset, value)
    }

    fn read_doorbell(&mut self, index: u16) -> u32 {
        (**self).read_doorbell(index)
    }

    fn write_doorbell(&mut self, index: u16, value: u32) {
        (**self).write_doorbell(index, value)
    }

    fn host_area(&self) -> Range<u64> {
        (**self).host_area()
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        (**self).dma_read(addr, buf)
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        (**self).dma_write(addr, data)
    }

    fn raise_interrupt(&mut self, vector: u16) {
        (**self).raise_interrupt(vector)
    }

    fn vectors(&self) -> u16 {
        (**self).vectors()
    }

    fn reset_pages(&mut self) {
        (**self).reset_pages()
    }

    fn publish(&mut self, function: u16) {
        (**self).publish(function)
    }

    fn unpublish(&mut self) {
        (**self).unpublish()
    }
}
