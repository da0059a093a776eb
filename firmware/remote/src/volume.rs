//! The volume: the request table, dispatch over paths, completions, retries and failover, and
//! the association state machine of every path. Everything is driven by [`Volume::poll`] with
//! the time passed in; [`Volume::submit`] only queues work (and hands commands to the
//! transport, which sends them at the next poll).

use crate::config::{ConfigError, Policy, RemoteConfig};
use crate::data::Data;
use crate::lane::{Grant, LaneLoss, LaneSeed, LaneUpdate};
use crate::net::{Net, SockState};
use crate::path::*;
use crate::stats::{LossReason, Snapshot, VolumeCounters, VolumeState};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use keel_nvme::cqe::{generic, media, path as path_sc, sct};
use keel_nvme::fabrics::{CNTLID_DYNAMIC, PropertyCommand, PropertySize};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyCommand, IdentifyController, IdentifyNamespace, Oncs, Vwc, cns, cntrltype,
};
use keel_nvme::io::{DsmCommand, DsmRange, FeaturesCommand, RwCommand, number_of_queues};
use keel_nvme::log::ana::{self, AnaState};
use keel_nvme::opcode::async_event;
use keel_nvme::regs::{Cap, Cc, Csts, offset};
use keel_nvme::{AdminOpcode, Cqe, FeatureId, IoOpcode, Sqe, Status};
use keel_nvmf_tcp::HostEvent;
use keel_nvmf_tcp::target::MIN_IN_CAPSULE;
use keel_storage::{
    BlockCompletion, BlockError, BlockOp, BlockRequest, Capabilities, Geometry, IoBuf,
    RejectReason, Rejected,
};

/// Outstanding I/O commands are checked for timeouts at most this often.
const TIMEOUT_SCAN_NS: u64 = 100_000_000;
const MS: u64 = 1_000_000;

/// Timers in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    kato: u64,
    reconnect: u64,
    ctrl_loss: Option<u64>,
    fast_fail: Option<u64>,
    io_timeout: u64,
    admin_timeout: u64,
    connect_timeout: u64,
}

impl Timing {
    fn new(c: &RemoteConfig) -> Self {
        let ns = |ms: u64| ms.saturating_mul(MS);
        Self {
            kato: ns(c.kato_ms as u64),
            reconnect: ns(c.reconnect_delay_ms),
            ctrl_loss: c.ctrl_loss_tmo_ms.map(ns),
            fast_fail: c.fast_io_fail_tmo_ms.map(ns),
            io_timeout: ns(c.io_timeout_ms),
            admin_timeout: ns(c.admin_timeout_ms),
            connect_timeout: ns(c.connect_timeout_ms),
        }
    }

    /// How long a request may wait for a usable path.
    fn wait_limit(&self) -> Option<u64> {
        match (self.ctrl_loss, self.fast_fail) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A request of the caller, with its progress.
#[derive(Debug, Default)]
struct Req {
    used: bool,
    tag: u64,
    op: Option<BlockOp>,
    lba: u64,
    blocks: u32,
    buf: Option<IoBuf>,
    off: usize,
    /// Blocks completed (parts are sent one after another; see the crate docs).
    done: u32,
    /// Blocks of the command in flight (0: none).
    part: u32,
    retries: u8,
    /// Since when the request has been waiting for a usable path (set when a path failed
    /// under it or none was usable; cleared by a completion from the remote).
    waiting_since: Option<u64>,
    inflight: bool,
}

impl Req {
    /// Blocks the request moves (Flush: none).
    fn total(&self) -> u32 {
        match self.op {
            Some(BlockOp::Flush) | None => 0,
            _ => self.blocks,
        }
    }
}

/// The namespace as the volume serves it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NsInfo {
    pub geometry: Geometry,
    pub caps: Capabilities,
    pub id: NsId,
}

/// Maps a remote's error status onto a block error.
pub(crate) fn block_error(s: Status) -> BlockError {
    match (s.sct, s.sc) {
        (sct::GENERIC, generic::LBA_OUT_OF_RANGE) => BlockError::OutOfRange,
        (sct::GENERIC, generic::INVALID_OPCODE) => BlockError::Unsupported,
        (sct::MEDIA, media::WRITE_FAULT) => BlockError::WriteFault,
        (sct::MEDIA, media::UNRECOVERED_READ_ERROR) => BlockError::ReadError,
        (sct::MEDIA, media::COMPARE_FAILURE) => BlockError::CompareMismatch,
        (sct::PATH, _) => BlockError::PathError,
        _ => BlockError::Internal,
    }
}

fn reject(req: BlockRequest, reason: RejectReason) -> Result<(), Rejected> {
    Err(Rejected { reason, req })
}

/// Moves received bytes of one connection into its transport. `Ok(true)` when something
/// happened; an error when the socket is gone (after the bytes it still held were fed).
fn pump<S: Copy, N: Net<Sock = S>>(
    c: &mut Conn<S>,
    addr: crate::PathAddr,
    now: u64,
    net: &mut N,
) -> Result<bool, LossReason> {
    let sock = match c.sock {
        Some(s) => s,
        None => match net.connect(addr, now) {
            Some(s) => {
                c.sock = Some(s);
                s
            }
            None => return Ok(false),
        },
    };
    let st = net.state(sock);
    if st == SockState::Connecting {
        return Ok(false);
    }
    let mut busy = false;
    if st == SockState::Established && !c.up {
        c.up = true;
        busy = true;
    }
    let now_ms = now / MS;
    loop {
        let hc = &mut c.hc;
        let n = net.recv(sock, &mut |b| hc.recv(now_ms, b));
        if n == 0 {
            break;
        }
        busy = true;
    }
    if st == SockState::Closed {
        return Err(if c.up {
            LossReason::ConnectionClosed
        } else {
            LossReason::ConnectFailed
        });
    }
    Ok(busy)
}

/// Moves a connection's pending PDUs into its socket.
fn flush_conn<S: Copy, N: Net<Sock = S>>(c: &mut Conn<S>, net: &mut N) -> bool {
    let (Some(sock), true) = (c.sock, c.up) else {
        return false;
    };
    let mut any = false;
    while c.hc.wants_transmit() {
        let hc = &mut c.hc;
        let n = net.send(sock, &mut |out| hc.transmit(out));
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

fn take_cmd<S>(q: &mut IoQ<S>, cid: u16) -> Option<Cmd> {
    let c = q.cmds.get_mut(cid as usize)?;
    if c.req == NO_REQ {
        return None;
    }
    let out = *c;
    c.req = NO_REQ;
    q.inflight = q.inflight.saturating_sub(1);
    Some(out)
}

/// Whether an I/O command of the path has been outstanding longer than `limit`.
fn io_late<S>(path: &Path<S>, now: u64, limit: u64) -> bool {
    path.ioqs.iter().any(|q| {
        q.cmds
            .iter()
            .any(|c| c.req != NO_REQ && now.saturating_sub(c.issued_at) > limit)
    })
}

/// The path's I/O queues as its `info` says (`nr_queues` of `depth` commands), not yet
/// connected. Allocates (association setup only).
fn add_ioqs<S>(path: &mut Path<S>, digests: keel_nvmf_tcp::Digests) -> Result<(), LossReason> {
    let info = path.info;
    if path.queue_commands.len() < usize::from(info.nr_queues) {
        path.queue_commands.resize(usize::from(info.nr_queues), 0);
    }
    for _ in 0..info.nr_queues {
        let conn = Conn::new(digests, info.depth, info.in_capsule)
            .ok_or(LossReason::Protocol("I/O queue configuration"))?;
        path.ioqs.push(IoQ {
            conn,
            connect_cid: None,
            live: false,
            cmds: vec![
                Cmd {
                    req: NO_REQ,
                    issued_at: 0
                };
                info.depth as usize
            ],
            inflight: 0,
        });
    }
    Ok(())
}

fn owned(buf: Option<Data>) -> Option<Vec<u8>> {
    match buf {
        Some(Data::Owned(v)) => Some(v),
        _ => None,
    }
}

fn identify_page(buf: Option<Data>) -> Result<[u8; IDENTIFY_LEN], LossReason> {
    owned(buf)
        .and_then(|v| <[u8; IDENTIFY_LEN]>::try_from(v.as_slice()).ok())
        .ok_or(LossReason::Protocol("Identify data missing"))
}

fn identify_sqe(cns: u8, nsid: u32) -> (Sqe, Option<(Data, u32)>) {
    let sqe = IdentifyCommand {
        cns,
        cntid: 0,
        csi: 0,
        nsid,
    }
    .to_sqe(0);
    (
        sqe,
        Some((Data::Owned(vec![0; IDENTIFY_LEN]), IDENTIFY_LEN as u32)),
    )
}

/// A remote volume's state. Shared by [`crate::RemoteVolume`] (the poll loop's handle) and
/// [`crate::RemoteBackend`] (the controller core's) through `Rc<RefCell<_>>`.
pub(crate) struct Volume<S> {
    cfg: RemoteConfig,
    t: Timing,
    paths: Vec<Path<S>>,
    reqs: Vec<Req>,
    free: Vec<u16>,
    ready: VecDeque<u16>,
    done: VecDeque<BlockCompletion>,
    ns: Option<NsInfo>,
    now: u64,
    rr: usize,
    in_use: usize,
    ever_live: bool,
    pub(crate) backend_taken: bool,
    counters: VolumeCounters,
    /// A lane (1-based, see [`crate::lane`]): I/O queues only, over the owner's associations.
    lane: Option<u16>,
    /// Queue losses of a lane, for its owner.
    lane_losses: VecDeque<LaneLoss>,
    /// The owner's: bumped whenever what lanes see of a path changes.
    lane_version: u64,
}

impl<S> fmt::Debug for Volume<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("subnqn", &self.cfg.subnqn)
            .field("nsid", &self.cfg.nsid)
            .field("paths", &self.paths.len())
            .field("in_use", &self.in_use)
            .finish_non_exhaustive()
    }
}

impl<S: Copy + Eq + fmt::Debug> Volume<S> {
    pub fn new(cfg: RemoteConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let n = cfg.request_slots();
        let mut reqs = Vec::with_capacity(n);
        reqs.resize_with(n, Req::default);
        Ok(Self {
            t: Timing::new(&cfg),
            paths: cfg.paths.iter().map(|a| Path::new(*a)).collect(),
            reqs,
            free: (0..n as u16).rev().collect(),
            ready: VecDeque::with_capacity(n),
            done: VecDeque::with_capacity(n),
            ns: None,
            now: 0,
            rr: 0,
            in_use: 0,
            ever_live: false,
            backend_taken: false,
            counters: VolumeCounters::default(),
            lane: None,
            lane_losses: VecDeque::new(),
            lane_version: 0,
            cfg,
        })
    }

