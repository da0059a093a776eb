//! virtio-net over PCI (virtio 1.2 §5.1, §4.1) as a `smoltcp::phy::Device`, on the
//! `virtio-drivers` crate's virtqueues and PCI transport.
//!
//! Receive: every receive buffer stays posted; `receive` hands smoltcp one completed frame and
//! re-posts its buffer on the next call. Transmit: a pool of transmit buffers; a frame is put in
//! the transmit queue as soon as smoltcp fills it and its buffer comes back when the device is
//! done, so the poll loop never waits for a packet.
//!
//! Notifications (virtio 1.2 §2.7.10): each one is a trapped MMIO write, costly under
//! emulation. Frames queued during a pass are announced with one notification at the end of it
//! ([`VirtioNet::flush_tx`]; also after [`TX_KICK_BATCH`] frames, and at the next `receive` if
//! nobody flushed), and with `VIRTIO_F_EVENT_IDX` the driver notifies only when the device
//! asked to be told (the `avail_event` it publishes lies among the newly added entries),
//! for both queues. `virtio-drivers`' own check notifies whenever the device's `avail_event`
//! is behind, i.e. for nearly every buffer while the device is busy.
//!
//! DMA: buffers come from the heap, which is identity-mapped; QEMU's virtio device is cache
//! coherent. A non-coherent board needs cache maintenance in [`VirtioHal::share`].

extern crate alloc;

