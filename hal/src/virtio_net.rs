//! virtio-net over PCI (virtio 1.2 §5.1, §4.1) as a `smoltcp::phy::Device`, on the
//! `virtio-drivers` crate's non-blocking raw driver.
//!
//! Receive: every receive buffer stays posted; `receive` hands smoltcp one completed frame and
//! re-posts its buffer on the next call. Transmit: a pool of transmit buffers; a frame is handed
//! to the device as soon as smoltcp fills it and its buffer comes back when the device is done,
//! so the poll loop never waits for a packet.
//!
//! DMA: buffers come from the heap, which is identity-mapped; QEMU's virtio device is cache
//! coherent. A non-coherent board needs cache maintenance in [`VirtioHal::share`].

extern crate alloc;

use alloc::{boxed::Box, vec::Vec};
use core::alloc::Layout;
use core::ptr::NonNull;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::{
    BufferDirection, Hal, PhysAddr,
    device::net::VirtIONetRaw,
    transport::pci::{
        PciTransport,
        bus::{Cam, DeviceFunction, MmioCam, PciRoot},
    },
};

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 256;
/// Receive buffers kept posted.
const RX_BUFFERS: usize = QUEUE_SIZE;
/// Transmit buffers.
const TX_BUFFERS: usize = QUEUE_SIZE;
/// Bytes per buffer: virtio-net header + a 1514-byte Ethernet frame, rounded up.
const BUF_LEN: usize = 2048;
/// Ethernet MTU (IP MTU 1500 + 14-byte header).
pub const MTU: usize = 1514;

/// The `virtio-drivers` platform glue: identity-mapped, coherent DMA from the heap.
#[derive(Debug)]
pub struct VirtioHal;

const PAGE: usize = 4096;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned memory whose physical
// address equals its virtual address (the firmware identity-maps RAM); `share` returns the
// physical address of the buffer it is given, which stays valid while the device uses it.
unsafe impl Hal for VirtioHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).expect("DMA layout");
        // SAFETY: the layout has a non-zero size (virtqueues ask for at least one page).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).expect("out of memory for DMA");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).expect("DMA layout");
        // SAFETY: `vaddr` came from `dma_alloc` with the same number of pages.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Why the NIC could not be brought up.
#[derive(Debug)]
pub enum NetError {
    /// The PCI transport could not be set up.
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// The device refused initialisation or buffers.
    Device(virtio_drivers::Error),
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "virtio PCI transport: {e}"),
            Self::Device(e) => write!(f, "virtio-net: {e}"),
        }
    }
}

/// Counters of the NIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Times smoltcp found no free transmit buffer.
    pub tx_full: u64,
    /// Receive errors reported by the driver.
    pub rx_errors: u64,
}

/// A virtio-net NIC.
pub struct VirtioNet {
    raw: VirtIONetRaw<VirtioHal, PciTransport, QUEUE_SIZE>,
    rx_bufs: Vec<Box<[u8]>>,
    /// Receive buffer index by virtqueue token.
    rx_by_token: Vec<Option<u16>>,
    /// A buffer handed to smoltcp last time, to re-post.
    rx_repost: Option<u16>,
    tx_bufs: Vec<Box<[u8]>>,
    tx_free: Vec<u16>,
    tx_by_token: Vec<Option<u16>>,
    /// Counters.
    pub stats: NetStats,
}

impl core::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl VirtioNet {
    /// Brings up the virtio-net function at `bus:dev.func` behind the ECAM at `ecam_base`.
    /// Its BARs must already be assigned and mapped as device memory.
    ///
    /// # Safety
    /// `ecam_base` must be the (mapped) ECAM region of the host bridge, and the function must
    /// not be driven by anything else.
    pub unsafe fn new(ecam_base: usize, bus: u8, dev: u8, func: u8) -> Result<Self, NetError> {
        // SAFETY: guaranteed by the caller.
        let cam = unsafe { MmioCam::new(ecam_base as *mut u8, Cam::Ecam) };
        let mut root = PciRoot::new(cam);
        let df = DeviceFunction {
            bus,
            device: dev,
            function: func,
        };
        let transport =
            PciTransport::new::<VirtioHal, _>(&mut root, df).map_err(NetError::Transport)?;
        let mut raw = VirtIONetRaw::new(transport).map_err(NetError::Device)?;
        raw.disable_interrupts();
        let mut rx_bufs: Vec<Box<[u8]>> = (0..RX_BUFFERS)
            .map(|_| alloc::vec![0u8; BUF_LEN].into_boxed_slice())
            .collect();
        let mut rx_by_token = alloc::vec![None; QUEUE_SIZE];
        for (i, buf) in rx_bufs.iter_mut().enumerate() {
            // SAFETY: the buffer is a stable heap allocation owned by this driver and is not
            // touched until the device returns it through `poll_receive`.
            let token = unsafe { raw.receive_begin(buf) }.map_err(NetError::Device)?;
            rx_by_token[usize::from(token)] = Some(i as u16);
        }
        let tx_bufs: Vec<Box<[u8]>> = (0..TX_BUFFERS)
            .map(|_| alloc::vec![0u8; BUF_LEN].into_boxed_slice())
            .collect();
        Ok(Self {
            raw,
            rx_bufs,
            rx_by_token,
            rx_repost: None,
            tx_free: (0..TX_BUFFERS as u16).rev().collect(),
            tx_bufs,
            tx_by_token: alloc::vec![None; QUEUE_SIZE],
            stats: NetStats::default(),
        })
    }

