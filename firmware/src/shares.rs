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

/// Capped drive domains one target publishes (one row of [`DemandRow`]): its slices' domains
/// on the local drives. A target with more keeps the whole cap on the others.
pub const SHARED_DOMAINS: usize = 4;

/// One capped domain of one target: its key and its demand in one word, its commands
/// (waiting and in flight) and those in flight in the other.
#[derive(Debug)]
struct DemandSlot {
    /// (domain key | 1 << 31) << 32 | demand; 0 while unused. Domain keys are below 2^31
    /// (`crate::plan`), so a used slot is never 0.
    head: AtomicU64,
    /// want << 32 | in flight.
    load: AtomicU64,
}

/// One target's capped drive domains, for the split of each domain's cap across the targets
/// (cores) that reach the drive (issue 17): each target (core 0's, each other core's NVMe/TCP
/// replica, each other core's function replica) owns a row and alone writes it; every target
/// reads every running target's row once a pass to take its own part ([`DomainSharing`]).
/// Whole cache lines (aligned to 64 bytes): a row's writer shares its lines with nobody
/// else's writes.
///
/// Ordering: every value is a single word written with a `Relaxed` store, only when it
/// changed, and read with `Relaxed` loads. The key travels with the demand in one word, so a
/// reader never pairs one domain's key with another's demand; the second word (commands,
/// in flight) may be one pass older or newer than the first. Nothing else is published
/// through the table, so no acquire/release pairing is needed: a reader acts on figures at
/// most one of the writer's passes old, and the split only has to converge, which it does
/// once the figures stop changing. What stale figures can cost is bounded: a part is
/// computed from demands and in-flight counts, and a target whose part shrank starts
/// nothing until its commands in flight drain below it (see `keel_qos::cap_share`).
///
/// The row also carries the target's limited namespaces and groups ([`LimitSharing`]): one
/// word each,
/// its key and its demand, written and read like the domains' first word (`Relaxed`, a key
/// never paired with another's demand).
#[derive(Debug)]
#[repr(align(64))]
pub struct DemandRow {
    slots: [DemandSlot; SHARED_DOMAINS],
    /// (limit key | 1 << 31) << 32 | demand; 0 while unused.
    limits: [AtomicU64; SHARED_LIMITS],
    /// What each limit slot's limiter admitted on this target (for status and `/metrics`,
    /// [`limit_counters_elsewhere`]): the key (as in `limits`), admitted commands and bytes,
    /// nanoseconds held back. Written at most once a millisecond (`Relaxed`; the key last,
    /// with `Release`, and read first with `Acquire`, so counters are never read under
    /// another limit's key once the key is seen; a count may be a millisecond old).
    counters: [[AtomicU64; 4]; SHARED_LIMITS],
}

impl Default for DemandRow {
    fn default() -> Self {
        Self::new()
    }
}

impl DemandRow {
    /// An unused row.
    pub const fn new() -> Self {
        Self {
            slots: [const {
                DemandSlot {
                    head: AtomicU64::new(0),
                    load: AtomicU64::new(0),
                }
            }; SHARED_DOMAINS],
            limits: [const { AtomicU64::new(0) }; SHARED_LIMITS],
            counters: [const { [const { AtomicU64::new(0) }; 4] }; SHARED_LIMITS],
        }
    }

    /// Owner: limit slot `i` (key `key`) admitted `c` on this target.
    fn publish_counters(&self, i: usize, key: u32, c: &keel_qos::LimiterStats) {
        let s = &self.counters[i];
        let tag = u64::from(key | 1 << 31);
        if s[0].load(Ordering::Relaxed) != tag {
            // Another limit now: unkeyed while its counters change.
            s[0].store(0, Ordering::Release);
        }
        s[1].store(c.admitted_ops, Ordering::Relaxed);
        s[2].store(c.admitted_bytes, Ordering::Relaxed);
        s[3].store(c.throttled_ns, Ordering::Relaxed);
        s[0].store(tag, Ordering::Release);
    }

    /// Owner: counter slot `i` holds nothing.
    fn clear_counters(&self, i: usize) {
        let s = &self.counters[i][0];
        if s.load(Ordering::Relaxed) != 0 {
            s.store(0, Ordering::Release);
        }
    }

    /// Reader: the counters the row holds for limit `key`, if it has them.
    fn read_counters(&self, key: u32) -> Option<keel_qos::LimiterStats> {
        let tag = u64::from(key | 1 << 31);
        self.counters.iter().find_map(|s| {
            (s[0].load(Ordering::Acquire) == tag).then(|| keel_qos::LimiterStats {
                admitted_ops: s[1].load(Ordering::Relaxed),
                admitted_bytes: s[2].load(Ordering::Relaxed),
                throttled_ns: s[3].load(Ordering::Relaxed),
            })
        })
    }

    /// Owner: limit slot `i` holds limit `key` with `demand`.
    fn publish_limit(&self, i: usize, key: u32, demand: u32) {
        let v = u64::from(key | 1 << 31) << 32 | u64::from(demand);
        let s = &self.limits[i];
        if s.load(Ordering::Relaxed) != v {
            s.store(v, Ordering::Relaxed);
        }
    }

