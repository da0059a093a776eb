//! The emulated functions' I/O queues on every core (`qemu/run --smp N`): I/O queue pair `q`
//! of a function whose subsystem every core can serve is served entirely on core `q % N`;
//! core 0 keeps every function's registers, admin queue, queue management, resets,
//! shutdown and removal.
//!
//! Which functions: those whose subsystem is replicable ([`Services::function_replicas`]:
//! every namespace RAM in a shared region or a local drive's namespace (whole or a slice),
//! AES-XTS encrypted or not), at boot or created live (`keelctl function create`, or a
//! pushed description putting a function with a subsystem of its own on a free slot: the
//! same rule; its RAM is then made in a shared region and [`FnEvent::Created`] tells the
//! hub once the pushed QoS is in force). QoS limits do not keep a function on core 0: its
//! controller's (`[[qos.function]]`, set on core 0 when its admin queue appears, before
//! the host can create an I/O queue) go with every pair in its
//! [`keel_controller::Adoption`], its namespaces' and their groups' are in the replica, and
//! every core serving them takes its part of each by demand once a pass
//! ([`crate::shares::CrossCore`]). A push changing a function's limits, or its namespaces'
//! QoS or groups, leaves its pairs where they are: the hub sends every core the change
//! ([`FnMsg::Qos`], with the functions' controllers' new limits, `Services::drop_limited`)
//! and each core's replica takes it ([`FnCore::apply_qos`]). Core `k` reaches a drive through an I/O queue pair of
//! its own on it (`keel_nvme_driver::CoreQueue`, created by core 0 beside the NVMe/TCP
//! planes' and handed over in [`ServeFunctions::drives`], one on every drive; core `k` polls
//! it). A namespace of a remote volume is in the replica when the NVMe/TCP planes serve the
//! subsystem with lanes (`--net tap`, `crate::percore`): core `k`'s plane, given the volume's
//! lane, adds it to this replica too (one backend shared with its own replica,
//! [`FnCore::lane_users`], [`FnCore::add_lane_namespace`]) before it tells core 0, which
//! serves the namespace only once every core has it. Remote namespaces without lanes, a
//! pushed function attached to a subsystem that runs already and `--smp 1` keep every queue
//! on core 0, as before. A namespace change nobody accounts for
//! sends every pair home for good; changes the other cores' NVMe/TCP replicas follow and
//! changes confined to other subsystems do not ([`crate::replica`]).
//!
//! A function created live or pushed: core 0 sends every core its subsystem
//! ([`FnMsg::Add`]; no ack: the ring keeps the order, so the subsystem is in core `k`'s
//! replica before the function's first [`FnMsg::Adopt`] arrives, and a core that could not
//! add it refuses the pairs, which core 0 then serves), then the function spreads its I/O
//! queues. When its subsystem changes or goes ([`FnEvent::Changed`]: namespaces, a QoS change
//! the NVMe/TCP planes serving it too could not apply, its removal) its pairs come home (drained, or discarded for a removal), and once every
//! one is home core 0 has the cores drop the subsystem ([`FnMsg::Remove`]); a function
//! created again with that NQN is spread again. A boot function's subsystem is retired the
//! same way (it is dropped, [`crate::replica::Replication::dropped`]), and core 0 forgets
//! its description (`Services::replicable`): with its namespaces gone from core 0's target
//! and every replica, its reference-counted RAM ([`crate::sharedram`]) is freed. Other
//! functions' pairs stay where they are.
//!
//! The handshake (the function's side is `keel_nvme_pcie::queue`):
//! - **Handing a pair out.** After a successful Create I/O SQ, the function (on core 0)
//!   takes the SQ and its CQ out of its tables and gives them as an
//!   `keel_nvme_pcie::Handover::Export`; [`Hub`] sends core `k` an [`FnMsg::Adopt`] with the
//!   pair, the controller's [`keel_controller::Adoption`] and a view of the window restricted
//!   to the pair (`IvshmemWindow::queue_port`: its two doorbells, DMA, its interrupt vector
//!   through a `VectorBell`). Core `k` ([`FnCore`]) makes the queue an I/O queue of a replica
//!   of the function's controller in its own target and serves it with its own data buffers
//!   every pass: no lock, no message, no allocation per command. If it cannot (no replica,
//!   refused), it sends the pair straight back ([`FnMsg::Returned`]) and core 0 serves it.
//! - **Taking it back.** The function asks ([`FnMsg::Recall`]): to drain (Delete I/O SQ,
//!   Create I/O SQ on the pair's CQ, CC.SHN, namespaces changed) core `k` stops fetching and
//!   waits until none of the pair's commands is in flight, to discard (CC.EN = 0, removal) it
//!   drops them; then it closes its replica queue, drops its window view and sends the pair
//!   back ([`FnMsg::Returned`]), which core 0 puts back in place. The admin command waits in
//!   its SQ, CSTS.RDY stays 1 and a removed function's slot stays `removing` until the pair
//!   is home: from then on no other core touches the window.
//! - **Aborts.** While a pair is abroad the function marks its queue served elsewhere in
//!   its controller on core 0 (`keel_controller::Target::served_elsewhere`), so a host's
//!   Abort (admin opcode 08h) of one of its commands is parked there instead of answered
//!   "not aborted"; the function hands it out as a `keel_nvme_pcie::Handover::Abort` and
//!   [`Hub`] sends core `k` an [`FnMsg::Abort`] (one message per Abort). Core `k`'s replica
//!   decides (`Target::abort_for_holder`: a command still waiting is aborted at once, one at
//!   a drive is aborted there through the drive queue's Abort, `keel_nvme_driver`) and
//!   answers [`FnMsg::AbortVerdict`], at once or with the command's completion (a drained
//!   pair's ahead of its [`FnMsg::Returned`]); core 0 completes the Abort with it. When the
//!   pair comes home first (the Abort crossed it, or a discard dropped the command) or the
//!   function is reset, the function's next poll answers the Abort "not aborted" and a
//!   verdict arriving later is ignored: exactly one answer.
//! - **Errors.** A pair that finds an invalid doorbell value or a queue entry host memory
//!   refuses stops and reports it ([`FnMsg::Fatal`]); the function sets CSTS.CFS as it would
//!   have on core 0, and the host's reset brings the pair home.
//!
//! The messages are the rings' ([`crate::cores::Link`]): one per pair handed out or taken
//! back and two per host Abort, never per command. Core `k` publishes its replica's
//! namespace counters beside its NVMe/TCP plane's (`crate::cores::NS_SHARES`, merged by core
//! 0 for status and `/metrics`) and its command count (`keel_core_function_commands_total`).

