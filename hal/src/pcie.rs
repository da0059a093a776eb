//! PCI Express enumeration over ECAM (PCI Express Base 5.0 §7.2.2, PCI Local Bus 3.0 §6.2.5):
//! find every function, size and assign its BARs from the host bridge's windows (32- and
//! 64-bit memory, I/O), enable decoding and bus mastering.
//!
//! The enumeration logic is portable and host-tested against a fake configuration space;
//! [`Ecam`] is the MMIO implementation. Bridges (header type 1) are reported but the functions
//! behind them are not enumerated yet: QEMU `virt` puts devices on the root bus.

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;
use safe_mmio::{UniqueMmioPointer, fields::ReadWrite};

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// Access to configuration space.
pub trait ConfigSpace {
    /// Reads the aligned 32-bit register at `offset` (0..4096) of a function.
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the aligned 32-bit register at `offset` of a function.
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// Configuration space mapped through ECAM.
#[derive(Debug)]
pub struct Ecam<'a> {
    regs: UniqueMmioPointer<'a, [ReadWrite<u32>]>,
    first_bus: u8,
}

impl Ecam<'_> {
    /// Wraps the ECAM region `base..base + size` whose first bus number is `first_bus`.
    ///
    /// # Safety
    /// The region must be the ECAM space of a host bridge, mapped as device memory, and used
    /// by nothing else while this exists.
    pub unsafe fn new(base: usize, size: usize, first_bus: u8) -> Option<Self> {
        let ptr = NonNull::new(base as *mut ReadWrite<u32>)?;
        let slice = NonNull::slice_from_raw_parts(ptr, size / 4);
        // SAFETY: guaranteed by the caller.
        let regs = unsafe { UniqueMmioPointer::new(slice) };
        Some(Self { regs, first_bus })
    }

    fn index(&self, bdf: Bdf, offset: u16) -> Option<usize> {
        let bus = bdf.bus.checked_sub(self.first_bus)? as usize;
        Some(
            ((bus << 20)
                | ((bdf.dev as usize) << 15)
                | ((bdf.func as usize) << 12)
                | (offset as usize & 0xffc))
                / 4,
        )
    }
}

impl ConfigSpace for Ecam<'_> {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        match self.index(bdf, offset).and_then(|i| self.regs.get(i)) {
            Some(mut r) => r.read(),
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(mut r) = self.index(bdf, offset).and_then(|i| self.regs.get(i)) {
            r.write(value);
        }
    }
}

/// What a host bridge window or a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space.
    Mem64,
}

/// A host bridge window, from the device tree's `ranges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// What it decodes.
    pub space: Space,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// First PCI bus address.
    pub pci_base: u64,
    /// The CPU address of `pci_base`.
    pub cpu_base: u64,
    /// Size in bytes.
    pub size: u64,
}

/// An assigned BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index (0..6); a 64-bit BAR uses `index` and `index + 1`.
    pub index: u8,
    /// What it decodes.
    pub space: Space,
    /// Prefetchable.
    pub prefetchable: bool,
    /// PCI bus address written to the BAR.
    pub pci_addr: u64,
    /// Address the CPU uses to reach it.
    pub cpu_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A function found by enumeration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Header type (0 endpoint, 1 bridge), without the multi-function bit.
    pub header_type: u8,
    /// Legacy interrupt pin (1 = INTA .. 4 = INTD, 0 = none).
    pub irq_pin: u8,
    /// Assigned BARs.
    pub bars: Vec<Bar>,
    /// BARs that could not be placed in any window (index, size).
    pub unassigned: Vec<(u8, u64)>,
}

impl Function {
    /// The BAR with this index, if assigned.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }
}

/// Configuration header offsets and bits.
mod reg {
    pub const ID: u16 = 0x00;
    pub const COMMAND: u16 = 0x04;
    pub const CLASS: u16 = 0x08;
    pub const HEADER: u16 = 0x0c;
    pub const BAR0: u16 = 0x10;
    pub const INTERRUPT: u16 = 0x3c;
    pub const CMD_IO: u32 = 1 << 0;
    pub const CMD_MEM: u32 = 1 << 1;
    pub const CMD_MASTER: u32 = 1 << 2;
}

struct Allocator {
    windows: Vec<(Window, u64)>,
}

