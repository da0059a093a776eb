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
//! is behind, i.e. for nearly every buffer while the device is busy. A notification lost to
//! the event-index race (QEMU's TCG drops the guest's barriers with one vCPU) would stop a
//! queue for good; `flush_tx` spots a device parked at an entry already published and
//! notifies it once ([`crate::vring`]).
//!
//! Multiqueue (VIRTIO_NET_F_MQ, §5.1.6.5.5): [`multiqueue`] sets up one receive/transmit
//! virtqueue pair per core. Each [`QueuePair`] is a `smoltcp::phy::Device` of its own that
//! notifies the device through its own notification registers (their addresses are computed
//! once at bring-up from the PCI capabilities, §4.1.4.4), so cores never share driver state;
//! the transport and the control virtqueue stay with the control core ([`NetControl`]). With
//! one core, [`VirtioNet`] is the same pair plus the transport, and MQ is not negotiated.
//!
//! Checksum offload (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, §5.1.6.2, §5.1.6.4), when the
//! device offers it: smoltcp leaves TCP checksums to the device on transmit and verifies no
//! TCP/UDP checksum on receive, the driver marks sent TCP segments `NEEDS_CSUM` and checks
//! the received frames the device did not flag ([`Offloads`], [`crate::netcsum`]).
//!
//! TCP segmentation offload (VIRTIO_NET_F_HOST_TSO4, §5.1.6.2), when the device offers it with
//! CSUM: smoltcp (feature `segmentation-offload`) hands over TCP segments of up to
//! [`TSO_FRAME_MAX`] bytes and the MSS in the packet's `PacketMeta`; the driver sends them from
//! one of [`BIG_TX_BUFFERS`] 64 KiB transmit buffers per pair with `gso_type = GSO_TCPV4`,
//! `gso_size` and `hdr_len` filled in ([`crate::netcsum::offload_tx_gso`]), and the device
//! cuts them into MSS-sized segments. Without it (QEMU's user networking, `--net-socket`)
//! nothing changes: 2 KiB buffers only, one segment per frame.
//!
//! Receive segmentation offload (VIRTIO_NET_F_GUEST_TSO4 with VIRTIO_NET_F_MRG_RXBUF and
//! GUEST_CSUM, §5.1.6.3-§5.1.6.4), when the device offers all three: the device may hand over
//! TCPv4 segments larger than the MTU, spread over several receive buffers. The receive
//! buffers lie end to end in one area and are posted in the order the device takes them, so
//! such a frame is usually contiguous already and smoltcp reads it in place
//! ([`crate::netrx`]); with the offload the buffers are 4608 bytes, enough for a 4 KiB write's
//! frame. Without it, 2 KiB buffers and one buffer per frame, as before.
//!
//! DMA: buffers come from the heap, which is identity-mapped; QEMU's virtio device is cache
//! coherent. A non-coherent board needs cache maintenance in [`VirtioHal::share`].

extern crate alloc;

pub use crate::netcsum::Offloads;
use crate::netcsum::{self, NET_HDR_LEN};
use crate::netrx::{self, RxArea};
use crate::vring::Notifier;
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
            bus::{Cam, ConfigurationAccess, DeviceFunction, MmioCam, PciRoot},
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
/// Bytes per receive buffer with receive segmentation offload: a 4 KiB write's frame (a
/// 4168-byte PDU, 54 bytes of headers and the 12-byte virtio-net header) fits one, so the
/// common large frame costs one used-ring entry and one re-post, not three. A multiple of 8,
/// like `BUF_LEN`, so every frame starts at the same alignment. 256 of them: 1.1 MiB per pair.
const RX_BUF_LEN_TSO: usize = 4608;
/// The receive buffers of a pair, end to end in one area (see [`crate::netrx`]): buffer `i`
/// starts at `BUF_SHIFT + i × buf_len`, so every frame starts where a 2 KiB buffer would
/// start its frame (8-byte aligned TCP payload).
const fn rx_area(rx_tso4: bool) -> RxArea {
    RxArea {
        shift: BUF_SHIFT,
        buf_len: if rx_tso4 { RX_BUF_LEN_TSO } else { BUF_LEN },
        count: RX_BUFFERS,
    }
}
/// Receive segmentation offload: all three negotiated, or none of GUEST_TSO4 and MRG_RXBUF
/// (the driver posts 2 KiB receive buffers, so it takes large segments only merged).
const RX_TSO4: u64 = F_GUEST_TSO4 | F_GUEST_CSUM | F_MRG_RXBUF;
/// Where the virtio-net header starts in a buffer: the Ethernet frame follows it at byte 18,
/// so the TCP payload of an IPv4 frame without options (14 + 20 + 20 bytes of headers) starts
/// at byte 72, 8-byte aligned like the buffer, and the copies between frames and socket
/// buffers take `memcpy`'s word-at-a-time path instead of its byte-assembling one.
const BUF_SHIFT: usize = 6;
/// Large transmit buffers per pair, for TSO frames (only when VIRTIO_NET_F_HOST_TSO4 is
/// negotiated; they take the place of as many 2 KiB ones, so the queue never has more buffers
/// than descriptors). 8 × 64 KiB = 512 KiB per pair, as much as the 2 KiB pool.
pub const BIG_TX_BUFFERS: usize = 8;
/// Bytes per large transmit buffer.
const BIG_BUF_LEN: usize = 64 * 1024;
/// The largest frame (Ethernet header included, as smoltcp counts
/// `SegmentationCapabilities::tcpv4`) a large buffer carries after the virtio-net header:
/// 65518 bytes, an IPv4 total length of at most 65504, within the field's 65535.
pub const TSO_FRAME_MAX: usize = BIG_BUF_LEN - BUF_SHIFT - NET_HDR_LEN;
/// Ethernet MTU: an IP MTU of 1496, so TCP segments carry at most 1456 bytes, a multiple of
/// 8: a stream copied in full segments stays 8-byte aligned segment after segment.
pub const MTU: usize = 1510;

/// A frame buffer: 8-byte aligned memory seen as bytes.
type Buf = Box<[u64]>;

fn new_buf() -> Buf {
    alloc::vec![0u64; BUF_LEN / 8].into_boxed_slice()
}

