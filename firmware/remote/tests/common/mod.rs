//! Test harness: an in-memory TCP network (with fault injection and random segmentation)
//! connecting a `RemoteVolume` to real Keel targets (`keel_nvmf_tcp::TargetConnection` +
//! `keel_controller::Target`) in the same process, wired the way `firmware/src/nvmf.rs` wires
//! them. Several targets may share one RAM namespace (two targets, one namespace). A target
//! may answer ANA through a small scripted layer in front of the controller core (Keel's core
//! does not report ANA): it marks Identify Controller/Namespace as ANA reporting, answers Get
//! Log Page 0Ch from the script, holds Asynchronous Event Requests and completes one with an
//! ANA change notice when the script changes state, and fails I/O with the ANA path status of
//! an inaccessible state. Everything else is the real controller core.
#![allow(dead_code)]

use keel_controller::{
    Event as CoreEvent, Instant, Limits, NamespaceConfig, QueueId, QueueLoss, Request, Response,
    SubsystemConfig, Target, TargetConfig, TransportParams,
};
use keel_nvme::log::GetLogPageCommand;
use keel_nvme::log::ana::{self, AnaState};
use keel_nvme::opcode::async_event;
use keel_nvme::{Sqe, Status};
use keel_nvmf_tcp::{Event as TcpEvent, TargetConfig as TcpConfig, TargetConnection, TargetState};
use keel_remote::{Net, PathAddr, RemoteBackend, RemoteConfig, RemoteVolume, SockState};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockOp, BlockRequest, IoBuf, RamBackend,
    SharedBackend, SharedHandle,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

pub const NQN: &str = "nqn.2026-11.dev.keel:remote-test";
pub const HOSTNQN: &str = "nqn.2026-11.dev.keel:initiator";
pub const MS: u64 = 1_000_000;

// ---- buffers ---------------------------------------------------------------------------

thread_local! {
    /// IoBufs wrap `&'static mut` memory: keep them in a per-thread bank instead of leaking
    /// one per command.
    static BANK: RefCell<Vec<IoBuf>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with `len` valid bytes (contents unspecified).
pub fn buf(len: usize) -> IoBuf {
    let found = BANK.with(|b| {
        let mut b = b.borrow_mut();
        let i = b.iter().position(|x| x.capacity() >= len)?;
        Some(b.swap_remove(i))
    });
    let mut b = found.unwrap_or_else(|| IoBuf::leak_zeroed(len.max(128 * 1024)));
    b.set_len(len);
    b
}

/// Returns a buffer to the bank.
pub fn give(b: IoBuf) {
    BANK.with(|x| x.borrow_mut().push(b));
}

/// A buffer holding `data`.
pub fn buf_with(data: &[u8]) -> IoBuf {
    let mut b = buf(data.len());
    b.as_mut_slice().copy_from_slice(data);
    b
}

// ---- randomness ------------------------------------------------------------------------

/// xorshift64*.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

// ---- the shared namespace --------------------------------------------------------------

/// A RAM namespace several targets can serve, read and written directly by the test.
pub struct Disk {
    shared: Rc<SharedBackend<RamBackend>>,
    me: SharedHandle<RamBackend>,
    pub block_size: u32,
    pub blocks: u64,
}

impl Disk {
    pub fn new(block_size: u32, blocks: u64) -> Self {
        let shared = Rc::new(SharedBackend::new(
            RamBackend::new(block_size, blocks, 4096).unwrap(),
            4096,
        ));
        let me = shared.handle().unwrap();
        Self {
            shared,
            me,
            block_size,
            blocks,
        }
    }

    pub fn handle(&self) -> SharedHandle<RamBackend> {
        self.shared.handle().unwrap()
    }

    fn sync(&mut self, op: BlockOp, lba: u64, b: IoBuf, blocks: u32) -> IoBuf {
        self.me.submit(req(1, op, lba, blocks, Some(b))).unwrap();
        let mut out = None;
        while out.is_none() {
            self.me.poll(&mut |c| {
                assert_eq!(c.result, Ok(()));
                out = c.buf;
            });
        }
        out.unwrap()
    }

    /// Reads blocks straight from the medium (not through NVMe/TCP).
    pub fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        let len = (blocks * self.block_size) as usize;
        let b = self.sync(BlockOp::Read, lba, buf(len), blocks);
        let v = b.as_slice()[..len].to_vec();
        give(b);
        v
    }

    /// Writes blocks straight to the medium.
    pub fn write(&mut self, lba: u64, data: &[u8]) {
        let blocks = (data.len() / self.block_size as usize) as u32;
        let b = self.sync(BlockOp::Write { fua: false }, lba, buf_with(data), blocks);
        give(b);
    }
}

// ---- targets ---------------------------------------------------------------------------

/// How a target is built.
#[derive(Debug, Clone, Copy)]
pub struct ServerCfg {
    /// MDTS (4 KiB units, power of two; 0 = no limit).
    pub mdts: u8,
    /// In-capsule data the controller core advertises (IOCCSZ = (64 + this) / 16).
    pub in_capsule: u32,
    /// MAXH2CDATA of the transport.
    pub maxh2cdata: u32,
    /// Largest C2HData PDU.
    pub max_c2h: u32,
    /// Queue entries (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// Report ANA through the scripted layer.
    pub ana: bool,
    /// ANATT reported (seconds).
    pub anatt: u8,
}

impl Default for ServerCfg {
    fn default() -> Self {
        Self {
            mdts: 5,
            in_capsule: 8192,
            maxh2cdata: 128 * 1024,
            max_c2h: 128 * 1024,
            max_queue_depth: 128,
            max_io_queues: 8,
            ana: false,
            anatt: 2,
        }
    }
}

