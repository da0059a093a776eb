//! The storage services: one controller core ([`Target`]) holding every subsystem and
//! namespace, and the transports in front of it: NVMe/TCP and the emulated PCIe functions.
//! Local NVMe drives are backends behind it.
//!
//! The services are built from a [`Plan`] (see [`crate::plan`]): a provisioned bundle's
//! description or the development configuration. Subsystems and namespaces of the
//! development configuration ([`crate::config::DevConfig`]):
//! - the NVMe/TCP subsystem (`keel.nqn`): namespaces from `keel.ns=` if given; otherwise one
//!   per `keel.ram=` size; otherwise one per local drive namespace (whole); otherwise one
//!   RAM namespace of 256 MiB. `keel.xts=NSID:KEY` encrypts one of them with AES-XTS;
//! - one subsystem per emulated function (`nqn.2026-11.dev.keel:fnN`), with one RAM namespace
//!   of `keel.fn.ram` MiB (or the Nth `keel.fn.ns=` spec): a function never reaches another's
//!   data.
//!
//! Namespaces on remote NVMe/TCP subsystems are served by [`crate::remote`] once their remote
//! namespace has been identified (after `keel: ready`), added to the target like a live push.
//!
//! NSIDs are fixed by position (the Nth `keel.ns=` entry is NSID N): a namespace that cannot
//! be served leaves a gap instead of renumbering the ones after it.
//!
//! Every pass of the poll loop: the transports take new commands to the core, the drives ring
//! their doorbells and reap completions, the core delivers completions, and NVMe/TCP flushes
//! its sockets. Each transport opens its core queues with its own owner number (emulated
//! function N, by position, is owner N; NVMe/TCP is [`crate::nvmf::OWNER`]); every event of
//! the core carries the owner recorded for its queue and goes straight to that transport.

use crate::challenge::Challenges;
use crate::config::NsSpec;
use crate::hw::{DriveCtl, Hw, dma_region};
use crate::klog;
use crate::net::{NetStack, SocketCounts};
use crate::nvmf::NvmfService;
use crate::plan::{NsKey, NsPlan, Plan, Source};
use crate::provisioned::Identity;
use crate::remote::RemoteService;
use alloc::{boxed::Box, format, string::String, vec::Vec};
use keel_controller::{
    Event, Instant, Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig,
};
use keel_crypto::{EncryptedBackend, XtsKey};
use keel_mgmt::SlotState;
use keel_nvme_pcie::{EndpointFunction, FunctionConfig, FunctionState, PcieFunction};
use keel_storage::{BlockBackend, BufPool, RamBackend, SharedBackend, SliceBackend};

/// Requests one namespace's backend holds at most between polls.
const BACKEND_DEPTH: usize = 4096;
/// Data buffers of each emulated function (128 KiB each: MDTS).
const FUNCTION_BUFFERS: usize = 64;
const FUNCTION_BUFFER_SIZE: usize = 128 * 1024;
/// Scratch buffers of the controller core (Copy chunks, Write Zeroes on encrypted
/// namespaces): this many Copy / Write Zeroes commands progress at once, the rest wait.
const SCRATCH_BUFFERS: usize = 16;
const SCRATCH_BUFFER_SIZE: usize = 128 * 1024;

/// A namespace of a local drive.
#[derive(Debug)]
pub struct DriveNamespace<N> {
    /// Namespace identifier on the drive.
    pub nsid: u32,
    /// The backend (one per namespace; shared to cut it into slices).
    pub backend: N,
}

/// A local NVMe drive that came up.
pub struct LocalDrive<H: Hw> {
    /// PCI address, e.g. `00:02.0`.
    pub bdf: String,
    /// The controller, polled every pass.
    pub drive: H::DriveCtl,
    /// Active namespaces not yet handed to a namespace of the plan.
    pub namespaces: Vec<DriveNamespace<H::DriveNs>>,
}

impl<H: Hw> core::fmt::Debug for LocalDrive<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LocalDrive")
            .field("bdf", &self.bdf)
            .field("namespaces", &self.namespaces.len())
            .finish_non_exhaustive()
    }
}

impl<H: Hw> LocalDrive<H> {
    /// One pass of the controller: doorbells, completions, timeouts, recovery.
    pub fn poll(&self, now_ns: u64) -> bool {
        self.drive.poll(now_ns)
    }

    /// Commands submitted to the drive and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.drive.outstanding()
    }
}

/// A function slot of the endpoint (one window): free, or an emulated NVMe function (its
/// controller emulation over the endpoint), or a removed one whose buffers are coming back.
pub(crate) struct Emulated<W> {
    /// The slot number (which window).
    pub(crate) index: u16,
    /// The subsystem its function is a controller of (empty when free).
    pub(crate) nqn: String,
    pub(crate) ep: W,
    /// The controller emulation, while live or removing.
    pub(crate) f: Option<PcieFunction>,
    /// A free slot's data buffers, kept for its next function (pools are carved once).
    pub(crate) pool: Option<BufPool>,
    pub(crate) slot: SlotState,
    /// `boot` or `created`.
    pub(crate) origin: &'static str,
    /// The admin queue of the function's controller whose limits were last set (a host that
    /// enables the function again gets a new controller).
    pub(crate) limited: Option<keel_controller::QueueId>,
}

impl<W> Emulated<W> {
    /// The live function, if any.
    pub(crate) fn live(&self) -> Option<&PcieFunction> {
        self.f.as_ref().filter(|_| self.slot == SlotState::Live)
    }
}

/// An emulated function's endpoint as the platform found it: its window's address and size
/// (for the console) and the endpoint.
#[derive(Debug)]
pub struct WindowPort<W> {
    /// Base address of the window.
    pub base: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The endpoint, if it could be opened (else the reason, for the console).
    pub ep: Result<W, String>,
}

/// Everything behind the poll loop's network and endpoint polling.
pub struct Services<H: Hw> {
    pub(crate) target: Target,
    pub(crate) nvmf: Option<NvmfService>,
    pub(crate) functions: Vec<Emulated<H::Window>>,
    pub(crate) drives: Vec<LocalDrive<H>>,
    pub(crate) shared: Shared<H>,
    /// Remote volumes (namespaces on remote NVMe/TCP subsystems).
    pub(crate) remotes: RemoteService,
    /// The configuration in force.
    pub(crate) plan: Plan,
    /// Namespaces of the plan actually served (subsystem, NSID).
    pub(crate) served: Vec<(String, u32)>,
    /// Trust anchor, device key and the flash the configuration lives in.
    pub(crate) identity: Identity<H::Flash>,
    /// Management challenges.
    pub(crate) challenges: Challenges<H>,
    /// The network stack's socket pool as of the last pass (status reports).
    pub(crate) sockets: SocketCounts,
    /// Power cycles, unsafe shutdowns and powered-on time (flash health records).
    pub(crate) health: crate::health::HealthLog,
    /// Each QoS tenant's rate over the last second (status, metrics).
    pub(crate) qos_rates: crate::device::QosRates,
    /// Events of the queues the controller core holds for connections on other cores
    /// ([`crate::nvmf::FORWARD_OWNER`]), for the poll loop to send there.
    pub(crate) forwarded_events: Vec<Event>,
    /// Subsystems whose I/O queues other cores serve themselves (see [`ReplicaSubsystem`]).
    pub(crate) replicable: Vec<ReplicaSubsystem>,
    /// What the other cores' replicas follow of live namespace changes
    /// ([`crate::replica`]).
    pub(crate) replication: crate::replica::Replication,
    /// The split of capped drive domains with the other cores' targets (issue 17), set by
    /// the image when other cores run; `None`: each domain keeps its whole cap here.
    pub(crate) cross_core: Option<crate::shares::CrossCore>,
}

