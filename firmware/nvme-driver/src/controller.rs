//! The controller: bring-up (NVMe base 2.0 §3.5.1), admin commands, the I/O path with PRPs
//! (§4.1.1) and splitting at MDTS, command timeouts → Abort (§5.1) → controller reset, and
//! recovery from CSTS.CFS (§10.1), all driven by [`Controller::poll`] with the time passed in.
//!
//! Recovery is a state machine advanced by `poll`, so a drive that resets never stalls the
//! poll loop: disable (CC.EN = 0, wait CSTS.RDY = 0 bounded by CAP.TO), fail every outstanding
//! request back with an error, enable again, re-create the I/O queues, serve again.

use crate::corequeue::{CoreQueue, QueueLink};
use crate::dma::{Dma, DmaRegion};
use crate::engine::{IoEngine, IoParams, IoQueue};
use crate::queue::QueuePair;
use crate::{Registers, backend::DriveBackend};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use keel_nvme::cqe::{generic, media, sct};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyCommand, IdentifyController, IdentifyNamespace, Oncs, Vwc, cns,
};
use keel_nvme::io::{AbortCommand, FeaturesCommand};
use keel_nvme::regs::{Cap, Cc, Csts, Vs, offset};
use keel_nvme::{AdminOpcode, Cqe, FeatureId, Sqe, Status};
use keel_storage::{
    BlockCompletion, BlockError, BlockRequest, Capabilities, Geometry, RejectReason, Rejected,
};

/// Driver configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// I/O queue pairs to ask for (the controller may grant fewer).
    pub io_queues: u16,
    /// Entries per I/O queue (capped at CAP.MQES + 1); one entry stays free, so depth - 1
    /// commands can be outstanding per queue.
    pub queue_depth: u16,
    /// Entries of the admin queues (2..=4096, capped at CAP.MQES + 1).
    pub admin_depth: u16,
    /// A command not completed after this long is aborted.
    pub io_timeout_ns: u64,
    /// An aborted command not completed after this much longer causes a controller reset.
    pub abort_timeout_ns: u64,
    /// Admin commands during bring-up and recovery fail after this long.
    pub admin_timeout_ns: u64,
    /// CSTS is read for CFS at most this often while the controller is online.
    pub health_check_ns: u64,
    /// Outstanding commands are checked for timeouts at most this often.
    pub timeout_scan_ns: u64,
    /// Largest data transfer per command in bytes (further capped by MDTS and by one PRP
    /// list page per command).
    pub max_transfer: u32,
    /// Size of the zero buffer used to emulate Write Zeroes on drives without it (and of the
    /// sink buffer Verify reads into on drives without Verify).
    pub zero_buffer: usize,
    /// Create the I/O completion queues with interrupts enabled (IEN = 1), I/O queue `q` on
    /// vector `q` (NVMe base 2.0 §5.4, Figure 474). The driver still finds completions by
    /// polling; a host that can sleep until an interrupt (or polls an interrupt counter, as
    /// `keelctl host` does over an emulated function's window) turns this on. The firmware
    /// polls its drives and leaves it off.
    pub interrupts: bool,
    /// I/O queue pairs to create for other cores on top of `io_queues` (one per core that
    /// serves the drive's namespaces itself; see [`crate::CoreQueue`]). They come out of
    /// what the controller grants beyond one queue of its own.
    pub core_queues: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            io_queues: 4,
            queue_depth: 128,
            admin_depth: 32,
            io_timeout_ns: 10_000_000_000,
            abort_timeout_ns: 2_000_000_000,
            admin_timeout_ns: 5_000_000_000,
            health_check_ns: 100_000_000,
            timeout_scan_ns: 1_000_000,
            max_transfer: 1 << 20,
            zero_buffer: 128 << 10,
            interrupts: false,
            core_queues: 0,
        }
    }
}

/// Why a controller could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// DMA memory could not be allocated.
    NoMemory,
    /// CAP.CSS does not offer the NVM command set.
    NoNvmCommandSet,
    /// CAP.MPSMIN asks for pages larger than the driver supports (64 KiB).
    PageSize(u32),
    /// CSTS.RDY stayed 1 after CC.EN was cleared, for CAP.TO.
    DisableTimeout,
    /// CSTS.RDY stayed 0 after CC.EN was set, for CAP.TO.
    EnableTimeout,
    /// CSTS.CFS was set while enabling.
    Fatal,
    /// An admin command did not complete in time.
    AdminTimeout(u8),
    /// An admin command failed.
    AdminFailed(u8, Status),
    /// The controller granted no I/O queue, or none could be created.
    NoQueues,
    /// An admin command was asked for while the controller is not online (resetting, shut
    /// down or given up on).
    NotOnline,
    /// CSTS.SHST did not report shutdown complete within CAP.TO (or the admin timeout, if
    /// longer) after CC.SHN was set.
    ShutdownTimeout,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemory => f.write_str("out of DMA memory"),
            Self::NoNvmCommandSet => f.write_str("controller does not support the NVM command set"),
            Self::PageSize(p) => write!(f, "minimum memory page size {p} is not supported"),
            Self::DisableTimeout => {
                f.write_str("controller did not become idle (CSTS.RDY stayed 1)")
            }
            Self::EnableTimeout => {
                f.write_str("controller did not become ready (CSTS.RDY stayed 0)")
            }
            Self::Fatal => f.write_str("controller fatal status (CSTS.CFS) while enabling"),
            Self::AdminTimeout(op) => write!(f, "admin command {op:#04x} timed out"),
            Self::AdminFailed(op, s) => write!(f, "admin command {op:#04x} failed: {s}"),
            Self::NoQueues => f.write_str("no I/O queue could be created"),
            Self::NotOnline => f.write_str("controller is not online"),
            Self::ShutdownTimeout => {
                f.write_str("controller did not report shutdown complete (CSTS.SHST)")
            }
        }
    }
}