struct SConn {
    id: u32,
    sock: usize,
    listener: PathAddr,
    tcp: TargetConnection<IoBuf>,
    queue: QueueId,
    depth_set: bool,
    fc_disabled: bool,
    closing: bool,
    /// Identify commands whose data the ANA layer patches: (CID, CNS).
    patches: Vec<(u16, u8)>,
    held_aers: VecDeque<Request>,
    ana_masked: bool,
    ana_pending: bool,
}

/// A Keel target listening on one or more addresses.
pub struct Server {
    pub listeners: Vec<PathAddr>,
    pub target: Target,
    pub cfg: ServerCfg,
    pub alive: bool,
    conns: Vec<SConn>,
    next_id: u32,
    /// ANA state per listener (only with `cfg.ana`).
    pub ana: Vec<(PathAddr, AnaState)>,
    pub ana_chgcnt: u64,
    backend: Rc<dyn Fn() -> Box<dyn BlockBackend>>,
    /// Commands the target saw, by opcode class (admin opcodes counted on admin queues).
    pub io_commands: u64,
    pub aers_fired: u64,
    scratch: Vec<u8>,
}

fn make_target(cfg: &ServerCfg, backend: Box<dyn BlockBackend>) -> Target {
    Target::new(TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "KEELREMOTETEST".into(),
            model: "Keel remote test target".into(),
            allowed_hosts: Vec::new(),
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                backend,
                nguid: [0x42; 16],
                uuid: [0; 16],
                eui64: [0; 8],
                qos: Default::default(),
            }],
        }],
        ports: Vec::new(),
        limits: Limits {
            mdts: cfg.mdts,
            max_queue_depth: cfg.max_queue_depth,
            max_io_queues: cfg.max_io_queues,
            ..Limits::default()
        },
        transport: TransportParams {
            in_capsule_data: cfg.in_capsule,
            ..TransportParams::default()
        },
        identity: Default::default(),
        scratch: None,
        ..Default::default()
    })
    .unwrap()
}

