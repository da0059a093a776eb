//! [`Hw`] for the QEMU `virt` board: keel-hal's drivers behind the services' seams
//! (virtio-net, the ivshmem window, the poll-mode NVMe driver, CFI flash, the generic timer,
//! RNDR, PSCI), and the board-side steps of loading the identity.

use crate::hw::{DriveCtl, Flash, Hw, Nic};
use crate::klog;
use crate::provisioned::Identity;
use alloc::boxed::Box;
use keel_hal::arch::{cpu, power, rng, timer};
use keel_hal::flash::{CfiFlash, FlashError};
use keel_hal::ivshmem::IvshmemWindow;
use keel_hal::nvme::{NvmeBackend, NvmeDrive};
use keel_hal::virtio_net::{NetControl, QueuePair, RxToken, TxToken, VirtioNet};
use keel_provision::flash::SECTOR_SIZE;
use smoltcp::phy::{Device, DeviceCapabilities};
use smoltcp::time::Instant;

/// The QEMU `virt` board.
#[derive(Debug)]
pub struct Qemu;

impl Hw for Qemu {
    type Nic = QemuNic;
    type Window = IvshmemWindow;
    type DriveCtl = NvmeDrive;
    type DriveNs = NvmeBackend;
    type Flash = CfiFlash;

    const BOARD: &'static str = keel_board::BOARD.name;

    fn now_ns() -> u64 {
        timer::now_ns()
    }
    fn counter() -> u64 {
        timer::counter()
    }
    fn heap_free() -> usize {
        crate::platform::heap_free()
    }
    fn random() -> Option<u64> {
        rng::rndr()
    }
    fn has_aes() -> bool {
        let f = cpu::Features::read();
        f.aes && f.pmull
    }
    fn system_reset() -> ! {
        power::system_reset()
    }
    fn cores() -> alloc::vec::Vec<keel_mgmt::CoreInfo> {
        crate::cores::counters()
    }
    fn namespace_elsewhere(subnqn: &str, nsid: u32) -> keel_storage::stats::NsStats {
        crate::cores::namespace_elsewhere(subnqn, nsid)
    }
    fn limit_elsewhere(key: u32) -> keel_qos::LimiterStats {
        crate::shares::limit_counters_elsewhere(
            &crate::cores::DEMANDS,
            crate::cores::running_mask(),
            crate::shares::demand_row(0, false),
            key,
        )
    }
    fn domain_inflight_elsewhere(key: u32) -> u32 {
        crate::shares::domain_inflight_elsewhere(
            &crate::cores::DEMANDS,
            crate::cores::running_mask(),
            crate::shares::demand_row(0, false),
            key,
        )
    }
    fn nic_counters() -> keel_mgmt::NicCounters {
        crate::cores::nic_counters()
    }
    fn drive_queues_elsewhere(drive: usize) -> alloc::vec::Vec<keel_mgmt::DriveQueueInfo> {
        crate::cores::drive_queues_elsewhere(drive)
    }
    fn remote_queues_elsewhere(volume: u32) -> alloc::vec::Vec<crate::shares::LaneRow> {
        crate::cores::remote_queues_elsewhere(volume)
    }
    fn remote_load_elsewhere(volume: u32) -> keel_remote::VolumeLoad {
        crate::shares::lane_volume_totals(
            &crate::cores::LANE_VOLUMES,
            crate::cores::running_mask(),
            volume,
        )
    }
}

/// The NIC of one core's network stack: the whole single-queue virtio-net (one core), or
/// one queue pair of a multiqueue one (core `k` has pair `k`; core 0 also keeps the device's
/// control part, whose interrupt status it acknowledges).
#[derive(Debug)]
pub enum QemuNic {
    /// One queue pair, one core.
    Single(VirtioNet),
    /// A pair of a multiqueue NIC.
    Pair {
        /// The MAC address (every pair's).
        mac: [u8; 6],
        /// The pair.
        pair: QueuePair,
        /// The control part (core 0 only).
        control: Option<Box<NetControl>>,
    },
}

impl QemuNic {
    /// Lets the device interrupt when frames arrive on this NIC's queue(s).
    pub fn enable_wakeups(&mut self) {
        match self {
            QemuNic::Single(n) => n.enable_wakeups(),
            QemuNic::Pair { pair, .. } => pair.enable_wakeups(),
        }
    }

    /// Clears the device's interrupt (where this NIC has the transport); returns whether a
    /// multiqueue NIC had raised it (one queue: always false, nobody else to wake).
    pub fn ack_wakeup(&mut self) -> bool {
        match self {
            QemuNic::Single(n) => {
                n.ack_wakeup();
                false
            }
            QemuNic::Pair {
                control: Some(c), ..
            } => c.ack_wakeup(),
            QemuNic::Pair { .. } => false,
        }
    }

