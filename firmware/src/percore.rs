//! NVMe/TCP on every core: with a multiqueue NIC (`qemu/run --smp N --net tap`) core `k`
//! runs its own network stack (same MAC and address) on queue pair `k`, listens on the
//! NVMe/TCP and discovery ports, and serves the connections the NIC steers to it (the
//! kernel's tun keeps each flow on one queue, and learns a flow's queue from the pair its
//! frames leave on).
//!
//! Core 0 is the *controller core*: its [`Target`] holds every controller (admin queues,
//! discovery, keep-alive, AER, configuration), and it keeps serving the connections that
//! land on its own pair exactly as a single core does. A connection on core `k` forwards its
//! commands to core 0 over the rings ([`ToHolder`]); core 0 runs them on a queue it opens for
//! that connection ([`Holder`], owner [`FORWARD_OWNER`]) and sends the completion and data
//! back ([`FromHolder`]). When the command was the Connect of an I/O queue of a subsystem
//! every core can serve ([`ReplicaSubsystem`]: RAM namespaces in shared regions and drive
//! namespaces, AES-XTS encrypted or not, no function with controller limits), core 0 also sends its
//! [`keel_controller::Adoption`]: core `k` then serves that queue entirely on its own, from a
//! replica of the controller in its own target: RAM namespaces over the same memory, drive
//! namespaces through core `k`'s own I/O queue pair on each drive (created by core 0, which
//! keeps the drive's admin queue and resets, and handed over in [`ServeSpec::drives`]:
//! `keel_nvme_driver::CoreQueue`, whose doorbells only core `k` writes). No lock, no message
//! and no allocation per I/O. Every other queue (admin queues, discovery, I/O queues of
//! subsystems that fell back to core 0) stays forwarded: a message
//! each way per command, whose data buffer (core `k`'s) travels with it and is the one core
//! 0's target runs the command on: no copy, no allocation; the buffer comes back with the
//! answer, or in a [`FromHolder::Release`] when the connection went away meanwhile.
//!
//! A drive fault seen on core `k`: a command that times out on its pair asks core 0 for a
//! controller reset; the reset fails the outstanding requests of every queue with the same
//! internal error, and core 0 re-creates core `k`'s pair once core `k` has reset it (see
//! `keel_nvme_driver::corequeue` for the handshake and its memory ordering). A drive given up
//! on fails core `k`'s requests too.
//!
//! Teardown reaches every core: a queue core 0 ends (keep-alive expiry, controller reset,
//! the admin queue lost, an abrupt I/O queue loss ending the association) becomes a
//! [`FromHolder::Terminate`] for the core carrying its connection; a connection a core
//! loses becomes a [`ToHolder::Closed`] there. Live namespace changes of RAM and drive
//! namespaces reach every core's replica before core 0's target ([`crate::replica`],
//! [`Plane::on_replica`]), and so do live QoS changes ([`crate::replica::ReplicaOp::Qos`],
//! applied to the replica's limiters in place), so adopted queues stay adopted; a change that cannot be followed
//! ends the adopted queues of its subsystem only and forwards its later I/O queues
//! ([`crate::replica::Replication::dropped`]); a change nobody logged ends every adopted
//! queue and forwards every later I/O queue, as before. A core serving adopted queues
//! reports their traffic once a second ([`ToHolder::Activity`]): traffic-based keep-alive counts it.
//!
//! Remote volumes (issue 17): a subsystem whose namespaces include namespaces of remote
//! volumes (AES-XTS encrypted or not: core `k` wraps its lane in the same cipher; no QoS
//! limits) is served on every core too. Core 0 keeps each volume's
//! associations (admin queue, Connect, keep alive, ANA, reconnects: `keel_remote`'s owner)
//! and asks the remote for one more I/O queue per other core; once the remote namespace is
//! identified it hands core `k` a *lane* ([`RemoteMsg::Lane`]: the volume's configuration
//! and the namespace's size): core `k` connects its own I/O queue to each live association
//! from its own network stack (so tun steers the replies to its pair; its local ports come
//! from its own share of the ephemeral range, [`client_ports`], which is also how a frame
//! that lands on another pair finds its core), adds the namespaces to its replica, and says
//! so ([`crate::cores::Msg::RemoteReady`]). Only when every core did does core 0 add them to
//! its own target (hosts learn of a namespace from core 0's admin queues: no core is ever
//! asked for a namespace it lacks), so that namespace change does not end adopted queues.
//! Core 0 then tells every lane of each association's changes ([`RemoteMsg::Update`]), and
//! a lane reports the loss of one of its queues ([`crate::cores::Msg::RemoteLost`]): core 0
//! ends and re-creates the association, as for a loss of its own queues
//! (`keel_remote::lane`). A volume new in a pushed configuration gets lanes the same way
//! (`crate::remote::RemoteService::lane_new`; the lane message then carries the pushed
//! namespaces' descriptions), and a volume core 0 retires makes every core close its lane
//! ([`RemoteMsg::Retire`]). A further slice a push adds on a running volume is cut from each
//! core's lane first ([`RemoteMsg::Users`], answered with `RemoteReady`, core 0's gate on the
//! volume closed meanwhile); one a push removes is a staged [`ReplicaOp::Remove`]. The
//! emulated functions' replica on core `k` (`crate::fnq::FnCore`) shares the lane: its
//! namespaces on the volume are cut from the same backend when the lane arrives.
//!
//! Frames of other flows that land on core `k` (management, DHCP, replies to core 0's
//! outgoing connections) are handed to core 0, which receives them as if they came on its
//! pair; its answers leave on pair 0, so tun moves the flow there.

use crate::cores::{Links, Msg, NVMF, Outbox};
use crate::klog;
use crate::net::{Addressing, NetStack};
use crate::nvmf::{ConnRef, FORWARD_OWNER, FromHolder, NvmfService, ToHolder};
use crate::poll::{DISCOVERY_PORT, NVMF_PORT};
use crate::qemu::{Qemu, QemuNic};
use crate::replica::{ReplicaChange, ReplicaOp};
use crate::services::{
    ReplicaNs, ReplicaShares, ReplicaSource, ReplicaSubsystem, Services, apply_replica_change, cut,
    replica_target_shares,
};
use alloc::rc::Rc;
use alloc::{boxed::Box, string::String, vec::Vec};
use core::cell::RefCell;
use core::sync::atomic::{AtomicU32, Ordering};
use keel_controller::{Instant, Limits, QueueId, Request, Response, Target};
use keel_hal::MAX_CORES;
use keel_hal::arch::timer;
use keel_hal::nvme::{CoreNvmeBackend, CoreNvmeQueue};
use keel_hal::println;
use keel_hal::virtio_net::QueuePair;
use keel_nvme::{Cqe, Status};
use keel_remote::{LaneSeed, LaneUpdate, RemoteConfig, RemoteVolume};
use keel_storage::{IoBuf, SharedBackend};
use smoltcp::iface::SocketHandle;

/// NVMe/TCP data buffers of a core other than core 0.
const SECONDARY_BUFFERS: usize = 64;
/// 4 KiB NVMe/TCP data buffers of a core other than core 0.
const SECONDARY_SMALL_BUFFERS: usize = 512;
/// Namespace counter slots a core claims beyond its replica's, for namespaces added live.
const LIVE_NAMESPACE_SLOTS: usize = 8;
/// How often a busy core publishes its namespace counters (an idle pass after work always
/// does).
const NS_PUBLISH_NS: u64 = 1_000_000;

/// A namespace of the replica a lane backs: its subsystem, itself, its slice.
type LaneUser<'a> = (
    String,
    &'a crate::services::ReplicaNs,
    Option<(u64, Option<u64>)>,
);

/// Requests a lane's namespaces hold between polls when it is cut into slices.
const LANE_SHARED_DEPTH: usize = 1024;

/// The ephemeral ports (first, count) of core `core`'s outgoing connections when `cores`
/// cores share the NIC's address: an equal share each of 49152..=65535, so a frame's
/// destination port names the core whose connection it is.
pub fn client_ports(core: usize, cores: usize) -> (u16, u16) {
    let count = (16384 / cores.max(1)).min(16384) as u16;
    (49152 + (core as u16).saturating_mul(count), count)
}