    /// Lane `lane` (1-based) of a volume configured as `cfg` (the owner's configuration),
    /// serving the namespace `seed` describes; its paths wait for [`LaneUpdate::Up`].
    pub fn new_lane(mut cfg: RemoteConfig, lane: u16, seed: LaneSeed) -> Result<Self, ConfigError> {
        if lane == 0 {
            return Err(ConfigError::IoQueues);
        }
        cfg.io_queues = cfg.lane_queues.max(1);
        cfg.lanes = 0;
        let mut v = Self::new(cfg)?;
        v.lane = Some(lane);
        v.lane_losses = VecDeque::with_capacity(2 * v.paths.len());
        v.ns = Some(seed.0);
        for p in v.paths.iter_mut() {
            p.phase = Phase::Reconnecting { at: u64::MAX };
        }
        Ok(v)
    }

    // ---- lanes: the owner's side ----------------------------------------------------------

    /// See [`crate::RemoteVolume::set_lanes`].
    pub fn set_lanes(&mut self, lanes: u16) {
        if self.lane.is_some() {
            return;
        }
        let mut c = self.cfg.clone();
        c.lanes = lanes;
        if c.validate().is_ok() {
            self.cfg.lanes = lanes;
        }
    }

    /// What a lane is seeded with, once the namespace is identified.
    pub fn lane_seed(&self) -> Option<LaneSeed> {
        self.ns.map(LaneSeed)
    }

    /// Changes whenever [`Volume::lane_updates`] would say something new.
    pub fn lane_version(&self) -> u64 {
        self.lane_version
    }

    /// Every path as lane `lane` (1-based) must see it.
    pub fn lane_updates(&self, lane: u16, out: &mut Vec<LaneUpdate>) {
        let lq = self.cfg.lane_queues;
        for (i, p) in self.paths.iter().enumerate() {
            let path = i as u8;
            out.push(match p.phase {
                Phase::Live => {
                    let before = u32::from(lane.saturating_sub(1)) * u32::from(lq);
                    let fits = lane > 0
                        && self.cfg.lanes >= lane
                        && before + u32::from(lq) <= u32::from(p.lane_pool);
                    LaneUpdate::Up {
                        path,
                        epoch: p.epoch,
                        grant: Grant {
                            cntlid: p.info.cntlid,
                            first_qid: (u32::from(p.info.nr_queues) + before + 1)
                                .min(u32::from(u16::MAX))
                                as u16,
                            queues: if fits { lq } else { 0 },
                            ana: p.ana,
                            info: p.info,
                        },
                    }
                }
                Phase::Failed => LaneUpdate::Failed { path },
                Phase::Connecting | Phase::Reconnecting { .. } => LaneUpdate::Down {
                    path,
                    epoch: p.epoch,
                },
            });
        }
    }

    /// A lane lost a queue: association `loss.epoch` of the path ends here too (unless it
    /// already did), as if one of the owner's own queues had been lost. A permanent reason
    /// (e.g. the remote refused the lane's Connect with DNR) only concerns that lane: it is
    /// logged and the association stays.
    pub fn lane_lost<N: Net<Sock = S>>(&mut self, loss: LaneLoss, now: u64, net: &mut N) {
        let p = usize::from(loss.path);
        let Some(path) = self.paths.get(p) else {
            return;
        };
        if path.phase != Phase::Live || path.epoch != loss.epoch {
            return;
        }
        if loss.reason.permanent() {
            log::error!(
                "remote {}: a lane cannot use the association ({}); the lane's I/O on this path fails",
                path.addr,
                loss.reason
            );
            return;
        }
        self.lose(p, now, net, loss.reason);
    }

    // ---- lanes: the lane's side -------------------------------------------------------------

    /// The next queue loss to report to the owner ([`Volume::lane_lost`]).
    pub fn take_lane_loss(&mut self) -> Option<LaneLoss> {
        self.lane_losses.pop_front()
    }

