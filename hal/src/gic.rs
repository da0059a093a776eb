//! Generic Interrupt Controller bring-up through the `arm-gic` crate (GICv2: Arm IHI 0048B,
//! GICv3: Arm IHI 0069). The data path polls and keeps interrupts masked; the GIC is still put
//! in a known state so later work (timer wake-ups, doorbell interrupts) starts from it.

use arm_gic::{
    IntId, Trigger, UniqueMmioPointer,
    gicv2::{
        GicV2,
        registers::{Gicc, Gicd as GicdV2},
    },
    gicv3::{
        GicV3,
        registers::{Gicd as GicdV3, GicrSgi},
    },
};
use core::fmt;
use core::ptr::NonNull;

/// A configured GIC.
pub enum Gic {
    /// GICv2.
    V2(GicV2<'static>),
    /// GICv3 or GICv4.
    V3(GicV3<'static>),
}

impl fmt::Debug for Gic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Gic::V2(_) => "GICv2",
            Gic::V3(_) => "GICv3",
        })
    }
}

/// Why the GIC could not be brought up.
#[derive(Debug)]
pub struct GicError;

impl fmt::Display for GicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GIC redistributor layout not recognised")
    }
}

impl Gic {
    /// Sets up a GICv2 with its distributor and CPU interface at these addresses.
    ///
    /// # Safety
    /// The addresses must be the GIC's register frames, mapped as device memory and not used
    /// by anything else.
    pub unsafe fn v2(dist: usize, cpu: usize) -> Self {
        // SAFETY: guaranteed by the caller.
        let mut gic = unsafe { GicV2::new(dist as *mut GicdV2, cpu as *mut Gicc) };
        gic.setup();
        Gic::V2(gic)
    }

    /// Sets up a GICv3 with its distributor and the first redistributor at these addresses,
    /// for `cpus` cores; this core is core 0.
    ///
    /// # Safety
    /// As for [`Gic::v2`], for the distributor and every redistributor frame.
    pub unsafe fn v3(dist: usize, redist: usize, cpus: usize) -> Result<Self, GicError> {
        let gicd = NonNull::new(dist as *mut GicdV3).ok_or(GicError)?;
        let gicr = NonNull::new(redist as *mut GicrSgi).ok_or(GicError)?;
        // SAFETY: guaranteed by the caller.
        let mut gic = unsafe { GicV3::new(UniqueMmioPointer::new(gicd), gicr, cpus) }
            .map_err(|_| GicError)?;
        gic.setup(0);
        arm_gic::gicv3::GicCpuInterface::set_priority_mask(0xff);
        Ok(Gic::V3(gic))
    }

    /// Enables interrupt `intid` as a wake-up source for WFI. The firmware keeps interrupts
    /// masked at the CPU (PSTATE.I), so nothing is taken: a pending, enabled interrupt only
    /// ends a WFI, and the driver that owns the source clears it.
    pub fn enable_wakeup(&mut self, intid: u32, level: bool) -> Result<(), GicError> {
        let id = if intid >= 32 {
            IntId::spi(intid - 32)
        } else if intid >= 16 {
            IntId::ppi(intid - 16)
        } else {
            return Err(GicError);
        };
        let trigger = if level { Trigger::Level } else { Trigger::Edge };
        match self {
            Gic::V2(g) => {
                g.set_interrupt_priority(id, 0x80);
                if intid >= 32 {
                    g.set_trigger(id, trigger);
                }
                g.enable_interrupt(id, true).map_err(|_| GicError)
            }
            Gic::V3(g) => {
                g.set_interrupt_priority(id, Some(0), 0x80)
                    .map_err(|_| GicError)?;
                if intid >= 32 {
                    g.set_trigger(id, Some(0), trigger).map_err(|_| GicError)?;
                }
                g.enable_interrupt(id, Some(0), true).map_err(|_| GicError)
            }
        }
    }
}
