//! MMU: a boot identity map enabled before any other Rust code runs, and the final map built
//! from the device tree with `aarch64-paging` (Arm ARM D8, VMSAv8-64, 4 KiB granule, 48-bit VA).
//!
//! Memory attributes (MAIR_EL1): index 0 = Device-nGnRE for MMIO, index 1 = Normal
//! write-back read/write-allocate for RAM.

extern crate alloc;

use super::ImageLayout;
use aarch64_cpu::{
    asm::barrier,
    registers::{ID_AA64MMFR0_EL1, MAIR_EL1, Readable, SCTLR_EL1, TCR_EL1, TTBR0_EL1, Writeable},
};
use aarch64_paging::{
    descriptor::El1Attributes,
    idmap::IdMap,
    paging::{El1And0, MemoryRegion},
};
use core::cell::UnsafeCell;
use core::fmt;

const MAIR_DEVICE_NGNRE: u64 = 0x04;
const MAIR_NORMAL_WB: u64 = 0xff;

/// Descriptor bits for the boot map's 1 GiB blocks (Arm ARM D8.3).
const DESC_VALID_BLOCK: u64 = 0b01;
const DESC_TABLE: u64 = 0b11;
const DESC_ATTR_DEVICE: u64 = 0 << 2;
const DESC_ATTR_NORMAL: u64 = 1 << 2;
const DESC_INNER_SHAREABLE: u64 = 3 << 8;
const DESC_AF: u64 = 1 << 10;
const DESC_PXN: u64 = 1 << 53;
const DESC_UXN: u64 = 1 << 54;
const GIB: u64 = 1 << 30;

#[repr(C, align(4096))]
struct Table(UnsafeCell<[u64; 512]>);

// SAFETY: the boot tables are written once by the boot core before the MMU uses them and
// never again.
unsafe impl Sync for Table {}

static BOOT_L0: Table = Table(UnsafeCell::new([0; 512]));
static BOOT_L1: Table = Table(UnsafeCell::new([0; 512]));

fn mair() -> u64 {
    MAIR_DEVICE_NGNRE | (MAIR_NORMAL_WB << 8)
}

fn tcr() -> u64 {
    // IPS = the CPU's physical address range; 4 KiB granule, inner shareable, write-back
    // walks, 48-bit VA (T0SZ = 16), TTBR1 walks disabled (EPD1).
    let parange = ID_AA64MMFR0_EL1.get() & 0xf;
    let t0sz = 16u64;
    let irgn0 = 1 << 8;
    let orgn0 = 1 << 10;
    let sh0 = 3 << 12;
    let epd1 = 1 << 23;
    t0sz | irgn0 | orgn0 | sh0 | epd1 | (parange.min(5) << 32)
}

/// Builds and enables the boot map: every 1 GiB of the first 512 GiB is device memory except
/// the gigabyte the image runs in, which is normal cacheable memory.
///
/// # Safety
/// Call once, with the MMU off, before any other Rust code depends on memory attributes.
pub unsafe fn enable_boot_map(layout: &ImageLayout) {
    let image_block = layout.start as u64 / GIB;
    let l1 = BOOT_L1.0.get();
    let l0 = BOOT_L0.0.get();
    // SAFETY: the tables are statics only this function touches, and it runs once.
    unsafe {
        for i in 0..512u64 {
            let attrs = if i == image_block {
                DESC_ATTR_NORMAL | DESC_INNER_SHAREABLE
            } else {
                DESC_ATTR_DEVICE | DESC_PXN | DESC_UXN
            };
            (*l1)[i as usize] = (i * GIB) | attrs | DESC_AF | DESC_VALID_BLOCK;
        }
        (*l0)[0] = l1 as u64 | DESC_TABLE;
    }
    MAIR_EL1.set(mair());
    TCR_EL1.set(tcr());
    TTBR0_EL1.set(l0 as u64);
    barrier::dsb(barrier::SY);
    barrier::isb(barrier::SY);
    // SAFETY: TLB maintenance with the MMU still off has no effect on live translations.
    unsafe { core::arch::asm!("tlbi vmalle1", "dsb nsh", "isb") };
    // M, C, I on; alignment checks off; SA (stack alignment) on.
    let sctlr = SCTLR_EL1.get() | (1 << 0) | (1 << 2) | (1 << 12) | (1 << 3);
    SCTLR_EL1.set(sctlr & !(1 << 1));
    barrier::isb(barrier::SY);
}