/// Each core's share of the ephemeral ports (`first << 16 | count`; 0: none), stored by
/// that core before its stack runs and read by it in [`served_here`].
static CLIENT_PORTS: [AtomicU32; MAX_CORES] = [const { AtomicU32::new(0) }; MAX_CORES];

/// Core 0's stack when other cores share its address: its outgoing connections take their
/// local ports from its own share of the ephemeral range, and frames that land on its pair
/// for another core's share (replies to that core's lanes, once tun forgot their flow) are
/// handed to that core ([`Holder::poll`]) instead of being answered with a reset.
pub fn share_ports_on_core0(net: &mut NetStack<Qemu>, cores: usize) {
    let (first, count) = client_ports(0, cores);
    CLIENT_PORTS[0].store(u32::from(first) << 16 | u32::from(count), Ordering::Relaxed);
    net.set_ephemeral_ports(first, count);
    if let Some(pair) = net.device.pair() {
        pair.divert(core0_serves);
    }
}

/// The TCP destination port of an IPv4 frame.
fn tcp_dst_port(frame: &[u8]) -> Option<u16> {
    let be16 = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    if be16(12) != Some(0x0800) || frame.get(14 + 9) != Some(&6) {
        return None;
    }
    let ihl = usize::from(frame.get(14).map_or(0, |b| b & 0x0f)) * 4;
    be16(14 + ihl + 2)
}

/// Core 0's filter: everything but TCP to another core's share of the ephemeral ports.
fn core0_serves(frame: &[u8]) -> bool {
    tcp_dst_port(frame).is_none_or(|p| p < 49152 || own_client_port(p))
}

/// The core whose share of the ephemeral ports `port` is in (core 0's share tells the size).
fn client_port_core(port: u16) -> Option<usize> {
    let count = CLIENT_PORTS[0].load(Ordering::Relaxed) & 0xFFFF;
    (port >= 49152 && count != 0).then(|| usize::from(port - 49152) / count as usize)
}

/// Whether `port` is in this core's share of the ephemeral ports.
fn own_client_port(port: u16) -> bool {
    let v =
        CLIENT_PORTS[keel_hal::arch::percpu::index().min(MAX_CORES - 1)].load(Ordering::Relaxed);
    let (first, count) = ((v >> 16) as u16, v as u16);
    count != 0 && port >= first && port - first < count
}

/// Core 0 → core `k`: remote volumes served through lanes (see the module docs).
#[derive(Debug)]
pub enum RemoteMsg {
    /// Volume `id`'s namespace is identified: make its lane and add the replica's
    /// namespaces on it, then answer [`Msg::RemoteReady`].
    Lane {
        /// The volume.
        id: u32,
        /// The remote namespace (which replica namespaces it backs).
        remote: Box<keel_provision::Remote>,
        /// The volume's configuration.
        cfg: Box<RemoteConfig>,
        /// The namespace as core 0 identified it.
        seed: LaneSeed,
        /// The namespaces it backs (subsystem NQN, description): those of the boot
        /// configuration are in the core's replica description already, those of a push
        /// join it here.
        users: Vec<(String, ReplicaNs)>,
    },
    /// More namespaces on volume `id`, whose lane runs (a push added further slices of it):
    /// add them to the replica through the lane, then answer [`Msg::RemoteReady`].
    Users {
        /// The volume.
        id: u32,
        /// The namespaces (subsystem NQN, description).
        users: Vec<(String, ReplicaNs)>,
    },
    /// Volume `id` is gone on core 0 (no namespace uses it any more): the lane closes its
    /// connections (its requests still in flight fail with a path error) and goes.
    Retire {
        /// The volume.
        id: u32,
    },
    /// What core 0 says of one of the volume's paths.
    Update {
        /// The volume.
        id: u32,
        /// The path's association.
        update: LaneUpdate,
    },
}

/// What core `k` needs to serve NVMe/TCP: its queue pair and what its replica is built from.
/// Everything in it can move to core `k`.
#[derive(Debug)]
pub struct ServeSpec {
    /// Queue pair `k`.
    pub pair: QueuePair,
    /// The NIC's MAC.
    pub mac: [u8; 6],
    /// The interface's (static) address.
    pub addressing: Addressing,
    /// Subsystems whose I/O queues it serves itself.
    pub subsystems: Vec<ReplicaSubsystem>,
    /// The controller core's limits (queue counts and depths must match).
    pub limits: Limits,
    /// Address advertised in discovery (as core 0's).
    pub advertise: Option<(String, String)>,
    /// Its own I/O queue pair on each drive its subsystems use (drive index, queue).
    pub drives: Vec<(usize, CoreNvmeQueue)>,
    /// Its share of the ephemeral ports (first, count), [`client_ports`].
    pub client_ports: (u16, u16),
}

/// Whether a frame received on a core other than core 0 is for that core's stack: ARP,
/// ICMP and TCP to the NVMe/TCP or discovery port (the connections it serves); everything
/// else goes to core 0.
fn served_here(frame: &[u8]) -> bool {
    let be16 = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    if be16(12) != Some(0x0800) {
        return true; // ARP (and anything smoltcp drops anyway)
    }
    let ihl = usize::from(frame.get(14).map_or(0, |b| b & 0x0f)) * 4;
    match frame.get(14 + 9) {
        Some(6) => match be16(14 + ihl + 2) {
            Some(NVMF_PORT | DISCOVERY_PORT) => true,
            // Replies to this core's own outgoing connections (remote volumes' lanes).
            Some(p) => own_client_port(p),
            None => false,
        },
        Some(17) => false,
        _ => true,
    }
}

/// Core `k`'s NVMe/TCP data plane: its network stack on its queue pair, its connections and
/// its replica target.
pub struct Plane {
    core: usize,
    net: NetStack<Qemu>,
    nvmf: NvmfService,
    target: Target,
    /// Its namespace counters changed since they were last published.
    ns_dirty: bool,
    /// When they were last published.
    ns_published: u64,
    /// Its I/O queue pairs on the drives (drive index, queue), polled every pass.
    drive_queues: Vec<(usize, Rc<RefCell<CoreNvmeQueue>>)>,
    /// Drive namespaces its replica shares among slices (slices added live are cut from
    /// them).
    shares: ReplicaShares,
    /// Removals core 0 waits for (change, subsystem, NSID): acked once the replica's last
    /// command on the namespace completed.
    draining: Vec<(u64, String, u32)>,
    /// Its subsystems as core 0 described them (remote namespaces are added from them).
    subsystems: Vec<ReplicaSubsystem>,
    /// Lanes of remote volumes (volume id, lane), polled every pass.
    lanes: Vec<(u32, RemoteVolume<SocketHandle>)>,
    /// Some lane also backs namespaces of the emulated functions' replica (`crate::fnq`).
    fn_lanes: bool,
    /// The shared backends of lanes cut into several namespaces (volume id, backend): a
    /// push's further slices are cut from them ([`RemoteMsg::Users`]).
    lane_shares: Vec<(u32, SharedBackend<keel_remote::RemoteBackend<SocketHandle>>)>,
    /// Its slots in this core's [`NS_SHARES`] (first, count).
    ns_slots: (usize, usize),
    /// Its part of each capped drive domain (`crate::shares::CrossCore`).
    cross_core: crate::shares::CrossCore,
}