    /// Owner: limit slot `i` holds nothing.
    fn clear_limit(&self, i: usize) {
        let s = &self.limits[i];
        if s.load(Ordering::Relaxed) != 0 {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Reader: the demand the row holds for limit `key`, if it has it.
    fn read_limit(&self, key: u32) -> Option<u32> {
        let want = u64::from(key | 1 << 31);
        self.limits.iter().find_map(|s| {
            let v = s.load(Ordering::Relaxed);
            (v >> 32 == want).then_some(v as u32)
        })
    }

    /// Owner: slot `i` holds domain `key` with `load`.
    fn publish(&self, i: usize, key: u32, load: &keel_qos::Share) {
        let head = u64::from(key | 1 << 31) << 32 | u64::from(load.demand);
        let tail = u64::from(load.want) << 32 | u64::from(load.inflight);
        let s = &self.slots[i];
        if s.load.load(Ordering::Relaxed) != tail {
            s.load.store(tail, Ordering::Relaxed);
        }
        if s.head.load(Ordering::Relaxed) != head {
            s.head.store(head, Ordering::Relaxed);
        }
    }

    /// Owner: slot `i` holds nothing.
    fn clear(&self, i: usize) {
        let s = &self.slots[i];
        if s.head.load(Ordering::Relaxed) != 0 {
            s.head.store(0, Ordering::Relaxed);
        }
    }

    /// Reader: what the row holds for domain `key`, if it has it.
    fn read(&self, key: u32) -> Option<keel_qos::Share> {
        let want = u64::from(key | 1 << 31);
        self.slots.iter().find_map(|s| {
            let head = s.head.load(Ordering::Relaxed);
            (head >> 32 == want).then(|| {
                let load = s.load.load(Ordering::Relaxed);
                keel_qos::Share {
                    demand: head as u32,
                    want: (load >> 32) as u32,
                    inflight: load as u32,
                }
            })
        })
    }
}

/// Limited namespaces and groups one target publishes (in its [`DemandRow`]). A target with more
/// publishes the first ones; each of the others gets an even part of its limits by the number of
/// running cores (see [`LimitSharing::tend`]).
pub const SHARED_LIMITS: usize = 16;
// `LimitSharing::tend` keeps a bit per slot.
const _: () = assert!(SHARED_LIMITS <= 32);

/// Cores a [`DemandRow`] table has rows for (`keel_hal::MAX_CORES`, checked where the
/// image's table is).
pub const DEMAND_CORES: usize = 64;

/// Rows of [`DemandRow`]: one per core for core 0's target and the NVMe/TCP replicas, one
/// per core for the function replicas.
pub const DEMAND_ROWS: usize = 2 * DEMAND_CORES;

/// The row of core `core`'s NVMe/TCP target (core 0's own target for core 0) or of its
/// function replica (`function`).
pub const fn demand_row(core: usize, function: bool) -> usize {
    core + if function { DEMAND_CORES } else { 0 }
}

/// What [`DomainSharing`] needs of a target: its capped domains and a way to set its part
/// of each (`keel_controller::Target`; host tests use a bare scheduler).
pub trait CappedDomains {
    /// Its capped domains, as [`keel_controller::Target::capped_domains`].
    fn capped(&self) -> impl Iterator<Item = keel_controller::CappedDomain>;
    /// Sets its part of `domain`'s cap (0: the whole cap).
    fn set_part(&mut self, domain: keel_qos::DomainId, part: u32);
}

impl CappedDomains for keel_controller::Target {
    fn capped(&self) -> impl Iterator<Item = keel_controller::CappedDomain> {
        self.capped_domains()
    }

    fn set_part(&mut self, domain: keel_qos::DomainId, part: u32) {
        self.set_domain_share(domain, part);
    }
}

/// One target's side of the split of capped drive domains across targets: publishes its
/// row, reads the others' and sets its part of each cap. Call [`DomainSharing::tend`] once
/// a pass, between taking in commands and starting them (`Target::poll`); nothing is done
/// per command, nothing allocates.
#[derive(Debug)]
pub struct DomainSharing {
    row: usize,
    /// Slots of its row in use.
    used: usize,
    /// Per slot: the highest demand and want of the current window, and when it ends.
    held: [(u32, u32, u64); SHARED_DOMAINS],
}

/// How long a target's figures hold their peak ([`DomainSharing`]): a deep queue whose
/// commands arrive in bursts (TCP segments, a busy CPU) would otherwise drop to no demand
/// between two bursts, the other targets take the whole cap, and it finds no room when its
/// next burst comes. A millisecond is many passes and a few drive latencies.
pub const HOLD_NS: u64 = 1_000_000;

impl DomainSharing {
    /// The sharing of the target whose row is `row`.
    pub fn new(row: usize) -> Self {
        Self {
            row,
            used: 0,
            held: [(0, 0, 0); SHARED_DOMAINS],
        }
    }

    /// Slot `i`'s figures as published: demand and want at their peak of the current
    /// [`HOLD_NS`] window (a new window starts from the figures now).
    fn held(&mut self, i: usize, load: keel_qos::Share, now_ns: u64) -> keel_qos::Share {
        let h = &mut self.held[i];
        if now_ns >= h.2 {
            *h = (load.demand, load.want, now_ns.saturating_add(HOLD_NS));
        } else {
            h.0 = h.0.max(load.demand);
            h.1 = h.1.max(load.want);
        }
        keel_qos::Share {
            demand: h.0,
            want: h.1,
            inflight: load.inflight,
        }
    }

    /// Publishes the target's capped domains in its row of `table` (call after the target
    /// started commands too, so that the others see them in flight at once). Returns how
    /// many it has.
    pub fn publish(
        &mut self,
        table: &[DemandRow],
        now_ns: u64,
        target: &impl CappedDomains,
    ) -> usize {
        let Some(mine) = table.get(self.row) else {
            return 0;
        };
        let mut n = 0;
        for c in target.capped().take(SHARED_DOMAINS) {
            let load = self.held(n, c.load, now_ns);
            mine.publish(n, c.key, &load);
            n += 1;
        }
        for i in n..self.used {
            mine.clear(i);
        }
        self.used = n;
        n
    }

    /// Publishes the target's capped domains in its row of `table`, then gives each domain
    /// its part of the cap from every row in `running` (a mask of cores: their NVMe/TCP and
    /// function rows) that has the domain's key. A domain no other row has keeps the whole
    /// cap (share 0). Returns how many domains are shared with another row.
    pub fn tend(
        &mut self,
        table: &[DemandRow],
        running: u64,
        now_ns: u64,
        target: &mut impl CappedDomains,
    ) -> usize {
        if self.row >= table.len() {
            return 0;
        }
        let mut doms: [Option<keel_controller::CappedDomain>; SHARED_DOMAINS] =
            [None; SHARED_DOMAINS];
        for (slot, c) in doms.iter_mut().zip(target.capped()) {
            *slot = Some(c);
        }
        self.publish(table, now_ns, target);
        let mut shared = 0;
        for (i, c) in doms.iter().enumerate() {
            let Some(c) = c else { break };
            // This target first (its figures as published), then every other running row
            // with the key (at most 64).
            let mut all = [keel_qos::Share::default(); 64];
            all[0] = keel_qos::Share {
                demand: self.held[i].0,
                want: self.held[i].1,
                inflight: c.load.inflight,
            };
            let mut m = 1;
            for (r, row) in table.iter().enumerate() {
                let core = r % DEMAND_CORES;
                if r == self.row || core >= 64 || running & (1 << core) == 0 || m == all.len() {
                    continue;
                }
                if let Some(load) = row.read(c.key) {
                    all[m] = load;
                    m += 1;
                }
            }
            let part = if m == 1 {
                0
            } else {
                shared += 1;
                keel_qos::cap_share(c.cap, 0, &all[..m])
            };
            target.set_part(c.domain, part);
        }
        shared
    }
}

/// What [`LimitSharing`] needs of a target: its limited namespaces and groups and a way to set its
/// part of each one's limits (`keel_controller::Target`; host tests use a bare scheduler).
pub trait SharedLimits {
    /// Its limited namespaces, as [`keel_controller::Target::shared_limits`] (once a pass:
    /// `Target::shared_limits_for_pass` takes every limiter's demand in one walk).
    fn limited(&mut self) -> impl Iterator<Item = keel_controller::SharedLimit>;
    /// Sets its part of `limiter`'s limits from the demands of every target that has it
    /// (its own first).
    fn set_split(&mut self, limiter: keel_qos::LimiterId, demands: &[u32]);
    /// What `limiter` admitted here (for the merged counters).
    fn counters(&self, limiter: keel_qos::LimiterId) -> keel_qos::LimiterStats;
}

impl SharedLimits for keel_controller::Target {
    fn limited(&mut self) -> impl Iterator<Item = keel_controller::SharedLimit> {
        self.shared_limits_for_pass()
    }

    fn set_split(&mut self, limiter: keel_qos::LimiterId, demands: &[u32]) {
        self.set_limit_split(limiter, 0, demands);
    }

    fn counters(&self, limiter: keel_qos::LimiterId) -> keel_qos::LimiterStats {
        self.shared_limit_counters(limiter)
    }
}

/// One target's side of the split of QoS rate limits across targets (cores) serving the
/// same limited namespace or group: each publishes its demand on the limiter (the commands
/// of the flows it holds, waiting and in flight) under the namespace's (group's) key in its
/// row, reads every running row's,
/// and sets its limiter to its part of the limits ([`keel_qos::limits_share`]): alone, the
/// whole limits; busy among busy ones, a part in proportion to its demand; idle among busy
/// ones, one token a second (its demand counts from its next pass, before it starts
/// anything). Call [`LimitSharing::tend`] once a pass between taking in commands and
/// starting them; nothing is done per command, nothing allocates, one word written per
/// limited namespace or group and pass at most.
///
/// What stale figures cost: a target reads the others' demands as of their last pass, so
/// when demand moves the parts in force may sum above the limits for one pass of the others
/// (by at most the part the moving target took; its bucket keeps its level, so no burst is
/// created by a part growing). Over a window of `T` the targets together admit at most the
/// limit × `T` plus the bursts their buckets held at its start and that bounded excess.
#[derive(Debug)]
pub struct LimitSharing {
    row: usize,
    /// Slots of its row in use.
    used: usize,
    /// Per slot: the limit key, the highest demand of the current window, and when it ends.
    held: [(u32, u32, u64); SHARED_LIMITS],
    /// When its counters are next published.
    counters_at: u64,
}

impl LimitSharing {
    /// The sharing of the target whose row is `row`.
    pub fn new(row: usize) -> Self {
        Self {
            row,
            used: 0,
            held: [(0, 0, 0); SHARED_LIMITS],
            counters_at: 0,
        }
    }

    /// Slot `i`'s demand as published: its peak over the current [`HOLD_NS`] window (a
    /// deep queue between two bursts keeps its part).
    fn held(&mut self, i: usize, key: u32, demand: u32, now_ns: u64) -> u32 {
        let h = &mut self.held[i];
        if h.0 != key || now_ns >= h.2 {
            *h = (key, demand, now_ns.saturating_add(HOLD_NS));
        } else {
            h.1 = h.1.max(demand);
        }
        h.1
    }

    /// Publishes the target's limited namespaces and groups in its row of `table`, then sets its
    /// part of each one's limits from every row of a core in `running` that has the key. Returns
    /// how many are shared with another row.
    pub fn tend(
        &mut self,
        table: &[DemandRow],
        running: u64,
        now_ns: u64,
        target: &mut impl SharedLimits,
    ) -> usize {
        let Some(mine) = table.get(self.row) else {
            return 0;
        };
        // First pass: publish (so that the figures read below are as fresh as possible for
        // the others), keeping the limiters and demands.
        let mut lims = [(0u32, keel_qos::LimiterId(u16::MAX), 0u32); SHARED_LIMITS];
        let mut n = 0;
        let mut overflow = false;
        // A slot that holds another key than last pass (a limit came or went) gets its
        // counters now: they must never show a key that is gone (an ended replica
        // controller's go home, `keel_controller::Target::take_retired_counters`, and core
        // 0 would count them twice) nor miss one that moved.
        let mut moved = 0u32;
        for l in target.limited() {
            if n == SHARED_LIMITS {
                overflow = true;
                break;
            }
            if self.held[n].0 != l.key {
                moved |= 1 << n;
            }
            let d = self.held(n, l.key, l.demand, now_ns);
            mine.publish_limit(n, l.key, d);
            lims[n] = (l.key, l.limiter, d);
            n += 1;
        }
        for i in n..self.used {
            mine.clear_limit(i);
            mine.clear_counters(i);
            self.held[i] = (0, 0, 0);
        }
        self.used = n;
        // What each admitted, for status and `/metrics` (core 0 adds the others' to its own),
        // once a millisecond: the counters walk the flows.
        let all = now_ns >= self.counters_at;
        if all {
            self.counters_at = now_ns.saturating_add(COUNTERS_NS);
        }
        if all || moved != 0 {
            for (i, &(key, limiter, _)) in lims[..n].iter().enumerate() {
                if all || moved & (1 << i) != 0 {
                    mine.publish_counters(i, key, &target.counters(limiter));
                }
            }
        }
        let mut shared = 0;
        for &(key, limiter, d) in &lims[..n] {
            let mut all = [0u32; keel_qos::split::MAX_SPLIT];
            all[0] = d;
            let mut m = 1;
            for (r, row) in table.iter().enumerate() {
                let core = r % DEMAND_CORES;
                if r == self.row || core >= 64 || running & (1 << core) == 0 || m == all.len() {
                    continue;
                }
                if let Some(other) = row.read_limit(key) {
                    all[m] = other;
                    m += 1;
                }
            }
            if m > 1 {
                shared += 1;
            }
            target.set_split(limiter, &all[..m]);
        }
        if overflow {
            // Unpublished: an even part by the running cores (all idle in the split).
            let cores = (running.count_ones() as usize).clamp(1, keel_qos::split::MAX_SPLIT);
            let idle = [0u32; keel_qos::split::MAX_SPLIT];
            let mut i = SHARED_LIMITS;
            loop {
                let Some(l) = target.limited().nth(i) else {
                    break;
                };
                target.set_split(l.limiter, &idle[..cores]);
                i += 1;
            }
        }
        shared
    }
}

/// How often a target publishes its shared limiters' counters.
const COUNTERS_NS: u64 = 1_000_000;

/// What the targets of the running cores in `running` other than row `own` (core 0's target)
/// admitted through limit `key` (a namespace's or group's, `keel_controller::limit_key`,
/// `group_key`), as last published: core 0 adds its own target's for status and `/metrics`.
pub fn limit_counters_elsewhere(
    table: &[DemandRow],
    running: u64,
    own: usize,
    key: u32,
) -> keel_qos::LimiterStats {
    let mut t = keel_qos::LimiterStats::default();
    for (r, row) in table.iter().enumerate() {
        let core = r % DEMAND_CORES;
        if r == own || core >= 64 || running & (1 << core) == 0 {
            continue;
        }
        if let Some(c) = row.read_counters(key) {
            t.admitted_ops += c.admitted_ops;
            t.admitted_bytes += c.admitted_bytes;
            t.throttled_ns += c.throttled_ns;
        }
    }
    t
}

/// The commands the targets of the running cores in `running` other than row `own` (core 0's
/// target) have at capped domain `key`'s backend (a drive namespace every core reaches
/// through its own queue pair), as last published (each its peak of the last
/// millisecond): core 0 adds its own for status and `/metrics`.
pub fn domain_inflight_elsewhere(table: &[DemandRow], running: u64, own: usize, key: u32) -> u32 {
    let mut t = 0u32;
    for (r, row) in table.iter().enumerate() {
        let core = r % DEMAND_CORES;
        if r == own || core >= 64 || running & (1 << core) == 0 {
            continue;
        }
        if let Some(l) = row.read(key) {
            t = t.saturating_add(l.inflight);
        }
    }
    t
}

/// A target's [`DomainSharing`] with the table it shares and the mask of running cores
/// (the image's statics, `crate::cores`): what a poll loop holds.
#[derive(Debug)]
pub struct CrossCore {
    sharing: DomainSharing,
    limits: LimitSharing,
    table: &'static [DemandRow],
    running: fn() -> u64,
}

impl CrossCore {
    /// The sharing of the target whose row of `table` is `row`.
    pub fn new(row: usize, table: &'static [DemandRow], running: fn() -> u64) -> Self {
        Self {
            sharing: DomainSharing::new(row),
            limits: LimitSharing::new(row),
            table,
            running,
        }
    }

    /// [`DomainSharing::tend`] and [`LimitSharing::tend`], while another core than core 0
    /// runs (one core: nothing changes, every domain keeps its whole cap and every limiter
    /// its whole limits; when the other cores stop, its limiters get their whole limits
    /// back once). Returns whether it did.
    pub fn tend(&mut self, now_ns: u64, target: &mut keel_controller::Target) -> bool {
        let running = (self.running)();
        let on = running & !1 != 0;
        if on {
            self.sharing.tend(self.table, running, now_ns, target);
            self.limits.tend(self.table, running, now_ns, target);
        } else if self.limits.used > 0 {
            // The other cores stopped: once, the whole limits again (nobody else has them).
            self.limits.tend(
                self.table,
                1 << (self.limits.row % DEMAND_CORES),
                now_ns,
                target,
            );
            for i in 0..self.limits.used {
                self.table[self.limits.row].clear_limit(i);
                self.table[self.limits.row].clear_counters(i);
            }
            self.limits.used = 0;
        }
        on
    }

    /// [`DomainSharing::publish`] after the target started commands, when
    /// [`CrossCore::tend`] did this pass.
    pub fn publish(&mut self, tended: bool, now_ns: u64, target: &keel_controller::Target) {
        if tended {
            self.sharing.publish(self.table, now_ns, target);
        }
    }
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

    /// A core's target reduced to its scheduler: one capped domain (key 7) and its flows.
    struct Core {
        s: keel_qos::Scheduler,
        d: keel_qos::DomainId,
        cap: u32,
        flows: Vec<keel_qos::FlowId>,
        free: Vec<u32>,
        done: Vec<u64>,
    }

    const DEPTH: u32 = 128;
    const READ: keel_qos::Cost = keel_qos::Cost {
        dir: keel_qos::Dir::Read,
        bytes: 4096,
    };

    impl Core {
        fn new(flows: usize, cap: u32) -> Self {
            let handles = flows as u32 * DEPTH;
            let mut s = keel_qos::Scheduler::new(handles);
            let d = s.add_domain(cap).unwrap();
            let flows = (0..flows).map(|_| s.add_flow(d, 1, &[]).unwrap()).collect();
            Self {
                s,
                d,
                cap,
                done: alloc::vec![0; handles as usize / DEPTH as usize],
                flows,
                free: (0..handles).rev().collect(),
            }
        }
    }

    impl CappedDomains for Core {
        fn capped(&self) -> impl Iterator<Item = keel_controller::CappedDomain> {
            core::iter::once(keel_controller::CappedDomain {
                key: 7,
                domain: self.d,
                cap: self.cap,
                load: keel_qos::Share {
                    demand: self.s.domain_demand(self.d),
                    want: self.s.domain_want(self.d),
                    inflight: self.s.inflight(self.d),
                },
            })
        }

        fn set_part(&mut self, domain: keel_qos::DomainId, part: u32) {
            self.s.set_share(domain, part).unwrap();
        }
    }

    fn table() -> Vec<DemandRow> {
        (0..DEMAND_ROWS).map(|_| DemandRow::new()).collect()
    }

    /// The QEMU test `eight_connections_share_a_saturated_drive_evenly` at `--smp 2` on the
    /// host: five connections' flows on core 0, three on core 1, QD128 each, one drive capped
    /// at 64 that completes its oldest command at every step. Each core publishes and takes
    /// its part once a pass through the table, between taking commands in and starting them.
    /// Every flow gets the same service, and the drive holds at most the cap plus the one
    /// command a core's part cannot go below, also while the cores start (the figures a core
    /// reads are one of the other's passes old).
    #[test]
    fn two_cores_split_a_capped_drive_by_their_flows() {
        let table = table();
        let mut cores = [Core::new(5, 64), Core::new(3, 64)];
        let mut sharing = [
            DomainSharing::new(demand_row(0, false)),
            DomainSharing::new(demand_row(1, false)),
        ];
        // Core 1's function replica reaches the drive too, idle.
        let mut idle = Core::new(1, 64);
        let mut idle_sharing = DomainSharing::new(demand_row(1, true));
        // Idle: once every row is published, each takes one command (the others have the
        // domain too).
        assert_eq!(
            sharing[0].tend(&table, 0b11, 0, &mut cores[0]),
            0,
            "alone so far"
        );
        assert_eq!(sharing[1].tend(&table, 0b11, 0, &mut cores[1]), 1);
        assert_eq!(idle_sharing.tend(&table, 0b11, 0, &mut idle), 1);
        assert_eq!(sharing[0].tend(&table, 0b11, 0, &mut cores[0]), 1);
        for c in &cores {
            assert_eq!(c.s.cap_in_force(c.d), Some(1));
        }
        let mut drive: alloc::collections::VecDeque<(usize, usize, u32)> = Default::default();
        let mut most = 0;
        let steps = 40_000;
        for step in 0..steps {
            // A step is a microsecond (a pass of each core, the drive's one completion).
            let now = step as u64 * 1000;
            if let Some((c, fi, h)) = drive.pop_front() {
                let core = &mut cores[c];
                core.s.finished(core.flows[fi]);
                if step >= steps / 4 {
                    core.done[fi] += 1;
                }
                core.free.push(h);
            }
            for c in 0..2 {
                let core = &mut cores[c];
                let mut spare = core::mem::take(&mut core.free);
                spare.sort_unstable();
                for h in spare {
                    let fi = (h / DEPTH) as usize;
                    if core.s.enqueue(0, core.flows[fi], h, READ).unwrap() == keel_qos::Admit::Now {
                        drive.push_back((c, fi, h));
                    }
                }
                sharing[c].tend(&table, 0b11, now, core);
                while let Some((h, f)) = core.s.next(0) {
                    let fi = core.flows.iter().position(|&x| x == f).unwrap();
                    drive.push_back((c, fi, h));
                }
                sharing[c].publish(&table, now, core);
                most = most.max(drive.len());
            }
            idle_sharing.tend(&table, 0b11, now, &mut idle);
        }
        let per_flow: Vec<u64> = cores.iter().flat_map(|c| c.done.clone()).collect();
        let (lo, hi) = (
            per_flow.iter().min().unwrap(),
            per_flow.iter().max().unwrap(),
        );
        assert!(*hi as f64 / *lo as f64 <= 1.05, "{per_flow:?}");
        assert!(most <= 64 + 1, "the drive held {most}");
        assert_eq!(
            (
                cores[0].s.cap_in_force(cores[0].d),
                cores[1].s.cap_in_force(cores[1].d)
            ),
            (Some(40), Some(24))
        );
        // What the rows say: core 0's five flows, core 1's three, the idle replica's none.
        let read = |r: usize| table[r].read(7).map(|l| (l.demand, l.inflight));
        assert_eq!(read(0), Some((5, 40)));
        assert_eq!(read(1), Some((3, 24)));
        assert_eq!(read(demand_row(1, true)), Some((0, 0)));
        assert_eq!(read(2), None);
        // Status on core 0 adds the other rows' commands at the drive: core 1's 24.
        assert_eq!(domain_inflight_elsewhere(&table, 0b11, 0, 7), 24);
        assert_eq!(
            domain_inflight_elsewhere(&table, 0b01, 0, 7),
            0,
            "core 1 stopped"
        );
        assert_eq!(domain_inflight_elsewhere(&table, 0b11, 1, 7), 40);
    }

    /// Alone (another core runs but has no row with the domain, or is not running), a
    /// target keeps the whole cap; a row whose target lost its domains is cleared; a domain
    /// with no cap is not published.
    #[test]
    fn a_target_alone_on_its_drive_keeps_the_whole_cap() {
        let table = table();
        let mut a = Core::new(2, 64);
        let mut b = Core::new(2, 64);
        let mut xa = DomainSharing::new(0);
        let mut xb = DomainSharing::new(1);
        assert_eq!(xa.tend(&table, 0b11, 0, &mut a), 0);
        assert_eq!(a.s.cap_in_force(a.d), Some(64));
        assert_eq!(xb.tend(&table, 0b11, 0, &mut b), 1);
        assert_eq!(b.s.cap_in_force(b.d), Some(1));
        // Core 1 stops running: core 0 is alone again.
        assert_eq!(xa.tend(&table, 0b01, 0, &mut a), 0);
        assert_eq!(a.s.cap_in_force(a.d), Some(64));
        assert_eq!(xa.tend(&table, 0b11, 0, &mut a), 1);
        // B's domain loses its cap: B publishes nothing, A is alone.
        b.cap = 0;
        b.s.set_max_inflight(b.d, 0).unwrap();
        assert_eq!(b.capped().count(), 1);
        struct Uncapped<'a>(&'a mut Core);
        impl CappedDomains for Uncapped<'_> {
            fn capped(&self) -> impl Iterator<Item = keel_controller::CappedDomain> {
                core::iter::empty()
            }
            fn set_part(&mut self, _: keel_qos::DomainId, _: u32) {
                unreachable!()
            }
        }
        assert_eq!(xb.tend(&table, 0b11, 0, &mut Uncapped(&mut b)), 0);
        assert_eq!(table[1].read(7), None, "cleared");
        assert_eq!(xa.tend(&table, 0b11, 0, &mut a), 0);
        assert_eq!(a.s.cap_in_force(a.d), Some(64));
    }

