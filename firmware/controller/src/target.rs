//! The target: subsystems, controllers, queues, and the submit/poll entry points.

use crate::chain::{Chain, Step};
use crate::config::*;
use crate::errlog::{self, ErrAt, ErrorLog};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use keel_nvme::log::ErrorLogEntry;
use keel_nvme::regs::{Cc, Csts};
use keel_nvme::{Cqe, Sqe, Status};
use keel_qos::{Cost, Dir, DomainId, FlowId, LimiterId, Scheduler};
use keel_storage::{
    BlockBackend, BlockError, BlockRequest, BufPool, Capabilities, Geometry, IoBuf, NsStats,
    OpKind, RejectReason,
};

pub(crate) const DISCOVERY: usize = 0;

pub(crate) struct Namespace {
    pub nsid: u32,
    pub backend: Box<dyn BlockBackend>,
    pub geometry: Geometry,
    pub caps: Capabilities,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    pub eui64: [u8; 8],
    pub stats: NsStats,
    /// Requests the backend holds.
    pub inflight: u32,
    /// False once removed; the entry stays until the backend has drained.
    pub active: bool,
    /// Its QoS configuration, the scheduler domain its backend is, and its own limiter.
    pub qos: NamespaceQos,
    pub domain: DomainId,
    pub limiter: LimiterId,
}

pub(crate) struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allowed_hosts: Vec<String>,
    pub discovery: bool,
    /// Stable slots: a command refers to its namespace by index.
    pub namespaces: Vec<Option<Namespace>>,
    /// Media and data integrity errors of commands that named no namespace of the subsystem
    /// (the rest are counted in the namespaces' statistics).
    pub media_errors: u64,
    /// Removed live ([`Target::remove_subsystem`]): invisible, its slot reused once drained.
    pub removed: bool,
}

impl Subsystem {
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allowed_hosts.is_empty() || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    pub fn find_ns(&self, nsid: u32) -> Option<usize> {
        self.namespaces
            .iter()
            .position(|n| matches!(n, Some(ns) if ns.active && ns.nsid == nsid))
    }

    pub fn active_nsids(&self) -> impl Iterator<Item = u32> + '_ {
        self.namespaces
            .iter()
            .flatten()
            .filter(|n| n.active)
            .map(|n| n.nsid)
    }
}

pub(crate) struct Controller {
    pub cntlid: u16,
    pub subsys: usize,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub local: bool,
    /// A replica of a controller held by another core (see [`Target::adopt_io_queue`]): it
    /// has I/O queues only and goes away with the last of them.
    pub replica: bool,
    pub admin_q: QueueId,
    /// Index qid - 1.
    pub io_qs: Vec<Option<QueueId>>,
    pub cc: Cc,
    pub csts: Csts,
    pub shutdown_pending: bool,
    pub kato_ms: u32,
    pub last_activity: Instant,
    /// Negotiated with Set Features Number of Queues.
    pub nr_io_queues: u16,
    pub aec: u32,
    pub vwc: bool,
    pub arbitration: u32,
    /// Features without an effect on this device, kept as set (NVMe base 2.0 §5.27.1):
    /// Power Management (PS and WH), Temperature Threshold (composite over/under),
    /// Error Recovery (TLER), Interrupt Coalescing, Interrupt Vector Configuration (CD bit
    /// per vector), Write Atomicity Normal (DN).
    pub power_mgmt: u32,
    pub temp_threshold: [u16; 2],
    pub error_recovery: u32,
    pub irq_coalescing: u32,
    pub irq_no_coalesce: u64,
    pub write_atomicity: u32,
    /// Outstanding Asynchronous Event Requests: (CID, cookie).
    pub aers: Vec<(u16, u32)>,
    /// Events waiting for an AER: completion DW0.
    pub aen_pending: Vec<u32>,
    pub ns_notice_masked: bool,
    pub disc_notice_masked: bool,
    pub changed_ns: Vec<u32>,
    pub changed_overflow: bool,
    /// Backend-bound commands in flight on this controller's queues.
    pub outstanding: u32,
    /// Since when `outstanding` has been above zero.
    pub busy_since: Instant,
    /// Time with commands outstanding, before `busy_since` (SMART Controller Busy Time).
    pub busy_ns: u64,
    /// The Error Information log.
    pub errors: ErrorLog,
    /// On a replica: the Error Count of the newest entry handed to the holder's log
    /// ([`Target::take_replica_errors`]).
    pub exported_errors: u64,
    /// Abort commands waiting for a backend's verdict.
    pub aborts_pending: u16,
    /// The controller's own limiter (its host's limits).
    pub limiter: LimiterId,
    /// Its flow toward each namespace of its subsystem (by namespace index).
    pub flows: Vec<Option<FlowId>>,
}

impl Controller {
    /// A backend-bound command started.
    pub fn io_started(&mut self, now: Instant) {
        if self.outstanding == 0 {
            self.busy_since = now;
        }
        self.outstanding += 1;
    }

    /// `n` backend-bound commands ended (completed or dropped).
    pub fn io_ended(&mut self, n: u32, now: Instant) {
        if n == 0 || self.outstanding == 0 {
            return;
        }
        self.outstanding = self.outstanding.saturating_sub(n);
        if self.outstanding == 0 {
            let d = now.as_nanos().saturating_sub(self.busy_since.as_nanos());
            self.busy_ns = self.busy_ns.saturating_add(d);
        }
    }

    /// Controller Busy Time in nanoseconds at `now`: the time during which at least one
    /// command was outstanding at a backend.
    pub fn busy_ns_at(&self, now: Instant) -> u64 {
        let open = if self.outstanding > 0 {
            now.as_nanos().saturating_sub(self.busy_since.as_nanos())
        } else {
            0
        };
        self.busy_ns.saturating_add(open)
    }

