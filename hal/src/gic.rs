//! Generic Interrupt Controller bring-up through the `arm-gic` crate (GICv2: Arm IHI 0048B,
//! GICv3: Arm IHI 0069). The data path polls and keeps interrupts masked (PSTATE.I): the GIC
//! only ends WFI, so an idle core sleeps until a device, its timer or another core wants it.
//!
//! - [`Gic`]: the boot core's driver. It owns the distributor and sets up every
//!   redistributor (GICv3) before the other cores start.
//! - [`CpuInterface`]: where a core's own interface is (GICv2: the banked CPU interface and
//!   the banked SGI/PPI registers of the distributor; GICv3: the core's redistributor frame,
//!   found by its MPIDR, plus the system-register CPU interface). The boot core hands it to a
//!   secondary, which makes its [`GicCpu`] from it on itself.
//! - [`Doorbell`]: a software-generated interrupt ([`DOORBELL_SGI`]) that wakes one core from
//!   WFI; cores ring each other's after putting a message in an SPSC ring. Ringing is a
//!   register write (GICD_SGIR on GICv2, ICC_SGI1R_EL1 on GICv3) that any core may do at any
//!   time, so a `Doorbell` is `Copy + Send`.
//!
//! After the secondaries start, the boot core's [`Gic`] touches only the distributor's shared
//! registers and its own redistributor; each [`GicCpu`] only its core's banked registers or
//! redistributor. No register frame is driven by two cores.

extern crate alloc;

use alloc::vec::Vec;
use arm_gic::{
    IntId, InterruptGroup, Trigger, UniqueMmioPointer,
    gicv2::{
        GicV2,
        registers::{Gicc, Gicd as GicdV2},
    },
    gicv3::{
        GicCpuInterface, GicRedistributor, GicV3, SgiTarget, SgiTargetGroup,
        registers::{Gicd as GicdV3, GicrSgi},
    },
};
use core::fmt;
use core::ptr::NonNull;
use safe_mmio::{field, fields::ReadPureWrite};

/// The SGI that [`Doorbell`]s raise.
pub const DOORBELL_SGI: u32 = 1;
/// Priority of every wake-up source (lower is more urgent; the mask lets all through).
const WAKE_PRIORITY: u8 = 0x80;
/// Size of one GICv3 redistributor (RD_base and SGI_base frames, 64 KiB each).
const GICR_V3_STRIDE: usize = 0x2_0000;
/// GICv4 redistributors with virtual LPIs have two more frames (VLPI_base, reserved).
const GICR_V4_STRIDE: usize = 0x4_0000;
/// Redistributors this driver looks at (bounded by the region's size too).
const MAX_REDISTRIBUTORS: usize = 256;

/// A configured GIC (the boot core's driver).
pub enum Gic {
    /// GICv2.
    V2 {
        /// The driver (distributor and the boot core's banked CPU interface).
        gic: GicV2<'static>,
        /// Distributor base, for the other cores' banked registers.
        dist: usize,
        /// CPU interface base (banked: the same address on every core).
        cpu: usize,
    },
    /// GICv3 or GICv4.
    V3 {
        /// The driver.
        gic: GicV3<'static>,
        /// Redistributor index of the boot core.
        this: usize,
        /// Every redistributor: (MPIDR affinity it serves, frame address).
        frames: Vec<(u64, usize)>,
    },
}

impl fmt::Debug for Gic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Gic::V2 { .. } => "GICv2",
            Gic::V3 { .. } => "GICv3",
        })
    }
}

/// Why the GIC could not be brought up or used.
#[derive(Debug)]
pub enum GicError {
    /// The redistributor region has no frame layout this driver knows.
    RedistributorLayout,
    /// No redistributor serves this core's MPIDR.
    NoRedistributor(u64),
    /// The interrupt cannot be a wake-up source here.
    Interrupt(u32),
}