/// Which RAM namespaces are made in shared regions ([`crate::sharedram`]) other cores serve
/// too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamSharing {
    /// None: one core.
    None,
    /// The emulated functions' (other cores serve their I/O queue pairs, `crate::fnq`).
    Functions,
    /// Every one (other cores serve NVMe/TCP too, `crate::percore`).
    All,
}

/// A subsystem other cores can serve I/O queues of from a replica of the controller core
/// (`Target::adopt_io_queue`): all its namespaces are RAM namespaces in shared regions
/// ([`crate::sharedram`]) or namespaces of local drives (each core reaches a drive through
/// an I/O queue pair of its own, [`ReplicaSource::Drive`]), encrypted or not, or unencrypted
/// namespaces of remote volumes (each core through I/O queues of its own to the remote
/// controller, [`ReplicaSource::Remote`]), and no
/// QoS limit applies (limits are enforced where the commands are counted, on one core).
/// Everything in it can move to another core.
#[derive(Debug, Clone)]
pub struct ReplicaSubsystem {
    /// Its NQN, serial, model and allowed hosts (as the controller core has them).
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model.
    pub model: String,
    /// Allowed hosts.
    pub allowed_hosts: Vec<String>,
    /// Its namespaces.
    pub namespaces: Vec<ReplicaNs>,
    /// The QoS groups its namespaces are in (each core's replica has their limiters, whose
    /// limits the cores split: `crate::shares::LimitSharing`).
    pub groups: Vec<keel_controller::QosGroup>,
}

/// A namespace of a [`ReplicaSubsystem`].
#[derive(Debug, Clone)]
pub struct ReplicaNs {
    /// NSID.
    pub nsid: u32,
    /// NGUID (as the controller core reports it).
    pub nguid: [u8; 16],
    /// Its fair share of a drive it shares with other namespaces (weight, domain, commands
    /// at the drive at once), applied among this core's commands; never limits.
    pub qos: keel_controller::NamespaceQos,
    /// Where its blocks are.
    pub source: ReplicaSource,
    /// Its AES-XTS data key when it is encrypted: every core serving it encrypts and
    /// decrypts with its own copy of the key schedule (zeroed when dropped).
    pub key: Option<NsKey>,
}

/// Where the blocks of a [`ReplicaNs`] are.
#[derive(Debug, Clone)]
pub enum ReplicaSource {
    /// A shared RAM region.
    Ram(crate::sharedram::Region),
    /// Local drive `drive`'s namespace `nsid`, whole or a slice (`keel.ns=drive:D[:N][@OFF[+LEN]]`),
    /// reached through the serving core's own queue pair on that drive.
    Drive {
        /// Index of the drive.
        drive: usize,
        /// Namespace on the drive.
        nsid: u32,
        /// Byte offset and length (`None`: to the end), as the plan says.
        slice: Option<(u64, Option<u64>)>,
    },
    /// A namespace of a remote volume, whole or a slice, reached through the serving core's
    /// own I/O queues over the controller core's association (a lane,
    /// `keel_remote::lane`). Not in the replica at first: the remote namespace's size is
    /// known only once core 0 identified it, and core 0 then hands the core its lane
    /// (`crate::percore`), which adds it.
    Remote {
        /// The remote namespace (as described).
        remote: Box<keel_provision::Remote>,
        /// Byte offset and length (`None`: all of it).
        slice: Option<(u64, Option<u64>)>,
    },
}

impl ReplicaSubsystem {
    /// The drives its namespaces are on.
    pub fn drives(&self) -> impl Iterator<Item = usize> + '_ {
        self.namespaces.iter().filter_map(|n| match n.source {
            ReplicaSource::Drive { drive, .. } => Some(drive),
            ReplicaSource::Ram(_) | ReplicaSource::Remote { .. } => None,
        })
    }
}

impl<H: Hw> core::fmt::Debug for Services<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Services")
            .field("functions", &self.functions.len())
            .field("drives", &self.drives.len())
            .finish_non_exhaustive()
    }
}

/// Heap kept free when a RAM namespace is made (buffers, connections, later pushes).
const HEAP_RESERVE: u64 = 32 << 20;

fn ram<H: Hw>(bytes: u64, block_size: u32) -> Option<Box<dyn BlockBackend>> {
    let free = H::heap_free() as u64;
    if bytes.saturating_add(HEAP_RESERVE) > free {
        klog::error!(
            "storage: RAM namespace of {} MiB does not fit the free heap ({} MiB, {} MiB kept in reserve)",
            bytes >> 20,
            free >> 20,
            HEAP_RESERVE >> 20
        );
        return None;
    }
    match RamBackend::new(block_size, bytes / u64::from(block_size), BACKEND_DEPTH) {
        Ok(r) => Some(Box::new(r)),
        Err(e) => {
            klog::error!(
                "storage: RAM namespace of {} MiB: {}",
                bytes >> 20,
                klog::D(&e)
            );
            None
        }
    }
}

/// Drive namespaces cut into slices (or used by several namespaces): shared, so live pushes
/// can cut new slices from them.
pub(crate) type Shared<H> = Vec<((usize, u32), SharedBackend<<H as Hw>::DriveNs>)>;