/// How a region of the final map is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Code: read-only, executable.
    Text,
    /// Read-only data.
    ReadOnly,
    /// Read-write normal memory, never executable.
    ReadWrite,
    /// MMIO: Device-nGnRE, never executable.
    Device,
}

impl Kind {
    fn attributes(self) -> El1Attributes {
        let normal = El1Attributes::VALID
            | El1Attributes::ATTRIBUTE_INDEX_1
            | El1Attributes::INNER_SHAREABLE
            | El1Attributes::ACCESSED
            | El1Attributes::NON_GLOBAL;
        let xn = El1Attributes::UXN | El1Attributes::PXN;
        match self {
            Kind::Text => normal | El1Attributes::READ_ONLY | El1Attributes::UXN,
            Kind::ReadOnly => normal | El1Attributes::READ_ONLY | xn,
            Kind::ReadWrite => normal | xn,
            Kind::Device => {
                El1Attributes::VALID
                    | El1Attributes::ATTRIBUTE_INDEX_0
                    | El1Attributes::ACCESSED
                    | El1Attributes::NON_GLOBAL
                    | xn
            }
        }
    }
}

/// A failure to build the final map.
#[derive(Debug)]
pub struct MapError {
    /// The region that could not be mapped.
    pub start: usize,
    /// Its end.
    pub end: usize,
    /// What aarch64-paging said.
    pub cause: aarch64_paging::MapError,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot map {:#x}..{:#x}: {}",
            self.start, self.end, self.cause
        )
    }
}

/// The final page table, built from the device tree's regions.
pub struct AddressSpace {
    map: IdMap<El1And0>,
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace").finish_non_exhaustive()
    }
}

impl AddressSpace {
    /// An empty map (48-bit, root at level 0, ASID 1).
    pub fn new() -> Self {
        Self {
            map: IdMap::with_asid(1, 0, El1And0),
        }
    }

    /// Identity-maps `start..end` (rounded out to pages).
    pub fn map(&mut self, start: usize, end: usize, kind: Kind) -> Result<(), MapError> {
        let region = MemoryRegion::new(start, end);
        self.map
            .map_range(&region, kind.attributes())
            .map_err(|cause| MapError { start, end, cause })
    }

    /// Maps the image by section (code read-only and executable, everything else never
    /// executable), leaving its stack guard pages unmapped.
    pub fn map_image(&mut self, l: &ImageLayout) -> Result<(), MapError> {
        self.map(l.start, l.text_end, Kind::Text)?;
        self.map(l.text_end, l.rodata_end, Kind::ReadOnly)?;
        self.map(l.rodata_end, l.guards[0], Kind::ReadWrite)?;
        self.map(l.exc_stack.0, l.exc_stack.1, Kind::ReadWrite)?;
        self.map(l.stack.0, l.end, Kind::ReadWrite)
    }

    /// Switches from the boot map to this one. The map stays active for the rest of the
    /// firmware's life, so it is leaked.
    ///
    /// # Safety
    /// The map must cover everything the program uses from now on (image, stacks, heap,
    /// every device it touches) with the attributes it needs.
    pub unsafe fn activate(self) {
        let this = alloc::boxed::Box::leak(alloc::boxed::Box::new(self));
        // SAFETY: the caller promises the map is complete; it lives forever (leaked).
        unsafe {
            this.map.activate();
            core::arch::asm!("dsb ishst", "tlbi vmalle1", "dsb ish", "isb");
        }
    }
}

impl Default for AddressSpace {
    fn default() -> Self {
        Self::new()
    }
}