    /// The queue pair, for a pair of a multiqueue NIC.
    pub fn pair(&mut self) -> Option<&mut QueuePair> {
        match self {
            QemuNic::Single(_) => None,
            QemuNic::Pair { pair, .. } => Some(pair),
        }
    }
}

impl Device for QemuNic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        match self {
            QemuNic::Single(n) => n.receive(now),
            QemuNic::Pair { pair, .. } => pair.receive(now),
        }
    }

    fn transmit(&mut self, now: Instant) -> Option<TxToken<'_>> {
        match self {
            QemuNic::Single(n) => n.transmit(now),
            QemuNic::Pair { pair, .. } => pair.transmit(now),
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        match self {
            QemuNic::Single(n) => n.capabilities(),
            QemuNic::Pair { pair, .. } => pair.capabilities(),
        }
    }
}

impl Nic for QemuNic {
    fn mac(&self) -> [u8; 6] {
        match self {
            QemuNic::Single(n) => n.mac(),
            QemuNic::Pair { mac, .. } => *mac,
        }
    }
    fn flush_tx(&mut self) {
        match self {
            QemuNic::Single(n) => n.flush_tx(),
            QemuNic::Pair { pair, .. } => pair.flush_tx(),
        }
    }
    fn counters(&self) -> keel_mgmt::NicCounters {
        let s = match self {
            QemuNic::Single(n) => n.stats(),
            QemuNic::Pair { pair, .. } => pair.stats,
        };
        keel_mgmt::NicCounters {
            tx_tso_frames: s.tx_tso_frames,
            tx_dropped: s.tx_dropped,
        }
    }
}

impl DriveCtl for NvmeDrive {
    fn poll(&self, now_ns: u64) -> bool {
        NvmeDrive::poll(self, now_ns)
    }
    fn outstanding(&self) -> usize {
        self.with(|c| c.outstanding()).unwrap_or(0)
    }
    fn core_queues(&self) -> usize {
        self.info().map_or(0, |i| usize::from(i.core_queues))
    }
    fn status(&self) -> crate::hw::DriveStatus {
        use keel_hal::nvme::driver::State;
        let s = self.stats();
        let info = self.info();
        crate::hw::DriveStatus {
            model: info.as_ref().map(|i| i.model.clone()).unwrap_or_default(),
            state: match self.state() {
                State::Online => "online",
                State::Resetting => "resetting",
                State::Dead => "dead",
                State::ShutDown => "shut down",
            },
            resets: s.resets,
            aborts: s.aborts,
            io_queues: info.map_or(0, |i| i.io_queues),
            own: crate::shares::queue_counters!(s),
        }
    }
}

impl Flash for CfiFlash {
    type Error = FlashError;
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), FlashError> {
        CfiFlash::read(self, offset, buf)
    }
    fn erase(&mut self, offset: usize, len: usize) -> Result<(), FlashError> {
        CfiFlash::erase(self, offset, len)
    }
    fn program(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        CfiFlash::program(self, offset, data)
    }
    fn sector_size(&self) -> usize {
        CfiFlash::sector_size(self)
    }
}

/// Reads the identity block from flash bank 1 (the device key; on a real DPU it would come
/// from OTP fuses or a secure element) and opens flash bank 0 (configuration copies).
pub fn load_identity(platform: &crate::platform::Platform) -> Identity<CfiFlash> {
    let bank = |i: usize| {
        platform.dt.flash.get(i).map(|r| {
            // SAFETY: the device tree names this region a cfi-flash bank; the platform maps
            // it as Device memory and the firmware runs from RAM (the entry code copies the
            // image out of flash), so nothing else uses it.
            unsafe { CfiFlash::new(r.base as usize, r.size as usize, SECTOR_SIZE) }
        })
    };
    let device_key = match bank(1) {
        None => {
            klog::warning!("identity: no flash bank 1: no device key");
            None
        }
        Some(mut b) => {
            let mut block = [0u8; keel_provision::identity::IDENTITY_LEN];
            match b.read(0, &mut block) {
                Err(e) => {
                    klog::warning!("identity: {}: no device key", klog::D(&e));
                    None
                }
                Ok(()) => match keel_provision::parse_identity(&block) {
                    Ok(k) => {
                        klog::info!(
                            "identity: device key from flash bank 1 (QEMU stand-in for OTP/secure element)"
                        );
                        Some(k)
                    }
                    Err(keel_provision::IdentityError::Empty) => {
                        klog::info!(
                            "identity: flash bank 1 holds no identity block: no device key"
                        );
                        None
                    }
                    Err(e) => {
                        klog::warning!(
                            "identity: {}: no device key (encrypted provisioned namespaces cannot be opened)",
                            klog::D(&e)
                        );
                        None
                    }
                },
            }
        }
    };
    Identity::new(device_key, bank(0))
}