use crate::cores::{FUNCTION_COMMANDS, Links, Msg, Outbox};
use crate::klog;
use crate::qemu::Qemu;
use crate::replica::FnEvent;
use crate::services::{
    ReplicaNs, ReplicaShares, ReplicaSource, ReplicaSubsystem, Services, add_replica_subsystem,
    replica_target_shares,
};
use alloc::rc::Rc;
use alloc::{boxed::Box, string::String, vec::Vec};
use core::cell::RefCell;
use keel_controller::{Adoption, Event, Instant, Limits, QueueId, Target};
use keel_hal::ivshmem::IvshmemWindow;
use keel_hal::nvme::CoreNvmeQueue;
use keel_hal::println;
use keel_mgmt::SlotState;
use keel_nvme_pcie::{FatalReason, Handover, IoPair, PairStats, QueuePort};
use keel_storage::BufPool;

/// Owner of the pairs' queues in a core's replica target (it holds nothing else).
const FN_OWNER: u16 = 1;
/// Data buffers of a core serving pairs (128 KiB each: the functions' MDTS).
const FN_BUFFERS: usize = 32;
const FN_BUFFER_SIZE: usize = 128 * 1024;
/// Commands fetched from one pair per pass.
const FETCH_BURST: u16 = 32;
/// How often a busy core publishes its namespace counters.
const NS_PUBLISH_NS: u64 = 1_000_000;
/// Namespace counter slots a core keeps for the namespaces of functions created live.
const LIVE_NAMESPACE_SLOTS: usize = 8;

/// A function's window as a core serving one of its pairs sees it.
pub type Port = QueuePort<IvshmemWindow>;

/// A message about the functions' I/O queue pairs between core 0 and core `k`.
#[derive(Debug)]
pub enum FnMsg {
    /// Core 0 → core k: build a replica of these subsystems and serve the pairs handed out.
    Serve(Box<ServeFunctions>),
    /// Core 0 → core k: add the subsystem of a function created live to the replica (its
    /// pairs follow as [`FnMsg::Adopt`]s; if it cannot, it refuses them and core 0 serves
    /// them).
    Add(Box<ReplicaSubsystem>),
    /// Core 0 → core k: remove subsystem `nqn` from the replica (its function was removed
    /// or changed, and every pair of it is back on core 0).
    Remove(String),
    /// Core 0 → core k: a push changed the QoS of subsystem `nqn` (core 0 applied it
    /// already): the replica takes it (`crate::services::apply_replica_qos`: its namespaces'
    /// QoS, the groups, the host rules, the replicas of its functions' controllers' limits)
    /// and the pairs it serves stay. No answer: a core without the subsystem in its replica
    /// has none of its pairs (it refused them, core 0 serves them).
    Qos {
        /// The subsystem.
        nqn: String,
        /// Its new QoS.
        qos: Box<crate::replica::ReplicaQos>,
    },
    /// Core 0 → core k: serve this pair.
    Adopt(Box<Adopt>),
    /// Core 0 → core k: send pair `qid` of function `slot` back (see [`Handover::Recall`]).
    Recall {
        /// Function slot.
        slot: u16,
        /// The pair's SQ ID.
        qid: u16,
        /// Drop its commands rather than finish them.
        discard: bool,
    },
    /// Core k → core 0: a pair back (asked back, or refused).
    Returned {
        /// Function slot.
        slot: u16,
        /// The pair.
        pair: Box<IoPair>,
    },
    /// Core k → core 0: its replica of a function's controller logged an error (for the
    /// controller's Error Information log, `Target::log_replica_error`).
    Error(keel_controller::ReplicaError),
    /// Core k → core 0: its replica of a function's controller ended (its last pair went
    /// home): what it admitted through its part of the controller's limits, for the
    /// controller's counters (`Target::add_retired_counters`).
    Counters(keel_controller::RetiredCounters),
    /// Core k → core 0: pair `qid` of function `slot` is broken.
    Fatal {
        /// Function slot.
        slot: u16,
        /// The pair's SQ ID.
        qid: u16,
        /// What it found.
        why: FatalReason,
    },
    /// Core 0 → core k: the host asked to abort command `cid` of pair `qid` of function
    /// `slot` (see [`Handover::Abort`]); answered with [`FnMsg::AbortVerdict`].
    Abort {
        /// Function slot.
        slot: u16,
        /// The pair's SQ ID.
        qid: u16,
        /// The command's CID.
        cid: u16,
        /// Names the Abort in the verdict.
        token: u32,
    },
    /// Core k → core 0: the verdict on Abort `token` (`aborted`: the command ended with
    /// Command Abort Requested), at once or with the command's completion.
    AbortVerdict {
        /// The Abort's token.
        token: u32,
        /// Whether the command was aborted.
        aborted: bool,
    },
}