    /// Logs a failed command if its status is one that is logged; true when it was (the
    /// completion then gets the More bit).
    #[allow(clippy::too_many_arguments)]
    pub fn log_error(
        &mut self,
        sqid: u16,
        cid: u16,
        nsid: u32,
        status: Status,
        at: ErrAt,
        trtype: u8,
    ) -> bool {
        if !errlog::is_logged(status) {
            return false;
        }
        self.errors.record(ErrorLogEntry {
            error_count: 0,
            sqid,
            cid,
            status: status.to_field(false),
            param_error_location: at.loc,
            lba: at.lba,
            nsid,
            trtype,
        });
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QState {
    Free,
    /// Opened by the transport, no Connect yet.
    Open,
    Connected,
    /// Ended by the controller; waiting for `close_queue`.
    Terminated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    Free,
    /// Waiting in the QoS scheduler (its limits, its turn, or room at the backend).
    Queued,
    /// Admitted, waiting for a scratch buffer (in `Target::scratch_wait`).
    Deferred,
    /// At the backend.
    InFlight,
}

pub(crate) struct Slot {
    pub state: SlotState,
    pub cid: u16,
    pub cookie: u32,
    pub ns: (u16, u16),
    /// The command's NSID and first LBA (for the Error Information log).
    pub nsid: u32,
    pub lba: u64,
    pub kind: OpKind,
    pub bytes: u64,
    pub read_len: u32,
    pub start: Instant,
    /// Its flow in the scheduler and what it costs there.
    pub flow: Option<FlowId>,
    pub cost: Cost,
    /// The request to (re)submit while Queued or Deferred; `None` while a chain waits for
    /// scratch.
    pub deferred: Option<BlockRequest>,
    /// A command run as several backend requests.
    pub chain: Option<Chain>,
    /// An Abort waiting for this command's outcome: its (CID, cookie) on the admin queue.
    pub abort_waiter: Option<(u16, u32)>,
    /// On a replica: the holder's Abort waiting for this command's outcome (its token,
    /// [`Target::abort_for_holder`]).
    pub holder_abort: Option<u32>,
}

impl Slot {
    pub(crate) const fn free_slot() -> Self {
        Self {
            state: SlotState::Free,
            cid: 0,
            cookie: 0,
            ns: (0, 0),
            nsid: 0,
            lba: 0,
            kind: OpKind::Other,
            bytes: 0,
            read_len: 0,
            start: Instant::from_nanos(0),
            flow: None,
            cost: Cost {
                dir: Dir::Other,
                bytes: 0,
            },
            deferred: None,
            chain: None,
            abort_waiter: None,
            holder_abort: None,
        }
    }
}

pub(crate) struct Queue {
    pub generation: u16,
    pub state: QState,
    pub ctrl: usize,
    pub cntlid: u16,
    pub qid: u16,
    pub sqsize: u16,
    pub sqhd: u16,
    pub sqflow_disabled: bool,
    pub disconnected: bool,
    /// Its I/O is served by another core ([`Target::served_elsewhere`]).
    pub elsewhere: bool,
    /// The transport that opened the queue (see [`QueueId::owner`]).
    pub owner: u16,
    pub slots: Vec<Slot>,
}

impl Queue {
    /// The handle of this queue, at index `qi`.
    pub fn id(&self, qi: usize) -> QueueId {
        QueueId {
            index: qi as u16,
            generation: self.generation,
            owner: self.owner,
        }
    }

    /// The backend tag of slot `si` of this queue, at index `qi`.
    pub fn tag(&self, qi: usize, si: usize) -> u64 {
        tag(qi, self.generation, self.owner, si)
    }

    pub fn cqe(&self, cid: u16, status: Status, dw0: u32) -> Cqe {
        Cqe {
            dw0,
            dw1: 0,
            sqhd: if self.sqflow_disabled {
                0xFFFF
            } else {
                self.sqhd
            },
            sqid: self.qid,
            cid,
            phase: false,
            status,
        }
    }
}

/// The NVMe target: subsystems with their namespaces, the discovery subsystem, and every
/// controller and queue the transports have created. See the crate documentation for the
/// calling protocol.
pub struct Target {
    /// Aborts of commands on queues served elsewhere, waiting for that core's verdict
    /// ([`Target::take_abort_requests`]).
    pub(crate) remote_aborts: Vec<crate::replica::RemoteAbort>,
    /// The next [`RemoteAbort::token`].
    pub(crate) next_abort_token: u32,
    /// On a replica: verdicts of the holder's Aborts, (token, aborted), not yet taken
    /// ([`Target::take_abort_verdicts`]).
    pub(crate) holder_verdicts: Vec<(u32, bool)>,
    /// What other cores' replicas counted for a namespace (subsystem NQN, NSID), added to
    /// this target's own counts in the SMART / Health log ([`Target::set_stats_elsewhere`]).
    pub(crate) elsewhere: Option<fn(&str, u32) -> keel_storage::NsStats>,
    /// A replica controller logged an error not yet taken by
    /// [`Target::take_replica_errors`].
    pub(crate) replica_errors: bool,
    /// On a replica: what replica controllers that ended admitted through their part of
    /// their holders' limits, not yet taken ([`Target::take_retired_counters`]).
    pub(crate) retired: Vec<crate::RetiredCounters>,
    pub(crate) limits: Limits,
    pub(crate) transport: TransportParams,
    pub(crate) identity: Identity,
    pub(crate) subsystems: Vec<Subsystem>,
    pub(crate) ports: Vec<PortEntry>,
    pub(crate) genctr: u64,
    pub(crate) ctrls: Vec<Option<Controller>>,
    pub(crate) next_cntlid: u16,
    pub(crate) queues: Vec<Queue>,
    pub(crate) pending: VecDeque<Event>,
    /// QoS: flows, limiters and domains; every I/O command passes through it.
    pub(crate) sched: Scheduler,
    /// Command handles per queue in the scheduler (the largest queue).
    pub(crate) hstride: u32,
    /// Groups: name, limiter, weight.
    pub(crate) groups: Vec<(String, LimiterId, u32)>,
    /// Per-host controller limits.
    pub(crate) host_qos: Vec<HostQos>,
    /// Domains shared by key: (key, domain, namespaces using it).
    pub(crate) shared_domains: Vec<(u32, DomainId, u32)>,
    /// Admitted commands waiting for a scratch buffer, in arrival order (handles).
    pub(crate) scratch_wait: VecDeque<u32>,
    /// Scratch buffers for Copy and emulated Write Zeroes.
    pub(crate) scratch: Option<BufPool>,
    pub(crate) health: DeviceHealth,
    /// The latest time a caller passed in.
    pub(crate) now: Instant,
    /// Bumped whenever a subsystem or namespace is added or removed.
    pub(crate) ns_generation: u64,
}

impl core::fmt::Debug for Target {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Target")
            .field("subsystems", &self.subsystems.len())
            .field("controllers", &self.controller_count())
            .field("queues", &self.queues.len())
            .finish()
    }
}

pub(crate) fn validate_nqn(nqn: &str) -> Result<(), ConfigError> {
    if nqn.is_empty() || nqn.len() > keel_nvme::NQN_MAX_LEN || nqn.contains('\0') {
        return Err(ConfigError::BadNqn);
    }
    Ok(())
}

/// A namespace's place in the scheduler: its domain (shared by key with the other slices of
/// one backend) and its own limiter.
pub(crate) fn namespace_qos(
    sched: &mut Scheduler,
    shared: &mut Vec<(u32, DomainId, u32)>,
    qos: &NamespaceQos,
    now: Instant,
) -> Result<(DomainId, LimiterId), ConfigError> {
    let domain = match qos.domain {
        Some(key) => match shared.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, d, refs)) => {
                *refs += 1;
                *d
            }
            None => {
                let d = sched
                    .add_domain(qos.max_inflight)
                    .map_err(|_| ConfigError::BadLimits)?;
                shared.push((key, d, 1));
                d
            }
        },
        None => sched
            .add_domain(qos.max_inflight)
            .map_err(|_| ConfigError::BadLimits)?,
    };
    let limiter = sched
        .add_limiter(qos.limits, now.as_nanos())
        .map_err(|_| ConfigError::BadLimits)?;
    Ok((domain, limiter))
}

pub(crate) fn make_namespace(
    ns: NamespaceConfig,
    limits: &Limits,
    sched: &mut Scheduler,
    shared: &mut Vec<(u32, DomainId, u32)>,
    now: Instant,
) -> Result<Namespace, ConfigError> {
    if ns.nsid == 0 || ns.nsid > limits.max_nsid || ns.nsid == keel_nvme::NSID_ALL {
        return Err(ConfigError::BadNsid(ns.nsid));
    }
    let g = ns.backend.geometry();
    if !g.block_size.is_power_of_two() || !(512..=65536).contains(&g.block_size) || g.blocks == 0 {
        return Err(ConfigError::BadGeometry(ns.nsid));
    }
    let (domain, limiter) = namespace_qos(sched, shared, &ns.qos, now)?;
    Ok(Namespace {
        nsid: ns.nsid,
        caps: ns.backend.capabilities(),
        backend: ns.backend,
        geometry: g,
        nguid: ns.nguid,
        uuid: ns.uuid,
        eui64: ns.eui64,
        stats: NsStats::default(),
        inflight: 0,
        active: true,
        qos: ns.qos,
        domain,
        limiter,
    })
}

/// A command handle of the scheduler: queue index × stride + slot.
pub(crate) fn handle(hstride: u32, qi: usize, si: usize) -> u32 {
    qi as u32 * hstride + si as u32
}

/// What a command costs its limiters.
pub(crate) fn cost_of(kind: OpKind, bytes: u64, op_writes: bool) -> Cost {
    let dir = match kind {
        OpKind::Read | OpKind::Verify => Dir::Read,
        OpKind::Write => Dir::Write,
        _ if op_writes => Dir::Write,
        _ => Dir::Other,
    };
    Cost { dir, bytes }
}

/// A backend request's tag: the queue's owner, index and generation and the slot, so that a
/// request coming back after its queue went away still names who its buffer goes back to.
/// It fits in 56 bits: backends that serve several users of one device (slices
/// of a drive or a remote volume) keep the top 8 bits for themselves. Bits 55:40 owner, 39:24
/// queue index, 23:16 the low 8 bits of the queue's generation, 15:0 slot. A completion
/// matches its queue by generation modulo 256 and by the slot being in flight.
pub(crate) fn tag(qi: usize, generation: u16, owner: u16, slot: usize) -> u64 {
    ((owner as u64) << 40)
        | ((qi as u64 & 0xFFFF) << 24)
        | (((generation & 0xFF) as u64) << 16)
        | (slot as u64 & 0xFFFF)
}

/// Bits a [`tag`] uses.
#[cfg(test)]
pub(crate) const TAG_BITS: u32 = 56;

/// The owner recorded in a [`tag`].
pub(crate) fn tag_owner(t: u64) -> u16 {
    (t >> 40) as u16
}

/// Queue index, generation (low 8 bits) and slot of a [`tag`].
pub(crate) fn untag(t: u64) -> (usize, u8, usize) {
    (
        ((t >> 24) & 0xFFFF) as usize,
        (t >> 16) as u8,
        (t & 0xFFFF) as usize,
    )
}