    /// A target's figures hold their peak for [`HOLD_NS`]: a queue between two bursts keeps
    /// its demand (and the others leave it its part), an idle one lets it go after that.
    #[test]
    fn demand_holds_its_peak_for_a_while() {
        let table = table();
        let mut a = Core::new(2, 64);
        let mut x = DomainSharing::new(1);
        let read = |t: &[DemandRow]| t[1].read(7).map(|l| (l.demand, l.want));
        for h in [0, 1, DEPTH] {
            a.s.enqueue(0, a.flows[(h / DEPTH) as usize], h, READ)
                .unwrap();
        }
        x.tend(&table, 0b11, 0, &mut a);
        assert_eq!(read(&table), Some((2, 3)));
        for f in a.flows.clone() {
            a.s.finished(f);
        }
        a.s.finished(a.flows[0]);
        assert_eq!(a.s.domain_demand(a.d), 0);
        x.tend(&table, 0b11, HOLD_NS - 1, &mut a);
        assert_eq!(read(&table), Some((2, 3)), "held");
        x.tend(&table, 0b11, HOLD_NS, &mut a);
        assert_eq!(read(&table), Some((0, 0)), "let go");
    }

    /// A core's target reduced to its scheduler for the limit split: one namespace limiter
    /// (key 9) and its flows, QD `DEPTH` each, on a backend that completes every command at
    /// the next pass.
    struct Limited {
        s: keel_qos::Scheduler,
        l: keel_qos::LimiterId,
        flows: Vec<keel_qos::FlowId>,
        free: Vec<u32>,
        inflight: Vec<(u32, keel_qos::FlowId)>,
        done: u64,
        sending: bool,
        now: u64,
    }