/// What a core's replica is built from.
#[derive(Debug)]
pub struct ServeFunctions {
    /// The functions' subsystems every core serves.
    pub subsystems: Vec<ReplicaSubsystem>,
    /// The controller core's limits (queue counts and depths must match).
    pub limits: Limits,
    /// The core's own I/O queue pair on each drive the subsystems use (drive index, pair).
    pub drives: Vec<(usize, CoreNvmeQueue)>,
}

/// A pair handed to a core.
#[derive(Debug)]
pub struct Adopt {
    /// Function slot.
    pub slot: u16,
    /// The function's controller and the queue.
    pub adoption: Adoption,
    /// The pair.
    pub pair: IoPair,
    /// The window, restricted to the pair.
    pub port: Port,
}

/// A pair a core serves.
struct Served {
    slot: u16,
    pair: IoPair,
    port: Port,
    /// Its queue in the core's replica target.
    q: QueueId,
    /// Asked back: discard (true) or drain.
    recall: Option<bool>,
    /// Its fatal error was reported.
    fatal_sent: bool,
}

/// Core `k`'s side: its replica of the functions' subsystems, its data buffers and the pairs
/// it serves.
pub struct FnCore {
    core: usize,
    target: Target,
    /// The drive namespaces its replica shares among slices (functions created live cut
    /// theirs from them too).
    shares: ReplicaShares,
    /// Its own I/O queue pair on each drive its replica's namespaces use (polled here).
    drives: Vec<(usize, Rc<RefCell<CoreNvmeQueue>>)>,
    pool: BufPool,
    pairs: Vec<Served>,
    stats: PairStats,
    ns_slots: (usize, usize),
    ns_dirty: bool,
    ns_published: u64,
    /// Its part of each capped drive domain (`crate::shares::CrossCore`).
    cross_core: crate::shares::CrossCore,
    /// Namespaces of its subsystems on remote volumes: added to its replica when this core's
    /// NVMe/TCP plane gets the volume's lane (`crate::percore::Plane::on_remote`), whose
    /// I/O queues they share.
    remote: Vec<(String, ReplicaNs)>,
}