/// What Identify Controller and the registers said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor ID (VID).
    pub vid: u16,
    /// Model number, trimmed.
    pub model: String,
    /// Serial number, trimmed.
    pub serial: String,
    /// Firmware revision, trimmed.
    pub firmware: String,
    /// Version register.
    pub version: Vs,
    /// Capabilities register.
    pub cap: Cap,
    /// Memory page size in bytes (CC.MPS).
    pub page_size: u32,
    /// MDTS in bytes (0 = no limit).
    pub mdts_bytes: u64,
    /// Largest transfer per command the driver uses, in bytes.
    pub max_transfer: u32,
    /// ONCS.
    pub oncs: Oncs,
    /// VWC.
    pub vwc: Vwc,
    /// SGLS (SGLs are not used; PRPs always are).
    pub sgls: u32,
    /// Abort Command Limit (1's based).
    pub abort_limit: u16,
    /// I/O queue pairs in use.
    pub io_queues: u16,
    /// I/O queue pairs created for other cores ([`Controller::take_core_queue`]).
    pub core_queues: u16,
    /// Entries per I/O queue.
    pub queue_depth: u16,
}

/// An active namespace the driver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace identifier.
    pub nsid: u32,
    /// Block size and count.
    pub geometry: Geometry,
    /// What the backend offers.
    pub caps: Capabilities,
    /// Write Zeroes is passed through (else emulated with writes of zeroes).
    pub native_write_zeroes: bool,
    /// Verify is passed through (else emulated with reads into a sink buffer).
    pub native_verify: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriveStats {
    /// Commands submitted to I/O queues.
    pub commands: u64,
    /// Requests completed (successfully or not).
    pub requests_done: u64,
    /// Commands that completed with an error status.
    pub errors: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Abort commands sent.
    pub aborts: u64,
    /// Controller resets started after the controller came up.
    pub resets: u64,
    /// Requests failed back because of a reset.
    pub failed_by_reset: u64,
    /// Completions for no outstanding command (ignored).
    pub spurious: u64,
    /// SQ tail doorbell writes on I/O queues.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes on I/O queues.
    pub cq_doorbells: u64,
    /// Requests refused as busy because the I/O queues had no room.
    pub queue_full: u64,
    /// The last error status a command completed with.
    pub last_error: Option<Status>,
}

/// Where the controller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Serving I/O.
    Online,
    /// Being reset; requests are refused as busy.
    Resetting,
    /// Given up on; requests are refused as invalid (internal error).
    Dead,
    /// Shut down by [`Controller::shutdown`]: completions already posted are still reaped,
    /// new requests are refused as invalid (internal error).
    ShutDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Online,
    Disabling {
        deadline: u64,
    },
    Enabling {
        deadline: u64,
    },
    /// Enabled, waiting for bring-up's Identify commands.
    Enabled,
    Configuring {
        step: u16,
        deadline: u64,
    },
    /// Before `step` (Create I/O CQ of another core's queue): waiting for that core to reset
    /// the queue.
    Waiting {
        step: u16,
        deadline: u64,
    },
    Dead,
    /// CC.SHN was set and CSTS.SHST reported complete.
    ShutDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdminUse {
    Free,
    /// Waited for by bring-up (result stored in `done`).
    Sync,
    /// A recovery script step.
    Script,
    /// An Abort.
    Abort,
}

#[derive(Debug)]
struct AdminSlot {
    used: AdminUse,
    done: Option<Cqe>,
}

/// An I/O queue pair created for another core.
#[derive(Debug)]
struct Detached {
    link: Arc<QueueLink>,
    /// Its slots and requests until [`Controller::take_core_queue`] hands them out.
    engine: Option<IoEngine>,
    qid: u16,
    depth: u16,
    /// SQ and CQ device addresses.
    sq_cq: (u64, u64),
    /// Not created (or given up on): its core fails every request.
    dead: bool,
}

/// Maps an NVMe completion status onto a block error. Media and data integrity statuses other
/// than Write Fault and Compare Failure (unrecovered read, end-to-end guard/tag checks, access
/// denied, deallocated or unwritten block) all mean the data could not be read intact.
pub fn block_error(s: Status) -> BlockError {
    match (s.sct, s.sc) {
        (sct::GENERIC, generic::LBA_OUT_OF_RANGE) => BlockError::OutOfRange,
        (sct::GENERIC, generic::INVALID_OPCODE) => BlockError::Unsupported,
        (sct::GENERIC, generic::ABORT_REQUESTED) => BlockError::Aborted,
        (sct::MEDIA, media::WRITE_FAULT) => BlockError::WriteFault,
        (sct::MEDIA, media::COMPARE_FAILURE) => BlockError::CompareMismatch,
        (sct::MEDIA, _) => BlockError::ReadError,
        _ => BlockError::Internal,
    }
}

fn trim(b: &[u8]) -> String {
    let s = core::str::from_utf8(b).unwrap_or("?");
    String::from(s.trim_matches(|c: char| c == ' ' || c == '\0'))
}

fn reject(req: BlockRequest, reason: RejectReason) -> Result<(), Rejected> {
    Err(Rejected { reason, req })
}

/// Largest PRP list entries in one list page.
const PRP_ENTRIES_PER_PAGE: usize = 512;

/// An NVMe controller driven through `R` and `D`.
pub struct Controller<R: Registers, D: Dma> {
    regs: R,
    dma: D,
    config: Config,
    cap: Cap,
    page: usize,
    cc: Cc,
    to_ns: u64,
    phase: Phase,
    admin: QueuePair,
    admin_slots: Vec<AdminSlot>,
    scratch: DmaRegion,
    info: Option<ControllerInfo>,
    namespaces: Vec<Namespace>,
    engine: IoEngine,
    /// Queue pairs created for other cores ([`Controller::take_core_queue`]).
    detached: Vec<Detached>,
    /// Resets so far (the generation of the detached queues, see [`QueueLink`]).
    generation: u64,
    io_depth: u16,
    wanted_queues: u16,
    zero: Option<DmaRegion>,
    /// Where emulated Verify reads land (never read by the CPU).
    sink: Option<DmaRegion>,
    now: u64,
    next_health: u64,
    next_scan: u64,
    stats: DriveStats,
}

impl<R: Registers, D: Dma> fmt::Debug for Controller<R, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("phase", &self.phase)
            .field("info", &self.info)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