    /// Applies what the owner says of a path (idempotent: the same update twice changes
    /// nothing).
    pub fn apply_lane_update<N: Net<Sock = S>>(&mut self, u: LaneUpdate, now: u64, net: &mut N) {
        if self.lane.is_none() {
            return;
        }
        self.now = now;
        let p = match u {
            LaneUpdate::Up { path, .. }
            | LaneUpdate::Down { path, .. }
            | LaneUpdate::Failed { path } => usize::from(path),
        };
        if p >= self.paths.len() {
            return;
        }
        let active = matches!(self.paths[p].phase, Phase::Connecting | Phase::Live);
        match u {
            LaneUpdate::Up { epoch, grant, .. } => {
                if self.paths[p].epoch == epoch {
                    // The same association: only its ANA state may have changed. (A lane
                    // that lost its queues of this association waits for the next one.)
                    if active {
                        self.paths[p].ana = grant.ana;
                    }
                    return;
                }
                if active {
                    self.lose(p, now, net, LossReason::Superseded);
                }
                self.start_lane(p, epoch, grant, now);
            }
            LaneUpdate::Down { epoch, .. } => {
                if active && self.paths[p].epoch == epoch {
                    self.lose(p, now, net, LossReason::Superseded);
                } else if self.paths[p].phase == Phase::Failed {
                    // The owner revived the path (a management reconnect).
                    self.paths[p].phase = Phase::Reconnecting { at: u64::MAX };
                    self.paths[p].down_since = Some(now);
                }
            }
            LaneUpdate::Failed { .. } => {
                if active {
                    self.lose(p, now, net, LossReason::Superseded);
                }
                let path = &mut self.paths[p];
                path.phase = Phase::Failed;
                path.last_loss.get_or_insert(LossReason::Superseded);
            }
        }
        self.expire(now);
    }

    /// Connects the lane's I/O queues of association `epoch` on path `p`.
    fn start_lane(&mut self, p: usize, epoch: u32, g: Grant, now: u64) {
        let lane = self.lane.unwrap_or(0);
        let digests = self.cfg.digests;
        let t = self.t;
        let path = &mut self.paths[p];
        path.epoch = epoch;
        path.admin = None;
        path.admin_use = [(AdminUse::Free, 0); ADMIN_SLOTS as usize];
        path.ioqs.clear();
        path.info = g.info;
        path.info.cntlid = g.cntlid;
        path.info.nr_queues = g.queues;
        path.qid_base = g.first_qid.saturating_sub(1);
        path.ana = g.ana;
        path.ka_sent = None;
        path.ana_wanted = false;
        path.ana_change_deadline = None;
        path.comp_seen = false;
        path.down_since.get_or_insert(now);
        if g.queues == 0 {
            path.phase = Phase::Reconnecting { at: u64::MAX };
            log::error!(
                "remote {}: lane {}: the remote granted no I/O queue for this lane; its I/O waits for another path",
                path.addr,
                lane
            );
            return;
        }
        path.counters.attempts += 1;
        path.phase = Phase::Connecting;
        path.step = Step::IoQueues;
        path.attempt_deadline = now.saturating_add(t.connect_timeout);
        if let Err(r) = add_ioqs(path, digests) {
            // A configuration the transport refuses (no socket was opened yet).
            path.ioqs.clear();
            path.phase = Phase::Failed;
            path.last_loss = Some(r);
            log::error!("remote {}: lane {}: {r}", path.addr, lane);
        }
    }

    pub fn ns(&self) -> Option<NsInfo> {
        self.ns
    }

    // ---- the caller's side --------------------------------------------------------------

    /// Accepts a request (see [`keel_storage::BlockBackend::submit`]).
    pub fn submit(&mut self, mut req: BlockRequest) -> Result<(), Rejected> {
        let Some(ns) = self.ns else {
            return reject(req, RejectReason::Invalid(BlockError::Internal));
        };
        let range = match req.validate(ns.geometry, ns.caps) {
            Ok(r) => r,
            Err(e) => return reject(req, RejectReason::Invalid(e)),
        };
        if self.paths.iter().all(|p| p.phase == Phase::Failed) {
            return reject(req, RejectReason::Invalid(BlockError::PathError));
        }
        if self.in_use + self.done.len() >= self.reqs.len() {
            return reject(req, RejectReason::Busy);
        }
        let Some(ri) = self.free.pop() else {
            return reject(req, RejectReason::Busy);
        };
        // The transport sees the buffer's valid bytes: make the request's window valid.
        if req.op.has_data()
            && let Some(b) = req.buf.as_mut()
            && b.len() < range.end
        {
            b.set_len(range.end);
        }
        self.reqs[ri as usize] = Req {
            used: true,
            tag: req.tag,
            op: Some(req.op),
            lba: req.lba,
            blocks: req.blocks,
            buf: req.buf.take(),
            off: req.buf_offset,
            ..Req::default()
        };
        self.in_use += 1;
        self.counters.submitted += 1;
        self.ready.push_back(ri);
        self.dispatch(self.now);
        Ok(())
    }

    /// The next finished request.
    pub fn take_completion(&mut self) -> Option<BlockCompletion> {
        self.done.pop_front()
    }

    fn complete(&mut self, ri: u16, result: Result<(), BlockError>) {
        let Some(r) = self.reqs.get_mut(ri as usize) else {
            return;
        };
        if !r.used {
            return;
        }
        r.used = false;
        r.inflight = false;
        match result {
            Ok(()) => self.counters.completed += 1,
            Err(e) => {
                self.counters.failed += 1;
                if e == BlockError::PathError {
                    self.counters.path_errors += 1;
                }
            }
        }
        self.done.push_back(BlockCompletion {
            tag: r.tag,
            result,
            buf: r.buf.take(),
        });
        self.free.push(ri);
        self.in_use -= 1;
    }

    // ---- the poll loop's side -----------------------------------------------------------

    /// One pass: sockets, association state machines, timers, dispatch, transmit.
    pub fn poll<N: Net<Sock = S>>(&mut self, now: u64, net: &mut N) -> bool {
        self.now = now;
        let mut busy = false;
        for p in 0..self.paths.len() {
            busy |= self.service_path(p, now, net);
        }
        busy |= self.dispatch(now);
        busy |= self.expire(now);
        for p in 0..self.paths.len() {
            let path = &mut self.paths[p];
            if let Some(c) = path.admin.as_mut() {
                busy |= flush_conn(c, net);
            }
            for q in path.ioqs.iter_mut() {
                busy |= flush_conn(&mut q.conn, net);
            }
        }
        busy
    }

    /// Drops every association (sockets closed at once, no NVMe shutdown) and fails every
    /// request in flight or queued, and every later one, with a path error.
    pub fn shutdown<N: Net<Sock = S>>(&mut self, now: u64, net: &mut N) {
        for p in 0..self.paths.len() {
            match self.paths[p].phase {
                Phase::Connecting | Phase::Live => self.lose(p, now, net, LossReason::Shutdown),
                _ => {
                    self.lane_version += 1;
                    self.paths[p].phase = Phase::Failed;
                    self.paths[p].last_loss = Some(LossReason::Shutdown);
                }
            }
        }
        self.expire(now);
    }

    /// Revives paths that gave up.
    pub fn reconnect(&mut self, now: u64) {
        if self.lane.is_some() {
            return;
        }
        self.lane_version += 1;
        for p in self.paths.iter_mut() {
            if p.phase == Phase::Failed {
                p.phase = Phase::Reconnecting { at: now };
                p.down_since = Some(now);
            }
        }
    }