impl core::fmt::Debug for FnCore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FnCore")
            .field("core", &self.core)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl FnCore {
    fn new(core: usize, spec: ServeFunctions) -> Option<Self> {
        let names: Vec<String> = spec.subsystems.iter().map(|s| s.nqn.clone()).collect();
        let remote = remote_namespaces(&spec.subsystems);
        let drives: Vec<(usize, Rc<RefCell<CoreNvmeQueue>>)> = spec
            .drives
            .into_iter()
            .map(|(d, q)| (d, Rc::new(RefCell::new(q))))
            .collect();
        let qids: Vec<(usize, u16)> = drives.iter().map(|(d, q)| (*d, q.borrow().qid())).collect();
        // Its drive pairs' counters go in its row of `DRIVE_SHARES` from the end (the
        // NVMe/TCP plane's take it from the start).
        if let Some(row) = crate::cores::DRIVE_SHARES.get(core) {
            for (slot, &(d, qid)) in row.iter().rev().zip(&qids) {
                slot.claim(d, qid, 1);
            }
        }
        // RAM namespaces over the shared regions, drive namespaces through this core's own
        // queue pairs.
        let (target, shares) =
            replica_target_shares(spec.subsystems, spec.limits, &mut |d, nsid| {
                crate::percore::open_on_core_queue(&drives, d, nsid)
            })?;
        let region = crate::hw::dma_region(FN_BUFFERS * FN_BUFFER_SIZE);
        let pool = BufPool::lazy(region, region.as_ptr() as u64, FN_BUFFER_SIZE)
            .map_err(|e| klog::error!("fnq: core {}: buffers: {}", core, klog::D(&e)))
            .ok()?;
        let n = target.namespace_views().count() + LIVE_NAMESPACE_SLOTS;
        let ns_slots = crate::cores::claim_namespace_slots(core, n);
        println!(
            "fnq: core {core} serves I/O queue pairs of the emulated functions of {names:?} (drive, I/O queue: {qids:?})"
        );
        Some(Self {
            core,
            target,
            shares,
            drives,
            pool,
            pairs: Vec::with_capacity(16),
            stats: PairStats::default(),
            ns_slots,
            ns_dirty: false,
            ns_published: 0,
            cross_core: crate::shares::CrossCore::new(
                crate::shares::demand_row(core, true),
                &crate::cores::DEMANDS,
                crate::cores::running_mask,
            ),
            remote,
        })
    }

    /// The namespaces of its replica that remote volume `remote`'s lane backs: (subsystem,
    /// namespace), not yet added.
    pub fn lane_users<'a>(
        &'a self,
        remote: &'a keel_provision::Remote,
    ) -> impl Iterator<Item = &'a (String, ReplicaNs)> + 'a {
        self.remote.iter().filter(move |(nqn, n)| {
            matches!(&n.source, ReplicaSource::Remote { remote: r, .. } if r.same_target(remote))
                && !self
                    .target
                    .namespace_views()
                    .any(|v| v.subsystem == nqn && v.nsid == n.nsid)
        })
    }

    /// Adds a namespace of subsystem `nqn` served through this core's lane of a remote
    /// volume (made by its NVMe/TCP plane, `crate::percore::Plane::on_remote`).
    pub fn add_lane_namespace(
        &mut self,
        nqn: &str,
        cfg: keel_controller::NamespaceConfig,
    ) -> Result<(), keel_controller::TargetError> {
        let nsid = cfg.nsid;
        self.target.add_namespace(nqn, cfg)?;
        self.ns_dirty = true;
        println!(
            "fnq: core {} serves namespace {} of {} through its own I/O queues to the remote volume",
            self.core, nsid, nqn
        );
        Ok(())
    }

    /// A message of core 0 for `this` core's side (built by [`FnMsg::Serve`]); `out` takes
    /// the answers.
    pub fn on_message(
        this: &mut Option<Self>,
        core: usize,
        m: FnMsg,
        now_ns: u64,
        out: &mut dyn FnMut(FnMsg),
    ) {
        match m {
            FnMsg::Serve(spec) => *this = Self::new(core, *spec),
            FnMsg::Add(sub) => match this {
                Some(c) => c.add(&sub),
                None => klog::warning!(
                    "fnq: core {}: no replica: the I/O queues of {} are served on core 0",
                    core,
                    sub.nqn
                ),
            },
            FnMsg::Remove(nqn) => {
                if let Some(c) = this {
                    c.remove(&nqn);
                }
            }
            FnMsg::Qos { nqn, qos } => {
                if let Some(c) = this {
                    c.apply_qos(&nqn, &qos);
                }
            }
            FnMsg::Adopt(a) => match this {
                Some(c) => c.adopt(*a, now_ns, out),
                None => out(FnMsg::Returned {
                    slot: a.slot,
                    pair: Box::new(a.pair),
                }),
            },
            FnMsg::Recall { slot, qid, discard } => {
                if let Some(s) = this.as_mut().and_then(|c| {
                    c.pairs
                        .iter_mut()
                        .find(|s| s.slot == slot && s.pair.qid() == qid)
                }) {
                    // A discard after a drain still discards; either way nothing more is
                    // fetched from here on.
                    s.recall = Some(discard || s.recall == Some(true));
                    s.pair.stop();
                }
            }
            FnMsg::Abort {
                slot,
                qid,
                cid,
                token,
            } => {
                // Its replica decides now, or when the command completes (`pass`); a pair
                // no longer here (on its way home): not aborted.
                let verdict = match this.as_mut().and_then(|c| {
                    let q = c
                        .pairs
                        .iter()
                        .find(|s| s.slot == slot && s.pair.qid() == qid)?
                        .q;
                    Some((c, q))
                }) {
                    Some((c, q)) => {
                        c.target
                            .abort_for_holder(Instant::from_nanos(now_ns), q, cid, token)
                    }
                    None => Some(false),
                };
                if let Some(aborted) = verdict {
                    out(FnMsg::AbortVerdict { token, aborted });
                }
            }
            FnMsg::Returned { .. }
            | FnMsg::Fatal { .. }
            | FnMsg::Error(_)
            | FnMsg::Counters(_)
            | FnMsg::AbortVerdict { .. } => {}
        }
    }

    /// Adds the subsystem of a function created live to the replica.
    fn add(&mut self, sub: &ReplicaSubsystem) {
        let drives = &self.drives;
        let added =
            add_replica_subsystem(&mut self.target, &mut self.shares, sub, &mut |d, nsid| {
                crate::percore::open_on_core_queue(drives, d, nsid)
            });
        if added {
            println!(
                "fnq: core {} serves I/O queue pairs of the emulated function of {} too (created live)",
                self.core, sub.nqn
            );
        } else {
            klog::warning!(
                "fnq: core {}: {} not added to its replica: its I/O queues are served on core 0",
                self.core,
                sub.nqn
            );
        }
        self.ns_dirty = true;
    }

    /// A live QoS change of subsystem `nqn` ([`FnMsg::Qos`]): the replica takes it (its
    /// limiters stay, with their keys in the split across cores: each takes the new limits
    /// and this core's part of them is re-split by demand), and so does the description of
    /// its namespaces on remote volumes not added yet. Once per push, never per command.
    pub fn apply_qos(&mut self, nqn: &str, q: &crate::replica::ReplicaQos) {
        if !self.target.has_subsystem(nqn) {
            // It could not be added here: its pairs were refused and core 0 serves them.
            klog::warning!(
                "fnq: core {}: a QoS change of {}, which its replica lacks: nothing to apply (core 0 serves its I/O queues)",
                self.core,
                nqn
            );
            return;
        }
        let ok = crate::services::apply_replica_qos(&mut self.target, nqn, q);
        for (_, n) in self.remote.iter_mut().filter(|(s, _)| s == nqn) {
            if let Some((_, qos)) = q.namespaces.iter().find(|(id, _)| *id == n.nsid) {
                n.qos = qos.clone();
            }
        }
        if ok {
            println!(
                "fnq: core {} applies the QoS of {} changed live ({} namespace(s), {} controller(s))",
                self.core,
                nqn,
                q.namespaces.len(),
                q.controllers.len()
            );
        } else {
            klog::error!(
                "fnq: core {}: the QoS of {} changed live was not wholly applied (its I/O queues here keep the limits it could not change)",
                self.core,
                nqn
            );
        }
        self.ns_dirty = true;
    }

    /// Removes subsystem `nqn` (none of its pairs is here any more) from the replica; its
    /// namespaces go once their last command drained.
    fn remove(&mut self, nqn: &str) {
        self.remote.retain(|(n, _)| n != nqn);
        if self.target.remove_subsystem(nqn).is_ok() {
            println!(
                "fnq: core {} no longer serves pairs of {} (its function was removed or changed)",
                self.core, nqn
            );
        }
        // Slots of namespaces that went count nothing from here on.
        let (first, count) = self.ns_slots;
        let live = self.target.namespace_views().count().min(count);
        if let Some(row) = crate::cores::NS_SHARES.get(self.core) {
            for slot in row.iter().skip(first + live).take(count - live) {
                slot.claim(0);
                slot.publish(&Default::default());
            }
        }
        self.ns_dirty = true;
    }

    fn adopt(&mut self, a: Adopt, now_ns: u64, out: &mut dyn FnMut(FnMsg)) {
        let Adopt {
            slot,
            adoption,
            pair,
            port,
        } = a;
        let q = match self.target.open_queue_for(FN_OWNER) {
            Ok(q) => q,
            Err(e) => {
                klog::warning!("fnq: core {}: no queue: {}", self.core, klog::D(&e));
                return out(FnMsg::Returned {
                    slot,
                    pair: Box::new(pair),
                });
            }
        };
        if let Err(e) = self
            .target
            .adopt_io_queue(Instant::from_nanos(now_ns), q, &adoption)
        {
            let _ = self.target.close_queue(q);
            klog::warning!(
                "fnq: core {}: I/O queue {} of function {} refused ({}): served on core 0",
                self.core,
                pair.qid(),
                slot,
                klog::D(&e)
            );
            return out(FnMsg::Returned {
                slot,
                pair: Box::new(pair),
            });
        }
        println!(
            "fnq: core {} serves I/O queue {} of function {} ({}, controller {}, {} entries, vector {:?})",
            self.core,
            pair.qid(),
            slot,
            adoption.subnqn,
            adoption.cntlid,
            pair.sqsize() as u32 + 1,
            pair.vector()
        );
        self.pairs.push(Served {
            slot,
            pair,
            port,
            q,
            recall: None,
            fatal_sent: false,
        });
    }

    /// One pass: every pair (doorbells, commands, completions, interrupts), the replica's
    /// completions, pairs asked back; returns whether anything happened. `out` takes the
    /// messages for core 0.
    pub fn pass(&mut self, now_ns: u64, out: &mut dyn FnMut(FnMsg)) -> bool {
        let now = Instant::from_nanos(now_ns);
        let mut busy = false;
        let Self {
            target,
            pool,
            pairs,
            stats,
            cross_core,
            ..
        } = self;
        for s in pairs.iter_mut() {
            let r = s
                .pair
                .poll(now, target, s.q, &mut s.port, pool, FETCH_BURST, stats);
            match r {
                Ok(b) => busy |= b,
                Err(why) => report(s, why, &mut *out),
            }
        }
        for (_, q) in self.drives.iter() {
            busy |= q.borrow_mut().poll(now_ns);
        }
        // Commands taken in: this core's part of each capped drive domain, then start them.
        let tended = cross_core.tend(now_ns, target);
        // Replica controllers that ended (their last pair went home): what they admitted
        // through their part of their holders' limits goes home too, now that this core's
        // published counters no longer have it (core 0's merged count never has it twice).
        target.take_retired_counters(&mut |r| out(FnMsg::Counters(r)));
        busy |= target.poll(now, &mut |ev| match ev {
            Event::Completion(q, resp) => match pairs.iter_mut().find(|s| s.q == q) {
                Some(s) => {
                    if let Err(why) = s.pair.complete(&mut s.port, pool, resp, stats) {
                        report(s, why, &mut *out);
                    }
                }
                None => {
                    if let Some(b) = resp.buf {
                        let _ = pool.put(b);
                    }
                }
            },
            Event::BufferReleased { buf, .. } => {
                let _ = pool.put(buf);
            }
            Event::QueueTerminated(_) => {}
        }) > 0;
        // Errors its replica controllers logged go to their controllers' logs on core 0.
        target.take_replica_errors(&mut |e| out(FnMsg::Error(e)));
        // Verdicts on core 0's Aborts decided by completions, ahead of any pair going home
        // below (the ring keeps the order: core 0 has the verdict before the pair).
        target
            .take_abort_verdicts(&mut |token, aborted| out(FnMsg::AbortVerdict { token, aborted }));
        // What it started is in flight for the other cores' next parts.
        cross_core.publish(tended, now_ns, target);
        let mut i = 0;
        while i < pairs.len() {
            let s = &mut pairs[i];
            match s.recall {
                Some(true) => s.pair.discard(),
                Some(false) => s.pair.stop(),
                None => {}
            }
            if s.recall.is_none() || s.pair.outstanding() > 0 {
                i += 1;
                continue;
            }
            // Home: its replica queue closes (commands dropped by a discard come back as
            // buffers through the replica's events), its window view goes.
            let s = pairs.swap_remove(i);
            let _ = target.close_queue(s.q);
            out(FnMsg::Returned {
                slot: s.slot,
                pair: Box::new(s.pair),
            });
            busy = true;
        }
        FUNCTION_COMMANDS[self.core].publish(self.stats.commands);
        self.ns_dirty |= busy;
        if self.ns_dirty && (!busy || now_ns.saturating_sub(self.ns_published) >= NS_PUBLISH_NS) {
            crate::cores::publish_namespaces(self.core, self.ns_slots, &self.target);
            if let Some(row) = crate::cores::DRIVE_SHARES.get(self.core) {
                for (slot, (_, q)) in row.iter().rev().zip(&self.drives) {
                    crate::percore::publish_drive_queue(slot, q);
                }
            }
            self.ns_dirty = false;
            self.ns_published = now_ns;
        }
        busy
    }

    /// Whether the core may sleep: it serves no pair (a host's doorbell writes raise no
    /// interrupt), no buffer is out and no command is outstanding on its drive queues (drive
    /// completions raise no interrupt).
    pub fn may_sleep(&self) -> bool {
        self.pairs.is_empty()
            && self.pool.available() == self.pool.count()
            && self
                .drives
                .iter()
                .all(|(_, q)| q.try_borrow().is_ok_and(|q| q.outstanding() == 0))
    }
}