impl Server {
    pub fn new(listeners: Vec<PathAddr>, disk: &Disk, cfg: ServerCfg) -> Self {
        let shared = disk.shared.clone();
        let backend: Rc<dyn Fn() -> Box<dyn BlockBackend>> =
            Rc::new(move || Box::new(shared.handle().unwrap()));
        let target = make_target(&cfg, backend());
        let ana = listeners
            .iter()
            .map(|a| (*a, AnaState::Optimized))
            .collect();
        Self {
            listeners,
            target,
            cfg,
            alive: true,
            conns: Vec::new(),
            next_id: 1,
            ana,
            ana_chgcnt: 1,
            backend,
            io_commands: 0,
            aers_fired: 0,
            scratch: Vec::new(),
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn tcp_cfg(&self) -> TcpConfig {
        TcpConfig {
            maxh2cdata: self.cfg.maxh2cdata,
            max_c2h_data: self.cfg.max_c2h,
            max_transfer: 1 << 20,
            slots: 256,
            ..TcpConfig::default()
        }
    }

    fn accept(&mut self, sock: usize, listener: PathAddr, now: u64) {
        let tcp = TargetConnection::new(self.tcp_cfg(), now / MS).unwrap();
        let queue = self.target.open_queue().unwrap();
        let id = self.next_id;
        self.next_id += 1;
        self.conns.push(SConn {
            id,
            sock,
            listener,
            tcp,
            queue,
            depth_set: false,
            fc_disabled: false,
            closing: false,
            patches: Vec::new(),
            held_aers: VecDeque::new(),
            ana_masked: false,
            ana_pending: false,
        });
    }

    /// Crash and come back at once with a fresh controller core (same namespace): every
    /// connection dies (the hosts see resets).
    pub fn restart(&mut self, net_conns: &mut [SimConn]) {
        self.drop_all(net_conns);
        self.target = make_target(&self.cfg, (self.backend)());
    }

    fn drop_all(&mut self, net_conns: &mut [SimConn]) {
        for c in self.conns.drain(..) {
            net_conns[c.sock].server_gone = true;
            drain(c.tcp);
        }
    }

    fn ana_state(&self, listener: PathAddr) -> Option<AnaState> {
        if !self.cfg.ana {
            return None;
        }
        self.ana.iter().find(|(a, _)| *a == listener).map(|x| x.1)
    }

    /// Changes the ANA state seen through `listener` and notifies its hosts.
    pub fn set_ana(&mut self, listener: PathAddr, s: AnaState, now: u64) {
        for x in self.ana.iter_mut().filter(|x| x.0 == listener) {
            x.1 = s;
        }
        self.ana_chgcnt += 1;
        for k in 0..self.conns.len() {
            if self.conns[k].listener == listener && self.is_admin(k) == Some(true) {
                self.conns[k].ana_pending = true;
                self.fire_aer(k, now);
            }
        }
    }

    fn is_admin(&self, k: usize) -> Option<bool> {
        self.target
            .queue_info(self.conns[k].queue)
            .map(|i| i.qid == 0)
    }

    fn fire_aer(&mut self, k: usize, now: u64) {
        let c = &mut self.conns[k];
        if !c.ana_pending || c.ana_masked {
            return;
        }
        let Some(req) = c.held_aers.pop_front() else {
            return;
        };
        c.ana_pending = false;
        c.ana_masked = true;
        self.aers_fired += 1;
        let mut resp = self
            .target
            .reject(Instant::from_nanos(now), c.queue, req, Status::SUCCESS);
        resp.cqe.dw0 = async_event::dw0(
            async_event::TYPE_NOTICE,
            async_event::NOTICE_ANA_CHANGE,
            0x0C,
        );
        self.deliver(k, resp);
    }

    fn ana_log(&self, listener: PathAddr, rgo: bool) -> Vec<u8> {
        let s = self.ana_state(listener).unwrap_or(AnaState::Optimized);
        let nsids: &[u32] = if rgo { &[] } else { &[1] };
        let mut b = vec![0u8; ana::log_len(1, nsids.len())];
        ana::Header {
            chgcnt: self.ana_chgcnt,
            ngrps: 1,
        }
        .encode(&mut b);
        ana::GroupDesc {
            grpid: 1,
            nnsids: 0,
            chgcnt: self.ana_chgcnt,
            state: s as u8,
        }
        .encode(nsids, &mut b[ana::HEADER_LEN..]);
        b
    }

    fn deliver(&mut self, k: usize, mut resp: Response) {
        let c = &mut self.conns[k];
        if let Some(i) = c.patches.iter().position(|p| p.0 == resp.cqe.cid) {
            let (_, cns) = c.patches.swap_remove(i);
            if let Some(b) = resp.buf.as_mut() {
                let s = b.as_mut_slice();
                if cns == 1 && s.len() >= 352 {
                    s[76] |= 0x08; // CMIC: ANA reporting
                    s[93] |= 0x08; // OAES bit 11 (byte 93 bit 3): ANA change notices
                    s[342] = self.cfg.anatt; // ANATT
                    s[343] = 0x1F; // ANACAP: all states reported
                    s[344..348].copy_from_slice(&1u32.to_le_bytes()); // ANAGRPMAX
                    s[348..352].copy_from_slice(&1u32.to_le_bytes()); // NANAGRPID
                } else if cns == 0 && s.len() >= 96 {
                    s[92..96].copy_from_slice(&1u32.to_le_bytes()); // ANAGRPID
                }
            }
        }
        let cqe = resp.cqe;
        let data = match resp.buf {
            Some(b) if resp.data_len > 0 => Some((b, resp.data_len)),
            other => {
                if let Some(b) = other {
                    give(b);
                }
                None
            }
        };
        if let Err(r) = c.tcp.complete(cqe, data, c.fc_disabled)
            && let Some(b) = r.buf
        {
            give(b);
        }
    }

    fn submit(&mut self, k: usize, s: Sqe, b: Option<IoBuf>, data_len: u32, now: u64) {
        let c = &self.conns[k];
        let listener = c.listener;
        let req = Request {
            sqe: s,
            buf: b,
            data_len,
            cookie: c.id,
        };
        let t = Instant::from_nanos(now);
        let queue = c.queue;
        if let Some(state) = self.ana_state(listener) {
            match self.is_admin(k) {
                Some(true) => match s.opcode {
                    0x06 if matches!(s.cdw[0] as u8, 0 | 1) => {
                        self.conns[k].patches.push((s.cid, s.cdw[0] as u8));
                    }
                    0x02 if s.cdw[0] as u8 == 0x0C => {
                        let g = GetLogPageCommand::from_sqe(&s);
                        let log = self.ana_log(listener, g.lsp & 1 != 0);
                        let mut req = req;
                        let mut b = req.buf.take().unwrap_or_else(|| buf(data_len as usize));
                        b.set_len(data_len as usize);
                        b.as_mut_slice().fill(0);
                        keel_nvme::log::copy_window(b.as_mut_slice(), g.offset, &log, 0);
                        if !g.rae {
                            self.conns[k].ana_masked = false;
                        }
                        let mut resp = self.target.reject(t, queue, req, Status::SUCCESS);
                        resp.buf = Some(b);
                        resp.data_len = data_len;
                        self.deliver(k, resp);
                        self.fire_aer(k, now);
                        return;
                    }
                    0x0C => {
                        self.conns[k].held_aers.push_back(req);
                        self.fire_aer(k, now);
                        return;
                    }
                    _ => {}
                },
                Some(false) if !state.is_accessible() => {
                    let st = match state {
                        AnaState::PersistentLoss => Status::ANA_PERSISTENT_LOSS,
                        AnaState::Change => Status::ANA_TRANSITION,
                        _ => Status::ANA_INACCESSIBLE,
                    };
                    let resp = self.target.reject(t, queue, req, st);
                    self.deliver(k, resp);
                    return;
                }
                _ => {}
            }
        }
        if self.is_admin(k) == Some(false) {
            self.io_commands += 1;
        }
        let resp = self.target.submit(t, queue, req);
        let c = &mut self.conns[k];
        if !c.depth_set
            && let Some(info) = self.target.queue_info(c.queue)
        {
            c.tcp.set_queue_depth(info.sqsize.saturating_add(1));
            c.fc_disabled = info.sq_flow_control_disabled;
            c.depth_set = true;
        }
        if let Some(resp) = resp {
            self.deliver(k, resp);
        }
    }

    fn handle_events(&mut self, k: usize, now: u64) {
        while let Some(ev) = self.conns[k].tcp.poll_event() {
            match ev {
                TcpEvent::Connected { .. } => {}
                TcpEvent::NeedBuffer { cid, len } => {
                    let b = buf(len as usize);
                    if let Err(r) = self.conns[k].tcp.provide_buffer(cid, b)
                        && let Some(b) = r.buf
                    {
                        give(b);
                    }
                }
                TcpEvent::Command {
                    sqe,
                    buf: Some(b),
                    data_len,
                } => self.submit(k, sqe, Some(b), data_len, now),
                TcpEvent::Command {
                    sqe,
                    buf: None,
                    data_len: 0,
                } => self.submit(k, sqe, None, 0, now),
                TcpEvent::Command {
                    sqe,
                    buf: None,
                    data_len,
                } => self.submit(k, sqe, Some(buf(data_len as usize)), data_len, now),
                TcpEvent::CommandFailed {
                    sqe,
                    buf: b,
                    status,
                } => {
                    if let Some(b) = b {
                        give(b);
                    }
                    let c = &self.conns[k];
                    let req = Request {
                        sqe,
                        buf: None,
                        data_len: 0,
                        cookie: c.id,
                    };
                    let resp = self
                        .target
                        .reject(Instant::from_nanos(now), c.queue, req, status);
                    self.deliver(k, resp);
                }
                TcpEvent::BufferReleased { buf: b, .. } => give(b),
                TcpEvent::Closed { .. } => self.conns[k].closing = true,
            }
        }
    }

    fn step(&mut self, now: u64, net: &mut [SimConn], rng: &mut Rng, faults: &Faults) {
        let now_ms = now / MS;
        // Connections the host closed (seen once the network lets the FIN/RST through).
        let mut k = 0;
        while k < self.conns.len() {
            let c = &self.conns[k];
            let sc = &net[c.sock];
            if sc.client_closed && !faults.blocked(c.listener, now) {
                let c = self.conns.swap_remove(k);
                let _ = self.target.close_queue_after(c.queue, QueueLoss::Abrupt);
                drain(c.tcp);
                continue;
            }
            k += 1;
        }
        for k in 0..self.conns.len() {
            let (sock, listener) = (self.conns[k].sock, self.conns[k].listener);
            if faults.blocked(listener, now) {
                continue;
            }
            let mut spins = 0;
            while !net[sock].h2t.is_empty() && !self.conns[k].closing && spins < 10_000 {
                spins += 1;
                let want = rng.range(1, faults.segment.max(1) as u64) as usize;
                let (a, _) = net[sock].h2t.as_slices();
                let n = want.min(a.len());
                let taken = self.conns[k].tcp.recv(now_ms, &a[..n]);
                net[sock].h2t.drain(..taken);
                self.handle_events(k, now);
                if taken == 0 {
                    break;
                }
            }
            self.handle_events(k, now);
        }
        let mut events = Vec::new();
        self.target
            .poll(Instant::from_nanos(now), &mut |e| events.push(e));
        for e in events {
            match e {
                CoreEvent::Completion(q, resp) => {
                    match self
                        .conns
                        .iter()
                        .position(|c| c.queue == q && c.id == resp.cookie)
                    {
                        Some(k) => self.deliver(k, resp),
                        None => {
                            if let Some(b) = resp.buf {
                                give(b);
                            }
                        }
                    }
                }
                CoreEvent::QueueTerminated(q) => {
                    if let Some(c) = self.conns.iter_mut().find(|c| c.queue == q) {
                        c.tcp.close();
                        c.closing = true;
                    }
                }
                CoreEvent::BufferReleased { buf: b, .. } => give(b),
            }
        }
        let mut k = 0;
        while k < self.conns.len() {
            let (sock, listener) = (self.conns[k].sock, self.conns[k].listener);
            self.handle_events(k, now);
            self.conns[k].tcp.poll_timers(now_ms);
            if !faults.blocked(listener, now) {
                let mut out = std::mem::take(&mut self.scratch);
                if out.len() < faults.segment.max(1) {
                    out.resize(faults.segment.max(1), 0);
                }
                loop {
                    let want = rng.range(1, faults.segment.max(1) as u64) as usize;
                    let n = self.conns[k].tcp.transmit(&mut out[..want]);
                    if n == 0 {
                        break;
                    }
                    net[sock].t2h.extend(&out[..n]);
                    net[sock].t2h_pdus.feed(&out[..n]);
                }
                self.scratch = out;
            }
            let c = &self.conns[k];
            if c.tcp.state() == TargetState::Closed && !c.tcp.wants_transmit() {
                let c = self.conns.swap_remove(k);
                net[c.sock].server_gone = true;
                let _ = self.target.close_queue_after(c.queue, QueueLoss::Abrupt);
                drain(c.tcp);
                continue;
            }
            k += 1;
        }
    }
}

fn drain(mut tcp: TargetConnection<IoBuf>) {
    tcp.close();
    while let Some(ev) = tcp.poll_event() {
        match ev {
            TcpEvent::Command { buf: Some(b), .. }
            | TcpEvent::CommandFailed { buf: Some(b), .. }
            | TcpEvent::BufferReleased { buf: b, .. } => give(b),
            _ => {}
        }
    }
}

// ---- the network -----------------------------------------------------------------------

/// Counts NVMe/TCP PDUs in one direction of a byte stream (NVMe/TCP 1.0 §3.6.1 common
/// header: type, flags, HLEN, PDO, PLEN).
#[derive(Debug, Default, Clone)]
pub struct PduCounter {
    hdr: Vec<u8>,
    skip: usize,
    /// PDUs by type (0 ICReq .. 9 R2T).
    pub by_type: [u64; 16],
    /// Command capsules that carried in-capsule data.
    pub capsules_with_data: u64,
}

impl PduCounter {
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
                continue;
            }
            let n = (8 - self.hdr.len()).min(b.len());
            self.hdr.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.hdr.len() == 8 {
                let ty = self.hdr[0] as usize & 15;
                let hlen = self.hdr[2] as usize;
                let hd = if self.hdr[1] & 1 != 0 { 4 } else { 0 };
                let plen = u32::from_le_bytes(self.hdr[4..8].try_into().unwrap()) as usize;
                self.by_type[ty] += 1;
                if ty == 4 && plen > hlen + hd {
                    self.capsules_with_data += 1;
                }
                self.skip = plen.saturating_sub(8);
                self.hdr.clear();
            }
        }
    }
}