pub(crate) fn block_status(e: BlockError) -> Status {
    match e {
        BlockError::OutOfRange => Status::LBA_OUT_OF_RANGE,
        BlockError::BufferTooSmall => Status::DATA_SGL_LENGTH_INVALID,
        BlockError::Unsupported => Status::INVALID_OPCODE,
        BlockError::CompareMismatch => Status::COMPARE_FAILURE,
        BlockError::WriteFault => Status::WRITE_FAULT,
        BlockError::ReadError => Status::UNRECOVERED_READ_ERROR,
        BlockError::PathError => Status::CONTROLLER_PATHING_ERROR,
        BlockError::Aborted => Status::ABORT_REQUESTED,
        BlockError::InvalidTag | BlockError::Internal => Status::INTERNAL_ERROR,
    }
}

/// Whether a status counts as a SMART Media and Data Integrity Error: the media and data
/// integrity status codes but Compare Failure (a mismatch is the command's answer, not a
/// defect), and Transient Transport Error, which the transports report only for data digest
/// (CRC32C) mismatches.
pub(crate) fn is_media_error(s: Status) -> bool {
    use keel_nvme::cqe::{generic, media, sct};
    (s.sct == sct::MEDIA && s.sc != media::COMPARE_FAILURE)
        || (s.sct == sct::GENERIC && s.sc == generic::TRANSIENT_TRANSPORT_ERROR)
}

/// Returns a buffer that came back from a backend to where it belongs: the scratch pool if it
/// is one of its buffers, the transport otherwise.
pub(crate) fn release_buffer(
    scratch: &mut Option<BufPool>,
    owner: u16,
    b: IoBuf,
    out: &mut dyn FnMut(Event),
) -> usize {
    let b = match scratch.as_mut() {
        Some(p) if p.owns(&b) => match p.put(b) {
            Ok(()) => return 0,
            Err((_, b)) => b,
        },
        _ => b,
    };
    out(Event::BufferReleased { owner, buf: b });
    1
}

impl Target {
    /// Builds a target. The discovery subsystem is created implicitly.
    pub fn new(cfg: TargetConfig) -> Result<Self, ConfigError> {
        let l = cfg.limits;
        if l.max_controllers == 0
            || l.max_controllers > keel_nvme::fabrics::CNTLID_MAX as usize
            || l.mdts > 20
            || l.max_io_queues == 0
            || l.max_io_queues > 0xFFFE
            || l.max_queue_depth < 2
            || l.admin_queue_depth < 2
            || l.max_queues == 0
            || l.max_queues > 0xFFFF
            || l.max_nsid == 0
            || l.max_nsid == keel_nvme::NSID_ALL
            || !(1..=256).contains(&l.error_log_entries)
            || !(1..=256).contains(&l.copy_max_ranges)
        {
            return Err(ConfigError::BadLimits);
        }
        let hstride = u32::from(l.max_queue_depth.max(l.admin_queue_depth));
        // Command handles for every queue the limits allow, allocated once: a Connect never
        // allocates them, and what a workload's queues used is not kept beyond it.
        let handles = u32::try_from(l.max_queues)
            .unwrap_or(u32::MAX)
            .saturating_mul(hstride);
        let mut sched = Scheduler::new(handles);
        let mut shared_domains = Vec::new();
        let now = Instant::from_nanos(0);
        let mut groups = Vec::with_capacity(cfg.qos_groups.len());
        for g in cfg.qos_groups {
            if groups.iter().any(|(n, _, _)| *n == g.name) {
                return Err(ConfigError::BadLimits);
            }
            let id = sched
                .add_limiter(g.limits, now.as_nanos())
                .map_err(|_| ConfigError::BadLimits)?;
            groups.push((g.name, id, g.weight));
        }
        let mut subsystems = Vec::with_capacity(cfg.subsystems.len() + 1);
        subsystems.push(Subsystem {
            nqn: keel_nvme::DISCOVERY_NQN.into(),
            serial: String::new(),
            model: "Keel discovery controller".into(),
            allowed_hosts: Vec::new(),
            discovery: true,
            namespaces: Vec::new(),
            media_errors: 0,
            removed: false,
        });
        for s in cfg.subsystems {
            validate_nqn(&s.nqn)?;
            if subsystems.iter().any(|x| x.nqn == s.nqn) {
                return Err(if s.nqn == keel_nvme::DISCOVERY_NQN {
                    ConfigError::BadNqn
                } else {
                    ConfigError::DuplicateSubsystem
                });
            }
            let mut namespaces: Vec<Option<Namespace>> = Vec::with_capacity(s.namespaces.len());
            for ns in s.namespaces {
                if let Some(g) = &ns.qos.group
                    && !groups.iter().any(|(n, _, _)| n == g)
                {
                    return Err(ConfigError::UnknownGroup(ns.nsid));
                }
                let ns = make_namespace(ns, &l, &mut sched, &mut shared_domains, now)?;
                if namespaces.iter().flatten().any(|n| n.nsid == ns.nsid) {
                    return Err(ConfigError::BadNsid(ns.nsid));
                }
                namespaces.push(Some(ns));
            }
            subsystems.push(Subsystem {
                nqn: s.nqn,
                serial: s.serial,
                model: s.model,
                allowed_hosts: s.allowed_hosts,
                discovery: false,
                namespaces,
                media_errors: 0,
                removed: false,
            });
        }
        let mut ctrls = Vec::with_capacity(l.max_controllers);
        ctrls.resize_with(l.max_controllers, || None);
        // Every controller has a limiter and a flow per namespace of its subsystem: room for
        // the most controllers, so connecting allocates none and their removal leaves none.
        let most_namespaces = subsystems.iter().map(|s| s.namespaces.len()).max();
        sched.reserve(
            l.max_controllers
                .saturating_mul(most_namespaces.unwrap_or(0).max(1)),
            l.max_controllers,
            l.max_controllers,
        );
        Ok(Self {
            limits: l,
            transport: cfg.transport,
            identity: cfg.identity,
            subsystems,
            ports: cfg.ports,
            genctr: 1,
            ctrls,
            next_cntlid: 1,
            queues: Vec::with_capacity(l.max_queues),
            // A whole queue's commands can be released at once (its connection lost).
            pending: VecDeque::with_capacity(usize::from(l.max_queue_depth).max(64)),
            sched,
            hstride,
            groups,
            host_qos: cfg.host_qos,
            shared_domains,
            scratch_wait: VecDeque::with_capacity(64),
            scratch: cfg.scratch,
            health: DeviceHealth::default(),
            now: Instant::from_nanos(0),
            ns_generation: 0,
            replica_errors: false,
            retired: Vec::new(),
            elsewhere: None,
            remote_aborts: Vec::with_capacity(8),
            next_abort_token: 1,
            holder_verdicts: Vec::with_capacity(8),
        })
    }

    /// Counts of the namespaces' commands served by other cores (their replicas, `Target::
    /// adopt_io_queue`), added to this target's own in the SMART / Health log: the host reads
    /// it on the admin queue this target holds, and it covers every queue (NVMe base 2.0
    /// §5.16.1.3). `f` is called per namespace, per Get Log Page only.
    pub fn set_stats_elsewhere(&mut self, f: fn(&str, u32) -> keel_storage::NsStats) {
        self.elsewhere = Some(f);
    }

    /// Replaces the advertised listen ports (e.g. once DHCP assigned an address). Bumps the
    /// discovery generation counter and notifies discovery controllers that asked for
    /// Discovery Log Page Change events.
    pub fn set_ports(&mut self, ports: Vec<PortEntry>) {
        self.ports = ports;
        self.discovery_changed();
    }

    /// What the device knows of its power cycles, for the SMART / Health log (Power Cycles,
    /// Power On Hours, Unsafe Shutdowns). Without it those fields read 0.
    pub fn set_health(&mut self, health: DeviceHealth) {
        self.health = health;
    }

    pub(crate) fn discovery_changed(&mut self) {
        self.genctr = self.genctr.wrapping_add(1);
        let dw0 = keel_nvme::opcode::async_event::dw0(
            keel_nvme::opcode::async_event::TYPE_NOTICE,
            keel_nvme::opcode::async_event::NOTICE_DISCOVERY_LOG_CHANGE,
            keel_nvme::LogPageId::Discovery as u8,
        );
        for ci in 0..self.ctrls.len() {
            let fire = match &mut self.ctrls[ci] {
                Some(c)
                    if c.subsys == DISCOVERY
                        && c.aec & keel_nvme::opcode::async_event::AEC_DISCOVERY_LOG_CHANGE
                            != 0
                        && !c.disc_notice_masked =>
                {
                    c.disc_notice_masked = true;
                    true
                }
                _ => false,
            };
            if fire {
                self.raise_aen(ci, dw0);
            }
        }
    }