fn new_big_buf() -> Buf {
    alloc::vec![0u64; BIG_BUF_LEN / 8].into_boxed_slice()
}

fn bytes(b: &Buf) -> &[u8] {
    zerocopy::IntoBytes::as_bytes(&**b)
}

fn bytes_mut(b: &mut Buf) -> &mut [u8] {
    zerocopy::IntoBytes::as_mut_bytes(&mut **b)
}
/// DMA memory the device writes into while the driver reads other parts of it: kept as a raw
/// pointer, never borrowed whole, so that references exist only over the parts the driver
/// owns at the time (a receive buffer the device has returned).
struct DmaArea {
    ptr: NonNull<u64>,
    len: usize,
}

// SAFETY: the area is exclusively owned by its queue pair (allocated for it, never shared or
// freed), so moving the pair, and the pointer with it, to another core is sound.
unsafe impl Send for DmaArea {}

impl DmaArea {
    /// Zeroed, 8-byte aligned memory of `len` bytes (rounded up to 8), owned for good.
    fn new(len: usize) -> Self {
        let words: Box<[u64]> = alloc::vec![0u64; len.div_ceil(8)].into_boxed_slice();
        let ptr = NonNull::new(Box::into_raw(words).cast::<u64>()).expect("Box is non-null");
        Self { ptr, len }
    }

    /// The bytes `r`.
    ///
    /// # Safety
    /// No device may be writing to them while the slice lives, and no `slice_mut` of them
    /// may exist.
    unsafe fn slice(&self, r: core::ops::Range<usize>) -> &[u8] {
        assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: inside the allocation (checked above); the caller guarantees nothing writes
        // the bytes meanwhile.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>().add(r.start), r.len()) }
    }

    /// The bytes `r`, to hand to the device.
    ///
    /// # Safety
    /// No other slice of these bytes may exist while this one lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, r: core::ops::Range<usize>) -> &mut [u8] {
        assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: inside the allocation (checked above); exclusive by the caller's guarantee.
        unsafe {
            core::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>().add(r.start), r.len())
        }
    }
}

/// Frames queued without a notification before the driver notifies anyway.
pub const TX_KICK_BATCH: u16 = 32;

/// VIRTIO_NET_F_CSUM: the device completes the TCP/UDP checksum of frames the driver marks
/// with `VIRTIO_NET_HDR_F_NEEDS_CSUM` (§5.1.6.2).
const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: received frames may come flagged `VIRTIO_NET_HDR_F_DATA_VALID`
/// (checksum verified) or `NEEDS_CSUM` (partial checksum from a local sender) (§5.1.6.4).
const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4: the device may hand over TCPv4 segments larger than the MTU
/// (`VIRTIO_NET_HDR_GSO_TCPV4`, §5.1.6.4); requires VIRTIO_NET_F_GUEST_CSUM (§5.1.3.1).
const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_MRG_RXBUF: a received frame may spread over several receive buffers, the
/// header's `num_buffers` saying how many (§5.1.6.3.1, §5.1.6.4).
const F_MRG_RXBUF: u64 = 1 << 15;
/// VIRTIO_NET_F_HOST_TSO4: the device takes TCPv4 frames larger than the MTU and segments
/// them (`VIRTIO_NET_HDR_GSO_TCPV4`, §5.1.6.2); requires VIRTIO_NET_F_CSUM (§5.1.3.1).
const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_CTRL_VQ: the control virtqueue.
const F_CTRL_VQ: u64 = 1 << 17;
/// VIRTIO_NET_F_MQ: several receive/transmit virtqueue pairs.
const F_MQ: u64 = 1 << 22;
/// Offset of `max_virtqueue_pairs` in `struct virtio_net_config` (§5.1.4).
const CONFIG_MAX_PAIRS: usize = 8;
/// VIRTIO_F_RING_EVENT_IDX.
const F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_VERSION_1.
const F_VERSION_1: u64 = 1 << 32;

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
    /// Notifications sent because the device waited for one that was lost
    /// ([`crate::vring::Notifier::rescue`]).
    pub rescued_notifications: u64,
    /// Received frames dropped for a wrong TCP/UDP checksum (checked by the driver when
    /// VIRTIO_NET_F_GUEST_CSUM is negotiated and the device did not validate the frame).
    pub rx_bad_checksum: u64,
    /// Frames sent for the device to segment (VIRTIO_NET_F_HOST_TSO4).
    pub tx_tso_frames: u64,
    /// Frames smoltcp built that the driver could not send (no segmentation header could be
    /// made for a frame larger than one segment): lost, as on a wire.
    pub tx_dropped: u64,
    /// Received frames the device flagged as segments larger than the MTU
    /// (VIRTIO_NET_F_GUEST_TSO4, `gso_type` set).
    pub rx_gso_frames: u64,
    /// Received frames that took more than one receive buffer (VIRTIO_NET_F_MRG_RXBUF).
    pub rx_merged_frames: u64,
    /// Of those, frames whose buffers did not follow each other in memory and were copied
    /// together before smoltcp saw them (one wrapping from the last buffer to the first).
    pub rx_gathered_frames: u64,
}

fn offloads_of(features: u64) -> Offloads {
    Offloads {
        tx_csum: features & F_CSUM != 0,
        rx_csum: features & F_GUEST_CSUM != 0,
        tso4: features & (F_HOST_TSO4 | F_CSUM) == F_HOST_TSO4 | F_CSUM,
        rx_tso4: features & RX_TSO4 == RX_TSO4,
    }
}

