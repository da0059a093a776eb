//! The NVMe/TCP service: TCP connections from the network stack, the sans-IO NVMe/TCP
//! transport (`keel-nvmf-tcp`) per connection, and the controller core (`keel-controller`)
//! behind all of them. Port 4420 serves the NVM subsystems and the discovery subsystem; port
//! 8009 serves the same target for discovery.
//!
//! Data path per command, all in one poll pass where possible: bytes from the socket are fed to
//! the connection (command capsules, in-capsule and R2T-solicited data land directly in a pool
//! buffer), the command goes to the controller, its completion comes back (at once or from
//! `Target::poll`) and the connection turns it into C2HData/CapsuleResp PDUs written straight
//! into the socket's transmit buffer. Buffers come from one pre-allocated pool; a command that
//! finds the pool empty waits in a per-connection queue without stalling other connections.

use crate::net::{Accepted, NetStack};
use alloc::{collections::VecDeque, format, string::String, vec::Vec};
use keel_controller::{
    Event as CoreEvent, Instant, NamespaceConfig, PortEntry, QueueId, QueueLoss, Request, Response,
    SubsystemConfig, Target, TargetConfig,
};
use keel_nvme::{Sqe, Status};
use keel_nvmf_tcp::{Event as TcpEvent, TargetConfig as TcpConfig, TargetConnection, TargetState};
use keel_storage::{BufPool, IoBuf, RamBackend};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// Largest transfer per command (MDTS 5 with 4 KiB pages = 128 KiB).
const MAX_TRANSFER: usize = 128 * 1024;
/// Data buffers shared by every connection.
const POOL_BUFFERS: usize = 256;
/// Command slots per connection (the largest queue depth a host can get).
const SLOTS: u16 = 128;

/// An [`IoBuf`] as the transport sees it: its valid bytes.
#[derive(Debug)]
pub struct NetBuf(IoBuf);

impl AsRef<[u8]> for NetBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl AsMut<[u8]> for NetBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// Work a connection could not start because the buffer pool was empty.
#[derive(Debug)]
enum Waiting {
    /// Host-to-controller data needs a buffer.
    Buffer { cid: u16, len: u32 },
    /// A command that returns data needs a buffer.
    Command { sqe: [u8; 64], data_len: u32 },
}

impl Waiting {
    fn len(&self) -> u32 {
        match self {
            Waiting::Buffer { len, .. } | Waiting::Command { data_len: len, .. } => *len,
        }
    }
}

struct Conn {
    /// Index in `NvmfService::conns`, the cookie of its requests.
    slot: u32,
    socket: SocketHandle,
    tcp: TargetConnection<NetBuf>,
    queue: QueueId,
    depth_set: bool,
    /// The host disabled SQ flow control at Connect (C2HData SUCCESS may end a read).
    fc_disabled: bool,
    waiting: VecDeque<Waiting>,
    closing: bool,
}

/// What the development configuration serves, from the boot arguments (the signed
/// configuration bundle replaces this on provisioned devices).
///
/// - `keel.nqn=NQN`: the subsystem NQN (default `nqn.2026-11.dev.keel:default`);
/// - `keel.ram=256[,64...]`: one RAM namespace per size in MiB (default one of 256 MiB);
/// - `keel.bs=512|4096`: logical block size (default 512);
/// - `keel.allow=NQN[,NQN...]`: host NQNs allowed to connect (default: any host);
/// - `keel.advertise=ADDR:PORT`: the NVMe/TCP address the discovery log page reports
///   (default: the interface's own address and port 4420). `qemu/run` sets it to the
///   forwarded host port so hosts that follow discovery entries reach the target.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Size in bytes of each RAM namespace (NSID 1, 2, ...).
    pub namespaces: Vec<u64>,
    /// Logical block size.
    pub block_size: u32,
    /// Allowed host NQNs; empty means any host.
    pub allowed_hosts: Vec<String>,
    /// The NIC's MAC address (makes identifiers unique per device).
    pub mac: [u8; 6],
    /// Address and port to advertise in the discovery log instead of the interface's own.
    pub advertise: Option<(String, String)>,
}