    impl Limited {
        fn new(flows: u32, limits: keel_qos::Limits) -> Self {
            let mut s = keel_qos::Scheduler::new(flows * DEPTH);
            let d = s.add_domain(0).unwrap();
            let l = s.add_limiter(limits, 0).unwrap();
            let flows: Vec<keel_qos::FlowId> = (0..flows)
                .map(|_| s.add_flow(d, 1, &[l]).unwrap())
                .collect();
            Self {
                s,
                l,
                free: (0..flows.len() as u32 * DEPTH).collect(),
                flows,
                inflight: Vec::new(),
                done: 0,
                sending: true,
                now: 0,
            }
        }

        /// A pass: completions, new commands, its part ([`LimitSharing::tend`] between
        /// taking commands in and starting them, as the poll loops do), then the starts.
        fn pass(&mut self, x: &mut LimitSharing, table: &[DemandRow], now: u64) {
            for (h, f) in self.inflight.drain(..) {
                self.s.finished(f);
                if self.sending {
                    self.free.push(h);
                }
            }
            let mut taken = Vec::new();
            for h in core::mem::take(&mut self.free) {
                let f = self.flows[(h / DEPTH) as usize];
                if self.s.enqueue(now, f, h, READ).unwrap() == keel_qos::Admit::Now {
                    taken.push((h, f));
                }
            }
            self.now = now;
            x.tend(table, 0b11, now, self);
            while let Some((h, f)) = self.s.next(now) {
                taken.push((h, f));
            }
            self.done += taken.len() as u64;
            self.inflight = taken;
        }
    }