/// The PCI transport, remembering where the last queue it set up keeps its device area (used
/// ring), so the driver can read the `avail_event` the device publishes after it (§2.7.10).
struct Recorded {
    inner: PciTransport,
    last_device_area: PhysAddr,
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
        self.last_device_area = device_area;
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

/// Where each virtqueue's notification register is (virtio 1.2 §4.1.4.4: `cap.offset +
/// queue_notify_off × notify_off_multiplier` in the notification capability's BAR). Computed
/// once per queue at bring-up, so a queue pair notifies the device with one write of its
/// own, never through the transport's shared `queue_select` (which would need a lock between
/// cores).
struct NotifyMap {
    /// The common configuration structure (§4.1.4.3).
    common: usize,
    /// Start of the notification region.
    notify: usize,
    multiplier: usize,
}

/// Field offsets of `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3).
mod common_cfg {
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
}

/// `struct virtio_pci_cap` (§4.1.4): cfg_type at +3, bar at +4, offset at +8; the notify
/// capability's `notify_off_multiplier` at +16.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const PCI_CAP_ID_VNDR: u8 = 0x09;

impl NotifyMap {
    /// Reads the common and notification capabilities of the function.
    fn find(
        root: &PciRoot<MmioCam<'_>>,
        cam: &MmioCam<'_>,
        df: DeviceFunction,
    ) -> Result<Self, NetError> {
        let mut common = None;
        let mut notify = None;
        for cap in root.capabilities(df).filter(|c| c.id == PCI_CAP_ID_VNDR) {
            let cfg_type = (cap.private_header >> 8) as u8;
            let bar = cam.read_word(df, cap.offset + 4) as u8;
            let offset = cam.read_word(df, cap.offset + 8) as usize;
            let base = bar_address(cam, df, bar).ok_or(NetError::Layout)?;
            match cfg_type {
                VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => common = Some(base + offset),
                VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                    let multiplier = cam.read_word(df, cap.offset + 16) as usize;
                    notify = Some((base + offset, multiplier));
                }
                _ => {}
            }
        }
        match (common, notify) {
            (Some(common), Some((notify, multiplier))) => Ok(Self {
                common,
                notify,
                multiplier,
            }),
            _ => Err(NetError::Layout),
        }
    }

    /// The notification register of `queue`. Only during bring-up, on the core that owns the
    /// transport: it selects the queue in the common configuration.
    fn address(&self, queue: u16) -> usize {
        // SAFETY: `common` is the mapped common configuration structure of the device this
        // driver owns; queue_select (u16, 2-aligned) and queue_notify_off (u16) are two of its
        // registers. Bring-up runs on one core and the transport is not used meanwhile.
        let off = unsafe {
            ((self.common + common_cfg::QUEUE_SELECT) as *mut u16).write_volatile(queue);
            ((self.common + common_cfg::QUEUE_NOTIFY_OFF) as *const u16).read_volatile()
        };
        self.notify + usize::from(off) * self.multiplier
    }
}

/// The CPU address of memory BAR `bar` (already assigned by enumeration).
fn bar_address(cam: &MmioCam<'_>, df: DeviceFunction, bar: u8) -> Option<usize> {
    if bar > 5 {
        return None;
    }
    let lo = cam.read_word(df, 0x10 + 4 * bar);
    if lo & 1 != 0 {
        return None; // I/O space
    }
    let hi = if (lo >> 1) & 3 == 2 && bar < 5 {
        u64::from(cam.read_word(df, 0x10 + 4 * (bar + 1)))
    } else {
        0
    };
    Some(((hi << 32) | u64::from(lo & !0xf)) as usize)
}

/// One virtqueue with notification bookkeeping.
struct Queue {
    vq: VirtQueue<VirtioHal, QUEUE_SIZE>,
    index: u16,
    /// This queue's notification register.
    notify: usize,
    /// Address of the used ring's trailing `avail_event` (EVENT_IDX negotiated), else 0.
    avail_event: usize,
    /// Address of the used ring's `idx` (EVENT_IDX negotiated), else 0.
    used_idx: usize,
    /// When to notify ([`crate::vring`]).
    notifier: Notifier,
}

impl Queue {
    fn new(
        t: &mut Recorded,
        map: &NotifyMap,
        index: u16,
        event_idx: bool,
    ) -> Result<Self, NetError> {
        let vq = VirtQueue::new(t, index, false, event_idx).map_err(NetError::Device)?;
        // Used ring: flags, idx (u16 each), QUEUE_SIZE elements of 8 bytes, avail_event.
        let (avail_event, used_idx) = if event_idx {
            let used = t.last_device_area as usize;
            (used + 4 + 8 * QUEUE_SIZE, used + 2)
        } else {
            (0, 0)
        };
        Ok(Self {
            vq,
            index,
            notify: map.address(index),
            avail_event,
            used_idx,
            notifier: Notifier::default(),
        })
    }

    /// Announces the buffers added since the last time, if the device wants to know.
    fn kick(&mut self) {
        if self.notifier.unannounced() == 0 {
            return;
        }
        let notify = if self.avail_event == 0 {
            let _ = self.notifier.kick(0);
            self.vq.should_notify()
        } else {
            // The avail index (written by `add`) must be visible before we read the device's
            // avail_event, as the device reads them in the other order (§2.7.10).
            fence(Ordering::SeqCst);
            self.notifier.kick(self.avail_event()) == Some(true)
        };
        if notify {
            notify_queue(self.notify, self.index);
        }
    }

    /// The device's `avail_event` (EVENT_IDX negotiated).
    fn avail_event(&self) -> u16 {
        // SAFETY: `avail_event` is the u16 after the used ring of this queue, inside the
        // device area that `VirtQueue` allocated (2-aligned) and keeps for its lifetime; the
        // device writes it concurrently, so it is read volatile.
        unsafe { core::ptr::read_volatile(self.avail_event as *const u16) }
    }

    /// Once per poll pass: notifies the device if it waits for a notification that was lost
    /// ([`Notifier::rescue`]); returns whether it did.
    fn rescue(&mut self) -> bool {
        if self.avail_event == 0 {
            return false;
        }
        // SAFETY: `used_idx` is the used ring's index of this queue (2-aligned, inside the
        // device area `VirtQueue` keeps for its lifetime), written by the device: read
        // volatile.
        let used = unsafe { core::ptr::read_volatile(self.used_idx as *const u16) };
        let rescue = self.notifier.rescue(self.avail_event(), used);
        if rescue {
            notify_queue(self.notify, self.index);
        }
        rescue
    }
}

/// Writes a queue's index to its notification register (§4.1.5.2).
fn notify_queue(register: usize, index: u16) {
    // SAFETY: `register` is this queue's notification register in the mapped notification
    // region (computed at bring-up); only the queue's owner writes it, a write has no effect
    // beyond telling the device to look at the queue, and no reference to it exists.
    unsafe { (register as *mut u16).write_volatile(index) };
}