/// Builds one namespace's backend. `many`: the drive namespace is used by several namespaces
/// (or as a slice) and must be shared. Drive namespaces used whole are taken out of `drives`.
pub(crate) fn make_backend<H: Hw>(
    spec: &NsSpec,
    block_size: u32,
    many: bool,
    drives: &mut [LocalDrive<H>],
    shared: &mut Shared<H>,
) -> Result<Box<dyn BlockBackend>, String> {
    let (drive, nsid, slice) = match spec {
        NsSpec::Ram(bytes) => {
            return ram::<H>(*bytes, block_size)
                .ok_or_else(|| format!("RAM namespace of {} MiB", bytes >> 20));
        }
        NsSpec::Drive { drive, nsid, slice } => (drive, nsid, slice),
        NsSpec::Remote { .. } => {
            return Err(format!(
                "{spec}: a remote backend is opened by the remote service"
            ));
        }
    };
    let (drive, nsid, slice) = (*drive, *nsid, *slice);
    let many = many || slice.is_some() || shared.iter().any(|(k, _)| *k == (drive, nsid));
    let Some(d) = drives.get_mut(drive) else {
        return Err(format!("no drive {drive} for namespace spec {spec}"));
    };
    if !many {
        return match d.namespaces.iter().position(|n| n.nsid == nsid) {
            Some(i) => Ok(Box::new(d.namespaces.swap_remove(i).backend)),
            None => Err(format!(
                "drive {drive} has no namespace {nsid} (or it is already used)"
            )),
        };
    }
    if !shared.iter().any(|(k, _)| *k == (drive, nsid)) {
        match d.namespaces.iter().position(|n| n.nsid == nsid) {
            Some(i) => {
                let ns = d.namespaces.swap_remove(i);
                shared.push(((drive, nsid), SharedBackend::new(ns.backend, BACKEND_DEPTH)));
            }
            None => {
                return Err(format!(
                    "drive {drive} has no namespace {nsid} (or it is used whole)"
                ));
            }
        }
    }
    let Some((_, sb)) = shared.iter().find(|(k, _)| *k == (drive, nsid)) else {
        return Err(format!("drive {drive} namespace {nsid}: not shared"));
    };
    cut(sb, slice, spec)
}

/// A slice of a shared backend (`None`: all of it) as a backend of its own; `spec` names it
/// in messages.
pub(crate) fn cut<B: BlockBackend + 'static>(
    sb: &SharedBackend<B>,
    slice: Option<(u64, Option<u64>)>,
    spec: &NsSpec,
) -> Result<Box<dyn BlockBackend>, String> {
    let handle = sb
        .handle()
        .map_err(|_| format!("{spec}: too many slices"))?;
    let g = handle.geometry();
    let (start, blocks) = match slice {
        Some((off, len)) => (
            off / u64::from(g.block_size),
            len.map_or(
                g.blocks.saturating_sub(off / u64::from(g.block_size)),
                |l| l / u64::from(g.block_size),
            ),
        ),
        None => (0, g.blocks),
    };
    SliceBackend::new(handle, start, blocks)
        .map(|s| Box::new(s) as Box<dyn BlockBackend>)
        .map_err(|e| format!("{spec}: {e}"))
}

/// Wraps `backend` in AES-XTS when `key` is given; `what` names the namespace in messages.
/// Never logs key material.
pub(crate) fn encrypt<H: Hw>(
    what: &str,
    key: Option<&NsKey>,
    backend: Box<dyn BlockBackend>,
) -> Option<Box<dyn BlockBackend>> {
    let Some(k) = key else {
        return Some(backend);
    };
    if !H::has_aes() {
        klog::error!(
            "crypto: {} is configured encrypted but this CPU has no AES/PMULL \
             instructions (ID_AA64ISAR0_EL1.AES < 2): the namespace is not served",
            what
        );
        return None;
    }
    let (key, origin) = xts_key(k);
    match key {
        Ok(key) => {
            klog::info!(
                "crypto: {} encrypted with {} (key from {})",
                what,
                key.cipher().name(),
                origin
            );
            Some(Box::new(EncryptedBackend::new(
                backend,
                &key,
                BACKEND_DEPTH,
            )))
        }
        Err(e) => {
            klog::error!(
                "crypto: {}: {}: the namespace is not served",
                what,
                klog::D(&e)
            );
            None
        }
    }
}

/// The XTS key of a namespace key, and where it came from (for messages).
fn xts_key(k: &NsKey) -> (Result<XtsKey, keel_crypto::KeyError>, &'static str) {
    match k {
        NsKey::Hex(hex) => (XtsKey::from_hex(hex), "boot arguments"),
        NsKey::Bytes(b) => (XtsKey::new(b.expose_secret()), "the provisioned bundle"),
    }
}

/// How a namespace is named in console messages: as before provisioning for the development
/// configuration (`namespace 2`, `function 0 namespace 1`), with its subsystem otherwise.
pub(crate) fn ns_name(plan: &Plan, ns: &NsPlan) -> String {
    match (&plan.source, ns.function) {
        (Source::BootArgs, Some(f)) => format!("function {f} namespace {}", ns.nsid),
        (Source::BootArgs, None) => format!("namespace {}", ns.nsid),
        _ => format!("namespace {} of {}", ns.nsid, ns.subsystem),
    }
}

/// Builds a namespace of the plan: backend, encryption, identifiers. `many`: see
/// [`make_backend`]. Logs what it serves or why not.
pub(crate) fn build_namespace<H: Hw>(
    plan: &Plan,
    ns: &NsPlan,
    many: bool,
    drives: &mut [LocalDrive<H>],
    shared: &mut Shared<H>,
) -> Option<NamespaceConfig> {
    let backend = match make_backend(&ns.spec, ns.block_size, many, drives, shared) {
        Ok(b) => b,
        Err(e) => {
            klog::error!(
                "storage: {}: {}: the namespace is not served",
                ns_name(plan, ns),
                klog::D(&e)
            );
            return None;
        }
    };
    finish_namespace::<H>(plan, ns, backend)
}

/// A namespace of the plan from its backend: encryption, identifiers. Logs what it serves.
pub(crate) fn finish_namespace<H: Hw>(
    plan: &Plan,
    ns: &NsPlan,
    backend: Box<dyn BlockBackend>,
) -> Option<NamespaceConfig> {
    let name = ns_name(plan, ns);
    let backend = encrypt::<H>(&name, ns.key.as_ref(), backend)?;
    let g = backend.geometry();
    if ns.function.is_none() || plan.source != Source::BootArgs {
        klog::info!(
            "nvmf: {} = {}: {} MiB, {}-byte blocks{}",
            name,
            klog::D(&ns.spec),
            (g.blocks * u64::from(g.block_size)) >> 20,
            g.block_size,
            if ns.key.is_some() { ", encrypted" } else { "" }
        );
    }
    Some(NamespaceConfig {
        nsid: ns.nsid,
        backend,
        nguid: plan.nguid_of(ns),
        uuid: [0; 16],
        eui64: [0; 8],
        qos: plan.namespace_qos(ns),
    })
}

