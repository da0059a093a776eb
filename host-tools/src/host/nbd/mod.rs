//! An NBD server exporting one namespace of the emulated function, serving many requests at
//! once: one thread runs the NVMe driver and every client socket (non-blocking, `poll(2)`),
//! the way an SPDK target runs its reactor.
//!
//! - Requests are parsed as they arrive ([`proto`]) and become NVMe commands at once, up to
//!   `--qd` NBD requests per client and as many commands as the function's queues hold;
//!   replies go out in completion order, matched by handle (simple replies, which NBD
//!   allows out of order). `NBD_FLAG_CAN_MULTI_CONN` is offered: every connection reaches the
//!   same controller.
//! - READ and WRITE become Read and Write (FUA from `NBD_CMD_FLAG_FUA`), FLUSH becomes Flush,
//!   TRIM Dataset Management (deallocate), WRITE_ZEROES Write Zeroes (deallocate allowed
//!   unless `NBD_CMD_FLAG_NO_HOLE`), each split into commands of at most the largest transfer
//!   (65536 blocks for trim and write zeroes).
//! - Data moves between the socket and buffers in the window's host area: a write's payload is
//!   received straight into the buffers the Write commands point at, and a read's reply is
//!   sent from the buffers the Read commands filled (`writev`), so user space copies no data.
//!   A request gets all its buffers at once (first come, first served), so requests never
//!   hold part of the pool while waiting for the rest; the largest payload advertised is what
//!   the pool holds (at most 32 MiB).

pub mod proto;

use super::driver::{HostBackend, HostController};
use anyhow::{Context, Result, bail};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockOp, BlockRequest, BufPool, IoBuf, RejectReason,
};
use proto::{Command, Export, Negotiation, Outcome, RequestHeader, errno, tf};
use std::collections::{BTreeSet, VecDeque};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Largest payload ever advertised (the reference server's limit).
const MAX_PAYLOAD: usize = 32 << 20;
/// Blocks of one Write Zeroes or Dataset Management command.
const ZERO_PART_BLOCKS: u64 = 65536;
/// Receive staging buffer per client.
const RX_BUF: usize = 64 << 10;

/// What the server serves and how much at once.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Namespace.
    pub nsid: u32,
    /// Clients connected at once (more wait in the listen backlog).
    pub clients: usize,
    /// NBD requests in flight per client (0: the controller's queue depth).
    pub requests_per_client: usize,
    /// Data buffers of the largest transfer size in the window (0: as many as 32 MiB takes,
    /// or what the window has room for).
    pub buffers: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            nsid: 1,
            clients: 16,
            requests_per_client: 0,
            buffers: 0,
        }
    }
}

/// Counters of a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Clients that reached transmission.
    pub clients: u64,
    /// Requests replied to.
    pub requests: u64,
    /// Most NBD requests open at once (received, not yet replied), all clients.
    pub peak_requests: usize,
    /// Most NVMe commands outstanding at once.
    pub peak_commands: usize,
    /// Replies sent while an older request of the same client was still open.
    pub out_of_order: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Trim,
    Zero { may_trim: bool, fua: bool },
}

#[derive(Debug)]
struct Req {
    conn: usize,
    seq: u64,
    handle: u64,
    op: Op,
    lba: u64,
    blocks: u64,
    per_part: u64,
    parts: u32,
    /// One buffer per part (READ, WRITE), once granted.
    bufs: Vec<Option<IoBuf>>,
    /// Parts that may be submitted (a WRITE: those whose payload arrived).
    ready: u32,
    submitted: u32,
    done: u32,
    errno: u32,
}

impl Req {
    fn has_data(&self) -> bool {
        matches!(self.op, Op::Read | Op::Write { .. })
    }

    fn part(&self, p: u32) -> (u64, u32) {
        let lba = self.lba + p as u64 * self.per_part;
        let n = self.per_part.min(self.lba + self.blocks - lba);
        (lba, n as u32)
    }
}

#[derive(Debug)]
enum Rx {
    /// Waiting for a request header.
    Header,
    /// A WRITE's payload waits for its buffers.
    AwaitBuffers { req: usize },
    /// Receiving a WRITE's payload into part `part`, `filled` bytes so far.
    Payload {
        req: usize,
        part: u32,
        filled: usize,
    },
    /// Skipping the payload of a refused WRITE.
    Discard(u64),
}

#[derive(Debug)]
enum Out {
    Bytes(Vec<u8>),
    Reply {
        header: [u8; proto::REPLY_LEN],
        /// The READ whose data follows.
        data: Option<usize>,
    },
}

