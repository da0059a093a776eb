//! Platform bring-up: device tree → console → timer → heap → secondary cores' stacks → final
//! page table → per-core data → GIC → PSCI → PCIe, then the banner.

use crate::fatal::BootError;
use crate::klog;
use alloc::vec::Vec;
use keel_board::{
    BOARD, EnableMethod, Gic as GicDesc, PciSpace, Platform as Dt, PsciMethod, Region,
};
use keel_hal::{
    arch::{
        ImageLayout,
        boot::BootInfo,
        cpu,
        mmu::{AddressSpace, Kind},
        percpu::{self, CoreInfo},
        power, smp, timer,
    },
    gic::Gic,
    heap::Heap,
    pcie::{self, Ecam, Function},
    println,
};

/// One heap for every core; its lock is only taken off the I/O path (`keel_hal::heap`).
#[global_allocator]
static HEAP: Heap = Heap::new(percpu::index);

/// Bytes free on the heap now (large allocations are checked against it first: an
/// allocation failure would end the firmware).
pub fn heap_free() -> usize {
    HEAP.free()
}

/// Allocator calls core `core` has made so far.
pub fn heap_calls(core: usize) -> u64 {
    HEAP.calls(core)
}

/// What the services are built from.
#[allow(dead_code, reason = "used by the services that grow on it")]
pub struct Platform {
    /// The device tree's description.
    pub dt: Dt,
    /// PCI functions found and configured.
    pub pci: Vec<Function>,
    /// The interrupt controller.
    pub gic: Option<Gic>,
    /// RAM outside the heap that later services may use (DMA pools).
    pub spare_ram: Vec<Region>,
    /// The heap.
    pub heap: Region,
    /// Counter value when Rust code started.
    pub counter_at_start: u64,
    /// Every core: the boot core (index 0), then the secondaries that can be started (PSCI
    /// cpu nodes), with their stacks. `crate::cores` starts them.
    pub cores: &'static [CoreInfo],
}

const GIB: u64 = 1 << 30;
const MAX_DTB: usize = 2 << 20;

fn page_align(r: Region) -> Region {
    let base = r.base.next_multiple_of(4096);
    let end = r.end() & !4095;
    Region {
        base,
        size: end.saturating_sub(base),
    }
}