impl core::fmt::Debug for Plane {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Plane")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Plane {
    /// Brings core `core`'s plane up (on that core); `None`, said on the console, if it
    /// cannot be.
    pub fn new(core: usize, spec: ServeSpec, now_ns: u64) -> Option<Self> {
        let ServeSpec {
            mut pair,
            mac,
            addressing,
            subsystems,
            limits,
            advertise,
            drives,
            client_ports,
        } = spec;
        let index = pair.index();
        let kept = subsystems.clone();
        let names: Vec<String> = subsystems.iter().map(|s| s.nqn.clone()).collect();
        let queues: Vec<(usize, Rc<RefCell<CoreNvmeQueue>>)> = drives
            .into_iter()
            .map(|(d, q)| (d, Rc::new(RefCell::new(q))))
            .collect();
        let qids: Vec<(usize, u16)> = queues.iter().map(|(d, q)| (*d, q.borrow().qid())).collect();
        // Its queue pairs' counters go in its row of `DRIVE_SHARES`, slot i for pair i.
        if let Some(row) = crate::cores::DRIVE_SHARES.get(core) {
            for (slot, &(d, qid)) in row.iter().zip(&qids) {
                slot.claim(d, qid, 1);
            }
        }
        let (target, shares) = replica_target_shares(subsystems, limits, &mut |d, nsid| {
            open_on_core_queue(&queues, d, nsid)
        })?;
        let nvmf = match NvmfService::with_buffers(
            advertise,
            SECONDARY_BUFFERS,
            SECONDARY_SMALL_BUFFERS,
        ) {
            Ok(s) => s.forwarding(),
            Err(e) => {
                klog::error!("percore: core {}: buffers: {}", core, klog::D(&e));
                return None;
            }
        };
        if let Some(slot) = CLIENT_PORTS.get(core) {
            slot.store(
                u32::from(client_ports.0) << 16 | u32::from(client_ports.1),
                Ordering::Relaxed,
            );
        }
        pair.divert(served_here);
        // Its frames raise the NIC's interrupt, which wakes core 0, which rings this core.
        pair.enable_wakeups();
        let nic = QemuNic::Pair {
            mac,
            pair,
            control: None,
        };
        let seed = timer::counter() ^ ((core as u64) << 48);
        let mut net = NetStack::new(nic, addressing, now_ns, seed);
        net.set_ephemeral_ports(client_ports.0, client_ports.1);
        net.listen(NVMF_PORT);
        net.listen(DISCOVERY_PORT);
        println!(
            "percore: core {core} serves NVMe/TCP on queue pair {index}; I/O queues of {names:?} here (drive, I/O queue: {qids:?}), everything else through core 0"
        );
        let mut plane = Self {
            core,
            net,
            nvmf,
            target,
            ns_dirty: false,
            ns_published: now_ns,
            drive_queues: queues,
            shares,
            draining: Vec::new(),
            subsystems: kept,
            lanes: Vec::new(),
            fn_lanes: false,
            lane_shares: Vec::new(),
            ns_slots: (0, 0),
            cross_core: crate::shares::CrossCore::new(
                crate::shares::demand_row(core, false),
                &crate::cores::DEMANDS,
                crate::cores::running_mask,
            ),
        };
        // Slots for every namespace its subsystems will have: remote namespaces join the
        // replica later (`on_remote`), and would otherwise find no slot; a few more for
        // namespaces added live (`on_replica`).
        let n = plane
            .subsystems
            .iter()
            .map(|s| s.namespaces.len())
            .sum::<usize>()
            .max(plane.target.namespace_views().count())
            + LIVE_NAMESPACE_SLOTS;
        plane.ns_slots = crate::cores::claim_namespace_slots(core, n);
        plane.publish_namespaces();
        Some(plane)
    }

    /// Stores its replica's namespace counters in its slots of [`NS_SHARES`] (`Relaxed`
    /// stores, read by core 0 for status and `/metrics`).
    fn publish_namespaces(&mut self) {
        crate::cores::publish_namespaces(self.core, self.ns_slots, &self.target);
        self.publish_queues();
    }

    /// Stores its drive queue pairs' and its lanes' queues' counters in its rows of
    /// `DRIVE_SHARES` and `LANE_SHARES` (`Relaxed` stores, nothing allocated; read by core 0
    /// for status and `/metrics`, `crate::shares`).
    fn publish_queues(&self) {
        if let Some(row) = crate::cores::DRIVE_SHARES.get(self.core) {
            for (slot, (_, q)) in row.iter().zip(&self.drive_queues) {
                publish_drive_queue(slot, q);
            }
        }
        if let Some(row) = crate::cores::LANE_SHARES.get(self.core) {
            crate::shares::publish_lanes(row, &self.lanes);
        }
        if let Some(row) = crate::cores::LANE_VOLUMES.get(self.core) {
            crate::shares::publish_lane_volumes(row, &self.lanes);
        }
    }

    /// One pass: frames in, connections, the replica's completions, frames out; returns
    /// whether anything happened. `out` takes the messages for core 0.
    pub fn pass(&mut self, now_ns: u64, out: &mut dyn FnMut(Msg)) -> bool {
        let Self {
            net,
            nvmf,
            target,
            lanes,
            cross_core,
            ..
        } = self;
        let mut busy = net.poll_ingress(now_ns);
        busy |= nvmf.poll(now_ns, net, target);
        // After the commands of this pass were submitted: their capsules leave now.
        for (id, lane) in lanes.iter() {
            busy |= lane.poll(now_ns, net);
            while let Some(loss) = lane.take_lane_loss() {
                out(Msg::RemoteLost { id: *id, loss });
            }
        }
        for (_, q) in &self.drive_queues {
            busy |= q.borrow_mut().poll(now_ns);
        }
        // Commands taken in: this core's part of each capped drive domain, then start them.
        let tended = cross_core.tend(now_ns, target);
        // Replica controllers that ended: what they admitted through their part of their
        // holders' limits goes home now that this core's published counters no longer
        // have it (so core 0's merged count never has it twice).
        target.take_retired_counters(&mut |r| nvmf.outbox.push(ToHolder::Counters(r)));
        busy |= target.poll(Instant::from_nanos(now_ns), &mut |ev| nvmf.on_event(ev)) > 0;
        // What it started is in flight for the other cores' next parts.
        cross_core.publish(tended, now_ns, target);
        // Removed namespaces whose last command completed (their blocks are no longer
        // touched here): core 0 may now remove them.
        if !self.draining.is_empty() {
            let core = self.core as u16;
            self.draining.retain(|(seq, nqn, nsid)| {
                let drained = !target.namespace_draining(nqn, *nsid);
                if drained {
                    out(Msg::ReplicaAck {
                        seq: *seq,
                        core,
                        ok: true,
                    });
                }
                !drained
            });
        }
        nvmf.report_to_holder(target);
        for m in nvmf.outbox.drain(..) {
            out(Msg::ToHolder(m));
        }
        if let Some(pair) = net.device.pair() {
            while let Some(f) = pair.take_diverted() {
                out(Msg::Frame(f));
            }
        }
        NVMF[self.core].publish(self.nvmf.accepted, self.nvmf.commands);
        crate::cores::NIC[self.core].publish(crate::hw::Nic::counters(&self.net.device));
        // Namespace counters: at most once a millisecond while busy, and on the first idle
        // pass after work (before the loop may sleep), so status sees every finished command.
        self.ns_dirty |= busy;
        if self.ns_dirty && (!busy || now_ns.saturating_sub(self.ns_published) >= NS_PUBLISH_NS) {
            self.publish_namespaces();
            self.ns_dirty = false;
            self.ns_published = now_ns;
        }
        busy
    }

    /// The pass's frames out (after its messages for core 0 went on the ring: an error a
    /// completion reports, or an Abort's verdict, reaches core 0 before the host can ask).
    pub fn egress(&mut self, now_ns: u64) -> bool {
        self.nvmf.flush(&mut self.net);
        // Capsules the functions' replica submitted on shared lanes this pass leave with it.
        let mut busy = false;
        if self.fn_lanes {
            for (_, lane) in self.lanes.iter() {
                busy |= lane.poll(now_ns, &mut self.net);
            }
        }
        self.net.poll_egress(now_ns) | busy
    }

    /// Whether the core may sleep: no command is outstanding on its drive queues (drive
    /// completions raise no interrupt).
    pub fn may_sleep(&self) -> bool {
        self.drive_queues
            .iter()
            .all(|(_, q)| q.try_borrow().is_ok_and(|q| q.outstanding() == 0))
    }

    /// A frame of one of this core's flows that landed on core 0's pair.
    pub fn inject(&mut self, frame: Vec<u8>) {
        if let Some(pair) = self.net.device.pair() {
            pair.inject(frame);
        }
    }