/// Why the NIC could not be brought up.
#[derive(Debug)]
pub enum NetError {
    /// The PCI transport could not be set up.
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// The device refused initialisation or buffers.
    Device(virtio_drivers::Error),
    /// The virtio PCI capabilities are missing or point at no memory BAR.
    Layout,
    /// The device refused the number of queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    QueuePairs(u16),
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "virtio PCI transport: {e}"),
            Self::Device(e) => write!(f, "virtio-net: {e}"),
            Self::Layout => f.write_str("virtio-net: no usable common/notify capability"),
            Self::QueuePairs(n) => write!(f, "virtio-net: the device refused {n} queue pairs"),
        }
    }
}

/// The device's transport after initialisation (§3.1.1): features, MAC, queue pairs offered.
struct Device {
    transport: Recorded,
    map: NotifyMap,
    features: u64,
    mac: [u8; 6],
    /// `max_virtqueue_pairs` (1 without VIRTIO_NET_F_MQ).
    max_pairs: u16,
}

impl Device {
    /// Resets the function at `bus:dev.func` and negotiates MAC, EVENT_IDX, CSUM,
    /// GUEST_CSUM, HOST_TSO4 (each when offered, HOST_TSO4 only with CSUM), GUEST_TSO4 with
    /// MRG_RXBUF (only together, and with GUEST_CSUM) and VERSION_1, plus CTRL_VQ and MQ when
    /// `multiqueue`.
    ///
    /// # Safety
    /// As for [`VirtioNet::new`].
    unsafe fn open(
        ecam_base: usize,
        bus: u8,
        dev: u8,
        func: u8,
        multiqueue: bool,
    ) -> Result<Self, NetError> {
        // SAFETY: guaranteed by the caller.
        let cam = unsafe { MmioCam::new(ecam_base as *mut u8, Cam::Ecam) };
        // SAFETY: as above; this second view only reads capabilities and BARs during
        // bring-up, before the transport exists.
        let cam_reader = unsafe { MmioCam::new(ecam_base as *mut u8, Cam::Ecam) };
        let mut root = PciRoot::new(cam);
        let df = DeviceFunction {
            bus,
            device: dev,
            function: func,
        };
        let map = NotifyMap::find(&root, &cam_reader, df)?;
        let transport =
            PciTransport::new::<VirtioHal, _>(&mut root, df).map_err(NetError::Transport)?;
        let mut t = Recorded {
            inner: transport,
            last_device_area: 0,
        };
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(NetError::Device(virtio_drivers::Error::Unsupported));
        }
        let mut wanted = F_MAC | F_EVENT_IDX | F_VERSION_1 | F_CSUM | F_GUEST_CSUM;
        if offered & F_CSUM != 0 {
            // HOST_TSO4 depends on CSUM (§5.1.3.1).
            wanted |= F_HOST_TSO4;
        }
        if offered & RX_TSO4 == RX_TSO4 {
            // GUEST_TSO4 depends on GUEST_CSUM (§5.1.3.1), and with 2 KiB receive buffers the
            // driver takes large segments only spread over several (MRG_RXBUF): both or
            // neither. Without GUEST_TSO4, MRG_RXBUF is not negotiated either, so a device
            // without it (user networking) delivers frames exactly as before.
            wanted |= F_GUEST_TSO4 | F_MRG_RXBUF;
        }
        if multiqueue && offered & (F_CTRL_VQ | F_MQ) == F_CTRL_VQ | F_MQ {
            wanted |= F_CTRL_VQ | F_MQ;
        }
        let features = offered & wanted;
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
        let max_pairs = if features & F_MQ != 0 {
            // `struct virtio_net_config`: mac[6], status (u16), max_virtqueue_pairs (u16).
            t.read_config_space::<u16>(CONFIG_MAX_PAIRS)
                .map_err(NetError::Device)?
                .max(1)
        } else {
            1
        };
        Ok(Self {
            transport: t,
            map,
            features,
            mac,
            max_pairs,
        })
    }

    fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }
}

/// One receive/transmit virtqueue pair with its buffers: a `smoltcp::phy::Device` of its own.
///
/// It needs nothing shared with other pairs or with the transport (its notifications go to
/// its own registers), so it is `Send`: bring it up on core 0 and move it to the core that
/// owns it; that core alone polls it.
pub struct QueuePair {
    pair: u16,
    rx: Queue,
    tx: Queue,
    /// Where the receive buffers lie in `rx_area` ([`rx_area`]).
    rx_layout: RxArea,
    /// The receive buffers.
    rx_area: DmaArea,
    /// Receive buffer index by virtqueue token.
    rx_by_token: Vec<Option<u16>>,
    /// Buffers of the frame handed to smoltcp last time (and of frames dropped), to re-post,
    /// in the order the device used them.
    rx_repost: Vec<u16>,
    /// The buffers of the frame being received: index and bytes the device wrote.
    rx_pieces: Vec<(u16, usize)>,
    /// VIRTIO_NET_F_MRG_RXBUF negotiated: a frame may take several buffers.
    rx_merged: bool,
    /// Transmit buffers: the 2 KiB ones, then (TSO) the [`BIG_TX_BUFFERS`] large ones.
    tx_bufs: Vec<Buf>,
    /// Free 2 KiB transmit buffers.
    tx_free: Vec<u16>,
    /// Free large transmit buffers (empty without TSO).
    tx_big_free: Vec<u16>,
    /// Indices from here on in `tx_bufs` are large buffers.
    tx_small: u16,
    tx_by_token: Vec<Option<u16>>,
    offloads: Offloads,
    /// Received frames this pair's owner does not serve (see [`QueuePair::divert`]).
    divert: Option<fn(&[u8]) -> bool>,
    diverted: Vec<Vec<u8>>,
    /// Frames handed over by another core ([`QueuePair::inject`]), received before the
    /// device's; the one lent to the stack last.
    injected: alloc::collections::VecDeque<Vec<u8>>,
    lent: Vec<u8>,
    /// Counters.
    pub stats: NetStats,
}

/// Frames diverted and not yet taken that a pair keeps at most (more are dropped, as a full
/// receive queue would).
const DIVERTED_MAX: usize = 64;