/// Brings a function up on slot `e`: a controller emulation of subsystem `nqn` over the
/// slot's buffers (carved on its first function), the window's pages cleared, CAP and VS
/// written, then the header a host waits for. The slot is then live.
pub(crate) fn start_function<H: Hw>(
    e: &mut Emulated<H::Window>,
    owner: u16,
    nqn: &str,
    target: &mut Target,
) -> Result<(), String> {
    let i = e.index;
    let pool = match e.pool.take() {
        Some(p) => p,
        None => {
            let region = dma_region(FUNCTION_BUFFERS * FUNCTION_BUFFER_SIZE);
            let dma = region.as_ptr() as u64;
            BufPool::lazy(region, dma, FUNCTION_BUFFER_SIZE).map_err(|e| {
                klog::error!("pcie-fn{}: buffers: {}", i, klog::D(&e));
                format!("slot {i}: no buffers for the function ({e})")
            })?
        }
    };
    let cfg = FunctionConfig {
        owner,
        ..FunctionConfig::new(nqn)
    };
    let mut f = match PcieFunction::new(cfg, pool) {
        Ok(f) => f,
        Err(err) => {
            klog::error!("pcie-fn{}: {}", i, klog::Dbg(&err));
            return Err(format!("slot {i}: {err}"));
        }
    };
    // Registers first (the function's first poll writes CAP and VS), then the header a host
    // waits for.
    e.ep.reset_pages();
    f.poll(Instant::from_nanos(H::now_ns()), target, &mut e.ep);
    e.ep.publish(i);
    e.f = Some(f);
    e.nqn = String::from(nqn);
    e.slot = SlotState::Live;
    e.limited = None;
    Ok(())
}

impl<H: Hw> Services<H> {
    /// Core `core` could not serve the namespaces of remote volume `id` through its lane
    /// (`crate::percore::Msg::RemoteReady` with `ok: false`; `pushed`: the volume came with
    /// a push; `round`: the namespaces a push added on it while it ran). Only the subsystems
    /// concerned fall back to core 0 when the volume was pushed or grew; for a volume of the
    /// boot configuration, returns true: the holder ends every adopted queue and serves the
    /// later ones itself. Either way the emulated functions on the volume's namespaces bring
    /// their I/O queue pairs home (`crate::fnq::Hub`): that core's functions' replica may
    /// lack the namespaces, and the subsystems on it are no longer adopted.
    pub(crate) fn lane_refused(
        &mut self,
        id: u32,
        core: u16,
        pushed: bool,
        round: Vec<(String, u32)>,
    ) -> bool {
        let Some(v) = self.remotes.volumes.iter_mut().find(|v| v.id == id) else {
            klog::error!(
                "percore: core {} could not serve a remote volume's namespaces: I/O queues adopted by other cores end; new ones are served through core 0",
                core
            );
            return true;
        };
        if !round.is_empty() {
            // Namespaces a push added on a running volume: only their subsystems fall back.
            klog::error!(
                "percore: core {} could not add the new namespaces of remote {}: their subsystems' I/O queues are served through core 0",
                core,
                klog::D(&v.remote)
            );
            v.lane_users.retain(|u| !round.contains(u));
            for (nqn, _) in round {
                self.replication.drop_subsystem(&nqn);
            }
            false
        } else {
            if pushed {
                // A pushed volume: only the subsystems using it fall back.
                klog::error!(
                    "percore: core {} could not serve the namespaces of remote {}: their subsystems' I/O queues are served through core 0",
                    core,
                    klog::D(&v.remote)
                );
            } else {
                klog::error!(
                    "percore: core {} could not serve a remote volume's namespaces: I/O queues adopted by other cores end; new ones are served through core 0",
                    core
                );
            }
            for (nqn, _) in core::mem::take(&mut v.lane_users) {
                self.replication.drop_subsystem(&nqn);
            }
            !pushed
        }
    }

    /// Builds the target, the transports and the namespaces of `plan` on `drives`; one
    /// emulated function per window the plan attaches to a subsystem.
    #[cfg(test)]
    pub fn build(
        plan: Plan,
        drives: Vec<LocalDrive<H>>,
        windows: Vec<WindowPort<H::Window>>,
        network: bool,
        identity: Identity<H::Flash>,
    ) -> Services<H> {
        Self::build_with(plan, drives, windows, network, identity, RamSharing::None)
    }