use alloc::{boxed::Box, vec::Vec};
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::{
    BufferDirection, Hal, PhysAddr,
    queue::VirtQueue,
    transport::{
        DeviceStatus, DeviceType, InterruptStatus, Transport,
        pci::{
            PciTransport,
            bus::{Cam, DeviceFunction, MmioCam, PciRoot},
        },
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
/// Where the virtio-net header starts in a buffer: the Ethernet frame follows it at byte 18,
/// so the TCP payload of an IPv4 frame without options (14 + 20 + 20 bytes of headers) starts
/// at byte 72, 8-byte aligned like the buffer, and the copies between frames and socket
/// buffers take `memcpy`'s word-at-a-time path instead of its byte-assembling one.
const BUF_SHIFT: usize = 6;
/// Ethernet MTU: an IP MTU of 1496, so TCP segments carry at most 1456 bytes, a multiple of
/// 8: a stream copied in full segments stays 8-byte aligned segment after segment.
pub const MTU: usize = 1510;

/// A frame buffer: 8-byte aligned memory seen as bytes.
type Buf = Box<[u64]>;

fn new_buf() -> Buf {
    alloc::vec![0u64; BUF_LEN / 8].into_boxed_slice()
}

fn bytes(b: &Buf) -> &[u8] {
    zerocopy::IntoBytes::as_bytes(&**b)
}

fn bytes_mut(b: &mut Buf) -> &mut [u8] {
    zerocopy::IntoBytes::as_mut_bytes(&mut **b)
}
/// Frames queued without a notification before the driver notifies anyway.
pub const TX_KICK_BATCH: u16 = 32;

const QUEUE_RECEIVE: u16 = 0;
const QUEUE_TRANSMIT: u16 = 1;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// VIRTIO_F_RING_EVENT_IDX.
const F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_VERSION_1.
const F_VERSION_1: u64 = 1 << 32;
/// `struct virtio_net_hdr` with VERSION_1 (§5.1.6): 12 bytes, all zero on transmit (no
/// offloads negotiated).
const NET_HDR_LEN: usize = 12;

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

/// The PCI transport, remembering where each queue's device area (used ring) is, so the
/// driver can read the `avail_event` the device publishes after the used ring (§2.7.10).
struct Recorded {
    inner: PciTransport,
    device_area: [PhysAddr; 2],
}

impl Transport for Recorded {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(a) = self.device_area.get_mut(usize::from(queue)) {
            *a = device_area;
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

/// `vring_need_event` (§2.7.10): with `VIRTIO_F_EVENT_IDX`, notify when the device's
/// `avail_event` is one of the entries added since the last notification, `[old, new)`.
const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One virtqueue with notification bookkeeping.
struct Queue {
    vq: VirtQueue<VirtioHal, QUEUE_SIZE>,
    index: u16,
    /// Address of the used ring's trailing `avail_event` (EVENT_IDX negotiated), else 0.
    avail_event: usize,
    /// Our count of added buffers (mirrors the avail ring's index: one entry per `add`).
    added: u16,
    /// `added` when the device was last notified (or decided it need not be).
    announced: u16,
}

impl Queue {
    fn new(t: &mut Recorded, index: u16, event_idx: bool) -> Result<Self, NetError> {
        let vq = VirtQueue::new(t, index, false, event_idx).map_err(NetError::Device)?;
        let avail_event = if event_idx {
            // Used ring: flags, idx (u16 each), QUEUE_SIZE elements of 8 bytes, avail_event.
            t.device_area[usize::from(index)] as usize + 4 + 8 * QUEUE_SIZE
        } else {
            0
        };
        Ok(Self {
            vq,
            index,
            avail_event,
            added: 0,
            announced: 0,
        })
    }

    /// Announces the buffers added since the last time, if the device wants to know.
    fn kick(&mut self, t: &mut Recorded) {
        if self.added == self.announced {
            return;
        }
        let notify = if self.avail_event == 0 {
            self.vq.should_notify()
        } else {
            // The avail index (written by `add`) must be visible before we read the device's
            // avail_event, as the device reads them in the other order (§2.7.10).
            fence(Ordering::SeqCst);
            // SAFETY: `avail_event` is the u16 after the used ring of this queue, inside the
            // device area that `VirtQueue` allocated (2-aligned) and keeps for its lifetime;
            // the device writes it concurrently, so it is read volatile.
            let event = unsafe { core::ptr::read_volatile(self.avail_event as *const u16) };
            need_event(event, self.added, self.announced)
        };
        self.announced = self.added;
        if notify {
            t.notify(self.index);
        }
    }
}

/// The device's queues and transport.
struct Raw {
    transport: Recorded,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
}

impl Raw {
    /// Device initialisation (§3.1.1) with MAC, EVENT_IDX (when offered) and VERSION_1.
    fn new(transport: PciTransport) -> Result<Self, NetError> {
        let mut t = Recorded {
            inner: transport,
            device_area: [0; 2],
        };
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(NetError::Device(virtio_drivers::Error::Unsupported));
        }
        let features = offered & (F_MAC | F_EVENT_IDX | F_VERSION_1);
        t.write_driver_features(features);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(NetError::Device(virtio_drivers::Error::Unsupported));
        }
        t.set_guest_page_size(PAGE as u32);
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            mac = t
                .read_consistent(|| {
                    let mut m = [0u8; 6];
                    for (i, b) in m.iter_mut().enumerate() {
                        *b = t.read_config_space::<u8>(i)?;
                    }
                    Ok(m)
                })
                .map_err(NetError::Device)?;
        }
        let event_idx = features & F_EVENT_IDX != 0;
        let rx = Queue::new(&mut t, QUEUE_RECEIVE, event_idx)?;
        let tx = Queue::new(&mut t, QUEUE_TRANSMIT, event_idx)?;
        t.finish_init();
        Ok(Self {
            transport: t,
            rx,
            tx,
            mac,
        })
    }

    /// Posts a receive buffer and tells the device if it waits for one.
    ///
    /// # Safety
    /// `buf` must stay valid and untouched until `pop_used` returns it.
    unsafe fn receive_begin(&mut self, buf: &mut [u8]) -> virtio_drivers::Result<u16> {
        // SAFETY: guaranteed by the caller.
        let token = unsafe { self.rx.vq.add(&[], &mut [buf])? };
        self.rx.added = self.rx.added.wrapping_add(1);
        self.rx.kick(&mut self.transport);
        Ok(token)
    }

    /// Queues a frame (header included) for transmission; the device is told at the next
    /// [`Raw::kick_tx`] (or here, every [`TX_KICK_BATCH`] frames).
    ///
    /// # Safety
    /// `buf` must stay valid and untouched until `pop_used` returns it.
    unsafe fn transmit_begin(&mut self, buf: &[u8]) -> virtio_drivers::Result<u16> {
        // SAFETY: guaranteed by the caller.
        let token = unsafe { self.tx.vq.add(&[buf], &mut [])? };
        self.tx.added = self.tx.added.wrapping_add(1);
        if self.tx.added.wrapping_sub(self.tx.announced) >= TX_KICK_BATCH {
            self.kick_tx();
        }
        Ok(token)
    }

    fn kick_tx(&mut self) {
        self.tx.kick(&mut self.transport);
    }
}

/// A virtio-net NIC.
pub struct VirtioNet {
    raw: Raw,
    rx_bufs: Vec<Buf>,
    /// Receive buffer index by virtqueue token.
    rx_by_token: Vec<Option<u16>>,
    /// A buffer handed to smoltcp last time, to re-post.
    rx_repost: Option<u16>,
    tx_bufs: Vec<Buf>,
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
        let mut raw = Raw::new(transport)?;
        raw.rx.vq.set_dev_notify(false);
        raw.tx.vq.set_dev_notify(false);
        let mut rx_bufs: Vec<Buf> = (0..RX_BUFFERS).map(|_| new_buf()).collect();
        let mut rx_by_token = alloc::vec![None; QUEUE_SIZE];
        for (i, buf) in rx_bufs.iter_mut().enumerate() {
            // SAFETY: the buffer is a stable heap allocation owned by this driver and is not
            // touched until the device returns it through the used ring.
            let token = unsafe { raw.receive_begin(&mut bytes_mut(buf)[BUF_SHIFT..]) }
                .map_err(NetError::Device)?;
            rx_by_token[usize::from(token)] = Some(i as u16);
        }
        let tx_bufs: Vec<Buf> = (0..TX_BUFFERS).map(|_| new_buf()).collect();
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
        self.raw.rx.vq.set_dev_notify(true);
        self.raw.tx.vq.set_dev_notify(true);
    }

    /// Clears the device's interrupt (reads the ISR status), dropping the INTx line.
    pub fn ack_wakeup(&mut self) {
        let _ = self.raw.transport.ack_interrupt();
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac
    }

    /// Tells the device about the frames queued since the last call (one notification for
    /// all of them, and none when the device is still working through the queue). Call after
    /// each pass of the network stack.
    pub fn flush_tx(&mut self) {
        self.raw.kick_tx();
    }

    fn repost_rx(&mut self) {
        if let Some(i) = self.rx_repost.take() {
            let buf = &mut self.rx_bufs[usize::from(i)];
            // SAFETY: as in `new`: a stable buffer nobody reads until the device returns it.
            match unsafe { self.raw.receive_begin(&mut bytes_mut(buf)[BUF_SHIFT..]) } {
                Ok(token) => self.rx_by_token[usize::from(token)] = Some(i),
                Err(_) => self.rx_repost = Some(i),
            }
        }
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.tx.vq.peek_used() {
            let Some(i) = self
                .tx_by_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                break;
            };
            // SAFETY: the buffer that was passed to `transmit_begin` for this token (the
            // length does not matter: `VirtioHal::unshare` does nothing).
            let _ = unsafe {
                self.raw
                    .tx
                    .vq
                    .pop_used(token, &[bytes(&self.tx_bufs[usize::from(i)])], &mut [])
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
    raw: &'a mut Raw,
    bufs: &'a mut [Buf],
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
        let buf = &mut bytes_mut(&mut self.bufs[usize::from(i)])[BUF_SHIFT..];
        let hdr = NET_HDR_LEN;
        buf[..hdr].fill(0);
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
        // Frames a previous pass left unannounced (nobody called `flush_tx`).
        self.raw.kick_tx();
        self.repost_rx();
        self.reclaim_tx();
        if self.tx_free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let token = self.raw.rx.vq.peek_used()?;
        let i = self
            .rx_by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)?;
        let buf = &mut self.rx_bufs[usize::from(i)];
        // SAFETY: the same buffer that was passed to `receive_begin` for this token.
        let used = unsafe {
            self.raw
                .rx
                .vq
                .pop_used(token, &[], &mut [&mut bytes_mut(buf)[BUF_SHIFT..]])
        };
        let frame = used.ok().and_then(|n| {
            let n = usize::try_from(n).ok()?.min(BUF_LEN - BUF_SHIFT);
            Some((NET_HDR_LEN, n.checked_sub(NET_HDR_LEN)?))
        });
        let (hdr, len) = match frame {
            Some(v) => v,
            None => {
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
        let frame = &bytes(&rx_bufs[usize::from(i)])[BUF_SHIFT + hdr..BUF_SHIFT + hdr + len];
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