    /// A message of the controller core.
    pub fn on_holder(&mut self, msg: FromHolder, now_ns: u64) {
        self.nvmf.on_holder(msg, now_ns, &mut self.target);
    }

    /// A live namespace change of core 0 ([`crate::replica`]): applied to the replica
    /// (a drive namespace through this core's own queue pair on the drive, as at boot) and
    /// acked through `out` ([`Msg::ReplicaAck`]); a removal once the replica's commands on
    /// the namespace have all completed ([`Plane::pass`]), so that core 0 removes it when
    /// this core no longer reads or writes its blocks.
    pub fn on_replica(&mut self, change: &ReplicaChange, out: &mut dyn FnMut(Msg)) {
        let queues = &self.drive_queues;
        let ok = apply_replica_change(&mut self.target, &mut self.shares, change, &mut |d, n| {
            open_on_core_queue(queues, d, n)
        });
        let (core, nqn) = (self.core, &change.subsystem);
        match (&change.op, ok) {
            (ReplicaOp::Retire, _) => {
                if ok {
                    println!("percore: core {core} no longer serves {nqn}");
                }
                self.subsystems.retain(|s| s.nqn != *nqn);
                self.ns_dirty = true;
                return;
            }
            (ReplicaOp::Add { ns: n, group }, true) => {
                match group {
                    Some(g) => println!(
                        "percore: core {core} serves namespace {} of {nqn} added live in QoS group {}",
                        n.nsid, g.name
                    ),
                    None => println!(
                        "percore: core {core} serves namespace {} of {nqn} added live",
                        n.nsid
                    ),
                }
                // Its description follows: the namespace, and its group (the replica's).
                if let Some(s) = self.subsystems.iter_mut().find(|s| s.nqn == *nqn) {
                    s.namespaces.push((**n).clone());
                    if let Some(g) = group
                        && !s.groups.iter().any(|x| x.name == g.name)
                    {
                        s.groups.push(g.clone());
                    }
                }
            }
            (ReplicaOp::Qos(q), true) => {
                println!("percore: core {core} applies the QoS of {nqn} changed live");
                // Its description follows (a remote namespace added later takes it).
                if let Some(s) = self.subsystems.iter_mut().find(|s| s.nqn == *nqn) {
                    for n in &mut s.namespaces {
                        if let Some((_, qos)) = q.namespaces.iter().find(|(id, _)| *id == n.nsid) {
                            n.qos = qos.clone();
                        }
                    }
                    let used = |g: &keel_controller::QosGroup| {
                        s.namespaces
                            .iter()
                            .any(|n| n.qos.group.as_ref() == Some(&g.name))
                    };
                    s.groups = q.groups.iter().filter(|g| used(g)).cloned().collect();
                }
            }
            (ReplicaOp::Remove(nsid), true) => {
                println!("percore: core {core} no longer serves namespace {nsid} of {nqn}");
                if let Some(s) = self.subsystems.iter_mut().find(|s| s.nqn == *nqn) {
                    s.namespaces.retain(|n| n.nsid != *nsid);
                }
                if self.target.namespace_draining(nqn, *nsid) {
                    self.draining.push((change.seq, nqn.clone(), *nsid));
                    self.ns_dirty = true;
                    return;
                }
            }
            (_, false) => klog::error!(
                "percore: core {}: a live namespace change of {} could not be applied",
                core,
                nqn
            ),
        }
        self.ns_dirty = true;
        out(Msg::ReplicaAck {
            seq: change.seq,
            core: core as u16,
            ok,
        });
    }

    /// A remote volume's lane, or news of its associations, from the controller core;
    /// `out` takes the answer for core 0.
    /// `fns`: this core's side of the emulated functions, whose replica's namespaces on the
    /// volume share the lane.
    pub fn on_remote(
        &mut self,
        msg: RemoteMsg,
        now_ns: u64,
        fns: Option<&mut crate::fnq::FnCore>,
        out: &mut dyn FnMut(Msg),
    ) {
        match msg {
            RemoteMsg::Lane {
                id,
                remote,
                cfg,
                seed,
                users,
            } => {
                for (nqn, n) in users {
                    if let Some(s) = self.subsystems.iter_mut().find(|s| s.nqn == nqn)
                        && !s.namespaces.iter().any(|o| o.nsid == n.nsid)
                    {
                        s.namespaces.push(n);
                    }
                }
                let ok = self.add_lane(id, &remote, *cfg, seed, fns);
                out(Msg::RemoteReady {
                    id,
                    core: self.core as u16,
                    ok,
                });
            }
            RemoteMsg::Users { id, users } => {
                let ok = self.add_lane_users(id, users);
                out(Msg::RemoteReady {
                    id,
                    core: self.core as u16,
                    ok,
                });
            }
            RemoteMsg::Retire { id } => {
                self.lane_shares.retain(|(i, _)| *i != id);
                if let Some(at) = self.lanes.iter().position(|(i, _)| *i == id) {
                    let (_, lane) = self.lanes.swap_remove(at);
                    lane.shutdown(now_ns, &mut self.net);
                    println!(
                        "percore: core {} closed its lane of remote volume {id}",
                        self.core
                    );
                }
            }
            RemoteMsg::Update { id, update } => {
                if let Some((_, lane)) = self.lanes.iter().find(|(i, _)| *i == id) {
                    lane.apply_lane_update(update, now_ns, &mut self.net);
                }
            }
        }
    }

