//! One path: the state of one controller association (admin queue, I/O queues) to one
//! address. The logic that moves it lives in [`crate::volume`]; this module holds its data and
//! the pure helpers.

use crate::config::PathAddr;
use crate::data::Data;
use crate::stats::{LossReason, PathCounters, PathSnapshot, PathState, QueueState, QueueView};
use alloc::vec::Vec;
use keel_nvme::Sqe;
use keel_nvme::fabrics::{ConnectCommand, ConnectData};
use keel_nvme::identify::{Cmic, Ctratt, IdentifyController, IdentifyNamespace, Oncs, Vwc};
use keel_nvme::log::ana::AnaState;
use keel_nvme::opcode::async_event;
use keel_nvme::regs::Cap;
use keel_nvmf_tcp::{Digests, HostConfig, HostConnection};

/// Admin command slots (setup runs one command at a time; live, at most Keep Alive, one
/// Asynchronous Event Request and one ANA log read are outstanding).
pub(crate) const ADMIN_SLOTS: u16 = 8;
/// Admin queue size asked for in Connect (0's based: 32 entries, Linux `NVME_AQ_DEPTH`).
pub(crate) const ADMIN_SQSIZE: u16 = 31;
/// Interval between Property Get CSTS while waiting for CSTS.RDY.
pub(crate) const CSTS_POLL_NS: u64 = 10_000_000;
/// No request.
pub(crate) const NO_REQ: u16 = u16::MAX;
/// ANA groups read from the log at most (RGO: 32 bytes each).
pub(crate) const MAX_ANA_GROUPS: usize = 128;

/// A socket and the NVMe/TCP connection on it.
#[derive(Debug)]
pub(crate) struct Conn<S> {
    pub sock: Option<S>,
    /// The socket reached Established.
    pub up: bool,
    pub hc: HostConnection<Data>,
}

impl<S> Conn<S> {
    pub fn new(digests: Digests, slots: u16, in_capsule_limit: u32) -> Option<Self> {
        let hc = HostConnection::new(HostConfig {
            hpda: 0,
            digests,
            // Four R2Ts in flight per command (MAXR2T is 0's based).
            maxr2t: 3,
            slots,
            in_capsule_limit,
            // Connect leaves SQ flow control on (the CQE's SQHD is kept).
            sq_flow_control_disabled: false,
        })
        .ok()?;
        Some(Self {
            sock: None,
            up: false,
            hc,
        })
    }
}

/// An I/O command in flight: the request it serves and when it was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cmd {
    pub req: u16,
    pub issued_at: u64,
}

/// One I/O queue.
#[derive(Debug)]
pub(crate) struct IoQ<S> {
    pub conn: Conn<S>,
    /// CID of the Connect in flight.
    pub connect_cid: Option<u16>,
    /// Connected (Connect succeeded).
    pub live: bool,
    /// Indexed by CID (HostConnection uses slot numbers as CIDs).
    pub cmds: Vec<Cmd>,
    pub inflight: u16,
}

impl<S> IoQ<S> {
    pub fn has_room(&self) -> bool {
        self.live && (self.inflight as usize) < self.cmds.len()
    }
}

/// What an admin command slot is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminUse {
    Free,
    Setup,
    KeepAlive,
    Aer,
    AnaLog,
}

/// Association setup steps (NVMe-oF 1.1 §3.3 Connect, NVMe base 2.0 §3.5.1 initialization as
/// a fabrics host does it: Property Get/Set instead of register accesses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// TCP connect and ICReq/ICResp on the admin connection.
    Socket,
    /// Connect (admin queue, dynamic controller).
    Connect,
    /// Property Get CAP.
    Cap,
    /// Property Set CC (EN = 1).
    Cc,
    /// Property Get CSTS until RDY; `poll_at` is when to ask again.
    Csts { poll_at: Option<u64> },
    /// Identify Controller.
    IdCtrl,
    /// Set Features Number of Queues.
    Queues,
    /// Set Features Asynchronous Event Configuration (ANA change notices).
    Aec,
    /// Identify Namespace.
    IdNs,
    /// Get Log Page ANA.
    Ana,
    /// I/O queues connecting.
    IoQueues,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Socket => "ICReq",
            Step::Connect => "Connect (admin queue)",
            Step::Cap => "Property Get CAP",
            Step::Cc => "Property Set CC",
            Step::Csts { .. } => "Property Get CSTS",
            Step::IdCtrl => "Identify Controller",
            Step::Queues => "Set Features Number of Queues",
            Step::Aec => "Set Features Asynchronous Event Configuration",
            Step::IdNs => "Identify Namespace",
            Step::Ana => "Get Log Page ANA",
            Step::IoQueues => "Connect (I/O queue)",
        }
    }
}

/// Where the path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting; the next attempt starts at `at`.
    Reconnecting {
        at: u64,
    },
    /// An attempt is under way.
    Connecting,
    Live,
    Failed,
}

