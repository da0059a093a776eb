//! The device's life across power cycles, for the SMART / Health log: power cycles, unsafe
//! shutdowns and powered-on time, kept as records in the health area of flash bank 0
//! (`keel_provision::flash::HealthRecord`, layout in `keel_provision`).
//!
//! - Boot: the newest valid record is read and the record of this power cycle appended
//!   ("running"); if the newest record was still "running", the previous power cycle ended
//!   without a clean shutdown and Unsafe Shutdowns grows by one.
//! - Running: every [`CHECKPOINT_NS`] the powered-on time is appended, so a power cut loses
//!   at most that much of it.
//! - Orderly reboot (the management `reboot`): a "shut down cleanly" record is appended last.
//!   A panic, a crash, a watchdog or a power cut leave the "running" record newest.
//!
//! Without flash bank 0, or when it cannot be read or written, the counts are this boot's
//! alone (power cycle 1, no unsafe shutdown, powered-on time since boot) and the console says
//! so. QEMU `-kernel` boots (`qemu/run` without `--flash`) have a bank 0 with no file behind
//! it: writes work but are lost when QEMU exits, so every such boot starts from nothing again.

use crate::hw::Flash;
use crate::klog;
use alloc::vec;
use keel_controller::{DeviceHealth, Instant};
use keel_provision::flash::{
    HEALTH_OFFSET, HEALTH_SIZE, HealthRecord, HealthWrite, SECTOR_SIZE, health_write_after,
    newest_health, next_health_write,
};

/// How often the powered-on time is written while the device runs (10 minutes).
pub const CHECKPOINT_NS: u64 = 600_000_000_000;

/// The health records of this power cycle.
#[derive(Debug)]
pub struct HealthLog {
    /// The newest record written (or that would have been).
    last: HealthRecord,
    /// Where it was written in the health area; `None`: nothing is stored.
    at: Option<usize>,
    /// When this power cycle's powered-on time started counting.
    since_ns: u64,
    /// Powered-on seconds of earlier power cycles.
    base_secs: u64,
    next_checkpoint_ns: u64,
}

fn program<F: Flash>(flash: &mut F, w: HealthWrite, rec: &HealthRecord) -> Result<(), F::Error> {
    if let Some(e) = w.erase {
        flash.erase(HEALTH_OFFSET + e, SECTOR_SIZE)?;
    }
    flash.program(HEALTH_OFFSET + w.offset, &rec.encode())
}

impl HealthLog {
    /// Reads the health area and starts this power cycle's records. Returns what the
    /// controller core reports.
    pub fn boot<F: Flash>(flash: Option<&mut F>, now_ns: u64) -> (Self, DeviceHealth) {
        let mut log = HealthLog {
            last: HealthRecord::next_boot(None),
            at: None,
            since_ns: now_ns,
            base_secs: 0,
            next_checkpoint_ns: now_ns.saturating_add(CHECKPOINT_NS),
        };
        match flash {
            None => klog::info!(
                "health: no flash bank 0: power cycles, unsafe shutdowns and power-on hours \
                 count this boot only"
            ),
            Some(flash) => {
                let mut area = vec![0u8; HEALTH_SIZE];
                let stored = flash.read(HEALTH_OFFSET, &mut area).and_then(|()| {
                    let newest = newest_health(&area).map(|(_, r)| r);
                    let rec = HealthRecord::next_boot(newest.as_ref());
                    let w = next_health_write(&area);
                    program(flash, w, &rec)?;
                    Ok((rec, w.offset))
                });
                match stored {
                    Ok((rec, at)) => {
                        log.last = rec;
                        log.base_secs = rec.power_on_secs;
                        log.at = Some(at);
                        klog::info!(
                            "health: power cycle {}, {} unsafe shutdown(s), {} h powered on \
                             (flash bank 0)",
                            rec.power_cycles,
                            rec.unsafe_shutdowns,
                            rec.power_on_secs / 3600
                        );
                    }
                    Err(e) => klog::warning!(
                        "health: {}: power cycles, unsafe shutdowns and power-on hours count \
                         this boot only",
                        klog::D(&e)
                    ),
                }
            }
        }
        let health = DeviceHealth {
            power_cycles: log.last.power_cycles,
            unsafe_shutdowns: log.last.unsafe_shutdowns,
            power_on_ns: log.last.power_on_secs.saturating_mul(1_000_000_000),
            since: Instant::from_nanos(now_ns),
        };
        (log, health)
    }

    /// Powered-on seconds at `now_ns`: earlier power cycles' and this one's.
    fn power_on_secs(&self, now_ns: u64) -> u64 {
        let this_cycle = now_ns.saturating_sub(self.since_ns) / 1_000_000_000;
        self.base_secs.saturating_add(this_cycle)
    }

    fn append<F: Flash>(&mut self, flash: Option<&mut F>, now_ns: u64, clean: bool) {
        let (Some(flash), Some(at)) = (flash, self.at) else {
            return;
        };
        let rec = self.last.next(self.power_on_secs(now_ns), clean);
        let w = health_write_after(at);
        match program(flash, w, &rec) {
            Ok(()) => {
                self.last = rec;
                self.at = Some(w.offset);
            }
            Err(e) => {
                klog::warning!(
                    "health: {}: the record is not updated any more this boot",
                    klog::D(&e)
                );
                self.at = None;
            }
        }
    }

    /// Writes the powered-on time when a checkpoint is due; call from the poll loop.
    pub fn tick<F: Flash>(&mut self, flash: Option<&mut F>, now_ns: u64) {
        if now_ns < self.next_checkpoint_ns {
            return;
        }
        self.next_checkpoint_ns = now_ns.saturating_add(CHECKPOINT_NS);
        self.append(flash, now_ns, false);
    }

    /// Records a clean shutdown (an orderly reboot); call last before resetting.
    pub fn shutdown<F: Flash>(&mut self, flash: Option<&mut F>, now_ns: u64) {
        self.append(flash, now_ns, true);
        if self.at.is_some() {
            klog::info!("health: clean shutdown recorded");
        }
    }
}
