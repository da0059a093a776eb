//! [`Hw`] for the QEMU `virt` board: keel-hal's drivers behind the services' seams
//! (virtio-net, the ivshmem window, the poll-mode NVMe driver, CFI flash, the generic timer,
//! RNDR, PSCI), and the board-side steps of loading the identity.

use crate::hw::{DriveCtl, Flash, Hw, Nic};
use crate::klog;
use crate::provisioned::Identity;
use keel_hal::arch::{cpu, power, rng, timer};
use keel_hal::flash::{CfiFlash, FlashError};
use keel_hal::ivshmem::IvshmemWindow;
use keel_hal::nvme::{NvmeBackend, NvmeDrive};
use keel_hal::virtio_net::VirtioNet;
use keel_provision::flash::SECTOR_SIZE;

/// The QEMU `virt` board.
#[derive(Debug)]
pub struct Qemu;

impl Hw for Qemu {
    type Nic = VirtioNet;
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
}

impl Nic for VirtioNet {
    fn mac(&self) -> [u8; 6] {
        VirtioNet::mac(self)
    }
    fn flush_tx(&mut self) {
        VirtioNet::flush_tx(self)
    }
}

impl DriveCtl for NvmeDrive {
    fn poll(&self, now_ns: u64) -> bool {
        NvmeDrive::poll(self, now_ns)
    }
    fn outstanding(&self) -> usize {
        self.with(|c| c.outstanding()).unwrap_or(0)
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