    /// The latest time the next [`Volume::poll`] should run (timers), when no I/O is
    /// pending; `None` when nothing is timed.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x| x.min(t)));
        for p in &self.paths {
            match p.phase {
                // A lane's path waits for its owner's update, not for a timer.
                Phase::Reconnecting { .. } if self.lane.is_some() => {}
                Phase::Reconnecting { at: t } => {
                    at(t);
                    if let (Some(l), Some(d)) = (self.t.ctrl_loss, p.down_since) {
                        at(d.saturating_add(l));
                    }
                }
                Phase::Connecting => {
                    at(p.attempt_deadline);
                    if let Step::Csts { poll_at: Some(t) } = p.step {
                        at(t);
                    }
                }
                Phase::Live => {
                    match p.ka_sent {
                        Some(s) => at(s.saturating_add(self.t.kato)),
                        None => at(p.ka_due),
                    }
                    if p.inflight > 0 {
                        at(p.next_scan);
                    }
                    if let Some(c) = p.ana_change_deadline {
                        at(c);
                    }
                }
                Phase::Failed => {}
            }
        }
        if let Some(l) = self.t.wait_limit() {
            for &ri in &self.ready {
                if let Some(s) = self.reqs[ri as usize].waiting_since {
                    at(s.saturating_add(l));
                }
            }
        }
        d
    }

    fn loss_expired(&self, p: usize, now: u64) -> bool {
        let path = &self.paths[p];
        match (self.t.ctrl_loss, path.down_since) {
            (Some(l), Some(d)) => now.saturating_sub(d) >= l,
            _ => false,
        }
    }

    fn service_path<N: Net<Sock = S>>(&mut self, p: usize, now: u64, net: &mut N) -> bool {
        match self.paths[p].phase {
            Phase::Failed => return false,
            Phase::Reconnecting { .. } if self.lane.is_some() => return false,
            Phase::Reconnecting { at } => {
                if self.loss_expired(p, now) {
                    self.lane_version += 1;
                    let path = &mut self.paths[p];
                    path.phase = Phase::Failed;
                    match path.last_loss {
                        Some(r) => log::error!(
                            "remote {}: giving up after ctrl_loss_tmo (last error: {r})",
                            path.addr
                        ),
                        None => log::error!("remote {}: giving up after ctrl_loss_tmo", path.addr),
                    }
                    return true;
                }
                if now < at {
                    return false;
                }
                self.start_attempt(p, now);
            }
            Phase::Connecting | Phase::Live => {}
        }
        let r = self
            .service_conns(p, now, net)
            .and_then(|b| self.path_timers(p, now).map(|t| b | t));
        match r {
            Ok(b) => b,
            Err(reason) => {
                self.lose(p, now, net, reason);
                true
            }
        }
    }

    fn start_attempt(&mut self, p: usize, now: u64) {
        let digests = self.cfg.digests;
        let path = &mut self.paths[p];
        path.counters.attempts += 1;
        path.phase = Phase::Connecting;
        path.step = Step::Socket;
        path.attempt_deadline = now.saturating_add(self.t.connect_timeout);
        path.admin = Conn::new(digests, ADMIN_SLOTS, MIN_IN_CAPSULE);
        path.admin_use = [(AdminUse::Free, 0); ADMIN_SLOTS as usize];
        path.ioqs.clear();
        path.info = Info::default();
        path.ka_sent = None;
        path.ana_wanted = false;
        path.ana_change_deadline = None;
        path.comp_seen = false;
        path.down_since.get_or_insert(now);
    }

    /// Feeds every connection of the path and acts on its events.
    fn service_conns<N: Net<Sock = S>>(
        &mut self,
        p: usize,
        now: u64,
        net: &mut N,
    ) -> Result<bool, LossReason> {
        let addr = self.paths[p].addr;
        let mut busy = false;
        match self.paths[p].admin.as_mut() {
            Some(c) => busy |= pump(c, addr, now, net)?,
            None if self.lane.is_some() => {}
            None => return Err(LossReason::Protocol("no admin connection")),
        }
        loop {
            let ev = self.paths[p].admin.as_mut().and_then(|c| c.hc.poll_event());
            let Some(ev) = ev else { break };
            busy = true;
            match ev {
                HostEvent::Connected { .. } => self.admin_connected(p, now)?,
                HostEvent::Completion { cid, cqe, buf } => {
                    self.admin_done(p, cid, cqe, buf, now)?
                }
                HostEvent::Aborted { .. } => {}
                HostEvent::Closed { reason } => return Err(LossReason::Transport(reason)),
            }
        }
        for q in 0..self.paths[p].ioqs.len() {
            busy |= pump(&mut self.paths[p].ioqs[q].conn, addr, now, net)?;
            loop {
                let ev = self.paths[p].ioqs[q].conn.hc.poll_event();
                let Some(ev) = ev else { break };
                busy = true;
                match ev {
                    HostEvent::Connected { .. } => self.io_connect(p, q)?,
                    HostEvent::Completion { cid, cqe, .. }
                        if self.paths[p].ioqs[q].connect_cid == Some(cid) =>
                    {
                        self.io_connected(p, q, cqe, now)?
                    }
                    HostEvent::Completion { cid, cqe, buf } => {
                        if let Some(cmd) = take_cmd(&mut self.paths[p].ioqs[q], cid) {
                            self.cmd_done(p, cmd.req, cqe, buf, now);
                        }
                    }
                    HostEvent::Aborted { cid, buf } => {
                        if let Some(cmd) = take_cmd(&mut self.paths[p].ioqs[q], cid) {
                            self.cmd_lost(p, cmd.req, buf, now);
                        }
                    }
                    HostEvent::Closed { reason } => return Err(LossReason::Transport(reason)),
                }
            }
        }
        Ok(busy)
    }

    fn path_timers(&mut self, p: usize, now: u64) -> Result<bool, LossReason> {
        let t = self.t;
        let path = &mut self.paths[p];
        match path.phase {
            Phase::Connecting => {
                if now >= path.attempt_deadline {
                    return Err(LossReason::SetupTimeout);
                }
                if let Step::Csts { poll_at: Some(at) } = path.step
                    && now >= at
                {
                    let sqe = PropertyCommand::get_sqe(0, offset::CSTS, PropertySize::Four);
                    self.setup_cmd(p, Step::Csts { poll_at: None }, sqe, None, now)?;
                    return Ok(true);
                }
                Ok(false)
            }
            Phase::Live if self.lane.is_some() => {
                // A lane has no admin queue: keep alive and ANA are the owner's.
                if path.inflight > 0 && now >= path.next_scan {
                    path.next_scan = now.saturating_add(TIMEOUT_SCAN_NS);
                    if io_late(path, now, t.io_timeout) {
                        return Err(LossReason::IoTimeout);
                    }
                }
                Ok(false)
            }
            Phase::Live => {
                let mut busy = false;
                match path.ka_sent {
                    Some(sent) if now.saturating_sub(sent) > t.kato => {
                        return Err(LossReason::KeepAliveTimeout);
                    }
                    Some(_) => {}
                    None if now >= path.ka_due => {
                        path.ka_due = now.saturating_add(path.ka_period(t.kato));
                        if path.info.tbkas() && path.comp_seen {
                            // Traffic based keep alive: completions since the last check
                            // already told the controller we are alive.
                            path.comp_seen = false;
                        } else {
                            path.ka_sent = Some(now);
                            path.counters.keep_alives += 1;
                            let sqe = Sqe::new(AdminOpcode::KeepAlive as u8, 0);
                            self.admin_submit(p, sqe, None, AdminUse::KeepAlive, now)?;
                            busy = true;
                        }
                    }
                    None => {}
                }
                let path = &mut self.paths[p];
                if let Some(at) = path.admin_outstanding(AdminUse::AnaLog) {
                    if now.saturating_sub(at) > t.admin_timeout {
                        return Err(LossReason::AdminTimeout);
                    }
                } else if path.ana_wanted {
                    path.ana_wanted = false;
                    self.submit_ana_read(p, AdminUse::AnaLog, now)?;
                    busy = true;
                }
                let path = &mut self.paths[p];
                if path.ana_change_deadline.is_some_and(|d| now >= d) {
                    return Err(LossReason::AnaTransitionTimeout);
                }
                if path.inflight > 0 && now >= path.next_scan {
                    path.next_scan = now.saturating_add(TIMEOUT_SCAN_NS);
                    if io_late(path, now, t.io_timeout) {
                        return Err(LossReason::IoTimeout);
                    }
                }
                Ok(busy)
            }
            _ => Ok(false),
        }
    }

