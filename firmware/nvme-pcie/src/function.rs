//! [`PcieFunction`]: the NVMe PCIe controller emulation of one function.

use crate::endpoint::EndpointFunction;
use crate::layout::{self, PAGE_SIZE};
use crate::queue::{self, Cq, IoPair, IoPlan, Kind, Lookup, Slot, Sq};
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use keel_controller::{Event, Instant, PropertySize, QueueId, Request, Response, Target};
use keel_nvme::cqe::command_specific as cs;
use keel_nvme::identify::{IDENTIFY_LEN, IdentifyNamespace, cns, ctrl_field};
use keel_nvme::regs::{Cc, Csts, offset};
use keel_nvme::sqe::Psdt;
use keel_nvme::{AdminOpcode, FeatureId, IoOpcode, NSID_ALL, Sqe, Status};
use keel_storage::{BufPool, IoBuf};

/// Completion Queue Invalid (DNR).
pub const COMPLETION_QUEUE_INVALID: Status =
    Status::command_specific(cs::COMPLETION_QUEUE_INVALID).with_dnr();
/// Invalid Queue Deletion (DNR).
pub const INVALID_QUEUE_DELETION: Status =
    Status::command_specific(cs::INVALID_QUEUE_DELETION).with_dnr();
/// Invalid Interrupt Vector (DNR).
pub const INVALID_INTERRUPT_VECTOR: Status =
    Status::command_specific(cs::INVALID_INTERRUPT_VECTOR).with_dnr();

/// Cookie bit of commands the function itself sends to the core.
const INTERNAL: u32 = 0x8000_0000;
/// Cookie of the shutdown Flush commands.
const FLUSH_COOKIE: u32 = INTERNAL | 1;
/// CID of internal commands.
const INTERNAL_CID: u16 = 0xFFFF;
/// Namespaces whose LBA size is remembered.
const LBADS_CACHE: usize = 32;

/// Configuration of one function.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// NQN of the subsystem (of the shared [`Target`]) this function exposes. Each function
    /// gets its own subsystem, so functions cannot reach each other's namespaces.
    pub subnqn: String,
    /// I/O queue pairs (SQ and CQ ids `1..=max_io_queues`); keep it equal to the target's
    /// `Limits::max_io_queues` (the core refuses SQ ids above that anyway).
    pub max_io_queues: u16,
    /// Commands fetched from one SQ per poll (fairness between queues).
    pub fetch_burst: u16,
    /// The owner of this function's core queues ([`Target::create_local_controller`]): the
    /// core's events for them carry it ([`Event::owner`]), so a poll loop serving several
    /// transports hands them to this function without asking the others.
    pub owner: u16,
}