    /// [`Services::build`]; `share_ram`: which RAM namespaces live in shared regions other cores
    /// can serve too, and [`Services::replicable`] lists the subsystems they can serve.
    pub fn build_with(
        plan: Plan,
        mut drives: Vec<LocalDrive<H>>,
        windows: Vec<WindowPort<H::Window>>,
        network: bool,
        identity: Identity<H::Flash>,
        share_ram: RamSharing,
    ) -> Services<H> {
        let mut shared: Shared<H> = Vec::new();
        let mut regions: Vec<(String, u32, crate::sharedram::Region, [u8; 16])> = Vec::new();
        let uses = |d: usize, n: u32| {
            plan.namespaces
                .iter()
                .filter(|s| matches!(s.spec, NsSpec::Drive { drive, nsid, .. } if drive == d && nsid == n))
                .count()
        };
        let mut subsystems: Vec<SubsystemConfig> = plan
            .subsystems
            .iter()
            .map(|s| SubsystemConfig {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allowed_hosts: s.allowed_hosts.clone(),
                namespaces: Vec::new(),
            })
            .collect();
        let mut served = Vec::new();
        let mut remotes = RemoteService::new(plan.mac);
        for ns in &plan.namespaces {
            let many = match &ns.spec {
                NsSpec::Drive { drive, nsid, .. } => uses(*drive, *nsid) > 1,
                NsSpec::Ram(_) => false,
                NsSpec::Remote { remote, .. } => {
                    // Served once the remote namespace is identified (Services::poll).
                    if !network {
                        klog::error!(
                            "remote: {}: no network: the namespace is not served",
                            ns_name(&plan, ns)
                        );
                        continue;
                    }
                    let users = plan
                        .namespaces
                        .iter()
                        .filter(|o| matches!(&o.spec, NsSpec::Remote { remote: r, .. } if r.same_target(remote)))
                        .count();
                    remotes.add(&plan, ns, users > 1);
                    continue;
                }
            };
            // An encrypted namespace's region holds ciphertext: every core serving it wraps
            // it in its own AES-XTS backend with the same key.
            let shareable = match share_ram {
                RamSharing::All => true,
                RamSharing::Functions => ns.function.is_some(),
                RamSharing::None => false,
            };
            let cfg = match &ns.spec {
                NsSpec::Ram(bytes) if shareable => {
                    shared_ram_namespace::<H>(&plan, ns, *bytes, &mut regions)
                }
                _ => build_namespace(&plan, ns, many, &mut drives, &mut shared),
            };
            let Some(cfg) = cfg else {
                continue;
            };
            if let Some(s) = subsystems.iter_mut().find(|s| s.nqn == ns.subsystem) {
                s.namespaces.push(cfg);
                served.push((ns.subsystem.clone(), ns.nsid));
            }
        }

        // Emulated functions: one per window, each a controller of the subsystem the plan
        // attaches it to (see crate::plan).
        let fn_nqns: Vec<Option<String>> = (0..windows.len())
            .map(|i| plan.function_subsystem(i as u16).map(String::from))
            .collect();

        let limits = Limits {
            max_queue_depth: 256,
            max_controllers: 16 + windows.len(),
            max_queues: 16 * 9 + 16 + windows.len() * 10,
            ..Limits::default()
        };
        let region = dma_region(SCRATCH_BUFFERS * SCRATCH_BUFFER_SIZE);
        let scratch = BufPool::lazy(region, region.as_ptr() as u64, SCRATCH_BUFFER_SIZE)
            .map_err(|e| {
                klog::error!(
                    "core: scratch buffers: {}: no Copy, no Write Zeroes on encrypted namespaces",
                    klog::D(&e)
                )
            })
            .ok();
        let mut target = match Target::new(TargetConfig {
            subsystems,
            limits,
            scratch,
            qos_groups: plan.qos_groups(),
            host_qos: plan.host_qos(),
            ..Default::default()
        }) {
            Ok(t) => t,
            Err(e) => {
                klog::error!(
                    "core: configuration refused: {}; serving an empty target",
                    klog::D(&e)
                );
                served.clear();
                Target::new(TargetConfig::default()).expect("the empty configuration is valid")
            }
        };
        // The SMART / Health log counts every core's commands (`crate::cores::NS_SHARES`).
        target.set_stats_elsewhere(H::namespace_elsewhere);

        let mut functions = Vec::new();
        for (i, (bar, nqn)) in windows.into_iter().zip(fn_nqns).enumerate() {
            let ep = match bar.ep {
                Ok(ep) => ep,
                Err(e) => {
                    klog::error!("pcie-fn{}: {}", i, klog::D(&e));
                    continue;
                }
            };
            let mut e = Emulated {
                index: i as u16,
                nqn: String::new(),
                ep,
                f: None,
                pool: None,
                slot: SlotState::Free,
                origin: "boot",
                limited: None,
            };
            let Some(nqn) = nqn else {
                // Its window stays blank (also of a header an earlier run left): the host sees
                // no function until one is created.
                e.ep.reset_pages();
                e.ep.unpublish();
                klog::info!(
                    "pcie-fn{}: slot free (window {:#x}+{} MiB): no function until one is created (keelctl function create --slot {})",
                    i,
                    bar.base,
                    bar.size >> 20,
                    i
                );
                functions.push(e);
                continue;
            };
            // Its position in `functions` is its owner number (see `route`).
            let owner = functions.len() as u16;
            if start_function::<H>(&mut e, owner, &nqn, &mut target).is_ok() {
                let what = if plan.source == Source::BootArgs {
                    let specs: Vec<String> = plan
                        .namespaces
                        .iter()
                        .filter(|n| n.subsystem == nqn)
                        .map(|n| match &n.spec {
                            NsSpec::Ram(b) => format!("{} MiB RAM namespace", b >> 20),
                            other => format!("namespace {other}"),
                        })
                        .collect();
                    specs.join(", ")
                } else {
                    let n = served.iter().filter(|(q, _)| *q == nqn).count();
                    format!("a controller of its {n} namespace(s)")
                };
                klog::info!(
                    "pcie-fn{}: emulated NVMe function on window {:#x}+{} MiB, subsystem {}, {}",
                    i,
                    bar.base,
                    bar.size >> 20,
                    nqn,
                    what
                );
            }
            functions.push(e);
        }

        let nvmf = if network {
            NvmfService::new(plan.advertise.clone())
                .map_err(|e| klog::error!("nvmf: buffers: {}", klog::D(&e)))
                .ok()
        } else {
            None
        };
        let challenges = Challenges::new(identity.device_key.as_ref());
        let mut identity = identity;
        let (health, device_health) =
            crate::health::HealthLog::boot(identity.flash.as_mut(), H::now_ns());
        target.set_health(device_health);
        let replicable = if share_ram != RamSharing::None {
            let core_queues: Vec<bool> = drives.iter().map(|d| d.drive.core_queues() > 0).collect();
            replicable(&plan, &regions, &served, &core_queues)
        } else {
            Vec::new()
        };
        Services {
            target,
            nvmf,
            functions,
            drives,
            shared,
            remotes,
            plan,
            served,
            identity,
            challenges,
            sockets: SocketCounts::default(),
            health,
            qos_rates: Default::default(),
            forwarded_events: Vec::with_capacity(64),
            replicable,
            replication: crate::replica::Replication::new(share_ram == RamSharing::All),
            cross_core: None,
        }
    }

    /// The configuration in force.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the NVMe/TCP service runs.
    pub fn serves_tcp(&self) -> bool {
        self.nvmf.is_some()
    }

    /// The subsystems of live emulated functions whose I/O queue pairs other cores can
    /// serve (`crate::fnq`): replicable ones ([`Services::replicable`]) whose namespaces are
    /// all RAM in shared regions or namespaces of local drives (each core serving pairs
    /// gets a queue pair of its own on the drive; `fnq::Hub::start` keeps a subsystem on
    /// core 0 if some core got none) or namespaces of remote volumes when every other core
    /// has a lane of them (its NVMe/TCP plane serves the subsystem, `crate::percore`: the
    /// functions' replica there shares the plane's lane).
    pub fn function_replicas(&self) -> Vec<ReplicaSubsystem> {
        let laned = |nqn: &str| {
            self.replication.lanes > 0 && self.replication.subsystems.iter().any(|s| s == nqn)
        };
        self.replicable
            .iter()
            .filter(|s| {
                self.functions
                    .iter()
                    .any(|e| e.slot == SlotState::Live && e.nqn == s.nqn)
                    && s.namespaces.iter().all(|n| match n.source {
                        ReplicaSource::Ram(_) | ReplicaSource::Drive { .. } => true,
                        ReplicaSource::Remote { .. } => laned(&s.nqn),
                    })
            })
            .cloned()
            .collect()
    }

    /// Number of live emulated functions.
    pub fn functions(&self) -> usize {
        self.functions
            .iter()
            .filter(|e| e.slot == SlotState::Live)
            .count()
    }