impl core::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QueuePair")
            .field("pair", &self.pair)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl QueuePair {
    /// Sets up virtqueues `2 × pair` (receive) and `2 × pair + 1` (transmit); before
    /// DRIVER_OK.
    fn new(d: &mut Device, pair: u16) -> Result<Self, NetError> {
        let event_idx = d.event_idx();
        let mut rx = Queue::new(&mut d.transport, &d.map, 2 * pair, event_idx)?;
        let mut tx = Queue::new(&mut d.transport, &d.map, 2 * pair + 1, event_idx)?;
        rx.vq.set_dev_notify(false);
        tx.vq.set_dev_notify(false);
        let offloads = offloads_of(d.features);
        let big = if offloads.tso4 { BIG_TX_BUFFERS } else { 0 };
        let small = TX_BUFFERS - big;
        let tx_bufs = (0..small)
            .map(|_| new_buf())
            .chain((0..big).map(|_| new_big_buf()))
            .collect();
        Ok(Self {
            pair,
            rx,
            tx,
            rx_layout: rx_area(offloads.rx_tso4),
            rx_area: DmaArea::new(rx_area(offloads.rx_tso4).bytes()),
            rx_by_token: alloc::vec![None; QUEUE_SIZE],
            rx_repost: Vec::with_capacity(RX_BUFFERS),
            rx_pieces: Vec::with_capacity(RX_BUFFERS),
            rx_merged: d.features & F_MRG_RXBUF != 0,
            tx_free: (0..small as u16).rev().collect(),
            tx_big_free: (small as u16..(small + big) as u16).rev().collect(),
            tx_small: small as u16,
            tx_bufs,
            tx_by_token: alloc::vec![None; QUEUE_SIZE],
            offloads,
            divert: None,
            diverted: Vec::new(),
            injected: alloc::collections::VecDeque::new(),
            lent: Vec::new(),
            stats: NetStats::default(),
        })
    }

    /// From now on, received frames for which `serves` is false are not handed to the stack
    /// but copied aside for [`QueuePair::take_diverted`] (a core passes frames of flows it
    /// does not serve to the core that does). Off the data path: allocates per frame.
    pub fn divert(&mut self, serves: fn(&[u8]) -> bool) {
        self.divert = Some(serves);
    }

    /// The oldest frame diverted and not yet taken.
    pub fn take_diverted(&mut self) -> Option<Vec<u8>> {
        (!self.diverted.is_empty()).then(|| self.diverted.remove(0))
    }

    /// Queues a frame another pair received (and diverted) to be received here, before the
    /// device's next frames.
    pub fn inject(&mut self, frame: Vec<u8>) {
        self.injected.push_back(frame);
    }

    /// Posts every receive buffer (after DRIVER_OK), in address order (see [`crate::netrx`]).
    fn post_receive_buffers(&mut self) -> Result<(), NetError> {
        self.rx_repost.extend(0..RX_BUFFERS as u16);
        self.repost_rx();
        if self.rx_repost.is_empty() {
            Ok(())
        } else {
            Err(NetError::Device(virtio_drivers::Error::QueueFull))
        }
    }

    /// Which pair this is (0 = virtqueues 0 and 1).
    pub fn index(&self) -> u16 {
        self.pair
    }

    /// Lets the device interrupt when frames arrive or sends complete on this pair, so an
    /// idle poll loop can sleep in WFI (the interrupt only wakes a core; it is never taken).
    pub fn enable_wakeups(&mut self) {
        self.rx.vq.set_dev_notify(true);
        self.tx.vq.set_dev_notify(true);
    }

    /// Tells the device about the frames queued since the last call (one notification for
    /// all of them, and none when the device is still working through the queue). Call after
    /// each pass of the network stack.
    ///
    /// Also, once per pass, gets either queue going again if the device waits for a
    /// notification that was lost ([`crate::vring`]: it happens in QEMU with one vCPU).
    pub fn flush_tx(&mut self) {
        self.tx.kick();
        let rescued = u64::from(self.rx.rescue()) + u64::from(self.tx.rescue());
        self.stats.rescued_notifications += rescued;
    }

    /// Posts the receive buffers waiting in `rx_repost`, in order, and tells the device if
    /// it waits for buffers. A buffer the queue has no room for stays for the next call.
    fn repost_rx(&mut self) {
        if let [i] = *self.rx_repost {
            // One buffer, the common case.
            // SAFETY: buffer `i` of this pair's area, not posted (the device returned it) and
            // no longer read: smoltcp is done with the frame it held.
            let buf = unsafe {
                self.rx_area
                    .slice_mut(self.rx_layout.buffer(usize::from(i)))
            };
            // SAFETY: `buf` is stable DMA memory owned by this pair, untouched by the driver
            // until `pop_used` returns it.
            if let Ok(token) = unsafe { self.rx.vq.add(&[], &mut [buf]) } {
                self.rx.notifier.added();
                self.rx_by_token[usize::from(token)] = Some(i);
                self.rx_repost.clear();
            }
            self.rx.kick();
            return;
        }
        if self.rx_repost.is_empty() {
            return;
        }
        let mut posted = 0;
        for &i in &self.rx_repost {
            // SAFETY: buffer `i` of this pair's area, not posted (the device returned it, or it
            // was never posted) and no longer read: smoltcp is done with the frame it held.
            // It stays untouched by the driver until the device returns it.
            let buf = unsafe {
                self.rx_area
                    .slice_mut(self.rx_layout.buffer(usize::from(i)))
            };
            // SAFETY: `buf` is stable DMA memory owned by this pair, untouched until
            // `pop_used` returns it (above).
            match unsafe { self.rx.vq.add(&[], &mut [buf]) } {
                Ok(token) => {
                    self.rx.notifier.added();
                    self.rx_by_token[usize::from(token)] = Some(i);
                    posted += 1;
                }
                Err(_) => break,
            }
        }
        if posted == self.rx_repost.len() {
            self.rx_repost.clear();
        } else {
            self.rx_repost.drain(..posted);
        }
        self.rx.kick();
    }

    /// Where the frame `pop_frame` took lies: in the area, from its virtio-net header to its
    /// end (`false, at, end`), or, when its buffers do not follow each other there, copied
    /// together into `lent` (`true, 0, len`).
    fn merged_frame(&mut self) -> (bool, usize, usize) {
        if let Some(r) = self.rx_layout.in_place(&self.rx_pieces) {
            return (false, r.start, r.end);
        }
        self.lent.clear();
        for &(i, n) in &self.rx_pieces {
            // SAFETY: a buffer of this frame, returned by the device and not posted again
            // until the frame is done with.
            let b = unsafe { self.rx_area.slice(self.rx_layout.buffer(usize::from(i))) };
            self.lent.extend_from_slice(&b[..n]);
        }
        self.stats.rx_gathered_frames += 1;
        (true, 0, self.lent.len())
    }

    /// Takes the next received frame off the used ring: its buffers (one, or with MRG_RXBUF
    /// as many as its header's `num_buffers`) are queued for re-posting, in `rx_pieces` with
    /// the bytes written. `None` when no frame waits, `Some(false)` for one the driver cannot
    /// use (counted in `rx_errors`).
    fn pop_frame(&mut self) -> Option<bool> {
        self.rx_pieces.clear();
        let mut want = 1;
        while self.rx_pieces.len() < want {
            let Some(token) = self.rx.vq.peek_used() else {
                // The device marks a frame's buffers used together (§5.1.6.4): a frame whose
                // other buffers are not there yet is a device error.
                return if self.rx_pieces.is_empty() {
                    None
                } else {
                    self.stats.rx_errors += 1;
                    Some(false)
                };
            };
            let i = self
                .rx_by_token
                .get_mut(usize::from(token))
                .and_then(Option::take)?;
            // SAFETY: buffer `i`, which the device has finished with (it is in the used
            // ring); the driver alone touches it from here until it is posted again.
            let buf = unsafe {
                self.rx_area
                    .slice_mut(self.rx_layout.buffer(usize::from(i)))
            };
            // SAFETY: the same buffer that was passed to `add` for this token.
            let used = unsafe { self.rx.vq.pop_used(token, &[], &mut [buf]) };
            self.rx_repost.push(i);
            let Some(n) = used.ok().and_then(|n| usize::try_from(n).ok()) else {
                self.stats.rx_errors += 1;
                return Some(false);
            };
            self.rx_pieces.push((i, n.min(self.rx_layout.buf_len)));
            if self.rx_pieces.len() == 1 && self.rx_merged {
                // SAFETY: buffer `i`, returned by the device above and not posted again.
                let first = unsafe { self.rx_area.slice(self.rx_layout.buffer(usize::from(i))) };
                let Some(count) = netrx::num_buffers(&first[..n.min(first.len())]) else {
                    self.stats.rx_errors += 1;
                    return Some(false);
                };
                want = usize::from(count);
            }
        }
        Some(true)
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.tx.vq.peek_used() {
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
                self.tx
                    .vq
                    .pop_used(token, &[bytes(&self.tx_bufs[usize::from(i)])], &mut [])
            };
            if i < self.tx_small {
                self.tx_free.push(i);
            } else {
                self.tx_big_free.push(i);
            }
        }
    }

    /// Whether a frame of any size smoltcp may build fits a free buffer: a 2 KiB one, and
    /// with TSO a large one too (smoltcp sizes a frame before it asks for room).
    fn tx_room(&self) -> bool {
        !self.tx_free.is_empty() && (!self.offloads.tso4 || !self.tx_big_free.is_empty())
    }

    fn tx_token(&mut self) -> TxToken<'_> {
        TxToken {
            tx: &mut self.tx,
            bufs: &mut self.tx_bufs,
            free: &mut self.tx_free,
            big_free: &mut self.tx_big_free,
            by_token: &mut self.tx_by_token,
            stats: &mut self.stats,
            offloads: self.offloads,
            gso_size: None,
        }
    }

    /// The checksum offloads negotiated.
    pub fn offloads(&self) -> Offloads {
        self.offloads
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
    tx: &'a mut Queue,
    bufs: &'a mut [Buf],
    free: &'a mut Vec<u16>,
    big_free: &'a mut Vec<u16>,
    by_token: &'a mut [Option<u16>],
    stats: &'a mut NetStats,
    /// With `tx_csum`, TCP segments leave with a partial checksum; with `tso4`, larger ones
    /// for the device to segment.
    offloads: Offloads,
    /// The MSS smoltcp asked the device to segment this frame by (`PacketMeta`).
    gso_size: Option<core::num::NonZeroU16>,
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
        let hdr = NET_HDR_LEN;
        // A frame larger than a 2 KiB buffer (a TSO frame) takes a large one.
        let big = len > BUF_LEN - BUF_SHIFT - hdr && !self.big_free.is_empty();
        let free = if big { self.big_free } else { self.free };
        let i = free
            .pop()
            .expect("a TxToken is only made with a free buffer");
        let buf = &mut bytes_mut(&mut self.bufs[usize::from(i)])[BUF_SHIFT..];
        buf[..hdr].fill(0);
        let len = len.min(buf.len() - hdr);
        let r = f(&mut buf[hdr..hdr + len]);
        if self.offloads.tx_csum {
            let (h, frame) = buf[..hdr + len].split_at_mut(hdr);
            match self.gso_size {
                Some(mss) if self.offloads.tso4 => {
                    if !netcsum::offload_tx_gso(h, frame, mss.get()) {
                        // smoltcp asks for segmentation only for its TCP segments; a frame
                        // the device cannot be told how to cut is not sent.
                        self.stats.tx_dropped += 1;
                        free.push(i);
                        return r;
                    }
                    self.stats.tx_tso_frames += 1;
                }
                _ => {
                    netcsum::offload_tx(h, frame);
                }
            }
        }
        // SAFETY: the buffer stays owned by the driver and untouched until `reclaim_tx` sees
        // the device finished with it.
        match unsafe { self.tx.vq.add(&[&buf[..hdr + len]], &mut []) } {
            Ok(token) => {
                self.tx.notifier.added();
                // The device is told at the next `flush_tx` (or every TX_KICK_BATCH frames).
                if self.tx.notifier.unannounced() >= TX_KICK_BATCH {
                    self.tx.kick();
                }
                self.by_token[usize::from(token)] = Some(i);
                self.stats.tx_frames += 1;
            }
            Err(_) => free.push(i),
        }
        r
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.gso_size = meta.segmentation_offload_size;
    }
}