impl Defaults {
    /// Reads the boot arguments; anything malformed falls back to the default.
    pub fn from_bootargs(args: &str, mac: [u8; 6]) -> Self {
        let get = |key: &str| args.split_whitespace().find_map(|a| a.strip_prefix(key));
        let hex: String = mac.iter().map(|b| format!("{b:02X}")).collect();
        let mut namespaces: Vec<u64> = get("keel.ram=")
            .map(|list| {
                list.split(',')
                    .filter_map(|s| {
                        s.trim_end_matches("MiB")
                            .trim_end_matches('M')
                            .parse::<u64>()
                            .ok()
                    })
                    .filter(|m| (1..=65536).contains(m))
                    .map(|m| m << 20)
                    .take(16)
                    .collect()
            })
            .unwrap_or_default();
        if namespaces.is_empty() {
            namespaces.push(256 << 20);
        }
        Self {
            nqn: get("keel.nqn=")
                .filter(|n| n.starts_with("nqn.") && n.len() <= 223)
                .unwrap_or("nqn.2026-11.dev.keel:default")
                .into(),
            serial: format!("KEEL{hex}"),
            namespaces,
            block_size: match get("keel.bs=") {
                Some("4096") => 4096,
                _ => 512,
            },
            allowed_hosts: get("keel.allow=")
                .map(|l| {
                    l.split(',')
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            mac,
            advertise: get("keel.advertise=").and_then(|a| {
                let (addr, port) = a.rsplit_once(':')?;
                (addr.parse::<smoltcp::wire::Ipv4Address>().is_ok() && port.parse::<u16>().is_ok())
                    .then(|| (String::from(addr), String::from(port)))
            }),
        }
    }
}

/// The NVMe/TCP target service.
pub struct NvmfService {
    target: Target,
    pool: BufPool,
    conns: Vec<Option<Conn>>,
    tcp_cfg: TcpConfig,
    ports_set_for: Option<smoltcp::wire::Ipv4Address>,
    advertise: Option<(String, String)>,
    /// Connections refused because no queue could be opened.
    pub refused: u64,
}

impl core::fmt::Debug for NvmfService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvmfService")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// Why the service could not start.
#[derive(Debug)]
pub enum NvmfError {
    /// The RAM namespace could not be made.
    Ram(keel_storage::ram::RamError),
    /// The controller configuration was refused.
    Config(keel_controller::ConfigError),
    /// The buffer pool could not be made.
    Pool(keel_storage::PoolError),
}

impl core::fmt::Display for NvmfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Ram(e) => write!(f, "RAM namespace: {e}"),
            Self::Config(e) => write!(f, "target configuration: {e}"),
            Self::Pool(e) => write!(f, "buffer pool: {e}"),
        }
    }
}

fn ms(now_ns: u64) -> u64 {
    now_ns / 1_000_000
}