impl<R: Registers, D: Dma> Controller<R, D> {
    /// Brings a controller up: reset, admin queues, enable, Identify (controller, active
    /// namespaces, each namespace), Number of Queues, I/O queue pairs. `clock` returns the
    /// current time in nanoseconds and bounds every wait (CAP.TO, admin timeouts); it is used
    /// only here.
    pub fn init(
        mut regs: R,
        mut dma: D,
        config: Config,
        clock: &mut dyn FnMut() -> u64,
    ) -> Result<Self, InitError> {
        let cap = Cap(regs.read64(offset::CAP as usize));
        if cap.css() & 1 == 0 {
            return Err(InitError::NoNvmCommandSet);
        }
        let page = 4096usize << cap.mpsmin();
        if cap.mpsmin() > 4 {
            return Err(InitError::PageSize(page as u32));
        }
        let mqes = cap.mqes() as u32 + 1;
        let admin_depth = (config.admin_depth.clamp(2, 4096) as u32).min(mqes) as u16;
        let admin = QueuePair::new(&mut dma, 0, admin_depth, page, cap.dstrd())
            .ok_or(InitError::NoMemory)?;
        let scratch = dma.alloc(page, page).ok_or(InitError::NoMemory)?;
        let to_ns = (cap.to().max(1) as u64) * 500_000_000;
        let cc = Cc::new(false, 0, cap.mpsmin(), 0, Cc::SHN_NONE, 6, 4);
        let mut c = Self {
            regs,
            dma,
            config,
            cap,
            page,
            cc,
            to_ns,
            phase: Phase::Dead,
            admin,
            admin_slots: (0..admin_depth - 1)
                .map(|_| AdminSlot {
                    used: AdminUse::Free,
                    done: None,
                })
                .collect(),
            scratch,
            info: None,
            namespaces: Vec::new(),
            engine: IoEngine::default(),
            detached: Vec::new(),
            generation: 0,
            io_depth: (config.queue_depth.max(2) as u32).min(mqes) as u16,
            wanted_queues: config.io_queues.max(1).saturating_add(config.core_queues),
            zero: None,
            sink: None,
            now: clock(),
            next_health: 0,
            next_scan: 0,
            stats: DriveStats::default(),
        };
        // §3.5.1 steps 1-5: disable, wait, admin queues, CC, enable, wait.
        c.start_disable(c.now);
        loop {
            let now = clock();
            c.step(now);
            match c.phase {
                Phase::Enabled => break,
                Phase::Dead => return Err(c.dead_reason(now)),
                _ => {}
            }
        }
        c.identify(clock)?;
        let deadline = clock().saturating_add(c.config.admin_timeout_ns);
        c.start_script(0, deadline);
        loop {
            let now = clock();
            c.step(now);
            match c.phase {
                Phase::Online => break,
                Phase::Dead => return Err(InitError::NoQueues),
                _ => {}
            }
        }
        c.now = clock();
        Ok(c)
    }

    fn dead_reason(&mut self, _now: u64) -> InitError {
        let csts = Csts(self.regs.read32(offset::CSTS as usize));
        if csts.cfs() {
            InitError::Fatal
        } else if Cc(self.regs.read32(offset::CC as usize)).en() {
            InitError::EnableTimeout
        } else {
            InitError::DisableTimeout
        }
    }

    fn admin_sync(&mut self, sqe: Sqe, clock: &mut dyn FnMut() -> u64) -> Result<Cqe, InitError> {
        let op = sqe.opcode;
        let cid = self
            .admin_submit(sqe, AdminUse::Sync)
            .ok_or(InitError::AdminTimeout(op))?;
        let deadline = clock().saturating_add(self.config.admin_timeout_ns.max(self.to_ns));
        loop {
            self.reap_admin();
            if let Some(slot) = self.admin_slots.get_mut(cid as usize)
                && let Some(cqe) = slot.done.take()
            {
                slot.used = AdminUse::Free;
                return if cqe.status.is_success() {
                    Ok(cqe)
                } else {
                    Err(InitError::AdminFailed(op, cqe.status))
                };
            }
            if Csts(self.regs.read32(offset::CSTS as usize)).cfs() {
                return Err(InitError::Fatal);
            }
            if clock() >= deadline {
                return Err(InitError::AdminTimeout(op));
            }
        }
    }

    fn read_scratch(&mut self) -> [u8; IDENTIFY_LEN] {
        self.dma.sync_for_cpu(self.scratch.cpu_addr(), IDENTIFY_LEN);
        let mut b = [0u8; IDENTIFY_LEN];
        self.scratch.read_bytes(0, &mut b);
        b
    }

    fn identify_sqe(&mut self, cns: u8, nsid: u32) -> Sqe {
        self.scratch.zero();
        self.dma
            .sync_for_device(self.scratch.cpu_addr(), self.scratch.len());
        IdentifyCommand {
            cns,
            cntid: 0,
            csi: 0,
            nsid,
        }
        .to_sqe(0)
        .with_prps(self.scratch.dev_addr(), 0)
    }