/// Brings the platform up; prints the banner and the PCI table.
pub fn bring_up(info: &BootInfo) -> Result<Platform, BootError> {
    let layout = info.layout;
    let dtb_addr = if info.dtb != 0 {
        info.dtb
    } else {
        BOARD.dtb_fallback
    };

    // SAFETY: the loader (or the board profile) says a device tree lies here; its first 8
    // bytes are in RAM, mapped by the boot map. We only read.
    let header = unsafe { core::slice::from_raw_parts(dtb_addr as *const u8, 8) };
    let dtb_len = keel_board::fdt_total_size(header)
        .filter(|n| (40..=MAX_DTB).contains(n))
        .ok_or(BootError::NoDeviceTree(dtb_addr))?;
    // SAFETY: as above, for the length the header states (bounded by MAX_DTB). The device
    // tree stays untouched: its range is excluded from the heap.
    let dtb = unsafe { core::slice::from_raw_parts(dtb_addr as *const u8, dtb_len) };
    let dt = Dt::from_fdt(dtb).map_err(BootError::Platform)?;

    let uart = dt.uart.ok_or(BootError::NoConsole)?;
    // SAFETY: the device tree names this PL011 as the console; nothing else drives it. It is
    // device memory in the boot map and in the final map below.
    unsafe { keel_hal::console::init(uart.base as usize, timer::now_ns, log::LevelFilter::Info) };
    let freq = timer::init(dt.timer_frequency);
    if let Some(m) = dt.psci {
        power::set_conduit(match m {
            PsciMethod::Hvc => power::Conduit::Hvc,
            PsciMethod::Smc => power::Conduit::Smc,
        });
    }
    power::set_fatal_ending(if cfg!(feature = "test-build") {
        power::Ending::QemuExit
    } else if cfg!(feature = "panic-reset") {
        power::Ending::Reset
    } else {
        power::Ending::PowerOff
    });

    // Heap: the largest free part of the RAM that holds the image.
    let image = Region {
        base: layout.start as u64,
        size: (layout.end - layout.start) as u64,
    };
    let ram = dt.memory_containing(image.base).ok_or(BootError::NoHeap)?;
    let dtb_region = Region {
        base: dtb_addr as u64,
        size: dtb_len as u64,
    };
    let mut taken = heapless::Vec::<Region, 16>::new();
    for r in [image, dtb_region].iter().chain(dt.reserved.iter()) {
        let _ = taken.push(*r);
    }
    let free = free_ranges(ram, &taken);
    let heap = free
        .first()
        .copied()
        .map(page_align)
        .ok_or(BootError::NoHeap)?;
    // The boot map only covers the image's gigabyte as normal memory: start with the part of
    // the heap inside it, extend once the final map is active.
    let early_end = heap.end().min((image.base / GIB + 1) * GIB);
    if early_end <= heap.base {
        return Err(BootError::NoHeap);
    }
    // SAFETY: `heap` is free RAM (not the image, the device tree or a reserved range), and
    // normal memory in the boot map up to `early_end`.
    unsafe { HEAP.init(heap.base as *mut u8, (early_end - heap.base) as usize) };
    let spare_ram: Vec<Region> = free.iter().skip(1).copied().map(page_align).collect();

    // PCI enumeration before the final map: it only touches ECAM (device memory in the boot
    // map) and lets the map treat BARs that are memory, not registers, as normal memory.
    let pci = enumerate_pci(&dt);

    // Secondary cores (PSCI cpu nodes other than this one): their stacks come from the heap
    // now, so the final map can leave their guard pages out.
    let boot_mpidr = cpu::mpidr_affinity();
    let secondary_mpidrs: Vec<u64> = dt
        .cores
        .iter()
        .filter(|c| c.mpidr != boot_mpidr && c.enable_method == EnableMethod::Psci)
        .map(|c| c.mpidr)
        .take(keel_hal::MAX_CORES - 1)
        .collect();
    let stacks = smp::reserve_stacks(secondary_mpidrs.len());
    let mut guards: Vec<usize> = stacks.iter().flat_map(|s| s.guards).collect();
    guards.sort_unstable();

    // Final page table: RAM normal (the image by section, guard pages unmapped), devices as
    // device memory, shared-memory BARs (ivshmem) as normal memory.
    let mut space = AddressSpace::new();
    for m in dt.memory.iter() {
        map_ram_around_image(&mut space, *m, &layout, &guards)?;
    }
    space.map_image(&layout).map_err(BootError::Map)?;
    let mut devices = heapless::Vec::<Region, 16>::new();
    let _ = devices.push(uart);
    match dt.gic {
        Some(GicDesc::V2 { dist, cpu }) => {
            let _ = devices.push(dist);
            let _ = devices.push(cpu);
        }
        Some(GicDesc::V3 { dist, redist }) => {
            let _ = devices.push(dist);
            let _ = devices.push(redist);
        }
        None => {}
    }
    if let Some(p) = &dt.pcie {
        let _ = devices.push(p.ecam);
        for w in p
            .windows
            .iter()
            .filter(|w| w.space != PciSpace::Io || w.size > 0)
        {
            let _ = devices.push(Region {
                base: w.cpu_base,
                size: w.size,
            });
        }
    }
    for f in dt.flash.iter() {
        let _ = devices.push(*f);
    }
    for d in devices.iter() {
        space
            .map(d.base as usize, d.end() as usize, Kind::Device)
            .map_err(BootError::Map)?;
    }
    for bar in shared_memory_bars(&pci) {
        space
            .map(bar.base as usize, bar.end() as usize, Kind::ReadWrite)
            .map_err(BootError::Map)?;
    }
    // SAFETY: the map covers the image, stacks, all RAM (heap included) and every device the
    // firmware drives from here on.
    unsafe { space.activate() };
    if heap.end() > early_end {
        // SAFETY: the rest of the heap range is now mapped normal memory and unused.
        unsafe { HEAP.extend((heap.end() - early_end) as usize) };
    }
    let secondaries: Vec<(u64, smp::CoreStacks)> =
        secondary_mpidrs.into_iter().zip(stacks).collect();
    let cores = smp::describe(boot_mpidr, &layout, &secondaries);

    let gic = match dt.gic {
        Some(GicDesc::V2 { dist, cpu }) => {
            // SAFETY: the GIC frames come from the device tree, are mapped as device memory
            // and only this driver uses them.
            Some(unsafe { Gic::v2(dist.base as usize, cpu.base as usize) })
        }
        Some(GicDesc::V3 { dist, redist }) => {
            // SAFETY: as above.
            unsafe {
                Gic::v3(
                    dist.base as usize,
                    redist.base as usize,
                    redist.size as usize,
                    dt.cpus,
                )
            }
            .map_err(|e| klog::warning!("GIC: {}", klog::D(&e)))
            .ok()
        }
        None => None,
    };

    banner(info, &dt, freq, heap, &gic);

    print_pci_table(&pci);

    Ok(Platform {
        dt,
        pci,
        gic,
        spare_ram,
        heap,
        counter_at_start: info.counter_at_start,
        cores,
    })
}