    /// Adds a namespace to a subsystem; connected controllers get a Namespace Attribute
    /// Changed event and see the NSID in the Changed Namespace List log.
    pub fn add_namespace(&mut self, subnqn: &str, ns: NamespaceConfig) -> Result<(), TargetError> {
        let si = self
            .subsys_index(subnqn)
            .ok_or(TargetError::UnknownSubsystem)?;
        if self.subsystems[si]
            .namespaces
            .iter()
            .flatten()
            .any(|n| n.nsid == ns.nsid && n.active)
        {
            return Err(ConfigError::BadNsid(ns.nsid).into());
        }
        if let Some(g) = &ns.qos.group
            && !self.groups.iter().any(|(n, _, _)| n == g)
        {
            return Err(ConfigError::UnknownGroup(ns.nsid).into());
        }
        let now = self.now;
        let ns = make_namespace(
            ns,
            &self.limits,
            &mut self.sched,
            &mut self.shared_domains,
            now,
        )?;
        let nsid = ns.nsid;
        let s = &mut self.subsystems[si];
        match s.namespaces.iter_mut().find(|n| n.is_none()) {
            Some(free) => *free = Some(ns),
            None => s.namespaces.push(Some(ns)),
        }
        for ci in 0..self.ctrls.len() {
            if matches!(&self.ctrls[ci], Some(c) if c.subsys == si) {
                self.ensure_flows(ci);
            }
        }
        self.namespace_changed(si, nsid);
        Ok(())
    }

    /// Removes a namespace. New commands see Invalid Namespace; commands already at the
    /// backend complete normally, and the backend is dropped once it has drained.
    pub fn remove_namespace(&mut self, subnqn: &str, nsid: u32) -> Result<(), TargetError> {
        let si = self
            .subsys_index(subnqn)
            .ok_or(TargetError::UnknownSubsystem)?;
        let s = &mut self.subsystems[si];
        let ni = s.find_ns(nsid).ok_or(TargetError::UnknownNamespace)?;
        if let Some(slot) = s.namespaces.get_mut(ni) {
            if let Some(ns) = slot {
                ns.active = false;
            }
            self.reap_namespace(si, ni);
        }
        self.namespace_changed(si, nsid);
        Ok(())
    }

    /// Whether a command of namespace `ni` of subsystem `si` waits for the scheduler or a
    /// scratch buffer.
    fn any_waiting_on(&self, si: usize, ni: usize) -> bool {
        (self.sched.waiting() > 0 || !self.scratch_wait.is_empty())
            && self.queues.iter().any(|q| {
                q.slots.iter().any(|s| {
                    matches!(s.state, SlotState::Queued | SlotState::Deferred)
                        && s.ns == (si as u16, ni as u16)
                })
            })
    }

    /// Drops a removed namespace once its backend has drained and nothing waits for it:
    /// its flows, limiter and domain go with it.
    fn reap_namespace(&mut self, si: usize, ni: usize) {
        let drained = matches!(
            self.subsystems.get(si).and_then(|s| s.namespaces.get(ni)),
            Some(Some(ns)) if !ns.active && ns.inflight == 0
        ) && !self.any_waiting_on(si, ni);
        if !drained {
            return;
        }
        let Some(ns) = self.subsystems[si].namespaces[ni].take() else {
            return;
        };
        for c in self.ctrls.iter_mut().flatten() {
            if c.subsys == si
                && let Some(f) = c.flows.get_mut(ni).and_then(Option::take)
            {
                let _ = self.sched.remove_flow(f);
            }
        }
        self.sched.remove_limiter(ns.limiter);
        let shared = self
            .shared_domains
            .iter()
            .position(|(_, d, _)| *d == ns.domain);
        match shared {
            Some(i) => {
                self.shared_domains[i].2 -= 1;
                if self.shared_domains[i].2 == 0 {
                    self.shared_domains.swap_remove(i);
                    let _ = self.sched.remove_domain(ns.domain);
                }
            }
            None => {
                let _ = self.sched.remove_domain(ns.domain);
            }
        }
    }