impl fmt::Display for GicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RedistributorLayout => f.write_str("GIC redistributor layout not recognised"),
            Self::NoRedistributor(m) => write!(f, "no GIC redistributor for MPIDR {m:#x}"),
            Self::Interrupt(i) => write!(f, "interrupt {i} cannot wake this core"),
        }
    }
}

/// The MPIDR affinity of the running core (Aff3 in 39:32, Aff2..Aff0 in 23:0).
fn this_mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v & 0xff_00ff_ffff
}

/// Lists the redistributor frames of a GICv3 region (until GICR_TYPER.Last or the region's
/// end) with the MPIDR each serves.
///
/// # Safety
/// `base..base + size` must be the redistributor region, mapped as device memory, and not
/// in use by anything else during the call.
unsafe fn scan_redistributors(base: usize, size: usize) -> Result<Vec<(u64, usize)>, GicError> {
    let frame = |addr: usize| {
        let p = NonNull::new(addr as *mut GicrSgi).ok_or(GicError::RedistributorLayout)?;
        // SAFETY: `addr` is a redistributor frame inside the region (caller), used only for
        // the duration of this call.
        Ok(GicRedistributor::new(unsafe { UniqueMmioPointer::new(p) }))
    };
    let first = frame(base)?;
    let stride = match (
        first.pidr2().arch_rev(),
        first.typer().virtual_lpis_supported(),
    ) {
        (3, false) | (4, false) => GICR_V3_STRIDE,
        (4, true) => GICR_V4_STRIDE,
        _ => return Err(GicError::RedistributorLayout),
    };
    let mut frames = Vec::new();
    let mut addr = base;
    while addr + stride <= base + size && frames.len() < MAX_REDISTRIBUTORS {
        let typer = frame(addr)?.typer();
        frames.push((typer.core_mpidr(), addr));
        if typer.last_redistributor() {
            break;
        }
        addr += stride;
    }
    Ok(frames)
}

fn private_intid(intid: u32) -> Result<IntId, GicError> {
    match intid {
        0..16 => Ok(IntId::sgi(intid)),
        16..32 => Ok(IntId::ppi(intid - 16)),
        _ => Err(GicError::Interrupt(intid)),
    }
}

impl Gic {
    /// Sets up a GICv2 with its distributor and CPU interface at these addresses.
    ///
    /// # Safety
    /// The addresses must be the GIC's register frames, mapped as device memory and not used
    /// by anything else (other cores only ever use their banked registers, through
    /// [`GicCpu`]).
    pub unsafe fn v2(dist: usize, cpu: usize) -> Self {
        // SAFETY: guaranteed by the caller.
        let mut gic = unsafe { GicV2::new(dist as *mut GicdV2, cpu as *mut Gicc) };
        gic.setup();
        Gic::V2 { gic, dist, cpu }
    }

    /// Sets up a GICv3 with its distributor and the redistributor region (`redist`,
    /// `redist_size` bytes) for `cpus` cores; this core is the one whose MPIDR its
    /// redistributor serves.
    ///
    /// # Safety
    /// As for [`Gic::v2`], for the distributor and every redistributor frame.
    pub unsafe fn v3(
        dist: usize,
        redist: usize,
        redist_size: usize,
        cpus: usize,
    ) -> Result<Self, GicError> {
        // SAFETY: guaranteed by the caller; nothing else uses the frames yet.
        let frames = unsafe { scan_redistributors(redist, redist_size) }?;
        let mpidr = this_mpidr();
        let this = frames
            .iter()
            .position(|(m, _)| *m == mpidr)
            .ok_or(GicError::NoRedistributor(mpidr))?;
        let gicd = NonNull::new(dist as *mut GicdV3).ok_or(GicError::RedistributorLayout)?;
        let gicr = NonNull::new(redist as *mut GicrSgi).ok_or(GicError::RedistributorLayout)?;
        let cpus = cpus.clamp(1, frames.len());
        // SAFETY: guaranteed by the caller.
        let mut gic = unsafe { GicV3::new(UniqueMmioPointer::new(gicd), gicr, cpus) }
            .map_err(|_| GicError::RedistributorLayout)?;
        // Configures the distributor and every redistributor before any other core runs.
        gic.setup(this);
        set_eoi_mode_0();
        GicCpuInterface::set_priority_mask(0xff);
        Ok(Gic::V3 { gic, this, frames })
    }

