//! The target: subsystems, controllers, queues, and the submit/poll entry points.

use crate::config::*;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use keel_nvme::regs::{Cc, Csts};
use keel_nvme::{Cqe, Sqe, Status};
use keel_storage::{
    BlockBackend, BlockError, BlockRequest, Capabilities, Geometry, IoBuf, NsStats, OpKind,
    RejectReason,
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
}

pub(crate) struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allowed_hosts: Vec<String>,
    pub discovery: bool,
    /// Stable slots: a command refers to its namespace by index.
    pub namespaces: Vec<Option<Namespace>>,
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
    InFlight,
    Deferred,
}

pub(crate) struct Dsm {
    pub buf: IoBuf,
    pub next: u16,
    pub count: u16,
}

pub(crate) struct Slot {
    pub state: SlotState,
    pub cid: u16,
    pub cookie: u32,
    pub ns: (u16, u16),
    pub kind: OpKind,
    pub bytes: u64,
    pub read_len: u32,
    pub start: Instant,
    pub deferred: Option<BlockRequest>,
    pub dsm: Option<Dsm>,
}

impl Slot {
    pub(crate) const fn free_slot() -> Self {
        Self {
            state: SlotState::Free,
            cid: 0,
            cookie: 0,
            ns: (0, 0),
            kind: OpKind::Other,
            bytes: 0,
            read_len: 0,
            start: Instant::from_nanos(0),
            deferred: None,
            dsm: None,
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
    pub slots: Vec<Slot>,
}

impl Queue {
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
    pub(crate) deferred: usize,
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

pub(crate) fn make_namespace(
    ns: NamespaceConfig,
    limits: &Limits,
) -> Result<Namespace, ConfigError> {
    if ns.nsid == 0 || ns.nsid > limits.max_nsid || ns.nsid == keel_nvme::NSID_ALL {
        return Err(ConfigError::BadNsid(ns.nsid));
    }
    let g = ns.backend.geometry();
    if !g.block_size.is_power_of_two() || !(512..=65536).contains(&g.block_size) || g.blocks == 0 {
        return Err(ConfigError::BadGeometry(ns.nsid));
    }
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
    })
}

pub(crate) fn tag(qi: usize, generation: u16, slot: usize) -> u64 {
    ((qi as u64 & 0xFFFF) << 32) | ((generation as u64) << 16) | (slot as u64 & 0xFFFF)
}

pub(crate) fn untag(t: u64) -> (usize, u16, usize) {
    (
        ((t >> 32) & 0xFFFF) as usize,
        (t >> 16) as u16,
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
        BlockError::InvalidTag | BlockError::Internal => Status::INTERNAL_ERROR,
    }
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
        {
            return Err(ConfigError::BadLimits);
        }
        let mut subsystems = Vec::with_capacity(cfg.subsystems.len() + 1);
        subsystems.push(Subsystem {
            nqn: keel_nvme::DISCOVERY_NQN.into(),
            serial: String::new(),
            model: "Keel discovery controller".into(),
            allowed_hosts: Vec::new(),
            discovery: true,
            namespaces: Vec::new(),
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
                let ns = make_namespace(ns, &l)?;
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
            });
        }
        let mut ctrls = Vec::with_capacity(l.max_controllers);
        ctrls.resize_with(l.max_controllers, || None);
        Ok(Self {
            limits: l,
            transport: cfg.transport,
            identity: cfg.identity,
            subsystems,
            ports: cfg.ports,
            genctr: 1,
            ctrls,
            next_cntlid: 1,
            queues: Vec::new(),
            pending: VecDeque::with_capacity(64),
            deferred: 0,
        })
    }

    /// Replaces the advertised listen ports (e.g. once DHCP assigned an address). Bumps the
    /// discovery generation counter and notifies discovery controllers that asked for
    /// Discovery Log Page Change events.
    pub fn set_ports(&mut self, ports: Vec<PortEntry>) {
        self.ports = ports;
        self.discovery_changed();
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
        let ns = make_namespace(ns, &self.limits)?;
        let nsid = ns.nsid;
        let s = &mut self.subsystems[si];
        if s.namespaces
            .iter()
            .flatten()
            .any(|n| n.nsid == nsid && n.active)
        {
            return Err(ConfigError::BadNsid(nsid).into());
        }
        match s.namespaces.iter_mut().find(|n| n.is_none()) {
            Some(free) => *free = Some(ns),
            None => s.namespaces.push(Some(ns)),
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
            let drained = match slot {
                Some(ns) => {
                    ns.active = false;
                    ns.inflight == 0 && !self.any_deferred_on(si, ni)
                }
                None => false,
            };
            if drained
                && let Some(s) = self.subsystems.get_mut(si)
                && let Some(x) = s.namespaces.get_mut(ni)
            {
                *x = None;
            }
        }
        self.namespace_changed(si, nsid);
        Ok(())
    }

    fn any_deferred_on(&self, si: usize, ni: usize) -> bool {
        self.deferred > 0
            && self.queues.iter().any(|q| {
                q.slots
                    .iter()
                    .any(|s| s.state == SlotState::Deferred && s.ns == (si as u16, ni as u16))
            })
    }

    fn namespace_changed(&mut self, si: usize, nsid: u32) {
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
        self.subsystems.iter().position(|s| s.nqn == nqn)
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

    /// Opens a transport queue (call when a connection is accepted, before its Connect).
    pub fn open_queue(&mut self) -> Result<QueueId, TargetError> {
        if let Some(i) = self.queues.iter().position(|q| q.state == QState::Free) {
            let q = &mut self.queues[i];
            q.state = QState::Open;
            q.disconnected = false;
            q.sqflow_disabled = false;
            q.sqhd = 0;
            return Ok(QueueId {
                index: i as u16,
                generation: q.generation,
            });
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
            slots: Vec::new(),
        });
        Ok(QueueId {
            index: (self.queues.len() - 1) as u16,
            generation: 0,
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
    /// closed it in order (a TCP FIN: Linux closes its I/O queues this way before it shuts the
    /// controller down over the admin queue) only loses that queue; an abrupt loss (reset,
    /// timeout, transport error) ends the association, as Linux's target does. Losing the admin
    /// queue always ends the controller.
    pub fn close_queue_after(&mut self, q: QueueId, how: QueueLoss) -> Result<(), TargetError> {
        let qi = self.queue_index(q).ok_or(TargetError::UnknownQueue)?;
        if let Some(ci) = self.ctrl_of(qi) {
            let (is_admin, graceful, local) = {
                let queue = &self.queues[qi];
                let c = self.ctrls[ci].as_ref();
                (
                    queue.qid == 0,
                    queue.disconnected || how == QueueLoss::Orderly,
                    c.map(|c| c.local).unwrap_or(false),
                )
            };
            if is_admin || (!graceful && !local) {
                self.destroy_controller(ci, Some(qi));
            } else if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                let qid = self.queues[qi].qid as usize;
                if let Some(x) = qid.checked_sub(1).and_then(|i| c.io_qs.get_mut(i)) {
                    *x = None;
                }
            }
        }
        self.release_queue(qi);
        let queue = &mut self.queues[qi];
        queue.state = QState::Free;
        queue.generation = queue.generation.wrapping_add(1);
        queue.slots = Vec::new();
        Ok(())
    }

    /// Drops the commands of a queue: deferred requests give their buffers back now, in-flight
    /// ones when the backend returns them. The controller's outstanding count is adjusted.
    fn release_queue(&mut self, qi: usize) {
        let Some(queue) = self.queues.get_mut(qi) else {
            return;
        };
        let ci = queue.ctrl;
        let cntlid = queue.cntlid;
        let mut dropped = 0u32;
        for s in queue.slots.iter_mut() {
            match s.state {
                SlotState::Free => continue,
                SlotState::Deferred => {
                    self.deferred = self.deferred.saturating_sub(1);
                    if let Some(b) = s.deferred.take().and_then(|r| r.buf) {
                        self.pending.push_back(Event::BufferReleased(b));
                    }
                }
                SlotState::InFlight => {}
            }
            if let Some(d) = s.dsm.take() {
                self.pending.push_back(Event::BufferReleased(d.buf));
            }
            s.state = SlotState::Free;
            dropped += 1;
        }
        // In-flight requests keep their tag; the generation bump in close_queue (or the
        // Terminated state) makes their completion release the buffer.
        if let Some(Some(c)) = self.ctrls.get_mut(ci)
            && c.cntlid == cntlid
        {
            c.outstanding = c.outstanding.saturating_sub(dropped);
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
        if let Some(slot) = self.ctrls.get_mut(ci) {
            *slot = None;
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
        let id = QueueId {
            index: qi as u16,
            generation: queue.generation,
        };
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
    /// command went to a backend (or is an Asynchronous Event Request); it then completes
    /// through [`Target::poll`]. Every command gets exactly one response.
    pub fn submit(&mut self, now: Instant, q: QueueId, req: Request) -> Option<Response> {
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
                {
                    let queue = &mut self.queues[qi];
                    let entries = queue.sqsize as u32 + 1;
                    queue.sqhd = ((queue.sqhd as u32 + 1) % entries) as u16;
                }
                if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                    c.last_activity = now;
                }
                if self.queues[qi].qid == 0 {
                    self.admin(now, qi, ci, req)
                } else {
                    self.io(now, qi, ci, req)
                }
            }
        }
    }

    /// Completes a command the transport itself rejected (a bad SGL, a data digest error...)
    /// with `status`, consuming its submission queue slot like any other command so SQHD and
    /// flow control stay right. The command never reaches admin or I/O handling.
    pub fn reject(&mut self, now: Instant, q: QueueId, req: Request, status: Status) -> Response {
        let Some(qi) = self.queue_index(q) else {
            return bare_response(req, status);
        };
        if self.queues[qi].state == QState::Connected {
            let queue = &mut self.queues[qi];
            let entries = queue.sqsize as u32 + 1;
            queue.sqhd = ((queue.sqhd as u32 + 1) % entries) as u16;
            if let Some(Some(c)) = self.ctrl_of(qi).and_then(|ci| self.ctrls.get_mut(ci)) {
                c.last_activity = now;
            }
        }
        self.respond(qi, req, status, 0)
    }

    /// A response on queue `qi` handing back the request's buffer.
    pub(crate) fn respond(&self, qi: usize, req: Request, status: Status, dw0: u32) -> Response {
        let cqe = match self.queues.get(qi) {
            Some(q) => q.cqe(req.sqe.cid, status, dw0),
            None => Cqe::new(req.sqe.cid, status),
        };
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
        let mut n = 0;
        while let Some(e) = self.pending.pop_front() {
            f(e);
            n += 1;
        }
        // Keep-alive first: a host silent for KATO is not rescued by a completion that
        // happens to arrive in this pass.
        self.check_keep_alive(now);
        if self.deferred > 0 {
            n += self.retry_deferred(now, f);
        }
        n += self.poll_backends(now, f);
        if self.deferred > 0 {
            n += self.retry_deferred(now, f);
        }
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
        let deferred_busy = self.deferred > 0;
        for s in self.subsystems.iter_mut() {
            for slot in s.namespaces.iter_mut() {
                if matches!(slot, Some(ns) if !ns.active && ns.inflight == 0) && !deferred_busy {
                    *slot = None;
                }
            }
        }
    }

    fn poll_backends(&mut self, now: Instant, f: &mut dyn FnMut(Event)) -> usize {
        let Target {
            subsystems,
            queues,
            ctrls,
            deferred,
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
                    ..
                } = ns;
                let bs = geometry.block_size;
                backend.poll(&mut |c| {
                    *inflight = inflight.saturating_sub(1);
                    n += complete_io(queues, ctrls, deferred, stats, bs, now, c, f);
                });
            }
        }
        n
    }

    /// Submits (again) every deferred request.
    fn retry_deferred(&mut self, now: Instant, f: &mut dyn FnMut(Event)) -> usize {
        let mut n = 0;
        for qi in 0..self.queues.len() {
            if self.queues[qi].state != QState::Connected {
                continue;
            }
            for si in 0..self.queues[qi].slots.len() {
                if self.queues[qi].slots[si].state != SlotState::Deferred {
                    continue;
                }
                let slot = &mut self.queues[qi].slots[si];
                let Some(req) = slot.deferred.take() else {
                    continue;
                };
                let (sub, ni) = (slot.ns.0 as usize, slot.ns.1 as usize);
                self.deferred = self.deferred.saturating_sub(1);
                let Some(Some(ns)) = self
                    .subsystems
                    .get_mut(sub)
                    .and_then(|s| s.namespaces.get_mut(ni))
                else {
                    // Namespace gone (cannot happen while deferred work exists): fail.
                    let mut r = req;
                    if let Some(resp) =
                        self.finish_slot(qi, si, Status::INTERNAL_ERROR, r.buf.take(), now)
                    {
                        f(resp);
                        n += 1;
                    }
                    continue;
                };
                match ns.backend.submit(req) {
                    Ok(()) => {
                        ns.inflight += 1;
                        self.queues[qi].slots[si].state = SlotState::InFlight;
                    }
                    Err(r) => match r.reason {
                        RejectReason::Busy => {
                            let slot = &mut self.queues[qi].slots[si];
                            slot.deferred = Some(r.req);
                            self.deferred += 1;
                        }
                        RejectReason::Invalid(e) => {
                            let mut req = r.req;
                            if let Some(ev) =
                                self.finish_slot(qi, si, block_status(e), req.buf.take(), now)
                            {
                                f(ev);
                                n += 1;
                            }
                        }
                    },
                }
            }
        }
        n
    }

    /// Completes the command in a slot with `status` outside of a backend poll.
    pub(crate) fn finish_slot(
        &mut self,
        qi: usize,
        si: usize,
        status: Status,
        buf: Option<IoBuf>,
        now: Instant,
    ) -> Option<Event> {
        let Target {
            subsystems,
            queues,
            ctrls,
            ..
        } = self;
        let queue = queues.get_mut(qi)?;
        let slot = queue.slots.get_mut(si)?;
        let mut buf = buf;
        if let Some(d) = slot.dsm.take() {
            buf = Some(d.buf);
        }
        slot.state = SlotState::Free;
        let (sub, ni) = (slot.ns.0 as usize, slot.ns.1 as usize);
        if let Some(Some(ns)) = subsystems
            .get_mut(sub)
            .and_then(|s| s.namespaces.get_mut(ni))
        {
            ns.stats.record(
                slot.kind,
                slot.bytes,
                status.is_success(),
                slot.start.as_nanos(),
                now.as_nanos(),
            );
        }
        let (cid, cookie) = (slot.cid, slot.cookie);
        let cqe = queue.cqe(cid, status, 0);
        if let Some(Some(c)) = ctrls.get_mut(queue.ctrl)
            && c.cntlid == queue.cntlid
        {
            c.outstanding = c.outstanding.saturating_sub(1);
            c.last_activity = now;
        }
        let id = QueueId {
            index: qi as u16,
            generation: queue.generation,
        };
        Some(Event::Completion(
            id,
            Response {
                cqe,
                buf,
                data_len: 0,
                cookie,
            },
        ))
    }
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