impl NvmfService {
    /// Builds the target from the development defaults.
    pub fn new(d: &Defaults) -> Result<Self, NvmfError> {
        let mut namespaces = Vec::new();
        for (i, bytes) in d.namespaces.iter().enumerate() {
            let nsid = i as u32 + 1;
            let blocks = bytes / u64::from(d.block_size);
            let ram = RamBackend::new(d.block_size, blocks, 4096).map_err(NvmfError::Ram)?;
            // NGUID: "KEEL", the MAC, the NSID: unique per device and namespace, stable
            // across boots.
            let mut nguid = [0u8; 16];
            nguid[..4].copy_from_slice(b"KEEL");
            nguid[4..10].copy_from_slice(&d.mac);
            nguid[12..].copy_from_slice(&nsid.to_be_bytes());
            namespaces.push(NamespaceConfig {
                nsid,
                backend: alloc::boxed::Box::new(ram),
                nguid,
                uuid: [0; 16],
                eui64: [0; 8],
            });
        }
        let cfg = TargetConfig {
            subsystems: alloc::vec![SubsystemConfig {
                nqn: d.nqn.clone(),
                serial: d.serial.clone(),
                model: String::from("Keel NVMe/TCP target"),
                allowed_hosts: d.allowed_hosts.clone(),
                namespaces,
            }],
            ..Default::default()
        };
        let target = Target::new(cfg).map_err(NvmfError::Config)?;
        let region = alloc::vec![0u8; POOL_BUFFERS * MAX_TRANSFER].leak();
        let dma = region.as_ptr() as u64;
        let pool = BufPool::new(region, dma, MAX_TRANSFER).map_err(NvmfError::Pool)?;
        let tcp_cfg = TcpConfig {
            slots: SLOTS,
            max_transfer: MAX_TRANSFER as u32,
            ..Default::default()
        };
        Ok(Self {
            target,
            pool,
            conns: Vec::new(),
            tcp_cfg,
            ports_set_for: None,
            advertise: d.advertise.clone(),
            refused: 0,
        })
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    fn adopt(&mut self, a: Accepted, now_ns: u64, net: &mut NetStack) {
        let (tcp, queue) = match (
            TargetConnection::new(self.tcp_cfg, ms(now_ns)),
            self.target.open_queue(),
        ) {
            (Ok(t), Ok(q)) => (t, q),
            (_, Ok(q)) => {
                let _ = self.target.close_queue(q);
                self.refused += 1;
                net.release(a.handle, false, now_ns);
                return;
            }
            _ => {
                self.refused += 1;
                net.release(a.handle, false, now_ns);
                return;
            }
        };
        let slot = self
            .conns
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.conns.len());
        let conn = Conn {
            slot: slot as u32,
            socket: a.handle,
            tcp,
            queue,
            depth_set: false,
            fc_disabled: false,
            waiting: VecDeque::new(),
            closing: false,
        };
        match self.conns.get_mut(slot) {
            Some(free) => *free = Some(conn),
            None => self.conns.push(Some(conn)),
        }
    }

    /// One pass: adopt new connections, move bytes and commands, deliver completions.
    /// Returns whether anything happened.
    pub fn poll(&mut self, now_ns: u64, net: &mut NetStack) -> bool {
        let mut busy = false;
        self.update_ports(net);
        let accepted: Vec<Accepted> = net.take_accepted().collect();
        for a in accepted {
            busy = true;
            self.adopt(a, now_ns, net);
        }
        let now = Instant::from_nanos(now_ns);
        for i in 0..self.conns.len() {
            busy |= self.poll_conn(i, now, net);
        }
        // Completions of commands that went pending.
        let Self {
            target,
            conns,
            pool,
            ..
        } = self;
        busy |= target.poll(now, &mut |ev| match ev {
            CoreEvent::Completion(_, resp) => {
                let idx = resp.cookie as usize;
                match conns.get_mut(idx).and_then(Option::as_mut) {
                    Some(c) => c.deliver(pool, resp),
                    None => recycle(pool, resp.buf),
                }
            }
            CoreEvent::QueueTerminated(q) => {
                if let Some(c) = conns.iter_mut().flatten().find(|c| c.queue == q) {
                    c.tcp.close();
                    c.closing = true;
                }
            }
            CoreEvent::BufferReleased(b) => recycle(pool, Some(b)),
        }) > 0;
        // Flush what the completions produced.
        for c in self.conns.iter_mut().flatten() {
            c.flush(net);
        }
        busy
    }

    fn update_ports(&mut self, net: &NetStack) {
        let Some(addr) = net.address().map(|c| c.address()) else {
            return;
        };
        if self.ports_set_for == Some(addr) {
            return;
        }
        self.ports_set_for = Some(addr);
        let entry = match &self.advertise {
            Some((a, p)) => PortEntry::tcp_ipv4(a, p, 1),
            None => PortEntry::tcp_ipv4(&format!("{addr}"), "4420", 1),
        };
        self.target.set_ports(alloc::vec![entry]);
    }