/// PDU types.
pub mod pdu {
    pub const CAPSULE_CMD: usize = 4;
    pub const H2C_DATA: usize = 6;
    pub const C2H_DATA: usize = 7;
    pub const R2T: usize = 9;
}

/// One TCP connection of the in-memory network.
#[derive(Debug)]
pub struct SimConn {
    pub h2t_pdus: PduCounter,
    pub t2h_pdus: PduCounter,
    pub addr: PathAddr,
    pub established: bool,
    /// The host closed it.
    pub client_closed: bool,
    /// The target side is gone (closed, crashed, or reset by the network).
    pub server_gone: bool,
    pub h2t: VecDeque<u8>,
    pub t2h: VecDeque<u8>,
}

/// Faults per address.
#[derive(Debug, Default)]
pub struct Faults {
    /// (address, until): connection attempts are refused.
    pub refuse: Vec<(PathAddr, u64)>,
    /// (address, until): nothing passes, connects hang (a partition or a stalled path).
    pub partition: Vec<(PathAddr, u64)>,
    /// Largest piece a segment carries (random 1..=this).
    pub segment: usize,
}

impl Faults {
    pub fn blocked(&self, a: PathAddr, now: u64) -> bool {
        self.partition.iter().any(|&(x, t)| x == a && now < t)
    }
    pub fn refusing(&self, a: PathAddr, now: u64) -> bool {
        self.refuse.iter().any(|&(x, t)| x == a && now < t)
    }
}