    /// Ends the path's association: completions that already arrived count, commands in flight
    /// go back to the queue (retried on another path or the next association), sockets close.
    fn lose<N: Net<Sock = S>>(&mut self, p: usize, now: u64, net: &mut N, reason: LossReason) {
        let was_live = self.paths[p].phase == Phase::Live;
        if let Some(mut c) = self.paths[p].admin.take() {
            c.hc.close();
            while c.hc.poll_event().is_some() {}
            if let Some(s) = c.sock {
                net.close(s, now);
            }
        }
        let ioqs = core::mem::take(&mut self.paths[p].ioqs);
        for mut q in ioqs {
            q.conn.hc.close();
            while let Some(ev) = q.conn.hc.poll_event() {
                match ev {
                    HostEvent::Completion { cid, cqe, buf } if q.connect_cid != Some(cid) => {
                        if let Some(cmd) = take_cmd(&mut q, cid) {
                            self.cmd_done(p, cmd.req, cqe, buf, now);
                        }
                    }
                    HostEvent::Aborted { cid, buf } => {
                        if let Some(cmd) = take_cmd(&mut q, cid) {
                            self.cmd_lost(p, cmd.req, buf, now);
                        }
                    }
                    _ => {}
                }
            }
            // The transport returns every command it was given; anything left is a bug, but
            // its request must still complete.
            for cid in 0..q.cmds.len() {
                if let Some(cmd) = take_cmd(&mut q, cid as u16) {
                    self.cmd_lost(p, cmd.req, None, now);
                }
            }
            if let Some(s) = q.conn.sock {
                net.close(s, now);
            }
        }
        let reconnect = self.t.reconnect;
        self.lane_version += 1;
        let lane = self.lane;
        let path = &mut self.paths[p];
        path.inflight = 0;
        path.counters.losses += 1;
        path.last_loss = Some(reason);
        path.ka_sent = None;
        path.ana_change_deadline = None;
        path.admin_use = [(AdminUse::Free, 0); ADMIN_SLOTS as usize];
        path.down_since.get_or_insert(now);
        if let Some(lane) = lane {
            // The owner decides what happens to the association; the lane waits for its
            // next update (a permanent reason: this lane cannot use the path).
            if reason == LossReason::Superseded {
                path.phase = Phase::Reconnecting { at: u64::MAX };
                return;
            }
            log::warn!(
                "remote {}: lane {}: I/O queue lost: {reason}",
                path.addr,
                lane
            );
            path.phase = if reason.permanent() {
                Phase::Failed
            } else {
                Phase::Reconnecting { at: u64::MAX }
            };
            if self.lane_losses.len() < self.lane_losses.capacity().max(16) {
                self.lane_losses.push_back(LaneLoss {
                    path: p as u8,
                    epoch: path.epoch,
                    reason,
                });
            }
            return;
        }
        if reason.permanent() {
            path.phase = Phase::Failed;
            log::error!("remote {}: {reason}; giving up on this path", path.addr);
        } else {
            path.phase = Phase::Reconnecting {
                at: now.saturating_add(reconnect),
            };
            if was_live {
                log::warn!("remote {}: association lost: {reason}", path.addr);
            } else {
                log::warn!("remote {}: association attempt failed: {reason}", path.addr);
            }
        }
    }

    // ---- admin queue and association setup ----------------------------------------------

    fn admin_submit(
        &mut self,
        p: usize,
        sqe: Sqe,
        data: Option<(Data, u32)>,
        u: AdminUse,
        now: u64,
    ) -> Result<u16, LossReason> {
        let path = &mut self.paths[p];
        let c = path
            .admin
            .as_mut()
            .ok_or(LossReason::Protocol("no admin connection"))?;
        match c.hc.submit(sqe, data) {
            Ok(cid) => {
                if let Some(s) = path.admin_use.get_mut(cid as usize) {
                    *s = (u, now);
                }
                Ok(cid)
            }
            Err(_) => Err(LossReason::Protocol(
                "admin command refused by the transport",
            )),
        }
    }

    fn setup_cmd(
        &mut self,
        p: usize,
        step: Step,
        sqe: Sqe,
        data: Option<(Data, u32)>,
        now: u64,
    ) -> Result<(), LossReason> {
        self.paths[p].step = step;
        self.admin_submit(p, sqe, data, AdminUse::Setup, now)
            .map(|_| ())
    }

    fn admin_connected(&mut self, p: usize, now: u64) -> Result<(), LossReason> {
        if self.paths[p].step != Step::Socket {
            return Err(LossReason::Protocol("unexpected ICResp"));
        }
        let (sqe, data) = connect_command(
            0,
            ADMIN_SQSIZE,
            self.cfg.kato_ms,
            self.cfg.hostid,
            CNTLID_DYNAMIC,
            &self.cfg.subnqn,
            &self.cfg.hostnqn,
        );
        let len = data.as_ref().len() as u32;
        self.setup_cmd(p, Step::Connect, sqe, Some((data, len)), now)
    }

    fn admin_done(
        &mut self,
        p: usize,
        cid: u16,
        cqe: Cqe,
        buf: Option<Data>,
        now: u64,
    ) -> Result<(), LossReason> {
        let path = &mut self.paths[p];
        let u = match path.admin_use.get_mut(cid as usize) {
            Some(s) => core::mem::replace(s, (AdminUse::Free, 0)).0,
            None => AdminUse::Free,
        };
        match u {
            AdminUse::Setup => self.setup_done(p, cqe, buf, now),
            AdminUse::KeepAlive => {
                path.ka_sent = None;
                if cqe.status.is_success() {
                    Ok(())
                } else {
                    Err(LossReason::KeepAliveFailed(cqe.status))
                }
            }
            AdminUse::Aer => self.aer_done(p, cqe, now),
            AdminUse::AnaLog => {
                if !cqe.status.is_success() {
                    return Err(LossReason::AnaLogFailed(cqe.status));
                }
                self.apply_ana_log(p, buf, now);
                Ok(())
            }
            AdminUse::Free => Ok(()),
        }
    }