#[derive(Debug)]
struct Conn {
    sock: TcpStream,
    peer: SocketAddr,
    neg: Option<Negotiation>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    state: Rx,
    tx: VecDeque<Out>,
    tx_off: usize,
    /// Sequence numbers of requests received and not replied to.
    open: BTreeSet<u64>,
    next_seq: u64,
    /// The peer may still send.
    reading: bool,
    /// The socket failed: replies are dropped.
    dead: bool,
}

impl Conn {
    fn rx_data(&self) -> &[u8] {
        &self.rx[self.rx_start..self.rx_end]
    }

    fn finished(&self) -> bool {
        self.open.is_empty() && (self.dead || (!self.reading && self.tx.is_empty()))
    }
}

/// The server: one controller, one listener, many clients.
pub struct Server {
    ctrl: HostController,
    be: HostBackend,
    pool: BufPool,
    listener: TcpListener,
    export: Export,
    cfg: NbdConfig,
    per_client: usize,
    chunk_blocks: u64,
    conns: Vec<Option<Conn>>,
    reqs: Vec<Option<Req>>,
    free_reqs: Vec<usize>,
    /// Requests waiting for data buffers, first come first served.
    buf_wait: VecDeque<usize>,
    /// Requests with parts left to submit.
    to_submit: VecDeque<usize>,
    open_reqs: usize,
    commands: usize,
    stats: Stats,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.export)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