impl Allocator {
    fn alloc(&mut self, space: Space, prefetchable: bool, size: u64) -> Option<(u64, u64)> {
        // A prefetchable BAR may live in any window of its width (prefetchable first); a
        // non-prefetchable one only in non-prefetchable windows (PCI-to-PCI Bridge 1.2 §3.2.5.8).
        // A 64-bit BAR may fall back to the 32-bit window.
        let order: &[(Space, Option<bool>)] = match (space, prefetchable) {
            (Space::Io, _) => &[(Space::Io, None)],
            (Space::Mem32, true) => &[(Space::Mem32, Some(true)), (Space::Mem32, Some(false))],
            (Space::Mem32, false) => &[(Space::Mem32, Some(false))],
            (Space::Mem64, true) => &[
                (Space::Mem64, Some(true)),
                (Space::Mem64, Some(false)),
                (Space::Mem32, Some(true)),
                (Space::Mem32, Some(false)),
            ],
            (Space::Mem64, false) => &[(Space::Mem64, Some(false)), (Space::Mem32, Some(false))],
        };
        for (want, pref) in order {
            for (w, next) in self.windows.iter_mut() {
                if w.space != *want || pref.is_some_and(|p| p != w.prefetchable) {
                    continue;
                }
                let start = next.checked_next_multiple_of(size)?;
                let end = start.checked_add(size)?;
                if end <= w.pci_base + w.size {
                    *next = end;
                    return Some((start, w.cpu_base + (start - w.pci_base)));
                }
            }
        }
        None
    }
}

fn size_bars(cfg: &mut impl ConfigSpace, bdf: Bdf, alloc: &mut Allocator, f: &mut Function) {
    let mut i = 0u8;
    while i < 6 {
        let off = reg::BAR0 + u16::from(i) * 4;
        let orig = cfg.read32(bdf, off);
        cfg.write32(bdf, off, u32::MAX);
        let probe = cfg.read32(bdf, off);
        cfg.write32(bdf, off, orig);
        let is_io = orig & 1 == 1;
        let is_64 = !is_io && (orig >> 1) & 3 == 2;
        let (space, size) = if is_io {
            let mask = u64::from(probe & !3) | 0xffff_0000_0000_0000 | 0xffff_0000;
            (Space::Io, (!mask).wrapping_add(1) & 0xffff)
        } else if is_64 && i < 5 {
            let hi_off = off + 4;
            let orig_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, u32::MAX);
            let probe_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, orig_hi);
            let mask = (u64::from(probe_hi) << 32) | u64::from(probe & !0xf);
            (Space::Mem64, (!mask).wrapping_add(1))
        } else {
            let mask = u64::from(probe & !0xf) | 0xffff_ffff_0000_0000;
            (Space::Mem32, (!mask).wrapping_add(1))
        };
        let width = if space == Space::Mem64 { 2 } else { 1 };
        if probe == 0 || size == 0 || !size.is_power_of_two() {
            i += width;
            continue;
        }
        let prefetchable = !is_io && orig & 8 != 0;
        match alloc.alloc(space, prefetchable, size) {
            Some((pci, cpu)) => {
                cfg.write32(bdf, off, (pci as u32 & !0xf) | (orig & 0xf));
                if space == Space::Mem64 {
                    cfg.write32(bdf, off + 4, (pci >> 32) as u32);
                }
                f.bars.push(Bar {
                    index: i,
                    space,
                    prefetchable,
                    pci_addr: pci,
                    cpu_addr: cpu,
                    size,
                });
            }
            None => f.unassigned.push((i, size)),
        }
        i += width;
    }
}