    fn namespace_changed(&mut self, si: usize, nsid: u32) {
        self.ns_generation = self.ns_generation.wrapping_add(1);
        use keel_nvme::opcode::async_event as ae;
        let dw0 = ae::dw0(
            ae::TYPE_NOTICE,
            ae::NOTICE_NS_ATTRIBUTE_CHANGED,
            keel_nvme::LogPageId::ChangedNamespaceList as u8,
        );
        for ci in 0..self.ctrls.len() {
            let fire = match &mut self.ctrls[ci] {
                Some(c) if c.subsys == si => {
                    if !c.changed_ns.contains(&nsid) {
                        if c.changed_ns.len() < c.changed_ns.capacity() {
                            c.changed_ns.push(nsid);
                        } else {
                            c.changed_overflow = true;
                        }
                    }
                    if c.aec & ae::AEC_NS_ATTRIBUTE != 0 && !c.ns_notice_masked {
                        c.ns_notice_masked = true;
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            };
            if fire {
                self.raise_aen(ci, dw0);
            }
        }
    }

    /// Completes an outstanding AER with `dw0`, or keeps the event until one arrives.
    pub(crate) fn raise_aen(&mut self, ci: usize, dw0: u32) {
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        if c.aers.is_empty() {
            if c.aen_pending.len() < 8 {
                c.aen_pending.push(dw0);
            }
            return;
        }
        let (cid, cookie) = c.aers.remove(0);
        let aq = c.admin_q;
        if let Some(q) = self.queue(aq) {
            let cqe = q.cqe(cid, Status::SUCCESS, dw0);
            self.pending.push_back(Event::Completion(
                aq,
                Response {
                    cqe,
                    buf: None,
                    data_len: 0,
                    cookie,
                },
            ));
        }
    }

    pub(crate) fn subsys_index(&self, nqn: &str) -> Option<usize> {
        self.subsystems
            .iter()
            .position(|s| !s.removed && s.nqn == nqn)
    }

    /// Adds an NVM subsystem while the target runs (an emulated function created live) with
    /// its namespaces; the discovery log changes (discovery controllers that asked get the
    /// event). A slot left by a removed subsystem is reused once every command of it has
    /// drained. On error nothing changes.
    pub fn add_subsystem(&mut self, cfg: SubsystemConfig) -> Result<(), TargetError> {
        validate_nqn(&cfg.nqn)?;
        if cfg.nqn == keel_nvme::DISCOVERY_NQN {
            return Err(ConfigError::BadNqn.into());
        }
        if self.subsys_index(&cfg.nqn).is_some() {
            return Err(ConfigError::DuplicateSubsystem.into());
        }
        let mut seen: Vec<u32> = Vec::with_capacity(cfg.namespaces.len());
        for ns in &cfg.namespaces {
            if seen.contains(&ns.nsid) {
                return Err(ConfigError::BadNsid(ns.nsid).into());
            }
            seen.push(ns.nsid);
            if let Some(g) = &ns.qos.group
                && !self.groups.iter().any(|(n, _, _)| n == g)
            {
                return Err(ConfigError::UnknownGroup(ns.nsid).into());
            }
        }
        let reuse = (0..self.subsystems.len()).find(|&i| {
            let s = &self.subsystems[i];
            s.removed
                && s.namespaces.iter().all(Option::is_none)
                && !self.ctrls.iter().flatten().any(|c| c.subsys == i)
        });
        let si = match reuse {
            Some(i) => i,
            None => {
                self.subsystems.push(Subsystem {
                    nqn: String::new(),
                    serial: String::new(),
                    model: String::new(),
                    allowed_hosts: Vec::new(),
                    discovery: false,
                    namespaces: Vec::new(),
                    media_errors: 0,
                    removed: true,
                });
                self.subsystems.len() - 1
            }
        };
        {
            let s = &mut self.subsystems[si];
            s.nqn = cfg.nqn;
            s.serial = cfg.serial;
            s.model = cfg.model;
            s.allowed_hosts = cfg.allowed_hosts;
            s.namespaces = Vec::with_capacity(cfg.namespaces.len());
            s.media_errors = 0;
        }
        let nqn = self.subsystems[si].nqn.clone();
        for ns in cfg.namespaces {
            let now = self.now;
            match make_namespace(
                ns,
                &self.limits,
                &mut self.sched,
                &mut self.shared_domains,
                now,
            ) {
                Ok(n) => self.subsystems[si].namespaces.push(Some(n)),
                Err(e) => {
                    // Undo: the namespaces made so far leave the scheduler again.
                    let nsids: Vec<u32> = self.subsystems[si]
                        .namespaces
                        .iter()
                        .flatten()
                        .map(|n| n.nsid)
                        .collect();
                    self.subsystems[si].removed = false;
                    for nsid in nsids {
                        let _ = self.remove_namespace(&nqn, nsid);
                    }
                    self.subsystems[si].removed = true;
                    return Err(e.into());
                }
            }
        }
        self.subsystems[si].removed = false;
        self.discovery_changed();
        Ok(())
    }

    /// Removes an NVM subsystem while the target runs (an emulated function removed live):
    /// its controllers end (every queue is reported as [`Event::QueueTerminated`]; commands
    /// still at a backend complete there and only their buffers come back), its namespaces
    /// are removed (each backend dropped once drained) and it leaves the discovery log.
    pub fn remove_subsystem(&mut self, nqn: &str) -> Result<(), TargetError> {
        self.ns_generation = self.ns_generation.wrapping_add(1);
        let si = self
            .subsys_index(nqn)
            .ok_or(TargetError::UnknownSubsystem)?;
        if self.subsystems[si].discovery {
            return Err(TargetError::UnknownSubsystem);
        }
        for ci in 0..self.ctrls.len() {
            if matches!(&self.ctrls[ci], Some(c) if c.subsys == si) {
                self.destroy_controller(ci, None);
            }
        }
        let nsids: Vec<u32> = self.subsystems[si]
            .namespaces
            .iter()
            .flatten()
            .filter(|n| n.active)
            .map(|n| n.nsid)
            .collect();
        for nsid in nsids {
            let _ = self.remove_namespace(nqn, nsid);
        }
        self.subsystems[si].removed = true;
        self.discovery_changed();
        Ok(())
    }

    /// The limits the target was built with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Number of live controllers.
    pub fn controller_count(&self) -> usize {
        self.ctrls.iter().flatten().count()
    }

    /// Number of queues currently open (any state but closed).
    pub fn open_queue_count(&self) -> usize {
        self.queues
            .iter()
            .filter(|q| q.state != QState::Free)
            .count()
    }

    /// Statistics of a namespace.
    pub fn namespace_stats(&self, subnqn: &str, nsid: u32) -> Option<&NsStats> {
        let s = self.subsystems.get(self.subsys_index(subnqn)?)?;
        let ni = s.find_ns(nsid)?;
        s.namespaces.get(ni)?.as_ref().map(|n| &n.stats)
    }

    pub(crate) fn queue_index(&self, q: QueueId) -> Option<usize> {
        let i = q.index as usize;
        match self.queues.get(i) {
            Some(x) if x.generation == q.generation && x.state != QState::Free => Some(i),
            _ => None,
        }
    }

    pub(crate) fn queue(&self, q: QueueId) -> Option<&Queue> {
        self.queue_index(q).and_then(|i| self.queues.get(i))
    }

    /// Controller index of a connected queue whose controller is alive.
    pub(crate) fn ctrl_of(&self, qi: usize) -> Option<usize> {
        let q = self.queues.get(qi)?;
        if q.state != QState::Connected {
            return None;
        }
        match self.ctrls.get(q.ctrl) {
            Some(Some(c)) if c.cntlid == q.cntlid => Some(q.ctrl),
            _ => None,
        }
    }

    /// Information about a connected queue.
    pub fn queue_info(&self, q: QueueId) -> Option<QueueInfo> {
        let qi = self.queue_index(q)?;
        let ci = self.ctrl_of(qi)?;
        let queue = self.queues.get(qi)?;
        let c = self.ctrls.get(ci)?.as_ref()?;
        Some(QueueInfo {
            qid: queue.qid,
            cntlid: c.cntlid,
            sqsize: queue.sqsize,
            sq_flow_control_disabled: queue.sqflow_disabled,
            discovery: c.subsys == DISCOVERY,
        })
    }

    /// Whether the host sent Disconnect on queue `q` (still known after the queue was
    /// terminated, until it is closed): losing its connection then is orderly whatever the
    /// socket saw.
    pub fn queue_disconnected(&self, q: QueueId) -> bool {
        self.queue_index(q)
            .and_then(|qi| self.queues.get(qi))
            .is_some_and(|queue| queue.disconnected)
    }

    /// Opens a transport queue (call when a connection is accepted, before its Connect),
    /// owned by transport 0 (see [`Target::open_queue_for`]).
    pub fn open_queue(&mut self) -> Result<QueueId, TargetError> {
        self.open_queue_for(0)
    }

    /// Opens a transport queue owned by `owner`, a number the caller chooses for the
    /// transport: every [`Event`] about the queue, its commands and their buffers carries it
    /// ([`Event::owner`]), so the poll loop hands the event to that transport directly.
    pub fn open_queue_for(&mut self, owner: u16) -> Result<QueueId, TargetError> {
        if let Some(i) = self.queues.iter().position(|q| q.state == QState::Free) {
            let q = &mut self.queues[i];
            q.state = QState::Open;
            q.disconnected = false;
            q.elsewhere = false;
            q.sqflow_disabled = false;
            q.sqhd = 0;
            q.owner = owner;
            return Ok(q.id(i));
        }
        if self.queues.len() >= self.limits.max_queues {
            return Err(TargetError::TooManyQueues);
        }
        self.queues.push(Queue {
            generation: 0,
            state: QState::Open,
            ctrl: 0,
            cntlid: 0,
            qid: 0,
            sqsize: 0,
            sqhd: 0,
            sqflow_disabled: false,
            disconnected: false,
            elsewhere: false,
            owner,
            slots: Vec::new(),
        });
        Ok(QueueId {
            index: (self.queues.len() - 1) as u16,
            generation: 0,
            owner,
        })
    }

    /// The transport connection of `q` went away. Losing an admin queue ends its controller
    /// (its other queues are reported as [`Event::QueueTerminated`]); losing an I/O queue
    /// that was not disconnected first is a fatal error for the association, as in Linux's
    /// target. Commands still at a backend are dropped; their buffers come back as
    /// [`Event::BufferReleased`].
    pub fn close_queue(&mut self, q: QueueId) -> Result<(), TargetError> {
        self.close_queue_after(q, QueueLoss::Abrupt)
    }

    /// Like [`Target::close_queue`], saying how the connection ended. An I/O queue whose host
    /// closed or reset it (Linux closes its I/O queues with a FIN and a RST before it shuts the
    /// controller down over the admin queue) only loses that queue; an abrupt loss (a
    /// transport error) ends the association. Losing the admin queue always ends the
    /// controller.
    pub fn close_queue_after(&mut self, q: QueueId, how: QueueLoss) -> Result<(), TargetError> {
        let qi = self.queue_index(q).ok_or(TargetError::UnknownQueue)?;
        if !self.remote_aborts.is_empty() {
            self.resolve_remote_aborts_of(q);
        }
        if let Some(ci) = self.ctrl_of(qi) {
            let (is_admin, graceful, local, replica) = {
                let queue = &self.queues[qi];
                let c = self.ctrls[ci].as_ref();
                (
                    queue.qid == 0,
                    queue.disconnected || how == QueueLoss::Orderly,
                    c.map(|c| c.local).unwrap_or(false),
                    c.map(|c| c.replica).unwrap_or(false),
                )
            };
            if is_admin || (!graceful && !local && !replica) {
                self.destroy_controller(ci, Some(qi));
            } else if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                let qid = self.queues[qi].qid as usize;
                if let Some(x) = qid.checked_sub(1).and_then(|i| c.io_qs.get_mut(i)) {
                    *x = None;
                }
                if replica && c.io_qs.iter().all(Option::is_none) {
                    self.destroy_controller(ci, Some(qi));
                }
            }
        }
        self.release_queue(qi);
        self.forget_events_of(q);
        let queue = &mut self.queues[qi];
        queue.state = QState::Free;
        queue.generation = queue.generation.wrapping_add(1);
        queue.slots = Vec::new();
        Ok(())
    }

    /// Events not yet delivered for a queue the transport has just closed: it hears nothing
    /// more of it (a `QueueTerminated` from an admin Disconnect the transport closed before
    /// its next poll would name a queue it no longer has), but a completion's buffer still
    /// goes back to its pool. Off the I/O path (once per queue lifetime).
    fn forget_events_of(&mut self, q: QueueId) {
        for _ in 0..self.pending.len() {
            let Some(e) = self.pending.pop_front() else {
                break;
            };
            match e {
                Event::QueueTerminated(x) if x == q => {}
                Event::Completion(x, r) if x == q => {
                    if let Some(buf) = r.buf {
                        self.pending.push_back(Event::BufferReleased {
                            owner: q.owner,
                            buf,
                        });
                    }
                }
                e => self.pending.push_back(e),
            }
        }
    }

    /// Drops the commands of a queue: deferred requests give their buffers back now (scratch
    /// buffers to the scratch pool), in-flight ones when the backend returns them; an Abort
    /// waiting for one of them completes as "not aborted". The controller's outstanding count
    /// is adjusted.
    fn release_queue(&mut self, qi: usize) {
        let now = self.now;
        let Some(queue) = self.queues.get(qi) else {
            return;
        };
        let (ci, cntlid, owner, n) = (queue.ctrl, queue.cntlid, queue.owner, queue.slots.len());
        let mut dropped = 0u32;
        for si in 0..n {
            let slot = &mut self.queues[qi].slots[si];
            if slot.state == SlotState::Free {
                continue;
            }
            let state = slot.state;
            let h = handle(self.hstride, qi, si);
            match state {
                SlotState::Queued => {
                    self.sched.remove(h);
                }
                SlotState::Deferred => {
                    // Admitted: its place in the domain is free again.
                    if let Some(p) = self.scratch_wait.iter().position(|&x| x == h) {
                        self.scratch_wait.remove(p);
                    }
                    if let Some(f) = slot.flow {
                        self.sched.finished(f);
                    }
                }
                // At a backend: its completion frees the domain (see `poll_backends`); its
                // flow is no longer busy with it (the completion will not find the slot).
                SlotState::InFlight => {
                    if let Some(f) = slot.flow {
                        self.sched.release(f);
                    }
                }
                SlotState::Free => {}
            }
            let slot = &mut self.queues[qi].slots[si];
            let req_buf = slot.deferred.take().and_then(|r| r.buf);
            let chain = slot.chain.take();
            let waiter = slot.abort_waiter.take();
            if let Some(token) = slot.holder_abort.take() {
                self.holder_verdicts.push((token, false));
            }
            slot.state = SlotState::Free;
            dropped += 1;
            let Target {
                scratch, pending, ..
            } = self;
            let mut out = |e| pending.push_back(e);
            if let Some(b) = req_buf {
                release_buffer(scratch, owner, b, &mut out);
            }
            if let Some(c) = chain {
                let (s, h) = c.into_buffers();
                for b in [s, h].into_iter().flatten() {
                    release_buffer(scratch, owner, b, &mut out);
                }
            }
            if let Some(w) = waiter
                && let Some(ev) = abort_verdict(&self.queues, &mut self.ctrls, ci, cntlid, w, false)
            {
                self.pending.push_back(ev);
            }
        }
        // In-flight requests keep their tag; the generation bump in close_queue (or the
        // Terminated state) makes their completion release the buffer.
        if let Some(Some(c)) = self.ctrls.get_mut(ci)
            && c.cntlid == cntlid
        {
            c.io_ended(dropped, now);
        }
    }

    /// Ends a controller: every queue but `except` is terminated and reported, outstanding
    /// AERs are dropped, and the controller slot is freed.
    pub(crate) fn destroy_controller(&mut self, ci: usize, except: Option<usize>) {
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        let mut qs: Vec<QueueId> = Vec::with_capacity(c.io_qs.len() + 1);
        qs.push(c.admin_q);
        qs.extend(c.io_qs.iter().flatten().copied());
        for q in qs {
            let Some(qi) = self.queue_index(q) else {
                continue;
            };
            if Some(qi) == except {
                continue;
            }
            if self.queues[qi].state == QState::Connected {
                self.terminate_queue(qi);
            }
        }
        if let Some(slot) = self.ctrls.get_mut(ci)
            && let Some(c) = slot.take()
        {
            if c.replica {
                self.retire_replica_counters(&c);
            }
            for f in c.flows.into_iter().flatten() {
                let _ = self.sched.remove_flow(f);
            }
            self.sched.remove_limiter(c.limiter);
        }
    }

    /// Marks a connected queue terminated, drops its commands and reports it.
    pub(crate) fn terminate_queue(&mut self, qi: usize) {
        self.release_queue(qi);
        let Some(queue) = self.queues.get_mut(qi) else {
            return;
        };
        queue.state = QState::Terminated;
        // Commands still at a backend find the queue Terminated (or, after close_queue, a
        // new generation) when they complete, and only their buffers are handed back.
        for s in queue.slots.iter_mut() {
            *s = Slot::free_slot();
        }
        let id = queue.id(qi);
        self.pending.push_back(Event::QueueTerminated(id));
    }

    pub(crate) fn alloc_cntlid(&mut self) -> u16 {
        loop {
            let id = self.next_cntlid;
            self.next_cntlid = if id >= keel_nvme::fabrics::CNTLID_MAX {
                1
            } else {
                id + 1
            };
            if !self.ctrls.iter().flatten().any(|c| c.cntlid == id) {
                return id;
            }
        }
    }

    /// Hands a command to the controller. Returns the response at once, or `None` when the
    /// command went to a backend (or is an Asynchronous Event Request, or an Abort waiting for
    /// a backend's verdict); it then completes through [`Target::poll`]. Every command gets
    /// exactly one response.
    pub fn submit(&mut self, now: Instant, q: QueueId, req: Request) -> Option<Response> {
        self.now = now;
        let Some(qi) = self.queue_index(q) else {
            return Some(bare_response(req, Status::COMMAND_SEQUENCE_ERROR));
        };
        match self.queues[qi].state {
            QState::Open => Some(self.unconnected(now, qi, req)),
            QState::Terminated | QState::Free => {
                let st = Status::ABORTED_SQ_DELETION;
                Some(self.respond(qi, req, st, 0))
            }
            QState::Connected => {
                let Some(ci) = self.ctrl_of(qi) else {
                    return Some(self.respond(qi, req, Status::ABORTED_SQ_DELETION, 0));
                };
                self.consume_sqe(now, qi, ci);
                if self.queues[qi].qid == 0 {
                    self.admin(now, qi, ci, req)
                } else {
                    self.io(now, qi, ci, req)
                }
            }
        }
    }

    /// A command entered connected queue `qi` of controller `ci`: SQ head moves on, and it is
    /// traffic for keep-alive.
    pub(crate) fn consume_sqe(&mut self, now: Instant, qi: usize, ci: usize) {
        let queue = &mut self.queues[qi];
        let entries = queue.sqsize as u32 + 1;
        queue.sqhd = ((queue.sqhd as u32 + 1) % entries) as u16;
        if let Some(Some(c)) = self.ctrls.get_mut(ci) {
            c.last_activity = now;
        }
    }

    /// Completes a command the transport itself rejected (a bad SGL, a data digest error...)
    /// with `status`, consuming its submission queue slot like any other command so SQHD and
    /// flow control stay right. The command never reaches admin or I/O handling. It is
    /// logged in the Error Information log with the transport's type; a Transient Transport
    /// Error (what the transports report for a data digest mismatch, a CRC failure) also
    /// counts as a SMART Media and Data Integrity Error.
    pub fn reject(&mut self, now: Instant, q: QueueId, req: Request, status: Status) -> Response {
        self.now = now;
        let Some(qi) = self.queue_index(q) else {
            return bare_response(req, status);
        };
        let mut trtype = 0;
        if self.queues[qi].state == QState::Connected {
            let queue = &mut self.queues[qi];
            let entries = queue.sqsize as u32 + 1;
            queue.sqhd = ((queue.sqhd as u32 + 1) % entries) as u16;
            if let Some(ci) = self.ctrl_of(qi)
                && let Some(Some(c)) = self.ctrls.get_mut(ci)
            {
                c.last_activity = now;
                if !c.local {
                    trtype = self.transport.trtype;
                }
                let si = c.subsys;
                if is_media_error(status) {
                    self.count_media_error(si, req.sqe.nsid);
                }
            }
        }
        let at = errlog::default_at(&req.sqe, status);
        self.respond_with(qi, req, status, 0, at, trtype)
    }

    /// Counts a media and data integrity error of a command that did not reach a backend:
    /// on namespace `nsid` of subsystem `si` if it has it, on the subsystem otherwise.
    pub(crate) fn count_media_error(&mut self, si: usize, nsid: u32) {
        let Some(s) = self.subsystems.get_mut(si) else {
            return;
        };
        match s.find_ns(nsid) {
            Some(ni) => {
                if let Some(Some(ns)) = s.namespaces.get_mut(ni) {
                    ns.stats.record_media_error();
                }
            }
            None => s.media_errors = s.media_errors.saturating_add(1),
        }
    }

    /// A response on queue `qi` handing back the request's buffer. A failure is logged in the
    /// controller's Error Information log, pointing at the field the status is about
    /// ([`errlog::default_at`]).
    pub(crate) fn respond(
        &mut self,
        qi: usize,
        req: Request,
        status: Status,
        dw0: u32,
    ) -> Response {
        let at = errlog::default_at(&req.sqe, status);
        self.respond_with(qi, req, status, dw0, at, 0)
    }

    /// [`Target::respond`] for a failure whose field (and LBA) the handler knows.
    pub(crate) fn respond_at(
        &mut self,
        qi: usize,
        req: Request,
        status: Status,
        at: ErrAt,
    ) -> Response {
        self.respond_with(qi, req, status, 0, at, 0)
    }

    fn respond_with(
        &mut self,
        qi: usize,
        req: Request,
        status: Status,
        dw0: u32,
        at: ErrAt,
        trtype: u8,
    ) -> Response {
        let mut cqe = match self.queues.get(qi) {
            Some(q) => q.cqe(req.sqe.cid, status, dw0),
            None => Cqe::new(req.sqe.cid, status),
        };
        if errlog::is_logged(status)
            && let Some(ci) = self.ctrl_of(qi)
        {
            let sqid = self.queues[qi].qid;
            if let Some(Some(c)) = self.ctrls.get_mut(ci)
                && c.log_error(sqid, req.sqe.cid, req.sqe.nsid, status, at, trtype)
            {
                cqe.status.more = true;
                self.replica_errors |= c.replica;
            }
        }
        Response {
            cqe,
            buf: req.buf,
            data_len: 0,
            cookie: req.cookie,
        }
    }

    fn unconnected(&mut self, now: Instant, qi: usize, req: Request) -> Response {
        let is_connect = req.sqe.opcode == keel_nvme::opcode::FABRICS_OPCODE
            && req.sqe.fctype() == keel_nvme::FabricsType::Connect as u8;
        if is_connect {
            self.connect(now, qi, req)
        } else {
            self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0)
        }
    }