/// The network and the targets on it.
pub struct SimNet {
    pub conns: Vec<SimConn>,
    pub servers: Vec<Server>,
    pub faults: Faults,
    pub rng: Rng,
    pub now: u64,
    pub connects: u64,
    scratch: Vec<u8>,
}

impl SimNet {
    pub fn new(seed: u64) -> Self {
        Self {
            conns: Vec::new(),
            servers: Vec::new(),
            faults: Faults {
                segment: 4000,
                ..Faults::default()
            },
            rng: Rng::new(seed),
            now: 0,
            connects: 0,
            scratch: Vec::new(),
        }
    }

    pub fn add(&mut self, s: Server) -> usize {
        self.servers.push(s);
        self.servers.len() - 1
    }

    fn visible(&self, i: usize) -> &SimConn {
        &self.conns[i]
    }

    /// Resets every connection to `a` (both sides see it at once).
    pub fn reset(&mut self, a: PathAddr) {
        for c in self.conns.iter_mut().filter(|c| c.addr == a) {
            c.server_gone = true;
            c.client_closed = true;
        }
        for s in self.servers.iter_mut() {
            let now = self.now;
            let _ = now;
            let mut k = 0;
            while k < s.conns.len() {
                if s.conns[k].listener == a {
                    let c = s.conns.swap_remove(k);
                    let _ = s.target.close_queue_after(c.queue, QueueLoss::Abrupt);
                    drain(c.tcp);
                } else {
                    k += 1;
                }
            }
        }
    }

    /// Resets one random established connection to `a`; returns whether there was one.
    pub fn reset_one(&mut self, a: PathAddr) -> bool {
        let live: Vec<usize> = (0..self.conns.len())
            .filter(|&i| {
                let c = &self.conns[i];
                c.addr == a && c.established && !c.server_gone && !c.client_closed
            })
            .collect();
        if live.is_empty() {
            return false;
        }
        let i = live[self.rng.range(0, live.len() as u64 - 1) as usize];
        self.conns[i].server_gone = true;
        for s in self.servers.iter_mut() {
            if let Some(k) = s.conns.iter().position(|c| c.sock == i) {
                let c = s.conns.swap_remove(k);
                let _ = s.target.close_queue_after(c.queue, QueueLoss::Abrupt);
                drain(c.tcp);
            }
        }
        true
    }

    /// Crash target `i` and bring it back with a fresh controller core.
    pub fn restart(&mut self, i: usize) {
        let s = &mut self.servers[i];
        s.restart(&mut self.conns);
    }

    /// Take target `i` down (connections die, connects are refused) or back up.
    pub fn set_alive(&mut self, i: usize, alive: bool) {
        let s = &mut self.servers[i];
        if !alive {
            s.drop_all(&mut self.conns);
            s.target = make_target(&s.cfg, (s.backend)());
        }
        s.alive = alive;
    }

    /// PDUs of a type sent by hosts (all connections so far).
    pub fn h2t(&self, ty: usize) -> u64 {
        self.conns.iter().map(|c| c.h2t_pdus.by_type[ty]).sum()
    }

    /// PDUs of a type sent by targets.
    pub fn t2h(&self, ty: usize) -> u64 {
        self.conns.iter().map(|c| c.t2h_pdus.by_type[ty]).sum()
    }

    /// Command capsules with in-capsule data.
    pub fn capsules_with_data(&self) -> u64 {
        self.conns
            .iter()
            .map(|c| c.h2t_pdus.capsules_with_data)
            .sum()
    }

    pub fn step(&mut self, now: u64) {
        self.now = now;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if c.established || c.server_gone || c.client_closed {
                continue;
            }
            let a = c.addr;
            if self.faults.blocked(a, now) {
                continue;
            }
            let srv = self
                .servers
                .iter()
                .position(|s| s.alive && s.listeners.contains(&a));
            match srv {
                Some(si) if !self.faults.refusing(a, now) => {
                    self.conns[i].established = true;
                    self.servers[si].accept(i, a, now);
                }
                _ => self.conns[i].server_gone = true,
            }
        }
        for s in self.servers.iter_mut() {
            s.step(now, &mut self.conns, &mut self.rng, &self.faults);
        }
    }
}

pub type Sock = usize;

impl Net for SimNet {
    type Sock = Sock;

    fn connect(&mut self, addr: PathAddr, _now_ns: u64) -> Option<Sock> {
        self.connects += 1;
        self.conns.push(SimConn {
            h2t_pdus: PduCounter::default(),
            t2h_pdus: PduCounter::default(),
            addr,
            established: false,
            client_closed: false,
            server_gone: false,
            h2t: VecDeque::new(),
            t2h: VecDeque::new(),
        });
        Some(self.conns.len() - 1)
    }