/// Enumerates the PCIe host bridge the device tree describes and assigns BARs.
fn enumerate_pci(dt: &Dt) -> Vec<Function> {
    match &dt.pcie {
        Some(host) => {
            let windows: Vec<pcie::Window> = host
                .windows
                .iter()
                .map(|w| pcie::Window {
                    space: match w.space {
                        PciSpace::Io => pcie::Space::Io,
                        PciSpace::Mem32 => pcie::Space::Mem32,
                        PciSpace::Mem64 => pcie::Space::Mem64,
                    },
                    prefetchable: w.prefetchable,
                    pci_base: w.pci_base,
                    cpu_base: w.cpu_base,
                    size: w.size,
                })
                .collect();
            // SAFETY: the ECAM region comes from the device tree, is mapped as device memory
            // and enumeration is its only user.
            match unsafe {
                Ecam::new(
                    host.ecam.base as usize,
                    host.ecam.size as usize,
                    host.bus_start,
                )
            } {
                Some(mut ecam) => {
                    pcie::enumerate(&mut ecam, host.bus_start..=host.bus_end, &windows)
                }
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    }
}

/// BARs that are memory shared with another agent rather than registers: the ivshmem
/// windows of emulated functions (BAR2 of 1af4:1110).
pub fn shared_memory_bars(pci: &[Function]) -> impl Iterator<Item = Region> + '_ {
    ivshmem_windows(pci).map(|(window, _)| window)
}

/// The ivshmem windows (BAR2) with, for an `ivshmem-doorbell` device, its register BAR0. The
/// two variants have the same IDs; only the doorbell one has an MSI-X table (BAR1), and its
/// IVPosition cannot tell (0 is a valid peer ID), so BAR1 is what tells them apart.
pub fn ivshmem_windows(pci: &[Function]) -> impl Iterator<Item = (Region, Option<Region>)> + '_ {
    pci.iter()
        .filter(|f| (f.vendor, f.device) == keel_hal::ivshmem::IVSHMEM_ID)
        .filter_map(|f| {
            let window = f.bar(2)?;
            let regs = f.bar(1).and(f.bar(0)).map(|b| Region {
                base: b.cpu_addr,
                size: b.size,
            });
            Some((
                Region {
                    base: window.cpu_addr,
                    size: window.size,
                },
                regs,
            ))
        })
}

/// Free ranges (at least 2 MiB) of `mem` once `taken` are cut out, largest first.
fn free_ranges(mem: Region, taken: &[Region]) -> heapless::Vec<Region, 16> {
    let mut free = heapless::Vec::<Region, 16>::new();
    let _ = free.push(mem);
    for t in taken {
        let mut next = heapless::Vec::<Region, 16>::new();
        for f in free.iter() {
            if t.end() <= f.base || t.base >= f.end() {
                let _ = next.push(*f);
                continue;
            }
            if t.base > f.base {
                let _ = next.push(Region {
                    base: f.base,
                    size: t.base - f.base,
                });
            }
            if t.end() < f.end() {
                let _ = next.push(Region {
                    base: t.end(),
                    size: f.end() - t.end(),
                });
            }
        }
        free = next;
    }
    free.sort_unstable_by_key(|r| core::cmp::Reverse(r.size));
    free
}

/// Maps RAM region `m` as read-write memory except the image (mapped by section elsewhere)
/// and the secondary cores' stack guard pages (`guards`, sorted), which stay unmapped.
fn map_ram_around_image(
    space: &mut AddressSpace,
    m: Region,
    l: &ImageLayout,
    guards: &[usize],
) -> Result<(), BootError> {
    let (start, end) = (m.base as usize, m.end() as usize);
    let mut holes: Vec<(usize, usize)> = guards.iter().map(|&g| (g, g + 4096)).collect();
    holes.push((l.start, l.end));
    holes.sort_unstable();
    let mut at = start;
    for (h0, h1) in holes {
        let (h0, h1) = (h0.clamp(start, end), h1.clamp(start, end));
        if at < h0 {
            space.map(at, h0, Kind::ReadWrite).map_err(BootError::Map)?;
        }
        at = at.max(h1);
    }
    if at < end {
        space
            .map(at, end, Kind::ReadWrite)
            .map_err(BootError::Map)?;
    }
    Ok(())
}