/// The namespaces of `subsystems` on remote volumes (subsystem, namespace).
fn remote_namespaces(subsystems: &[ReplicaSubsystem]) -> Vec<(String, ReplicaNs)> {
    subsystems
        .iter()
        .flat_map(|s| {
            s.namespaces
                .iter()
                .filter(|n| matches!(n.source, ReplicaSource::Remote { .. }))
                .map(|n| (s.nqn.clone(), n.clone()))
        })
        .collect()
}

/// Reports a pair's fatal error to core 0, once.
fn report(s: &mut Served, why: FatalReason, out: &mut dyn FnMut(FnMsg)) {
    if !core::mem::replace(&mut s.fatal_sent, true) {
        out(FnMsg::Fatal {
            slot: s.slot,
            qid: s.pair.qid(),
            why,
        });
    }
}

/// A subsystem whose functions' pairs the other cores serve (a boot function's, or one
/// created live or by a push).
#[derive(Debug)]
struct LiveFn {
    /// Its functions' slots (a boot subsystem may have several).
    slots: Vec<u16>,
    nqn: String,
    /// Its subsystem changed or went: its pairs come home, then the cores' replicas drop
    /// it (and with them their references to its shared RAM regions).
    retiring: bool,
}

impl LiveFn {
    /// Its subsystem changed or went: its functions keep every queue on core 0 from now on
    /// (the pairs abroad come home first).
    fn retire_soon(&mut self, functions: &mut [crate::services::Emulated<IvshmemWindow>]) {
        if core::mem::replace(&mut self.retiring, true) {
            return;
        }
        for &slot in &self.slots {
            if let Some(e) = functions.get_mut(usize::from(slot))
                && e.slot == SlotState::Live
                && e.nqn == self.nqn
                && let Some(f) = e.f.as_mut()
            {
                f.set_cores(1);
            }
        }
    }
}