    /// Lets the device interrupt when frames arrive or sends complete, so an idle poll loop
    /// can sleep in WFI (the interrupt only wakes the core; it is never taken).
    pub fn enable_wakeups(&mut self) {
        self.raw.enable_interrupts();
    }

    /// Clears the device's interrupt (reads the ISR status), dropping the INTx line.
    pub fn ack_wakeup(&mut self) {
        let _ = self.raw.ack_interrupt();
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn repost_rx(&mut self) {
        if let Some(i) = self.rx_repost.take() {
            let buf = &mut self.rx_bufs[usize::from(i)];
            // SAFETY: as in `new`: a stable buffer nobody reads until the device returns it.
            match unsafe { self.raw.receive_begin(buf) } {
                Ok(token) => self.rx_by_token[usize::from(token)] = Some(i),
                Err(_) => self.rx_repost = Some(i),
            }
        }
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(i) = self
                .tx_by_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                break;
            };
            // SAFETY: the same buffer that was passed to `transmit_begin` for this token.
            let _ = unsafe {
                self.raw
                    .transmit_complete(token, &self.tx_bufs[usize::from(i)])
            };
            self.tx_free.push(i);
        }
    }
}

/// A received frame.
#[derive(Debug)]
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    raw: &'a mut VirtIONetRaw<VirtioHal, PciTransport, QUEUE_SIZE>,
    bufs: &'a mut [Box<[u8]>],
    free: &'a mut Vec<u16>,
    by_token: &'a mut [Option<u16>],
    stats: &'a mut NetStats,
}

impl core::fmt::Debug for TxToken<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TxToken")
            .field("free", &self.free.len())
            .finish()
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let i = self
            .free
            .pop()
            .expect("a TxToken is only made with a free buffer");
        let buf = &mut self.bufs[usize::from(i)];
        let hdr = self.raw.fill_buffer_header(buf).unwrap_or(0);
        let len = len.min(buf.len() - hdr);
        let r = f(&mut buf[hdr..hdr + len]);
        // SAFETY: the buffer stays owned by the driver and untouched until `reclaim_tx` sees
        // the device finished with it.
        match unsafe { self.raw.transmit_begin(&buf[..hdr + len]) } {
            Ok(token) => {
                self.by_token[usize::from(token)] = Some(i);
                self.stats.tx_frames += 1;
            }
            Err(_) => self.free.push(i),
        }
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.repost_rx();
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let token = self.raw.poll_receive()?;
        let i = self
            .rx_by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)?;
        let buf = &mut self.rx_bufs[usize::from(i)];
        // SAFETY: the same buffer that was passed to `receive_begin` for this token.
        let (hdr, len) = match unsafe { self.raw.receive_complete(token, buf) } {
            Ok(v) => v,
            Err(_) => {
                self.stats.rx_errors += 1;
                self.rx_repost = Some(i);
                return None;
            }
        };
        self.rx_repost = Some(i);
        self.stats.rx_frames += 1;
        let Self {
            raw,
            rx_bufs,
            tx_bufs,
            tx_free,
            tx_by_token,
            stats,
            ..
        } = self;
        let frame = &rx_bufs[usize::from(i)][hdr..hdr + len];
        Some((
            RxToken { frame },
            TxToken {
                raw,
                bufs: tx_bufs,
                free: tx_free,
                by_token: tx_by_token,
                stats,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let Self {
            raw,
            tx_bufs,
            tx_free,
            tx_by_token,
            stats,
            ..
        } = self;
        Some(TxToken {
            raw,
            bufs: tx_bufs,
            free: tx_free,
            by_token: tx_by_token,
            stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}