    fn identify(&mut self, clock: &mut dyn FnMut() -> u64) -> Result<(), InitError> {
        let sqe = self.identify_sqe(cns::CONTROLLER, 0);
        self.admin_sync(sqe, clock)?;
        let id = IdentifyController::decode(&self.read_scratch());
        let mdts_bytes = if id.mdts == 0 {
            0
        } else {
            (self.page as u64) << id.mdts.min(40)
        };
        let mut max_transfer = (self.config.max_transfer as u64)
            .min((PRP_ENTRIES_PER_PAGE * self.page) as u64)
            .max(self.page as u64);
        if mdts_bytes != 0 {
            max_transfer = max_transfer.min(mdts_bytes);
        }
        // Active namespaces (CNS 02h, NVMe 1.1+); older controllers: 1..=NN.
        let mut nsids = Vec::new();
        let sqe = self.identify_sqe(cns::ACTIVE_NS_LIST, 0);
        match self.admin_sync(sqe, clock) {
            Ok(_) => {
                let b = self.read_scratch();
                for c in b.chunks_exact(4) {
                    let n = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if n == 0 {
                        break;
                    }
                    nsids.push(n);
                }
            }
            Err(InitError::AdminFailed(..)) => nsids.extend(1..=id.nn.min(1024)),
            Err(e) => return Err(e),
        }
        let vwc = id.vwc.contains(Vwc::PRESENT);
        for nsid in nsids {
            let sqe = self.identify_sqe(cns::NAMESPACE, nsid);
            if let Err(e) = self.admin_sync(sqe, clock) {
                log::warn!("nvme: Identify Namespace {nsid}: {e}; namespace skipped");
                continue;
            }
            let ns = IdentifyNamespace::decode(&self.read_scratch());
            let bs = ns.block_size();
            let fmt = ns.lbaf[(ns.flbas & 0xF) as usize];
            if ns.nsze == 0 {
                continue;
            }
            if bs == 0 || fmt.ms != 0 {
                log::warn!(
                    "nvme: namespace {nsid}: LBA format with {} metadata bytes / LBADS {} not supported; skipped",
                    fmt.ms,
                    fmt.lbads
                );
                continue;
            }
            let dsm = id.oncs.contains(Oncs::DSM);
            self.namespaces.push(Namespace {
                nsid,
                geometry: Geometry {
                    block_size: bs,
                    blocks: ns.nsze,
                },
                caps: Capabilities {
                    volatile_write_cache: vwc,
                    flush: true,
                    fua: true,
                    write_zeroes: true,
                    deallocate: dsm,
                    deallocate_reads_zero: dsm && ns.dlfeat & 7 == 1,
                    compare: id.oncs.contains(Oncs::COMPARE),
                    verify: true,
                },
                native_write_zeroes: id.oncs.contains(Oncs::WRITE_ZEROES),
                native_verify: id.oncs.contains(Oncs::VERIFY),
            });
        }
        let len = self
            .config
            .zero_buffer
            .max(self.page)
            .next_multiple_of(self.page);
        if self.namespaces.iter().any(|n| !n.native_write_zeroes) {
            self.zero = Some(self.dma.alloc(len, self.page).ok_or(InitError::NoMemory)?);
        }
        if self.namespaces.iter().any(|n| !n.native_verify) {
            self.sink = Some(self.dma.alloc(len, self.page).ok_or(InitError::NoMemory)?);
        }
        self.info = Some(ControllerInfo {
            vid: id.vid,
            model: trim(&id.mn),
            serial: trim(&id.sn),
            firmware: trim(&id.fr),
            version: Vs(self.regs.read32(offset::VS as usize)),
            cap: self.cap,
            page_size: self.page as u32,
            mdts_bytes,
            max_transfer: max_transfer as u32,
            oncs: id.oncs,
            vwc: id.vwc,
            sgls: id.sgls,
            abort_limit: id.acl as u16 + 1,
            io_queues: 0,
            core_queues: 0,
            queue_depth: self.io_depth,
        });
        Ok(())
    }

    /// Runs one admin command and waits for it (bounded by the admin timeout and CAP.TO),
    /// for tools that need more than bring-up does (Identify pages, hostile commands in
    /// tests). `sqe`'s CID is assigned here; data, if any, must be in memory the caller
    /// owns and points at with the PRPs. Only while the controller is online; a
    /// non-success status is [`InitError::AdminFailed`].
    pub fn admin_command(
        &mut self,
        sqe: Sqe,
        clock: &mut dyn FnMut() -> u64,
    ) -> Result<Cqe, InitError> {
        if self.phase != Phase::Online {
            return Err(InitError::NotOnline);
        }
        self.admin_sync(sqe, clock)
    }

    /// Identify (§5.17) with `cns` for `nsid`, into the driver's scratch page; returns the
    /// 4 KiB data structure. Only while the controller is online.
    pub fn identify_page(
        &mut self,
        cns: u8,
        nsid: u32,
        clock: &mut dyn FnMut() -> u64,
    ) -> Result<[u8; IDENTIFY_LEN], InitError> {
        if self.phase != Phase::Online {
            return Err(InitError::NotOnline);
        }
        let sqe = self.identify_sqe(cns, nsid);
        self.admin_sync(sqe, clock)?;
        Ok(self.read_scratch())
    }

    /// Normal shutdown (§3.6.1): CC.SHN = 01b, then waits for CSTS.SHST = 10b (bounded by
    /// CAP.TO or the admin timeout, whichever is longer). Outstanding commands are not waited
    /// for: the controller completes what it took, and [`Controller::poll`] still reaps those
    /// completions; new requests are refused. The controller is not used again until a new
    /// [`Controller::init`] resets it.
    pub fn shutdown(&mut self, clock: &mut dyn FnMut() -> u64) -> Result<(), InitError> {
        self.ring();
        let cc = Cc(self.regs.read32(offset::CC as usize));
        let cc = Cc::new(
            cc.en(),
            cc.css(),
            cc.mps(),
            cc.ams(),
            Cc::SHN_NORMAL,
            cc.iosqes(),
            cc.iocqes(),
        );
        self.regs.write32(offset::CC as usize, cc.0);
        if self.phase != Phase::Dead {
            self.phase = Phase::ShutDown;
        }
        let deadline = clock().saturating_add(self.to_ns.max(self.config.admin_timeout_ns));
        loop {
            let csts = Csts(self.regs.read32(offset::CSTS as usize));
            if csts.shst() == Csts::SHST_COMPLETE {
                return Ok(());
            }
            if csts.cfs() {
                return Err(InitError::Fatal);
            }
            if clock() >= deadline {
                return Err(InitError::ShutdownTimeout);
            }
        }
    }

    /// Allocates the I/O queues, slots and request table once the queue count is known:
    /// `queues` for the controller's own I/O path, then `core` more for other cores.
    fn allocate_io(&mut self, queues: u16, core: u16) -> bool {
        let depth = self.io_depth;
        let dstrd = self.cap.dstrd();
        for qid in 1..=queues {
            let Some(q) = IoQueue::new(&mut self.dma, qid, depth, self.page, dstrd) else {
                break;
            };
            self.engine.io.push(q);
        }
        if self.engine.io.is_empty() {
            return false;
        }
        self.engine.size_tables(self.namespaces.len());
        let first = self.engine.io.len() as u16 + 1;
        for qid in first..first + core {
            let Some(q) = IoQueue::new(&mut self.dma, qid, depth, self.page, dstrd) else {
                log::warn!("nvme: no memory for I/O queue {qid} of another core");
                break;
            };
            let sq_cq = (q.qp.sq_addr(), q.qp.cq_addr());
            let mut engine = IoEngine::default();
            engine.io.push(q);
            engine.size_tables(self.namespaces.len());
            self.detached.push(Detached {
                link: Arc::new(QueueLink::new(self.generation)),
                engine: Some(engine),
                qid,
                depth,
                sq_cq,
                dead: false,
            });
        }
        if let Some(i) = self.info.as_mut() {
            i.io_queues = self.engine.io.len() as u16;
            i.core_queues = self.detached.len() as u16;
        }
        true
    }