    fn setup_done(
        &mut self,
        p: usize,
        cqe: Cqe,
        buf: Option<Data>,
        now: u64,
    ) -> Result<(), LossReason> {
        let step = self.paths[p].step;
        if !cqe.status.is_success() {
            return Err(LossReason::SetupFailed {
                step: step.name(),
                status: cqe.status,
            });
        }
        match step {
            Step::Connect => {
                self.paths[p].info.cntlid = cqe.dw0 as u16;
                let sqe = PropertyCommand::get_sqe(0, offset::CAP, PropertySize::Eight);
                self.setup_cmd(p, Step::Cap, sqe, None, now)
            }
            Step::Cap => {
                self.paths[p].info.cap = cqe.dw0 as u64 | ((cqe.dw1 as u64) << 32);
                // NVM command set, 4 KiB pages, round robin, 64-byte SQEs, 16-byte CQEs.
                let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
                let sqe = PropertyCommand::set_sqe(0, offset::CC, PropertySize::Four, cc.0 as u64);
                self.setup_cmd(p, Step::Cc, sqe, None, now)
            }
            Step::Cc => {
                // CAP.TO is in 500 ms units.
                let to = Cap(self.paths[p].info.cap).to().max(1) as u64 * 500 * MS;
                self.paths[p].ready_deadline = now.saturating_add(to);
                let sqe = PropertyCommand::get_sqe(0, offset::CSTS, PropertySize::Four);
                self.setup_cmd(p, Step::Csts { poll_at: None }, sqe, None, now)
            }
            Step::Csts { .. } => {
                let csts = Csts(cqe.dw0);
                if csts.cfs() {
                    return Err(LossReason::ControllerFatal);
                }
                if csts.rdy() {
                    let (sqe, data) = identify_sqe(cns::CONTROLLER, 0);
                    return self.setup_cmd(p, Step::IdCtrl, sqe, data, now);
                }
                let path = &mut self.paths[p];
                if now >= path.ready_deadline {
                    return Err(LossReason::ControllerNotReady);
                }
                path.step = Step::Csts {
                    poll_at: Some(now.saturating_add(CSTS_POLL_NS)),
                };
                Ok(())
            }
            Step::IdCtrl => {
                let id = IdentifyController::decode(&identify_page(buf)?);
                if id.cntrltype != 0 && id.cntrltype != cntrltype::IO {
                    return Err(LossReason::Protocol("not an I/O controller"));
                }
                let path = &mut self.paths[p];
                let cap = Cap(path.info.cap);
                path.info.learn(&id, cap);
                // The owner of lanes asks for their queues too (see crate::lane).
                let n = (u32::from(self.cfg.io_queues)
                    + u32::from(self.cfg.lanes) * u32::from(self.cfg.lane_queues))
                .clamp(1, 0xFFFF) as u16;
                let sqe = FeaturesCommand::set_sqe(
                    0,
                    FeatureId::NumberOfQueues as u8,
                    number_of_queues(n - 1, n - 1),
                );
                self.setup_cmd(p, Step::Queues, sqe, None, now)
            }
            Step::Queues => {
                let nsqa = (cqe.dw0 & 0xFFFF) as u16;
                let ncqa = (cqe.dw0 >> 16) as u16;
                let granted = nsqa.min(ncqa).saturating_add(1);
                let for_lanes = self.cfg.lanes.saturating_mul(self.cfg.lane_queues);
                let path = &mut self.paths[p];
                let info = &mut path.info;
                // Lanes' queues come out of what is granted beyond the owner's first one.
                info.nr_queues = self
                    .cfg
                    .io_queues
                    .min(granted.saturating_sub(for_lanes))
                    .max(1)
                    .min(granted);
                path.lane_pool = granted.saturating_sub(info.nr_queues);
                let info = &mut path.info;
                if info.nr_queues == 0 {
                    return Err(LossReason::NoIoQueues);
                }
                // SQSIZE is 0's based: SQSIZE = depth gives depth + 1 entries, so `depth`
                // commands fit with SQ flow control (one entry stays empty).
                let mqes = Cap(info.cap).mqes().max(1);
                info.sqsize = self.cfg.queue_depth.min(mqes);
                let mut depth = self.cfg.queue_depth.min(info.sqsize);
                if info.maxcmd != 0 {
                    depth = depth.min(info.maxcmd);
                }
                info.depth = depth.max(1);
                if info.ana_reporting() && info.ana_notices() {
                    let sqe = FeaturesCommand::set_sqe(
                        0,
                        FeatureId::AsyncEventConfig as u8,
                        async_event::AEC_ANA_CHANGE,
                    );
                    self.setup_cmd(p, Step::Aec, sqe, None, now)
                } else {
                    let (sqe, data) = identify_sqe(cns::NAMESPACE, self.cfg.nsid);
                    self.setup_cmd(p, Step::IdNs, sqe, data, now)
                }
            }
            Step::Aec => {
                let (sqe, data) = identify_sqe(cns::NAMESPACE, self.cfg.nsid);
                self.setup_cmd(p, Step::IdNs, sqe, data, now)
            }
            Step::IdNs => {
                let id = IdentifyNamespace::decode(&identify_page(buf)?);
                self.adopt_namespace(p, &id)?;
                let path = &mut self.paths[p];
                path.info.anagrpid = id.anagrpid;
                if path.info.ana_reporting() && id.anagrpid != 0 {
                    self.submit_ana_read(p, AdminUse::Setup, now)?;
                    self.paths[p].step = Step::Ana;
                    Ok(())
                } else {
                    path.ana = None;
                    self.start_io_queues(p, now)
                }
            }
            Step::Ana => {
                self.apply_ana_log(p, buf, now);
                self.start_io_queues(p, now)
            }
            Step::Socket | Step::IoQueues => {
                Err(LossReason::Protocol("unexpected admin completion"))
            }
        }
    }