    fn state(&mut self, s: Sock) -> SockState {
        let now = self.now;
        let c = self.visible(s);
        // A partition hides the peer's reset until it heals (a half-open connection).
        if c.client_closed || (c.server_gone && !self.faults.blocked(c.addr, now)) {
            SockState::Closed
        } else if c.established {
            SockState::Established
        } else {
            SockState::Connecting
        }
    }

    fn recv(&mut self, s: Sock, f: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        let now = self.now;
        let blocked = self.faults.blocked(self.conns[s].addr, now);
        let want = self.rng.range(1, self.faults.segment.max(1) as u64) as usize;
        let c = &mut self.conns[s];
        if blocked || c.client_closed || c.t2h.is_empty() {
            return 0;
        }
        let (a, _) = c.t2h.as_slices();
        let n = want.min(a.len());
        let taken = f(&a[..n]);
        c.t2h.drain(..taken);
        taken
    }

    fn send(&mut self, s: Sock, f: &mut dyn FnMut(&mut [u8]) -> usize) -> usize {
        let want = self.rng.range(1, self.faults.segment.max(1) as u64) as usize;
        let c = &mut self.conns[s];
        if !c.established || c.client_closed || c.h2t.len() > 1 << 20 {
            return 0;
        }
        let mut out = std::mem::take(&mut self.scratch);
        if out.len() < want {
            out.resize(want, 0);
        }
        let n = f(&mut out[..want]);
        if !c.server_gone {
            c.h2t.extend(&out[..n]);
            c.h2t_pdus.feed(&out[..n]);
        }
        self.scratch = out;
        n
    }

    fn close(&mut self, s: Sock, _now_ns: u64) {
        let c = &mut self.conns[s];
        c.client_closed = true;
        c.h2t.clear();
        c.t2h.clear();
    }
}

// ---- driving a volume ------------------------------------------------------------------

/// A volume, its network and its completions.
pub struct Rig {
    pub net: SimNet,
    pub vol: RemoteVolume<Sock>,
    pub be: Option<RemoteBackend<Sock>>,
    pub now: u64,
    pub tick: u64,
    pub done: Vec<BlockCompletion>,
    /// With lanes: `vol` is lane 1 and this is the volume that owns the associations (the
    /// controller core's), polled first each step; updates and losses cross at once.
    pub owner: Option<Owner>,
    /// With lanes: poll the lane before the owner in each step (the two run on different
    /// cores in the firmware: either may see a loss first).
    pub lane_first: bool,
}

/// The owner of a lane rig, as the firmware's controller core would keep it.
pub struct Owner {
    pub vol: RemoteVolume<Sock>,
    pub be: Option<RemoteBackend<Sock>>,
    pub done: Vec<BlockCompletion>,
    /// Lane version last carried to the lane.
    pub seen: u64,
    /// Updates and losses carried so far.
    pub updates: u64,
    pub losses: u64,
}

/// Timers short enough for tests (virtual time).
pub fn test_config(paths: Vec<PathAddr>) -> RemoteConfig {
    let mut c = RemoteConfig::new(paths, NQN, 1, HOSTNQN, [7; 16]);
    c.io_queues = 2;
    c.queue_depth = 16;
    c.kato_ms = 2_000;
    c.reconnect_delay_ms = 100;
    c.ctrl_loss_tmo_ms = Some(3_000);
    c.io_timeout_ms = 1_000;
    c.admin_timeout_ms = 2_000;
    c.connect_timeout_ms = 1_000;
    c
}

pub fn addr(i: u8) -> PathAddr {
    PathAddr::new([10, 0, 0, i], 4420)
}

/// A request with its data at offset 0 of `b`.
pub fn req(tag: u64, op: BlockOp, lba: u64, blocks: u32, b: Option<IoBuf>) -> BlockRequest {
    BlockRequest {
        tag,
        op,
        lba,
        blocks,
        buf: b,
        buf_offset: 0,
    }
}

/// A connected volume with one path to one target serving a `blocks`-block namespace.
pub fn one_target(seed: u64, cfg: ServerCfg, block_size: u32, blocks: u64) -> (Rig, Disk) {
    let disk = Disk::new(block_size, blocks);
    let mut net = SimNet::new(seed);
    net.add(Server::new(vec![addr(1)], &disk, cfg));
    let mut rig = Rig::new(net, test_config(vec![addr(1)]));
    rig.connect();
    (rig, disk)
}

impl Rig {
    pub fn new(net: SimNet, cfg: RemoteConfig) -> Self {
        Self {
            net,
            vol: RemoteVolume::new(cfg).unwrap(),
            be: None,
            now: 0,
            tick: MS,
            done: Vec::new(),
            owner: None,
            lane_first: false,
        }
    }

    /// An owner configured as `cfg` with one lane, connected; `vol` is the lane, `be` its
    /// backend (the owner's backend is in `owner`).
    pub fn with_lane(net: SimNet, mut cfg: RemoteConfig) -> Self {
        cfg.lanes = 1;
        let mut net = net;
        let owner = RemoteVolume::new(cfg.clone()).unwrap();
        let mut now = 0;
        let seed = loop {
            now += MS;
            net.step(now);
            owner.poll(now, &mut net);
            if let Some(s) = owner.lane_seed() {
                break s;
            }
            assert!(now < 5_000 * MS, "owner did not identify the namespace");
        };
        let vol = RemoteVolume::lane(cfg, 1, seed).unwrap();
        let mut rig = Self {
            net,
            vol,
            be: None,
            now,
            tick: MS,
            done: Vec::new(),
            owner: Some(Owner {
                be: owner.backend(),
                vol: owner,
                done: Vec::new(),
                seen: u64::MAX,
                updates: 0,
                losses: 0,
            }),
            lane_first: false,
        };
        rig.connect();
        rig
    }

    /// The lane's pass: poll, then its losses to the owner.
    fn lane_pass(&mut self) {
        self.vol.poll(self.now, &mut self.net);
        if let Some(o) = self.owner.as_mut() {
            while let Some(l) = self.vol.take_lane_loss() {
                o.losses += 1;
                o.vol.lane_lost(l, self.now, &mut self.net);
            }
        }
    }