    /// Makes volume `id`'s lane and adds the replica's namespaces it backs, and those of the
    /// emulated functions' replica (`fns`); false (said on the console) if any cannot be.
    fn add_lane(
        &mut self,
        id: u32,
        remote: &keel_provision::Remote,
        cfg: RemoteConfig,
        seed: LaneSeed,
        mut fns: Option<&mut crate::fnq::FnCore>,
    ) -> bool {
        let core = self.core;
        let lane = match RemoteVolume::lane(cfg, core as u16, seed) {
            Ok(l) => l,
            Err(e) => {
                klog::error!(
                    "percore: core {}: lane of {}: {}",
                    core,
                    klog::D(remote),
                    klog::D(&e)
                );
                return false;
            }
        };
        let users: Vec<LaneUser<'_>> = self
            .subsystems
            .iter()
            .flat_map(|s| {
                s.namespaces.iter().filter_map(move |n| match &n.source {
                    ReplicaSource::Remote { remote: r, slice } if r.same_target(remote) => {
                        Some((s.nqn.clone(), n, *slice))
                    }
                    _ => None,
                })
            })
            .collect();
        // The functions' replica's users: (subsystem, namespace, slice).
        let fn_users: Vec<LaneUser<'_>> = fns.as_deref().map_or_else(Vec::new, |f| {
            f.lane_users(remote)
                .filter_map(|(nqn, n)| match &n.source {
                    ReplicaSource::Remote { slice, .. } => Some((nqn.clone(), n, *slice)),
                    _ => None,
                })
                .collect()
        });
        let Some(backend) = lane.backend() else {
            return false;
        };
        let all = users.len() + fn_users.len();
        let many = all > 1 || users.iter().chain(&fn_users).any(|u| u.2.is_some());
        let (mut whole, shared) = if many {
            (None, Some(SharedBackend::new(backend, LANE_SHARED_DEPTH)))
        } else {
            (Some(backend), None)
        };
        let mut configs = Vec::new();
        let fn_at = users.len();
        for (nqn, n, slice) in users.iter().chain(&fn_users) {
            let Some(cfg) = lane_namespace(core, remote, n, *slice, shared.as_ref(), &mut whole)
            else {
                return false;
            };
            configs.push((nqn.clone(), cfg));
        }
        // The NVMe/TCP replica's first: if one of them cannot be added, no function namespace
        // holds a handle on the lane dropped with the refusal (core 0 then brings the
        // functions' pairs home: `Services::lane_refused`).
        let fn_configs = configs.split_off(fn_at.min(configs.len()));
        if !self.add_lane_namespaces(remote, configs) {
            return false;
        }
        for (nqn, cfg) in fn_configs {
            let nsid = cfg.nsid;
            let added = fns.as_deref_mut().map(|f| f.add_lane_namespace(&nqn, cfg));
            if let Some(Err(e)) = added {
                klog::error!(
                    "percore: core {}: namespace {} of {} (emulated function): {}",
                    core,
                    nsid,
                    nqn,
                    klog::Dbg(&e)
                );
                return false;
            }
        }
        self.fn_lanes |= fn_at < all;
        self.lanes.push((id, lane));
        if let Some(sb) = shared {
            self.lane_shares.push((id, sb));
        }
        true
    }

    /// Adds namespaces served through a lane of `remote` to the replica; false (said on the
    /// console) if any cannot be.
    fn add_lane_namespaces(
        &mut self,
        remote: &keel_provision::Remote,
        configs: Vec<(String, keel_controller::NamespaceConfig)>,
    ) -> bool {
        let core = self.core;
        for (nqn, cfg) in configs {
            let nsid = cfg.nsid;
            if let Err(e) = self.target.add_namespace(&nqn, cfg) {
                klog::error!(
                    "percore: core {}: namespace {} of {}: {}",
                    core,
                    nsid,
                    nqn,
                    klog::Dbg(&e)
                );
                return false;
            }
            println!(
                "percore: core {core} serves namespace {nsid} of {nqn} through its own I/O queues to remote {remote}"
            );
        }
        self.ns_dirty = true;
        true
    }

    /// More namespaces on volume `id`'s running lane (slices a push added): cut from the
    /// lane's shared backend and added to the replica; false (said on the console) if the
    /// lane is not shared (it backs one whole namespace) or any cannot be made.
    fn add_lane_users(&mut self, id: u32, users: Vec<(String, ReplicaNs)>) -> bool {
        let core = self.core;
        let Some((_, sb)) = self.lane_shares.iter().find(|(i, _)| *i == id) else {
            klog::error!(
                "percore: core {}: remote volume {}: its lane backs one whole namespace; no more can be cut from it",
                core,
                id
            );
            return false;
        };
        let mut configs = Vec::new();
        let mut remote = None;
        for (nqn, n) in &users {
            let ReplicaSource::Remote { remote: r, slice } = &n.source else {
                return false;
            };
            let Some(cfg) = lane_namespace(core, r, n, *slice, Some(sb), &mut None) else {
                return false;
            };
            remote = Some(r.clone());
            configs.push((nqn.clone(), cfg));
        }
        let Some(remote) = remote else {
            return true;
        };
        if !self.add_lane_namespaces(&remote, configs) {
            return false;
        }
        for (nqn, n) in users {
            if let Some(s) = self.subsystems.iter_mut().find(|s| s.nqn == nqn)
                && !s.namespaces.iter().any(|o| o.nsid == n.nsid)
            {
                s.namespaces.push(n);
            }
        }
        true
    }
}

/// Stores a core queue pair's state and totals in its slot of `DRIVE_SHARES` (skipped if
/// the queue is in use right now: the next publication has it).
pub(crate) fn publish_drive_queue(
    slot: &crate::shares::DriveQueueShare,
    q: &Rc<RefCell<CoreNvmeQueue>>,
) {
    let Ok(q) = q.try_borrow() else { return };
    let s = q.stats();
    let state = match q.state() {
        keel_hal::nvme::driver::CoreQueueState::Up => 0,
        keel_hal::nvme::driver::CoreQueueState::Down => 1,
        keel_hal::nvme::driver::CoreQueueState::Dead => 2,
    };
    slot.publish(state, &crate::shares::queue_counters!(s));
}

/// Drive `d`'s namespace `nsid` through this core's own queue pair on that drive (of
/// `queues`), for a replica target; `None` if the core has no queue on it.
pub(crate) fn open_on_core_queue(
    queues: &[(usize, Rc<RefCell<CoreNvmeQueue>>)],
    d: usize,
    nsid: u32,
) -> Option<Box<dyn keel_storage::BlockBackend>> {
    let q = &queues.iter().find(|(i, _)| *i == d)?.1;
    let i = q
        .borrow()
        .namespaces()
        .iter()
        .position(|n| n.nsid == nsid)?;
    let b = CoreNvmeBackend::new(q.clone(), i)?;
    Some(Box::new(b))
}

/// Takes the drive's I/O queue pair `i` of those created for other cores, with a handle on
/// its doorbells.
pub(crate) fn take_core_queue(
    c: &mut keel_hal::nvme::driver::Controller<keel_hal::nvme::Bar0, keel_hal::nvme::HeapDma>,
    i: usize,
) -> Option<CoreNvmeQueue> {
    let qid = c.core_queue_id(i)?;
    let dstrd = c.info()?.cap.dstrd();
    // SAFETY: queue `qid` was created for another core and is handed out here, once (the
    // controller gives each queue out only once: `core_queue_id` is `None` afterwards); the
    // driver never writes the doorbells of a queue it handed out.
    let bells = unsafe { c.regs().queue_doorbells(qid, dstrd) }?;
    c.take_core_queue(i, bells)
}

/// A connection on another core whose queue core 0 holds.
#[derive(Debug)]
struct Proxy {
    /// Index of its core's link.
    link: usize,
    conn: ConnRef,
    queue: QueueId,
    connected: bool,
    /// Its I/O queue is served by its core (adopted).
    adopted: bool,
    /// The subsystem of its adopted queue.
    subsystem: Option<String>,
}

/// Core 0's side: the queues it holds for connections on other cores, and what goes back.
pub struct Holder {
    proxies: Vec<Option<Proxy>>,
    /// Which link's core carved each buffer pool forwarded commands came with (pool id,
    /// link): a buffer the target releases after its queue went away goes home by it.
    pool_homes: Vec<(u32, usize)>,
    /// The target's events for held queues, taken each pass (kept to reuse its memory).
    events: Vec<keel_controller::Event>,
    /// Messages per link that found its ring full.
    outq: Outbox,
    /// Subsystems other cores serve I/O queues of.
    replicable: Vec<String>,
    generation: u64,
    /// The cores (a bit each) it handed a queue pair to.
    served: u64,
    /// Remote volumes other cores serve through lanes.
    lanes: Vec<LaneTrack>,
    /// How many of [`crate::replica::Replication::dropped`] it has acted on.
    dropped_seen: usize,
}

/// Namespace `n` of a replica through a lane of `remote`: cut from the lane's `shared`
/// backend, or the lane's `whole` backend (taken), encrypted as on core 0; `None` (said on
/// the console) if it cannot be made.
fn lane_namespace<B: keel_storage::BlockBackend + 'static>(
    core: usize,
    remote: &keel_provision::Remote,
    n: &ReplicaNs,
    slice: Option<(u64, Option<u64>)>,
    shared: Option<&SharedBackend<B>>,
    whole: &mut Option<B>,
) -> Option<keel_controller::NamespaceConfig> {
    let b: Box<dyn keel_storage::BlockBackend> = match (shared, whole.take()) {
        (Some(sb), _) => {
            let spec = crate::config::NsSpec::Remote {
                remote: Box::new(remote.clone()),
                slice,
            };
            match cut(sb, slice, &spec) {
                Ok(b) => b,
                Err(e) => {
                    klog::error!("percore: core {}: {}", core, klog::D(&e));
                    return None;
                }
            }
        }
        (None, Some(b)) => Box::new(b),
        (None, None) => return None,
    };
    // Encrypted: the same cipher over the lane as core 0's over its own queues.
    let b = crate::services::replica_cipher(n, b)?;
    Some(keel_controller::NamespaceConfig {
        nsid: n.nsid,
        backend: b,
        nguid: n.nguid,
        uuid: [0; 16],
        eui64: [0; 8],
        qos: n.qos.clone(),
    })
}