    impl SharedLimits for Limited {
        fn limited(&mut self) -> impl Iterator<Item = keel_controller::SharedLimit> {
            core::iter::once(keel_controller::SharedLimit {
                key: 9,
                limiter: self.l,
                demand: self.s.limiter_demand(self.l),
            })
        }

        fn set_split(&mut self, limiter: keel_qos::LimiterId, demands: &[u32]) {
            self.s
                .set_limiter_split(limiter, 0, demands, self.now)
                .unwrap();
        }

        fn counters(&self, limiter: keel_qos::LimiterId) -> keel_qos::LimiterStats {
            self.s.limiter_stats(limiter).unwrap_or_default()
        }
    }

    /// A target whose shared limits are listed as given, each with fixed counters.
    struct Listed(Vec<(u32, keel_qos::LimiterStats)>);

    impl SharedLimits for Listed {
        fn limited(&mut self) -> impl Iterator<Item = keel_controller::SharedLimit> {
            self.0
                .iter()
                .enumerate()
                .map(|(i, &(key, _))| keel_controller::SharedLimit {
                    key,
                    limiter: keel_qos::LimiterId(i as u16),
                    demand: 1,
                })
        }

        fn set_split(&mut self, _: keel_qos::LimiterId, _: &[u32]) {}

        fn counters(&self, limiter: keel_qos::LimiterId) -> keel_qos::LimiterStats {
            self.0[usize::from(limiter.0)].1
        }
    }