/// Handles one backend completion (called from inside the backend's poll).
#[allow(clippy::too_many_arguments)]
fn complete_io(
    queues: &mut [Queue],
    ctrls: &mut [Option<Controller>],
    deferred: &mut usize,
    stats: &mut NsStats,
    block_size: u32,
    now: Instant,
    c: keel_storage::BlockCompletion,
    f: &mut dyn FnMut(Event),
) -> usize {
    let (qi, generation, si) = untag(c.tag);
    let queue = match queues.get_mut(qi) {
        Some(q) if q.generation == generation && q.state == QState::Connected => q,
        _ => {
            if let Some(b) = c.buf {
                f(Event::BufferReleased(b));
                return 1;
            }
            return 0;
        }
    };
    let Some(slot) = queue
        .slots
        .get_mut(si)
        .filter(|s| s.state == SlotState::InFlight)
    else {
        if let Some(b) = c.buf {
            f(Event::BufferReleased(b));
            return 1;
        }
        return 0;
    };
    // Dataset Management: chain the next range.
    if let Some(d) = slot.dsm.as_mut()
        && c.result.is_ok()
    {
        while d.next < d.count {
            let i = d.next as usize;
            d.next += 1;
            if let Some(r) = keel_nvme::io::DsmRange::read(d.buf.as_slice(), i)
                && r.nlb > 0
            {
                slot.deferred = Some(BlockRequest {
                    tag: c.tag,
                    op: keel_storage::BlockOp::Deallocate,
                    lba: r.slba,
                    blocks: r.nlb,
                    buf: None,
                    buf_offset: 0,
                });
                slot.state = SlotState::Deferred;
                *deferred += 1;
                return 0;
            }
        }
    }
    let status = match c.result {
        Ok(()) => Status::SUCCESS,
        Err(e) => block_status(e),
    };
    let mut buf = c.buf;
    if let Some(d) = slot.dsm.take() {
        buf = Some(d.buf);
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
    let _ = block_size;
    stats.record(
        slot.kind,
        slot.bytes,
        status.is_success(),
        slot.start.as_nanos(),
        now.as_nanos(),
    );
    slot.state = SlotState::Free;
    let (cid, cookie) = (slot.cid, slot.cookie);
    let cqe = queue.cqe(cid, status, 0);
    if let Some(Some(ctrl)) = ctrls.get_mut(queue.ctrl)
        && ctrl.cntlid == queue.cntlid
    {
        ctrl.outstanding = ctrl.outstanding.saturating_sub(1);
        ctrl.last_activity = now;
    }
    f(Event::Completion(
        QueueId {
            index: qi as u16,
            generation,
        },
        Response {
            cqe,
            buf,
            data_len,
            cookie,
        },
    ));
    1
}

pub(crate) fn sqe_is_fabrics(s: &Sqe) -> bool {
    s.opcode == keel_nvme::opcode::FABRICS_OPCODE
}