impl Server {
    /// A server for namespace `cfg.nsid` of `ctrl`, accepting on `listener`.
    pub fn new(ctrl: HostController, listener: TcpListener, cfg: NbdConfig) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let be = ctrl.backend(cfg.nsid)?;
        let g = be.geometry();
        let caps = be.capabilities();
        let chunk = ctrl.max_transfer() as usize;
        let info = ctrl.info();
        let depth = info.io_queues as usize * (info.queue_depth as usize - 1);
        let buffers = match cfg.buffers {
            0 => (MAX_PAYLOAD / chunk)
                .min(ctrl.window().unallocated() / chunk.next_multiple_of(4096))
                .max(depth.min(8)),
            n => n,
        };
        let pool = ctrl.buffers(buffers, chunk)?;
        let mut flags = tf::SEND_FLUSH | tf::CAN_MULTI_CONN;
        if caps.fua {
            flags |= tf::SEND_FUA;
        }
        if caps.deallocate {
            flags |= tf::SEND_TRIM;
        }
        if caps.write_zeroes {
            flags |= tf::SEND_WRITE_ZEROES;
        }
        let export = Export {
            size: g.blocks * g.block_size as u64,
            block_size: g.block_size,
            max_payload: (buffers * chunk).min(MAX_PAYLOAD) as u32,
            flags,
        };
        Ok(Self {
            per_client: match cfg.requests_per_client {
                0 => info.queue_depth as usize - 1,
                n => n,
            },
            chunk_blocks: (chunk / g.block_size as usize).max(1) as u64,
            ctrl,
            be,
            pool,
            listener,
            export,
            cfg,
            conns: Vec::new(),
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            buf_wait: VecDeque::new(),
            to_submit: VecDeque::new(),
            open_reqs: 0,
            commands: 0,
            stats: Stats::default(),
        })
    }

    /// The export.
    pub fn export(&self) -> Export {
        self.export
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Serves until `stop` is set, then stops reading, lets what is in flight finish
    /// (bounded by the controller's timeout), and closes every connection.
    pub fn serve(&mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            if !self.turn()? {
                self.idle();
            }
        }
        for c in self.conns.iter_mut().flatten() {
            c.reading = false;
        }
        let deadline = Instant::now() + self.ctrl.timeout();
        while self.commands > 0 || self.conns.iter().flatten().any(|c| !c.finished()) {
            if Instant::now() >= deadline {
                bail!("{} command(s) still outstanding at shutdown", self.commands);
            }
            if !self.turn()? {
                self.idle();
            }
        }
        self.conns.clear();
        Ok(())
    }

    /// Shuts the controller down.
    pub fn shutdown(mut self) -> Result<()> {
        self.ctrl.shutdown()
    }

    /// One pass over everything; true if anything moved.
    fn turn(&mut self) -> Result<bool> {
        let mut moved = self.accept()?;
        for i in 0..self.conns.len() {
            moved |= self.service(i);
        }
        moved |= self.grant_buffers();
        moved |= self.submit();
        moved |= self.reap();
        for i in 0..self.conns.len() {
            moved |= self.send(i);
            if self.conns[i].as_ref().is_some_and(Conn::finished) {
                self.conns[i] = None;
            }
        }
        Ok(moved)
    }

    /// Nothing moved: wait for an interrupt while commands are outstanding, else for a
    /// socket.
    fn idle(&mut self) {
        if self.commands > 0 {
            let until = Instant::now() + Duration::from_micros(200);
            self.ctrl.interrupts().wait(until);
            return;
        }
        let mut fds = Vec::new();
        if self.conns.iter().flatten().count() < self.cfg.clients {
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for c in self.conns.iter().flatten() {
            let mut events = 0;
            if c.reading && !matches!(c.state, Rx::AwaitBuffers { .. }) {
                events |= libc::POLLIN;
            }
            if !c.tx.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.sock.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50);
        }
    }

    fn accept(&mut self) -> Result<bool> {
        if self.conns.iter().flatten().count() >= self.cfg.clients {
            return Ok(false);
        }
        let (sock, peer) = match self.listener.accept() {
            Ok(x) => x,
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) => return Err(e).context("accept"),
        };
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let (neg, greeting) = Negotiation::new(self.export);
        let c = Conn {
            sock,
            peer,
            neg: Some(neg),
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            state: Rx::Header,
            tx: VecDeque::from([Out::Bytes(greeting)]),
            tx_off: 0,
            open: BTreeSet::new(),
            next_seq: 0,
            reading: true,
            dead: false,
        };
        match self.conns.iter().position(Option::is_none) {
            Some(i) => self.conns[i] = Some(c),
            None => self.conns.push(Some(c)),
        }
        Ok(true)
    }

    fn drop_conn(&mut self, i: usize, why: &str) {
        if let Some(c) = self.conns[i].as_mut() {
            if !c.dead {
                eprintln!("keelctl host nbd: client {}: {why}", c.peer);
            }
            c.dead = true;
            c.reading = false;
            c.tx.clear();
            c.tx_off = 0;
        }
        // A WRITE whose payload will never arrive in full: what reached the controller
        // finishes first (the controller owns those buffers), the rest is dropped now.
        let partial = match self.conns[i].as_mut().map(|c| &c.state) {
            Some(Rx::AwaitBuffers { req } | Rx::Payload { req, .. }) => Some(*req),
            _ => None,
        };
        if let Some(c) = self.conns[i].as_mut() {
            c.state = Rx::Header;
        }
        let Some(id) = partial else { return };
        let Some(r) = self.reqs[id].as_mut() else {
            return;
        };
        if r.submitted == 0 {
            self.buf_wait.retain(|&x| x != id);
            self.to_submit.retain(|&x| x != id);
            self.release(id);
            return;
        }
        r.parts = r.submitted;
        r.ready = r.submitted;
        r.errno = errno::EIO;
        for b in r.bufs.drain(r.parts as usize..).flatten() {
            let _ = self.pool.put(b);
        }
        if r.done == r.parts {
            self.to_submit.retain(|&x| x != id);
            self.finish(id);
        }
    }

    /// Receives and parses what client `i` sent.
    fn service(&mut self, i: usize) -> bool {
        let mut moved = false;
        loop {
            let Some(c) = self.conns[i].as_ref() else {
                return moved;
            };
            if !c.reading {
                return moved;
            }
            match self.parse(i) {
                Ok(true) => {
                    moved = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    self.drop_conn(i, &e.to_string());
                    return true;
                }
            }
            // Nothing more to parse: receive.
            match self.receive(i) {
                Ok(0) => return moved,
                Ok(_) => moved = true,
                Err(e) => {
                    self.drop_conn(i, &format!("{e:#}"));
                    return true;
                }
            }
        }
    }

    /// Receives into the staging buffer, or straight into a WRITE's buffer when nothing is
    /// staged. Returns the bytes received (0: nothing now); end of stream stops reading.
    fn receive(&mut self, i: usize) -> Result<usize> {
        let Some(c) = self.conns[i].as_mut() else {
            return Ok(0);
        };
        match c.state {
            Rx::AwaitBuffers { .. } => return Ok(0),
            Rx::Header if c.open.len() >= self.per_client => return Ok(0),
            _ => {}
        }
        let direct = match c.state {
            Rx::Payload { req, part, filled } if c.rx_start == c.rx_end => {
                Some((req, part, filled))
            }
            _ => None,
        };
        let r = match direct {
            Some((req, part, filled)) => {
                let r = self.reqs[req].as_mut().context("request gone")?;
                let (_, n) = r.part(part);
                let want = n as usize * self.export.block_size as usize;
                let buf = r.bufs[part as usize].as_mut().context("no buffer")?;
                match c.sock.read(&mut buf.as_mut_slice()[filled..want]) {
                    Ok(k) if k > 0 => {
                        self.payload_progress(i, req, part, filled + k, want);
                        Ok(k)
                    }
                    x => x,
                }
            }
            None => {
                if c.rx_start == c.rx_end {
                    (c.rx_start, c.rx_end) = (0, 0);
                } else if c.rx_end == c.rx.len() {
                    c.rx.copy_within(c.rx_start..c.rx_end, 0);
                    (c.rx_start, c.rx_end) = (0, c.rx_end - c.rx_start);
                }
                let end = c.rx_end;
                match c.sock.read(&mut c.rx[end..]) {
                    Ok(k) => {
                        c.rx_end += k;
                        Ok(k)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match r {
            Ok(0) => {
                let mid_payload = self.conns[i]
                    .as_ref()
                    .is_some_and(|c| matches!(c.state, Rx::Payload { .. }));
                if mid_payload {
                    self.drop_conn(i, "connection closed in the middle of a write's payload");
                } else if let Some(c) = self.conns[i].as_mut() {
                    c.reading = false;
                }
                Ok(0)
            }
            Ok(k) => Ok(k),
            Err(e) if would_block(&e) => Ok(0),
            Err(e) => Err(e).context("receive"),
        }
    }

    /// `filled` of `want` bytes of a WRITE's part have arrived.
    fn payload_progress(&mut self, i: usize, req: usize, part: u32, filled: usize, want: usize) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        if filled < want {
            c.state = Rx::Payload { req, part, filled };
            return;
        }
        let Some(r) = self.reqs[req].as_mut() else {
            return;
        };
        r.ready = part + 1;
        c.state = if part + 1 == r.parts {
            Rx::Header
        } else {
            Rx::Payload {
                req,
                part: part + 1,
                filled: 0,
            }
        };
        if !self.to_submit.contains(&req) {
            self.to_submit.push_back(req);
        }
    }

    /// Parses one step of client `i`'s staged bytes; true if something was consumed.
    fn parse(&mut self, i: usize) -> Result<bool> {
        let c = self.conns[i].as_mut().context("connection gone")?;
        if let Some(neg) = c.neg.as_mut() {
            let mut out = Vec::new();
            let (used, outcome) = neg.input(&c.rx[c.rx_start..c.rx_end], &mut out)?;
            c.rx_start += used;
            if !out.is_empty() {
                c.tx.push_back(Out::Bytes(out));
            }
            match outcome {
                Outcome::Pending => return Ok(used > 0),
                Outcome::Transmission => {
                    c.neg = None;
                    self.stats.clients += 1;
                }
                Outcome::Abort => c.reading = false,
            }
            return Ok(true);
        }
        match c.state {
            Rx::AwaitBuffers { .. } => Ok(false),
            Rx::Discard(n) => {
                let k = (n as usize).min(c.rx_end - c.rx_start);
                c.rx_start += k;
                c.state = match n - k as u64 {
                    0 => Rx::Header,
                    left => Rx::Discard(left),
                };
                Ok(k > 0 || n == 0)
            }
            Rx::Payload { req, part, filled } => {
                let r = self.reqs[req].as_mut().context("request gone")?;
                let (_, n) = r.part(part);
                let want = n as usize * self.export.block_size as usize;
                let k = (want - filled).min(c.rx_end - c.rx_start);
                if k == 0 {
                    return Ok(false);
                }
                let buf = r.bufs[part as usize].as_mut().context("no buffer")?;
                buf.as_mut_slice()[filled..filled + k]
                    .copy_from_slice(&c.rx[c.rx_start..c.rx_start + k]);
                c.rx_start += k;
                self.payload_progress(i, req, part, filled + k, want);
                Ok(true)
            }
            Rx::Header => {
                if c.open.len() >= self.per_client {
                    return Ok(false);
                }
                let Some(h) = RequestHeader::parse(c.rx_data())? else {
                    return Ok(false);
                };
                c.rx_start += proto::REQUEST_LEN;
                self.request(i, h);
                Ok(true)
            }
        }
    }

    /// A request header from client `i`.
    fn request(&mut self, i: usize, h: RequestHeader) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let seq = c.next_seq;
        c.next_seq += 1;
        let (op, lba, blocks) = match Command::classify(&h, &self.export) {
            Command::Disconnect => {
                c.reading = false;
                return;
            }
            Command::Refuse { errno } => {
                c.state = match h.payload() {
                    0 => Rx::Header,
                    n => Rx::Discard(n as u64),
                };
                c.tx.push_back(Out::Reply {
                    header: proto::simple_reply(errno, h.handle),
                    data: None,
                });
                self.stats.requests += 1;
                return;
            }
            Command::Nothing => {
                c.tx.push_back(Out::Reply {
                    header: proto::simple_reply(0, h.handle),
                    data: None,
                });
                self.stats.requests += 1;
                return;
            }
            Command::Read { lba, blocks } => (Op::Read, lba, blocks),
            Command::Write { lba, blocks, fua } => (Op::Write { fua }, lba, blocks),
            Command::Flush => (Op::Flush, 0, 0),
            Command::Trim { lba, blocks } => (Op::Trim, lba, blocks),
            Command::WriteZeroes {
                lba,
                blocks,
                may_trim,
                fua,
            } => (Op::Zero { may_trim, fua }, lba, blocks),
        };
        let per_part = match op {
            Op::Read | Op::Write { .. } => self.chunk_blocks,
            Op::Flush => 1,
            Op::Trim | Op::Zero { .. } => ZERO_PART_BLOCKS,
        };
        let parts = if op == Op::Flush {
            1
        } else {
            blocks.div_ceil(per_part) as u32
        };
        c.open.insert(seq);
        let r = Req {
            conn: i,
            seq,
            handle: h.handle,
            op,
            lba,
            blocks,
            per_part,
            parts,
            bufs: Vec::new(),
            ready: 0,
            submitted: 0,
            done: 0,
            errno: 0,
        };
        let id = match self.free_reqs.pop() {
            Some(id) => {
                self.reqs[id] = Some(r);
                id
            }
            None => {
                self.reqs.push(Some(r));
                self.reqs.len() - 1
            }
        };
        self.open_reqs += 1;
        self.stats.peak_requests = self.stats.peak_requests.max(self.open_reqs);
        match op {
            Op::Read => self.buf_wait.push_back(id),
            Op::Write { .. } => {
                c.state = Rx::AwaitBuffers { req: id };
                self.buf_wait.push_back(id);
            }
            _ => {
                if let Some(r) = self.reqs[id].as_mut() {
                    r.ready = r.parts;
                }
                self.to_submit.push_back(id);
            }
        }
    }

    /// Gives waiting requests all their buffers, in order of arrival.
    fn grant_buffers(&mut self) -> bool {
        let mut moved = false;
        while let Some(&id) = self.buf_wait.front() {
            let Some(r) = self.reqs[id].as_mut() else {
                self.buf_wait.pop_front();
                continue;
            };
            if self.pool.available() < r.parts as usize {
                break;
            }
            r.bufs = (0..r.parts).map(|_| self.pool.get()).collect();
            self.buf_wait.pop_front();
            moved = true;
            match r.op {
                Op::Read => {
                    r.ready = r.parts;
                    self.to_submit.push_back(id);
                }
                _ => {
                    if let Some(c) = self.conns[r.conn].as_mut() {
                        c.state = Rx::Payload {
                            req: id,
                            part: 0,
                            filled: 0,
                        };
                    }
                }
            }
        }
        moved
    }

    /// Submits every part that is ready, until the controller is full.
    fn submit(&mut self) -> bool {
        let mut moved = false;
        let mut k = 0;
        'reqs: while k < self.to_submit.len() {
            let id = self.to_submit[k];
            loop {
                let bs = self.export.block_size as usize;
                let Some(r) = self.reqs[id].as_mut() else {
                    self.to_submit.remove(k);
                    continue 'reqs;
                };
                if r.submitted == r.parts {
                    self.to_submit.remove(k);
                    continue 'reqs;
                }
                if r.submitted >= r.ready {
                    k += 1;
                    continue 'reqs;
                }
                let p = r.submitted;
                let (lba, blocks) = r.part(p);
                let buf = if r.has_data() {
                    r.bufs[p as usize].take().map(|mut b| {
                        b.set_len(blocks as usize * bs);
                        b
                    })
                } else {
                    None
                };
                let op = match r.op {
                    Op::Read => BlockOp::Read,
                    Op::Write { fua } => BlockOp::Write { fua },
                    Op::Flush => BlockOp::Flush,
                    Op::Trim => BlockOp::Deallocate,
                    Op::Zero { may_trim, fua } => BlockOp::WriteZeroes {
                        deallocate: may_trim,
                        fua,
                    },
                };
                let req = BlockRequest {
                    tag: (id as u64) << 32 | p as u64,
                    op,
                    lba,
                    blocks,
                    buf,
                    buf_offset: 0,
                };
                match self.be.submit(req) {
                    Ok(()) => {
                        r.submitted += 1;
                        self.commands += 1;
                        self.stats.peak_commands = self.stats.peak_commands.max(self.commands);
                        moved = true;
                    }
                    Err(rej) => {
                        r.bufs[p as usize] = rej.req.buf;
                        match rej.reason {
                            RejectReason::Busy => return moved,
                            RejectReason::Invalid(_) => {
                                r.errno = errno::EIO;
                                r.submitted += 1;
                                r.done += 1;
                                moved = true;
                                if r.done == r.parts {
                                    self.to_submit.remove(k);
                                    self.finish(id);
                                    continue 'reqs;
                                }
                            }
                        }
                    }
                }
            }
        }
        moved
    }

    /// Takes the controller's completions.
    fn reap(&mut self) -> bool {
        self.ctrl.poll();
        let mut done: Vec<BlockCompletion> = Vec::new();
        self.be.poll(&mut |c| done.push(c));
        let moved = !done.is_empty();
        for c in done {
            self.commands -= 1;
            let (id, p) = ((c.tag >> 32) as usize, (c.tag & 0xFFFF_FFFF) as usize);
            let Some(r) = self.reqs.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            if let Some(b) = c.buf {
                r.bufs[p] = Some(b);
            }
            if c.result.is_err() && r.errno == 0 {
                r.errno = errno::EIO;
            }
            r.done += 1;
            if r.done == r.parts {
                self.finish(id);
            }
        }
        moved
    }

    /// Every part of request `id` completed: queue its reply.
    fn finish(&mut self, id: usize) {
        let Some(r) = self.reqs[id].as_ref() else {
            return;
        };
        let (conn, seq, handle, err, read) = (r.conn, r.seq, r.handle, r.errno, r.op == Op::Read);
        let Some(c) = self.conns[conn].as_mut() else {
            self.release(id);
            return;
        };
        if c.open.first().is_some_and(|&oldest| oldest < seq) {
            self.stats.out_of_order += 1;
        }
        c.open.remove(&seq);
        self.stats.requests += 1;
        if c.dead {
            self.release(id);
            return;
        }
        let data = (read && err == 0).then_some(id);
        c.tx.push_back(Out::Reply {
            header: proto::simple_reply(err, handle),
            data,
        });
        if data.is_none() {
            self.release(id);
        }
    }

    /// Frees request `id` and its buffers.
    fn release(&mut self, id: usize) {
        let Some(r) = self.reqs.get_mut(id).and_then(Option::take) else {
            return;
        };
        if let Some(c) = self.conns[r.conn].as_mut() {
            c.open.remove(&r.seq);
        }
        for b in r.bufs.into_iter().flatten() {
            let _ = self.pool.put(b);
        }
        self.open_reqs -= 1;
        self.free_reqs.push(id);
    }

    /// Writes what client `i` has queued, as far as the socket takes it.
    fn send(&mut self, i: usize) -> bool {
        let mut moved = false;
        loop {
            let Some(c) = self.conns[i].as_mut() else {
                return moved;
            };
            let Some(front) = c.tx.front() else {
                return moved;
            };
            let bs = self.export.block_size as usize;
            let mut slices: Vec<IoSlice<'_>> = Vec::new();
            let mut skip = c.tx_off;
            let mut total = 0;
            let pieces: Vec<&[u8]> = match front {
                Out::Bytes(b) => vec![&b[..]],
                Out::Reply { header, data } => {
                    let mut v: Vec<&[u8]> = vec![&header[..]];
                    if let Some(id) = data
                        && let Some(r) = self.reqs[*id].as_ref()
                    {
                        for p in 0..r.parts {
                            let (_, n) = r.part(p);
                            if let Some(b) = r.bufs[p as usize].as_ref() {
                                v.push(&b.as_slice()[..n as usize * bs]);
                            }
                        }
                    }
                    v
                }
            };
            for piece in &pieces {
                total += piece.len();
                if skip >= piece.len() {
                    skip -= piece.len();
                    continue;
                }
                slices.push(IoSlice::new(&piece[skip..]));
                skip = 0;
            }
            let left = total - c.tx_off;
            let r = (&c.sock).write_vectored(&slices);
            drop(slices);
            match r {
                Ok(0) => {
                    self.drop_conn(i, "the socket accepts no more data");
                    return true;
                }
                Ok(n) if n < left => {
                    c.tx_off += n;
                    return true;
                }
                Ok(_) => {
                    moved = true;
                    c.tx_off = 0;
                    if let Some(Out::Reply { data: Some(id), .. }) = c.tx.pop_front() {
                        self.release(id);
                    }
                }
                Err(e) if would_block(&e) => return moved,
                Err(e) => {
                    self.drop_conn(i, &format!("send: {e}"));
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::proto::{cmd, opt, rep};
    use super::*;
    use crate::host::driver::HostConfig;
    use crate::host::window::{Emulator, EmulatorConfig, Window};
    use keel_nvme_pcie::layout;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A raw NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies.
    struct Client {
        s: TcpStream,
        size: u64,
        flags: u16,
    }

    impl Client {
        fn connect(addr: SocketAddr) -> Self {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
            let mut hello = 3u32.to_be_bytes().to_vec();
            hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&opt::GO.to_be_bytes());
            hello.extend_from_slice(&6u32.to_be_bytes());
            hello.extend_from_slice(&[0; 6]);
            s.write_all(&hello).unwrap();
            let (mut size, mut flags) = (0, 0);
            loop {
                let mut h = [0u8; 20];
                s.read_exact(&mut h).unwrap();
                let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
                let mut d = vec![0u8; len as usize];
                s.read_exact(&mut d).unwrap();
                if ty == rep::ACK {
                    break;
                }
                assert_eq!(ty, rep::INFO);
                if d[..2] == [0, 0] {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                }
            }
            Self { s, size, flags }
        }

        fn request(ty: u16, flags: u16, handle: u64, off: u64, len: u32) -> Vec<u8> {
            let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b
        }

        /// One reply: (error, handle), and `data_len(handle)` bytes of data after a
        /// successful one.
        fn reply(&mut self, data_len: impl Fn(u64) -> usize) -> (u32, u64, Vec<u8>) {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(h[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let handle = u64::from_be_bytes(h[8..].try_into().unwrap());
            let mut d = vec![0u8; if err == 0 { data_len(handle) } else { 0 }];
            self.s.read_exact(&mut d).unwrap();
            (err, handle, d)
        }

        /// One request and its reply.
        fn one(
            &mut self,
            ty: u16,
            flags: u16,
            off: u64,
            len: u32,
            payload: &[u8],
        ) -> (u32, Vec<u8>) {
            let mut b = Self::request(ty, flags, 1, off, len);
            b.extend_from_slice(payload);
            self.s.write_all(&b).unwrap();
            let n = if ty == cmd::READ { len as usize } else { 0 };
            let (err, handle, d) = self.reply(|_| n);
            assert_eq!(handle, 1);
            (err, d)
        }
    }

    /// Commands the host has written to the function's submission queues so far.
    fn submitted(win: &Window, queues: u16) -> u32 {
        (1..=queues)
            .map(|q| win.load32(layout::doorbell_offset(layout::sq_tail_doorbell(q))))
            .sum()
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn many_requests_in_flight_every_command_and_bad_input() {
        let win = Arc::new(Window::anonymous(64 << 20).unwrap());
        let emu = Emulator::start(
            win.clone(),
            EmulatorConfig {
                namespaces: vec![40 << 20],
                ..EmulatorConfig::default()
            },
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (w2, st) = (win.clone(), stop.clone());
        // The server (driver and sockets) lives on its own thread, as in `keelctl host nbd`.
        let server = std::thread::spawn(move || {
            let c = HostController::open(
                w2,
                &HostConfig {
                    queues: 2,
                    depth: 32,
                    timeout: Duration::from_secs(20),
                },
            )
            .unwrap();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let cfg = NbdConfig {
                buffers: 32,
                ..NbdConfig::default()
            };
            let mut s = Server::new(c, l, cfg).unwrap();
            tx.send((s.local_addr().unwrap(), s.export())).unwrap();
            s.serve(&st).unwrap();
            let stats = s.stats();
            s.shutdown().unwrap();
            stats
        });
        let (addr, export) = rx.recv().unwrap();
        assert_eq!(export.max_payload, 32 * (128 << 10), "what 32 buffers hold");
        let mut c = Client::connect(addr);
        assert_eq!(c.size, 40 << 20);
        assert_eq!(c.flags, Export::ALL_FLAGS);

        // 16 writes sent at once while the function is paused: all 16 reach its queues
        // before any completes.
        emu.pause(true);
        let base = submitted(&win, 2);
        let mut batch = Vec::new();
        for i in 0..16u64 {
            batch.extend(Client::request(cmd::WRITE, 0, 100 + i, i << 16, 8192));
            batch.extend(std::iter::repeat_n(i as u8 + 1, 8192));
        }
        c.s.write_all(&batch).unwrap();
        wait_for("16 writes in the function's queues", || {
            submitted(&win, 2) == base + 16
        });
        emu.pause(false);
        let mut handles: Vec<u64> = (0..16)
            .map(|_| {
                let (err, h, _) = c.reply(|_| 0);
                assert_eq!(err, 0);
                h
            })
            .collect();
        handles.sort();
        assert_eq!(handles, (100..116).collect::<Vec<_>>());

        // 16 reads the same way; each reply carries its own data.
        emu.pause(true);
        let base = submitted(&win, 2);
        let mut batch = Vec::new();
        for i in 0..16u64 {
            batch.extend(Client::request(cmd::READ, 0, 200 + i, i << 16, 8192));
        }
        c.s.write_all(&batch).unwrap();
        wait_for("16 reads in the function's queues", || {
            submitted(&win, 2) == base + 16
        });
        emu.pause(false);
        let mut seen = HashMap::new();
        for _ in 0..16 {
            let (err, h, d) = c.reply(|_| 8192);
            assert_eq!(err, 0);
            seen.insert(h, d);
        }
        for i in 0..16u64 {
            assert!(
                seen[&(200 + i)].iter().all(|&b| b == i as u8 + 1),
                "read {i}"
            );
        }

        // A payload of 8 buffers (8 Write commands), FUA, then read back.
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            c.one(cmd::WRITE, cmd::FLAG_FUA, 3 << 20, 1 << 20, &big).0,
            0
        );
        let (err, d) = c.one(cmd::READ, 0, 3 << 20, 1 << 20, &[]);
        assert_eq!(err, 0);
        assert!(d == big, "1 MiB round trip");
        assert_eq!(c.one(cmd::FLUSH, 0, 0, 0, &[]).0, 0);
        // Trim and write zeroes read back as zeroes; the data around them stays.
        assert_eq!(c.one(cmd::TRIM, 0, 3 << 20, 64 << 10, &[]).0, 0);
        assert_eq!(
            c.one(
                cmd::WRITE_ZEROES,
                cmd::FLAG_NO_HOLE,
                (3 << 20) + (128 << 10),
                4096,
                &[]
            )
            .0,
            0
        );
        let (_, d) = c.one(cmd::READ, 0, 3 << 20, 256 << 10, &[]);
        assert!(d[..64 << 10].iter().all(|&b| b == 0));
        assert_eq!(d[64 << 10..128 << 10], big[64 << 10..128 << 10]);
        assert!(d[128 << 10..(128 << 10) + 4096].iter().all(|&b| b == 0));
        assert_eq!(d[(128 << 10) + 4096..], big[(128 << 10) + 4096..256 << 10]);
        // A write zeroes larger than one command (65536 blocks): split, all zero.
        assert_eq!(c.one(cmd::WRITE_ZEROES, 0, 0, 36 << 20, &[]).0, 0);
        let (_, d) = c.one(cmd::READ, 0, 3 << 20, 1 << 20, &[]);
        assert!(d.iter().all(|&b| b == 0));

        // Refused requests get their errno and leave the stream in step: a misaligned read,
        // a write past the end (its payload skipped), a write over the largest payload, an
        // unknown command.
        assert_eq!(c.one(cmd::READ, 0, 100, 512, &[]).0, errno::EINVAL);
        let tail = vec![7u8; 1024];
        assert_eq!(
            c.one(cmd::WRITE, 0, (40 << 20) - 512, 1024, &tail).0,
            errno::ENOSPC
        );
        let huge = vec![9u8; 5 << 20];
        assert_eq!(c.one(cmd::WRITE, 0, 0, 5 << 20, &huge).0, errno::EINVAL);
        assert_eq!(c.one(9, 0, 0, 512, &[]).0, errno::EINVAL);
        let (err, d) = c.one(cmd::READ, 0, 3 << 20, 512, &[]);
        assert_eq!((err, d.len()), (0, 512));
        // A client that leaves mid-payload does not take the server down.
        let mut c2 = Client::connect(addr);
        let mut half = Client::request(cmd::WRITE, 0, 5, 0, 1 << 20);
        half.extend(std::iter::repeat_n(1u8, 300 << 10));
        c2.s.write_all(&half).unwrap();
        drop(c2);
        let (err, _) = c.one(cmd::READ, 0, 0, 4096, &[]);
        assert_eq!(err, 0);

        c.s.write_all(&Client::request(cmd::DISC, 0, 0, 0, 0))
            .unwrap();
        let mut rest = Vec::new();
        let _ = c.s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "no reply to NBD_CMD_DISC");
        stop.store(true, Ordering::Relaxed);
        let stats = server.join().unwrap();
        assert!(stats.peak_commands >= 16, "{stats:?}");
        assert!(stats.peak_requests >= 16, "{stats:?}");
        assert_eq!(stats.clients, 2);
        emu.stop().unwrap();
    }
}