/// What the association setup learned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Info {
    pub cntlid: u16,
    pub cap: u64,
    /// Largest transfer in bytes (0: no limit).
    pub mdts_bytes: u64,
    pub in_capsule: u32,
    pub cmic: Cmic,
    pub oaes: u32,
    pub ctratt: Ctratt,
    pub anatt: u8,
    pub nanagrpid: u32,
    pub oncs: Oncs,
    pub vwc: Vwc,
    pub maxcmd: u16,
    /// I/O queues to use.
    pub nr_queues: u16,
    /// SQSIZE sent in each I/O queue's Connect (0's based).
    pub sqsize: u16,
    /// Commands in flight per I/O queue.
    pub depth: u16,
    pub anagrpid: u32,
}

impl Info {
    pub fn learn(&mut self, id: &IdentifyController, cap: Cap) {
        let page = 4096u64 << cap.mpsmin();
        self.mdts_bytes = if id.mdts == 0 {
            0
        } else {
            page.checked_shl(id.mdts as u32).unwrap_or(0)
        };
        self.in_capsule = id.ioccsz.saturating_mul(16).saturating_sub(64);
        self.cmic = id.cmic;
        self.oaes = id.oaes;
        self.ctratt = id.ctratt;
        self.anatt = id.anatt;
        self.nanagrpid = id.nanagrpid;
        self.oncs = id.oncs;
        self.vwc = id.vwc;
        self.maxcmd = id.maxcmd;
    }

    /// The controller reports ANA (CMIC bit 3).
    pub fn ana_reporting(&self) -> bool {
        self.cmic.contains(Cmic::ANA_REPORTING)
    }

    /// The controller sends ANA change notices (OAES bit 11).
    pub fn ana_notices(&self) -> bool {
        self.oaes & async_event::AEC_ANA_CHANGE != 0
    }

    /// Traffic based keep alive (CTRATT bit 6).
    pub fn tbkas(&self) -> bool {
        self.ctratt.contains(Ctratt::TBKAS)
    }

    /// Largest blocks per Read/Write/Compare for `block_size` (MDTS, and the 16-bit NLB).
    pub fn max_rw_blocks(&self, block_size: u32) -> u32 {
        let by_mdts = if self.mdts_bytes == 0 {
            u64::MAX
        } else {
            (self.mdts_bytes / block_size as u64).max(1)
        };
        by_mdts.min(65536) as u32
    }
}

/// The namespace as one path identified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NsId {
    pub block_size: u32,
    pub blocks: u64,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
}

impl NsId {
    pub fn from_identify(id: &IdentifyNamespace) -> Result<Self, LossReason> {
        if id.nsze == 0 {
            return Err(LossReason::Namespace("not active on the remote"));
        }
        let bs = id.block_size();
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(LossReason::Namespace("unsupported block size"));
        }
        Ok(Self {
            block_size: bs,
            blocks: id.nsze,
            nguid: id.nguid,
            eui64: id.eui64,
        })
    }
}

/// One path.
#[derive(Debug)]
pub(crate) struct Path<S> {
    pub addr: PathAddr,
    pub phase: Phase,
    pub step: Step,
    pub attempt_deadline: u64,
    pub ready_deadline: u64,
    pub admin: Option<Conn<S>>,
    pub admin_use: [(AdminUse, u64); ADMIN_SLOTS as usize],
    pub ioqs: Vec<IoQ<S>>,
    pub info: Info,
    pub ana: Option<AnaState>,
    pub ana_wanted: bool,
    pub ana_change_deadline: Option<u64>,
    pub ana_buf: Option<alloc::vec::Vec<u8>>,
    pub ka_due: u64,
    pub ka_sent: Option<u64>,
    pub comp_seen: bool,
    /// Since when the path has been down (cleared when it goes live).
    pub down_since: Option<u64>,
    pub inflight: u32,
    pub next_queue: usize,
    pub next_scan: u64,
    pub counters: PathCounters,
    pub last_loss: Option<LossReason>,
    /// Which association: counts up each time the path goes live (on a lane: the owner's
    /// association its queues belong to).
    pub epoch: u32,
    /// QIDs of its I/O queues start after this (0 on the owner, whose queues are 1..).
    pub qid_base: u16,
    /// I/O queues the remote granted beyond the owner's own, for lanes.
    pub lane_pool: u16,
    /// I/O commands sent on each of its queues (by index), over every association.
    pub queue_commands: Vec<u64>,
}

impl<S> Path<S> {
    pub fn new(addr: PathAddr) -> Self {
        Self {
            addr,
            phase: Phase::Reconnecting { at: 0 },
            step: Step::Socket,
            attempt_deadline: 0,
            ready_deadline: 0,
            admin: None,
            admin_use: [(AdminUse::Free, 0); ADMIN_SLOTS as usize],
            ioqs: Vec::new(),
            info: Info::default(),
            ana: None,
            ana_wanted: false,
            ana_change_deadline: None,
            ana_buf: None,
            ka_due: 0,
            ka_sent: None,
            comp_seen: false,
            down_since: Some(0),
            inflight: 0,
            next_queue: 0,
            next_scan: 0,
            counters: PathCounters::default(),
            last_loss: None,
            epoch: 0,
            qid_base: 0,
            lane_pool: 0,
            queue_commands: Vec::new(),
        }
    }