impl FunctionConfig {
    /// 8 queue pairs, bursts of 32.
    pub fn new(subnqn: &str) -> Self {
        Self {
            subnqn: subnqn.into(),
            max_io_queues: 8,
            fetch_burst: 32,
            owner: 0,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_io_queues` is 0 or beyond what the doorbell page serves.
    BadQueueCount,
    /// Pool buffers smaller than a 4 KiB page (Identify needs one).
    BufferTooSmall,
    /// `fetch_burst` is 0.
    BadBurst,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::BadQueueCount => "I/O queue count must be 1..=511",
            ConfigError::BufferTooSmall => "pool buffers must hold at least 4 KiB",
            ConfigError::BadBurst => "fetch burst must be at least 1",
        })
    }
}

/// State of the function as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionState {
    /// CC.EN = 0 (or never enabled).
    Disabled,
    /// CSTS.RDY = 1, serving commands.
    Ready,
    /// CC.SHN written: draining, flushing, then CSTS.SHST = complete.
    ShuttingDown,
    /// CSTS.CFS = 1; nothing is processed until CC.EN goes to 0.
    Fatal,
}

/// Why the function set CSTS.CFS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalReason {
    /// Enabled with an invalid AQA, ASQ or ACQ (sizes < 2, not page aligned, outside host
    /// memory).
    BadAdminQueue,
    /// The controller core refused the controller or its CC value (CSS, MPS, AMS, IOSQES/IOCQES).
    CoreRefused,
    /// An SQ tail doorbell beyond the queue (Invalid Doorbell Write Value).
    SqTailDoorbell {
        /// Queue.
        qid: u16,
        /// Value written.
        value: u32,
    },
    /// A CQ head doorbell beyond the queue or past the entries posted.
    CqHeadDoorbell {
        /// Queue.
        qid: u16,
        /// Value written.
        value: u32,
    },
    /// A submission queue entry could not be read.
    SqFetch,
    /// A completion queue entry could not be written.
    CqPost,
    /// The core ended one of the function's queues.
    QueueTerminated,
    /// The device removed the function ([`PcieFunction::remove`]).
    Removed,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionStats {
    /// Commands fetched.
    pub commands: u64,
    /// Completion entries posted.
    pub completions: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Commands that failed a PRP check or transfer.
    pub prp_errors: u64,
    /// Controller enables.
    pub enables: u64,
}

/// An I/O queue pair leaving the function's core or asked back, or a host's Abort of one of
/// its commands (see [`crate::queue`]): the caller delivers it to the core named and, for an
/// export it cannot deliver, gives the pair straight back ([`PcieFunction::give_back`]).
#[derive(Debug)]
pub enum Handover {
    /// Serve this pair on core `core` (an index among [`PcieFunction::set_cores`]'s cores).
    Export {
        /// The core.
        core: u16,
        /// The pair, with its commands in flight.
        pair: IoPair,
    },
    /// Send I/O queue pair `qid` back from core `core`: once no command of it is in flight
    /// (`discard` false: a Delete I/O SQ, a shutdown, fewer cores), or at once with its
    /// commands dropped and nothing more posted (`discard`: a reset or a removal).
    Recall {
        /// The core serving it.
        core: u16,
        /// Its SQ ID.
        qid: u16,
        /// Drop its commands rather than finish them.
        discard: bool,
    },
    /// The host asked to abort command `cid` of pair `qid`, served on core `core`: that
    /// core's replica decides ([`keel_controller::Target::abort_for_holder`]) and the caller
    /// hands its verdict, now or once the command completed, to the function's target:
    /// [`keel_controller::Target::abort_verdict_from_elsewhere`]`(token, aborted)`. Until
    /// then the Abort waits; if the pair comes home first it is answered "not aborted" and a
    /// verdict given later is ignored. An Abort the caller cannot deliver is answered "not
    /// aborted" the same way.
    Abort {
        /// The core serving the pair.
        core: u16,
        /// Its SQ ID.
        qid: u16,
        /// The command's CID.
        cid: u16,
        /// Names the Abort in the verdict.
        token: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    None,
    /// Waiting for outstanding I/O.
    Draining,
    /// Flushing namespace `next` of the list.
    Flushing {
        next: usize,
        pending: bool,
    },
    /// CC.SHN handed to the core; it reports SHST.
    Forwarded,
}

/// What to do with a fetched command.
enum Plan {
    /// Answered by the transport with this status.
    Local(Status),
    CreateCq,
    CreateSq,
    DeleteCq,
    DeleteSq,
    /// Forwarded to the core with `data_len` bytes of data.
    Core {
        data_len: u32,
        to_host: bool,
        kind: Kind,
    },
    /// Cannot start now (no buffer): leave it in the SQ.
    Wait,
}

/// The emulated NVMe controller of one PCIe function (NVMe base 2.0 §3 PCIe register
/// interface, §3.5/§3.6 initialization, reset and shutdown, §5.3-5.6 queue management;
/// everything else is the controller core's). Sans-IO: it touches the host only through an
/// [`EndpointFunction`] and reads no clock. See the crate documentation for the calling
/// protocol.
pub struct PcieFunction {
    cfg: FunctionConfig,
    pool: BufPool,
    max_transfer: usize,
    state: FunctionState,
    fatal: Option<FatalReason>,
    initialized: bool,
    cc: Cc,
    csts: Csts,
    admin: Option<QueueId>,
    sqs: Vec<Sq>,
    cqs: Vec<Cq>,
    ncq: u16,
    lbads: Vec<(u32, u8)>,
    rr: usize,
    terminated: bool,
    shutdown: Shutdown,
    flush_nsids: Vec<u32>,
    flush_queue: Option<(QueueId, bool)>,
    stats: FunctionStats,
    /// I/O queue `q` goes to core `q % cores` (1: every queue stays here).
    cores: u16,
    /// Pairs leaving or asked back, for the caller to deliver.
    handovers: VecDeque<Handover>,
    /// Pairs on other cores (SQ ID, core), until they are back.
    abroad: Vec<(u16, u16)>,
    /// CC.EN went to 0 while pairs were abroad: the reset waits for them.
    pending_reset: bool,
    /// Core queues of pairs given back since the last poll: served here again (no Abort of
    /// theirs is asked of another core any more).
    came_home: Vec<QueueId>,
    /// Tokens of parked Aborts whose pair is not abroad: answered "not aborted".
    stray_aborts: Vec<u32>,
}

impl fmt::Debug for PcieFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PcieFunction")
            .field("subnqn", &self.cfg.subnqn)
            .field("state", &self.state)
            .field("fatal", &self.fatal)
            .field("stats", &self.stats)
            .finish()
    }
}

fn in_area(area: &core::ops::Range<u64>, addr: u64, len: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => addr >= area.start && end <= area.end,
        None => false,
    }
}

impl PcieFunction {
    /// A function exposing subsystem `cfg.subnqn`, moving data through `pool` (its buffers
    /// bound the largest transfer: make them at least 4 KiB << the target's MDTS).
    pub fn new(cfg: FunctionConfig, pool: BufPool) -> Result<Self, ConfigError> {
        if cfg.max_io_queues == 0 || cfg.max_io_queues > layout::MAX_QID {
            return Err(ConfigError::BadQueueCount);
        }
        if pool.buf_size() < IDENTIFY_LEN {
            return Err(ConfigError::BufferTooSmall);
        }
        if cfg.fetch_burst == 0 {
            return Err(ConfigError::BadBurst);
        }
        let n = cfg.max_io_queues as usize + 1;
        let mut sqs = Vec::with_capacity(n);
        sqs.resize_with(n, Sq::default);
        let mut cqs = Vec::with_capacity(n);
        cqs.resize_with(n, Cq::default);
        Ok(Self {
            max_transfer: pool.buf_size(),
            ncq: cfg.max_io_queues,
            cfg,
            pool,
            state: FunctionState::Disabled,
            fatal: None,
            initialized: false,
            cc: Cc(0),
            csts: Csts(0),
            admin: None,
            sqs,
            cqs,
            lbads: Vec::with_capacity(LBADS_CACHE),
            rr: 0,
            terminated: false,
            shutdown: Shutdown::None,
            flush_nsids: Vec::new(),
            flush_queue: None,
            stats: FunctionStats::default(),
            cores: 1,
            handovers: VecDeque::with_capacity(n),
            abroad: Vec::with_capacity(n),
            pending_reset: false,
            came_home: Vec::with_capacity(n),
            stray_aborts: Vec::new(),
        })
    }

    /// Current state.
    pub fn state(&self) -> FunctionState {
        self.state
    }

    /// Why CSTS.CFS was set, while it is.
    pub fn fatal_reason(&self) -> Option<FatalReason> {
        self.fatal
    }

    /// Counters.
    pub fn stats(&self) -> FunctionStats {
        self.stats
    }

    /// Pool buffers currently free (all of them once idle: buffers always come back).
    pub fn buffers_available(&self) -> usize {
        self.pool.available()
    }

    /// Size of the data buffer pool.
    pub fn buffers_total(&self) -> usize {
        self.pool.count()
    }

    /// Tears the function down and hands its buffer pool back (to build another function over
    /// the same memory: pools are carved once). Reset it first (CC.EN = 0 and a poll) so that
    /// every buffer is home: [`PcieFunction::buffers_available`] = [`PcieFunction::buffers_total`].
    pub fn into_pool(self) -> BufPool {
        self.pool
    }

    /// Largest transfer per command in bytes.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// The admin queue of the function's controller in the core, while a host has it
    /// enabled (to set that controller's limits: [`keel_controller::Target::set_controller_limits`]).
    pub fn admin_queue(&self) -> Option<QueueId> {
        self.admin
    }

    /// The owner of this function's core queues ([`FunctionConfig::owner`]).
    pub fn owner(&self) -> u16 {
        self.cfg.owner
    }

    /// True when `q` is one of this function's core queues.
    pub fn owns(&self, q: QueueId) -> bool {
        self.admin == Some(q)
            || self.sqs.iter().any(|s| s.live && s.core == Some(q))
            || matches!(self.flush_queue, Some((f, _)) if f == q)
    }

    /// Spreads the I/O queues created from now on over `cores` cores: I/O queue `q` (an SQ
    /// created on a CQ no other SQ uses) goes to core `q % cores` through
    /// [`Handover::Export`] unless that is core 0, this one. `cores` ≤ 1 keeps every queue
    /// here and asks back the pairs abroad (they finish their commands first).
    pub fn set_cores(&mut self, cores: u16) {
        self.cores = cores.max(1);
        if self.cores == 1 {
            self.recall_all(false);
        }
    }

    /// The next pair to deliver to another core or to ask back from one, or Abort to ask of
    /// the core serving a pair.
    pub fn take_handover(&mut self) -> Option<Handover> {
        self.handovers.pop_front()
    }

    /// Pairs on other cores (exported, back not yet given): while there are any, a reset
    /// does not complete and a removed function's window must not be reused.
    pub fn abroad(&self) -> usize {
        self.abroad.len()
    }

    /// The controller core's queue behind I/O SQ `qid` (to build the [`keel_controller::Adoption`]
    /// of a pair being exported: [`keel_controller::Target::adoption`]).
    pub fn core_queue(&self, qid: u16) -> Option<QueueId> {
        self.sqs
            .get(qid as usize)
            .filter(|s| s.live && qid > 0)
            .and_then(|s| s.core)
    }

    /// A pair comes back from the core that served it (asked back, or refused there): it is
    /// served here again exactly where it stopped. A pair whose queues are gone meanwhile (a
    /// reset or a removal dropped them) is dropped. From the next poll its queue is no longer
    /// served elsewhere: Aborts of its commands still waiting for the other core's verdict
    /// are answered "not aborted" then (a verdict that comes later is ignored).
    pub fn give_back(&mut self, pair: IoPair) {
        let qid = pair.qid();
        self.abroad.retain(|&(q, _)| q != qid);
        let cqid = pair.cqid() as usize;
        let q = qid as usize;
        if let Some(core) = self.sqs.get(q).and_then(|s| s.core) {
            self.came_home.push(core);
        }
        if q < self.sqs.len()
            && cqid < self.cqs.len()
            && self.sqs[q].away
            && self.cqs[cqid].away
            && self.sqs[q].cqid as usize == cqid
        {
            let (sqs, cqs) = (&mut self.sqs, &mut self.cqs);
            pair.restore(&mut sqs[q], &mut cqs[cqid]);
        }
    }

    /// The core serving pair `qid` found it broken (an invalid doorbell value, host memory
    /// refusing a queue entry): CSTS.CFS, as if it had happened here.
    pub fn core_fatal(&mut self, qid: u16, why: FatalReason) {
        if self.abroad.iter().any(|&(q, _)| q == qid)
            && matches!(
                self.state,
                FunctionState::Ready | FunctionState::ShuttingDown
            )
        {
            self.set_fatal(why);
        }
    }

    /// Asks every pair abroad back (once; a discard after a drain is asked again).
    fn recall_all(&mut self, discard: bool) {
        let abroad = core::mem::take(&mut self.abroad);
        for &(qid, core) in &abroad {
            self.recall(qid, core, discard);
        }
        self.abroad = abroad;
    }

    fn recall(&mut self, qid: u16, core: u16, discard: bool) {
        let sq = self.sqs.get_mut(qid as usize);
        if let Some(sq) = sq {
            if sq.recalled && !discard {
                return;
            }
            sq.recalled = true;
        }
        self.handovers
            .push_back(Handover::Recall { core, qid, discard });
    }

    /// After a successful Create I/O SQ `qid`: sends the pair to its core if the placement
    /// says so and its CQ is its alone.
    fn maybe_export(&mut self, target: &mut Target, qid: usize) {
        let core = (qid % self.cores as usize) as u16;
        let cqid = self.sqs[qid].cqid as usize;
        if self.cores <= 1
            || core == 0
            || self.state != FunctionState::Ready
            || self.cqs[cqid].sqs != 1
            || self.cqs[cqid].away
        {
            return;
        }
        // Its commands run there from now on: an Abort of one is asked there, and its share
        // of the controller's flows is counted there.
        if let Some(q) = self.sqs[qid].core {
            target.served_elsewhere(q, true);
        }
        let (sqs, cqs) = (&mut self.sqs, &mut self.cqs);
        let pair = IoPair::take(qid as u16, &mut sqs[qid], &mut cqs[cqid]);
        self.abroad.push((qid as u16, core));
        self.handovers.push_back(Handover::Export { core, pair });
    }

    /// An admin command that must wait for a pair abroad (Delete I/O SQ of it, Create I/O SQ
    /// on its CQ): asks it back; true while it is not home.
    fn waits_for_pair(&mut self, sqe: &Sqe) -> bool {
        let qid = match AdminOpcode::from_u8(sqe.opcode) {
            Some(AdminOpcode::DeleteIoSq) => sqe.cdw(10) as u16 as usize,
            Some(AdminOpcode::CreateIoSq) => {
                let cqid = (sqe.cdw(11) >> 16) as usize;
                if !self.cqs.get(cqid).is_some_and(|c| c.away) {
                    return false;
                }
                match self
                    .sqs
                    .iter()
                    .position(|s| s.away && s.cqid as usize == cqid)
                {
                    Some(q) => q,
                    None => return false,
                }
            }
            _ => return false,
        };
        if !self.sqs.get(qid).is_some_and(|s| s.away) {
            return false;
        }
        if let Some(&(q, core)) = self.abroad.iter().find(|&&(q, _)| q as usize == qid) {
            self.recall(q, core, false);
        }
        true
    }

    /// One pass: CC changes, CQ head doorbells, pending completions, SQ tail doorbells and
    /// command fetch, shutdown progress, CSTS. Returns whether anything happened.
    pub fn poll<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
    ) -> bool {
        if !self.initialized {
            self.initialized = true;
            ep.write_reg64(offset::CAP, target.cap().0);
            ep.write_reg(offset::VS, keel_controller::VERSION.0);
            ep.write_reg(offset::CSTS, 0);
        }
        let mut busy = false;
        // Pairs back home: served here again, their parked Aborts answered "not aborted".
        for q in self.came_home.drain(..) {
            target.served_elsewhere(q, false);
        }
        let cc = Cc(ep.read_reg(offset::CC));
        if cc != self.cc {
            busy = true;
            self.cc_changed(now, target, ep, cc);
        }
        if self.pending_reset {
            if !self.abroad.is_empty() {
                // CSTS.RDY stays 1 until every pair is back: nothing on another core touches
                // the host's queues once the host sees the controller reset.
                return busy;
            }
            self.pending_reset = false;
            self.reset(target, ep);
            busy = true;
            if self.cc.en() {
                // The host enabled it again meanwhile (without waiting for RDY = 0).
                let cc = self.cc;
                self.enable(now, target, ep, cc);
            }
        }
        if self.terminated
            && matches!(
                self.state,
                FunctionState::Ready | FunctionState::ShuttingDown
            )
        {
            self.set_fatal(FatalReason::QueueTerminated);
        }
        if matches!(
            self.state,
            FunctionState::Ready | FunctionState::ShuttingDown
        ) {
            busy |= self.cq_doorbells(ep);
            busy |= self.post_backlogs(ep);
            if self.state == FunctionState::Ready {
                busy |= self.fetch(now, target, ep);
            } else {
                busy |= self.fetch_before_shutdown(now, target, ep);
                busy |= self.advance_shutdown(now, target);
            }
            self.interrupts(ep);
        }
        busy |= self.abort_requests(target);
        self.update_csts(target, ep);
        busy
    }

    /// Hosts' Aborts of commands on pairs abroad, parked by the target: each goes to the
    /// pair's core as a [`Handover::Abort`] (one length test when there are none).
    fn abort_requests(&mut self, target: &mut Target) -> bool {
        let mut busy = false;
        let (sqs, abroad, handovers, stray) = (
            &self.sqs,
            &self.abroad,
            &mut self.handovers,
            &mut self.stray_aborts,
        );
        target.take_abort_requests_of(self.cfg.owner, &mut |q, cid, token| {
            busy = true;
            let pair = abroad.iter().find(|&&(qid, _)| {
                sqs.get(qid as usize)
                    .is_some_and(|s| s.away && s.core == Some(q))
            });
            match pair {
                Some(&(qid, core)) => handovers.push_back(Handover::Abort {
                    core,
                    qid,
                    cid,
                    token,
                }),
                None => stray.push(token),
            }
        });
        for token in self.stray_aborts.drain(..) {
            target.abort_verdict_from_elsewhere(token, false);
        }
        busy
    }

    /// Takes an event of the controller core. Events of this function's queues (and buffers of
    /// its pool) are consumed (`None`); anything else is handed back for another transport.
    /// Must not be called with a target borrowed elsewhere: it needs none.
    pub fn handle_event<E: EndpointFunction + ?Sized>(
        &mut self,
        ev: Event,
        ep: &mut E,
    ) -> Option<Event> {
        match ev {
            Event::Completion(q, resp) => {
                if !self.owns(q) {
                    return match resp.buf {
                        Some(b) => match self.pool.put(b) {
                            Ok(()) => None,
                            Err((_, b)) => Some(Event::Completion(
                                q,
                                Response {
                                    buf: Some(b),
                                    ..resp
                                },
                            )),
                        },
                        None => Some(Event::Completion(q, resp)),
                    };
                }
                if resp.cookie == FLUSH_COOKIE {
                    if let Shutdown::Flushing { next, .. } = self.shutdown {
                        self.shutdown = Shutdown::Flushing {
                            next,
                            pending: false,
                        };
                    }
                    self.recycle(resp.buf);
                    return None;
                }
                let qid = (resp.cookie >> 16) as usize;
                let slot = (resp.cookie & 0xFFFF) as usize;
                let valid = self.sqs.get(qid).is_some_and(|s| {
                    s.live && s.core == Some(q) && s.slots.get(slot).is_some_and(|x| x.busy)
                });
                // A reset waiting for pairs abroad posts nothing more (its queues are gone
                // for the host already).
                if valid && self.state != FunctionState::Fatal && !self.pending_reset {
                    self.complete(ep, qid, slot, resp);
                    self.post_backlogs(ep);
                    self.interrupts(ep);
                } else {
                    self.recycle(resp.buf);
                }
                None
            }
            Event::QueueTerminated(q) => {
                if self.owns(q) {
                    self.terminated = true;
                    None
                } else {
                    Some(Event::QueueTerminated(q))
                }
            }
            Event::BufferReleased { owner, buf } => match self.pool.put(buf) {
                Ok(()) => None,
                Err((_, buf)) => Some(Event::BufferReleased { owner, buf }),
            },
        }
    }

    /// [`PcieFunction::poll`] then [`Target::poll`] with every event given to this function:
    /// for a target that serves only this function.
    pub fn poll_with_target<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
    ) -> bool {
        let mut busy = self.poll(now, target, ep);
        busy |= target.poll(now, &mut |ev| {
            let _ = self.handle_event(ev, ep);
        }) > 0;
        busy
    }

    fn recycle(&mut self, buf: Option<IoBuf>) {
        // A foreign buffer cannot be ours to keep; it is dropped (its memory stays leaked).
        queue::recycle(&mut self.pool, buf);
    }

    fn set_fatal(&mut self, why: FatalReason) {
        self.state = FunctionState::Fatal;
        self.fatal = Some(why);
        // A fatal controller processes nothing: the pairs abroad stop fetching now and come
        // back with their commands dropped; CSTS.CFS shows once they are all home
        // (`update_csts`), so nothing the host submits after seeing it runs on another core.
        self.recall_all(true);
    }

    fn cc_changed<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        new: Cc,
    ) {
        let old = self.cc;
        self.cc = new;
        if self.pending_reset {
            // A reset is waiting for pairs abroad; what the host writes meanwhile is looked
            // at when it completes.
            return;
        }
        if !old.en() && new.en() {
            if self.state == FunctionState::Disabled {
                self.enable(now, target, ep, new);
            }
            return;
        }
        if old.en() && !new.en() {
            if self.abroad.is_empty() {
                self.reset(target, ep);
            } else {
                self.recall_all(true);
                self.pending_reset = true;
            }
            return;
        }
        if !new.en() || self.state != FunctionState::Ready {
            return;
        }
        if old.shn() == Cc::SHN_NONE && new.shn() != Cc::SHN_NONE {
            self.state = FunctionState::ShuttingDown;
            self.shutdown = Shutdown::Draining;
            // I/O the host submitted before the notification is still executed.
            for qid in 1..self.sqs.len() {
                if self.sqs[qid].live {
                    let tail = ep.read_doorbell(layout::sq_tail_doorbell(qid as u16));
                    self.sqs[qid].drain_to = (tail < self.sqs[qid].entries as u32).then_some(tail);
                }
            }
            // Pairs abroad come home with their commands finished; what remains up to
            // `drain_to` is fetched here.
            self.recall_all(false);
        } else if let Some(a) = self.admin {
            let _ = target.property_set(now, a, offset::CC, PropertySize::Four, new.0 as u64);
        }
    }

    fn enable<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        cc: Cc,
    ) {
        let aqa = ep.read_reg(offset::AQA);
        let asqs = (aqa & 0xFFF) as u16 + 1;
        let acqs = ((aqa >> 16) & 0xFFF) as u16 + 1;
        let asq = ep.read_reg64(offset::ASQ);
        let acq = ep.read_reg64(offset::ACQ);
        let area = ep.host_area();
        let ps = PAGE_SIZE as u64;
        let ok = asqs >= 2
            && acqs >= 2
            && asq.is_multiple_of(ps)
            && acq.is_multiple_of(ps)
            && in_area(&area, asq, asqs as u64 * 64)
            && in_area(&area, acq, acqs as u64 * 16);
        if !ok {
            return self.set_fatal(FatalReason::BadAdminQueue);
        }
        let Ok(admin) = target.create_local_controller(now, &self.cfg.subnqn, self.cfg.owner)
        else {
            return self.set_fatal(FatalReason::CoreRefused);
        };
        let _ = target.property_set(now, admin, offset::CC, PropertySize::Four, cc.0 as u64);
        let csts = target
            .property_get(admin, offset::CSTS, PropertySize::Four)
            .map(|v| Csts(v as u32))
            .unwrap_or(Csts(2));
        if csts.cfs() || !csts.rdy() {
            let _ = target.close_queue(admin);
            return self.set_fatal(FatalReason::CoreRefused);
        }
        // Doorbells start at 0 (their reset value): whatever a host wrote to them while the
        // controller was disabled does not submit anything.
        for qid in 0..=self.cfg.max_io_queues {
            ep.write_doorbell(layout::sq_tail_doorbell(qid), 0);
            ep.write_doorbell(layout::cq_head_doorbell(qid), 0);
        }
        self.admin = Some(admin);
        self.sqs[0] = Sq::open(asq, asqs, 0, admin);
        self.cqs[0] = Cq::open(acq, acqs, true, 0);
        self.cqs[0].sqs = 1;
        self.cqs[0].backlog.reserve(asqs as usize);
        self.ncq = self.cfg.max_io_queues;
        self.state = FunctionState::Ready;
        self.stats.enables += 1;
    }

    /// Controller reset (CC.EN 1 → 0): every queue and outstanding command goes away (their
    /// buffers come back through [`Event::BufferReleased`]), doorbells read 0, CSTS = 0.
    fn reset<E: EndpointFunction + ?Sized>(&mut self, target: &mut Target, ep: &mut E) {
        for sq in self.sqs.iter_mut().skip(1) {
            if sq.live
                && let Some(q) = sq.core
            {
                let _ = target.close_queue(q);
            }
            *sq = Sq::default();
        }
        self.sqs[0] = Sq::default();
        if let Some((q, true)) = self.flush_queue.take() {
            let _ = target.close_queue(q);
        }
        if let Some(a) = self.admin.take() {
            let _ = target.close_queue(a);
        }
        for cq in self.cqs.iter_mut() {
            *cq = Cq::default();
        }
        for qid in 0..=self.cfg.max_io_queues {
            ep.write_doorbell(layout::sq_tail_doorbell(qid), 0);
            ep.write_doorbell(layout::cq_head_doorbell(qid), 0);
        }
        self.lbads.clear();
        self.terminated = false;
        self.shutdown = Shutdown::None;
        self.flush_nsids = Vec::new();
        self.fatal = None;
        self.state = FunctionState::Disabled;
    }

    /// The device removes the function (hot unplug) whatever the host is doing: every queue
    /// and command goes as in a controller reset (commands already at a backend finish there,
    /// their completions are never posted and their buffers come back through the core's
    /// events), CSTS.CFS = 1 tells a host still looking that the controller is gone, and from
    /// here on nothing of the window is read or written: the caller stops polling it and only
    /// hands it its events until every buffer is home ([`PcieFunction::buffers_available`]).
    /// Returns whether a host had it enabled.
    pub fn remove<E: EndpointFunction + ?Sized>(
        &mut self,
        target: &mut Target,
        ep: &mut E,
    ) -> bool {
        let was_enabled = self.state != FunctionState::Disabled;
        // Pairs abroad drop their commands and come back; until they are, the caller must
        // not reuse the window (`abroad`).
        self.recall_all(true);
        self.pending_reset = false;
        self.reset(target, ep);
        self.set_fatal(FatalReason::Removed);
        let mut c = Csts(0);
        c.set_cfs(true);
        self.csts = c;
        ep.write_reg(offset::CSTS, c.0);
        ep.unpublish();
        was_enabled
    }

    fn update_csts<E: EndpointFunction + ?Sized>(&mut self, target: &Target, ep: &mut E) {
        let c = match self.state {
            FunctionState::Disabled => Csts(0),
            // Pairs still abroad may fetch until they have stopped (`set_fatal`).
            FunctionState::Fatal if !self.abroad.is_empty() => self.csts,
            FunctionState::Fatal => {
                let mut c = self.csts;
                c.set_cfs(true);
                c
            }
            FunctionState::Ready | FunctionState::ShuttingDown => {
                let mut c = self
                    .admin
                    .and_then(|a| {
                        target
                            .property_get(a, offset::CSTS, PropertySize::Four)
                            .ok()
                    })
                    .map(|v| Csts(v as u32))
                    .unwrap_or(self.csts);
                if matches!(
                    self.shutdown,
                    Shutdown::Draining | Shutdown::Flushing { .. }
                ) {
                    c.set_shst(Csts::SHST_OCCURRING);
                }
                c
            }
        };
        // CSTS is read-only to the host (NVMe base 2.0 §3.1.4.6), but the window is memory
        // the host can write: a host's write is undone at the next pass, as a device ignores
        // it (found by the pcie_function fuzz target: a scribbled CSTS.CFS).
        if c != self.csts || ep.read_reg(offset::CSTS) != c.0 {
            self.csts = c;
            ep.write_reg(offset::CSTS, c.0);
        }
    }

    fn cq_doorbells<E: EndpointFunction + ?Sized>(&mut self, ep: &mut E) -> bool {
        let mut busy = false;
        for qid in 0..self.cqs.len() {
            let cq = &mut self.cqs[qid];
            if !cq.live || cq.away {
                continue;
            }
            match cq.head_doorbell(ep, qid as u16) {
                Ok(moved) => busy |= moved,
                Err(why) => {
                    self.set_fatal(why);
                    return true;
                }
            }
        }
        busy
    }

    fn post_backlogs<E: EndpointFunction + ?Sized>(&mut self, ep: &mut E) -> bool {
        let mut busy = false;
        for qid in 0..self.cqs.len() {
            if self.cqs[qid].away {
                continue;
            }
            match self.cqs[qid].post_backlog(ep) {
                Ok(n) => {
                    self.stats.completions += n;
                    busy |= n > 0;
                }
                Err(why) => {
                    self.set_fatal(why);
                    return true;
                }
            }
        }
        busy
    }

    fn interrupts<E: EndpointFunction + ?Sized>(&mut self, ep: &mut E) {
        for cq in self.cqs.iter_mut() {
            if !cq.away && cq.interrupt(ep) {
                self.stats.interrupts += 1;
            }
        }
    }

    /// Queues the completion of slot `slot` of SQ `qid` and frees the slot.
    fn finish(&mut self, qid: usize, slot: usize, status: Status, dw0: u32, dw1: u32) {
        let sq = &mut self.sqs[qid];
        let Some(cqe) = sq.finish(qid as u16, slot, status, dw0, dw1) else {
            return;
        };
        let cqid = sq.cqid as usize;
        if let Some(cq) = self.cqs.get_mut(cqid).filter(|c| c.live && !c.away) {
            cq.backlog.push_back(cqe);
        }
    }

    /// A core response for slot `slot` of SQ `qid`: data to the host, buffer back to the pool,
    /// completion queued.
    fn complete<E: EndpointFunction + ?Sized>(
        &mut self,
        ep: &mut E,
        qid: usize,
        slot: usize,
        resp: Response,
    ) {
        let Some(s) = self.sqs[qid].slots.get(slot).copied() else {
            self.recycle(resp.buf);
            return;
        };
        let mut resp = resp;
        let (status, failed) = queue::deliver(ep, &mut self.pool, &s, &mut resp, |b| {
            if s.kind == Kind::IdentifyController {
                patch_identify_controller(b);
            }
        });
        if failed {
            self.stats.prp_errors += 1;
        }
        if status.is_success() {
            match s.kind {
                Kind::NumberOfQueues => {
                    let ncqa = (resp.cqe.dw0 >> 16) as u16;
                    self.ncq = ncqa.saturating_add(1).min(self.cfg.max_io_queues);
                }
                Kind::Aer => self.lbads.clear(),
                _ => {}
            }
        }
        self.finish(qid, slot, status, resp.cqe.dw0, resp.cqe.dw1);
    }

    fn fetch<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
    ) -> bool {
        let mut busy = self.fetch_sq(now, target, ep, 0);
        let n = self.cfg.max_io_queues as usize;
        for k in 0..n {
            if self.state != FunctionState::Ready {
                break;
            }
            let qid = 1 + (self.rr + k) % n;
            busy |= self.fetch_sq(now, target, ep, qid);
        }
        self.rr = (self.rr + 1) % n;
        busy
    }

    /// During a shutdown: fetches the I/O commands submitted before CC.SHN.
    fn fetch_before_shutdown<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
    ) -> bool {
        let mut busy = false;
        for qid in 1..self.sqs.len() {
            if self.sqs[qid].away {
                // Fetched here once it is back.
                continue;
            }
            if let Some(limit) = self.sqs[qid].drain_to {
                busy |= self.fetch_sq_to(now, target, ep, qid, limit, FunctionState::ShuttingDown);
                if self.sqs[qid].head as u32 == limit {
                    self.sqs[qid].drain_to = None;
                }
            }
        }
        busy
    }

    fn fetch_sq<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        qid: usize,
    ) -> bool {
        if !self.sqs[qid].live || self.sqs[qid].away || self.state != FunctionState::Ready {
            return false;
        }
        let tail = ep.read_doorbell(layout::sq_tail_doorbell(qid as u16));
        self.fetch_sq_to(now, target, ep, qid, tail, FunctionState::Ready)
    }

    /// Fetches commands of SQ `qid` up to `tail` while the function stays in `state`.
    fn fetch_sq_to<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        qid: usize,
        tail: u32,
        state: FunctionState,
    ) -> bool {
        if !self.sqs[qid].live || self.sqs[qid].away || self.state != state {
            return false;
        }
        if tail >= self.sqs[qid].entries as u32 {
            self.set_fatal(FatalReason::SqTailDoorbell {
                qid: qid as u16,
                value: tail,
            });
            return true;
        }
        let mut n = 0;
        let mut busy = false;
        while n < self.cfg.fetch_burst && self.state == state {
            let sq = &self.sqs[qid];
            if !sq.live || sq.head as u32 == tail || sq.free.is_empty() {
                break;
            }
            // A full completion queue with a backlog: stop taking work for it.
            if !self.cqs[sq.cqid as usize].backlog.is_empty() {
                break;
            }
            let mut raw = [0u8; 64];
            if ep
                .dma_read(sq.base + sq.head as u64 * 64, &mut raw)
                .is_err()
            {
                self.set_fatal(FatalReason::SqFetch);
                return true;
            }
            let sqe = Sqe::from_bytes(&raw);
            if !self.start(now, target, ep, qid, sqe) {
                break;
            }
            busy = true;
            n += 1;
        }
        busy
    }

    /// Starts one command; false when it must stay in the SQ for now.
    fn start<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        qid: usize,
        sqe: Sqe,
    ) -> bool {
        let plan = if qid == 0 {
            self.admin_plan(&sqe)
        } else {
            self.io_plan(now, target, &sqe)
        };
        let plan = match plan {
            Plan::Wait => return false,
            Plan::Core { data_len, .. } if data_len > 0 && self.pool.available() == 0 => {
                return false;
            }
            // Queue management of a pair abroad waits until it is back.
            Plan::CreateSq | Plan::DeleteSq if self.waits_for_pair(&sqe) => return false,
            p => p,
        };
        let (data_len, to_host, kind) = match plan {
            Plan::Core {
                data_len,
                to_host,
                kind,
            } => (data_len, to_host, kind),
            _ => (0, false, Kind::Plain),
        };
        let Some(slot) = self.sqs[qid].take_slot(Slot {
            busy: true,
            cid: sqe.cid,
            prp1: sqe.prp1(),
            prp2: sqe.prp2(),
            data_len,
            to_host,
            kind,
        }) else {
            return false;
        };
        self.stats.commands += 1;
        match plan {
            Plan::Local(st) => self.finish(qid, slot, st, 0, 0),
            Plan::CreateCq => {
                let st = self.create_cq(target, ep, &sqe);
                self.finish(qid, slot, st, 0, 0);
            }
            Plan::CreateSq => {
                let st = self.create_sq(target, ep, &sqe);
                self.finish(qid, slot, st, 0, 0);
                if st.is_success() {
                    self.maybe_export(target, sqe.cdw(10) as u16 as usize);
                }
            }
            Plan::DeleteCq => {
                let st = self.delete_cq(&sqe);
                self.finish(qid, slot, st, 0, 0);
            }
            Plan::DeleteSq => {
                let st = self.delete_sq(target, &sqe);
                self.finish(qid, slot, st, 0, 0);
            }
            Plan::Core { .. } => self.submit(now, target, ep, qid, slot, sqe),
            Plan::Wait => {}
        }
        true
    }

    fn submit<E: EndpointFunction + ?Sized>(
        &mut self,
        now: Instant,
        target: &mut Target,
        ep: &mut E,
        qid: usize,
        slot: usize,
        sqe: Sqe,
    ) {
        let s = self.sqs[qid].slots[slot];
        let Some(core) = self.sqs[qid].core else {
            return self.finish(qid, slot, Status::INTERNAL_ERROR, 0, 0);
        };
        let buf = match queue::load(ep, &mut self.pool, &s) {
            Ok(b) => b,
            Err(st) => {
                if st != Status::INTERNAL_ERROR {
                    self.stats.prp_errors += 1;
                }
                return self.finish(qid, slot, st, 0, 0);
            }
        };
        let req = Request {
            sqe,
            buf,
            data_len: s.data_len,
            cookie: ((qid as u32) << 16) | slot as u32,
        };
        if let Some(resp) = target.submit(now, core, req) {
            self.complete(ep, qid, slot, resp);
        }
    }

    fn admin_plan(&self, sqe: &Sqe) -> Plan {
        if sqe.psdt() != Psdt::Prp {
            return Plan::Local(Status::INVALID_FIELD);
        }
        let core = |data_len: u32, to_host: bool, kind: Kind| Plan::Core {
            data_len,
            to_host,
            kind,
        };
        match AdminOpcode::from_u8(sqe.opcode) {
            Some(AdminOpcode::CreateIoCq) => Plan::CreateCq,
            Some(AdminOpcode::CreateIoSq) => Plan::CreateSq,
            Some(AdminOpcode::DeleteIoCq) => Plan::DeleteCq,
            Some(AdminOpcode::DeleteIoSq) => Plan::DeleteSq,
            // Fabrics commands do not exist on PCIe.
            Some(AdminOpcode::Fabrics) => Plan::Local(Status::INVALID_OPCODE),
            Some(AdminOpcode::Identify) => {
                let kind = if sqe.cdw(10) as u8 == cns::CONTROLLER {
                    Kind::IdentifyController
                } else {
                    Kind::Plain
                };
                core(IDENTIFY_LEN as u32, true, kind)
            }
            Some(AdminOpcode::GetLogPage) => {
                let numd = (((sqe.cdw(11) & 0xFFFF) as u64) << 16 | (sqe.cdw(10) >> 16) as u64) + 1;
                let bytes = numd * 4;
                if bytes > self.max_transfer as u64 {
                    Plan::Local(Status::INVALID_FIELD)
                } else {
                    core(bytes as u32, true, Kind::Plain)
                }
            }
            Some(AdminOpcode::SetFeatures) => match FeatureId::from_u8(sqe.cdw(10) as u8) {
                // Keep alive is a fabrics mechanism here: a PCIe host has no keep-alive duty.
                Some(FeatureId::KeepAliveTimer) => Plan::Local(Status::INVALID_FIELD),
                Some(FeatureId::NumberOfQueues) => core(0, false, Kind::NumberOfQueues),
                _ => core(0, false, Kind::Plain),
            },
            Some(AdminOpcode::AsyncEventRequest) => core(0, false, Kind::Aer),
            _ => core(0, false, Kind::Plain),
        }
    }

    fn io_plan(&mut self, now: Instant, target: &mut Target, sqe: &Sqe) -> Plan {
        let max = self.max_transfer;
        // An inactive namespace: the core answers Invalid Namespace or Format.
        match queue::io_plan(sqe, max, |nsid| self.lbads_of(now, target, nsid)) {
            IoPlan::Wait => Plan::Wait,
            IoPlan::Local(st) => Plan::Local(st),
            IoPlan::Run { data_len, to_host } => Plan::Core {
                data_len,
                to_host,
                kind: Kind::Plain,
            },
        }
    }

    /// The LBA data size of namespace `nsid` (Identify Namespace through the core, cached
    /// until an asynchronous event or a reset).
    fn lbads_of(&mut self, now: Instant, target: &mut Target, nsid: u32) -> Lookup {
        if let Some(&(_, l)) = self.lbads.iter().find(|(n, _)| *n == nsid) {
            return Lookup::Lbads(l);
        }
        if nsid == 0 || nsid == NSID_ALL {
            return Lookup::Inactive;
        }
        let Some(admin) = self.admin else {
            return Lookup::Inactive;
        };
        let Some(mut b) = self.pool.get() else {
            return Lookup::Wait;
        };
        b.set_len(IDENTIFY_LEN);
        let sqe = Sqe::new(AdminOpcode::Identify as u8, INTERNAL_CID)
            .with_nsid(nsid)
            .with_cdw(10, cns::NAMESPACE as u32);
        let req = Request {
            sqe,
            buf: Some(b),
            data_len: IDENTIFY_LEN as u32,
            cookie: INTERNAL,
        };
        let Some(resp) = target.submit(now, admin, req) else {
            return Lookup::Inactive;
        };
        let mut out = Lookup::Inactive;
        if let Some(b) = resp.buf.as_ref()
            && resp.cqe.status.is_success()
            && let Ok(page) = <&[u8; IDENTIFY_LEN]>::try_from(b.as_slice())
        {
            let id = IdentifyNamespace::decode(page);
            let lbads = id
                .lbaf
                .get((id.flbas & 0xF) as usize)
                .map(|f| f.lbads)
                .unwrap_or(0);
            if id.nsze > 0 && (9..=16).contains(&lbads) {
                if self.lbads.len() >= LBADS_CACHE {
                    self.lbads.clear();
                }
                self.lbads.push((nsid, lbads));
                out = Lookup::Lbads(lbads);
            }
        }
        self.recycle(resp.buf);
        out
    }

    fn create_cq<E: EndpointFunction + ?Sized>(
        &mut self,
        target: &Target,
        ep: &mut E,
        sqe: &Sqe,
    ) -> Status {
        let qid = sqe.cdw(10) as u16;
        let qsize = (sqe.cdw(10) >> 16) as u16;
        let pc = sqe.cdw(11) & 1 != 0;
        let ien = sqe.cdw(11) & 2 != 0;
        let iv = (sqe.cdw(11) >> 16) as u16;
        let base = sqe.prp1();
        if qid == 0 || qid > self.ncq || self.cqs[qid as usize].live {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if qsize == 0 || qsize > target.cap().mqes() {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !base.is_multiple_of(PAGE_SIZE as u64) {
            return Status::INVALID_PRP_OFFSET;
        }
        if iv >= ep.vectors() {
            return INVALID_INTERRUPT_VECTOR;
        }
        let entries = qsize + 1;
        if !pc || !in_area(&ep.host_area(), base, entries as u64 * 16) {
            return Status::INVALID_FIELD;
        }
        self.cqs[qid as usize] = Cq::open(base, entries, ien, iv);
        ep.write_doorbell(layout::cq_head_doorbell(qid), 0);
        Status::SUCCESS
    }

    fn create_sq<E: EndpointFunction + ?Sized>(
        &mut self,
        target: &mut Target,
        ep: &mut E,
        sqe: &Sqe,
    ) -> Status {
        let qid = sqe.cdw(10) as u16;
        let qsize = (sqe.cdw(10) >> 16) as u16;
        let pc = sqe.cdw(11) & 1 != 0;
        let cqid = (sqe.cdw(11) >> 16) as u16;
        let base = sqe.prp1();
        if cqid == 0 || !self.cqs.get(cqid as usize).is_some_and(|c| c.live) {
            return COMPLETION_QUEUE_INVALID;
        }
        if qid == 0 || qid > self.cfg.max_io_queues || self.sqs[qid as usize].live {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if qsize == 0 || qsize > target.cap().mqes() {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !base.is_multiple_of(PAGE_SIZE as u64) {
            return Status::INVALID_PRP_OFFSET;
        }
        let entries = qsize + 1;
        if !pc || !in_area(&ep.host_area(), base, entries as u64 * 64) {
            return Status::INVALID_FIELD;
        }
        let Some(admin) = self.admin else {
            return Status::COMMAND_SEQUENCE_ERROR;
        };
        let core = match target.attach_local_io_queue(admin, qid, qsize) {
            Ok(q) => q,
            Err(st) => return st,
        };
        self.sqs[qid as usize] = Sq::open(base, entries, cqid, core);
        let cq = &mut self.cqs[cqid as usize];
        cq.sqs += 1;
        cq.backlog.reserve(entries as usize);
        ep.write_doorbell(layout::sq_tail_doorbell(qid), 0);
        Status::SUCCESS
    }

    fn delete_sq(&mut self, target: &mut Target, sqe: &Sqe) -> Status {
        let qid = sqe.cdw(10) as u16 as usize;
        if qid == 0 || qid >= self.sqs.len() || !self.sqs[qid].live {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if let Some(q) = self.sqs[qid].core.take() {
            let _ = target.close_queue(q);
        }
        // Commands still outstanding are completed as aborted (their buffers come back from
        // the core as BufferReleased).
        for slot in 0..self.sqs[qid].slots.len() {
            self.finish(qid, slot, Status::ABORTED_SQ_DELETION, 0, 0);
        }
        let cqid = self.sqs[qid].cqid as usize;
        if let Some(cq) = self.cqs.get_mut(cqid) {
            cq.sqs = cq.sqs.saturating_sub(1);
        }
        self.sqs[qid] = Sq::default();
        Status::SUCCESS
    }

    fn delete_cq(&mut self, sqe: &Sqe) -> Status {
        let qid = sqe.cdw(10) as u16 as usize;
        if qid == 0 || qid >= self.cqs.len() || !self.cqs[qid].live {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if self.cqs[qid].sqs > 0 {
            return INVALID_QUEUE_DELETION;
        }
        self.cqs[qid] = Cq::default();
        Status::SUCCESS
    }

    fn io_outstanding(&self) -> usize {
        self.sqs.iter().skip(1).map(Sq::outstanding).sum()
    }

    /// Shutdown: outstanding I/O completes, every namespace is flushed through the core, then
    /// CC.SHN goes to the core, which reports SHST complete.
    fn advance_shutdown(&mut self, now: Instant, target: &mut Target) -> bool {
        match self.shutdown {
            Shutdown::None | Shutdown::Forwarded => false,
            Shutdown::Draining => {
                if self.io_outstanding() > 0
                    || !self.abroad.is_empty()
                    || self.sqs.iter().any(|q| q.drain_to.is_some())
                {
                    return false;
                }
                let Some(admin) = self.admin else {
                    self.shutdown = Shutdown::Forwarded;
                    return true;
                };
                // The active namespace list.
                let Some(mut b) = self.pool.get() else {
                    return false;
                };
                b.set_len(IDENTIFY_LEN);
                let sqe = Sqe::new(AdminOpcode::Identify as u8, INTERNAL_CID)
                    .with_cdw(10, cns::ACTIVE_NS_LIST as u32);
                let req = Request {
                    sqe,
                    buf: Some(b),
                    data_len: IDENTIFY_LEN as u32,
                    cookie: INTERNAL,
                };
                let mut nsids = Vec::new();
                if let Some(resp) = target.submit(now, admin, req) {
                    if let Some(b) = resp.buf.as_ref()
                        && resp.cqe.status.is_success()
                    {
                        nsids = b
                            .as_slice()
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .take_while(|&n| n != 0)
                            .collect();
                    }
                    self.recycle(resp.buf);
                }
                self.flush_nsids = nsids;
                // A queue to send Flush on: a live I/O queue, else a temporary one.
                self.flush_queue = self
                    .sqs
                    .iter()
                    .skip(1)
                    .find_map(|s| s.core.filter(|_| s.live))
                    .map(|q| (q, false));
                if self.flush_queue.is_none() {
                    for qid in 1..=self.cfg.max_io_queues {
                        if let Ok(q) = target.attach_local_io_queue(admin, qid, 1) {
                            self.flush_queue = Some((q, true));
                            break;
                        }
                    }
                }
                self.shutdown = Shutdown::Flushing {
                    next: 0,
                    pending: false,
                };
                true
            }
            Shutdown::Flushing { pending: true, .. } => false,
            Shutdown::Flushing { next, .. } => {
                match (self.flush_nsids.get(next).copied(), self.flush_queue) {
                    (Some(nsid), Some((q, _))) => {
                        let sqe = Sqe::new(IoOpcode::Flush as u8, INTERNAL_CID).with_nsid(nsid);
                        let req = Request {
                            sqe,
                            buf: None,
                            data_len: 0,
                            cookie: FLUSH_COOKIE,
                        };
                        let pending = match target.submit(now, q, req) {
                            Some(resp) => {
                                self.recycle(resp.buf);
                                false
                            }
                            None => true,
                        };
                        self.shutdown = Shutdown::Flushing {
                            next: next + 1,
                            pending,
                        };
                    }
                    _ => {
                        if let Some((q, true)) = self.flush_queue {
                            let _ = target.close_queue(q);
                        }
                        self.flush_queue = None;
                        if let Some(a) = self.admin {
                            let cc = self.cc.0 as u64;
                            let _ = target.property_set(now, a, offset::CC, PropertySize::Four, cc);
                        }
                        self.shutdown = Shutdown::Forwarded;
                    }
                }
                true
            }
        }
    }
}

/// Identify Controller as a PCIe controller reports it: the fabrics-only fields (SGLS, KAS,
/// IOCCSZ..MSDBD, NVMe base 2.0 Figure 275 bytes 1792-2047) are zero; PRPs only.
fn patch_identify_controller(b: &mut [u8]) {
    if let Some(x) = b.get_mut(ctrl_field::SGLS..ctrl_field::SGLS + 4) {
        x.fill(0);
    }
    if let Some(x) = b.get_mut(ctrl_field::KAS..ctrl_field::KAS + 2) {
        x.fill(0);
    }
    if let Some(x) = b.get_mut(ctrl_field::IOCCSZ..ctrl_field::PSD0) {
        x.fill(0);
    }
}