/// Core 0's side: hands the functions' pairs out and takes them back.
#[derive(Debug)]
pub struct Hub {
    /// The boot functions' subsystems the other cores serve (one goes once it changed,
    /// every one once namespaces changed unaccounted).
    replicas: Vec<String>,
    /// Subsystems (of boot functions and of functions created since) the other cores'
    /// replicas have.
    live: Vec<LiveFn>,
    /// Every queue is core 0's for good (a namespace change nobody accounts for).
    home: bool,
    /// Cores the pairs are spread over.
    cores: u16,
    generation: u64,
    /// How many of [`crate::replica::Replication::dropped`] it has looked at.
    dropped_seen: usize,
    /// Messages per link that found its ring full.
    outq: Outbox,
    /// Messages for it that core 0's NVMe/TCP side took off the rings (`percore::Holder`).
    pub inbox: Vec<FnMsg>,
}

impl Hub {
    /// Asks every other core to serve the pairs of the functions whose subsystem every core
    /// can serve, and tells those functions to spread their I/O queues; `None` when there is
    /// no other core or no function slot. Each drive's core queue pairs `first_queue +
    /// link` (those after the NVMe/TCP planes', see `crate::poll`) go to the cores, for the
    /// functions of the boot and those created live.
    pub fn start(
        links: &mut Links,
        services: &mut Services<Qemu>,
        first_queue: usize,
    ) -> Option<Self> {
        if links.0.is_empty() || services.functions.is_empty() {
            return None;
        }
        let mut subsystems = services.function_replicas();
        // Each core's own I/O queue pair on every drive; a subsystem on a drive some core got
        // no pair of stays on core 0.
        let mut drives: Vec<Vec<(usize, CoreNvmeQueue)>> = Vec::new();
        for li in 0..links.0.len() {
            let mut mine = Vec::new();
            for (d, drive) in services.drives.iter().enumerate() {
                if let Some(q) = drive
                    .drive
                    .with(|c| crate::percore::take_core_queue(c, first_queue + li))
                    .flatten()
                {
                    mine.push((d, q));
                }
            }
            drives.push(mine);
        }
        subsystems.retain(|s| {
            let ok = s
                .drives()
                .all(|d| drives.iter().all(|m| m.iter().any(|(i, _)| *i == d)));
            if !ok {
                klog::warning!(
                    "fnq: {}: a drive has no I/O queue pair for every core; the function's queues stay on core 0",
                    s.nqn
                );
            }
            ok
        });
        let drives_every_core: Vec<Vec<usize>> = drives
            .iter()
            .map(|m| m.iter().map(|(d, _)| *d).collect())
            .collect();
        let limits = *services.target.limits();
        let mut outq = Outbox::new(links.0.len());
        for (li, drives) in drives.into_iter().enumerate() {
            let spec = ServeFunctions {
                subsystems: subsystems.clone(),
                limits,
                drives,
            };
            outq.send(links, li, Msg::Fn(FnMsg::Serve(Box::new(spec))));
        }
        let cores = links
            .0
            .iter()
            .map(|l| l.info.index + 1)
            .max()
            .unwrap_or(1)
            .min(u16::MAX as usize) as u16;
        let replicas: Vec<String> = subsystems.iter().map(|s| s.nqn.clone()).collect();
        let mut live: Vec<LiveFn> = replicas
            .iter()
            .map(|nqn| LiveFn {
                slots: Vec::new(),
                nqn: nqn.clone(),
                retiring: false,
            })
            .collect();
        for e in services.functions.iter_mut() {
            if let Some(l) = live.iter_mut().find(|l| l.nqn == e.nqn)
                && let Some(f) = e.f.as_mut()
            {
                f.set_cores(cores);
                l.slots.push(e.index);
            }
        }
        if !replicas.is_empty() {
            println!(
                "fnq: emulated functions of {replicas:?}: I/O queue q served on core q % {cores} (admin queue, queue management and resets on core 0)"
            );
        }
        // Functions created live on drives every core has a pair on, or on RAM (made in
        // shared regions from now on), are spread too.
        services.replication.fn_drives = (0..services.drives.len())
            .filter(|d| drives_every_core.iter().all(|m| m.contains(d)))
            .collect();
        services.replication.functions = true;
        Some(Self {
            replicas,
            live,
            home: false,
            cores,
            generation: services.target.namespace_generation(),
            dropped_seen: services.replication.dropped.len(),
            outq,
            inbox: Vec::with_capacity(16),
        })
    }

