//! The seams between the services and the hardware.
//!
//! The services (configuration, plan, network stack, NVMe/TCP, management, the wiring of the
//! controller core, drives and emulated functions) are generic over [`Hw`]: they never name a
//! register, a device or a clock, so they build for the host and their unit tests run there
//! (`cargo test -p keel-firmware`), the NVMe/TCP service over smoltcp's `Loopback` device with
//! keel-nvmf-tcp's host state machine as the peer. The image implements [`Hw`] for the QEMU
//! `virt` board with `keel-hal`'s drivers (module `qemu`); a DPU board is another
//! implementation.

use alloc::boxed::Box;
use keel_nvme_pcie::EndpointFunction;
use keel_storage::BlockBackend;

/// What the services need from the board: its devices (as types) and a few facts (as
/// associated functions, so nothing has to be carried around).
pub trait Hw: 'static {
    /// The network interface.
    type Nic: Nic;
    /// The endpoint of an emulated NVMe PCIe function.
    type Window: EndpointFunction;
    /// A local NVMe drive's controller (polled).
    type DriveCtl: DriveCtl;
    /// A local drive namespace as a block backend.
    type DriveNs: BlockBackend + 'static;
    /// The flash that holds the configuration copies.
    type Flash: Flash;

    /// The board's name (status reports).
    const BOARD: &'static str;

    /// Nanoseconds since reset (monotonic).
    fn now_ns() -> u64;
    /// The raw counter (mixed into management challenges).
    fn counter() -> u64;
    /// Bytes free on the heap (large allocations are checked against it first: an allocation
    /// failure ends the firmware).
    fn heap_free() -> usize;
    /// 64 bits from the CPU's random number instruction, if it has one.
    fn random() -> Option<u64>;
    /// Whether the CPU has the instructions AES-XTS needs (AES and PMULL).
    fn has_aes() -> bool;
    /// Resets the system.
    fn system_reset() -> !;
    /// Every running core's poll loop and its counters (status and `/metrics`), read without
    /// a lock from counters each core writes alone.
    fn cores() -> alloc::vec::Vec<keel_mgmt::CoreInfo>;
    /// What the other cores' targets counted for a namespace (the I/O queues they serve
    /// themselves), latency histograms included; core 0's own target's counters are not.
    fn namespace_elsewhere(_subnqn: &str, _nsid: u32) -> keel_storage::stats::NsStats {
        keel_storage::stats::NsStats::default()
    }
    /// What the other cores' targets admitted through a namespace's or group's QoS limits
    /// (`keel_controller::limit_key` / `group_key`; their part of the limits, split across
    /// the cores); core 0's own target's are not included. None by default.
    fn limit_elsewhere(_key: u32) -> keel_qos::LimiterStats {
        keel_qos::LimiterStats::default()
    }
    /// The other cores' commands at a capped drive domain's backend (`key`, as
    /// `keel_controller::CappedDomain::key`), as each last published them; core 0's own
    /// are not included. None by default.
    fn domain_inflight_elsewhere(_key: u32) -> u32 {
        0
    }
    /// The NIC's transmit counters, every core's queue pair together, as each core last
    /// published them. None by default.
    fn nic_counters() -> keel_mgmt::NicCounters {
        keel_mgmt::NicCounters::default()
    }
    /// The other cores' I/O queue pairs on drive `drive` (index among the drives), as each
    /// core last published them (`crate::shares`). None by default.
    fn drive_queues_elsewhere(_drive: usize) -> alloc::vec::Vec<keel_mgmt::DriveQueueInfo> {
        alloc::vec::Vec::new()
    }
    /// The other cores' I/O queues of remote volume `volume` (its id), as each core last
    /// published them (`crate::shares`). None by default.
    fn remote_queues_elsewhere(_volume: u32) -> alloc::vec::Vec<crate::shares::LaneRow> {
        alloc::vec::Vec::new()
    }
    /// The other cores' lanes of remote volume `volume` together: their requests' counts
    /// and counters, as each core last published them (`crate::shares`). None by default.
    fn remote_load_elsewhere(_volume: u32) -> keel_remote::VolumeLoad {
        keel_remote::VolumeLoad::default()
    }
}

/// What the status says of a drive (read on core 0).
#[derive(Debug, Clone, Default)]
pub struct DriveStatus {
    /// Identify Controller model number.
    pub model: alloc::string::String,
    /// `online`, `resetting`, `dead`, `shut down`.
    pub state: &'static str,
    /// Controller resets started since it came up.
    pub resets: u64,
    /// Abort commands sent.
    pub aborts: u64,
    /// Its own I/O queue pairs (core 0's): how many.
    pub io_queues: u16,
    /// Their counters.
    pub own: crate::shares::QueueCounters,
}

/// A network interface: a smoltcp device, its MAC, and a hook run after each pass of the
/// stack (virtio-net notifies the device once for the frames of a pass).
pub trait Nic: smoltcp::phy::Device {
    /// The MAC address.
    fn mac(&self) -> [u8; 6];
    /// Sends what the last pass queued.
    fn flush_tx(&mut self) {}
    /// Its transmit counters (none by default).
    fn counters(&self) -> keel_mgmt::NicCounters {
        keel_mgmt::NicCounters::default()
    }
}

/// A local drive's controller: polled once per pass (doorbells, completions, timeouts,
/// recovery).
pub trait DriveCtl {
    /// One pass; whether anything happened.
    fn poll(&self, now_ns: u64) -> bool;
    /// Commands submitted to the drive and not yet completed.
    fn outstanding(&self) -> usize;
    /// I/O queue pairs it created for other cores (`keel_nvme_driver::CoreQueue`).
    fn core_queues(&self) -> usize {
        0
    }
    /// Model, state and core 0's own queue pairs' counters (status; none by default).
    fn status(&self) -> DriveStatus {
        DriveStatus::default()
    }
}

/// Flash that can be read, erased by sectors and programmed.
pub trait Flash {
    /// Why an operation failed.
    type Error: core::fmt::Display;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Erases `len` bytes (whole sectors) at `offset`.
    fn erase(&mut self, offset: usize, len: usize) -> Result<(), Self::Error>;
    /// Programs erased flash at `offset`.
    fn program(&mut self, offset: usize, data: &[u8]) -> Result<(), Self::Error>;
    /// The erase sector size.
    fn sector_size(&self) -> usize;
}

/// A page-aligned, uninitialised region for data buffers that devices reach by DMA (the heap
/// is identity-mapped: the address is also the DMA address), for a lazily carved
/// `BufPool::lazy`. Lives for the rest of the run.
pub fn dma_region(len: usize) -> &'static mut [core::mem::MaybeUninit<u8>] {
    const PAGE: usize = 4096;
    let raw = Box::leak(Box::<[u8]>::new_uninit_slice(len + PAGE));
    let skip = raw.as_ptr().align_offset(PAGE).min(PAGE);
    &mut raw[skip..skip + len]
}