    fn poll_conn(&mut self, i: usize, now: Instant, net: &mut NetStack) -> bool {
        let Some(c) = self.conns[i].as_mut() else {
            return false;
        };
        let now_ms = now.as_millis();
        let mut busy = false;
        let mut cx = Ctx {
            target: &mut self.target,
            pool: &mut self.pool,
            now,
        };
        let sock = net.sockets.get_mut::<tcp::Socket>(c.socket);
        // Receive: feed the transport until it stops taking bytes (it stops early when it
        // needs a buffer from us).
        while sock.can_recv() && !c.closing {
            let taken = sock.recv(|bytes| {
                let n = c.tcp.recv(now_ms, bytes);
                (n, n)
            });
            match taken {
                Ok(0) | Err(_) => break,
                Ok(_) => busy = true,
            }
            busy |= c.handle_events(&mut cx);
        }
        busy |= c.handle_events(&mut cx);
        busy |= c.retry_waiting(&mut cx);
        c.tcp.poll_timers(now_ms);
        c.flush(net);
        let sock = net.sockets.get_mut::<tcp::Socket>(c.socket);
        // The peer is gone once it reset the connection (or it timed out), or once it closed
        // its side and we have consumed everything (a half-closed host sends no more
        // commands): the first is an abrupt loss, the second an orderly close (Linux closes
        // its I/O queues with a FIN before shutting the controller down on the admin queue).
        let loss = match sock.state() {
            tcp::State::Closed => Some(QueueLoss::Abrupt),
            tcp::State::TimeWait => Some(QueueLoss::Orderly),
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing
                if !sock.can_recv() =>
            {
                Some(QueueLoss::Orderly)
            }
            // The transport ended the connection (fatal error, ICReq timeout) and its last
            // PDU (a C2HTermReq) has left.
            _ if c.tcp.state() == TargetState::Closed && sock.send_queue() == 0 => {
                Some(QueueLoss::Abrupt)
            }
            _ => None,
        };
        if let Some(how) = loss {
            let c = self.conns[i].take().expect("checked above");
            let _ = self.target.close_queue_after(c.queue, how);
            drain_buffers(c.tcp, &mut self.pool);
            net.release(c.socket, true, now.as_nanos());
            busy = true;
        }
        busy
    }
}

fn recycle(pool: &mut BufPool, buf: Option<IoBuf>) {
    if let Some(b) = buf {
        let _ = pool.put(b);
    }
}

fn drain_buffers(mut tcp: TargetConnection<NetBuf>, pool: &mut BufPool) {
    tcp.close();
    while let Some(ev) = tcp.poll_event() {
        match ev {
            TcpEvent::Command { buf, .. } | TcpEvent::CommandFailed { buf, .. } => {
                recycle(pool, buf.map(|b| b.0))
            }
            TcpEvent::BufferReleased { buf, .. } => recycle(pool, Some(buf.0)),
            _ => {}
        }
    }
}

/// A pool buffer with `len` valid bytes, if the pool has one.
fn take(pool: &mut BufPool, len: u32) -> Option<IoBuf> {
    let mut b = pool.get()?;
    if (len as usize) > b.capacity() {
        let _ = pool.put(b);
        return None;
    }
    b.set_len(len as usize);
    Some(b)
}

/// What a connection's command handling needs besides the connection itself.
struct Ctx<'a> {
    target: &'a mut Target,
    pool: &'a mut BufPool,
    now: Instant,
}

impl Conn {
    /// Hands a controller response to the transport.
    fn deliver(&mut self, pool: &mut BufPool, resp: Response) {
        let cqe = resp.cqe.to_bytes();
        let data = match resp.buf {
            Some(b) if resp.data_len > 0 => Some((NetBuf(b), resp.data_len)),
            other => {
                recycle(pool, other);
                None
            }
        };
        if let Err(rejected) = self.tcp.complete(cqe, data, self.fc_disabled) {
            recycle(pool, rejected.buf.map(|b| b.0));
        }
    }