impl phy::Device for QueuePair {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // Frames a previous pass left unannounced (nobody called `flush_tx`).
        self.tx.kick();
        self.repost_rx();
        self.reclaim_tx();
        if !self.tx_room() {
            self.stats.tx_full += 1;
            return None;
        }
        // A frame handed over by another core first (`inject`), then the device's.
        let injected = match self.injected.pop_front() {
            Some(f) => {
                self.lent = f;
                true
            }
            None => false,
        };
        // Where the frame is: in `lent` (injected, or gathered from buffers that do not follow
        // each other), or in the receive area, from `at` (virtio-net header) to `end`.
        let (in_lent, at, end) = if injected {
            (true, 0, self.lent.len())
        } else {
            loop {
                let (in_lent, at, end) = if !self.rx_merged {
                    // One buffer per frame (no MRG_RXBUF): the short way.
                    let token = self.rx.vq.peek_used()?;
                    let i = self
                        .rx_by_token
                        .get_mut(usize::from(token))
                        .and_then(Option::take)?;
                    let r = self.rx_layout.buffer(usize::from(i));
                    // SAFETY: buffer `i`, which the device has finished with (it is in the
                    // used ring); the driver alone touches it until it is posted again.
                    let buf = unsafe { self.rx_area.slice_mut(r.clone()) };
                    // SAFETY: the same buffer that was passed to `add` for this token.
                    let used = unsafe { self.rx.vq.pop_used(token, &[], &mut [buf]) };
                    self.rx_repost.push(i);
                    let Some(n) = used.ok().and_then(|n| usize::try_from(n).ok()) else {
                        self.stats.rx_errors += 1;
                        return None;
                    };
                    (false, r.start, r.start + n.min(r.len()))
                } else if !self.pop_frame()? {
                    return None;
                } else {
                    self.merged_frame()
                };
                if end - at < NET_HDR_LEN {
                    self.stats.rx_errors += 1;
                    return None;
                }
                if self.rx_merged && self.rx_pieces.len() > 1 {
                    self.stats.rx_merged_frames += 1;
                }
                let b = if in_lent {
                    &self.lent[at..end]
                } else {
                    // SAFETY: the frame's buffers, returned by the device and not posted
                    // again until smoltcp is done with the frame (`rx_repost`).
                    unsafe { self.rx_area.slice(at..end) }
                };
                let (h, frame) = b.split_at(NET_HDR_LEN);
                if self.rx_merged && netrx::is_gso(h) {
                    self.stats.rx_gso_frames += 1;
                }
                if self.offloads.rx_csum {
                    // smoltcp verifies no TCP/UDP checksum (see `Offloads::apply`): frames
                    // the device did not vouch for are checked here.
                    if !netcsum::rx_trusted(h) && !netcsum::l4_checksum_ok(frame) {
                        self.stats.rx_bad_checksum += 1;
                        self.repost_rx();
                        continue;
                    }
                }
                if let Some(serves) = self.divert
                    && !serves(frame)
                {
                    if self.diverted.len() < DIVERTED_MAX {
                        self.diverted.push(frame.to_vec());
                    }
                    self.repost_rx();
                    continue;
                }
                break (in_lent, at + NET_HDR_LEN, end);
            }
        };
        self.stats.rx_frames += 1;
        let Self {
            lent,
            rx_area,
            tx,
            tx_bufs,
            tx_free,
            tx_big_free,
            tx_by_token,
            stats,
            offloads,
            ..
        } = self;
        let frame = if in_lent {
            &lent[at..end]
        } else {
            // SAFETY: the frame's buffers, returned by the device; they are posted again only
            // at the next `receive`, after smoltcp has consumed this token (it borrows the
            // pair).
            unsafe { rx_area.slice(at..end) }
        };
        Some((
            RxToken { frame },
            TxToken {
                tx,
                bufs: tx_bufs,
                free: tx_free,
                big_free: tx_big_free,
                by_token: tx_by_token,
                stats,
                offloads: *offloads,
                gso_size: None,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.reclaim_tx();
        if !self.tx_room() {
            self.stats.tx_full += 1;
            return None;
        }
        Some(self.tx_token())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        self.offloads.apply(&mut caps.checksum);
        if self.offloads.tso4 {
            caps.segmentation.tcpv4 = core::num::NonZeroUsize::new(TSO_FRAME_MAX);
        }
        caps
    }
}

/// A single-queue virtio-net NIC (one core): one [`QueuePair`] and the transport.
pub struct VirtioNet {
    transport: Recorded,
    mac: [u8; 6],
    pair: QueuePair,
}

impl core::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("stats", &self.pair.stats)
            .finish_non_exhaustive()
    }
}