    /// Live and ANA-accessible: I/O may be sent.
    pub fn usable(&self) -> bool {
        self.phase == Phase::Live && self.ana.is_none_or(AnaState::is_accessible)
    }

    /// Usable and ANA optimized (or not reporting ANA).
    pub fn optimized(&self) -> bool {
        self.usable() && self.ana != Some(AnaState::NonOptimized)
    }

    /// An I/O queue with a free slot, round robin.
    pub fn pick_queue(&mut self) -> Option<usize> {
        let n = self.ioqs.len();
        for i in 0..n {
            let q = (self.next_queue + i) % n;
            if self.ioqs[q].has_room() {
                self.next_queue = (q + 1) % n;
                return Some(q);
            }
        }
        None
    }

    pub fn has_room(&self) -> bool {
        self.ioqs.iter().any(IoQ::has_room)
    }

    pub fn state(&self) -> PathState {
        match self.phase {
            Phase::Reconnecting { .. } => PathState::Reconnecting,
            Phase::Connecting => PathState::Connecting,
            Phase::Live => PathState::Live,
            Phase::Failed => PathState::Failed,
        }
    }

    /// Its I/O queues, with those it had before (down now), without allocating: what
    /// [`crate::RemoteVolume::for_each_queue`] reports.
    pub fn for_each_queue(&self, path: u8, f: &mut dyn FnMut(QueueView)) {
        for i in 0..self.ioqs.len().max(self.queue_commands.len()) {
            let q = self.ioqs.get(i);
            f(QueueView {
                path,
                qid: self.qid_base.saturating_add(i as u16 + 1),
                state: match q {
                    Some(q) if q.live => QueueState::Live,
                    Some(_) => QueueState::Connecting,
                    None => QueueState::Down,
                },
                commands: self.queue_commands.get(i).copied().unwrap_or(0),
                in_flight: q.map_or(0, |q| q.inflight),
            });
        }
    }

    pub fn snapshot(&self) -> PathSnapshot {
        let live = self.phase == Phase::Live;
        PathSnapshot {
            addr: self.addr,
            state: self.state(),
            ana: self.ana,
            cntlid: if live { self.info.cntlid } else { 0 },
            io_queues: if live { self.ioqs.len() as u16 } else { 0 },
            queue_depth: if live { self.info.depth } else { 0 },
            in_flight: self.inflight,
            last_loss: self.last_loss,
            counters: self.counters,
        }
    }

    /// Keep Alive period: KATO/2, KATO/4 with traffic based keep alive (Linux
    /// `nvme_keep_alive_work_period`).
    pub fn ka_period(&self, kato_ns: u64) -> u64 {
        if self.info.tbkas() {
            kato_ns / 4
        } else {
            kato_ns / 2
        }
        .max(1)
    }

    /// Admin slot bookkeeping.
    pub fn admin_outstanding(&self, u: AdminUse) -> Option<u64> {
        self.admin_use
            .iter()
            .find(|(x, _)| *x == u)
            .map(|&(_, at)| at)
    }
}

/// A Connect SQE and its 1024-byte data.
pub(crate) fn connect_command(
    qid: u16,
    sqsize: u16,
    kato_ms: u32,
    hostid: [u8; 16],
    cntlid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> (Sqe, Data) {
    let sqe = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato: kato_ms,
    }
    .to_sqe(0);
    let mut data = alloc::vec![0u8; ConnectData::SIZE];
    ConnectData::new(hostid, cntlid, subnqn, hostnqn).write(&mut data);
    (sqe, Data::Owned(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_limits() {
        let mut i = Info::default();
        assert_eq!(i.max_rw_blocks(512), 65536, "no MDTS: NLB is the limit");
        let id = IdentifyController {
            mdts: 1,
            ioccsz: 4,
            ..Default::default()
        };
        i.learn(&id, Cap(0));
        assert_eq!(i.mdts_bytes, 8192);
        assert_eq!(i.in_capsule, 0, "IOCCSZ 4 = the SQE only");
        assert_eq!(i.max_rw_blocks(512), 16);
        assert_eq!(i.max_rw_blocks(4096), 2);
        // CAP.MPSMIN 1: 8 KiB pages.
        i.learn(&id, Cap(1 << 48));
        assert_eq!(i.mdts_bytes, 16384);
        let id = IdentifyController {
            mdts: 5,
            ioccsz: 516,
            ctratt: Ctratt::TBKAS,
            ..Default::default()
        };
        i.learn(&id, Cap(0));
        assert_eq!(i.in_capsule, 8192);
        assert!(i.tbkas());
        let p: Path<u8> = Path {
            info: i,
            ..Path::new(PathAddr::new([1, 2, 3, 4], 4420))
        };
        assert_eq!(p.ka_period(4_000), 1_000);
    }
}
