//! Remote volumes: namespaces whose blocks live in a namespace of a remote NVMe/TCP subsystem,
//! reached by the firmware as an NVMe/TCP initiator (`keel-remote`) over client sockets of
//! the network stack ([`keel_remote::Net`] is implemented by [`NetStack`]).
//!
//! One [`RemoteVolume`] per remote namespace (subsystem NQN, NSID, set of paths): namespaces
//! of the plan that name the same remote namespace (slices of it) share its associations.
//! A volume connects at the first pass; once some path has identified the remote namespace
//! (its size is known only then), every namespace of the plan waiting for it is built (a slice
//! of it, AES-XTS over it) and added to the controller core with `Target::add_namespace`,
//! which raises the Namespace Attribute Changed event for connected hosts. Until then, and
//! whenever the remote cannot be reached, the namespace's commands wait in the volume
//! (bounded by the loss timeouts); the volume never acknowledges a write the remote did not
//! acknowledge.
//!
//! Each pass polls every volume (after the transports submitted this pass's commands, so the
//! capsules leave in the same pass); [`RemoteService::next_deadline`] bounds the poll loop's
//! sleep by the volumes' timers (keep alive, reconnects, timeouts).
//!
//! The host NQN and host identifier default to ones derived from the device's MAC
//! (`nqn.2014-08.org.nvmexpress:uuid:` + a UUID), stable across boots; a remote backend may
//! name its own host NQN.

use crate::config::NsSpec;
use crate::hw::Hw;
use crate::klog;
use crate::net::NetStack;
use crate::plan::{NsPlan, Plan};
use crate::services::{cut, finish_namespace};
use alloc::{boxed::Box, format, string::String, string::ToString, vec::Vec};
use keel_controller::Target;
use keel_nvmf_tcp::Digests;
use keel_provision::{Remote, RemotePolicy};
use keel_remote::{PathAddr, Policy, RemoteBackend, RemoteConfig, RemoteVolume};
use keel_storage::{BlockBackend, SharedBackend};
use smoltcp::iface::SocketHandle;

/// Completions parked per slice of a shared remote namespace at most.
const SHARED_DEPTH: usize = 4096;

/// Host identity of the initiator: the host identifier (a UUID derived from the MAC) and the
/// NQN that carries it.
pub fn host_identity(mac: [u8; 6]) -> (String, [u8; 16]) {
    use sha2::Digest;
    let d = sha2::Sha256::new()
        .chain_update(b"keel/v1/nvme-host-id")
        .chain_update(mac)
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id[6] = (id[6] & 0x0F) | 0x80; // RFC 9562 version 8 (custom)
    id[8] = (id[8] & 0x3F) | 0x80; // variant 10
    let h = |r: core::ops::Range<usize>| -> String {
        id[r].iter().map(|b| format!("{b:02x}")).collect()
    };
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    );
    (format!("nqn.2014-08.org.nvmexpress:uuid:{uuid}"), id)
}

/// The initiator's configuration of a remote backend.
pub fn remote_config(r: &Remote, hostnqn: &str, hostid: [u8; 16]) -> RemoteConfig {
    let mut c = RemoteConfig::new(
        r.paths
            .iter()
            .map(|&(ip, port)| PathAddr::new(ip, port))
            .collect(),
        r.nqn.clone(),
        r.nsid,
        r.hostnqn.clone().unwrap_or_else(|| String::from(hostnqn)),
        hostid,
    );
    c.digests = Digests {
        header: r.header_digest,
        data: r.data_digest,
    };
    c.io_queues = r.queues;
    c.queue_depth = r.depth;
    c.kato_ms = r.kato_ms;
    c.reconnect_delay_ms = r.reconnect_delay_ms;
    c.ctrl_loss_tmo_ms = r.ctrl_loss_tmo_ms;
    c.fast_io_fail_tmo_ms = r.fast_io_fail_tmo_ms;
    c.policy = match r.policy {
        RemotePolicy::RoundRobin => Policy::RoundRobin,
        RemotePolicy::QueueDepth => Policy::QueueDepth,
    };
    c
}

/// How the volume's backend is used.
enum Use {
    /// Not handed out yet.
    Unused,
    /// By one namespace, whole.
    Whole,
    /// Shared by slices.
    Shared(SharedBackend<RemoteBackend<SocketHandle>>),
}