/// The namespaces of `replicable` on volume `v` among `which` (subsystem NQN, NSID), as
/// described for the replicas.
fn lane_users_described(
    replicable: &[ReplicaSubsystem],
    v: &crate::remote::Volume,
    which: &[(String, u32)],
) -> Vec<(String, ReplicaNs)> {
    replicable
        .iter()
        .flat_map(|s| {
            s.namespaces.iter().filter_map(move |n| match &n.source {
                ReplicaSource::Remote { remote, .. }
                    if remote.same_target(&v.remote)
                        && which.iter().any(|(q, id)| *q == s.nqn && *id == n.nsid) =>
                {
                    Some((s.nqn.clone(), n.clone()))
                }
                _ => None,
            })
        })
        .collect()
}

/// A remote volume whose lanes core 0 looks after.
#[derive(Debug)]
struct LaneTrack {
    /// The volume's id (`crate::remote::Volume::id`).
    id: u32,
    /// Its lanes were sent to the cores.
    sent: bool,
    /// Cores (a bit each) that have not yet answered with [`Msg::RemoteReady`].
    acks: u64,
    /// The volume's lane version last sent.
    seen: u64,
    /// A volume of a pushed configuration (a core that cannot serve it drops only the
    /// subsystems using it; at boot, every adoption ends).
    pushed: bool,
    /// The namespaces its lanes were told of (subsystem NQN, NSID).
    users_sent: Vec<(String, u32)>,
    /// Those of the last [`RemoteMsg::Users`] (a core that cannot add them drops only
    /// their subsystems).
    round: Vec<(String, u32)>,
}