    /// Advances time: delivers completions from backends and queued events, retries
    /// commands a busy backend refused, enforces keep-alive and finishes shutdowns.
    /// Returns the number of events delivered.
    pub fn poll(&mut self, now: Instant, f: &mut dyn FnMut(Event)) -> usize {
        self.now = now;
        let mut n = 0;
        while let Some(e) = self.pending.pop_front() {
            f(e);
            n += 1;
        }
        // Keep-alive first: a host silent for KATO is not rescued by a completion that
        // happens to arrive in this pass.
        self.check_keep_alive(now);
        n += self.poll_backends(now, f);
        n += self.dispatch(now, f);
        self.finish_shutdowns();
        self.reap_namespaces();
        while let Some(e) = self.pending.pop_front() {
            f(e);
            n += 1;
        }
        n
    }

    fn check_keep_alive(&mut self, now: Instant) {
        for ci in 0..self.ctrls.len() {
            let expired = match &self.ctrls[ci] {
                Some(c) if c.kato_ms != 0 => {
                    now.millis_since(c.last_activity)
                        > c.kato_ms as u64 + self.limits.kato_grace_ms as u64
                }
                _ => false,
            };
            if expired {
                self.destroy_controller(ci, None);
            }
        }
    }

    fn finish_shutdowns(&mut self) {
        for c in self.ctrls.iter_mut().flatten() {
            if c.shutdown_pending && c.outstanding == 0 {
                c.shutdown_pending = false;
                c.csts.set_shst(Csts::SHST_COMPLETE);
            }
        }
    }