/// One remote namespace and the namespaces of the plan served from it.
pub(crate) struct Volume {
    /// The remote namespace (as described; identifies the volume).
    pub(crate) remote: Remote,
    pub(crate) vol: RemoteVolume<SocketHandle>,
    /// Namespaces of the plan waiting for the remote namespace to be identified.
    waiting: Vec<NsPlan>,
    /// Namespaces served from it: (subsystem NQN, NSID).
    pub(crate) exports: Vec<(String, u32)>,
    /// Whether its backend is shared by slices (decided when the volume is made: a slice,
    /// or several namespaces of the plan on it).
    share: bool,
    used: Use,
    /// No namespace uses it any more: shut down at the next pass and dropped.
    retired: bool,
    /// Stable identifier (messages between cores name the volume by it).
    pub(crate) id: u32,
    /// Other cores serve its namespaces through lanes of their own (`crate::percore`).
    pub(crate) laned: bool,
    /// Its namespaces may be added to the controller core's target: false while the other
    /// cores have not yet added them to their replicas (`crate::percore::Holder`).
    pub(crate) gate_open: bool,
    /// The namespaces its lanes serve on the other cores (subsystem NQN, NSID): any other
    /// namespace served from it later (a slice a push adds) is one the replicas lack, so its
    /// subsystem is no longer adopted.
    pub(crate) lane_users: Vec<(String, u32)>,
}

/// Every remote volume of the device.
pub(crate) struct RemoteService {
    pub(crate) volumes: Vec<Volume>,
    /// The host NQN volumes connect as unless their description names one.
    pub(crate) hostnqn: String,
    hostid: [u8; 16],
    next_id: u32,
}

impl core::fmt::Debug for RemoteService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RemoteService")
            .field("volumes", &self.volumes.len())
            .finish_non_exhaustive()
    }
}

impl RemoteService {
    /// No volume yet; `mac` gives the host identity.
    pub(crate) fn new(mac: [u8; 6]) -> Self {
        let (hostnqn, hostid) = host_identity(mac);
        RemoteService {
            volumes: Vec::new(),
            hostnqn,
            hostid,
            next_id: 1,
        }
    }

    /// Registers a namespace of the plan whose backend is remote: it is served once its
    /// volume has identified the remote namespace. `shared_hint`: other namespaces of the
    /// plan use the same remote namespace. Returns false (and logs why) when its volume
    /// cannot be made.
    pub(crate) fn add(&mut self, plan: &Plan, ns: &NsPlan, shared_hint: bool) -> bool {
        let NsSpec::Remote { remote, slice } = &ns.spec else {
            return false;
        };
        let name = crate::services::ns_name(plan, ns);
        if let Some(v) = self
            .volumes
            .iter_mut()
            .find(|v| !v.retired && v.remote.same_target(remote))
        {
            if v.remote != **remote {
                klog::error!(
                    "remote: {}: {} is already in use with other settings: the \
                     namespace is not served",
                    name,
                    klog::D(&remote)
                );
                return false;
            }
            v.waiting.push(ns.clone());
            return true;
        }
        let cfg = remote_config(remote, &self.hostnqn, self.hostid);
        match RemoteVolume::new(cfg) {
            Ok(vol) => {
                klog::info!(
                    "remote: {} = {}: connecting as {}",
                    name,
                    klog::D(&ns.spec),
                    remote.hostnqn.as_deref().unwrap_or(&self.hostnqn)
                );
                self.volumes.push(Volume {
                    remote: (**remote).clone(),
                    vol,
                    waiting: alloc::vec![ns.clone()],
                    exports: Vec::new(),
                    share: shared_hint || slice.is_some(),
                    used: Use::Unused,
                    retired: false,
                    id: self.next_id,
                    laned: false,
                    gate_open: true,
                    lane_users: Vec::new(),
                });
                self.next_id += 1;
                true
            }
            Err(e) => {
                klog::error!(
                    "remote: {}: {}: the namespace is not served",
                    name,
                    klog::D(&e)
                );
                false
            }
        }
    }

    /// Makes the volume of `remote`, new in this push (no association yet, nothing served
    /// from it), one the other cores serve through lanes of their own: its association asks
    /// for `lanes` more I/O queues and its namespaces wait for every core
    /// (`crate::percore::Holder`). Returns false (nothing changed) for a volume that already
    /// runs.
    pub(crate) fn lane_new(&mut self, remote: &Remote, lanes: u16) -> bool {
        let Some(v) = self.running(remote) else {
            return false;
        };
        if v.laned {
            // Made laned by an earlier namespace of this push.
            return !v.gate_open && v.exports.is_empty();
        }
        if !v.exports.is_empty() || v.vol.geometry().is_some() {
            return false;
        }
        v.laned = true;
        v.gate_open = false;
        v.vol.set_lanes(lanes);
        true
    }

    /// A namespace of a push on `remote`'s volume, which runs with lanes already: it waits
    /// until every core added it to its replica through its lane (the holder sends them
    /// the new users, `crate::percore::RemoteMsg::Users`, and opens the gate once all
    /// answered). False (nothing changed) for a volume without lanes.
    pub(crate) fn lane_more(&mut self, remote: &Remote) -> bool {
        let Some(v) = self.running(remote) else {
            return false;
        };
        if !v.laned {
            return false;
        }
        v.gate_open = false;
        true
    }

