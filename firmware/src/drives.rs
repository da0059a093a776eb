//! Local NVMe drives: every PCI function of class 01:08:02 (NVM Express, NVMe I/O controller)
//! found by enumeration is brought up with the poll-mode driver (`keel-nvme-driver` through
//! `keel_hal::nvme`), and each active namespace becomes a block backend.
//!
//! A drive that fails (BAR0 missing, controller that will not enable, …) is reported on the
//! console and skipped; the rest of the firmware carries on.
//!
//! The services ([`crate::services`]) poll every [`LocalDrive`] once per pass (timeouts,
//! Abort, controller reset and CSTS.CFS recovery advance there) and hand each namespace's
//! backend to a namespace of the plan (whole, or shared and cut into slices). Data buffers
//! must carry their real DMA address (`IoBuf::dma_addr()` = physical address; the heap is
//! identity-mapped).

use crate::klog;
use crate::platform::Platform;
use crate::qemu::Qemu;
use crate::services::{DriveNamespace, LocalDrive};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use keel_hal::arch::timer;
use keel_hal::nvme::driver::{Config, Drive, Namespace};
use keel_hal::nvme::{Bar0, HeapDma, NvmeDrive};
use keel_hal::pcie::{Function, Space};
use keel_nvme::identify::Vwc;

/// PCI class of an NVMe I/O controller: mass storage, non-volatile memory, NVMe.
const NVME_CLASS: (u8, u8, u8) = (0x01, 0x08, 0x02);

/// Why a drive was skipped.
#[derive(Debug)]
enum DriveError {
    NoBar,
    Init(keel_hal::nvme::driver::InitError),
}

impl core::fmt::Display for DriveError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoBar => f.write_str("BAR0 is not an assigned memory BAR"),
            Self::Init(e) => write!(f, "{e}"),
        }
    }
}

fn size(bytes: u128) -> String {
    const GIB: u128 = 1 << 30;
    const MIB: u128 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

fn bring_up_one(f: &Function, core_queues: u16) -> Result<NvmeDrive, DriveError> {
    let bar = f
        .bar(0)
        .filter(|b| b.space != Space::Io && b.cpu_addr != 0)
        .ok_or(DriveError::NoBar)?;
    // SAFETY: BAR0 was assigned by enumeration inside a host bridge window that the final
    // page table maps as device memory; this function is driven by nothing else (each NVMe
    // function is brought up once, here).
    let regs =
        unsafe { Bar0::new(bar.cpu_addr as usize, bar.size as usize) }.ok_or(DriveError::NoBar)?;
    let mut clock = timer::now_ns;
    let config = Config {
        core_queues,
        ..Config::default()
    };
    Drive::init(regs, HeapDma, config, &mut clock).map_err(DriveError::Init)
}

/// Brings up every NVMe drive the PCI enumeration found, each with `core_queues` I/O queue
/// pairs for other cores besides its own (one per core serving NVMe/TCP besides core 0; see
/// [`crate::percore`]); logs one line per drive and per namespace, or the reason a drive is
/// skipped.
pub fn bring_up(platform: &Platform, core_queues: u16) -> Vec<LocalDrive<Qemu>> {
    let mut out = Vec::new();
    if platform.dt.pcie.is_none() {
        return out;
    }
    for f in platform.pci.iter().filter(|f| f.class == NVME_CLASS) {
        let drive = match bring_up_one(f, core_queues) {
            Ok(d) => d,
            Err(e) => {
                klog::error!("nvme: {}: {}; drive not used", klog::D(&f.bdf), klog::D(&e));
                continue;
            }
        };
        let Some(info) = drive.info() else { continue };
        klog::info!(
            "nvme: {} {} serial {} fw {}, NVMe {}.{}, {} I/O queue(s) x {} (+{} for other cores), max transfer {} KiB, ONCS {:#x}, volatile write cache {}",
            klog::D(&f.bdf),
            info.model,
            info.serial,
            info.firmware,
            info.version.major(),
            info.version.minor(),
            info.io_queues,
            info.queue_depth,
            info.core_queues,
            info.max_transfer / 1024,
            info.oncs.bits(),
            if info.vwc.contains(Vwc::PRESENT) {
                "yes"
            } else {
                "no"
            },
        );
        let namespaces: Vec<Namespace> = drive.namespaces();
        if namespaces.is_empty() {
            klog::warning!("nvme: {}: no usable namespace", klog::D(&f.bdf));
        }
        let mut nss = Vec::new();
        for (i, ns) in namespaces.iter().enumerate() {
            let g = ns.geometry;
            klog::info!(
                "nvme: {} namespace {}: {} ({} blocks of {} bytes)",
                klog::D(&f.bdf),
                ns.nsid,
                size(g.bytes()),
                g.blocks,
                g.block_size
            );
            if let Some(backend) = drive.backend(i) {
                nss.push(DriveNamespace {
                    nsid: ns.nsid,
                    backend,
                });
            }
        }
        out.push(LocalDrive {
            bdf: format!("{}", f.bdf),
            drive,
            namespaces: nss,
        });
    }
    out
}
