//! The platform description read from a device tree.

use core::fmt;
use fdt::{Fdt, node::FdtNode};
use heapless::{String, Vec};

/// A physical address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// The interrupt controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gic {
    /// GICv2: distributor and CPU interface.
    V2 {
        /// Distributor.
        dist: Region,
        /// CPU interface.
        cpu: Region,
    },
    /// GICv3: distributor and redistributors.
    V3 {
        /// Distributor.
        dist: Region,
        /// Redistributor frames, one per core.
        redist: Region,
    },
}

/// The most cores this build describes (cpu nodes beyond are ignored).
pub const MAX_CPUS: usize = 64;

/// How a secondary core is started (a cpu node's `enable-method`; Linux
/// `Documentation/devicetree/bindings/arm/cpus.yaml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnableMethod {
    /// `"psci"`: PSCI CPU_ON with the node's `reg` as the target MPIDR.
    Psci,
    /// `"spin-table"`: the core waits for an entry address at `cpu-release-addr`.
    SpinTable {
        /// Where to write the entry point.
        release_addr: u64,
    },
    /// Missing or a method this firmware does not know (the core cannot be started).
    Unknown,
}

/// One `/cpus/cpu@N` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuNode {
    /// `reg`: the core's MPIDR_EL1 affinity fields (Aff3 in bits 39:32, Aff2..Aff0 in 23:0).
    pub mpidr: u64,
    /// How to start it.
    pub enable_method: EnableMethod,
}

/// The PSCI conduit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciMethod {
    /// `hvc`.
    Hvc,
    /// `smc`.
    Smc,
}

/// What a PCI host bridge window decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciSpace {
    /// I/O.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory.
    Mem64,
}

/// One entry of a PCI host bridge's `ranges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    /// What it decodes.
    pub space: PciSpace,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// PCI bus address.
    pub pci_base: u64,
    /// CPU address.
    pub cpu_base: u64,
    /// Size.
    pub size: u64,
}

/// A generic ECAM PCIe host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcieHost {
    /// ECAM configuration space.
    pub ecam: Region,
    /// First bus number.
    pub bus_start: u8,
    /// Last bus number.
    pub bus_end: u8,
    /// Address windows.
    pub windows: Vec<PciWindow, 8>,
    /// Legacy INTx routing from `interrupt-map`.
    pub intx: Vec<IntxRoute, 32>,
    /// `interrupt-map-mask` for the child unit address high cell and the pin.
    pub intx_mask: (u32, u32),
}

/// One `interrupt-map` entry of a PCI host bridge: INTx of a device to a GIC interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntxRoute {
    /// Child unit address high cell (bus/device/function bits), before masking.
    pub child_hi: u32,
    /// Pin: 1 = INTA .. 4 = INTD.
    pub pin: u32,
    /// The GIC interrupt ID (SPI n = 32 + n).
    pub intid: u32,
}

impl PcieHost {
    /// The GIC interrupt of INTx `pin` (1..=4) of device `dev` on `bus`.
    pub fn intx_intid(&self, bus: u8, dev: u8, func: u8, pin: u8) -> Option<u32> {
        let hi = (u32::from(bus) << 16) | (u32::from(dev) << 11) | (u32::from(func) << 8);
        let (mhi, mpin) = self.intx_mask;
        self.intx
            .iter()
            .find(|r| r.child_hi & mhi == hi & mhi && r.pin & mpin == u32::from(pin) & mpin)
            .map(|r| r.intid)
    }
}

/// Everything the firmware needs to know about the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// The root `model`.
    pub model: String<64>,
    /// RAM regions.
    pub memory: Vec<Region, 8>,
    /// Reserved ranges (`/memreserve/` and `/reserved-memory`).
    pub reserved: Vec<Region, 8>,
    /// The console UART (PL011).
    pub uart: Option<Region>,
    /// The interrupt controller.
    pub gic: Option<Gic>,
    /// Generic timer frequency, when the device tree overrides CNTFRQ.
    pub timer_frequency: Option<u32>,
    /// Interrupt ID of the EL1 physical timer (non-secure), from the timer's `interrupts`.
    pub timer_intid: Option<u32>,
    /// The PCIe host bridge.
    pub pcie: Option<PcieHost>,
    /// The PSCI conduit.
    pub psci: Option<PsciMethod>,
    /// Number of CPU cores (cpu nodes; at least 1: the one running).
    pub cpus: usize,
    /// The cpu nodes, in device tree order (the boot core among them).
    pub cores: Vec<CpuNode, MAX_CPUS>,
    /// Flash banks (`cfi-flash`).
    pub flash: Vec<Region, 4>,
    /// `/chosen/bootargs` (at most [`MAX_BOOTARGS`] bytes are kept: remote namespace specs
    /// and keys make long command lines).
    pub bootargs: String<MAX_BOOTARGS>,
}