    /// The volume (not retired) serving `remote`'s target.
    fn running(&mut self, remote: &Remote) -> Option<&mut Volume> {
        self.volumes
            .iter_mut()
            .find(|v| !v.retired && v.remote.same_target(remote))
    }

    /// Namespace `nsid` of `nqn` is served through the lanes of `remote`'s volume.
    pub(crate) fn lane_user(&mut self, remote: &Remote, nqn: &str, nsid: u32) {
        if let Some(v) = self.running(remote) {
            v.lane_users.push((String::from(nqn), nsid));
        }
    }

    /// Whether a volume (not retired) serves `remote`'s target already.
    pub(crate) fn has_target(&self, remote: &Remote) -> bool {
        self.volumes
            .iter()
            .any(|v| !v.retired && v.remote.same_target(remote))
    }

    /// A namespace served from a remote volume was removed from the target (a pushed
    /// configuration); a volume no namespace uses any more is shut down at the next pass.
    pub(crate) fn removed(&mut self, nqn: &str, nsid: u32) {
        for v in &mut self.volumes {
            v.exports.retain(|(q, id)| !(q == nqn && *id == nsid));
            v.lane_users.retain(|(q, id)| !(q == nqn && *id == nsid));
            v.waiting
                .retain(|n| !(n.subsystem == nqn && n.nsid == nsid));
            if v.exports.is_empty() && v.waiting.is_empty() {
                v.retired = true;
            }
        }
    }

    /// One pass over every volume: the initiator's state machines, then the namespaces whose
    /// remote namespace has just been identified are added to `target`. Returns whether
    /// anything happened.
    pub(crate) fn poll<H: Hw>(
        &mut self,
        now_ns: u64,
        net: &mut NetStack<H>,
        target: &mut Target,
        plan: &Plan,
        served: &mut Vec<(String, u32)>,
        replication: &mut crate::replica::Replication,
    ) -> bool {
        let mut busy = false;
        let Self { volumes, .. } = self;
        for v in volumes.iter_mut() {
            if v.retired {
                v.vol.shutdown(now_ns, net);
                continue;
            }
            busy |= v.vol.poll(now_ns, net);
            if !v.waiting.is_empty() && v.vol.geometry().is_some() && v.gate_open {
                busy = true;
                // Namespaces the lanes serve: every other core added them first. Others (of
                // a volume without lanes, or added to a laned one after its lanes were
                // made) are not in the replicas: those subsystems are no longer adopted.
                let unlaned: Vec<String> = v
                    .waiting
                    .iter()
                    .filter(|n| {
                        !v.laned
                            || !v
                                .lane_users
                                .iter()
                                .any(|(q, id)| *q == n.subsystem && *id == n.nsid)
                    })
                    .map(|n| n.subsystem.clone())
                    .collect();
                let before = target.namespace_generation();
                v.serve_waiting::<H>(target, plan, served);
                let after = target.namespace_generation();
                if after != before {
                    for nqn in &unlaned {
                        replication.drop_subsystem(nqn);
                    }
                    replication.note(before, after);
                }
            }
        }
        self.volumes.retain(|v| {
            let keep = !v.retired;
            if !keep {
                klog::info!(
                    "remote: {} no longer used: disconnected",
                    klog::D(&v.remote)
                );
            }
            keep
        });
        busy
    }

    /// The configuration a lane of volume `v` is made with (the volume's own).
    pub(crate) fn lane_config(&self, v: &Volume) -> RemoteConfig {
        remote_config(&v.remote, &self.hostnqn, self.hostid)
    }

    /// The earliest time a volume's timers need a pass.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.volumes
            .iter()
            .filter_map(|v| v.vol.next_deadline())
            .min()
    }
}