    /// Counters published by core 1 follow its limits at once when one comes or goes (not a
    /// millisecond later): a limit that went (an ended replica controller, whose counters
    /// then go home) is never shown, one that moved to another slot is never missing.
    #[test]
    fn counters_follow_the_limits_at_once_when_one_goes() {
        let table = table();
        let ops = |n| keel_qos::LimiterStats {
            admitted_ops: n,
            admitted_bytes: n * 4096,
            throttled_ns: 0,
        };
        let seen = |key| limit_counters_elsewhere(&table, 0b11, 0, key).admitted_ops;
        let mut x = LimitSharing::new(1);
        let mut t = Listed(vec![(7, ops(100)), (8, ops(200))]);
        x.tend(&table, 0b11, 0, &mut t);
        assert_eq!((seen(7), seen(8)), (100, 200));
        // Limit 7 goes; limit 8 moves to slot 0, with more counted (10 ns later).
        t.0 = vec![(8, ops(210))];
        x.tend(&table, 0b11, 10, &mut t);
        assert_eq!((seen(7), seen(8)), (0, 210));
        // Slot 1 taken again by a new limit; slot 0's counters wait for the millisecond.
        t.0 = vec![(8, ops(220)), (9, ops(5))];
        x.tend(&table, 0b11, 20, &mut t);
        assert_eq!((seen(8), seen(9)), (210, 5));
        x.tend(&table, 0b11, COUNTERS_NS, &mut t);
        assert_eq!((seen(8), seen(9)), (220, 5));
    }

