//! Per-core statistics of I/O queues that other cores own, published without a lock: each
//! core's I/O queue pairs on the local drives (`keel_nvme_driver::CoreQueue`) and its I/O
//! queues of remote volumes' associations (the lanes, `keel_remote::lane`).
//!
//! The same scheme as the namespace counters (`crate::cores::NS_SHARES`): a core owns a row
//! of slots (one cache line each) and alone writes them; it *claims* a slot by storing which
//! queue it counts (`key`, `Release`, before any counter and only when it changes), then
//! stores its totals with `Relaxed` stores, at most once a millisecond while busy and on the
//! first idle pass after work (the caller's cadence: nothing here runs per I/O). Core 0 reads
//! every running core's row for status and `/metrics` (`key` with `Acquire`, then the
//! counters): it may see totals a few commands apart from each other, never torn values,
//! and never a key without its counters' claim. Nothing allocates on the publishing side.
//!
//! The statics live in `crate::cores` (the image only); the types and the merge are here so
//! that host tests exercise them.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// A drive queue pair's counters as its core publishes them (the driver's totals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Commands submitted.
    pub commands: u64,
    /// Requests completed (successfully or not).
    pub completed: u64,
    /// Commands that completed with an error status.
    pub errors: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Resets the queues went through.
    pub resets: u64,
    /// Requests failed back by a reset or a controller given up on.
    pub failed_by_reset: u64,
    /// SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes.
    pub cq_doorbells: u64,
    /// Requests refused as busy for want of room.
    pub queue_full: u64,
}

/// The [`QueueCounters`] of a driver's statistics: a controller's own queues
/// (`keel_nvme_driver::DriveStats`) and a core's queue pair (`CoreQueueStats`) count the
/// same things under the same names, in two types.
macro_rules! queue_counters {
    ($stats:expr) => {{
        let s = &$stats;
        $crate::shares::QueueCounters {
            commands: s.commands,
            completed: s.requests_done,
            errors: s.errors,
            timeouts: s.timeouts,
            resets: s.resets,
            failed_by_reset: s.failed_by_reset,
            sq_doorbells: s.sq_doorbells,
            cq_doorbells: s.cq_doorbells,
            queue_full: s.queue_full,
        }
    }};
}
#[allow(unused_imports)] // used by the firmware's own paths and the host tests
pub(crate) use queue_counters;

/// States of a drive queue pair, by the number its core publishes.
pub const DRIVE_QUEUE_STATES: [&str; 3] = ["up", "down", "dead"];

/// One core's I/O queue pair(s) on one drive.
#[derive(Debug)]
#[repr(align(64))]
pub struct DriveQueueShare {
    /// (drive index + 1) << 32 | first QID << 16 | queues; 0 while unused.
    key: AtomicU64,
    /// Index into [`DRIVE_QUEUE_STATES`].
    state: AtomicU64,
    counters: [AtomicU64; 9],
}

impl Default for DriveQueueShare {
    fn default() -> Self {
        Self::new()
    }
}

impl DriveQueueShare {
    /// An unused slot.
    pub const fn new() -> Self {
        Self {
            key: AtomicU64::new(0),
            state: AtomicU64::new(0),
            counters: [const { AtomicU64::new(0) }; 9],
        }
    }

    /// Owner: this slot counts queue pairs `first_qid..first_qid + queues` of drive `drive`
    /// (before [`DriveQueueShare::publish`]).
    pub fn claim(&self, drive: usize, first_qid: u16, queues: u16) {
        let key = (drive as u64 + 1) << 32 | u64::from(first_qid) << 16 | u64::from(queues);
        if self.key.load(Ordering::Relaxed) != key {
            self.key.store(key, Ordering::Release);
        }
    }