/// Why a device tree could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// Not a flattened device tree (bad magic, size or structure).
    BadDeviceTree,
    /// No `device_type = "memory"` node.
    NoMemory,
    /// More regions of one kind than this build can hold.
    TooMany(&'static str),
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadDeviceTree => f.write_str("not a valid flattened device tree"),
            Self::NoMemory => f.write_str("the device tree describes no memory"),
            Self::TooMany(what) => write!(f, "too many {what} regions in the device tree"),
        }
    }
}

fn regions<'b, 'a>(node: FdtNode<'b, 'a>) -> impl Iterator<Item = Region> + 'a {
    node.reg().into_iter().flatten().map(|r| Region {
        base: r.starting_address as usize as u64,
        size: r.size.unwrap_or(0) as u64,
    })
}

fn first_region(node: FdtNode<'_, '_>) -> Option<Region> {
    regions(node).next()
}

fn compatible_with(node: FdtNode<'_, '_>, names: &[&str]) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|s| names.contains(&s)))
}

fn be_u32(b: &[u8], i: usize) -> Option<u32> {
    let bytes = b.get(i * 4..i * 4 + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn cells(b: &[u8], at: usize, n: usize) -> Option<u64> {
    (0..n).try_fold(0u64, |acc, k| {
        Some((acc << 32) | u64::from(be_u32(b, at + k)?))
    })
}

/// GIC interrupt specifier (type, number) to an interrupt ID: SPI n = 32 + n, PPI n = 16 + n.
fn gic_intid(kind: u32, num: u32) -> Option<u32> {
    match kind {
        0 => Some(32 + num),
        1 => Some(16 + num),
        _ => None,
    }
}

fn parse_intx(fdt: &Fdt<'_>, node: FdtNode<'_, '_>) -> (Vec<IntxRoute, 32>, (u32, u32)) {
    let mut routes = Vec::new();
    let mask = node
        .property("interrupt-map-mask")
        .and_then(|p| Some((be_u32(p.value, 0)?, be_u32(p.value, 3)?)))
        .unwrap_or((0xffff_ffff, 7));
    let Some(map) = node.property("interrupt-map") else {
        return (routes, mask);
    };
    let v = map.value;
    let mut i = 0usize;
    let words = v.len() / 4;
    while i + 5 <= words {
        let (Some(child_hi), Some(pin), Some(phandle)) =
            (be_u32(v, i), be_u32(v, i + 3), be_u32(v, i + 4))
        else {
            break;
        };
        let Some(parent) = fdt.find_phandle(phandle) else {
            break;
        };
        let pac = parent
            .property("#address-cells")
            .and_then(|p| be_u32(p.value, 0))
            .unwrap_or(0) as usize;
        let pic = parent.interrupt_cells().unwrap_or(3);
        let spec = i + 5 + pac;
        if spec + pic > words || pic < 2 {
            break;
        }
        if let (Some(kind), Some(num)) = (be_u32(v, spec), be_u32(v, spec + 1))
            && let Some(intid) = gic_intid(kind, num)
            && routes
                .push(IntxRoute {
                    child_hi,
                    pin,
                    intid,
                })
                .is_err()
        {
            break;
        }
        i = spec + pic;
    }
    (routes, mask)
}

fn parse_pcie(fdt: &Fdt<'_>, node: FdtNode<'_, '_>, parent_addr_cells: usize) -> Option<PcieHost> {
    let ecam = first_region(node)?;
    let (mut bus_start, mut bus_end) = (0u8, ((ecam.size >> 20).saturating_sub(1)).min(255) as u8);
    if let Some(p) = node.property("bus-range")
        && let (Some(a), Some(b)) = (be_u32(p.value, 0), be_u32(p.value, 1))
    {
        bus_start = a.min(255) as u8;
        bus_end = b.min(255) as u8;
    }
    let mut windows = Vec::new();
    if let Some(p) = node.property("ranges") {
        let size_cells = node.cell_sizes().size_cells;
        let entry = 3 + parent_addr_cells + size_cells;
        let count = p.value.len() / 4 / entry;
        for i in 0..count {
            let at = i * entry;
            let hi = be_u32(p.value, at)?;
            let pci_base = cells(p.value, at + 1, 2)?;
            let cpu_base = cells(p.value, at + 3, parent_addr_cells)?;
            let size = cells(p.value, at + 3 + parent_addr_cells, size_cells)?;
            let space = match (hi >> 24) & 3 {
                1 => PciSpace::Io,
                2 => PciSpace::Mem32,
                3 => PciSpace::Mem64,
                _ => continue,
            };
            let w = PciWindow {
                space,
                prefetchable: hi & (1 << 30) != 0,
                pci_base,
                cpu_base,
                size,
            };
            if windows.push(w).is_err() {
                break;
            }
        }
    }
    let (intx, intx_mask) = parse_intx(fdt, node);
    Some(PcieHost {
        ecam,
        bus_start,
        bus_end,
        windows,
        intx,
        intx_mask,
    })
}

/// The cpu nodes under `/cpus` (Devicetree Specification v0.4 §3.7, §3.8): `reg` with the
/// node's `#address-cells` (1 or 2) is the MPIDR affinity; nodes with `status = "fail"` are
/// left out. A missing `/cpus` or `reg` is not an error: the boot core runs regardless.
fn parse_cpus(fdt: &Fdt<'_>) -> Vec<CpuNode, MAX_CPUS> {
    let mut cores = Vec::new();
    let Some(cpus) = fdt.find_node("/cpus") else {
        return cores;
    };
    let address_cells = cpus
        .property("#address-cells")
        .and_then(|p| be_u32(p.value, 0))
        .unwrap_or(1) as usize;
    for node in cpus.children() {
        let is_cpu = node
            .property("device_type")
            .and_then(|p| p.as_str())
            .is_some_and(|t| t == "cpu")
            || node.name.split('@').next() == Some("cpu");
        let failed = node
            .property("status")
            .and_then(|p| p.as_str())
            .is_some_and(|s| s == "fail" || s.starts_with("fail-"));
        if !is_cpu || failed {
            continue;
        }
        let Some(mpidr) = node
            .property("reg")
            .filter(|_| (1..=2).contains(&address_cells))
            .and_then(|p| cells(p.value, 0, address_cells))
        else {
            continue;
        };
        let enable_method = match node.property("enable-method").and_then(|p| p.as_str()) {
            Some("psci") => EnableMethod::Psci,
            Some("spin-table") => match node.property("cpu-release-addr").map(|p| p.value) {
                Some(v) if v.len() == 4 || v.len() == 8 => cells(v, 0, v.len() / 4)
                    .map_or(EnableMethod::Unknown, |release_addr| {
                        EnableMethod::SpinTable { release_addr }
                    }),
                _ => EnableMethod::Unknown,
            },
            _ => EnableMethod::Unknown,
        };
        if cores
            .push(CpuNode {
                mpidr,
                enable_method,
            })
            .is_err()
        {
            break;
        }
    }
    cores
}
/// Bytes of `/chosen/bootargs` kept (Linux's arm64 `COMMAND_LINE_SIZE`).
pub const MAX_BOOTARGS: usize = 2048;

fn copy_str<const N: usize>(s: &str) -> String<N> {
    let mut out = String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

impl Platform {
    /// Reads the platform from a flattened device tree.
    pub fn from_fdt(dtb: &[u8]) -> Result<Self, PlatformError> {
        let fdt = Fdt::new(dtb).map_err(|_| PlatformError::BadDeviceTree)?;
        let root = fdt.root();
        let root_addr_cells = root.cell_sizes().address_cells;

        let mut memory = Vec::new();
        for node in fdt.all_nodes() {
            let is_memory = node
                .property("device_type")
                .and_then(|p| p.as_str())
                .is_some_and(|t| t == "memory");
            if is_memory {
                for r in regions(node).filter(|r| r.size > 0) {
                    memory
                        .push(r)
                        .map_err(|_| PlatformError::TooMany("memory"))?;
                }
            }
        }
        if memory.is_empty() {
            return Err(PlatformError::NoMemory);
        }

        let mut reserved = Vec::new();
        for r in fdt.memory_reservations() {
            let r = Region {
                base: r.address() as usize as u64,
                size: r.size() as u64,
            };
            reserved
                .push(r)
                .map_err(|_| PlatformError::TooMany("reserved"))?;
        }
        if let Some(rm) = fdt.find_node("/reserved-memory") {
            for child in rm.children() {
                for r in regions(child) {
                    reserved
                        .push(r)
                        .map_err(|_| PlatformError::TooMany("reserved"))?;
                }
            }
        }

        // `Fdt::chosen` panics without a /chosen node (the fdt crate requires one): look first.
        let chosen = fdt.find_node("/chosen").map(|_| fdt.chosen());
        let uart = chosen
            .and_then(|c| c.stdout())
            .filter(|n| compatible_with(*n, &["arm,pl011"]))
            .or_else(|| fdt.find_compatible(&["arm,pl011"]))
            .and_then(first_region);

        let gic = fdt.all_nodes().find_map(|n| {
            let mut r = regions(n);
            if compatible_with(n, &["arm,gic-v3"]) {
                Some(Gic::V3 {
                    dist: r.next()?,
                    redist: r.next()?,
                })
            } else if compatible_with(
                n,
                &[
                    "arm,cortex-a15-gic",
                    "arm,gic-400",
                    "arm,cortex-a9-gic",
                    "arm,cortex-a7-gic",
                ],
            ) {
                Some(Gic::V2 {
                    dist: r.next()?,
                    cpu: r.next()?,
                })
            } else {
                None
            }
        });

        let timer_frequency = fdt
            .find_compatible(&["arm,armv8-timer", "arm,armv7-timer"])
            .and_then(|n| n.property("clock-frequency"))
            .and_then(|p| be_u32(p.value, 0));

        // The timer's second interrupt is the non-secure EL1 physical timer (PPI).
        let timer_intid = fdt
            .find_compatible(&["arm,armv8-timer", "arm,armv7-timer"])
            .and_then(|n| n.property("interrupts"))
            .and_then(|p| gic_intid(be_u32(p.value, 3)?, be_u32(p.value, 4)?));

        let pcie = fdt
            .find_compatible(&["pci-host-ecam-generic"])
            .and_then(|n| parse_pcie(&fdt, n, root_addr_cells));

        let psci = fdt
            .find_node("/psci")
            .or_else(|| fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]))
            .and_then(|n| n.property("method"))
            .and_then(|p| p.as_str())
            .and_then(|m| match m {
                "hvc" => Some(PsciMethod::Hvc),
                "smc" => Some(PsciMethod::Smc),
                _ => None,
            });

        let cores = parse_cpus(&fdt);

        let mut flash = Vec::new();
        for node in fdt
            .all_nodes()
            .filter(|n| compatible_with(*n, &["cfi-flash"]))
        {
            for r in regions(node) {
                flash.push(r).map_err(|_| PlatformError::TooMany("flash"))?;
            }
        }

        Ok(Platform {
            model: copy_str(
                root.property("model")
                    .and_then(|p| p.as_str())
                    .unwrap_or(""),
            ),
            memory,
            reserved,
            uart,
            gic,
            timer_frequency,
            timer_intid,
            pcie,
            psci,
            cpus: cores.len().max(1),
            cores,
            flash,
            bootargs: copy_str(chosen.and_then(|c| c.bootargs()).unwrap_or("")),
        })
    }

    /// The RAM region containing `addr`.
    pub fn memory_containing(&self, addr: u64) -> Option<Region> {
        self.memory.iter().copied().find(|r| r.contains(addr))
    }

    /// Total RAM in bytes.
    pub fn total_memory(&self) -> u64 {
        self.memory.iter().map(|r| r.size).sum()
    }
}

/// Reads the `totalsize` field of a flattened device tree header (big-endian, offset 4)
/// after checking its magic, so a caller knows how many bytes to hand to
/// [`Platform::from_fdt`].
pub fn fdt_total_size(header: &[u8]) -> Option<usize> {
    const FDT_MAGIC: u32 = 0xd00d_feed;
    if be_u32(header, 0)? != FDT_MAGIC {
        return None;
    }
    Some(be_u32(header, 1)? as usize)
}