    /// Enables interrupt `intid` as a wake-up source for WFI of the boot core. The firmware
    /// keeps interrupts masked at the CPU (PSTATE.I), so nothing is taken: a pending, enabled
    /// interrupt only ends a WFI, and the driver that owns the source clears it.
    pub fn enable_wakeup(&mut self, intid: u32, level: bool) -> Result<(), GicError> {
        let id = if intid >= 32 {
            IntId::spi(intid - 32)
        } else {
            private_intid(intid)?
        };
        let trigger = if level { Trigger::Level } else { Trigger::Edge };
        let err = |_| GicError::Interrupt(intid);
        match self {
            Gic::V2 { gic, dist, .. } => {
                gic.set_interrupt_priority(id, WAKE_PRIORITY);
                if intid >= 32 {
                    gic.set_trigger(id, trigger);
                    // Route the SPI to this core: with several cores, GICD_ITARGETSR of an
                    // SPI resets to no core at all (IHI 0048B §4.3.12).
                    let target = banked_target_mask(*dist);
                    let reg = *dist + core::mem::offset_of!(GicdV2, itargetsr) + intid as usize;
                    // SAFETY: the byte of ITARGETSR for this SPI, in the mapped distributor
                    // this driver owns; the registers are byte-accessible and no reference
                    // to them exists.
                    unsafe { (reg as *mut u8).write_volatile(target) };
                }
                gic.enable_interrupt(id, true)
                    .map_err(|_| GicError::Interrupt(intid))
            }
            Gic::V3 { gic, this, .. } => {
                let cpu = Some(*this);
                gic.set_interrupt_priority(id, cpu, WAKE_PRIORITY)
                    .map_err(err)?;
                if intid >= 32 {
                    gic.set_trigger(id, cpu, trigger).map_err(err)?;
                }
                gic.enable_interrupt(id, cpu, true).map_err(err)
            }
        }
    }

    /// Lets [`Doorbell`]s wake the boot core (as [`GicCpu::enable_doorbell`] does for the
    /// others) and returns its doorbell, for the cores that send it messages.
    pub fn enable_doorbell(&mut self) -> Result<Doorbell, GicError> {
        self.enable_wakeup(DOORBELL_SGI, false)?;
        Ok(match self {
            Gic::V2 { dist, .. } => Doorbell::v2(*dist, banked_target_mask(*dist)),
            Gic::V3 { .. } => Doorbell::v3(this_mpidr()),
        })
    }

    /// Acknowledges the boot core's pending interrupts (so the next WFI sleeps) and returns
    /// how many were doorbells. Acknowledge the devices' own interrupt status first: a
    /// level interrupt still asserted is pending again after its EOI.
    pub fn take_doorbells(&mut self) -> u32 {
        match self {
            Gic::V2 { gic, .. } => {
                let mut n = 0;
                for _ in 0..64 {
                    // Group 0 reads GICC_IAR, the register `drain_v2` reads on the others.
                    let Some(id) = gic.get_and_acknowledge_interrupt(InterruptGroup::Group0) else {
                        break;
                    };
                    let raw = id.raw_value() & 0x3ff;
                    if raw >= 1020 {
                        break;
                    }
                    // The EOI takes the value read (an SGI's source CPU in bits 12:10).
                    gic.end_interrupt(id, InterruptGroup::Group0);
                    if raw == DOORBELL_SGI {
                        n += 1;
                    }
                }
                n
            }
            Gic::V3 { .. } => drain_v3(),
        }
    }