    /// Moves I/O queue pair `i` created for another core (of [`ControllerInfo::core_queues`])
    /// out, with `regs`, a handle on its two doorbells and nothing else: the controller never
    /// writes them. `None` if there is no such queue or it was taken already.
    pub fn take_core_queue<R2: Registers>(&mut self, i: usize, regs: R2) -> Option<CoreQueue<R2, D>>
    where
        D: Clone,
    {
        let p = self.io_params();
        let d = self.detached.get_mut(i)?;
        let engine = d.engine.take()?;
        Some(CoreQueue::new(
            regs,
            self.dma.clone(),
            engine,
            p,
            self.namespaces.clone(),
            d.link.clone(),
            self.config.timeout_scan_ns,
            self.now,
        ))
    }

    /// The queue ID of I/O queue pair `i` created for another core, while it can be taken.
    pub fn core_queue_id(&self, i: usize) -> Option<u16> {
        self.detached
            .get(i)
            .filter(|d| d.engine.is_some() && !d.dead)
            .map(|d| d.qid)
    }

    /// Queue `k` of the configuration script (own queues, then other cores'): its ID,
    /// depth, and SQ and CQ device addresses.
    fn queue_memory(&self, k: usize) -> Option<(u16, u16, u64, u64)> {
        if let Some(q) = self.engine.io.get(k) {
            return Some((q.qp.qid, q.qp.depth, q.qp.sq_addr(), q.qp.cq_addr()));
        }
        let d = self.detached.get(k - self.engine.io.len())?;
        // Addresses are fixed at allocation; the engine may be on another core by now.
        Some((d.qid, d.depth, d.sq_cq.0, d.sq_cq.1))
    }

    // ---- state machine ----------------------------------------------------------------

    fn start_disable(&mut self, now: u64) {
        let cc = Cc(self.regs.read32(offset::CC as usize));
        self.regs.write32(offset::CC as usize, cc.0 & !1);
        self.phase = Phase::Disabling {
            deadline: now.saturating_add(self.to_ns),
        };
    }

    /// Starts a controller reset (a command timed out after Abort, or CSTS.CFS).
    fn begin_reset(&mut self, now: u64, why: &str) {
        if matches!(self.phase, Phase::Dead | Phase::ShutDown) {
            return;
        }
        log::warn!("nvme: {why}; resetting the controller");
        self.stats.resets += 1;
        self.start_disable(now);
    }

    fn enable(&mut self, now: u64) {
        self.admin.reset(&mut self.dma);
        for s in self.admin_slots.iter_mut() {
            s.used = AdminUse::Free;
            s.done = None;
        }
        let d = self.admin.depth as u32 - 1;
        self.regs.write32(offset::AQA as usize, d | (d << 16));
        self.regs
            .write64(offset::ASQ as usize, self.admin.sq_addr());
        self.regs
            .write64(offset::ACQ as usize, self.admin.cq_addr());
        // CC.MPS, CSS, AMS, IOSQES and IOCQES are set in the same write as EN (§3.5.1 step 6).
        self.regs.write32(offset::CC as usize, self.cc.0 | 1);
        self.phase = Phase::Enabling {
            deadline: now.saturating_add(self.to_ns),
        };
    }

    /// The index in `detached` of the queue configuration step `step` creates, if it is
    /// another core's.
    fn detached_of(&self, step: u16) -> Option<usize> {
        let k = (step.checked_sub(1)? / 2) as usize;
        let i = k.checked_sub(self.engine.io.len())?;
        (i < self.detached.len()).then_some(i)
    }

    fn start_script(&mut self, step: u16, deadline: u64) {
        let mut step = step;
        // Queues of other cores: skip those given up on; re-create one only once its core
        // reset it for this generation (see `QueueLink`).
        while let Some(i) = self.detached_of(step) {
            let d = &self.detached[i];
            if d.dead {
                step += 2 - (step + 1) % 2;
                continue;
            }
            if step % 2 == 1 && !d.link.acked(self.generation) {
                self.phase = Phase::Waiting { step, deadline };
                return;
            }
            break;
        }
        let sqe = match self.script_sqe(step) {
            Some(s) => s,
            None => {
                self.phase = Phase::Online;
                return;
            }
        };
        if self.admin_submit(sqe, AdminUse::Script).is_none() {
            self.phase = Phase::Dead;
            return;
        }
        self.admin.ring(&mut self.regs);
        self.phase = Phase::Configuring { step, deadline };
    }

    /// The admin command of a configuration step: 0 = Set Features Number of Queues, then
    /// Create I/O CQ and Create I/O SQ for each queue; `None` after the last.
    fn script_sqe(&self, step: u16) -> Option<Sqe> {
        if step == 0 {
            let n = self.wanted_queues - 1;
            return Some(FeaturesCommand::set_sqe(
                0,
                FeatureId::NumberOfQueues as u8,
                keel_nvme::io::number_of_queues(n, n),
            ));
        }
        let (qid, depth, sq, cq) = self.queue_memory(((step - 1) / 2) as usize)?;
        let qsize = (depth as u32 - 1) << 16;
        let qid = qid as u32;
        Some(if step % 2 == 1 {
            // Create I/O Completion Queue: physically contiguous (PC); interrupts off (IEN 0)
            // unless asked for, then on vector `qid` (IV, bits 31:16).
            let ien = if self.config.interrupts {
                (qid << 16) | 0b10
            } else {
                0
            };
            Sqe::new(AdminOpcode::CreateIoCq as u8, 0)
                .with_cdw(10, qsize | qid)
                .with_cdw(11, ien | 1)
                .with_prps(cq, 0)
        } else {
            // Create I/O Submission Queue bound to the CQ of the same id, PC, priority 0.
            Sqe::new(AdminOpcode::CreateIoSq as u8, 0)
                .with_cdw(10, qsize | qid)
                .with_cdw(11, (qid << 16) | 1)
                .with_prps(sq, 0)
        })
    }