    pub fn step(&mut self) {
        self.now += self.tick;
        self.net.step(self.now);
        let lane_first = self.owner.is_some() && self.lane_first;
        if lane_first {
            self.lane_pass();
        }
        if let Some(o) = self.owner.as_mut() {
            o.vol.poll(self.now, &mut self.net);
            if o.be.is_none() {
                o.be = o.vol.backend();
            }
            if let Some(be) = o.be.as_mut() {
                let done = &mut o.done;
                be.poll(&mut |c| done.push(c));
            }
            let v = o.vol.lane_version();
            if v != o.seen {
                o.seen = v;
                let mut ups = Vec::new();
                o.vol.lane_updates(1, &mut ups);
                for u in ups {
                    o.updates += 1;
                    self.vol.apply_lane_update(u, self.now, &mut self.net);
                }
            }
        }
        if !lane_first {
            self.lane_pass();
        }
        if self.be.is_none() {
            self.be = self.vol.backend();
        }
        if let Some(be) = self.be.as_mut() {
            let done = &mut self.done;
            be.poll(&mut |c| done.push(c));
        }
    }

    /// Steps until `cond` holds or `limit_ms` of virtual time passed; returns `cond`.
    pub fn run_until(&mut self, limit_ms: u64, mut cond: impl FnMut(&mut Self) -> bool) -> bool {
        let end = self.now + limit_ms * MS;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.step();
        }
        cond(self)
    }

    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms * MS;
        while self.now < end {
            self.step();
        }
    }

    /// Connects and returns once the backend exists and the volume is online.
    pub fn connect(&mut self) {
        assert!(
            self.run_until(5_000, |r| r.be.is_some()
                && r.vol.snapshot().unwrap().state == keel_remote::VolumeState::Online),
            "volume did not come up: {:?}",
            self.vol.snapshot()
        );
    }

    pub fn submit(&mut self, req: BlockRequest) {
        let be = self.be.as_mut().expect("backend");
        be.submit(req).expect("submit");
    }

    /// Runs one request to completion (at most `limit_ms`); returns its result and buffer.
    pub fn io(
        &mut self,
        tag: u64,
        op: BlockOp,
        lba: u64,
        blocks: u32,
        b: Option<IoBuf>,
        limit_ms: u64,
    ) -> (Result<(), BlockError>, Option<IoBuf>) {
        self.submit(req(tag, op, lba, blocks, b));
        assert!(
            self.run_until(limit_ms, |r| r.done.iter().any(|c| c.tag == tag)),
            "request {tag} did not complete"
        );
        let i = self.done.iter().position(|c| c.tag == tag).unwrap();
        let c = self.done.swap_remove(i);
        (c.result, c.buf)
    }

    pub fn write(&mut self, tag: u64, lba: u64, data: &[u8]) -> Result<(), BlockError> {
        let bs = self.be.as_ref().unwrap().geometry().block_size as usize;
        let (r, b) = self.io(
            tag,
            BlockOp::Write { fua: false },
            lba,
            (data.len() / bs) as u32,
            Some(buf_with(data)),
            10_000,
        );
        if let Some(b) = b {
            give(b);
        }
        r
    }

    pub fn read(&mut self, tag: u64, lba: u64, blocks: u32) -> Result<Vec<u8>, BlockError> {
        let bs = self.be.as_ref().unwrap().geometry().block_size as usize;
        let len = blocks as usize * bs;
        let (r, b) = self.io(tag, BlockOp::Read, lba, blocks, Some(buf(len)), 10_000);
        let b = b.expect("buffer back");
        let v = b.as_slice()[..len].to_vec();
        give(b);
        r.map(|_| v)
    }
}