/// Enumerates `buses`, assigns BARs from `windows` and enables every function it could
/// configure (memory/I/O decoding and bus mastering).
pub fn enumerate(
    cfg: &mut impl ConfigSpace,
    buses: core::ops::RangeInclusive<u8>,
    windows: &[Window],
) -> Vec<Function> {
    let mut alloc = Allocator {
        windows: windows.iter().map(|w| (*w, w.pci_base)).collect(),
    };
    // Keep address 0 out of the I/O and memory spaces (a BAR of 0 reads as unassigned).
    for (w, next) in alloc.windows.iter_mut() {
        if w.pci_base == 0 {
            *next = if w.space == Space::Io {
                0x1000
            } else {
                0x10_0000
            }
            .min(w.size);
        }
    }
    let mut found = Vec::new();
    for bus in buses {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf { bus, dev, func };
                let id = cfg.read32(bdf, reg::ID);
                let vendor = id as u16;
                if vendor == 0xffff || vendor == 0 {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let class = cfg.read32(bdf, reg::CLASS);
                let header = (cfg.read32(bdf, reg::HEADER) >> 16) as u8;
                let mut f = Function {
                    bdf,
                    vendor,
                    device: (id >> 16) as u16,
                    class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
                    header_type: header & 0x7f,
                    irq_pin: (cfg.read32(bdf, reg::INTERRUPT) >> 8) as u8,
                    bars: Vec::new(),
                    unassigned: Vec::new(),
                };
                if f.header_type == 0 {
                    let cmd = cfg.read32(bdf, reg::COMMAND) & 0xffff;
                    cfg.write32(bdf, reg::COMMAND, cmd & !(reg::CMD_IO | reg::CMD_MEM));
                    size_bars(cfg, bdf, &mut alloc, &mut f);
                    let mut enable = reg::CMD_MASTER;
                    if f.bars.iter().any(|b| b.space == Space::Io) {
                        enable |= reg::CMD_IO;
                    }
                    if f.bars.iter().any(|b| b.space != Space::Io) {
                        enable |= reg::CMD_MEM;
                    }
                    cfg.write32(bdf, reg::COMMAND, cmd | enable);
                }
                found.push(f);
                if func == 0 && header & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A fake device: BAR sizes (0 = unimplemented), 64-bit/IO/prefetch flags per BAR.
    struct FakeDev {
        id: u32,
        class: u32,
        header: u32,
        bar_flags: [u32; 6],
        bar_sizes: [u64; 6],
        regs: BTreeMap<u16, u32>,
    }

    struct FakeCfg(BTreeMap<(u8, u8, u8), FakeDev>);

    impl ConfigSpace for FakeCfg {
        fn read32(&mut self, b: Bdf, off: u16) -> u32 {
            let Some(d) = self.0.get(&(b.bus, b.dev, b.func)) else {
                return u32::MAX;
            };
            match off {
                reg::ID => d.id,
                reg::CLASS => d.class,
                reg::HEADER => d.header << 16,
                0x10..=0x24 => {
                    let i = usize::from((off - 0x10) / 4);
                    d.regs.get(&off).copied().unwrap_or(d.bar_flags[i])
                }
                _ => d.regs.get(&off).copied().unwrap_or(0),
            }
        }

        fn write32(&mut self, b: Bdf, off: u16, v: u32) {
            let Some(d) = self.0.get_mut(&(b.bus, b.dev, b.func)) else {
                return;
            };
            if (0x10..=0x24).contains(&off) {
                let i = usize::from((off - 0x10) / 4);
                // Upper half of a 64-bit BAR: the size mask lives in the previous BAR's size.
                let (size, flags, upper) =
                    if d.bar_sizes[i] == 0 && i > 0 && d.bar_flags[i - 1] & 6 == 4 {
                        (d.bar_sizes[i - 1], 0, true)
                    } else {
                        (d.bar_sizes[i], d.bar_flags[i], false)
                    };
                let mask = (!(size.wrapping_sub(1))) & if flags & 1 == 1 { !3 } else { !0xf };
                let stored = if size == 0 {
                    0
                } else if upper {
                    ((u64::from(v) << 32) & mask) >> 32
                } else {
                    (u64::from(v) & mask) | u64::from(flags)
                };
                d.regs.insert(off, stored as u32);
            } else {
                d.regs.insert(off, v);
            }
        }
    }

    fn dev(id: u32, class: u32, flags: [u32; 6], sizes: [u64; 6]) -> FakeDev {
        FakeDev {
            id,
            class,
            header: 0,
            bar_flags: flags,
            bar_sizes: sizes,
            regs: BTreeMap::new(),
        }
    }

    fn windows() -> Vec<Window> {
        vec![
            Window {
                space: Space::Io,
                prefetchable: false,
                pci_base: 0,
                cpu_base: 0x3eff_0000,
                size: 0x1_0000,
            },
            Window {
                space: Space::Mem32,
                prefetchable: false,
                pci_base: 0x1000_0000,
                cpu_base: 0x1000_0000,
                size: 0x2eff_0000,
            },
            Window {
                space: Space::Mem64,
                prefetchable: true,
                pci_base: 0x80_0000_0000,
                cpu_base: 0x80_0000_0000,
                size: 0x80_0000_0000,
            },
        ]
    }

    #[test]
    fn assigns_bars_from_matching_windows_and_enables_decoding() {
        let mut cfg = FakeCfg(BTreeMap::new());
        // An NVMe-like function: BAR0 64-bit non-prefetchable 16 KiB.
        cfg.0.insert(
            (0, 1, 0),
            dev(
                0x0010_1b36,
                0x0108_0200,
                [4, 0, 0, 0, 0, 0],
                [0x4000, 0, 0, 0, 0, 0],
            ),
        );
        // A virtio-like function: BAR0 I/O 32 bytes, BAR1 mem32 4 KiB, BAR4 64-bit pref 16 KiB.
        cfg.0.insert(
            (0, 2, 0),
            dev(
                0x1000_1af4,
                0x0200_0000,
                [1, 0, 0, 0, 0xc, 0],
                [32, 0x1000, 0, 0, 0x4000, 0],
            ),
        );
        let found = enumerate(&mut cfg, 0..=0, &windows());
        assert_eq!(found.len(), 2);
        let nvme = &found[0];
        assert_eq!(nvme.class, (1, 8, 2));
        assert_eq!(nvme.bars.len(), 1);
        let b = nvme.bars[0];
        assert_eq!(b.space, Space::Mem64);
        // A non-prefetchable 64-bit BAR falls back to the 32-bit window (the 64-bit one is
        // prefetchable).
        assert!(b.cpu_addr >= 0x1000_0000 && b.cpu_addr < 0x3eff_0000);
        assert_eq!(b.cpu_addr % 0x4000, 0);
        let virtio = &found[1];
        let io = virtio.bar(0).unwrap();
        assert_eq!((io.space, io.size), (Space::Io, 32));
        assert_eq!(io.cpu_addr, 0x3eff_0000 + io.pci_addr);
        assert!(io.pci_addr >= 0x1000);
        let pref = virtio.bar(4).unwrap();
        assert_eq!(pref.space, Space::Mem64);
        assert!(pref.cpu_addr >= 0x80_0000_0000);
        // The BAR registers hold the assigned addresses.
        let lo = cfg.read32(
            Bdf {
                bus: 0,
                dev: 2,
                func: 0,
            },
            0x20,
        );
        let hi = cfg.read32(
            Bdf {
                bus: 0,
                dev: 2,
                func: 0,
            },
            0x24,
        );
        assert_eq!((u64::from(hi) << 32) | u64::from(lo & !0xf), pref.pci_addr);
        let cmd = cfg.read32(
            Bdf {
                bus: 0,
                dev: 2,
                func: 0,
            },
            reg::COMMAND,
        );
        assert_eq!(cmd & 7, reg::CMD_IO | reg::CMD_MEM | reg::CMD_MASTER);
        // BARs never overlap.
        let all: Vec<_> = found.iter().flat_map(|f| f.bars.iter().copied()).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.space == b.space || (a.space != Space::Io && b.space != Space::Io) {
                    assert!(a.cpu_addr + a.size <= b.cpu_addr || b.cpu_addr + b.size <= a.cpu_addr);
                }
            }
        }
    }

    #[test]
    fn reports_bars_that_do_not_fit() {
        let mut cfg = FakeCfg(BTreeMap::new());
        // A 64-bit BAR of 64 GiB and only a 256 MiB 32-bit window.
        cfg.0.insert(
            (0, 0, 0),
            dev(
                0x0008_1b36,
                0x0600_0000,
                [4, 0, 0, 0, 0, 0],
                [0x10_0000_0000, 0, 0, 0, 0, 0],
            ),
        );
        let w = [Window {
            space: Space::Mem32,
            prefetchable: false,
            pci_base: 0x1000_0000,
            cpu_base: 0x1000_0000,
            size: 0x1000_0000,
        }];
        let found = enumerate(&mut cfg, 0..=0, &w);
        assert!(found[0].bars.is_empty());
        assert_eq!(found[0].unassigned, vec![(0, 0x10_0000_0000)]);
    }

    #[test]
    fn skips_absent_slots_and_finds_multifunction_devices() {
        let mut cfg = FakeCfg(BTreeMap::new());
        let mut d = dev(0x1111_2222, 0x0c03_0000, [0; 6], [0; 6]);
        d.header = 0x80;
        cfg.0.insert((0, 3, 0), d);
        cfg.0
            .insert((0, 3, 5), dev(0x1111_3333, 0x0c03_0000, [0; 6], [0; 6]));
        let found = enumerate(&mut cfg, 0..=0, &windows());
        let bdfs: Vec<_> = found.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(bdfs, ["00:03.0", "00:03.5"]);
    }
}