    /// One pass; returns whether anything happened.
    pub fn poll(&mut self, now_ns: u64, net: Option<&mut NetStack<H>>) -> bool {
        let now = Instant::from_nanos(now_ns);
        let mut busy = false;
        let Self {
            target,
            nvmf,
            functions,
            drives,
            remotes,
            plan,
            served,
            health,
            identity,
            qos_rates,
            replication,
            cross_core,
            ..
        } = self;
        health.tick(identity.flash.as_mut(), now_ns);
        qos_rates.tick::<H>(now_ns, target);
        for e in functions.iter_mut() {
            let Some(f) = e.f.as_mut() else { continue };
            match e.slot {
                SlotState::Live => {
                    busy |= f.poll(now, target, &mut e.ep);
                    let admin = f.admin_queue();
                    if admin != e.limited {
                        e.limited = admin;
                        if let Some(a) = admin {
                            let _ = target.set_controller_limits(a, plan.function_limits(e.index));
                        }
                    }
                }
                // A removed function's window is never touched again; once every buffer it
                // had at a backend is home and every I/O queue pair another core served is
                // back, the slot is free for the next one.
                SlotState::Removing
                    if f.buffers_available() == f.buffers_total() && f.abroad() == 0 =>
                {
                    if let Some(f) = e.f.take() {
                        e.pool = Some(f.into_pool());
                    }
                    e.slot = SlotState::Free;
                    klog::info!("pcie-fn{}: slot free", e.index);
                    busy = true;
                }
                SlotState::Removing | SlotState::Free => {}
            }
        }
        let mut net = net;
        if let (Some(s), Some(n)) = (nvmf.as_mut(), net.as_deref_mut()) {
            busy |= s.poll(now_ns, n, target);
        }
        for d in drives.iter() {
            busy |= d.poll(now_ns);
        }
        if let Some(n) = net.as_deref_mut() {
            busy |= remotes.poll(now_ns, n, target, plan, served, replication);
        }
        // Commands taken in: this core's part of each capped drive domain, then start them.
        let tended = cross_core.as_mut().is_some_and(|x| x.tend(now_ns, target));
        let fwd = &mut self.forwarded_events;
        busy |= target.poll(now, &mut |ev| {
            if ev.owner() == crate::nvmf::FORWARD_OWNER {
                fwd.push(ev);
            } else {
                route(ev, functions, nvmf.as_mut())
            }
        }) > 0;
        // What it started is in flight for the other cores' next parts.
        if let Some(x) = cross_core.as_mut() {
            x.publish(tended, now_ns, target);
        }
        if let Some(n) = net {
            if let Some(s) = nvmf.as_mut() {
                s.flush(n);
            }
            self.sockets = n.counts();
        }
        busy
    }

    /// When the services' timers next need a pass (the remote volumes' keep alive,
    /// reconnects and timeouts); `None`: nothing is timed.
    pub fn next_deadline(&self) -> Option<u64> {
        self.remotes.next_deadline()
    }

    /// Nanoseconds from `now_ns` until a command held back only by its QoS limits may start
    /// (`None`: none is waiting for its limits); the poll loop sleeps no longer than this.
    pub fn qos_wakeup_in(&mut self, now_ns: u64) -> Option<u64> {
        self.target
            .next_wakeup(Instant::from_nanos(now_ns))
            .map(|t| t.as_nanos().saturating_sub(now_ns))
    }

    /// Whether the core may sleep: no emulated function is live (their host writes doorbells
    /// in memory, which raises no interrupt) and no drive has commands outstanding (drive
    /// completions raise no interrupt either).
    pub fn may_sleep(&self) -> bool {
        self.functions.iter().all(|e| {
            e.slot != SlotState::Live
                || e.f
                    .as_ref()
                    .is_none_or(|f| f.state() == FunctionState::Disabled)
        }) && self.drives.iter().all(|d| d.outstanding() == 0)
    }
}

/// A RAM namespace of the plan in a shared region ([`crate::sharedram`]), recorded in
/// `regions` for the other cores.
pub(crate) fn shared_ram_namespace<H: Hw>(
    plan: &Plan,
    ns: &NsPlan,
    bytes: u64,
    regions: &mut Vec<(String, u32, crate::sharedram::Region, [u8; 16])>,
) -> Option<NamespaceConfig> {
    let free = H::heap_free() as u64;
    let region = if bytes.saturating_add(HEAP_RESERVE) > free {
        None
    } else {
        crate::sharedram::Region::new(ns.block_size, bytes / u64::from(ns.block_size))
    };
    let Some(region) = region else {
        klog::error!(
            "storage: {}: RAM namespace of {} MiB does not fit the free heap ({} MiB, {} MiB kept in reserve) or has a bad size: the namespace is not served",
            ns_name(plan, ns),
            bytes >> 20,
            free >> 20,
            HEAP_RESERVE >> 20
        );
        return None;
    };
    let cfg = finish_namespace::<H>(plan, ns, Box::new(region.handle(BACKEND_DEPTH)))?;
    regions.push((ns.subsystem.clone(), ns.nsid, region, cfg.nguid));
    Some(cfg)
}

/// The groups of `groups` (a plan's) that some of `namespaces` is in: those a replica of
/// their subsystem has.
pub(crate) fn groups_of(
    groups: &[keel_controller::QosGroup],
    namespaces: &[ReplicaNs],
) -> Vec<keel_controller::QosGroup> {
    groups
        .iter()
        .filter(|g| {
            namespaces
                .iter()
                .any(|n| n.qos.group.as_ref() == Some(&g.name))
        })
        .cloned()
        .collect()
}