    /// Checks the namespace a path reports against what the volume serves (the first path to
    /// identify it defines size and capabilities).
    fn adopt_namespace(&mut self, p: usize, id: &IdentifyNamespace) -> Result<(), LossReason> {
        let nid = NsId::from_identify(id)?;
        if let Some(ns) = &self.ns {
            if (ns.id.block_size, ns.id.blocks) != (nid.block_size, nid.blocks) {
                return Err(LossReason::Namespace(
                    "size differs from what the volume serves",
                ));
            }
            let differ = |a: &[u8], b: &[u8]| {
                a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0) && a != b
            };
            if differ(&ns.id.nguid, &nid.nguid) || differ(&ns.id.eui64, &nid.eui64) {
                return Err(LossReason::Namespace("identifiers differ between paths"));
            }
            return Ok(());
        }
        let info = &self.paths[p].info;
        let caps = Capabilities {
            volatile_write_cache: info.vwc.contains(Vwc::PRESENT),
            // Flush is mandatory (NVM Command Set §3.2.2); FUA is a Write bit.
            flush: true,
            fua: true,
            write_zeroes: info.oncs.contains(Oncs::WRITE_ZEROES),
            deallocate: info.oncs.contains(Oncs::DSM),
            deallocate_reads_zero: id.dlfeat & 0x7 == 0x1,
            compare: info.oncs.contains(Oncs::COMPARE),
            verify: info.oncs.contains(Oncs::VERIFY),
        };
        self.ns = Some(NsInfo {
            geometry: Geometry {
                block_size: nid.block_size,
                blocks: nid.blocks,
            },
            caps,
            id: nid,
        });
        Ok(())
    }

    fn submit_ana_read(&mut self, p: usize, u: AdminUse, now: u64) -> Result<(), LossReason> {
        let path = &mut self.paths[p];
        let groups = (path.info.nanagrpid as usize).clamp(1, MAX_ANA_GROUPS);
        let len = ana::log_len(groups, 0);
        let mut b = path.ana_buf.take().unwrap_or_default();
        b.clear();
        b.resize(len, 0);
        // Groups only (RGO): the namespace's group state is all we need. RAE clear: reading
        // the log re-arms ANA change notices.
        let sqe = ana::get_log_page_sqe(0, true, false, len as u32);
        path.counters.ana_reads += 1;
        self.admin_submit(p, sqe, Some((Data::Owned(b), len as u32)), u, now)
            .map(|_| ())
    }

    fn set_ana(&mut self, p: usize, s: AnaState, now: u64) {
        let path = &mut self.paths[p];
        if s == AnaState::Change {
            let anatt = path.info.anatt.max(1) as u64 * 1_000 * MS;
            path.ana_change_deadline
                .get_or_insert(now.saturating_add(anatt));
        } else {
            path.ana_change_deadline = None;
        }
        if path.ana != Some(s) {
            log::info!("remote {}: ANA state {:?}", path.addr, s);
            self.lane_version += 1;
        }
        path.ana = Some(s);
    }

    fn apply_ana_log(&mut self, p: usize, buf: Option<Data>, now: u64) {
        let Some(b) = owned(buf) else { return };
        let grp = self.paths[p].info.anagrpid;
        // A group the log does not list is not usable through this controller.
        let s = ana::group_state(&b, grp)
            .and_then(AnaState::from_u8)
            .unwrap_or(AnaState::Inaccessible);
        self.paths[p].ana_buf = Some(b);
        self.set_ana(p, s, now);
    }

    fn aer_done(&mut self, p: usize, cqe: Cqe, now: u64) -> Result<(), LossReason> {
        if !cqe.status.is_success() {
            // Aborted (controller going away) or over the limit: not resubmitted.
            return Ok(());
        }
        let path = &mut self.paths[p];
        path.counters.async_events += 1;
        let (ty, info, _) = async_event::parse_dw0(cqe.dw0);
        if ty == async_event::TYPE_NOTICE
            && info == async_event::NOTICE_ANA_CHANGE
            && path.info.ana_reporting()
        {
            path.ana_wanted = true;
        }
        let sqe = Sqe::new(AdminOpcode::AsyncEventRequest as u8, 0);
        self.admin_submit(p, sqe, None, AdminUse::Aer, now)
            .map(|_| ())
    }

    fn start_io_queues(&mut self, p: usize, now: u64) -> Result<(), LossReason> {
        let sqe = Sqe::new(AdminOpcode::AsyncEventRequest as u8, 0);
        self.admin_submit(p, sqe, None, AdminUse::Aer, now)?;
        let digests = self.cfg.digests;
        let path = &mut self.paths[p];
        path.step = Step::IoQueues;
        path.qid_base = 0;
        add_ioqs(path, digests)
    }

    fn io_connect(&mut self, p: usize, q: usize) -> Result<(), LossReason> {
        let path = &mut self.paths[p];
        let (sqe, data) = connect_command(
            path.qid_base.saturating_add(q as u16 + 1),
            path.info.sqsize,
            0,
            self.cfg.hostid,
            path.info.cntlid,
            &self.cfg.subnqn,
            &self.cfg.hostnqn,
        );
        let len = data.as_ref().len() as u32;
        let ioq = &mut path.ioqs[q];
        match ioq.conn.hc.submit(sqe, Some((data, len))) {
            Ok(cid) => {
                ioq.connect_cid = Some(cid);
                Ok(())
            }
            Err(_) => Err(LossReason::Protocol(
                "I/O queue Connect refused by the transport",
            )),
        }
    }

    fn io_connected(&mut self, p: usize, q: usize, cqe: Cqe, now: u64) -> Result<(), LossReason> {
        if !cqe.status.is_success() {
            return Err(LossReason::SetupFailed {
                step: Step::IoQueues.name(),
                status: cqe.status,
            });
        }
        let kato = self.t.kato;
        let lane = self.lane;
        let path = &mut self.paths[p];
        path.ioqs[q].connect_cid = None;
        path.ioqs[q].live = true;
        if path.phase == Phase::Connecting && path.ioqs.iter().all(|q| q.live) {
            path.phase = Phase::Live;
            path.down_since = None;
            path.counters.connects += 1;
            path.ka_due = now.saturating_add(path.ka_period(kato));
            path.next_scan = now.saturating_add(TIMEOUT_SCAN_NS);
            path.next_queue = 0;
            self.ever_live = true;
            if let Some(lane) = lane {
                log::info!(
                    "remote {}: lane {}: {} I/O queue(s) from QID {} on controller {}",
                    path.addr,
                    lane,
                    path.ioqs.len(),
                    path.qid_base + 1,
                    path.info.cntlid
                );
                return Ok(());
            }
            path.epoch = path.epoch.wrapping_add(1).max(1);
            self.lane_version += 1;
            log::info!(
                "remote {}: association up: controller {}, {} I/O queue(s) of depth {}",
                path.addr,
                path.info.cntlid,
                path.ioqs.len(),
                path.info.depth
            );
        }
        Ok(())
    }

    // ---- I/O ----------------------------------------------------------------------------

    /// A command of request `ri` on path `p` completed.
    fn cmd_done(&mut self, p: usize, ri: u16, cqe: Cqe, buf: Option<Data>, now: u64) {
        let max_retries = self.cfg.max_retries;
        let path = &mut self.paths[p];
        path.inflight = path.inflight.saturating_sub(1);
        path.comp_seen = true;
        let st = cqe.status;
        if !st.is_success() {
            path.counters.errors += 1;
        }
        let ana_reporting = path.info.ana_reporting();
        let Some(r) = self.reqs.get_mut(ri as usize).filter(|r| r.used) else {
            return;
        };
        r.inflight = false;
        if let Some(Data::Io { buf, .. }) = buf {
            r.buf = Some(buf);
        }
        let part = core::mem::take(&mut r.part);
        if st.is_success() {
            r.waiting_since = None;
            r.done = r.done.saturating_add(part);
            if r.done >= r.total() {
                self.complete(ri, Ok(()));
            } else {
                self.ready.push_front(ri);
            }
            return;
        }
        if st.is_path_error() && !st.dnr {
            // Linux `nvme_failover_req`: another path (or this one after its ANA state is
            // re-read); not counted against the retries.
            r.waiting_since.get_or_insert(now);
            self.counters.failovers += 1;
            self.ready.push_front(ri);
            if st.is_ana_error() && ana_reporting {
                let s = match st.sc {
                    path_sc::ANA_PERSISTENT_LOSS => AnaState::PersistentLoss,
                    path_sc::ANA_INACCESSIBLE => AnaState::Inaccessible,
                    _ => AnaState::Change,
                };
                self.set_ana(p, s, now);
                self.paths[p].ana_wanted = true;
            }
            return;
        }
        if !st.dnr && r.retries < max_retries {
            // Linux `nvme_retry_req` (CRD delays are not honoured).
            r.retries += 1;
            self.counters.retries += 1;
            self.ready.push_front(ri);
            return;
        }
        self.complete(ri, Err(block_error(st)));
    }

    /// A command of request `ri` on path `p` was lost with its connection.
    fn cmd_lost(&mut self, p: usize, ri: u16, buf: Option<Data>, now: u64) {
        let path = &mut self.paths[p];
        path.inflight = path.inflight.saturating_sub(1);
        path.counters.aborted += 1;
        let Some(r) = self.reqs.get_mut(ri as usize).filter(|r| r.used) else {
            return;
        };
        r.inflight = false;
        r.part = 0;
        if let Some(Data::Io { buf, .. }) = buf {
            r.buf = Some(buf);
        }
        if r.op.is_some_and(|o| o.has_data()) && r.buf.is_none() {
            self.complete(ri, Err(BlockError::Internal));
            return;
        }
        r.waiting_since.get_or_insert(now);
        self.counters.failovers += 1;
        self.ready.push_front(ri);
    }

    /// The path for the next command, by policy, among those with a free queue slot:
    /// ANA-optimized paths first, non-optimized ones only when no optimized path is usable.
    fn pick_path(&mut self) -> Option<usize> {
        let n = self.paths.len();
        let opt = self.paths.iter().any(Path::optimized);
        let eligible = |p: &Path<S>| (if opt { p.optimized() } else { p.usable() }) && p.has_room();
        match self.cfg.policy {
            Policy::RoundRobin => {
                for i in 1..=n {
                    let p = (self.rr + i) % n;
                    if eligible(&self.paths[p]) {
                        self.rr = p;
                        return Some(p);
                    }
                }
                None
            }
            Policy::QueueDepth => (0..n)
                .filter(|&p| eligible(&self.paths[p]))
                .min_by_key(|&p| self.paths[p].inflight),
        }
    }

    fn wait_expired(&self, ri: u16, now: u64) -> bool {
        match (self.reqs[ri as usize].waiting_since, self.t.wait_limit()) {
            (Some(s), Some(l)) => now.saturating_sub(s) >= l,
            _ => false,
        }
    }

    /// Sends queued requests' next commands while a path has room.
    fn dispatch(&mut self, now: u64) -> bool {
        let mut any = false;
        while let Some(&ri) = self.ready.front() {
            if self.wait_expired(ri, now) {
                self.ready.pop_front();
                self.complete(ri, Err(BlockError::PathError));
                any = true;
                continue;
            }
            let Some(p) = self.pick_path() else { break };
            let Some(q) = self.paths[p].pick_queue() else {
                break;
            };
            self.ready.pop_front();
            if !self.issue(ri, p, q, now) {
                break;
            }
            any = true;
        }
        any
    }

    /// Sends the next part of request `ri` on queue `q` of path `p`.
    fn issue(&mut self, ri: u16, p: usize, q: usize, now: u64) -> bool {
        let nsid = self.cfg.nsid;
        let Some(ns) = self.ns else {
            self.complete(ri, Err(BlockError::Internal));
            return true;
        };
        let bs = ns.geometry.block_size;
        let max_rw = self.paths[p].info.max_rw_blocks(bs);
        let r = &mut self.reqs[ri as usize];
        let Some(op) = r.op else { return true };
        let left = r.blocks.saturating_sub(r.done);
        let lba = r.lba + r.done as u64;
        let rw = |n: u32, deac: bool, fua: bool| RwCommand {
            slba: lba,
            nlb: (n - 1) as u16,
            deac,
            fua,
            lr: false,
            prinfo: 0,
        };
        let (sqe, data, n) = match op {
            BlockOp::Read | BlockOp::Write { .. } | BlockOp::Compare => {
                let n = left.min(max_rw);
                let Some(buf) = r.buf.take() else {
                    self.complete(ri, Err(BlockError::Internal));
                    return true;
                };
                let (opc, fua) = match op {
                    BlockOp::Read => (IoOpcode::Read, false),
                    BlockOp::Write { fua } => (IoOpcode::Write, fua),
                    _ => (IoOpcode::Compare, false),
                };
                let off = r.off + r.done as usize * bs as usize;
                let len = n as usize * bs as usize;
                let sqe = rw(n, false, fua).to_sqe(opc as u8, 0, nsid);
                (sqe, Some((Data::Io { buf, off, len }, len as u32)), n)
            }
            BlockOp::WriteZeroes { deallocate, fua } => {
                let n = left.min(65536);
                let sqe = rw(n, deallocate, fua).to_sqe(IoOpcode::WriteZeroes as u8, 0, nsid);
                (sqe, None, n)
            }
            BlockOp::Verify => {
                let n = left.min(65536);
                let sqe = rw(n, false, false).to_sqe(IoOpcode::Verify as u8, 0, nsid);
                (sqe, None, n)
            }
            BlockOp::Deallocate => {
                let range = DsmRange {
                    cattr: 0,
                    nlb: left,
                    slba: lba,
                };
                let sqe = DsmCommand {
                    nr: 0,
                    idr: false,
                    idw: false,
                    ad: true,
                }
                .to_sqe(0, nsid);
                let data = Data::Range(range.to_bytes());
                (sqe, Some((data, DsmRange::SIZE as u32)), left)
            }
            BlockOp::Flush => (Sqe::new(IoOpcode::Flush as u8, 0).with_nsid(nsid), None, 0),
        };
        let first_of_many = r.done == 0 && n < r.total();
        let path = &mut self.paths[p];
        let ioq = &mut path.ioqs[q];
        match ioq.conn.hc.submit(sqe, data) {
            Ok(cid) => {
                if let Some(c) = ioq.cmds.get_mut(cid as usize) {
                    *c = Cmd {
                        req: ri,
                        issued_at: now,
                    };
                }
                ioq.inflight += 1;
                path.inflight += 1;
                path.counters.commands += 1;
                if let Some(c) = path.queue_commands.get_mut(q) {
                    *c += 1;
                }
                r.part = n;
                r.inflight = true;
                if first_of_many {
                    self.counters.split += 1;
                }
                true
            }
            Err(rej) => {
                if let Some(Data::Io { buf, .. }) = rej.buf {
                    r.buf = Some(buf);
                }
                self.ready.push_front(ri);
                false
            }
        }
    }

    /// Fails requests that waited too long for a usable path, or all of them when every path
    /// gave up.
    fn expire(&mut self, now: u64) -> bool {
        if self.ready.is_empty() {
            return false;
        }
        let all_failed = self.paths.iter().all(|p| p.phase == Phase::Failed);
        if !all_failed && self.paths.iter().any(Path::usable) {
            return false;
        }
        let limit = self.t.wait_limit();
        let mut any = false;
        for _ in 0..self.ready.len() {
            let Some(ri) = self.ready.pop_front() else {
                break;
            };
            let since = *self.reqs[ri as usize].waiting_since.get_or_insert(now);
            if all_failed || limit.is_some_and(|l| now.saturating_sub(since) >= l) {
                self.complete(ri, Err(BlockError::PathError));
                any = true;
            } else {
                self.ready.push_back(ri);
            }
        }
        any
    }

    // ---- reporting ----------------------------------------------------------------------

    pub fn for_each_queue(&self, f: &mut dyn FnMut(crate::stats::QueueView)) {
        for (i, p) in self.paths.iter().enumerate() {
            p.for_each_queue(i as u8, f);
        }
    }

    pub fn load(&self) -> crate::stats::VolumeLoad {
        crate::stats::VolumeLoad {
            queued: self.ready.len() as u32,
            in_flight: self.reqs.iter().filter(|r| r.used && r.inflight).count() as u32,
            counters: self.counters,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let n = self.paths.len();
        let usable = self.paths.iter().filter(|p| p.usable()).count();
        let state = if self.paths.iter().all(|p| p.phase == Phase::Failed) {
            VolumeState::Failed
        } else if !self.ever_live {
            VolumeState::Connecting
        } else if usable == 0 {
            VolumeState::NoPath
        } else if usable == n {
            VolumeState::Online
        } else {
            VolumeState::Degraded
        };
        let load = self.load();
        Snapshot {
            state,
            geometry: self.ns.map(|n| n.geometry),
            queued: load.queued,
            in_flight: load.in_flight,
            counters: load.counters,
            paths: self.paths.iter().map(Path::snapshot).collect(),
        }
    }
}