    /// Where the CPU interface of the core with this MPIDR is, for that core's [`GicCpu`].
    pub fn cpu_interface(&self, mpidr: u64) -> Option<CpuInterface> {
        match self {
            Gic::V2 { dist, cpu, .. } => Some(CpuInterface::V2 {
                dist: *dist,
                cpu: *cpu,
            }),
            Gic::V3 { frames, this, .. } => frames
                .iter()
                .enumerate()
                .find(|(i, (m, _))| *m == mpidr && i != this)
                .map(|(_, (_, frame))| CpuInterface::V3 {
                    redistributor: *frame,
                }),
        }
    }

    /// The boot core's own interface (for the per-core report).
    pub fn this_interface(&self) -> CpuInterface {
        match self {
            Gic::V2 { dist, cpu, .. } => CpuInterface::V2 {
                dist: *dist,
                cpu: *cpu,
            },
            Gic::V3 { frames, this, .. } => CpuInterface::V3 {
                redistributor: frames[*this].1,
            },
        }
    }
}

/// ICC_CTLR_EL1.EOImode = 0: an EOI also deactivates (arm-gic's `init_cpu` does the same on
/// the boot core; secondaries need it before they acknowledge doorbells).
fn set_eoi_mode_0() {
    // SAFETY: ICC_CTLR_EL1 (S3_0_C12_C12_4) only configures this core's CPU interface; the
    // system register interface is enabled (ICC_SRE_EL1.SRE) before this is called.
    unsafe {
        core::arch::asm!(
            "msr S3_0_C12_C12_4, xzr",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// This core's CPU interface mask on a GICv2 (GICD_ITARGETSR0 is banked and reads as the
/// reading core's own bit, IHI 0048B §4.3.12).
fn banked_target_mask(dist: usize) -> u8 {
    let reg = dist + core::mem::offset_of!(GicdV2, itargetsr);
    // SAFETY: ITARGETSR0 is a banked read-only register of the mapped distributor; a
    // volatile read has no side effects and no reference to it exists.
    let v = unsafe { (reg as *const u32).read_volatile() };
    v as u8
}

/// Acknowledges every pending doorbell on a GICv2 CPU interface (IAR then EOIR, the
/// interrupt ID with its source CPU bits as read).
fn drain_v2(mut gicc: &mut UniqueMmioPointer<'static, Gicc>) -> u32 {
    let mut n = 0;
    for _ in 0..64 {
        let iar = field!(gicc, iar).read();
        let id = iar & 0x3ff;
        if id >= 1020 {
            break;
        }
        field!(gicc, eoir).write(iar);
        if id == DOORBELL_SGI {
            n += 1;
        }
    }
    n
}

fn drain_v3() -> u32 {
    let mut n = 0;
    for _ in 0..64 {
        let Some(id) = GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1)
        else {
            break;
        };
        GicCpuInterface::end_interrupt(id, InterruptGroup::Group1);
        if id == IntId::sgi(DOORBELL_SGI) {
            n += 1;
        }
    }
    n
}

/// Where one core's GIC CPU interface is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuInterface {
    /// GICv2: the distributor (for the banked SGI/PPI registers) and the CPU interface.
    V2 {
        /// Distributor base.
        dist: usize,
        /// CPU interface base (banked).
        cpu: usize,
    },
    /// GICv3: this core's redistributor frame (the CPU interface is system registers).
    V3 {
        /// RD_base of the core's redistributor.
        redistributor: usize,
    },
}

impl fmt::Display for CpuInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V2 { cpu, .. } => write!(f, "GICv2 CPU interface {cpu:#x} (banked)"),
            Self::V3 { redistributor } => write!(f, "GICv3 redistributor {redistributor:#x}"),
        }
    }
}

/// One core's own GIC interface, made and used on that core only.
pub struct GicCpu {
    kind: CpuKind,
    desc: CpuInterface,
}

enum CpuKind {
    V2 {
        gicc: UniqueMmioPointer<'static, Gicc>,
        gicd: *mut GicdV2,
    },
    V3 {
        redist: GicRedistributor<'static>,
    },
}

impl fmt::Debug for GicCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GicCpu({})", self.desc)
    }
}