fn banner(info: &BootInfo, dt: &Dt, freq: u64, heap: Region, gic: &Option<Gic>) {
    let midr = cpu::midr();
    println!();
    println!(
        "Keel {} (git {}) {} build",
        env!("CARGO_PKG_VERSION"),
        env!("KEEL_GIT_HASH"),
        if cfg!(feature = "test-build") {
            "test"
        } else {
            "release"
        }
    );
    println!("board: {} ({})", BOARD.name, dt.model.as_str());
    print_trust_anchor();
    println!(
        "cpu: MIDR {:#010x} (implementer {:#04x}, part {:#05x}), {} core(s), running at EL{} (entered at EL{})",
        midr,
        (midr >> 24) & 0xff,
        (midr >> 4) & 0xfff,
        dt.cpus,
        cpu::current_el(),
        info.entry_el
    );
    println!("cpu features: {}", cpu::Features::read());
    for m in dt.memory.iter() {
        println!(
            "memory: {:#x}..{:#x} ({} MiB)",
            m.base,
            m.end(),
            m.size >> 20
        );
    }
    println!(
        "image: {:#x}..{:#x} ({} KiB), heap: {:#x}..{:#x} ({} MiB)",
        info.layout.start,
        info.layout.end,
        (info.layout.end - info.layout.start) >> 10,
        heap.base,
        heap.end(),
        heap.size >> 20
    );
    println!(
        "timer: {} MHz; interrupt controller: {:?}; psci: {:?}",
        freq / 1_000_000,
        gic,
        dt.psci
    );
    if !dt.bootargs.is_empty() {
        println!(
            "bootargs: {}",
            crate::config::redacted(dt.bootargs.as_str())
        );
    }
}

fn class_name(class: (u8, u8, u8)) -> &'static str {
    match class {
        (0x01, 0x08, 0x02) => "NVMe controller",
        (0x01, 0x00, _) => "SCSI controller",
        (0x01, _, _) => "storage controller",
        (0x02, 0x00, _) => "Ethernet controller",
        (0x02, _, _) => "network controller",
        (0x05, 0x00, _) => "RAM",
        (0x06, 0x00, _) => "host bridge",
        (0x06, 0x04, _) => "PCI bridge",
        (0x06, _, _) => "bridge",
        (0x03, _, _) => "display controller",
        (0x0c, 0x03, _) => "USB controller",
        _ => "other",
    }
}

fn print_pci_table(pci: &[Function]) {
    println!("pci: {} function(s)", pci.len());
    println!(
        "  {:<8} {:<9} {:<8} {:<20} BARs",
        "bdf", "id", "class", "kind"
    );
    for f in pci {
        let mut bars = alloc::string::String::new();
        for b in &f.bars {
            use core::fmt::Write;
            let _ = write!(
                bars,
                "{}{}:{:#x}+{:#x} ",
                b.index,
                match b.space {
                    pcie::Space::Io => "io",
                    pcie::Space::Mem32 => "m32",
                    pcie::Space::Mem64 => "m64",
                },
                b.cpu_addr,
                b.size
            );
        }
        for (i, size) in &f.unassigned {
            use core::fmt::Write;
            let _ = write!(bars, "{i}:UNASSIGNED({size:#x}) ");
        }
        println!(
            "  {:<8} {:04x}:{:04x} {:02x}{:02x}{:02x}   {:<20} {}",
            alloc::format!("{}", f.bdf),
            f.vendor,
            f.device,
            f.class.0,
            f.class.1,
            f.class.2,
            class_name(f.class),
            bars.trim_end()
        );
    }
}

/// Prints the trust anchor in the banner.
fn print_trust_anchor() {
    let dev = crate::provisioned::is_development_key();
    keel_hal::println!(
        "provisioning key: {}{}",
        crate::provisioned::fingerprint(&crate::provisioned::PROVISION_PUBKEY),
        if dev { " DEVELOPMENT KEY" } else { "" }
    );
    if dev {
        keel_hal::println!(
            "WARNING: this image trusts the PUBLIC development provisioning key \
             (qemu/dev-keys): anyone can sign configurations for it. Never ship it; build \
             with KEEL_PROVISION_PUBKEY=your-key.pub."
        );
    }
}