    /// Owner: the queue pair's state (index into [`DRIVE_QUEUE_STATES`]) and totals.
    pub fn publish(&self, state: usize, c: &QueueCounters) {
        self.state.store(state as u64, Ordering::Relaxed);
        let v = [
            c.commands,
            c.completed,
            c.errors,
            c.timeouts,
            c.resets,
            c.failed_by_reset,
            c.sq_doorbells,
            c.cq_doorbells,
            c.queue_full,
        ];
        for (slot, v) in self.counters.iter().zip(v) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// Reader: the drive index and what the slot holds (`core` left 0), if claimed.
    pub fn read(&self) -> Option<(usize, keel_mgmt::DriveQueueInfo)> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 {
            return None;
        }
        let c = |i: usize| self.counters[i].load(Ordering::Relaxed);
        let state = self.state.load(Ordering::Relaxed) as usize;
        Some((
            (key >> 32) as usize - 1,
            keel_mgmt::DriveQueueInfo {
                core: 0,
                first_qid: (key >> 16) as u16,
                queues: key as u16,
                state: String::from(DRIVE_QUEUE_STATES.get(state).copied().unwrap_or("?")),
                commands: c(0),
                completed: c(1),
                errors: c(2),
                timeouts: c(3),
                resets: c(4),
                failed_by_reset: c(5),
                sq_doorbells: c(6),
                cq_doorbells: c(7),
                queue_full: c(8),
            },
        ))
    }
}

/// Whether core `core` is in the `running` mask.
fn running_core(running: u64, core: usize) -> bool {
    core < 64 && running & (1 << core) != 0
}

/// Every running core's rows for drive `drive`, core by core (core 0's row, read from the
/// drive itself, is the caller's).
pub fn drive_rows<const N: usize>(
    shares: &[[DriveQueueShare; N]],
    running: u64,
    drive: usize,
) -> Vec<keel_mgmt::DriveQueueInfo> {
    let mut out = Vec::new();
    for (core, row) in shares.iter().enumerate().skip(1) {
        if !running_core(running, core) {
            continue;
        }
        for s in row {
            if let Some((d, mut info)) = s.read()
                && d == drive
            {
                info.core = core as u16;
                out.push(info);
            }
        }
    }
    out
}

/// One I/O queue of a remote volume on one core.
#[derive(Debug)]
#[repr(align(64))]
pub struct LaneQueueShare {
    /// (volume id + 1) << 32 | path << 16 | QID; 0 while unused.
    key: AtomicU64,
    /// Index into [`REMOTE_QUEUE_STATES`].
    state: AtomicU64,
    commands: AtomicU64,
    in_flight: AtomicU64,
}

/// States of a remote volume's queue, by the number its core publishes.
pub const REMOTE_QUEUE_STATES: [&str; 3] = ["live", "connecting", "down"];

impl Default for LaneQueueShare {
    fn default() -> Self {
        Self::new()
    }
}

