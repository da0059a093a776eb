//! Every core: starts the secondaries (`keel_hal::arch::smp`), gives each a poll loop of its
//! own and a pair of SPSC rings to the boot core (`keel-ring`), and checks at boot that a
//! message goes from core 0 to every core and back.
//!
//! This is the skeleton the data plane split grows on: today a secondary's loop serves only
//! its rings (it answers [`Msg::Ping`]); the NVMe/TCP connections, network queue pair and
//! drive queue pairs it will own get polled in the same loop. Core 0 keeps the [`Links`] (one
//! per secondary) in its per-core slot (`percpu::set_local`).
//!
//! Sleeping: a secondary with nothing to do acknowledges its doorbells, looks at its ring
//! once more and waits in WFI until a doorbell (rung by whoever pushed into its ring) or its
//! timer (at most [`MAX_SLEEP_NS`]) wakes it, as core 0's loop does with the NIC interrupt.
//! Core 0 has a doorbell too ([`BootWake`]): a secondary rings it after pushing onto its
//! ring to core 0, but only when core 0 said it is going to sleep.

use crate::klog;
use crate::platform::{Platform, heap_calls};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use keel_hal::MAX_CORES;
use keel_hal::arch::percpu::{self, CoreInfo};
use keel_hal::arch::smp::{self, CoreContext, Started};
use keel_hal::arch::timer;
use keel_hal::gic::{CpuInterface, Doorbell, GicCpu};
use keel_hal::println;
use keel_ring::stats::LoopCounters;
use keel_ring::wake::SleepFlag;
use keel_ring::{Consumer, Producer, Ring};
use keel_storage::stats::LatencyHistogram;

/// Every core's loop counters, indexed by core; each core writes only its own block (one
/// cache line each), and core 0 reads them all for `keelctl status` and `/metrics`.
pub static LOOPS: [LoopCounters; MAX_CORES] = [const { LoopCounters::new() }; MAX_CORES];

/// Bit `i` set: core `i` runs a poll loop (core 0 always; a secondary once started).
static RUNNING: AtomicU64 = AtomicU64::new(1);
/// Bit `i` set: core `i` serves NVMe/TCP on its own queue pair ([`crate::percore`]).
static PLANES: AtomicU64 = AtomicU64::new(0);
/// Bit `i` set: core `i` serves emulated functions' I/O queue pairs ([`crate::fnq`]).
static FN_CORES: AtomicU64 = AtomicU64::new(0);
/// Bit `i` set: core `i` has acted on its queue pair (serving, or said why it cannot).
static PLANES_TRIED: AtomicU64 = AtomicU64::new(0);

/// Waits until every core of `cores` (a bit per core) has acted on the queue pair handed to
/// it, at most `timeout_ns`: `keel: ready` then means every core listens. Returns the cores
/// of `cores` serving.
pub fn wait_for_planes(cores: u64, timeout_ns: u64) -> u64 {
    let start = timer::now_ns();
    while PLANES_TRIED.load(Ordering::Acquire) & cores != cores
        && timer::now_ns() - start < timeout_ns
    {
        core::hint::spin_loop();
    }
    PLANES.load(Ordering::Acquire) & cores
}

/// The cores (a bit each) serving NVMe/TCP on their own queue pair.
pub fn planes() -> u64 {
    PLANES.load(Ordering::Acquire)
}

/// What core 0's loop serves (status and `/metrics`).
pub const BOOT_CORE_ROLE: &str = "network, NVMe/TCP, drives, functions, management";
/// What core 0 serves when the other cores serve NVMe/TCP too.
pub const CONTROLLER_CORE_ROLE: &str = "network (queue pair 0), NVMe/TCP, controllers and admin queues of every core's connections, drives, functions, management";
/// What a secondary's loop serves without a queue pair.
pub const SECONDARY_ROLE: &str = "messages from core 0";
/// What a secondary serves with its queue pair.
pub const DATA_CORE_ROLE: &str =
    "network (its queue pair), NVMe/TCP I/O queues (admin through core 0)";
/// What a secondary serves with its queue pair and emulated functions' queue pairs.
pub const DATA_CORE_FN_ROLE: &str = "network (its queue pair), NVMe/TCP I/O queues (admin through core 0), emulated functions' I/O queue pairs";
/// What a secondary serves with emulated functions' queue pairs only.
pub const FN_CORE_ROLE: &str = "emulated functions' I/O queue pairs (admin on core 0)";

/// One core's NVMe/TCP counters, written by that core alone once per pass (a `Relaxed`
/// store of its own totals) and read by core 0 without a lock.
#[derive(Debug)]
#[repr(align(64))]
pub struct NvmfCounters {
    accepted: AtomicU64,
    commands: AtomicU64,
}

impl NvmfCounters {
    const fn new() -> Self {
        Self {
            accepted: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        }
    }

    /// Owner: its service's totals (connections accepted, commands taken).
    pub fn publish(&self, accepted: u64, commands: u64) {
        self.accepted.store(accepted, Ordering::Relaxed);
        self.commands.store(commands, Ordering::Relaxed);
    }
}

/// Every core's NVMe/TCP counters, indexed by core.
pub static NVMF: [NvmfCounters; MAX_CORES] = [const { NvmfCounters::new() }; MAX_CORES];

/// Commands of emulated functions' queues each core fetched (core 0: the admin queues and
/// the I/O queues it serves; core k: the I/O queue pairs it serves, `crate::fnq`), each
/// written by its core alone (a `Relaxed` store of its total) and read by core 0.
pub static FUNCTION_COMMANDS: [AtomicU64Line; MAX_CORES] =
    [const { AtomicU64Line::new() }; MAX_CORES];