impl VirtioNet {
    /// Brings up the virtio-net function at `bus:dev.func` behind the ECAM at `ecam_base`
    /// with one queue pair (VIRTIO_NET_F_MQ is not negotiated). Its BARs must already be
    /// assigned and mapped as device memory.
    ///
    /// # Safety
    /// `ecam_base` must be the (mapped) ECAM region of the host bridge, and the function must
    /// not be driven by anything else.
    pub unsafe fn new(ecam_base: usize, bus: u8, dev: u8, func: u8) -> Result<Self, NetError> {
        // SAFETY: guaranteed by the caller.
        let mut d = unsafe { Device::open(ecam_base, bus, dev, func, false) }?;
        let mut pair = QueuePair::new(&mut d, 0)?;
        d.transport.finish_init();
        pair.post_receive_buffers()?;
        Ok(Self {
            transport: d.transport,
            mac: d.mac,
            pair,
        })
    }

    /// Lets the device interrupt when frames arrive or sends complete, so an idle poll loop
    /// can sleep in WFI (the interrupt only wakes the core; it is never taken).
    pub fn enable_wakeups(&mut self) {
        self.pair.enable_wakeups();
    }

    /// Clears the device's interrupt (reads the ISR status), dropping the INTx line.
    pub fn ack_wakeup(&mut self) {
        let _ = self.transport.ack_interrupt();
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The checksum offloads negotiated.
    pub fn offloads(&self) -> Offloads {
        self.pair.offloads
    }

    /// Tells the device about the frames queued since the last call (one notification for
    /// all of them, and none when the device is still working through the queue). Call after
    /// each pass of the network stack.
    pub fn flush_tx(&mut self) {
        self.pair.flush_tx();
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.pair.stats
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.pair.receive(now)
    }

    fn transmit(&mut self, now: Instant) -> Option<TxToken<'_>> {
        self.pair.transmit(now)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.pair.capabilities()
    }
}