    fn send(&mut self, links: &mut Links, li: usize, msg: Msg) {
        self.outq.send(links, li, msg);
    }

    /// One pass, after the services' (whose function polls made the handovers):
    /// `own_rx`: it takes its messages off the rings itself (no NVMe/TCP side does).
    pub fn poll(&mut self, links: &mut Links, services: &mut Services<Qemu>, own_rx: bool) -> bool {
        let mut busy = false;
        let Services {
            functions,
            target,
            replication,
            replicable,
            ..
        } = services;
        let generation = target.namespace_generation();
        // Changes every core applied first, or confined to subsystems no longer adopted, are
        // no change (as for the NVMe/TCP holder: `crate::replica`); a boot function's
        // subsystem dropped (changed, limited or removed) brings that subsystem's pairs home,
        // then the cores drop it (`retire`), as for a function created live.
        while let Some(nqn) = replication.dropped.get(self.dropped_seen) {
            self.dropped_seen += 1;
            if let Some(i) = self.replicas.iter().position(|r| r == nqn) {
                self.replicas.swap_remove(i);
                // Core 0's description of it goes too (it holds its shared RAM regions), as
                // the NVMe/TCP holder's `follow_drops` does when it runs.
                replicable.retain(|s| s.nqn != *nqn);
                if let Some(l) = self.live.iter_mut().find(|l| l.nqn == *nqn && !l.retiring) {
                    l.retire_soon(functions);
                }
            }
        }
        if generation != self.generation {
            let benign = replication.explains(self.generation, generation);
            self.generation = generation;
            if !benign {
                if !self.replicas.is_empty() {
                    klog::warning!(
                        "fnq: namespaces changed: the emulated functions' I/O queue pairs come back to core 0, which serves every queue from now on"
                    );
                }
                self.replicas.clear();
                self.home = true;
                for l in self.live.iter_mut() {
                    l.retiring = true;
                }
                for e in functions.iter_mut() {
                    if let Some(f) = e.f.as_mut() {
                        f.set_cores(1);
                    }
                }
            }
        }
        // Functions created live: their subsystems join the other cores' replicas before
        // their first pair goes there (the ring keeps the order), and leave once every pair
        // of theirs is home.
        for ev in replication.fn_events.drain(..) {
            busy = true;
            match ev {
                FnEvent::Changed(nqn) => {
                    if let Some(l) = self.live.iter_mut().find(|l| l.nqn == nqn && !l.retiring) {
                        l.retire_soon(functions);
                    }
                }
                FnEvent::Qos { nqn, qos } => {
                    // Only where the other cores serve its pairs (a retiring subsystem's come
                    // home, and are then served with core 0's limits); the ring keeps the
                    // order with the adoptions.
                    if self.home || !self.live.iter().any(|l| l.nqn == nqn && !l.retiring) {
                        continue;
                    }
                    for li in 0..links.0.len() {
                        let m = Msg::Fn(FnMsg::Qos {
                            nqn: nqn.clone(),
                            qos: qos.clone(),
                        });
                        self.outq.send(links, li, m);
                    }
                }
                FnEvent::Attached { slot, nqn } => {
                    let f = functions
                        .get_mut(usize::from(slot))
                        .filter(|e| e.slot == SlotState::Live && e.nqn == nqn)
                        .and_then(|e| e.f.as_mut());
                    let running = self.live.iter_mut().find(|l| l.nqn == nqn && !l.retiring);
                    match (f, running) {
                        (Some(f), Some(l)) if !self.home => {
                            Self::join(l, slot, f, self.cores, "pushed")
                        }
                        _ => klog::warning!(
                            "fnq: function {}: {} keeps its I/O queues on core 0 (the other cores do not serve its subsystem's functions)",
                            slot,
                            nqn
                        ),
                    }
                }
                FnEvent::Created { slot, subsystem } => {
                    Self::retire(&mut self.live, &mut self.outq, links, functions);
                    let Some(e) = functions
                        .get_mut(usize::from(slot))
                        .filter(|e| e.slot == SlotState::Live && e.nqn == subsystem.nqn)
                    else {
                        continue;
                    };
                    // `keelctl function create`'s or a pushed description's: the same.
                    let how = if e.origin == "pushed" {
                        "pushed"
                    } else {
                        "created live"
                    };
                    let Some(f) = e.f.as_mut() else { continue };
                    let running = self.live.iter_mut().find(|l| l.nqn == subsystem.nqn);
                    if self.home || running.as_ref().is_some_and(|l| l.retiring) {
                        klog::warning!(
                            "fnq: function {}: {} keeps its I/O queues on core 0 (its previous function's pairs are not home yet, or every queue is core 0's)",
                            slot,
                            subsystem.nqn
                        );
                        continue;
                    }
                    if let Some(l) = running {
                        Self::join(l, slot, f, self.cores, how);
                        continue;
                    }
                    f.set_cores(self.cores);
                    println!(
                        "fnq: function {} {} ({}): I/O queue q served on core q % {}",
                        slot, how, subsystem.nqn, self.cores
                    );
                    self.live.push(LiveFn {
                        slots: alloc::vec![slot],
                        nqn: subsystem.nqn.clone(),
                        retiring: false,
                    });
                    for li in 0..links.0.len() {
                        let m = Msg::Fn(FnMsg::Add(subsystem.clone()));
                        self.outq.send(links, li, m);
                    }
                }
            }
        }
        Self::retire(&mut self.live, &mut self.outq, links, functions);
        if own_rx {
            for link in links.0.iter_mut() {
                let mut taken = 0;
                while let Some(m) = link.rx.pop() {
                    taken += 1;
                    if let Msg::Fn(m) = m {
                        self.inbox.push(m);
                    }
                }
                crate::cores::own_counters().received(taken);
            }
        }
        for m in self.inbox.drain(..) {
            busy = true;
            match m {
                FnMsg::Returned { slot, pair } => {
                    if let Some(f) = functions
                        .get_mut(usize::from(slot))
                        .and_then(|e| e.f.as_mut())
                    {
                        // Served here again from the function's next poll (which answers
                        // Aborts still parked for it "not aborted").
                        f.give_back(*pair);
                    }
                }
                FnMsg::Fatal { slot, qid, why } => {
                    if let Some(f) = functions
                        .get_mut(usize::from(slot))
                        .and_then(|e| e.f.as_mut())
                    {
                        f.core_fatal(qid, why);
                    }
                }
                FnMsg::Error(e) => {
                    target.log_replica_error(&e);
                }
                FnMsg::Counters(r) => {
                    target.add_retired_counters(&r);
                }
                FnMsg::AbortVerdict { token, aborted } => {
                    // Unknown tokens (answered already: the pair came home, the function
                    // was reset) are ignored.
                    target.abort_verdict_from_elsewhere(token, aborted);
                }
                FnMsg::Serve(_)
                | FnMsg::Add(_)
                | FnMsg::Remove(_)
                | FnMsg::Qos { .. }
                | FnMsg::Adopt(_)
                | FnMsg::Recall { .. }
                | FnMsg::Abort { .. } => {}
            }
        }
        let mut here = 0u64;
        for (slot, e) in functions.iter_mut().enumerate() {
            let Some(f) = e.f.as_mut() else { continue };
            here += f.stats().commands;
            while let Some(h) = f.take_handover() {
                busy = true;
                match h {
                    Handover::Export { core, pair } => {
                        let li = links
                            .0
                            .iter()
                            .position(|l| l.info.index == usize::from(core));
                        let adoption = f.core_queue(pair.qid()).and_then(|q| target.adoption(q));
                        match (li, adoption) {
                            (Some(li), Some(adoption)) => {
                                let port = e.ep.queue_port(pair.qid(), pair.cqid(), pair.vector());
                                let adopt = Adopt {
                                    slot: slot as u16,
                                    adoption,
                                    pair,
                                    port,
                                };
                                self.send(links, li, Msg::Fn(FnMsg::Adopt(Box::new(adopt))));
                            }
                            _ => f.give_back(pair),
                        }
                    }
                    Handover::Recall { core, qid, discard } => {
                        if let Some(li) = links
                            .0
                            .iter()
                            .position(|l| l.info.index == usize::from(core))
                        {
                            let msg = Msg::Fn(FnMsg::Recall {
                                slot: slot as u16,
                                qid,
                                discard,
                            });
                            self.send(links, li, msg);
                        }
                    }
                    Handover::Abort {
                        core,
                        qid,
                        cid,
                        token,
                    } => {
                        match links
                            .0
                            .iter()
                            .position(|l| l.info.index == usize::from(core))
                        {
                            Some(li) => {
                                let msg = Msg::Fn(FnMsg::Abort {
                                    slot: slot as u16,
                                    qid,
                                    cid,
                                    token,
                                });
                                self.send(links, li, msg);
                            }
                            None => target.abort_verdict_from_elsewhere(token, false),
                        }
                    }
                }
            }
        }
        FUNCTION_COMMANDS[0].publish(here);
        self.outq.flush(links);
        busy
    }