/// Deterministic block contents: every byte depends on the seed, the LBA and its offset.
pub fn pattern(seed: u64, lba: u64, blocks: u32, bs: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((blocks * bs) as usize);
    for b in 0..blocks as u64 {
        let mut x = (seed ^ (lba + b).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        for _ in 0..bs / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

// ---- a verifying workload --------------------------------------------------------------

/// Block contents written by a write with `seed` (0: zeroes, what Write Zeroes, Deallocate
/// and a fresh namespace read as).
pub fn block_of(seed: u64, lba: u64, bs: u32) -> Vec<u8> {
    if seed == 0 {
        vec![0; bs as usize]
    } else {
        pattern(seed, lba, 1, bs)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Write(u64),
    Zero,
    Read,
}

#[derive(Debug)]
pub struct InFlight {
    pub kind: Kind,
    pub lba: u64,
    pub blocks: u32,
}

/// Random reads and writes (no two requests in flight touch the same block) checked against a
/// model: for every block, the contents it may hold. An acknowledged write makes its data
/// the only possibility; a failed write adds its data as a possibility (it may have landed);
/// a read must return one of the possibilities, and narrows them to what it returned.
pub struct Workload {
    pub rng: Rng,
    pub bs: u32,
    pub blocks: u64,
    pub cands: Vec<Vec<u64>>,
    pub inflight: std::collections::HashMap<u64, InFlight>,
    busy: Vec<bool>,
    next_tag: u64,
    next_seed: u64,
    pub max_inflight: usize,
    pub max_blocks: u32,
    pub acked_writes: u64,
    pub failed: u64,
    pub path_errors: u64,
    pub reads_checked: u64,
    pub completed: u64,
    /// Submissions refused with a path error (no path left).
    pub refused: u64,
}

impl Workload {
    pub fn new(seed: u64, bs: u32, blocks: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            bs,
            blocks,
            cands: vec![vec![0]; blocks as usize],
            inflight: Default::default(),
            busy: vec![false; blocks as usize],
            next_tag: 1,
            next_seed: seed.wrapping_mul(1000) + 1,
            max_inflight: 24,
            max_blocks: 64,
            acked_writes: 0,
            failed: 0,
            path_errors: 0,
            reads_checked: 0,
            completed: 0,
            refused: 0,
        }
    }

    /// Submits new requests while there is room.
    pub fn submit(&mut self, rig: &mut Rig) {
        while self.inflight.len() < self.max_inflight {
            let blocks = self.rng.range(1, self.max_blocks as u64) as u32;
            let lba = self.rng.range(0, self.blocks - blocks as u64);
            let r = lba as usize..lba as usize + blocks as usize;
            if self.busy[r.clone()].iter().any(|&b| b) {
                return;
            }
            let roll = self.rng.range(0, 99);
            let kind = if roll < 55 {
                self.next_seed += 1;
                Kind::Write(self.next_seed)
            } else if roll < 60 {
                Kind::Zero
            } else {
                Kind::Read
            };
            let len = (blocks * self.bs) as usize;
            let (op, b) = match kind {
                Kind::Write(s) => (
                    BlockOp::Write {
                        fua: self.rng.chance(10),
                    },
                    Some(buf_with(&pattern(s, lba, blocks, self.bs))),
                ),
                Kind::Zero if self.rng.chance(50) => (BlockOp::Deallocate, None),
                Kind::Zero => (
                    BlockOp::WriteZeroes {
                        deallocate: self.rng.chance(50),
                        fua: false,
                    },
                    None,
                ),
                Kind::Read => (BlockOp::Read, Some(buf(len))),
            };
            let tag = self.next_tag;
            let Some(be) = rig.be.as_mut() else { return };
            match be.submit(req(tag, op, lba, blocks, b)) {
                Ok(()) => {
                    self.next_tag += 1;
                    self.busy[r].iter_mut().for_each(|b| *b = true);
                    self.inflight.insert(tag, InFlight { kind, lba, blocks });
                }
                Err(rej) => {
                    if let Some(b) = rej.req.buf {
                        give(b);
                    }
                    // Busy: try later. Invalid (no path left): count as failed outcome.
                    if let keel_storage::RejectReason::Invalid(e) = rej.reason {
                        assert_eq!(e, BlockError::PathError, "only path errors are refused");
                        self.refused += 1;
                    }
                    return;
                }
            }
        }
    }

    /// Checks and retires completions.
    pub fn reap(&mut self, rig: &mut Rig) {
        for c in std::mem::take(&mut rig.done) {
            let f = self
                .inflight
                .remove(&c.tag)
                .unwrap_or_else(|| panic!("completion for unknown or finished tag {}", c.tag));
            self.completed += 1;
            let r = f.lba as usize..f.lba as usize + f.blocks as usize;
            self.busy[r.clone()].iter_mut().for_each(|b| *b = false);
            let seed = match f.kind {
                Kind::Write(s) => Some(s),
                Kind::Zero => Some(0),
                Kind::Read => None,
            };
            match (c.result, seed) {
                (Ok(()), Some(s)) => {
                    self.acked_writes += 1;
                    for blk in r {
                        self.cands[blk] = vec![s];
                    }
                }
                (Err(e), Some(s)) => {
                    self.failed += 1;
                    if e == BlockError::PathError {
                        self.path_errors += 1;
                    }
                    for blk in r {
                        if !self.cands[blk].contains(&s) {
                            self.cands[blk].push(s);
                        }
                    }
                }
                (Ok(()), None) => {
                    let b = c.buf.as_ref().expect("read buffer back");
                    for (i, blk) in r.enumerate() {
                        let got = &b.as_slice()[i * self.bs as usize..(i + 1) * self.bs as usize];
                        let which = self.cands[blk]
                            .iter()
                            .copied()
                            .find(|&s| block_of(s, blk as u64, self.bs) == got);
                        match which {
                            Some(s) => self.cands[blk] = vec![s],
                            None => panic!(
                                "read of block {blk} (tag {}) returned data no write put there; \
                                 possible: {:?}",
                                c.tag, self.cands[blk]
                            ),
                        }
                    }
                    self.reads_checked += 1;
                }
                (Err(e), None) => {
                    self.failed += 1;
                    if e == BlockError::PathError {
                        self.path_errors += 1;
                    }
                }
            }
            if let Some(b) = c.buf {
                give(b);
            }
        }
    }

    /// One step of the rig with submissions and checks.
    pub fn step(&mut self, rig: &mut Rig) {
        self.submit(rig);
        rig.step();
        self.reap(rig);
    }

    /// Stops submitting and waits for everything in flight (at most `limit_ms`).
    pub fn drain(&mut self, rig: &mut Rig, limit_ms: u64) {
        let end = rig.now + limit_ms * MS;
        while !self.inflight.is_empty() {
            assert!(
                rig.now < end,
                "{} requests never completed: {:?}; volume {:?}",
                self.inflight.len(),
                self.inflight.keys().take(8).collect::<Vec<_>>(),
                rig.vol.snapshot()
            );
            rig.step();
            self.reap(rig);
        }
    }

    /// Every block of the medium holds one of its possible contents.
    pub fn verify(&self, disk: &mut Disk) {
        let per = 256u64;
        let mut lba = 0;
        while lba < self.blocks {
            let n = per.min(self.blocks - lba) as u32;
            let data = disk.read(lba, n);
            for i in 0..n as usize {
                let blk = lba as usize + i;
                let got = &data[i * self.bs as usize..(i + 1) * self.bs as usize];
                assert!(
                    self.cands[blk]
                        .iter()
                        .any(|&s| block_of(s, blk as u64, self.bs) == got),
                    "block {blk} lost its data: possible {:?}",
                    self.cands[blk]
                );
            }
            lba += n as u64;
        }
    }
}