/// A banked distributor register of a GICv2 as a typed MMIO pointer.
///
/// # Safety
/// `reg` must point into the distributor frame at a register banked per core (SGI/PPI
/// registers: IGROUPR0, ISENABLER0, IPRIORITYR0..7), and the pointer must be used only by
/// the core that made it.
unsafe fn banked(reg: *mut ReadPureWrite<u32>) -> UniqueMmioPointer<'static, ReadPureWrite<u32>> {
    // SAFETY: guaranteed by the caller: a banked register is a separate register per core,
    // so this core's accesses alias nobody's.
    unsafe { UniqueMmioPointer::new(NonNull::new(reg).expect("GICD address")) }
}

impl GicCpu {
    /// Brings up the running core's interface: GICv2: enables its CPU interface with the
    /// priority mask open; GICv3: wakes its redistributor (GICR_WAKER), sets its SGIs and PPIs
    /// to defaults, enables the system register interface and Group 1.
    ///
    /// # Safety
    /// `desc` must be this core's interface as [`Gic::cpu_interface`] reported it, mapped as
    /// device memory, and this must run on that core, once.
    pub unsafe fn init(desc: CpuInterface) -> Result<Self, GicError> {
        let kind = match desc {
            CpuInterface::V2 { dist, cpu } => {
                let gicd = dist as *mut GicdV2;
                let p = NonNull::new(cpu as *mut Gicc).ok_or(GicError::RedistributorLayout)?;
                // SAFETY: the CPU interface is banked: this core's copy is used only here.
                let mut gicc = unsafe { UniqueMmioPointer::new(p) };
                // Group: as the boot core's setup chose for the shared interrupts (Group 1
                // with the Security Extensions, non-secure view; Group 0 without).
                let typer = dist + core::mem::offset_of!(GicdV2, typer);
                // SAFETY: GICD_TYPER is a read-only register of the mapped distributor; a
                // volatile read has no side effects.
                let typer = unsafe { (typer as *const u32).read_volatile() };
                // Bit 10: SecurityExtn.
                let group = if typer & (1 << 10) != 0 { u32::MAX } else { 0 };
                // SAFETY: IGROUPR0 is banked per core (caller: we run on the owning core).
                unsafe { banked(&raw mut (*gicd).igroupr[0]) }.write(group);
                field!(gicc, pmr).write(0xff);
                field!(gicc, ctlr).write(1);
                CpuKind::V2 { gicc, gicd }
            }
            CpuInterface::V3 { redistributor } => {
                let p = NonNull::new(redistributor as *mut GicrSgi)
                    .ok_or(GicError::RedistributorLayout)?;
                // SAFETY: this core's redistributor frame (caller), used by this core only.
                let mut redist = GicRedistributor::new(unsafe { UniqueMmioPointer::new(p) });
                // Already awake is fine (a warm restart of the core).
                let _ = redist.mark_core_awake();
                redist.configure_default_settings();
                GicCpuInterface::enable_system_register_el1();
                set_eoi_mode_0();
                GicCpuInterface::set_priority_mask(0xff);
                GicCpuInterface::enable_group1(true);
                CpuKind::V3 { redist }
            }
        };
        Ok(Self { kind, desc })
    }

    /// Where this interface is.
    pub fn desc(&self) -> CpuInterface {
        self.desc
    }

    /// Enables a private interrupt of this core (its timer PPI, an SGI) as a WFI wake-up
    /// source. Interrupts stay masked at the CPU; nothing is taken.
    pub fn enable_wakeup(&mut self, intid: u32) -> Result<(), GicError> {
        let id = private_intid(intid)?;
        match &mut self.kind {
            CpuKind::V2 { gicd, .. } => {
                let gicd = *gicd;
                let (word, shift) = ((intid / 4) as usize, (intid % 4) * 8);
                // SAFETY: IPRIORITYR0..7 and ISENABLER0 cover SGIs and PPIs (IDs below 32):
                // banked per core, and we run on the owning core.
                let mut prio = unsafe { banked(&raw mut (*gicd).ipriorityr[word]) };
                let v = prio.read() & !(0xff << shift);
                prio.write(v | (u32::from(WAKE_PRIORITY) << shift));
                // SAFETY: as above.
                let mut enable = unsafe { banked(&raw mut (*gicd).isenabler[0]) };
                enable.write(1 << intid);
                if enable.read() & (1 << intid) == 0 {
                    return Err(GicError::Interrupt(intid));
                }
                Ok(())
            }
            CpuKind::V3 { redist } => {
                let err = |_| GicError::Interrupt(intid);
                redist
                    .set_interrupt_priority(id, WAKE_PRIORITY)
                    .map_err(err)?;
                if intid >= 16 {
                    redist.set_trigger(id, Trigger::Level).map_err(err)?;
                }
                redist.enable_interrupt(id, true).map_err(err)
            }
        }
    }