    /// Drops from every core's replica the retiring subsystems whose functions' pairs are
    /// all home (the functions removed, or serving every queue here): their namespaces go
    /// there once drained, and with them the cores' references to their shared RAM.
    fn retire(
        live: &mut Vec<LiveFn>,
        outq: &mut Outbox,
        links: &mut Links,
        functions: &[crate::services::Emulated<IvshmemWindow>],
    ) {
        live.retain(|l| {
            // A slot given to another subsystem since had every pair of this one home first.
            let home = l.slots.iter().all(|&slot| {
                functions.get(usize::from(slot)).is_none_or(|e| {
                    (e.slot == SlotState::Live && e.nqn != l.nqn)
                        || e.f.as_ref().is_none_or(|f| f.abroad() == 0)
                })
            });
            if !(l.retiring && home) {
                return true;
            }
            for li in 0..links.0.len() {
                outq.send(links, li, Msg::Fn(FnMsg::Remove(l.nqn.clone())));
            }
            false
        });
    }

    /// Function `slot` (`f`), attached to subsystem `l` whose other functions' pairs the
    /// other cores serve: its pairs join them (the other cores' replica of the subsystem
    /// serves every function's controller).
    fn join(
        l: &mut LiveFn,
        slot: u16,
        f: &mut keel_nvme_pcie::PcieFunction,
        cores: u16,
        how: &str,
    ) {
        f.set_cores(cores);
        if !l.slots.contains(&slot) {
            l.slots.push(slot);
        }
        println!(
            "fnq: function {} {} ({}, with its other functions): I/O queue q served on core q % {}",
            slot, how, l.nqn, cores
        );
    }

    /// Whether core 0 may sleep as far as the pairs go: nothing waits for room on a ring.
    pub fn may_sleep(&self) -> bool {
        self.outq.is_empty()
    }
}