/// The subsystems of `plan` every core can serve (see [`ReplicaSubsystem`]): every namespace
/// of the plan in them is served and is a RAM namespace in a shared region or a namespace of
/// a drive that has queue pairs for the other cores (`core_queues[drive]`), encrypted or not
/// (each core gets the key). QoS limits do not stop it: a namespace's own limits and its
/// group's are in every core's replica, a controller's (its host's, `[[qos.host]]`, or its
/// emulated function's, `[[qos.function]]`) come with each queue adopted
/// (`keel_controller::Adoption::limits`), and each core takes its part of them by demand
/// once a pass (`crate::shares::LimitSharing`).
fn replicable(
    plan: &Plan,
    regions: &[(String, u32, crate::sharedram::Region, [u8; 16])],
    served: &[(String, u32)],
    core_queues: &[bool],
) -> Vec<ReplicaSubsystem> {
    let source = |n: &NsPlan| -> Option<ReplicaSource> {
        // A namespace's, a group's and a controller's limits (a function's too) are split
        // across the cores (`crate::shares::LimitSharing`); a drive's fair sharing among its
        // slices (weight, domain, drive_max_inflight) is not a limit and applies per core.
        if let NsSpec::Remote { remote, slice } = &n.spec {
            // Served later, once identified (by then on every core first: `crate::percore`).
            return Some(ReplicaSource::Remote {
                remote: remote.clone(),
                slice: *slice,
            });
        }
        if !served
            .iter()
            .any(|(q, id)| *q == n.subsystem && *id == n.nsid)
        {
            return None;
        }
        match n.spec {
            NsSpec::Ram(_) => regions
                .iter()
                .find(|r| r.0 == n.subsystem && r.1 == n.nsid)
                .map(|r| ReplicaSource::Ram(r.2.clone())),
            NsSpec::Drive { drive, nsid, slice } => core_queues
                .get(drive)
                .copied()
                .unwrap_or(false)
                .then_some(ReplicaSource::Drive { drive, nsid, slice }),
            NsSpec::Remote { .. } => None,
        }
    };
    plan.subsystems
        .iter()
        .filter_map(|s| {
            let namespaces = plan
                .namespaces
                .iter()
                .filter(|n| n.subsystem == s.nqn)
                .map(|n| {
                    Some(ReplicaNs {
                        nsid: n.nsid,
                        nguid: plan.nguid_of(n),
                        source: source(n)?,
                        qos: plan.namespace_qos(n),
                        key: n.key.clone(),
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let groups = groups_of(&plan.qos_groups(), &namespaces);
            Some(ReplicaSubsystem {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allowed_hosts: s.allowed_hosts.clone(),
                namespaces,
                groups,
            })
        })
        .collect()
}

/// A replica namespace's backend, wrapped in its cipher when it is encrypted: the same key
/// over the same blocks as on the controller core (which checked the key and the CPU's AES
/// instructions before serving the namespace). `None` (said on the console) if the key is
/// unusable.
pub(crate) fn replica_cipher(
    n: &ReplicaNs,
    backend: Box<dyn BlockBackend>,
) -> Option<Box<dyn BlockBackend>> {
    match &n.key {
        None => Some(backend),
        Some(k) => {
            let key = xts_key(k)
                .0
                .map_err(|e| klog::error!("percore: namespace {}: {}", n.nsid, klog::D(&e)))
                .ok()?;
            Some(Box::new(EncryptedBackend::new(
                backend,
                &key,
                BACKEND_DEPTH,
            )))
        }
    }
}

/// Requests one namespace's handle holds between polls on a core serving a replica.
const REPLICA_DEPTH: usize = 1024;
/// Scratch buffers (Copy) of a replica, and their size.
const REPLICA_SCRATCH: usize = 4;
const REPLICA_SCRATCH_SIZE: usize = 128 * 1024;

/// A drive namespace a replica cuts into slices.
type ReplicaShared = SharedBackend<Box<dyn BlockBackend>>;

/// The drive namespaces a replica shares among slices, by (drive, NSID); kept by the core so
/// that a slice added live is cut from the same one.
pub(crate) type ReplicaShares = Vec<((usize, u32), ReplicaShared)>;

/// Opens a drive namespace for a replica (`drive`, NSID) through the core's own queue pair.
pub(crate) type DriveOpener<'a> = dyn FnMut(usize, u32) -> Option<Box<dyn BlockBackend>> + 'a;

/// A replica target over the subsystems every core can serve. `drive(d, nsid)` opens
/// drive `d`'s namespace `nsid` whole through the calling core's own queue pair on it
/// (`None`: the core has none, and the replica is not built).
#[cfg(test)]
pub(crate) fn replica_target(
    subsystems: Vec<ReplicaSubsystem>,
    limits: Limits,
    drive: &mut DriveOpener<'_>,
) -> Option<Target> {
    replica_target_shares(subsystems, limits, drive).map(|(t, _)| t)
}

/// [`replica_target`], with the drive namespaces it shares among slices (for namespaces
/// added later, [`apply_replica_change`]).
pub(crate) fn replica_target_shares(
    subsystems: Vec<ReplicaSubsystem>,
    limits: Limits,
    drive: &mut DriveOpener<'_>,
) -> Option<(Target, ReplicaShares)> {
    let region = dma_region(REPLICA_SCRATCH * REPLICA_SCRATCH_SIZE);
    let scratch = BufPool::lazy(region, region.as_ptr() as u64, REPLICA_SCRATCH_SIZE).ok();
    // Drive namespaces used by several namespaces or as slices are shared and cut, as on the
    // controller core (`make_backend`).
    let uses = |d: usize, id: u32| {
        subsystems
            .iter()
            .flat_map(|s| &s.namespaces)
            .filter(|n| matches!(n.source, ReplicaSource::Drive { drive, nsid, .. } if drive == d && nsid == id))
            .count()
    };
    let mut shared: ReplicaShares = Vec::new();
    let mut configs = Vec::new();
    let mut qos_groups: Vec<keel_controller::QosGroup> = Vec::new();
    for g in subsystems.iter().flat_map(|s| &s.groups) {
        if !qos_groups.iter().any(|x| x.name == g.name) {
            qos_groups.push(g.clone());
        }
    }
    for s in &subsystems {
        let mut namespaces = Vec::new();
        for n in &s.namespaces {
            let whole = match n.source {
                // Added when core 0 hands this core the remote volume's lane.
                ReplicaSource::Remote { .. } => continue,
                ReplicaSource::Ram(_) => true,
                ReplicaSource::Drive { drive, nsid, slice } => {
                    slice.is_none() && uses(drive, nsid) == 1
                }
            };
            namespaces.push(replica_namespace(n, whole, &mut shared, drive)?);
        }
        configs.push(SubsystemConfig {
            nqn: s.nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allowed_hosts: s.allowed_hosts.clone(),
            namespaces,
        });
    }
    Target::new(TargetConfig {
        subsystems: configs,
        limits,
        scratch,
        qos_groups,
        ..Default::default()
    })
    .map_err(|e| klog::error!("percore: replica refused: {}", klog::D(&e)))
    .ok()
    .map(|t| (t, shared))
}

/// A RAM or drive namespace of a replica (`whole`: a drive namespace used whole, else cut
/// from its shared backend in `shared`), encrypted as on the controller core; `None` (said on
/// the console) if it cannot be made.
fn replica_namespace(
    n: &ReplicaNs,
    whole: bool,
    shared: &mut ReplicaShares,
    drive: &mut DriveOpener<'_>,
) -> Option<NamespaceConfig> {
    let backend: Box<dyn BlockBackend> = match n.source {
        ReplicaSource::Remote { .. } => return None,
        ReplicaSource::Ram(ref region) => Box::new(region.handle(REPLICA_DEPTH)),
        ReplicaSource::Drive { drive: d, nsid, .. } if whole => drive(d, nsid)?,
        ReplicaSource::Drive {
            drive: d,
            nsid,
            slice,
        } => {
            if !shared.iter().any(|(k, _)| *k == (d, nsid)) {
                shared.push((
                    (d, nsid),
                    SharedBackend::new(drive(d, nsid)?, BACKEND_DEPTH),
                ));
            }
            let sb = &shared.iter().find(|(k, _)| *k == (d, nsid))?.1;
            let spec = NsSpec::Drive {
                drive: d,
                nsid,
                slice,
            };
            cut(sb, slice, &spec)
                .map_err(|e| klog::error!("percore: {}", klog::D(&e)))
                .ok()?
        }
    };
    let backend = replica_cipher(n, backend)?;
    Some(NamespaceConfig {
        nsid: n.nsid,
        backend,
        nguid: n.nguid,
        uuid: [0; 16],
        eui64: [0; 8],
        qos: n.qos.clone(),
    })
}

/// Applies a live namespace change core 0 sent ([`crate::replica`]) to a replica target
/// (`shared`: its drive namespaces shared among slices; `drive` opens one through the
/// core's own queue pair). A drive namespace is used whole unless it is a slice or already
/// shared, as core 0 decides (`make_backend`); a namespace in a QoS group the replica lacks
/// brings the group's definition, added first. Returns whether it was applied.
pub(crate) fn apply_replica_change(
    target: &mut Target,
    shared: &mut ReplicaShares,
    change: &crate::replica::ReplicaChange,
    drive: &mut DriveOpener<'_>,
) -> bool {
    use crate::replica::ReplicaOp;
    match &change.op {
        ReplicaOp::Remove(nsid) => target.remove_namespace(&change.subsystem, *nsid).is_ok(),
        ReplicaOp::Retire => target.remove_subsystem(&change.subsystem).is_ok(),
        ReplicaOp::Qos(q) => apply_replica_qos(target, &change.subsystem, q),
        ReplicaOp::Add { ns: n, group } => {
            let Some(cfg) = live_replica_namespace(n, shared, drive) else {
                return false;
            };
            // Its group first (a group new in the push, or one none of its namespaces used
            // yet), as core 0 has it: limited under the same key as on core 0.
            if let Some(g) = group {
                set_replica_group(target, g);
            }
            match target.add_namespace(&change.subsystem, cfg) {
                Ok(()) => true,
                Err(e) => {
                    klog::error!(
                        "percore: namespace {} of {}: {}",
                        n.nsid,
                        change.subsystem,
                        klog::Dbg(&e)
                    );
                    false
                }
            }
        }
    }
}

/// Gives a replica target QoS group `g` as core 0 has it after a push: added (full buckets)
/// when it lacks it, its limits and weight set when it has it with others (its limiter stays,
/// its buckets keeping their levels, under the same key: `keel_controller::group_key`).
fn set_replica_group(target: &mut Target, g: &keel_controller::QosGroup) {
    let has = target
        .group_views()
        .find(|v| v.name == g.name)
        .map(|v| v.qos.limits == g.limits && v.weight == g.weight);
    match has {
        None => target.add_qos_groups(core::slice::from_ref(g)),
        Some(true) => {}
        Some(false) => {
            let groups = target
                .group_views()
                .map(|v| {
                    if v.name == g.name {
                        g.clone()
                    } else {
                        keel_controller::QosGroup {
                            name: String::from(v.name),
                            limits: v.qos.limits,
                            weight: v.weight,
                        }
                    }
                })
                .collect();
            target.set_qos_groups(groups);
        }
    }
}

/// Applies a live QoS change of subsystem `nqn` ([`crate::replica::ReplicaQos`]) to a replica
/// target: the groups first (its namespaces may name new ones), the host rules (its replica
/// controllers keep their holders' limits), each namespace's QoS, then each replica
/// controller's new limits. The limiters stay (their keys in the split across cores too):
/// each takes the new limits, its buckets keeping their levels. A namespace it does not have
/// yet (a remote one, added with its lane from the description, which carries the new QoS)
/// is skipped. Returns whether it was applied (false: the replica does not serve `nqn`, or
/// refused a namespace's QoS).
pub(crate) fn apply_replica_qos(
    target: &mut Target,
    nqn: &str,
    q: &crate::replica::ReplicaQos,
) -> bool {
    use keel_controller::TargetError;
    if !target.has_subsystem(nqn) {
        return false;
    }
    target.set_qos_groups(q.groups.clone());
    if let Some(h) = &q.hosts {
        target.set_host_qos(h.clone());
    }
    let mut ok = true;
    for (nsid, qos) in &q.namespaces {
        match target.set_namespace_qos(nqn, *nsid, qos.clone()) {
            Ok(()) | Err(TargetError::UnknownNamespace) => {}
            Err(e) => {
                klog::error!(
                    "percore: namespace {} of {}: QoS not applied ({})",
                    nsid,
                    nqn,
                    klog::Dbg(&e)
                );
                ok = false;
            }
        }
    }
    for &(cntlid, limits) in &q.controllers {
        let _ = target.set_replica_controller_limits(nqn, cntlid, limits);
    }
    ok
}

/// A namespace added to a running replica: a RAM one over its region, a drive one through
/// the core's own queue pair (whole unless it is a slice or the replica already shares that
/// drive namespace among slices); `None` for a remote one (added with its lane) or when it
/// cannot be opened.
fn live_replica_namespace(
    n: &ReplicaNs,
    shared: &mut ReplicaShares,
    drive: &mut DriveOpener<'_>,
) -> Option<NamespaceConfig> {
    let whole = match n.source {
        ReplicaSource::Remote { .. } => return None,
        ReplicaSource::Ram(_) => true,
        ReplicaSource::Drive { drive, nsid, slice } => {
            slice.is_none() && !shared.iter().any(|(k, _)| *k == (drive, nsid))
        }
    };
    replica_namespace(n, whole, shared, drive)
}

/// Adds subsystem `sub` (a function created live, `crate::fnq`) to a replica target with its
/// namespaces (`shared`: the drive namespaces the replica shares among slices; `drive` opens
/// one through the core's own queue pair). On error (said on the console) nothing changes.
pub(crate) fn add_replica_subsystem(
    target: &mut Target,
    shared: &mut ReplicaShares,
    sub: &ReplicaSubsystem,
    drive: &mut DriveOpener<'_>,
) -> bool {
    let mut namespaces = Vec::with_capacity(sub.namespaces.len());
    for n in &sub.namespaces {
        let Some(cfg) = live_replica_namespace(n, shared, drive) else {
            return false;
        };
        namespaces.push(cfg);
    }
    // The groups its namespaces name (a function created live in a group).
    target.add_qos_groups(&sub.groups);
    match target.add_subsystem(SubsystemConfig {
        nqn: sub.nqn.clone(),
        serial: sub.serial.clone(),
        model: sub.model.clone(),
        allowed_hosts: sub.allowed_hosts.clone(),
        namespaces,
    }) {
        Ok(()) => true,
        Err(e) => {
            klog::error!("percore: subsystem {}: {}", sub.nqn, klog::D(&e));
            false
        }
    }
}

/// Hands an event of the core to the transport that owns its queue ([`Event::owner`]).
pub(crate) fn route<W: EndpointFunction>(
    ev: Event,
    functions: &mut [Emulated<W>],
    nvmf: Option<&mut NvmfService>,
) {
    let owner = ev.owner();
    if owner == crate::nvmf::OWNER {
        if let Some(s) = nvmf {
            s.on_event(ev);
        }
    } else if let Some(e) = functions.get_mut(usize::from(owner))
        && let Some(f) = e.f.as_mut()
    {
        // The function consumes every event of its own queues and buffers of its own pool:
        // nothing comes back. A removed one still takes its buffers back (and touches no
        // window: its queues are gone).
        let _ = f.handle_event(ev, &mut e.ep);
    }
}