    /// Lets [`Doorbell`]s wake this core and returns its doorbell, for the other cores.
    pub fn enable_doorbell(&mut self) -> Result<Doorbell, GicError> {
        self.enable_wakeup(DOORBELL_SGI)?;
        Ok(match &self.kind {
            CpuKind::V2 { gicd, .. } => {
                Doorbell::v2(*gicd as usize, banked_target_mask(*gicd as usize))
            }
            CpuKind::V3 { .. } => Doorbell::v3(this_mpidr()),
        })
    }

    /// Acknowledges this core's pending doorbells (so the next WFI sleeps); returns how many
    /// there were. Call after waking and before looking at the rings.
    pub fn take_doorbells(&mut self) -> u32 {
        match &mut self.kind {
            CpuKind::V2 { gicc, .. } => drain_v2(gicc),
            CpuKind::V3 { .. } => drain_v3(),
        }
    }
}

/// Wakes one core: raises [`DOORBELL_SGI`] on it. `Copy` and `Send`: give it to every core
/// that sends the owner messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// GICv2: GICD_SGIR with the target's CPU interface bit.
    V2 {
        /// Address of GICD_SGIR.
        sgir: usize,
        /// CPU target list (one bit).
        target: u8,
    },
    /// GICv3: ICC_SGI1R_EL1 with the target's affinity.
    V3 {
        /// Aff3.
        aff3: u8,
        /// Aff2.
        aff2: u8,
        /// Aff1.
        aff1: u8,
        /// Aff0 (below 16: the target list has 16 bits).
        aff0: u8,
    },
}

impl Doorbell {
    fn v2(dist: usize, target: u8) -> Self {
        Doorbell::V2 {
            sgir: dist + core::mem::offset_of!(GicdV2, sgir),
            target,
        }
    }

    fn v3(mpidr: u64) -> Self {
        Doorbell::V3 {
            aff3: (mpidr >> 32) as u8,
            aff2: (mpidr >> 16) as u8,
            aff1: (mpidr >> 8) as u8,
            aff0: mpidr as u8,
        }
    }

    /// Rings it. Messages written before (SPSC ring pushes) are visible to the woken core:
    /// a `DSB ISHST` completes them before the SGI is sent (Linux does the same).
    pub fn ring(&self) {
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::ISHST);
        match *self {
            Doorbell::V2 { sgir, target } => {
                // SAFETY: `sgir` is GICD_SGIR of the mapped distributor: a write-only register
                // whose write raises an SGI and touches nothing else. Cores may write it
                // concurrently (each write is one 32-bit transaction); no reference to it
                // exists, so the volatile write aliases nothing.
                unsafe {
                    (sgir as *mut u32).write_volatile((u32::from(target) << 16) | DOORBELL_SGI)
                };
            }
            Doorbell::V3 {
                aff3,
                aff2,
                aff1,
                aff0,
            } => {
                let _ = GicCpuInterface::send_sgi(
                    IntId::sgi(DOORBELL_SGI),
                    SgiTarget::List {
                        affinity3: aff3,
                        affinity2: aff2,
                        affinity1: aff1,
                        target_list: 1u16 << (aff0 & 15),
                    },
                    SgiTargetGroup::CurrentGroup1,
                );
            }
        }
    }
}