/// One counter on a cache line of its own.
#[derive(Debug)]
#[repr(align(64))]
pub struct AtomicU64Line(AtomicU64);

impl AtomicU64Line {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Owner: its total.
    pub fn publish(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The total last published.
    pub fn read(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One core's NIC transmit counters (its queue pair's), written by that core alone once per
/// pass (a `Relaxed` store of the driver's totals) and read by core 0 without a lock.
#[derive(Debug)]
#[repr(align(64))]
pub struct NicCounters {
    tx_tso_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

impl NicCounters {
    const fn new() -> Self {
        Self {
            tx_tso_frames: AtomicU64::new(0),
            tx_dropped: AtomicU64::new(0),
        }
    }

    /// Owner: its NIC's totals.
    pub fn publish(&self, c: keel_mgmt::NicCounters) {
        self.tx_tso_frames.store(c.tx_tso_frames, Ordering::Relaxed);
        self.tx_dropped.store(c.tx_dropped, Ordering::Relaxed);
    }
}

/// Every core's NIC counters, indexed by core.
pub static NIC: [NicCounters; MAX_CORES] = [const { NicCounters::new() }; MAX_CORES];

/// The NIC counters every core published, summed.
pub fn nic_counters() -> keel_mgmt::NicCounters {
    NIC.iter().fold(keel_mgmt::NicCounters::default(), |a, c| {
        keel_mgmt::NicCounters {
            tx_tso_frames: a.tx_tso_frames + c.tx_tso_frames.load(Ordering::Relaxed),
            tx_dropped: a.tx_dropped + c.tx_dropped.load(Ordering::Relaxed),
        }
    })
}

/// Core 0's wake-up by the other cores: its "sleeping" flag, and the counters of what it
/// did (each written by one core).
///
/// Memory ordering (the store-buffering pattern, as in Dekker's algorithm): core 0, about to
/// sleep, acknowledges its doorbells, stores `sleeping = true`, issues a full barrier
/// (`fence(SeqCst)`: `DMB ISH`) and looks at its rings once more; a sender pushes its message
/// (the ring's `Release` store of its tail), issues a full barrier and loads `sleeping`; if it
/// is set, the sender clears it and rings core 0's doorbell. With a full barrier between
/// each side's store and its load, both loads cannot miss the other side's store: either
/// core 0 sees the message before it sleeps, or the sender sees `sleeping` and rings, and
/// the doorbell (an SGI, pending in the GIC until core 0 acknowledges it before its next
/// sleep) ends core 0's WFI even if it arrives before the WFI. `Doorbell::ring` completes the
/// push with `DSB ISHST` before the SGI write. The flag is cleared by whoever rang and by
/// core 0 when it wakes, so a burst of messages rings at most once per sleep.
///
/// QEMU 7.2's single-vCPU TCG was seen to drop `DMB`s (README "Data path"); with several
/// vCPUs MTTCG emits them. Core 0 still bounds its sleep (`poll::MAX_SLEEP_NS`) and counts
/// a *rescue* whenever that timer, not a doorbell, ended a sleep with messages waiting.
///
/// The flag and both halves of the protocol are `keel_ring::wake::SleepFlag`, model-checked
/// with loom together with the ring (`firmware/ring/tests/loom.rs`).
#[derive(Debug)]
pub struct BootWake {
    sleeping: SleepFlag,
    /// Core 0's doorbell is enabled and the secondaries were given it.
    enabled: AtomicBool,
}

/// Core 0's sleeping flag (see [`BootWake`]).
pub static BOOT_WAKE: BootWake = BootWake {
    sleeping: SleepFlag::new(),
    enabled: AtomicBool::new(false),
};

impl BootWake {
    /// Whether the other cores can ring core 0 (else its loop bounds its sleep tighter).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Core 0, before it looks at its rings a last time: "I am going to sleep". Includes
    /// the full barrier.
    pub fn going_to_sleep(&self) {
        self.sleeping.going_to_sleep();
    }

    /// Core 0, awake (or not sleeping after all): returns whether a sender rang the doorbell
    /// (it cleared the flag).
    pub fn awake(&self) -> bool {
        self.sleeping.awake()
    }

    /// A sender, after its pushes: rings `bell` if core 0 is going to sleep or sleeps;
    /// returns whether it rang.
    pub fn after_push(&self, bell: &Doorbell) -> bool {
        if self.sleeping.should_ring() {
            bell.ring();
            return true;
        }
        false
    }
}

/// One core's wake-up counters (one writer each, `Relaxed` load and store).
#[derive(Debug)]
#[repr(align(64))]
pub struct WakeCounters {
    /// Secondary: doorbells it rang to wake core 0.
    rang: AtomicU64,
    /// Core 0: sleeps its bounded timer ended with messages waiting and no doorbell.
    rescues: AtomicU64,
}

impl WakeCounters {
    const fn new() -> Self {
        Self {
            rang: AtomicU64::new(0),
            rescues: AtomicU64::new(0),
        }
    }

    fn bump(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// Owner (a secondary): it rang core 0's doorbell.
    pub fn rang(&self) {
        Self::bump(&self.rang);
    }

    /// Owner (core 0): a sleep ended by its timer found messages no doorbell announced.
    pub fn rescued(&self) {
        Self::bump(&self.rescues);
    }
}

/// Every core's wake-up counters, indexed by core.
pub static WAKES: [WakeCounters; MAX_CORES] = [const { WakeCounters::new() }; MAX_CORES];

/// Namespaces whose counters one core publishes (its replica target's).
pub const SHARED_NAMESPACES: usize = 32;

/// One namespace's counters on one core: which namespace (`key`: [`ns_key`] of its
/// subsystem's NQN and its NSID, 0 while unused, stored once with `Release` before any
/// counter) and its totals, stored by the owning core with `Relaxed` stores.
#[derive(Debug)]
#[repr(align(64))]
pub struct NsShare {
    key: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    others: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    media_errors: AtomicU64,
}

impl NsShare {
    const fn new() -> Self {
        Self {
            key: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            others: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            media_errors: AtomicU64::new(0),
        }
    }

    /// Owner: which namespace this slot counts (once, before [`NsShare::publish`]).
    pub fn claim(&self, key: u64) {
        self.key.store(key, Ordering::Release);
    }

    /// Owner: the namespace's totals on this core.
    pub fn publish(&self, s: &keel_storage::stats::NsStats) {
        self.reads.store(s.reads, Ordering::Relaxed);
        self.writes.store(s.writes, Ordering::Relaxed);
        self.others.store(s.others, Ordering::Relaxed);
        self.read_bytes.store(s.read_bytes, Ordering::Relaxed);
        self.write_bytes.store(s.write_bytes, Ordering::Relaxed);
        self.errors.store(s.errors, Ordering::Relaxed);
        self.media_errors.store(s.media_errors, Ordering::Relaxed);
    }
}

/// Slots of [`NS_SHARES`] each core has handed out ([`claim_namespace_slots`]); each
/// written by its own core only.
static NS_CLAIMED: [AtomicU64; MAX_CORES] = [const { AtomicU64::new(0) }; MAX_CORES];

/// Hands `n` of core `core`'s [`NS_SHARES`] slots (and the latency slots beside them) to one
/// replica target of that core (its NVMe/TCP plane's, its emulated functions' pairs'): the
/// first index, and how many it got (fewer when the 32 run out: the rest are not counted
/// elsewhere). Call it on that core, once per target.
pub fn claim_namespace_slots(core: usize, n: usize) -> (usize, usize) {
    let Some(c) = NS_CLAIMED.get(core) else {
        return (0, 0);
    };
    let first = (c.load(Ordering::Relaxed) as usize).min(SHARED_NAMESPACES);
    let got = n.min(SHARED_NAMESPACES - first);
    c.store((first + got) as u64, Ordering::Relaxed);
    (first, got)
}

/// Every core's namespace counters (core 0's slots stay unused: its target's counters are
/// read directly).
pub static NS_SHARES: [[NsShare; SHARED_NAMESPACES]; MAX_CORES] =
    [const { [const { NsShare::new() }; SHARED_NAMESPACES] }; MAX_CORES];

/// One latency histogram as its core publishes it (`Relaxed` stores by its owner, loads by
/// core 0: a reader may see a histogram a few samples apart from its count, never torn
/// values).
#[derive(Debug)]
pub struct HistShare {
    buckets: [AtomicU64; 64],
    count: AtomicU64,
    max: AtomicU64,
}

impl HistShare {
    fn new() -> Self {
        Self {
            buckets: core::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    fn publish(&self, h: &LatencyHistogram) {
        for (slot, &n) in self.buckets.iter().zip(h.buckets()) {
            slot.store(n, Ordering::Relaxed);
        }
        self.count.store(h.count(), Ordering::Relaxed);
        self.max.store(h.max(), Ordering::Relaxed);
    }

    fn read(&self) -> LatencyHistogram {
        LatencyHistogram::from_parts(
            core::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            self.count.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        )
    }
}

/// A namespace's read and write latency on one core, beside its [`NsShare`] (same index).
#[derive(Debug)]
pub struct NsLatencyShare {
    read: HistShare,
    write: HistShare,
}

impl NsLatencyShare {
    /// Owner: the namespace's histograms on this core.
    pub fn publish(&self, s: &keel_storage::stats::NsStats) {
        self.read.publish(&s.read_latency);
        self.write.publish(&s.write_latency);
    }
}

/// Every core's latency slots, one per [`NS_SHARES`] slot: allocated by the core when its
/// plane starts ([`latency_shares`]) and published here (`Release`); null until then. Kept
/// off the static image: 64 cores' worth would be 2 MiB.
static LAT_SHARES: [AtomicPtr<[NsLatencyShare; SHARED_NAMESPACES]>; MAX_CORES] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CORES];

/// Core `core`'s latency slots, allocated (and published for core 0) on the first call; call
/// it on that core only, off the I/O path.
pub fn latency_shares(core: usize) -> Option<&'static [NsLatencyShare; SHARED_NAMESPACES]> {
    let cell = LAT_SHARES.get(core)?;
    let p = cell.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: a non-null pointer here came from `Box::leak` below and is never freed.
        return Some(unsafe { &*p });
    }
    let shares: &'static mut [NsLatencyShare; SHARED_NAMESPACES] =
        Box::leak(Box::new(core::array::from_fn(|_| NsLatencyShare {
            read: HistShare::new(),
            write: HistShare::new(),
        })));
    cell.store(core::ptr::from_mut(shares), Ordering::Release);
    Some(shares)
}

/// Stores `target`'s namespace counters in core `core`'s slots `slots` (first, count) of
/// [`NS_SHARES`] and the latency slots beside them (`Relaxed` stores; call it on that core).
pub fn publish_namespaces(core: usize, slots: (usize, usize), target: &keel_controller::Target) {
    let Some(shares) = NS_SHARES.get(core) else {
        return;
    };
    let (first, count) = slots;
    let lat = latency_shares(core);
    for (i, n) in target.namespace_views().take(count).enumerate() {
        let Some(slot) = shares.get(first + i) else {
            return;
        };
        slot.claim(ns_key(n.subsystem, n.nsid));
        slot.publish(n.stats);
        if let Some(l) = lat.and_then(|l| l.get(first + i)) {
            l.publish(n.stats);
        }
    }
}

/// The key of a namespace in [`NS_SHARES`]: FNV-1a of its subsystem's NQN mixed with its
/// NSID; never 0.
pub fn ns_key(subnqn: &str, nsid: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subnqn.bytes().chain(nsid.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// What the other cores' replica targets counted for a namespace: reads, writes, others,
/// read bytes, written bytes, errors, read and write latency (read without a lock; core 0
/// adds its own target's).
pub fn namespace_elsewhere(subnqn: &str, nsid: u32) -> keel_storage::stats::NsStats {
    let key = ns_key(subnqn, nsid);
    let running = RUNNING.load(Ordering::Acquire);
    let mut t = keel_storage::stats::NsStats::default();
    for (core, slots) in NS_SHARES.iter().enumerate().skip(1) {
        if core >= 64 || running & (1 << core) == 0 {
            continue;
        }
        let lat = LAT_SHARES[core].load(Ordering::Acquire);
        for (i, s) in slots.iter().enumerate() {
            if s.key.load(Ordering::Acquire) != key {
                continue;
            }
            if !lat.is_null() {
                // SAFETY: published by `latency_shares` from `Box::leak`, never freed.
                let l = unsafe { &(*lat)[i] };
                t.read_latency.add(&l.read.read());
                t.write_latency.add(&l.write.read());
            }
            t.reads += s.reads.load(Ordering::Relaxed);
            t.writes += s.writes.load(Ordering::Relaxed);
            t.others += s.others.load(Ordering::Relaxed);
            t.read_bytes += s.read_bytes.load(Ordering::Relaxed);
            t.write_bytes += s.write_bytes.load(Ordering::Relaxed);
            t.errors += s.errors.load(Ordering::Relaxed);
            t.media_errors += s.media_errors.load(Ordering::Relaxed);
        }
    }
    t
}

/// Drives whose queue pairs one core publishes (its own pair on each).
pub const SHARED_DRIVES: usize = 8;
/// Remote volumes' I/O queues one core publishes (its lanes' queues, every path).
pub const SHARED_LANE_QUEUES: usize = 16;

/// Every core's I/O queue pairs on the drives, written by their own core
/// (`crate::shares`: claimed at start, totals published with its namespace counters), read
/// by core 0 (core 0's slots stay unused: its drives' counters are read directly).
pub static DRIVE_SHARES: [[crate::shares::DriveQueueShare; SHARED_DRIVES]; MAX_CORES] =
    [const { [const { crate::shares::DriveQueueShare::new() }; SHARED_DRIVES] }; MAX_CORES];

/// Every core's I/O queues of remote volumes (its lanes'), written by their own core with its
/// namespace counters, read by core 0 (core 0's slots stay unused).
pub static LANE_SHARES: [[crate::shares::LaneQueueShare; SHARED_LANE_QUEUES]; MAX_CORES] =
    [const { [const { crate::shares::LaneQueueShare::new() }; SHARED_LANE_QUEUES] }; MAX_CORES];

/// Every core's lanes of remote volumes, one slot per lane with its requests' counts and
/// counters, written by their own core with its namespace counters, read by core 0 (core
/// 0's slots stay unused).
pub static LANE_VOLUMES: [[crate::shares::LaneVolumeShare; SHARED_LANE_QUEUES]; MAX_CORES] =
    [const { [const { crate::shares::LaneVolumeShare::new() }; SHARED_LANE_QUEUES] }; MAX_CORES];

/// Every target's capped drive domains and limited namespaces (`crate::shares::DemandRow`,
/// issue 17): core `k`'s
/// NVMe/TCP target (core 0's own for core 0) in row `k`, its function replica in row
/// `MAX_CORES + k`; each written by its own core once a pass, read by every other.
pub static DEMANDS: [crate::shares::DemandRow; crate::shares::DEMAND_ROWS] =
    [const { crate::shares::DemandRow::new() }; crate::shares::DEMAND_ROWS];
const _: () = assert!(crate::shares::DEMAND_CORES == MAX_CORES);

/// The mask of cores running a poll loop (bit `i`: core `i`).
pub fn running_mask() -> u64 {
    RUNNING.load(Ordering::Acquire)
}

/// The other running cores' I/O queue pairs on drive `drive` (index among the drives).
pub fn drive_queues_elsewhere(drive: usize) -> Vec<keel_mgmt::DriveQueueInfo> {
    crate::shares::drive_rows(&DRIVE_SHARES, RUNNING.load(Ordering::Acquire), drive)
}

/// The other running cores' I/O queues of remote volume `volume` (its id).
pub fn remote_queues_elsewhere(volume: u32) -> Vec<crate::shares::LaneRow> {
    crate::shares::lane_rows(&LANE_SHARES, RUNNING.load(Ordering::Acquire), volume)
}

/// This core's loop counters.
pub fn own_counters() -> &'static LoopCounters {
    &LOOPS[percpu::index().min(MAX_CORES - 1)]
}

/// Every running core's counters, read without a lock (core 0 first).
pub fn counters() -> Vec<keel_mgmt::CoreInfo> {
    let running = RUNNING.load(Ordering::Acquire);
    let planes = PLANES.load(Ordering::Acquire);
    let fns = FN_CORES.load(Ordering::Acquire);
    percpu::cores()
        .iter()
        .filter(|c| c.index < 64 && running & (1 << c.index) != 0)
        .map(|c| {
            let l = LOOPS[c.index].read();
            keel_mgmt::CoreInfo {
                index: c.index as u16,
                mpidr: c.mpidr,
                role: match (
                    c.index,
                    planes & (1 << c.index) != 0,
                    fns & (1 << c.index) != 0,
                ) {
                    (0, _, _) if planes != 0 => CONTROLLER_CORE_ROLE,
                    (0, _, _) => BOOT_CORE_ROLE,
                    (_, true, true) => DATA_CORE_FN_ROLE,
                    (_, true, false) => DATA_CORE_ROLE,
                    (_, false, true) => FN_CORE_ROLE,
                    _ => SECONDARY_ROLE,
                }
                .into(),
                passes: l.passes,
                busy_passes: l.busy_passes,
                sleeps: l.sleeps,
                messages: l.messages,
                allocator_calls: heap_calls(c.index),
                nvmf_connections: NVMF[c.index].accepted.load(Ordering::Relaxed),
                nvmf_commands: NVMF[c.index].commands.load(Ordering::Relaxed),
                doorbells_to_core0: WAKES[c.index].rang.load(Ordering::Relaxed),
                function_commands: FUNCTION_COMMANDS[c.index].read(),
                wakeup_rescues: WAKES[c.index].rescues.load(Ordering::Relaxed),
            }
        })
        .collect()
}

/// Messages per ring (each way).
pub const RING_SLOTS: usize = 64;
/// How long a secondary spins after its last work before it sleeps.
const IDLE_SPIN_NS: u64 = 200_000;
/// The longest sleep (a lost doorbell costs at most this).
const MAX_SLEEP_NS: u64 = 5_000_000;
/// The longest sleep of a core serving NVMe/TCP (frames on its pair wake core 0, which rings
/// it; if core 0 was busy then, this bounds the delay).
const PLANE_SLEEP_NS: u64 = 1_000_000;
/// How long core 0 waits for a reply at boot.
const REPLY_TIMEOUT_NS: u64 = 2_000_000_000;

/// A message between cores (rings move it by value; what it owns moves with it).
#[derive(Debug)]
pub enum Msg {
    /// Core 0 → core k: answer with a [`Msg::Pong`] carrying `seq` and `value + 1`.
    Ping {
        /// Sequence number.
        seq: u64,
        /// Payload.
        value: u64,
    },
    /// Core k → core 0.
    Pong {
        /// The ping's sequence number.
        seq: u64,
        /// The ping's value plus one.
        value: u64,
        /// The answering core's index.
        core: u16,
        /// Passes its loop has made.
        passes: u64,
        /// Allocator calls it made since its loop started (the I/O path must make none).
        allocs: u64,
    },
    /// Core 0 → core k: serve NVMe/TCP on this queue pair (see [`crate::percore`]).
    Serve(Box<crate::percore::ServeSpec>),
    /// Core k → core 0: for the controller core (forwarded commands, closed connections,
    /// keep-alive traffic).
    ToHolder(crate::nvmf::ToHolder),
    /// Core 0 → core k: the controller core's answer.
    FromHolder(crate::nvmf::FromHolder),
    /// Core 0 ↔ core k: emulated functions' I/O queue pairs (see [`crate::fnq`]).
    Fn(crate::fnq::FnMsg),
    /// Core k → core 0: a received frame of a flow core 0 serves (management, DHCP,
    /// outgoing connections), to be received there; core 0 → core k: a frame of core k's
    /// outgoing connections that landed on pair 0.
    Frame(alloc::vec::Vec<u8>),
    /// Core 0 → core k: a remote volume's lane, or news of its associations (see
    /// [`crate::percore`]).
    Remote(crate::percore::RemoteMsg),
    /// Core k → core 0: it made volume `id`'s lane and added its namespaces to its replica
    /// (`ok`), or could not.
    RemoteReady {
        /// The volume.
        id: u32,
        /// The core.
        core: u16,
        /// Whether every namespace of the volume is in its replica.
        ok: bool,
    },
    /// Core 0 → core k: a live namespace change of a subsystem its replica serves
    /// ([`crate::replica`]); answer with [`Msg::ReplicaAck`].
    Replica(alloc::boxed::Box<crate::replica::ReplicaChange>),
    /// Core k → core 0: it applied change `seq` to its replica (`ok`), or could not.
    ReplicaAck {
        /// The change.
        seq: u64,
        /// The core.
        core: u16,
        /// Whether its replica has the change.
        ok: bool,
    },
    /// Core k → core 0: its lane of volume `id` lost an I/O queue.
    RemoteLost {
        /// The volume.
        id: u32,
        /// Which association, and why.
        loss: keel_remote::LaneLoss,
    },
    /// Test builds: recurse into the stack guard page (`keel.test=core-overflow`).
    #[cfg(feature = "test-build")]
    Overflow,
}

type Tx = Producer<'static, Msg, RING_SLOTS>;
type Rx = Consumer<'static, Msg, RING_SLOTS>;

/// Core 0's end of one secondary's rings.
pub struct Link {
    /// The secondary.
    pub info: &'static CoreInfo,
    /// Core 0 → secondary.
    pub tx: Tx,
    /// Secondary → core 0.
    pub rx: Rx,
    /// Wakes the secondary after a push.
    pub doorbell: Option<Doorbell>,
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Link")
            .field("core", &self.info.index)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Sends `msg` and rings the core's doorbell; gives the message back if the ring is full.
    // The ring holds messages by value (a forwarded command carries its SQE and its data
    // buffer's handle, ~150 bytes); giving one back is a move, never an allocation.
    #[allow(clippy::result_large_err)]
    pub fn send(&mut self, msg: Msg) -> Result<(), Msg> {
        self.tx.push(msg)?;
        if let Some(d) = &self.doorbell {
            d.ring();
        }
        Ok(())
    }
}

/// Core 0's links to every secondary that started.
#[derive(Debug, Default)]
pub struct Links(pub Vec<Link>);

/// Core 0's messages that found a link's ring full, per link: sent in order, before any
/// later message of the same link.
#[derive(Debug, Default)]
pub struct Outbox(Vec<alloc::collections::VecDeque<Msg>>);

impl Outbox {
    /// An empty outbox for `links` links.
    pub fn new(links: usize) -> Self {
        Self((0..links).map(|_| Default::default()).collect())
    }

    /// Sends `msg` on link `li`, or keeps it behind the ones already waiting there.
    pub fn send(&mut self, links: &mut Links, li: usize, msg: Msg) {
        let q = &mut self.0[li];
        if !q.is_empty() {
            q.push_back(msg);
            return;
        }
        if let Err(m) = links.0[li].send(msg) {
            q.push_back(m);
        }
    }

    /// Sends what waits, in order, as far as the rings take it.
    pub fn flush(&mut self, links: &mut Links) {
        for (li, q) in self.0.iter_mut().enumerate() {
            while let Some(m) = q.pop_front() {
                if let Err(m) = links.0[li].send(m) {
                    q.push_front(m);
                    break;
                }
            }
        }
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|q| q.is_empty())
    }
}

/// One line per core: index, MPIDR, stacks, GIC interface.
fn report(info: &CoreInfo, gic: Option<CpuInterface>, entry_el: u8) {
    let gic = match gic {
        Some(g) => alloc::format!("{g}"),
        None => "no GIC".into(),
    };
    println!(
        "core {}: MPIDR {:#x}, stack {:#x}..{:#x}, SP_EL1 stack {:#x}..{:#x}, {}, entered at EL{}",
        info.index,
        info.mpidr,
        info.stack.0,
        info.stack.1,
        info.exc_stack.0,
        info.exc_stack.1,
        gic,
        entry_el
    );
}

/// Starts every secondary the platform lists, checks the round trip to each, and keeps core
/// 0's links in its per-core slot. Returns how many cores run (core 0 included).
pub fn start(platform: &mut Platform, entry_el: u8) -> usize {
    let boot_gic = platform.gic.as_ref().map(|g| g.this_interface());
    report(&platform.cores[0], boot_gic, entry_el);
    #[cfg(feature = "test-build")]
    if platform
        .dt
        .bootargs
        .split_whitespace()
        .any(|a| a == "keel.test=netmq")
    {
        crate::netmq::run(platform);
        keel_hal::arch::power::semihosting_exit(1);
    }
    let timer_intid = platform.dt.timer_intid;
    // Core 0's doorbell, for the secondaries (rung only while core 0 sleeps: `BootWake`).
    let boot_bell = if platform.cores.len() > 1 {
        platform.gic.as_mut().and_then(|g| g.enable_doorbell().ok())
    } else {
        None
    };
    BOOT_WAKE
        .enabled
        .store(boot_bell.is_some(), Ordering::Relaxed);
    let mut links = Links::default();
    for info in &platform.cores[1..] {
        let gic = platform
            .gic
            .as_ref()
            .and_then(|g| g.cpu_interface(info.mpidr));
        if platform.gic.is_some() && gic.is_none() {
            klog::warning!(
                "core {}: no GIC interface for MPIDR {:#x}; not started",
                info.index,
                info.mpidr
            );
            continue;
        }
        let (to_core, from_boot) = Ring::split_static(Box::leak(Box::new(Ring::new())));
        let (to_boot, from_core) = Ring::split_static(Box::leak(Box::new(Ring::new())));
        let main = Box::new(move |ctx: CoreContext| {
            DataCore::new(ctx, from_boot, to_boot, timer_intid, boot_bell).run()
        });
        match smp::start(info, gic, main) {
            Ok(Started { info, doorbell }) => {
                RUNNING.fetch_or(1 << info.index, Ordering::Release);
                links.0.push(Link {
                    info,
                    tx: to_core,
                    rx: from_core,
                    doorbell,
                })
            }
            Err(e) => klog::error!("core {}: not started: {}", info.index, klog::D(&e)),
        }
    }
    for link in &mut links.0 {
        match round_trip(link, 1, 0x5eed) {
            Ok(p) => println!(
                "core {}: ring round trip from core 0 and back in {} us (its loop: {} passes, {} allocator calls)",
                link.info.index, p.micros, p.passes, p.allocs
            ),
            Err(e) => klog::error!(
                "core {}: ring round trip failed: {}",
                link.info.index,
                klog::D(&e)
            ),
        }
    }
    let running = links.0.len() + 1;
    println!(
        "cores: {running} of {} running a poll loop each",
        platform.dt.cpus
    );
    if let Err(e) = percpu::set_local(links) {
        klog::error!(
            "cores: cannot keep the links in core 0's slot: {}",
            klog::Dbg(&e)
        );
    }
    running
}

/// What a round trip showed.
#[derive(Debug)]
pub struct Trip {
    /// Time from send to reply.
    pub micros: u64,
    /// The secondary's loop passes at reply time.
    pub passes: u64,
    /// Allocator calls the secondary made in its loop.
    pub allocs: u64,
}

/// Sends one ping and waits (bounded) for its pong.
pub fn round_trip(link: &mut Link, seq: u64, value: u64) -> Result<Trip, &'static str> {
    let start = timer::now_ns();
    link.send(Msg::Ping { seq, value })
        .map_err(|_| "ring to the core is full")?;
    loop {
        match link.rx.pop() {
            Some(Msg::Pong {
                seq: s,
                value: v,
                core,
                passes,
                allocs,
            }) => {
                if s != seq || v != value.wrapping_add(1) || usize::from(core) != link.info.index {
                    return Err("wrong reply");
                }
                return Ok(Trip {
                    micros: (timer::now_ns() - start) / 1_000,
                    passes,
                    allocs,
                });
            }
            Some(_) => return Err("unexpected message"),
            None if timer::now_ns() - start > REPLY_TIMEOUT_NS => return Err("no reply"),
            None => core::hint::spin_loop(),
        }
    }
}

/// A secondary's poll loop and what it owns.
struct DataCore {
    info: &'static CoreInfo,
    gic: Option<GicCpu>,
    rx: Rx,
    tx: Tx,
    passes: u64,
    /// Allocator calls of this core when its loop started.
    allocs_at_start: u64,
    sleeps: bool,
    counters: &'static LoopCounters,
    /// Its NVMe/TCP data plane, once core 0 handed it a queue pair.
    plane: Option<crate::percore::Plane>,
    /// The emulated functions' I/O queue pairs it serves, once core 0 asked it to.
    fns: Option<crate::fnq::FnCore>,
    /// Messages for core 0 that found the ring full.
    backlog: alloc::collections::VecDeque<Msg>,
    /// Core 0's doorbell (see [`BootWake`]).
    boot_bell: Option<Doorbell>,
}

impl DataCore {
    fn new(
        ctx: CoreContext,
        rx: Rx,
        tx: Tx,
        timer_intid: Option<u32>,
        boot_bell: Option<Doorbell>,
    ) -> Self {
        let CoreContext {
            info,
            mut gic,
            entry_el,
        } = ctx;
        report(info, gic.as_ref().map(GicCpu::desc), entry_el);
        // Its timer wakes it from WFI (a PPI: this core's own).
        let sleeps = match (gic.as_mut(), timer_intid) {
            (Some(g), Some(t)) => g.enable_wakeup(t).is_ok(),
            _ => false,
        };
        Self {
            info,
            gic,
            rx,
            tx,
            passes: 0,
            allocs_at_start: heap_calls(info.index),
            sleeps,
            counters: &LOOPS[info.index.min(MAX_CORES - 1)],
            plane: None,
            fns: None,
            backlog: alloc::collections::VecDeque::new(),
            boot_bell,
        }
    }

    /// One pass: serve every message waiting; returns whether there was any.
    fn pass(&mut self) -> bool {
        self.passes += 1;
        let mut taken = 0;
        let mut pushed = false;
        let now = timer::now_ns();
        while let Some(msg) = self.rx.pop() {
            taken += 1;
            #[cfg(feature = "test-build")]
            if matches!(msg, Msg::Overflow) {
                println!("keel: test stack overflow on core {}", self.info.index);
                println!("unreachable: {}", crate::testhooks::recurse(1));
            }
            if let Msg::Serve(spec) = msg {
                self.plane = crate::percore::Plane::new(self.info.index, *spec, now);
                if self.plane.is_some() {
                    PLANES.fetch_or(1 << self.info.index, Ordering::Release);
                }
                PLANES_TRIED.fetch_or(1 << self.info.index, Ordering::Release);
            } else if let Msg::FromHolder(m) = msg {
                if let Some(p) = self.plane.as_mut() {
                    p.on_holder(m, now);
                }
            } else if let Msg::Frame(f) = msg {
                if let Some(p) = self.plane.as_mut() {
                    p.inject(f);
                }
            } else if let Msg::Replica(c) = msg {
                let backlog = &mut self.backlog;
                match self.plane.as_mut() {
                    Some(p) => p.on_replica(&c, &mut |m| backlog.push_back(m)),
                    None => backlog.push_back(Msg::ReplicaAck {
                        seq: c.seq,
                        core: self.info.index as u16,
                        ok: false,
                    }),
                }
            } else if let Msg::Remote(m) = msg {
                if let Some(p) = self.plane.as_mut() {
                    let backlog = &mut self.backlog;
                    p.on_remote(m, now, self.fns.as_mut(), &mut |m| backlog.push_back(m));
                }
            } else if let Msg::Fn(m) = msg {
                let backlog = &mut self.backlog;
                crate::fnq::FnCore::on_message(&mut self.fns, self.info.index, m, now, &mut |m| {
                    backlog.push_back(Msg::Fn(m))
                });
                if self.fns.is_some() && self.info.index < 64 {
                    FN_CORES.fetch_or(1 << self.info.index, Ordering::Release);
                }
            } else if let Msg::Ping { seq, value } = msg {
                let reply = Msg::Pong {
                    seq,
                    value: value.wrapping_add(1),
                    core: self.info.index as u16,
                    passes: self.passes,
                    allocs: heap_calls(self.info.index) - self.allocs_at_start,
                };
                // Core 0 drains its side while it waits for replies; a full ring here means
                // it stopped listening: the reply is dropped, and core 0 times out.
                pushed |= self.tx.push(reply).is_ok();
            }
        }
        let mut busy = taken > 0;
        if let Some(p) = self.plane.as_mut() {
            let backlog = &mut self.backlog;
            busy |= p.pass(now, &mut |m| backlog.push_back(m));
        }
        if let Some(f) = self.fns.as_mut() {
            let backlog = &mut self.backlog;
            busy |= f.pass(now, &mut |m| backlog.push_back(Msg::Fn(m)));
        }
        while let Some(m) = self.backlog.pop_front() {
            if let Err(m) = self.tx.push(m) {
                self.backlog.push_front(m);
                break;
            }
            pushed = true;
        }
        if pushed
            && let Some(bell) = &self.boot_bell
            && BOOT_WAKE.after_push(bell)
        {
            WAKES[self.info.index.min(MAX_CORES - 1)].rang();
        }
        // Frames leave after the messages for core 0 are on the ring (`Plane::egress`).
        if let Some(p) = self.plane.as_mut() {
            busy |= p.egress(now);
        }
        self.counters.pass(busy);
        self.counters.received(taken);
        busy
    }

    fn run(mut self) {
        let mut last_busy = timer::now_ns();
        loop {
            let now = timer::now_ns();
            if self.pass() {
                last_busy = now;
                continue;
            }
            // Drive completions on its own queue pairs raise no interrupt: spin while any
            // command is outstanding there.
            if !self.sleeps
                || now - last_busy < IDLE_SPIN_NS
                || self.plane.as_ref().is_some_and(|p| !p.may_sleep())
                || self.fns.as_ref().is_some_and(|f| !f.may_sleep())
            {
                core::hint::spin_loop();
                continue;
            }
            // Idle: clear the doorbells, look once more (a push may have come before the
            // clear), then sleep until a doorbell or the timer.
            if let Some(g) = self.gic.as_mut() {
                g.take_doorbells();
            }
            if self.pass() {
                last_busy = now;
                continue;
            }
            self.counters.slept();
            let sleep = if self.plane.is_some() {
                PLANE_SLEEP_NS
            } else {
                MAX_SLEEP_NS
            };
            timer::arm_wakeup(timer::counter().saturating_add(timer::ns_to_ticks(sleep)));
            timer::wait_for_interrupt();
            timer::disarm_wakeup();
        }
    }
}

/// `keel.test=cores` (test builds): streams [`SELFTEST_MESSAGES`] pings to every secondary,
/// up to half a ring in flight, and checks every pong (order, value, sender), that each
/// secondary's loop kept running, and that it made no allocator call while serving them.
/// Prints one line per core and `keel: cores selftest PASS` or `FAIL`; returns whether it
/// passed.
#[cfg(feature = "test-build")]
pub fn selftest() -> bool {
    let result = percpu::with_local::<Links, _>(|links| {
        let mut pass = true;
        for link in &mut links.0 {
            let outcome = stream(link);
            match &outcome {
                Ok(t) => println!(
                    "cores: core {}: {} messages there and back in order, {} loop passes, {} allocator calls in its loop",
                    link.info.index, SELFTEST_MESSAGES, t.passes, t.allocs
                ),
                Err(e) => println!("cores: core {}: FAILED: {e}", link.info.index),
            }
            pass &= matches!(outcome, Ok(Trip { allocs: 0, .. }));
        }
        (pass, links.0.len())
    });
    let (pass, n) = result.unwrap_or((false, 0));
    println!(
        "keel: cores selftest {} ({} secondary core(s))",
        if pass { "PASS" } else { "FAIL" },
        n
    );
    pass
}

/// `keel.test=core-overflow` (test builds): asks the last secondary to recurse into its
/// stack guard page; its crash report (exit 3) names the core. Returns if there is none.
#[cfg(feature = "test-build")]
pub fn overflow_last_core() {
    let sent = percpu::with_local::<Links, _>(|links| {
        links.0.last_mut().map(|l| l.send(Msg::Overflow).is_ok())
    });
    if sent.flatten() != Some(true) {
        println!("keel: no secondary core to overflow");
        return;
    }
    // The crash report ends the run; wait for it.
    loop {
        core::hint::spin_loop();
    }
}

/// Pings per secondary in [`selftest`].
#[cfg(feature = "test-build")]
pub const SELFTEST_MESSAGES: u64 = 20_000;

#[cfg(feature = "test-build")]
fn stream(link: &mut Link) -> Result<Trip, &'static str> {
    let start = timer::now_ns();
    let deadline = start + 60_000_000_000;
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last = None;
    while received < SELFTEST_MESSAGES {
        while sent < SELFTEST_MESSAGES && sent - received < (RING_SLOTS / 2) as u64 {
            let value = sent.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            if link.send(Msg::Ping { seq: sent, value }).is_err() {
                break;
            }
            sent += 1;
        }
        match link.rx.pop() {
            Some(Msg::Pong {
                seq,
                value,
                core,
                passes,
                allocs,
            }) => {
                let expected = received.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
                if seq != received || value != expected || usize::from(core) != link.info.index {
                    return Err("a reply out of order, corrupted or from another core");
                }
                received += 1;
                last = Some(Trip {
                    micros: (timer::now_ns() - start) / 1_000,
                    passes,
                    allocs,
                });
            }
            Some(_) => return Err("unexpected message"),
            None if timer::now_ns() > deadline => return Err("replies stopped"),
            None => core::hint::spin_loop(),
        }
    }
    last.ok_or("no reply")
}