    fn reap_namespaces(&mut self) {
        for si in 0..self.subsystems.len() {
            for ni in 0..self.subsystems[si].namespaces.len() {
                if matches!(&self.subsystems[si].namespaces[ni], Some(ns) if !ns.active) {
                    self.reap_namespace(si, ni);
                }
            }
        }
    }

    fn poll_backends(&mut self, now: Instant, f: &mut dyn FnMut(Event)) -> usize {
        let Target {
            subsystems,
            queues,
            ctrls,
            sched,
            scratch,
            hstride,
            replica_errors,
            holder_verdicts,
            ..
        } = self;
        let mut n = 0;
        for s in subsystems.iter_mut() {
            for ns in s.namespaces.iter_mut().flatten() {
                if ns.inflight == 0 {
                    continue;
                }
                let Namespace {
                    backend,
                    stats,
                    inflight,
                    geometry,
                    domain,
                    ..
                } = ns;
                let bs = geometry.block_size;
                backend.poll(&mut |c| {
                    *inflight = inflight.saturating_sub(1);
                    sched.completed(*domain);
                    let mut p = Parts {
                        queues,
                        ctrls,
                        scratch,
                        replica_errors,
                        holder_verdicts,
                    };
                    n += complete_io(&mut p, sched, *hstride, stats, bs, now, c, f);
                });
            }
        }
        n
    }

    /// Starts what may start: commands waiting for a scratch buffer, in arrival order, while
    /// the scratch pool has buffers; then what the scheduler lets go (limits, turns, room at
    /// the backends).
    pub(crate) fn dispatch(&mut self, now: Instant, f: &mut dyn FnMut(Event)) -> usize {
        let mut n = 0;
        while let Some(&h) = self.scratch_wait.front() {
            if self.scratch.as_ref().is_none_or(|p| p.available() == 0) {
                break;
            }
            self.scratch_wait.pop_front();
            let (qi, si) = self.split(h);
            if let Some(ev) = self.try_slot(qi, si, now) {
                f(ev);
                n += 1;
            }
        }
        while let Some((h, _)) = self.sched.next(now.as_nanos()) {
            let (qi, si) = self.split(h);
            let live = self
                .queues
                .get(qi)
                .and_then(|q| q.slots.get(si))
                .is_some_and(|s| s.state == SlotState::Queued);
            if !live {
                continue;
            }
            if let Some(ev) = self.try_slot(qi, si, now) {
                f(ev);
                n += 1;
            }
        }
        n
    }

    /// Queue index and slot of a scheduler handle.
    pub(crate) fn split(&self, h: u32) -> (usize, usize) {
        ((h / self.hstride) as usize, (h % self.hstride) as usize)
    }

    /// Hands an admitted command (its parked request, or its chain's next step) to the
    /// namespace's backend. Returns the completion if the command ended here (refused as
    /// invalid, or a chain with nothing left to do). A busy backend sends it back to the
    /// scheduler, first in its flow; a chain that needs a scratch buffer when none is free
    /// waits in `scratch_wait`.
    pub(crate) fn try_slot(&mut self, qi: usize, si: usize, now: Instant) -> Option<Event> {
        let (sub, ni, flow, cost) = {
            let slot = &self.queues[qi].slots[si];
            (slot.ns.0 as usize, slot.ns.1 as usize, slot.flow, slot.cost)
        };
        let h = handle(self.hstride, qi, si);
        let req = match self.next_request(qi, si, sub, ni) {
            Next::Ready(r) => r,
            Next::Wait => {
                self.queues[qi].slots[si].state = SlotState::Deferred;
                self.scratch_wait.push_back(h);
                return None;
            }
            Next::Done => {
                if let Some(fl) = flow {
                    self.sched.finished(fl);
                }
                return self.finish_slot(qi, si, Status::SUCCESS, None, now);
            }
        };
        let Some(Some(ns)) = self
            .subsystems
            .get_mut(sub)
            .and_then(|s| s.namespaces.get_mut(ni))
        else {
            // Namespace gone (cannot happen while commands wait for it): fail.
            if let Some(fl) = flow {
                self.sched.finished(fl);
            }
            return self.finish_slot(qi, si, Status::INTERNAL_ERROR, req.buf, now);
        };
        match ns.backend.submit(req) {
            Ok(()) => {
                ns.inflight += 1;
                self.queues[qi].slots[si].state = SlotState::InFlight;
                None
            }
            Err(r) => match r.reason {
                RejectReason::Busy => {
                    let slot = &mut self.queues[qi].slots[si];
                    slot.deferred = Some(r.req);
                    slot.state = SlotState::Queued;
                    if let Some(fl) = flow {
                        let _ = self.sched.requeue_busy(fl, h, cost);
                    }
                    None
                }
                RejectReason::Invalid(e) => {
                    if let Some(fl) = flow {
                        self.sched.finished(fl);
                    }
                    let buf = r.req.buf;
                    self.finish_slot(qi, si, block_status(e), buf, now)
                }
            },
        }
    }

    /// The request a Deferred slot submits next.
    fn next_request(&mut self, qi: usize, si: usize, sub: usize, ni: usize) -> Next {
        let t = self.queues[qi].tag(qi, si);
        let bs = match self.subsystems.get(sub).and_then(|s| s.namespaces.get(ni)) {
            Some(Some(ns)) => ns.geometry.block_size,
            _ => 512,
        };
        let slot = &mut self.queues[qi].slots[si];
        if let Some(r) = slot.deferred.take() {
            return Next::Ready(r);
        }
        let Some(chain) = slot.chain.as_mut() else {
            return Next::Done;
        };
        if chain.needs_scratch() {
            match self.scratch.as_mut().and_then(BufPool::get) {
                Some(b) => {
                    if let Some(b) = chain.give_scratch(b)
                        && let Some(p) = self.scratch.as_mut()
                    {
                        let _ = p.put(b);
                    }
                }
                None => return Next::Wait,
            }
        }
        match chain.next(t, bs) {
            Step::Submit(r) => Next::Ready(r),
            Step::NeedScratch => Next::Wait,
            Step::Done => Next::Done,
        }
    }