/// `VIRTIO_NET_CTRL_MQ` class and its `VQ_PAIRS_SET` command (§5.1.6.5.5), `VIRTIO_NET_OK`.
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
/// Descriptors of the control virtqueue (one command at a time).
const CTRL_QUEUE_SIZE: usize = 16;
/// How long a control command may take.
const CTRL_TIMEOUT_POLLS: u32 = 10_000_000;

/// The part of a multiqueue NIC that stays with the control core: the transport (interrupt
/// status, configuration) and the control virtqueue.
pub struct NetControl {
    transport: Recorded,
    /// The control virtqueue (absent when the device has none: then there is one pair).
    ctrl: Option<VirtQueue<VirtioHal, CTRL_QUEUE_SIZE>>,
    ctrl_notify: usize,
    ctrl_index: u16,
    mac: [u8; 6],
    pairs: u16,
    max_pairs: u16,
    offloads: Offloads,
}

impl core::fmt::Debug for NetControl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetControl")
            .field("pairs", &self.pairs)
            .field("max_pairs", &self.max_pairs)
            .finish_non_exhaustive()
    }
}

impl NetControl {
    /// The MAC address (shared by every pair).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The checksum offloads negotiated (the same for every pair).
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Queue pairs in use.
    pub fn pairs(&self) -> u16 {
        self.pairs
    }

    /// Queue pairs the device offers (`max_virtqueue_pairs`; 1 without multiqueue).
    pub fn max_pairs(&self) -> u16 {
        self.max_pairs
    }

    /// Clears the device's interrupt (reads the ISR status), dropping the INTx line shared
    /// by every pair; returns whether it was raised (by any pair's queues).
    pub fn ack_wakeup(&mut self) -> bool {
        !self.transport.ack_interrupt().is_empty()
    }

    /// Sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and waits for the device's answer.
    fn set_pairs(&mut self, pairs: u16) -> Result<(), NetError> {
        let ctrl = self.ctrl.as_mut().ok_or(NetError::QueuePairs(pairs))?;
        let header = alloc::boxed::Box::new([CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]);
        let data = alloc::boxed::Box::new(pairs.to_le_bytes());
        let mut ack = alloc::boxed::Box::new([0xffu8]);
        // SAFETY: the three buffers are heap allocations that live until `pop_used` below
        // returns them (or until the device is reset: on a timeout they are leaked).
        let token = unsafe { ctrl.add(&[&header[..], &data[..]], &mut [&mut ack[..]]) }
            .map_err(NetError::Device)?;
        notify_queue(self.ctrl_notify, self.ctrl_index);
        let mut polls = 0;
        while ctrl.peek_used() != Some(token) {
            polls += 1;
            if polls > CTRL_TIMEOUT_POLLS {
                core::mem::forget((header, data, ack));
                return Err(NetError::QueuePairs(pairs));
            }
            core::hint::spin_loop();
        }
        // SAFETY: the buffers passed to `add` for this token.
        unsafe { ctrl.pop_used(token, &[&header[..], &data[..]], &mut [&mut ack[..]]) }
            .map_err(NetError::Device)?;
        if ack[0] == CTRL_OK {
            Ok(())
        } else {
            Err(NetError::QueuePairs(pairs))
        }
    }
}

/// Brings up the virtio-net function with up to `want` queue pairs (VIRTIO_NET_F_MQ,
/// virtio 1.2 §5.1.6.5.5): negotiates MQ and the control virtqueue, sets up pairs `0..n`
/// (`n = min(want, max_virtqueue_pairs)`), posts their receive buffers and tells the device
/// to use `n` pairs. Without MQ (the device does not offer it, or `want` is 1) this is one
/// pair. Pair `k` is for core `k`: move it there; the [`NetControl`] stays on the control
/// core.
///
/// The device steers received frames to a pair (QEMU: the tap queue they came from; the
/// kernel's tun keeps a flow on one queue); frames a pair sends leave on its own queue.
///
/// # Safety
/// As for [`VirtioNet::new`].
pub unsafe fn multiqueue(
    ecam_base: usize,
    bus: u8,
    dev: u8,
    func: u8,
    want: u16,
) -> Result<(NetControl, Vec<QueuePair>), NetError> {
    // SAFETY: guaranteed by the caller.
    let mut d = unsafe { Device::open(ecam_base, bus, dev, func, want > 1) }?;
    let n = want.clamp(1, d.max_pairs);
    if d.features & F_CTRL_VQ == 0 {
        // Without a control virtqueue the device uses one pair.
        d.max_pairs = 1;
    }
    let n = n.min(d.max_pairs);
    let mut pairs = (0..n)
        .map(|p| QueuePair::new(&mut d, p))
        .collect::<Result<Vec<_>, _>>()?;
    // The control virtqueue follows every receive/transmit queue the device has (§5.1.2).
    let ctrl_index = 2 * d.max_pairs;
    let ctrl = if d.features & F_CTRL_VQ != 0 {
        Some(VirtQueue::new(&mut d.transport, ctrl_index, false, false).map_err(NetError::Device)?)
    } else {
        None
    };
    d.transport.finish_init();
    for p in &mut pairs {
        p.post_receive_buffers()?;
    }
    let ctrl_notify = d.map.address(ctrl_index);
    let mut control = NetControl {
        transport: d.transport,
        ctrl,
        ctrl_notify,
        ctrl_index,
        mac: d.mac,
        pairs: n,
        max_pairs: d.max_pairs,
        offloads: offloads_of(d.features),
    };
    if n > 1 {
        control.set_pairs(n)?;
    }
    Ok((control, pairs))
}