    fn script_done(&mut self, step: u16, cqe: Cqe, now: u64) {
        let deadline = now.saturating_add(self.config.admin_timeout_ns);
        if let Some(i) = self.detached_of(step) {
            if !cqe.status.is_success() {
                // Another core's queue: that core's drive I/O fails; the drive serves on.
                log::error!(
                    "nvme: creating I/O queue {} for another core failed: {}; not used",
                    self.detached[i].qid,
                    cqe.status
                );
                self.detached[i].dead = true;
                self.detached[i].link.dead();
                self.start_script(step + 2 - (step + 1) % 2, deadline);
                return;
            }
            if step.is_multiple_of(2) {
                self.detached[i].link.up(self.generation);
            }
        }
        if !cqe.status.is_success() {
            log::error!(
                "nvme: configuration step {step} failed: {}; giving up on the controller",
                cqe.status
            );
            self.go_dead();
            return;
        }
        if step == 0 {
            let granted = ((cqe.dw0 & 0xFFFF).min(cqe.dw0 >> 16) + 1) as u16;
            let n = granted.min(self.wanted_queues);
            if self.engine.io.is_empty() {
                // Other cores' queues come out of what is granted beyond one of our own.
                let core = self.config.core_queues.min(n - 1);
                let own = (n - core).min(self.config.io_queues.max(1));
                if !self.allocate_io(own, core) {
                    self.go_dead();
                    return;
                }
            } else if (n as usize) < self.engine.io.len() {
                log::error!("nvme: controller now grants {n} queue(s), fewer than before");
                self.go_dead();
                return;
            } else {
                let room = n as usize - self.engine.io.len();
                for d in self.detached.iter_mut().skip(room).filter(|d| !d.dead) {
                    log::error!(
                        "nvme: controller now grants {n} queue(s): queue {} not used",
                        d.qid
                    );
                    d.dead = true;
                    d.link.dead();
                }
            }
        }
        self.start_script(step + 1, deadline);
        if self.phase == Phase::Online {
            self.next_health = now.saturating_add(self.config.health_check_ns);
        }
    }

    fn go_dead(&mut self) {
        self.phase = Phase::Dead;
        self.fail_all();
        for d in self.detached.iter_mut() {
            d.dead = true;
            d.link.dead();
        }
    }

    /// Advances the state machine (not the I/O path).
    fn step(&mut self, now: u64) {
        match self.phase {
            Phase::Online | Phase::Enabled | Phase::Dead | Phase::ShutDown => {}
            Phase::Waiting { step, deadline } => {
                let Some(i) = self.detached_of(step) else {
                    self.start_script(step, deadline);
                    return;
                };
                let next = now.saturating_add(self.config.admin_timeout_ns);
                if self.detached[i].link.acked(self.generation) {
                    self.start_script(step, next);
                } else if now >= deadline {
                    log::error!(
                        "nvme: the core of I/O queue {} did not reset it; not used",
                        self.detached[i].qid
                    );
                    self.detached[i].dead = true;
                    self.detached[i].link.dead();
                    self.start_script(step + 2, next);
                }
            }
            Phase::Disabling { deadline } => {
                let csts = Csts(self.regs.read32(offset::CSTS as usize));
                if !csts.rdy() {
                    // The controller is idle: nothing it was given will be touched again.
                    self.fail_all();
                    for q in self.engine.io.iter_mut() {
                        q.qp.reset(&mut self.dma);
                    }
                    // Other cores' queues: each core resets its own and acknowledges (see
                    // `QueueLink`); one not handed out yet is reset here.
                    self.generation += 1;
                    for d in self.detached.iter_mut().filter(|d| !d.dead) {
                        d.link.down(self.generation);
                        if let Some(e) = d.engine.as_mut() {
                            e.fail_all(&mut self.dma);
                            for q in e.io.iter_mut() {
                                q.qp.reset(&mut self.dma);
                            }
                            d.link.acknowledge(self.generation);
                        }
                    }
                    self.enable(now);
                } else if now >= deadline {
                    log::error!("nvme: controller did not become idle; giving up on it");
                    self.go_dead();
                }
            }
            Phase::Enabling { deadline } => {
                let csts = Csts(self.regs.read32(offset::CSTS as usize));
                if csts.cfs() {
                    log::error!("nvme: controller fatal status while enabling; giving up on it");
                    self.go_dead();
                } else if csts.rdy() {
                    if self.info.is_none() {
                        self.phase = Phase::Enabled;
                    } else {
                        self.start_script(0, now.saturating_add(self.config.admin_timeout_ns));
                    }
                } else if now >= deadline {
                    log::error!("nvme: controller did not become ready; giving up on it");
                    self.go_dead();
                }
            }
            Phase::Configuring { step, deadline } => {
                self.reap_admin();
                let done = self
                    .admin_slots
                    .iter_mut()
                    .find(|s| s.used == AdminUse::Script && s.done.is_some());
                if let Some(s) = done {
                    let cqe = s.done.take().unwrap_or_default();
                    s.used = AdminUse::Free;
                    self.script_done(step, cqe, now);
                } else if now >= deadline || Csts(self.regs.read32(offset::CSTS as usize)).cfs() {
                    log::error!("nvme: configuration step {step} did not complete; giving up");
                    self.go_dead();
                }
            }
        }
    }

    // ---- admin queue -------------------------------------------------------------------

    fn admin_submit(&mut self, mut sqe: Sqe, used: AdminUse) -> Option<u16> {
        let cid = self
            .admin_slots
            .iter()
            .position(|s| s.used == AdminUse::Free)? as u16;
        sqe.cid = cid;
        if !self.admin.push(&mut self.dma, &sqe) {
            return None;
        }
        let slot = &mut self.admin_slots[cid as usize];
        slot.used = used;
        slot.done = None;
        if used == AdminUse::Sync {
            self.admin.ring(&mut self.regs);
        }
        Some(cid)
    }

    fn reap_admin(&mut self) {
        while let Some(cqe) = self.admin.pop(&mut self.dma) {
            match self.admin_slots.get_mut(cqe.cid as usize) {
                Some(s) if s.used == AdminUse::Abort => s.used = AdminUse::Free,
                Some(s) if s.used != AdminUse::Free => s.done = Some(cqe),
                _ => self.stats.spurious += 1,
            }
        }
        self.admin.ack(&mut self.regs);
    }

    // ---- I/O path ----------------------------------------------------------------------