impl Volume {
    /// State, paths and counters for `keelctl status` and `/metrics` (allocates).
    /// `elsewhere`: the other cores' lanes' requests together, `lane_queues` their queues
    /// (`crate::shares`): the volume's counters and its paths' in-flight and command counts
    /// are every core's.
    pub(crate) fn info(
        &self,
        default_hostnqn: &str,
        elsewhere: keel_remote::VolumeLoad,
        lane_queues: &[crate::shares::LaneRow],
    ) -> keel_mgmt::RemoteInfo {
        use keel_nvme::log::ana::AnaState;
        let snap = self.vol.snapshot();
        let mut info = keel_mgmt::RemoteInfo {
            subnqn: self.remote.nqn.clone(),
            nsid: self.remote.nsid,
            hostnqn: String::from(self.remote.hostnqn.as_deref().unwrap_or(default_hostnqn)),
            policy: String::from(self.remote.policy.name()),
            exports: self.exports.clone(),
            state: String::from("busy"),
            ..Default::default()
        };
        let Some(s) = snap else {
            return info;
        };
        info.state = s.state.to_string();
        if let Some(g) = s.geometry {
            info.size_bytes = g.blocks * u64::from(g.block_size);
            info.block_size = g.block_size;
        }
        let mut all = keel_remote::VolumeLoad {
            queued: s.queued,
            in_flight: s.in_flight,
            counters: s.counters,
        };
        all += elsewhere;
        info.queued = all.queued;
        info.in_flight = all.in_flight;
        info.submitted = all.counters.submitted;
        info.completed = all.counters.completed;
        info.failed = all.counters.failed;
        info.path_errors = all.counters.path_errors;
        info.retries = all.counters.retries;
        info.failovers = all.counters.failovers;
        info.paths = s
            .paths
            .iter()
            .map(|p| keel_mgmt::RemotePathInfo {
                addr: p.addr.to_string(),
                state: p.state.to_string(),
                ana: String::from(match p.ana {
                    None => "",
                    Some(AnaState::Optimized) => "optimized",
                    Some(AnaState::NonOptimized) => "non-optimized",
                    Some(AnaState::Inaccessible) => "inaccessible",
                    Some(AnaState::PersistentLoss) => "persistent-loss",
                    Some(AnaState::Change) => "change",
                }),
                cntlid: p.cntlid,
                io_queues: p.io_queues,
                queue_depth: p.queue_depth,
                in_flight: p.in_flight,
                last_loss: p.last_loss.map(|l| l.to_string()).unwrap_or_default(),
                attempts: p.counters.attempts,
                connects: p.counters.connects,
                losses: p.counters.losses,
                commands: p.counters.commands,
                errors: p.counters.errors,
                aborted: p.counters.aborted,
                keep_alives: p.counters.keep_alives,
            })
            .collect();
        for &(path, _, _, _, commands, in_flight) in lane_queues {
            if let Some(p) = info.paths.get_mut(usize::from(path)) {
                p.commands += commands;
                p.in_flight += in_flight;
            }
        }
        info
    }

    /// Builds the waiting namespaces over the identified remote namespace and adds them to the
    /// target.
    fn serve_waiting<H: Hw>(
        &mut self,
        target: &mut Target,
        plan: &Plan,
        served: &mut Vec<(String, u32)>,
    ) {
        let g = self.vol.geometry();
        for ns in core::mem::take(&mut self.waiting) {
            let name = crate::services::ns_name(plan, &ns);
            let backend = match self.backend_for(&ns.spec) {
                Ok(b) => b,
                Err(e) => {
                    klog::error!(
                        "remote: {}: {}: the namespace is not served",
                        name,
                        klog::D(&e)
                    );
                    continue;
                }
            };
            let Some(cfg) = finish_namespace::<H>(plan, &ns, backend) else {
                continue;
            };
            match target.add_namespace(&ns.subsystem, cfg) {
                Ok(()) => {
                    if let Some(g) = g {
                        klog::info!(
                            "remote: {} served: {} MiB, {}-byte blocks{} (hosts are told by \
                             a Namespace Attribute Changed event)",
                            name,
                            (g.blocks * u64::from(g.block_size)) >> 20,
                            g.block_size,
                            if ns.key.is_some() { ", encrypted" } else { "" }
                        );
                    }
                    self.exports.push((ns.subsystem.clone(), ns.nsid));
                    served.push((ns.subsystem.clone(), ns.nsid));
                }
                Err(e) => {
                    klog::error!(
                        "remote: {}: not added ({}): the namespace is not served",
                        name,
                        klog::Dbg(&e)
                    )
                }
            }
        }
    }

    /// The backend of one namespace of this volume: the volume's own backend when one
    /// namespace uses it whole, else a slice of the shared backend.
    fn backend_for(&mut self, spec: &NsSpec) -> Result<Box<dyn BlockBackend>, String> {
        let NsSpec::Remote { slice, .. } = spec else {
            return Err(format!("{spec}: not a remote backend"));
        };
        if let Use::Unused = self.used {
            let b = self
                .vol
                .backend()
                .ok_or_else(|| String::from("the remote namespace is not identified yet"))?;
            if !self.share {
                self.used = Use::Whole;
                return Ok(Box::new(b));
            }
            self.used = Use::Shared(SharedBackend::new(b, SHARED_DEPTH));
        }
        match &self.used {
            Use::Shared(sb) => cut(sb, *slice, spec),
            _ => Err(format!(
                "{}: already used whole by namespace {:?}: slices of it need a reboot",
                self.remote,
                self.exports.first()
            )),
        }
    }
}