    /// Two cores' targets share a namespace's 2000 IOPS limit through the table (three
    /// QD128 flows on core 0, one on core 1; a pass every 10 µs; each reads the other's
    /// demand as of its last pass). After the first 100 ms (which start with both buckets
    /// full of the whole burst), over two seconds they admit together at most the limit, each
    /// about its demand's share (3:1);
    /// then core 0's host stops and core 1 alone gets nearly the whole limit (core 0 idle
    /// keeps one token a second).
    #[test]
    fn two_cores_split_a_namespace_limit_by_demand_through_the_table() {
        let table = table();
        let limits = keel_qos::Limits {
            iops: Some(keel_qos::Rate::new(2000)),
            ..keel_qos::Limits::NONE
        };
        let mut cores = [Limited::new(3, limits), Limited::new(1, limits)];
        let mut x = [LimitSharing::new(0), LimitSharing::new(1)];
        let (pass, warm, steps) = (10_000u64, 10_000u64, 200_000u64);
        for step in 0..warm + steps {
            if step == warm {
                // Counted from here: the first pass found both buckets full (a burst of
                // the whole limits each, 200, before anything was published).
                assert!(cores[0].done + cores[1].done <= 200 + 200 + 2 * 2000 / 10);
                cores[0].done = 0;
                cores[1].done = 0;
            }
            for (c, x) in cores.iter_mut().zip(&mut x) {
                c.pass(x, &table, step * pass);
            }
        }
        let (a, b) = (cores[0].done, cores[1].done);
        // The limit over 2 s, plus one token of rounding per core and part.
        assert!(a + b <= 4000 + 2, "{a} + {b}");
        assert!(a + b >= 3950, "{a} + {b}");
        let r = a as f64 / b as f64;
        assert!((2.8..=3.2).contains(&r), "{a} : {b}");
        let part = |c: &Limited| c.s.limiter(c.l).unwrap().limits().iops.unwrap().per_sec;
        assert_eq!((part(&cores[0]), part(&cores[1])), (1500, 500));
        assert_eq!(table[0].read_limit(9), Some(3 * DEPTH));
        assert_eq!(table[1].read_limit(9), Some(DEPTH));
        // Status and `/metrics` on core 0 (row 0) add what core 1 admitted, as published
        // (at most a millisecond old: 2 commands at 2000 IOPS), and core 1's view of core
        // 0's likewise; a key nobody has counts nothing.
        let admitted = |c: &Limited| c.s.limiter_stats(c.l).unwrap().admitted_ops;
        for (own, other) in [(0usize, 1usize), (1, 0)] {
            let e = limit_counters_elsewhere(&table, 0b11, own, 9);
            let real = admitted(&cores[other]);
            assert!(
                e.admitted_ops <= real && real - e.admitted_ops <= 2,
                "row {own} sees {} of the other's {real}",
                e.admitted_ops
            );
            assert_eq!(e.admitted_bytes, e.admitted_ops * 4096);
        }
        assert_eq!(
            limit_counters_elsewhere(&table, 0b11, 0, 10),
            Default::default()
        );
        assert_eq!(
            limit_counters_elsewhere(&table, 0b01, 0, 9),
            Default::default(),
            "core 1 not running: not counted"
        );

        // Core 0's host stops; its waiting commands drain (384 at 1500 IOPS and more), then
        // 2 s are counted.
        cores[0].sending = false;
        let drain = 50_000;
        for step in warm + steps..warm + steps + drain + steps {
            if step == warm + steps + drain {
                cores[1].done = 0;
            }
            for (c, x) in cores.iter_mut().zip(&mut x) {
                c.pass(x, &table, step * pass);
            }
        }
        let b = cores[1].done;
        assert!((3950..=3998 + 1).contains(&b), "{b}");
        assert_eq!((part(&cores[0]), part(&cores[1])), (1, 1999));
    }
}