    /// Completes the command in a slot with `status` outside of a backend poll. `buf` is the
    /// buffer of its request, if any. A second event (an Abort's verdict) goes to `pending`.
    pub(crate) fn finish_slot(
        &mut self,
        qi: usize,
        si: usize,
        status: Status,
        buf: Option<IoBuf>,
        now: Instant,
    ) -> Option<Event> {
        let (sub, ni) = {
            let slot = self.queues.get(qi)?.slots.get(si)?;
            (slot.ns.0 as usize, slot.ns.1 as usize)
        };
        let Target {
            subsystems,
            queues,
            ctrls,
            scratch,
            pending,
            replica_errors,
            holder_verdicts,
            ..
        } = self;
        let stats = match subsystems
            .get_mut(sub)
            .and_then(|s| s.namespaces.get_mut(ni))
        {
            Some(Some(ns)) => Some(&mut ns.stats),
            _ => None,
        };
        let mut p = Parts {
            queues,
            ctrls,
            scratch,
            replica_errors,
            holder_verdicts,
        };
        let mut first = None;
        finalize(&mut p, stats, qi, si, status, buf, now, &mut |e| {
            if first.is_none() {
                first = Some(e);
            } else {
                pending.push_back(e);
            }
        });
        first
    }
}

/// What a Deferred slot does next.
enum Next {
    Ready(BlockRequest),
    Wait,
    Done,
}

/// The parts of the target a completion touches while a namespace's backend is borrowed.
pub(crate) struct Parts<'a> {
    pub queues: &'a mut [Queue],
    pub ctrls: &'a mut [Option<Controller>],
    pub scratch: &'a mut Option<BufPool>,
    /// Set when a replica controller logged an error ([`Target::take_replica_errors`]).
    pub replica_errors: &'a mut bool,
    /// Verdicts of the holder's Aborts ([`Target::take_abort_verdicts`]).
    pub holder_verdicts: &'a mut Vec<(u32, bool)>,
}

/// The completion of an Abort that waited for command `waiter` of controller `ci`: DW0 bit 0
/// clear if the command was aborted, set if not (NVMe base 2.0 §5.1).
pub(crate) fn abort_verdict(
    queues: &[Queue],
    ctrls: &mut [Option<Controller>],
    ci: usize,
    cntlid: u16,
    waiter: (u16, u32),
    aborted: bool,
) -> Option<Event> {
    let c = ctrls.get_mut(ci)?.as_mut().filter(|c| c.cntlid == cntlid)?;
    c.aborts_pending = c.aborts_pending.saturating_sub(1);
    let aq = c.admin_q;
    let q = queues
        .get(aq.index as usize)
        .filter(|q| q.generation == aq.generation && q.state == QState::Connected)?;
    let dw0 = if aborted {
        0
    } else {
        keel_nvme::io::AbortCommand::NOT_ABORTED
    };
    Some(Event::Completion(
        aq,
        Response {
            cqe: q.cqe(waiter.0, Status::SUCCESS, dw0),
            buf: None,
            data_len: 0,
            cookie: waiter.1,
        },
    ))
}

/// Ends the command in slot `si` of queue `qi` with `status`: statistics, the Error
/// Information log, the controller's busy time, buffers (scratch back to its pool, the
/// host's buffer into the response) and the completion, then the verdict of an Abort that
/// waited for it. Returns the number of events.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize(
    p: &mut Parts<'_>,
    stats: Option<&mut NsStats>,
    qi: usize,
    si: usize,
    status: Status,
    buf: Option<IoBuf>,
    now: Instant,
    out: &mut dyn FnMut(Event),
) -> usize {
    let mut n = 0;
    let Some(queue) = p.queues.get_mut(qi) else {
        return 0;
    };
    let Some(slot) = queue.slots.get_mut(si) else {
        return 0;
    };
    let mut buf = buf;
    if let Some(chain) = slot.chain.take() {
        let (s, host) = chain.into_buffers();
        // The failing step's buffer, if any, is the chain's scratch buffer.
        for b in [s, buf.take()].into_iter().flatten() {
            n += release_buffer(p.scratch, queue.owner, b, out);
        }
        buf = host;
    }
    let data_len = if status.is_success() {
        slot.read_len
    } else {
        0
    };
    if let Some(b) = buf.as_mut()
        && data_len > 0
    {
        b.set_len(data_len as usize);
    }
    if let Some(st) = stats {
        st.record(
            slot.kind,
            slot.bytes,
            status.is_success(),
            slot.start.as_nanos(),
            now.as_nanos(),
        );
        if is_media_error(status) {
            st.record_media_error();
        }
    }
    slot.state = SlotState::Free;
    slot.deferred = None;
    let waiter = slot.abort_waiter.take();
    let holder_waiter = slot.holder_abort.take();
    let (cid, cookie, nsid, lba) = (slot.cid, slot.cookie, slot.nsid, slot.lba);
    let mut cqe = queue.cqe(cid, status, 0);
    let (sqid, ci, cntlid) = (queue.qid, queue.ctrl, queue.cntlid);
    let id = queue.id(qi);
    if let Some(Some(c)) = p.ctrls.get_mut(ci)
        && c.cntlid == cntlid
    {
        c.io_ended(1, now);
        c.last_activity = now;
        if c.log_error(sqid, cid, nsid, status, ErrAt::block(lba), 0) {
            cqe.status.more = true;
            *p.replica_errors |= c.replica;
        }
    }
    out(Event::Completion(
        id,
        Response {
            cqe,
            buf,
            data_len,
            cookie,
        },
    ));
    n += 1;
    let aborted =
        status.sct == Status::ABORT_REQUESTED.sct && status.sc == Status::ABORT_REQUESTED.sc;
    if let Some(w) = waiter
        && let Some(ev) = abort_verdict(p.queues, p.ctrls, ci, cntlid, w, aborted)
    {
        out(ev);
        n += 1;
    }
    if let Some(token) = holder_waiter {
        p.holder_verdicts.push((token, aborted));
    }
    n
}

/// A response to a request that has no queue.
pub(crate) fn bare_response(req: Request, status: Status) -> Response {
    Response {
        cqe: Cqe::new(req.sqe.cid, status),
        buf: req.buf,
        data_len: 0,
        cookie: req.cookie,
    }
}

/// Handles one backend completion (called from inside the backend's poll): a chained
/// command's next step goes back to the scheduler, anything else completes.
#[allow(clippy::too_many_arguments)]
fn complete_io(
    p: &mut Parts<'_>,
    sched: &mut Scheduler,
    hstride: u32,
    stats: &mut NsStats,
    block_size: u32,
    now: Instant,
    c: keel_storage::BlockCompletion,
    f: &mut dyn FnMut(Event),
) -> usize {
    let (qi, generation, si) = untag(c.tag);
    let live = matches!(
        p.queues.get(qi),
        Some(q) if q.generation as u8 == generation
            && q.state == QState::Connected
            && q.slots.get(si).is_some_and(|s| s.state == SlotState::InFlight)
    );
    if !live {
        // The queue went away: only the buffer comes back.
        return match c.buf {
            Some(b) => release_buffer(p.scratch, tag_owner(c.tag), b, f),
            None => 0,
        };
    }
    let status = match c.result {
        Ok(()) => Status::SUCCESS,
        Err(e) => block_status(e),
    };
    let mut buf = c.buf;
    let slot = &mut p.queues[qi].slots[si];
    // `poll_backends` freed its place in the domain; its flow is done with it too (a next
    // step below waits in the flow again).
    if let Some(fl) = slot.flow {
        sched.release(fl);
    }
    if status.is_success()
        && let Some(chain) = slot.chain.as_mut()
    {
        if let Some(b) = buf.take() {
            buf = chain.give_scratch(b);
        }
        let next = match chain.next(c.tag, block_size) {
            Step::Submit(r) => Some(Some(r)),
            Step::NeedScratch => Some(None),
            Step::Done => None,
        };
        if let Some(r) = next {
            // The next step waits for its turn in the domain, first in its flow.
            slot.deferred = r;
            slot.state = SlotState::Queued;
            if let Some(fl) = slot.flow {
                let _ = sched.requeue_next_step(fl, handle(hstride, qi, si), slot.cost);
            }
            return match buf {
                Some(b) => release_buffer(p.scratch, tag_owner(c.tag), b, f),
                None => 0,
            };
        }
    }
    finalize(p, Some(stats), qi, si, status, buf, now, f)
}

pub(crate) fn sqe_is_fabrics(s: &Sqe) -> bool {
    s.opcode == keel_nvme::opcode::FABRICS_OPCODE
}