    /// Queues a request for namespace index `ns`. The SQ tail doorbell is written by the next
    /// [`Controller::ring`] / poll, once for every request queued meanwhile.
    pub fn submit(&mut self, ns: usize, req: BlockRequest) -> Result<(), Rejected> {
        self.submit_to(ns, None, req)
    }

    /// Queues a request for namespace index `ns` on I/O queue index `queue` (queue ID
    /// `queue + 1`) instead of the next one round robin: a caller with queues of its own
    /// (ublk's hardware queues) keeps them one to one with the controller's. Busy when that
    /// queue is full.
    pub fn submit_on(
        &mut self,
        ns: usize,
        queue: usize,
        req: BlockRequest,
    ) -> Result<(), Rejected> {
        if queue >= self.engine.io.len() {
            return reject(req, RejectReason::Invalid(BlockError::Internal));
        }
        self.submit_to(ns, Some(queue), req)
    }

    fn submit_to(
        &mut self,
        ns: usize,
        queue: Option<usize>,
        req: BlockRequest,
    ) -> Result<(), Rejected> {
        match self.phase {
            Phase::Online => {}
            Phase::Dead | Phase::ShutDown => {
                return reject(req, RejectReason::Invalid(BlockError::Internal));
            }
            _ => return reject(req, RejectReason::Busy),
        }
        let p = self.io_params();
        self.engine.submit(
            &mut self.dma,
            &p,
            &self.namespaces,
            self.now,
            ns,
            queue,
            req,
        )
    }

    /// What the I/O path needs of this controller (see [`IoParams`]).
    pub(crate) fn io_params(&self) -> IoParams {
        IoParams {
            page: self.page,
            max_transfer: self.info.as_ref().map_or(0, |i| i.max_transfer),
            io_timeout_ns: self.config.io_timeout_ns,
            zero: self.zero.as_ref().map(|z| (z.dev_addr(), z.len())),
            sink: self.sink.as_ref().map(|z| (z.dev_addr(), z.len())),
        }
    }

    /// Asks the drive to abort the request of namespace index `ns` tagged `tag` (a host's
    /// Abort reaching a command outstanding on the drive): one Abort command (§5.1) per
    /// command of the request still outstanding, within the drive's Abort Command Limit.
    /// True when at least one Abort was sent; the request then completes through the normal
    /// path, with [`BlockError::Aborted`] if the drive aborted it (Command Abort Requested) or
    /// with its own result if it finished first.
    pub fn abort(&mut self, ns: usize, tag: u64) -> bool {
        if self.phase != Phase::Online {
            return false;
        }
        let Some(pi) = self.engine.parent_of(ns, tag) else {
            return false;
        };
        self.engine.parents[pi].abort_requested = true;
        let limit = self.info.as_ref().map_or(1, |i| i.abort_limit) as usize;
        let mut sent = false;
        for qi in 0..self.engine.io.len() {
            let qid = self.engine.io[qi].qp.qid;
            for cid in 0..self.engine.io[qi].slots.len() {
                let s = &self.engine.io[qi].slots[cid];
                if !s.busy || s.parent as usize != pi {
                    continue;
                }
                let outstanding = self.aborts_outstanding();
                if outstanding >= limit {
                    break;
                }
                let sqe = AbortCommand {
                    sqid: qid,
                    cid: cid as u16,
                }
                .to_sqe(0);
                if self.admin_submit(sqe, AdminUse::Abort).is_some() {
                    self.stats.aborts += 1;
                    sent = true;
                    log::info!("nvme: aborting command {cid} on queue {qid} (host request)");
                }
            }
        }
        // The I/O doorbells first: the command to abort must have reached the drive.
        self.ring();
        self.admin.ring(&mut self.regs);
        sent
    }

    /// Abort commands at the drive now (against its Abort Command Limit).
    fn aborts_outstanding(&self) -> usize {
        self.admin_slots
            .iter()
            .filter(|a| a.used == AdminUse::Abort)
            .count()
    }

    /// Sends the drive the Aborts other cores asked for, on their queues (a host's Abort of
    /// a command there: `corequeue::QueueLink`), within the drive's Abort Command Limit;
    /// one load per handed-out queue when there are none.
    fn abort_for_cores(&mut self) {
        if self.phase != Phase::Online {
            return;
        }
        let limit = self.info.as_ref().map_or(1, |i| i.abort_limit) as usize;
        let mut sent = false;
        for di in 0..self.detached.len() {
            // One load per queue when nothing is asked (every pass).
            if !self.detached[di].link.abort_requested() {
                continue;
            }
            if self.aborts_outstanding() >= limit {
                break;
            }
            let Some(cid) = self.detached[di].link.take_abort_request() else {
                continue;
            };
            let qid = self.detached[di].qid;
            let sqe = AbortCommand { sqid: qid, cid }.to_sqe(0);
            if self.admin_submit(sqe, AdminUse::Abort).is_some() {
                self.stats.aborts += 1;
                sent = true;
                log::info!(
                    "nvme: aborting command {cid} on queue {qid} (host request) of another core"
                );
            }
        }
        if sent {
            self.admin.ring(&mut self.regs);
        }
    }

    /// Writes the SQ tail doorbell of every queue with new entries (once per batch).
    pub fn ring(&mut self) {
        self.engine.ring(&mut self.regs);
    }

    fn reap_io(&mut self) -> usize {
        self.engine.reap(&mut self.dma, &mut self.regs)
    }

    /// Fails every outstanding request with an internal error (after the controller stopped,
    /// or when giving up on it).
    fn fail_all(&mut self) {
        self.engine.fail_all(&mut self.dma);
        for s in self.admin_slots.iter_mut() {
            if s.used == AdminUse::Abort {
                s.used = AdminUse::Free;
            }
        }
    }