    fn submit(&mut self, cx: &mut Ctx<'_>, sqe: [u8; 64], buf: Option<IoBuf>, data_len: u32) {
        let req = Request {
            sqe: Sqe::from_bytes(&sqe),
            buf,
            data_len,
            cookie: self.slot,
        };
        let resp = cx.target.submit(cx.now, self.queue, req);
        // After a successful Connect the queue's depth and flow-control mode are known.
        if !self.depth_set
            && let Some(info) = cx.target.queue_info(self.queue)
        {
            self.tcp.set_queue_depth(info.sqsize.saturating_add(1));
            self.fc_disabled = info.sq_flow_control_disabled;
            self.depth_set = true;
        }
        if let Some(resp) = resp {
            self.deliver(cx.pool, resp);
        }
    }

    /// Fails a command the transport rejected, with the status it chose; the controller core
    /// accounts its submission queue slot.
    fn fail(&mut self, cx: &mut Ctx<'_>, sqe: &[u8; 64], status: keel_nvmf_tcp::Status) {
        let mut st = Status::new(status.sct, status.sc);
        st.dnr = status.dnr;
        let req = Request {
            sqe: Sqe::from_bytes(sqe),
            buf: None,
            data_len: 0,
            cookie: self.slot,
        };
        let resp = cx.target.reject(cx.now, self.queue, req, st);
        self.deliver(cx.pool, resp);
    }

    /// Starts work that needs a buffer, or queues it until the pool has one. Work already
    /// waiting goes first, so commands keep their order.
    fn start(&mut self, cx: &mut Ctx<'_>, w: Waiting) {
        let buf = if self.waiting.is_empty() {
            take(cx.pool, w.len())
        } else {
            None
        };
        match buf {
            Some(b) => self.begin(cx, w, b),
            None => self.waiting.push_back(w),
        }
    }

    fn begin(&mut self, cx: &mut Ctx<'_>, w: Waiting, b: IoBuf) {
        match w {
            Waiting::Buffer { cid, .. } => {
                if let Err(r) = self.tcp.provide_buffer(cid, NetBuf(b)) {
                    recycle(cx.pool, r.buf.map(|b| b.0));
                }
            }
            Waiting::Command { sqe, data_len } => self.submit(cx, sqe, Some(b), data_len),
        }
    }

    /// Starts waiting work, oldest first, while the pool has buffers; returns whether any
    /// started.
    fn retry_waiting(&mut self, cx: &mut Ctx<'_>) -> bool {
        let mut any = false;
        while let Some(len) = self.waiting.front().map(Waiting::len) {
            let Some(b) = take(cx.pool, len) else { break };
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            any = true;
            self.begin(cx, w, b);
        }
        any
    }

    /// Acts on the transport's events; returns whether there were any.
    fn handle_events(&mut self, cx: &mut Ctx<'_>) -> bool {
        let mut any = false;
        while let Some(ev) = self.tcp.poll_event() {
            any = true;
            match ev {
                TcpEvent::Connected { .. } => {}
                TcpEvent::NeedBuffer { cid, len } => self.start(cx, Waiting::Buffer { cid, len }),
                TcpEvent::Command {
                    sqe,
                    buf: Some(b),
                    data_len,
                } => self.submit(cx, sqe, Some(b.0), data_len),
                TcpEvent::Command {
                    sqe,
                    buf: None,
                    data_len: 0,
                } => self.submit(cx, sqe, None, 0),
                TcpEvent::Command {
                    sqe,
                    buf: None,
                    data_len,
                } => self.start(cx, Waiting::Command { sqe, data_len }),
                TcpEvent::CommandFailed { sqe, buf, status } => {
                    recycle(cx.pool, buf.map(|b| b.0));
                    self.fail(cx, &sqe, status);
                }
                TcpEvent::BufferReleased { buf, .. } => recycle(cx.pool, Some(buf.0)),
                TcpEvent::Closed { .. } => self.closing = true,
            }
        }
        any
    }

    /// Moves the connection's pending PDUs into the socket's transmit buffer.
    fn flush(&mut self, net: &mut NetStack) {
        let sock = net.sockets.get_mut::<tcp::Socket>(self.socket);
        while self.tcp.wants_transmit() && sock.can_send() {
            let sent = sock.send(|out| {
                let n = self.tcp.transmit(out);
                (n, n)
            });
            if !matches!(sent, Ok(n) if n > 0) {
                break;
            }
        }
    }
}