/// What a reader finds in a [`LaneQueueShare`]: the volume, then (path index, core, QID,
/// state, commands, in flight).
pub type LaneRow = (u8, u16, u16, &'static str, u64, u32);

impl LaneQueueShare {
    /// An unused slot.
    pub const fn new() -> Self {
        Self {
            key: AtomicU64::new(0),
            state: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Owner: the slot counts `q`, a queue of volume `volume` (claims it first when it
    /// counted another).
    pub fn publish(&self, volume: u32, q: &keel_remote::QueueView) {
        let key = (u64::from(volume) + 1) << 32 | u64::from(q.path) << 16 | u64::from(q.qid);
        if self.key.load(Ordering::Relaxed) != key {
            self.key.store(key, Ordering::Release);
        }
        let state = match q.state {
            keel_remote::QueueState::Live => 0,
            keel_remote::QueueState::Connecting => 1,
            keel_remote::QueueState::Down => 2,
        };
        self.state.store(state, Ordering::Relaxed);
        self.commands.store(q.commands, Ordering::Relaxed);
        self.in_flight
            .store(u64::from(q.in_flight), Ordering::Relaxed);
    }

    /// Owner: the slot counts nothing any more.
    pub fn release(&self) {
        if self.key.load(Ordering::Relaxed) != 0 {
            self.key.store(0, Ordering::Release);
        }
    }

    /// Reader: the volume id and the row (`core` left 0), if claimed.
    pub fn read(&self) -> Option<(u32, LaneRow)> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 {
            return None;
        }
        let state = self.state.load(Ordering::Relaxed) as usize;
        Some((
            ((key >> 32) - 1) as u32,
            (
                (key >> 16) as u8,
                0,
                key as u16,
                REMOTE_QUEUE_STATES.get(state).copied().unwrap_or("?"),
                self.commands.load(Ordering::Relaxed),
                self.in_flight.load(Ordering::Relaxed) as u32,
            ),
        ))
    }
}

/// Owner: publishes every queue of its `lanes` (volume id, lane) into its `row`, in order,
/// and releases the slots after the last (allocates nothing). Queues beyond the row are not
/// published.
pub fn publish_lanes<S: Copy + Eq + core::fmt::Debug>(
    row: &[LaneQueueShare],
    lanes: &[(u32, keel_remote::RemoteVolume<S>)],
) {
    let mut i = 0;
    for (id, lane) in lanes {
        lane.for_each_queue(&mut |q| {
            if let Some(s) = row.get(i) {
                s.publish(*id, &q);
            }
            i += 1;
        });
    }
    for s in row.iter().skip(i) {
        s.release();
    }
}

/// One remote volume's lane on one core: its requests (counts and counters).
#[derive(Debug)]
#[repr(align(64))]
pub struct LaneVolumeShare {
    /// Volume id + 1; 0 while unused.
    key: AtomicU64,
    /// queued, in flight, then the counters in [`keel_remote::VolumeCounters`]' order.
    values: [AtomicU64; 9],
}

impl Default for LaneVolumeShare {
    fn default() -> Self {
        Self::new()
    }
}

impl LaneVolumeShare {
    /// An unused slot.
    pub const fn new() -> Self {
        Self {
            key: AtomicU64::new(0),
            values: [const { AtomicU64::new(0) }; 9],
        }
    }

    /// Owner: the slot counts volume `volume`'s lane (claims it first when it counted
    /// another; the values are stored before the key is published, `Release`).
    pub fn publish(&self, volume: u32, l: &keel_remote::VolumeLoad) {
        let key = u64::from(volume) + 1;
        let c = &l.counters;
        let v = [
            u64::from(l.queued),
            u64::from(l.in_flight),
            c.submitted,
            c.completed,
            c.failed,
            c.path_errors,
            c.retries,
            c.failovers,
            c.split,
        ];
        for (slot, x) in self.values.iter().zip(v) {
            slot.store(x, Ordering::Relaxed);
        }
        if self.key.load(Ordering::Relaxed) != key {
            self.key.store(key, Ordering::Release);
        }
    }

    /// Owner: the slot counts nothing any more.
    pub fn release(&self) {
        if self.key.load(Ordering::Relaxed) != 0 {
            self.key.store(0, Ordering::Release);
        }
    }

    /// Reader: the volume id and its lane's load, if claimed.
    pub fn read(&self) -> Option<(u32, keel_remote::VolumeLoad)> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 {
            return None;
        }
        let v = |i: usize| self.values[i].load(Ordering::Relaxed);
        Some((
            (key - 1) as u32,
            keel_remote::VolumeLoad {
                queued: v(0) as u32,
                in_flight: v(1) as u32,
                counters: keel_remote::VolumeCounters {
                    submitted: v(2),
                    completed: v(3),
                    failed: v(4),
                    path_errors: v(5),
                    retries: v(6),
                    failovers: v(7),
                    split: v(8),
                },
            },
        ))
    }
}

/// Owner: publishes each of its `lanes`' load into its `row`, in order, and releases the
/// slots after the last (allocates nothing). Lanes beyond the row are not published.
pub fn publish_lane_volumes<S: Copy + Eq + core::fmt::Debug>(
    row: &[LaneVolumeShare],
    lanes: &[(u32, keel_remote::RemoteVolume<S>)],
) {
    let mut i = 0;
    for (id, lane) in lanes {
        if let (Some(s), Some(l)) = (row.get(i), lane.load()) {
            s.publish(*id, &l);
            i += 1;
        }
    }
    for s in row.iter().skip(i) {
        s.release();
    }
}

/// The sum of every other running core's lane of remote volume `volume` (core 0's own
/// requests are the caller's).
pub fn lane_volume_totals<const N: usize>(
    shares: &[[LaneVolumeShare; N]],
    running: u64,
    volume: u32,
) -> keel_remote::VolumeLoad {
    let mut t = keel_remote::VolumeLoad::default();
    for (core, row) in shares.iter().enumerate().skip(1) {
        if !running_core(running, core) {
            continue;
        }
        for (v, l) in row.iter().filter_map(LaneVolumeShare::read) {
            if v == volume {
                t += l;
            }
        }
    }
    t
}

/// Every running core's rows for remote volume `volume`, core by core (core 0's own queues
/// are the caller's).
pub fn lane_rows<const N: usize>(
    shares: &[[LaneQueueShare; N]],
    running: u64,
    volume: u32,
) -> Vec<LaneRow> {
    let mut out = Vec::new();
    for (core, row) in shares.iter().enumerate().skip(1) {
        if !running_core(running, core) {
            continue;
        }
        for s in row {
            if let Some((v, mut r)) = s.read()
                && v == volume
            {
                r.1 = core as u16;
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_driver_stats_types_map_field_by_field() {
        let want = super::QueueCounters {
            commands: 1,
            completed: 2,
            errors: 3,
            timeouts: 4,
            resets: 5,
            failed_by_reset: 6,
            sq_doorbells: 7,
            cq_doorbells: 8,
            queue_full: 9,
        };
        let d = keel_nvme_driver::DriveStats {
            commands: 1,
            requests_done: 2,
            errors: 3,
            timeouts: 4,
            resets: 5,
            failed_by_reset: 6,
            sq_doorbells: 7,
            cq_doorbells: 8,
            queue_full: 9,
            ..Default::default()
        };
        assert_eq!(queue_counters!(d), want);
        let c = keel_nvme_driver::CoreQueueStats {
            commands: 1,
            requests_done: 2,
            errors: 3,
            timeouts: 4,
            resets: 5,
            failed_by_reset: 6,
            sq_doorbells: 7,
            cq_doorbells: 8,
            queue_full: 9,
        };
        assert_eq!(queue_counters!(c), want);
    }

    use super::*;
    use alloc::string::ToString;
    use keel_remote::{QueueState, QueueView};

    #[test]
    fn drive_rows_merge_every_running_core_s_claimed_slots() {
        let shares: [[DriveQueueShare; 2]; 4] = Default::default();
        // Core 0's slots are never read (its row comes from the drive itself).
        shares[0][0].claim(0, 1, 4);
        shares[0][0].publish(
            0,
            &QueueCounters {
                commands: 9,
                ..Default::default()
            },
        );
        shares[1][0].claim(0, 5, 1);
        let c = QueueCounters {
            commands: 1200,
            completed: 1199,
            errors: 1,
            timeouts: 2,
            resets: 3,
            failed_by_reset: 4,
            sq_doorbells: 900,
            cq_doorbells: 1000,
            queue_full: 7,
        };
        shares[1][0].publish(0, &c);
        shares[1][1].claim(1, 5, 1);
        shares[1][1].publish(
            1,
            &QueueCounters {
                commands: 5,
                ..Default::default()
            },
        );
        shares[2][0].claim(0, 6, 1);
        shares[2][0].publish(
            2,
            &QueueCounters {
                commands: 6,
                ..Default::default()
            },
        );
        // Core 3 is not running: its slot is ignored.
        shares[3][0].claim(0, 7, 1);
        shares[3][0].publish(
            0,
            &QueueCounters {
                commands: 8,
                ..Default::default()
            },
        );
        let rows = drive_rows(&shares, 0b0111, 0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            rows[0],
            keel_mgmt::DriveQueueInfo {
                core: 1,
                first_qid: 5,
                queues: 1,
                state: "up".to_string(),
                commands: 1200,
                completed: 1199,
                errors: 1,
                timeouts: 2,
                resets: 3,
                failed_by_reset: 4,
                sq_doorbells: 900,
                cq_doorbells: 1000,
                queue_full: 7,
            }
        );
        assert_eq!(
            (rows[1].core, rows[1].first_qid, rows[1].commands),
            (2, 6, 6)
        );
        assert_eq!(rows[1].state, "dead");
        let other = drive_rows(&shares, 0b0111, 1);
        assert_eq!(other.len(), 1);
        assert_eq!((other[0].core, other[0].state.as_str()), (1, "down"));
        assert!(drive_rows(&shares, 0b0111, 2).is_empty());
        // A later publication is what the reader sees next (no merge of old values).
        shares[1][0].publish(
            0,
            &QueueCounters {
                commands: 1300,
                ..c
            },
        );
        assert_eq!(drive_rows(&shares, 0b0011, 0)[0].commands, 1300);
        // Unclaimed slots read as nothing.
        assert!(DriveQueueShare::new().read().is_none());
    }

    #[test]
    fn lane_volume_totals_add_every_running_core_s_lanes() {
        let shares: [[LaneVolumeShare; 2]; 3] = Default::default();
        let load = |queued, in_flight, submitted, completed, retries| keel_remote::VolumeLoad {
            queued,
            in_flight,
            counters: keel_remote::VolumeCounters {
                submitted,
                completed,
                failed: 1,
                path_errors: 0,
                retries,
                failovers: 2,
                split: 0,
            },
        };
        // Core 0's slots are never read (its own volume is the caller's).
        shares[0][0].publish(7, &load(9, 9, 9, 9, 9));
        shares[1][0].publish(7, &load(1, 3, 1170, 1167, 0));
        shares[1][1].publish(8, &load(0, 0, 12, 12, 0));
        shares[2][0].publish(7, &load(0, 1, 41, 40, 5));
        let t = lane_volume_totals(&shares, 0b111, 7);
        assert_eq!(t, {
            let mut w = load(1, 4, 1211, 1207, 5);
            w.counters.failed = 2;
            w.counters.failovers = 4;
            w
        });
        assert_eq!(
            lane_volume_totals(&shares, 0b011, 7).counters.submitted,
            1170
        );
        assert_eq!(lane_volume_totals(&shares, 0b111, 8).counters.completed, 12);
        shares[1][1].release();
        assert_eq!(
            lane_volume_totals(&shares, 0b111, 8),
            keel_remote::VolumeLoad::default()
        );
        // A slot re-claimed for another volume stops counting for the first.
        shares[2][0].publish(9, &load(0, 0, 3, 3, 0));
        assert_eq!(
            lane_volume_totals(&shares, 0b111, 7).counters.submitted,
            1170
        );
        assert_eq!(lane_volume_totals(&shares, 0b111, 9).counters.submitted, 3);
    }

    #[test]
    fn lane_rows_follow_each_core_s_queues_and_release_what_is_gone() {
        let shares: [[LaneQueueShare; 3]; 3] = Default::default();
        let q = |path, qid, state, commands, in_flight| QueueView {
            path,
            qid,
            state,
            commands,
            in_flight,
        };
        shares[1][0].publish(7, &q(0, 5, QueueState::Live, 1170, 3));
        shares[1][1].publish(7, &q(1, 5, QueueState::Connecting, 0, 0));
        shares[1][2].publish(8, &q(0, 5, QueueState::Down, 12, 0));
        shares[2][0].publish(7, &q(0, 6, QueueState::Live, 40, 1));
        assert_eq!(
            lane_rows(&shares, 0b111, 7),
            vec![
                (0, 1, 5, "live", 1170, 3),
                (1, 1, 5, "connecting", 0, 0),
                (0, 2, 6, "live", 40, 1),
            ]
        );
        assert_eq!(lane_rows(&shares, 0b011, 7).len(), 2, "core 2 not running");
        assert_eq!(lane_rows(&shares, 0b111, 8), vec![(0, 1, 5, "down", 12, 0)]);
        shares[1][2].release();
        assert!(lane_rows(&shares, 0b111, 8).is_empty());
        // The key is stored (Release) only when it changes; a new one replaces it.
        shares[1][0].publish(9, &q(0, 5, QueueState::Live, 1, 0));
        assert_eq!(lane_rows(&shares, 0b111, 9), vec![(0, 1, 5, "live", 1, 0)]);
        assert_eq!(lane_rows(&shares, 0b111, 7).len(), 2);
    }
}