    fn check_timeouts(&mut self, now: u64) {
        let mut reset = false;
        for qi in 0..self.engine.io.len() {
            let qid = self.engine.io[qi].qp.qid;
            for cid in 0..self.engine.io[qi].slots.len() {
                let s = &self.engine.io[qi].slots[cid];
                if !s.busy {
                    continue;
                }
                match s.abort_deadline {
                    None if now >= s.deadline => {
                        self.stats.timeouts += 1;
                        let abort = AbortCommand {
                            sqid: qid,
                            cid: cid as u16,
                        }
                        .to_sqe(0);
                        let outstanding = self.aborts_outstanding();
                        let limit = self.info.as_ref().map_or(1, |i| i.abort_limit) as usize;
                        if outstanding < limit
                            && self.admin_submit(abort, AdminUse::Abort).is_some()
                        {
                            self.stats.aborts += 1;
                            log::warn!("nvme: command {cid} on queue {qid} timed out; aborting it");
                        }
                        self.engine.io[qi].slots[cid].abort_deadline =
                            Some(now.saturating_add(self.config.abort_timeout_ns));
                    }
                    Some(d) if now >= d => reset = true,
                    _ => {}
                }
            }
        }
        self.admin.ring(&mut self.regs);
        if reset {
            self.begin_reset(now, "an aborted command did not complete");
        }
    }

    /// One pass: rings doorbells, reaps completions, checks timeouts and controller health,
    /// advances a reset. Completions are parked per namespace for the namespaces'
    /// [`DriveBackend`]s. Returns whether anything happened.
    pub fn poll(&mut self, now: u64) -> bool {
        self.now = now;
        if self.phase == Phase::ShutDown {
            // Commands taken before the shutdown may still complete: reap them, nothing else.
            let n = self.reap_io();
            self.reap_admin();
            return n > 0;
        }
        if self.phase != Phase::Online {
            let before = self.phase;
            self.step(now);
            return before != self.phase;
        }
        self.ring();
        let n = self.reap_io();
        self.reap_admin();
        self.abort_for_cores();
        if now >= self.next_scan {
            self.next_scan = now.saturating_add(self.config.timeout_scan_ns);
            self.check_timeouts(now);
            // Every request is taken, so a core asking does not hide another's request.
            let asked = self
                .detached
                .iter()
                .filter(|d| d.link.take_reset_request())
                .count();
            if asked > 0 && self.phase == Phase::Online {
                self.stats.timeouts += asked as u64;
                self.begin_reset(now, "a command on another core's I/O queue timed out");
            }
        }
        if self.phase == Phase::Online && now >= self.next_health {
            self.next_health = now.saturating_add(self.config.health_check_ns);
            let csts = Csts(self.regs.read32(offset::CSTS as usize));
            if csts.cfs() {
                self.begin_reset(now, "controller fatal status (CSTS.CFS)");
            } else if !csts.rdy() {
                self.begin_reset(now, "controller no longer ready");
            }
        }
        n > 0
    }

    /// Rings doorbells and reaps completions without advancing time (what a namespace
    /// backend's `poll` does).
    pub fn service(&mut self) -> usize {
        if !matches!(self.phase, Phase::Online | Phase::ShutDown) {
            return 0;
        }
        self.ring();
        self.reap_io()
    }

    /// The next parked completion of namespace index `ns`.
    pub fn take_completion(&mut self, ns: usize) -> Option<BlockCompletion> {
        self.engine.take_completion(ns)
    }

    /// Where the controller is.
    pub fn state(&self) -> State {
        match self.phase {
            Phase::Online => State::Online,
            Phase::Dead => State::Dead,
            Phase::ShutDown => State::ShutDown,
            _ => State::Resetting,
        }
    }

    /// Identify Controller summary.
    pub fn info(&self) -> Option<&ControllerInfo> {
        self.info.as_ref()
    }

    /// Active namespaces served.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Counters.
    pub fn stats(&self) -> DriveStats {
        let c = self.engine.counters;
        let mut s = self.stats;
        s.commands = c.commands;
        s.requests_done = c.requests_done;
        s.errors = c.errors;
        s.failed_by_reset = c.failed_by_reset;
        s.spurious += c.spurious;
        s.queue_full = c.queue_full;
        s.last_error = c.last_error;
        (s.sq_doorbells, s.cq_doorbells) = self.engine.doorbells();
        s
    }

    /// The time of the last poll (or of the end of bring-up).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Commands outstanding on the I/O queues.
    pub fn outstanding(&self) -> usize {
        self.engine.outstanding()
    }

    /// The register seam (tests inspect the fake through it).
    pub fn regs(&mut self) -> &mut R {
        &mut self.regs
    }
}

/// A controller shared by its namespaces' backends; what the poll loop keeps and polls.
pub struct Drive<R: Registers, D: Dma> {
    ctrl: Rc<RefCell<Controller<R, D>>>,
}

impl<R: Registers, D: Dma> fmt::Debug for Drive<R, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Drive")
    }
}

impl<R: Registers, D: Dma> Drive<R, D> {
    /// Brings the controller up (see [`Controller::init`]).
    pub fn init(
        regs: R,
        dma: D,
        config: Config,
        clock: &mut dyn FnMut() -> u64,
    ) -> Result<Self, InitError> {
        Ok(Self {
            ctrl: Rc::new(RefCell::new(Controller::init(regs, dma, config, clock)?)),
        })
    }

    /// One pass of the controller (see [`Controller::poll`]); call it from the poll loop with
    /// the current time. Returns whether anything happened.
    pub fn poll(&self, now: u64) -> bool {
        self.ctrl.try_borrow_mut().is_ok_and(|mut c| c.poll(now))
    }

    /// A block backend for namespace index `i` of [`Drive::namespaces`].
    pub fn backend(&self, i: usize) -> Option<DriveBackend<R, D>> {
        let c = self.ctrl.try_borrow().ok()?;
        let ns = *c.namespaces().get(i)?;
        Some(DriveBackend::new(self.ctrl.clone(), i, ns))
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.ctrl
            .try_borrow()
            .map(|c| c.namespaces().to_vec())
            .unwrap_or_default()
    }

    /// Identify Controller summary.
    pub fn info(&self) -> Option<ControllerInfo> {
        self.ctrl.try_borrow().ok()?.info().cloned()
    }

    /// Where the controller is.
    pub fn state(&self) -> State {
        self.ctrl.try_borrow().map_or(State::Online, |c| c.state())
    }

    /// Counters.
    pub fn stats(&self) -> DriveStats {
        self.ctrl
            .try_borrow()
            .map(|c| c.stats())
            .unwrap_or_default()
    }

    /// Runs `f` on the controller (tests, diagnostics).
    pub fn with<T>(&self, f: impl FnOnce(&mut Controller<R, D>) -> T) -> Option<T> {
        Some(f(&mut *self.ctrl.try_borrow_mut().ok()?))
    }
}