impl core::fmt::Debug for Holder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Holder")
            .field("proxies", &self.proxies.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

impl Holder {
    /// Hands queue pair `k` (of `pairs`, pair 0 is core 0's) to core `k` through `links`
    /// and returns core 0's side, or `None` if there is nothing to hand.
    pub fn start(
        links: &mut Links,
        pairs: Vec<QueuePair>,
        mac: [u8; 6],
        addressing: Addressing,
        services: &mut Services<Qemu>,
    ) -> Option<Self> {
        if pairs.is_empty() {
            return None;
        }
        // Each core's own I/O queue pair on every drive a replicable subsystem uses; a
        // subsystem on a drive some core got no queue of is served through core 0 instead.
        let used: Vec<usize> = services
            .replicable
            .iter()
            .flat_map(|s| s.drives())
            .collect();
        let mut drives: Vec<Vec<(usize, CoreNvmeQueue)>> = Vec::new();
        for li in 0..pairs.len() {
            let mut mine = Vec::new();
            for (d, drive) in services.drives.iter().enumerate() {
                if !used.contains(&d) {
                    continue;
                }
                if let Some(q) = drive.drive.with(|c| take_core_queue(c, li)).flatten() {
                    mine.push((d, q));
                }
            }
            drives.push(mine);
        }
        // Drives every core has its own queue pair on (namespaces added live on them can be
        // served on every core).
        let mut every: Vec<usize> = used
            .iter()
            .copied()
            .filter(|d| drives.iter().all(|m| m.iter().any(|(i, _)| i == d)))
            .collect();
        every.sort_unstable();
        every.dedup();
        let replicable: Vec<ReplicaSubsystem> = services
            .replicable
            .iter()
            .filter(|s| {
                let ok = s
                    .drives()
                    .all(|d| drives.iter().all(|m| m.iter().any(|(i, _)| *i == d)));
                if !ok {
                    klog::warning!(
                        "percore: {}: a drive has no I/O queue pair for every core; its I/O queues are served through core 0",
                        s.nqn
                    );
                }
                ok
            })
            .cloned()
            .collect();
        // Remote volumes a replicable subsystem uses: their associations get I/O queues for
        // every other core (asked for at the first association, which comes later).
        let cores = keel_hal::arch::percpu::cores().len().max(pairs.len() + 1);
        let mut lanes = Vec::new();
        for v in services.remotes.volumes.iter_mut() {
            let used = replicable.iter().any(|s| {
                s.namespaces.iter().any(|n| {
                    matches!(&n.source, ReplicaSource::Remote { remote, .. } if remote.same_target(&v.remote))
                })
            });
            if used {
                v.laned = true;
                v.gate_open = false;
                v.vol.set_lanes((cores - 1) as u16);
                v.lane_users = replicable
                    .iter()
                    .flat_map(|s| {
                        s.namespaces.iter().filter_map(|n| match &n.source {
                            ReplicaSource::Remote { remote, .. }
                                if remote.same_target(&v.remote) =>
                            {
                                Some((s.nqn.clone(), n.nsid))
                            }
                            _ => None,
                        })
                    })
                    .collect();
                lanes.push(LaneTrack {
                    id: v.id,
                    sent: false,
                    acks: 0,
                    seen: u64::MAX,
                    pushed: false,
                    users_sent: Vec::new(),
                    round: Vec::new(),
                });
            }
        }
        let mut served = 0u64;
        for ((link, pair), drives) in links.0.iter_mut().zip(pairs).zip(drives) {
            let spec = ServeSpec {
                pair,
                mac,
                addressing,
                subsystems: replicable.clone(),
                limits: *services.target.limits(),
                advertise: services.plan().advertise.clone(),
                drives,
                client_ports: client_ports(link.info.index, cores),
            };
            if link.send(Msg::Serve(Box::new(spec))).is_err() {
                klog::error!("percore: core {}: ring full", link.info.index);
            } else if link.info.index < 64 {
                served |= 1 << link.info.index;
            }
        }
        // What the replicas follow of live namespace changes (`crate::replica`).
        let r = &mut services.replication;
        r.cores = served;
        r.subsystems = replicable.iter().map(|s| s.nqn.clone()).collect();
        r.drives = every;
        r.lanes = (cores - 1) as u16;
        let outq = Outbox::new(links.0.len());
        Some(Self {
            proxies: Vec::new(),
            pool_homes: Vec::new(),
            events: Vec::new(),
            outq,
            replicable: replicable.iter().map(|s| s.nqn.clone()).collect(),
            generation: services.target.namespace_generation(),
            served,
            lanes,
            dropped_seen: services.replication.dropped.len(),
        })
    }

    /// Ends the adopted queues of subsystem `nqn` (their hosts reconnect) and serves its
    /// later I/O queues through core 0.
    fn end_adoptions_of(&mut self, links: &mut Links, nqn: &str) {
        self.replicable.retain(|s| s != nqn);
        let ends: Vec<(usize, ConnRef)> = self
            .proxies
            .iter()
            .flatten()
            .filter(|p| p.adopted && p.subsystem.as_deref() == Some(nqn))
            .map(|p| (p.link, p.conn))
            .collect();
        for (li, conn) in ends {
            self.send(links, li, Msg::FromHolder(FromHolder::Terminate { conn }));
        }
    }

    /// Acts on the subsystems the services stopped adopting since it last looked
    /// ([`crate::replica::Replication::dropped`]).
    fn follow_drops(&mut self, links: &mut Links, services: &mut Services<Qemu>) {
        while let Some(nqn) = services.replication.dropped.get(self.dropped_seen).cloned() {
            self.dropped_seen += 1;
            // Its description goes too (it holds its shared RAM regions).
            services.forget_dropped(&nqn);
            if self.replicable.contains(&nqn) {
                klog::warning!(
                    "percore: {}: I/O queues adopted by other cores end; new ones are served through core 0",
                    nqn
                );
                self.end_adoptions_of(links, &nqn);
                // The replicas forget it: its namespaces' backends (shared RAM regions
                // among them) go once drained on every core.
                let planes = crate::cores::planes() & self.served;
                let retire = ReplicaChange {
                    seq: 0,
                    subsystem: nqn.clone(),
                    op: ReplicaOp::Retire,
                };
                for li in 0..links.0.len() {
                    let core = links.0[li].info.index;
                    if core < 64 && planes & (1 << core) != 0 {
                        self.send(links, li, Msg::Replica(Box::new(retire.clone())));
                    }
                }
            }
        }
    }

    /// Sends the staged namespace changes to every serving core, and applies on core 0 the
    /// ones every core has applied (or that timed out): [`crate::replica`].
    fn tend_replicas(
        &mut self,
        now_ns: u64,
        links: &mut Links,
        services: &mut Services<Qemu>,
    ) -> bool {
        if !services.replication.pending() {
            return false;
        }
        let planes = crate::cores::planes() & self.served;
        for change in services.replication.take_unsent(now_ns, planes) {
            for li in 0..links.0.len() {
                let core = links.0[li].info.index;
                if core < 64 && planes & (1 << core) != 0 {
                    self.send(links, li, Msg::Replica(Box::new(change.clone())));
                }
            }
        }
        services.finish_replicated(now_ns)
    }

    /// Ends every adopted queue (the host reconnects) and serves every later I/O queue
    /// through core 0.
    fn end_adoptions(&mut self, links: &mut Links) {
        self.replicable.clear();
        let ends: Vec<(usize, ConnRef)> = self
            .proxies
            .iter()
            .flatten()
            .filter(|p| p.adopted)
            .map(|p| (p.link, p.conn))
            .collect();
        for (li, conn) in ends {
            self.send(links, li, Msg::FromHolder(FromHolder::Terminate { conn }));
        }
    }

    /// Remote volumes' lanes: hands each core its lane once the volume's namespace is
    /// identified, then every change of the volume's associations.
    fn tend_lanes(&mut self, links: &mut Links, services: &mut Services<Qemu>) -> bool {
        let mut busy = false;
        let planes = crate::cores::planes();
        let mut tracks = core::mem::take(&mut self.lanes);
        // Volumes gone on core 0: every core closes its lane of them.
        for t in tracks.iter().filter(|t| t.sent) {
            if services.remotes.volumes.iter().any(|v| v.id == t.id) {
                continue;
            }
            for li in 0..links.0.len() {
                let core = links.0[li].info.index;
                if core < 64 && planes & (1 << core) != 0 {
                    self.send(links, li, Msg::Remote(RemoteMsg::Retire { id: t.id }));
                }
            }
            busy = true;
        }
        tracks.retain(|t| services.remotes.volumes.iter().any(|v| v.id == t.id));
        // Volumes a push made laned (`crate::remote::RemoteService::lane_new`).
        for v in services.remotes.volumes.iter().filter(|v| v.laned) {
            if !tracks.iter().any(|t| t.id == v.id) {
                tracks.push(LaneTrack {
                    id: v.id,
                    sent: false,
                    acks: 0,
                    seen: u64::MAX,
                    pushed: true,
                    users_sent: Vec::new(),
                    round: Vec::new(),
                });
            }
        }
        for t in tracks.iter_mut() {
            let Some(v) = services.remotes.volumes.iter().find(|v| v.id == t.id) else {
                continue;
            };
            // Namespaces removed since (a later push may add them again: a new round).
            t.users_sent.retain(|u| v.lane_users.contains(u));
            if !t.sent {
                let Some(seed) = v.vol.lane_seed() else {
                    continue;
                };
                let cfg = services.remotes.lane_config(v);
                // The namespaces the lanes serve, as described for the replicas.
                let users = lane_users_described(&services.replicable, v, &v.lane_users);
                for li in 0..links.0.len() {
                    let core = links.0[li].info.index;
                    if core >= 64 || planes & (1 << core) == 0 {
                        continue;
                    }
                    t.acks |= 1 << core;
                    let m = RemoteMsg::Lane {
                        id: t.id,
                        remote: Box::new(v.remote.clone()),
                        cfg: Box::new(cfg.clone()),
                        seed,
                        users: users.clone(),
                    };
                    self.send(links, li, Msg::Remote(m));
                }
                t.users_sent = v.lane_users.clone();
                t.sent = true;
                busy = true;
            } else if t.acks == 0 && v.lane_users.iter().any(|u| !t.users_sent.contains(u)) {
                // Namespaces a push added on the running volume: every core adds them
                // through its lane before core 0 serves them (the gate stays closed).
                let round: Vec<(String, u32)> = v
                    .lane_users
                    .iter()
                    .filter(|u| !t.users_sent.contains(u))
                    .cloned()
                    .collect();
                let users = lane_users_described(&services.replicable, v, &round);
                for li in 0..links.0.len() {
                    let core = links.0[li].info.index;
                    if core >= 64 || planes & (1 << core) == 0 {
                        continue;
                    }
                    t.acks |= 1 << core;
                    let m = RemoteMsg::Users {
                        id: t.id,
                        users: users.clone(),
                    };
                    self.send(links, li, Msg::Remote(m));
                }
                t.users_sent.extend(round.iter().cloned());
                t.round = round;
                busy = true;
            }
            let version = v.vol.lane_version();
            if version != t.seen {
                t.seen = version;
                let mut ups = Vec::new();
                for li in 0..links.0.len() {
                    let core = links.0[li].info.index;
                    if core >= 64 || planes & (1 << core) == 0 {
                        continue;
                    }
                    ups.clear();
                    v.vol.lane_updates(core as u16, &mut ups);
                    for &update in &ups {
                        let m = RemoteMsg::Update { id: t.id, update };
                        self.send(links, li, Msg::Remote(m));
                    }
                }
                busy = true;
            }
        }
        for t in tracks.iter_mut().filter(|t| t.sent && t.acks == 0) {
            if let Some(v) = services.remotes.volumes.iter_mut().find(|v| v.id == t.id)
                && !v.gate_open
                && v.lane_users.iter().all(|u| t.users_sent.contains(u))
            {
                v.gate_open = true;
                t.round.clear();
                busy = true;
            }
        }
        self.lanes = tracks;
        busy
    }

    /// The cores (a bit each) it handed a queue pair to.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Rings every other core (core 0 woke: the NIC's interrupt may have been for them).
    pub fn wake_all(links: &Links) {
        for l in &links.0 {
            if let Some(d) = &l.doorbell {
                d.ring();
            }
        }
    }

    /// Whether core 0 may sleep as far as the held queues go: nothing waits for room on a
    /// ring (which raises no interrupt when it frees up).
    pub fn may_sleep(&self) -> bool {
        self.outq.is_empty()
    }

    fn send(&mut self, links: &mut Links, li: usize, msg: Msg) {
        self.outq.send(links, li, msg);
    }

    /// One pass: messages from the other cores, forwarded commands, completions and queue
    /// ends of the held queues back; returns whether anything happened.
    pub fn poll(
        &mut self,
        now_ns: u64,
        links: &mut Links,
        services: &mut Services<Qemu>,
        mut net: Option<&mut NetStack<Qemu>>,
        fn_inbox: &mut Vec<crate::fnq::FnMsg>,
    ) -> bool {
        let now = Instant::from_nanos(now_ns);
        let mut busy = false;
        self.follow_drops(links, services);
        let generation = services.target.namespace_generation();
        if generation != self.generation {
            // Changes every core applied first (namespaces added or removed by a push, remote
            // namespaces coming up) or confined to dropped subsystems are no change for the
            // replicas of the others (`crate::replica`).
            let benign = services.replication.explains(self.generation, generation);
            self.generation = generation;
            if !benign {
                if !self.replicable.is_empty() {
                    klog::warning!(
                        "percore: namespaces changed: I/O queues adopted by other cores end; new ones are served through core 0"
                    );
                }
                self.end_adoptions(links);
                // Nothing is adopted any more: later changes need not wait for the cores.
                services.replication.cores = 0;
            }
        }
        for li in 0..links.0.len() {
            let mut taken = 0u64;
            while let Some(msg) = links.0[li].rx.pop() {
                taken += 1;
                busy = true;
                match msg {
                    Msg::ToHolder(m) => self.take_message(li, m, now, links, &mut services.target),
                    Msg::Frame(f) => {
                        if let Some(pair) = net.as_deref_mut().and_then(|n| n.device.pair()) {
                            pair.inject(f);
                        }
                    }
                    Msg::RemoteReady { id, core, ok } => {
                        let mut pushed = false;
                        let mut round = Vec::new();
                        if let Some(t) = self.lanes.iter_mut().find(|t| t.id == id) {
                            t.acks &= !(1u64 << (core & 63));
                            pushed = t.pushed;
                            if !ok {
                                round = core::mem::take(&mut t.round);
                            }
                        }
                        if !ok && services.lane_refused(id, core, pushed, round) {
                            self.end_adoptions(links);
                            services.replication.cores = 0;
                        }
                    }
                    Msg::ReplicaAck { seq, core, ok } => {
                        services.replication.ack(seq, core, ok);
                    }
                    Msg::RemoteLost { id, loss } => {
                        if let (Some(v), Some(n)) = (
                            services.remotes.volumes.iter().find(|v| v.id == id),
                            net.as_deref_mut(),
                        ) {
                            v.vol.lane_lost(loss, now_ns, n);
                        }
                    }
                    // For the emulated functions' side (`crate::fnq::Hub`).
                    Msg::Fn(m) => fn_inbox.push(m),
                    _ => {}
                }
            }
            crate::cores::own_counters().received(taken);
        }
        busy |= self.tend_lanes(links, services);
        if self.tend_replicas(now_ns, links, services) {
            busy = true;
            self.follow_drops(links, services);
        }
        // Frames of other cores' outgoing connections that landed on pair 0.
        if let Some(pair) = net.and_then(|n| n.device.pair()) {
            while let Some(f) = pair.take_diverted() {
                let li = tcp_dst_port(&f)
                    .and_then(client_port_core)
                    .and_then(|c| links.0.iter().position(|l| l.info.index == c));
                if let Some(li) = li {
                    self.send(links, li, Msg::Frame(f));
                    busy = true;
                }
            }
        }
        // Swapped, not taken: both vectors keep their memory (no allocation per pass).
        let mut events = core::mem::take(&mut self.events);
        core::mem::swap(&mut events, &mut services.forwarded_events);
        for ev in events.drain(..) {
            busy = true;
            match ev {
                keel_controller::Event::Completion(q, resp) => {
                    let pi = resp.cookie as usize;
                    if self
                        .proxies
                        .get(pi)
                        .and_then(Option::as_ref)
                        .map(|p| p.queue)
                        == Some(q)
                    {
                        self.reply(pi, resp, links, &mut services.target);
                    } else if let Some(b) = resp.buf {
                        self.release(links, b);
                    }
                }
                keel_controller::Event::QueueTerminated(q) => {
                    if let Some(p) = self.proxies.iter().flatten().find(|p| p.queue == q) {
                        let (li, conn) = (p.link, p.conn);
                        self.send(links, li, Msg::FromHolder(FromHolder::Terminate { conn }));
                    }
                }
                keel_controller::Event::BufferReleased { buf, .. } => self.release(links, buf),
            }
        }
        self.events = events;
        // Hosts' Aborts of commands on adopted queues: asked of the core serving them (the
        // emulated functions' pairs' are theirs: `crate::fnq`).
        let mut asks = Vec::new();
        services
            .target
            .take_abort_requests_of(crate::nvmf::FORWARD_OWNER, &mut |q, cid, token| {
                asks.push((q, cid, token))
            });
        for (q, cid, token) in asks {
            busy = true;
            let to = self
                .proxies
                .iter()
                .flatten()
                .find(|p| p.queue == q && p.adopted)
                .map(|p| (p.link, p.conn));
            match to {
                Some((li, conn)) => {
                    let m = FromHolder::Abort { conn, cid, token };
                    self.send(links, li, Msg::FromHolder(m));
                }
                None => services.target.abort_verdict_from_elsewhere(token, false),
            }
        }
        self.outq.flush(links);
        busy
    }

    /// Sends a buffer of a forwarded command whose queue went away back to the core whose
    /// pool carved it.
    fn release(&mut self, links: &mut Links, buf: IoBuf) {
        let home = self
            .pool_homes
            .iter()
            .find(|(id, _)| *id == buf.pool_id())
            .map(|&(_, li)| li);
        match home {
            Some(li) => self.send(links, li, Msg::FromHolder(FromHolder::Release { buf })),
            // Every forwarded buffer's pool was recorded when it came: unreachable.
            None => klog::error!("percore: a forwarded command's buffer of an unknown pool"),
        }
    }

    fn find(&self, li: usize, conn: ConnRef) -> Option<usize> {
        self.proxies
            .iter()
            .position(|p| matches!(p, Some(p) if p.link == li && p.conn == conn))
    }

    /// Acts on a message for the controller core.
    fn take_message(
        &mut self,
        li: usize,
        m: ToHolder,
        now: Instant,
        links: &mut Links,
        target: &mut Target,
    ) {
        match m {
            ToHolder::Activity { cntlid } => target.touch_controller(cntlid, now),
            ToHolder::Error(e) => {
                target.log_replica_error(&e);
            }
            ToHolder::Counters(r) => {
                target.add_retired_counters(&r);
            }
            ToHolder::AbortVerdict { token, aborted } => {
                target.abort_verdict_from_elsewhere(token, aborted);
            }
            ToHolder::Closed { conn, how } => {
                if let Some(pi) = self.find(li, conn)
                    && let Some(p) = self.proxies[pi].take()
                {
                    let _ = target.close_queue_after(p.queue, how);
                }
            }
            ToHolder::Capsule {
                conn,
                sqe,
                buf,
                data_len,
                status,
            } => {
                // The command runs on the buffer it came with; remember whose it is.
                if let Some(b) = &buf
                    && !self.pool_homes.iter().any(|(id, _)| *id == b.pool_id())
                {
                    self.pool_homes.push((b.pool_id(), li));
                }
                let pi = match self.find(li, conn) {
                    Some(pi) => pi,
                    None => match target.open_queue_for(FORWARD_OWNER) {
                        Ok(queue) => {
                            let p = Proxy {
                                link: li,
                                conn,
                                queue,
                                connected: false,
                                adopted: false,
                                subsystem: None,
                            };
                            match self.proxies.iter().position(Option::is_none) {
                                Some(i) => {
                                    self.proxies[i] = Some(p);
                                    i
                                }
                                None => {
                                    self.proxies.push(Some(p));
                                    self.proxies.len() - 1
                                }
                            }
                        }
                        Err(_) => {
                            let cqe = Cqe {
                                dw0: 0,
                                dw1: 0,
                                sqhd: 0,
                                sqid: 0,
                                cid: sqe.cid,
                                phase: false,
                                status: Status::CONNECT_CONTROLLER_BUSY,
                            };
                            let done = FromHolder::Done {
                                conn,
                                cqe,
                                buf,
                                data_len: 0,
                                depth: None,
                                adopt: None,
                            };
                            self.send(links, li, Msg::FromHolder(done));
                            return;
                        }
                    },
                };
                let Some(queue) = self.proxies[pi].as_ref().map(|p| p.queue) else {
                    return;
                };
                let req = Request {
                    sqe,
                    buf,
                    data_len,
                    cookie: pi as u32,
                };
                let resp = match status {
                    Some(st) => Some(target.reject(now, queue, req, st)),
                    None => target.submit(now, queue, req),
                };
                if let Some(resp) = resp {
                    self.reply(pi, resp, links, target);
                }
            }
        }
    }

    /// Sends a held queue's response to its connection's core.
    fn reply(&mut self, pi: usize, resp: Response, links: &mut Links, target: &mut Target) {
        let Some(p) = self.proxies.get_mut(pi).and_then(Option::as_mut) else {
            if let Some(b) = resp.buf {
                self.release(links, b);
            }
            return;
        };
        let (mut depth, mut adopt) = (None, None);
        if !p.connected
            && let Some(info) = target.queue_info(p.queue)
        {
            p.connected = true;
            depth = Some((info.sqsize, info.sq_flow_control_disabled));
            adopt = target
                .adoption(p.queue)
                .filter(|a| self.replicable.contains(&a.subnqn))
                .map(Box::new);
            p.adopted = adopt.is_some();
            p.subsystem = adopt.as_ref().map(|a| a.subnqn.clone());
            // Its commands run on the connection's core from now on: its share of the
            // controller's flows is counted there, and an Abort of one is asked there.
            target.served_elsewhere(p.queue, p.adopted);
        }
        let (li, conn) = (p.link, p.conn);
        let done = FromHolder::Done {
            conn,
            cqe: resp.cqe,
            buf: resp.buf,
            data_len: resp.data_len,
            depth,
            adopt,
        };
        self.send(links, li, Msg::FromHolder(done));
    }
}
