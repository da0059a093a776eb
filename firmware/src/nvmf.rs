//! The NVMe/TCP service: TCP connections from the network stack, the sans-IO NVMe/TCP
//! transport (`keel-nvmf-tcp`) per connection, and the controller core (`keel-controller`)
//! behind all of them. Port 4420 serves the NVM subsystems and the discovery subsystem; port
//! 8009 serves the same target for discovery.
//!
//! Data path per command, all in one poll pass where possible: bytes from the socket are fed to
//! the connection (command capsules, in-capsule and R2T-solicited data land directly in a pool
//! buffer), the command goes to the controller, its completion comes back (at once or from
//! `Target::poll`) and the connection turns it into C2HData/CapsuleResp PDUs written straight
//! into the socket's transmit buffer.
//!
//! Where the namespace's medium is memory (RAM, slices of it, AES-XTS reads over it) there is
//! no pool buffer at all: a Read runs inside the socket's `send` closure with the window where
//! its C2HData PDU's data goes as destination (`complete_in_window` + `Target::submit_now`),
//! and an in-capsule Write whose data arrived whole (and digest-checked) runs inside the
//! socket's `recv` closure from the receive window (`recv_direct`). Whatever cannot
//! (a drive, a remote volume, a wrapped transmit ring, QoS holding the command back, a data
//! digest that does not match) takes the buffered path. Buffers come from one pre-allocated pool; a command that
//! finds the pool empty (or other work already waiting) waits in its connection's queue with
//! an arrival number, and buffers go to the oldest waiter of all connections: under overload
//! no connection's commands wait behind another connection's later ones.
//!
//! Connections that never send their ICReq are closed after the transport's ICReq timeout
//! (10 s), and sooner when the network stack runs short of sockets: the oldest of them is then
//! evicted for each socket needed, so a storm of silent connections cannot keep a host out.

use crate::hw::Hw;
use crate::net::{Accepted, NetStack};
use alloc::{boxed::Box, collections::VecDeque, format, string::String, vec::Vec};
use keel_controller::{
    Adoption, Event as CoreEvent, Instant, NowData, PortEntry, QueueId, QueueLoss, Request,
    Response, Target,
};
use keel_nvme::{Cqe, Sqe, Status};
use keel_nvmf_tcp::{Event as TcpEvent, TargetConfig as TcpConfig, TargetConnection, TargetState};
use keel_qos::Intake;
use keel_storage::{BufPool, IoBuf};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// Largest transfer per command (MDTS 5 with 4 KiB pages = 128 KiB).
const MAX_TRANSFER: usize = 128 * 1024;
/// The owner of the NVMe/TCP service's core queues (`Target::open_queue_for`); emulated
/// functions are owners `0..` by position (see `crate::services`).
pub(crate) const OWNER: u16 = u16::MAX;
/// The owner of the queues the controller core opens for connections that other cores carry
/// (see [`ToHolder`]).
pub(crate) const FORWARD_OWNER: u16 = u16::MAX - 1;
/// How often (at most) a core tells the controller core that a controller's I/O queues it
/// serves had traffic (traffic-based keep-alive).
const ACTIVITY_MS: u64 = 1_000;

/// A connection on a core other than the controller core: its slot there and a number no
/// other connection of that core had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    /// Slot in that core's [`NvmfService`].
    pub slot: u32,
    /// The connection's serial number on that core.
    pub serial: u64,
}

/// From a core serving NVMe/TCP connections to the controller core, which holds every
/// controller (admin queues, discovery, keep-alive, configuration). Off the I/O path: only
/// commands of queues the core does not serve itself travel (Connect, admin commands,
/// I/O queues of subsystems the core has no replica of).
#[derive(Debug)]
pub enum ToHolder {
    /// A command of the connection (`status`: the transport already failed it so).
    Capsule {
        /// The connection.
        conn: ConnRef,
        /// The command.
        sqe: Sqe,
        /// Its data buffer, from the sending core's pools: the host's data in it, or room
        /// for the controller's. The controller core runs the command on this very buffer
        /// (no copy, no allocation) and sends it back in [`FromHolder::Done`] (or, if the
        /// connection went away meanwhile, [`FromHolder::Release`]).
        buf: Option<IoBuf>,
        /// The transfer length the command describes.
        data_len: u32,
        /// Set when the transport failed the command with this status.
        status: Option<Status>,
    },
    /// The connection ended.
    Closed {
        /// The connection.
        conn: ConnRef,
        /// How.
        how: QueueLoss,
    },
    /// I/O queues of controller `cntlid` served on the core had traffic.
    Activity {
        /// The controller.
        cntlid: u16,
    },
    /// A replica controller on the core logged an error: for the controller's own Error
    /// Information log on core 0 (`Target::log_replica_error`).
    Error(keel_controller::ReplicaError),
    /// A replica controller on the core ended: what it admitted through its part of its
    /// controller's limits, for the controller's counters on core 0
    /// (`Target::add_retired_counters`).
    Counters(keel_controller::RetiredCounters),
    /// The verdict on core 0's Abort `token` ([`FromHolder::Abort`]).
    AbortVerdict {
        /// The Abort.
        token: u32,
        /// The command ended with Command Abort Requested.
        aborted: bool,
    },
}

/// From the controller core back to a connection's core.
#[derive(Debug)]
pub enum FromHolder {
    /// A forwarded command's completion.
    Done {
        /// The connection.
        conn: ConnRef,
        /// The completion.
        cqe: Cqe,
        /// The command's buffer back, with `data_len` bytes of controller-to-host data.
        buf: Option<IoBuf>,
        /// Valid bytes in `buf` for the host.
        data_len: u32,
        /// After a successful Connect: the queue's SQSIZE and whether the host disabled SQ
        /// flow control.
        depth: Option<(u16, bool)>,
        /// After a successful I/O queue Connect of a subsystem the core has a replica of:
        /// serve the queue there from now on (boxed: once per queue, and the other
        /// messages, one per forwarded command, stay small).
        adopt: Option<Box<Adoption>>,
    },
    /// The controller ended the connection's queue: close it.
    Terminate {
        /// The connection.
        conn: ConnRef,
    },
    /// A buffer of a forwarded command whose queue went away: back to its pool.
    Release {
        /// The buffer.
        buf: IoBuf,
    },
    /// The host's Abort of command `cid` of the connection's (adopted) I/O queue: answer
    /// [`ToHolder::AbortVerdict`] with `token` (at once, or once the command completed).
    Abort {
        /// The connection.
        conn: ConnRef,
        /// The command.
        cid: u16,
        /// Core 0's name for the Abort.
        token: u32,
    },
}

/// Data buffers of the largest transfer shared by every connection.
const POOL_BUFFERS: usize = 256;
/// Size of a small data buffer: a 4 KiB I/O (the common one) takes one of these.
const SMALL_BUF: usize = 4096;
/// Small data buffers shared by every connection (8 MiB, carved when first needed): enough for
/// 16 connections with 128 small commands each in flight, so under such an overload no
/// command waits for a buffer, and none holds up the commands behind it in its connection's
/// stream (an in-capsule write whose data has no buffer stops its connection's reads: its
/// later commands would then queue behind other connections' later ones).
const SMALL_BUFFERS: usize = 2048;
/// Command slots per connection (the largest queue depth a host can get).
const SLOTS: u16 = 256;

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
    Command { sqe: Sqe, data_len: u32 },
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
    closing: bool,
    /// When the connection was accepted (ns): the oldest silent ones are evicted first.
    opened_ns: u64,
    /// Its serial number on this core ([`ConnRef`]).
    serial: u64,
    /// Its commands go to the controller core ([`ToHolder`]) instead of this core's target.
    forward: bool,
    /// The controller of its adopted I/O queue, commands since the last activity report
    /// and when that was (ms).
    cntlid: u16,
    recent: u32,
    reported_ms: u64,
    /// The controller core ended its queue: close once what is queued has gone into the
    /// socket (a Disconnect's completion comes just before).
    terminate: bool,
    /// Reads waiting for room in the socket's transmit ring to run there
    /// ([`Conn::read_in_window`]), oldest first, with their data lengths.
    deferred: VecDeque<(Sqe, u32)>,
}

/// What [`Conn::read_in_window`] did with a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InWindow {
    /// It ran: its C2HData PDU is in the socket's transmit ring.
    Ran,
    /// The free space at the end of the transmit ring is too short for its PDU (or PDUs
    /// queued before it have not all gone in): it can run there once the socket has sent
    /// and been acknowledged enough.
    NoRoom,
    /// It cannot run in the ring (a namespace that moves no data at once, QoS, a forwarded
    /// connection, a PDU larger than the ring): take a buffer.
    Declined,
}

/// Room a C2HData PDU needs in the transmit ring beyond its data: header, padding up to
/// the largest HPDA (128 bytes), data digest, with margin. A read whose data plus this
/// does not fit the free space at the end of the ring waits ([`InWindow::NoRoom`]).
const PDU_ROOM: usize = 256;

/// The NVMe/TCP target service.
pub struct NvmfService {
    pool: BufPools,
    conns: Vec<Option<Conn>>,
    tcp_cfg: TcpConfig,
    ports_set_for: Option<smoltcp::wire::Ipv4Address>,
    advertise: Option<(String, String)>,
    /// Connections refused because no queue could be opened.
    pub refused: u64,
    /// Connections that had not sent their ICReq, evicted to make room for new ones.
    pub evicted: u64,
    /// Connections closed because their ICReq did not come in time.
    pub icreq_timeouts: u64,
    /// Commands taken from connections (forwarded ones included).
    pub commands: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// This service runs on a core other than the controller core: every connection
    /// forwards its commands ([`ToHolder`]) until its I/O queue is adopted.
    forwarding: bool,
    /// Messages for the controller core, sent by the poll loop.
    pub outbox: Vec<ToHolder>,
    serials: u64,
    /// Commands whose data moved without a pool buffer.
    pub direct: DirectCounts,
    /// Work waiting for a buffer, one FIFO per connection (by its slot), served in arrival
    /// order across all of them (see [`NvmfService::start_waiting`]).
    waiting: Intake<Waiting>,
}

impl core::fmt::Debug for NvmfService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvmfService")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

fn ms(now_ns: u64) -> u64 {
    now_ns / 1_000_000
}

impl NvmfService {
    /// The service, with its data buffers; `advertise` replaces the interface's own address
    /// in the discovery log.
    pub fn new(advertise: Option<(String, String)>) -> Result<Self, keel_storage::PoolError> {
        Self::with_buffers(advertise, POOL_BUFFERS, SMALL_BUFFERS)
    }

    /// [`NvmfService::new`] with `buffers` data buffers of the largest transfer and `small`
    /// of 4 KiB.
    pub fn with_buffers(
        advertise: Option<(String, String)>,
        buffers: usize,
        small: usize,
    ) -> Result<Self, keel_storage::PoolError> {
        let pool = BufPools::new(buffers, small)?;
        let tcp_cfg = TcpConfig {
            slots: SLOTS,
            max_transfer: MAX_TRANSFER as u32,
            ..Default::default()
        };
        Ok(Self {
            pool,
            // A connection per socket at most: the list never grows after boot.
            conns: Vec::with_capacity(crate::net::MAX_SOCKETS),
            tcp_cfg,
            ports_set_for: None,
            advertise,
            refused: 0,
            evicted: 0,
            icreq_timeouts: 0,
            commands: 0,
            accepted: 0,
            forwarding: false,
            outbox: Vec::new(),
            serials: 0,
            direct: DirectCounts::default(),
            waiting: Intake::with_queues(crate::net::MAX_SOCKETS),
        })
    }

    /// The service of a core other than the controller core (see [`ToHolder`]).
    pub fn forwarding(mut self) -> Self {
        self.forwarding = true;
        self
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    /// Open connections still waiting for their ICReq.
    pub fn awaiting_icreq(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.tcp.state() == TargetState::AwaitIc)
            .count()
    }

    /// Data buffers free and in all.
    pub fn buffers(&self) -> (usize, usize) {
        (self.pool.available(), self.pool.count())
    }

    fn adopt<H: Hw>(
        &mut self,
        a: Accepted,
        now_ns: u64,
        net: &mut NetStack<H>,
        target: &mut Target,
    ) {
        let (tcp, queue) = match (
            TargetConnection::new(self.tcp_cfg, ms(now_ns)),
            target.open_queue_for(OWNER),
        ) {
            (Ok(t), Ok(q)) => (t, q),
            (_, Ok(q)) => {
                let _ = target.close_queue(q);
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
            serial: self.serials,
            forward: self.forwarding,
            cntlid: 0,
            recent: 0,
            reported_ms: 0,
            terminate: false,
            deferred: VecDeque::new(),
            socket: a.handle,
            tcp,
            queue,
            depth_set: false,
            fc_disabled: false,
            closing: false,
            opened_ns: now_ns,
        };
        self.serials += 1;
        self.accepted += 1;
        match self.conns.get_mut(slot) {
            Some(free) => *free = Some(conn),
            None => self.conns.push(Some(conn)),
        }
    }

    /// One pass over the connections: adopt new ones, move bytes, hand commands to the
    /// controller core. Completions that went pending come back through
    /// [`NvmfService::on_event`]; [`NvmfService::flush`] then sends what they produced.
    /// Returns whether anything happened.
    pub fn poll<H: Hw>(&mut self, now_ns: u64, net: &mut NetStack<H>, target: &mut Target) -> bool {
        let mut busy = false;
        self.update_ports(net, target);
        let accepted: Vec<Accepted> = net.take_accepted().collect();
        for a in accepted {
            busy = true;
            self.adopt(a, now_ns, net, target);
        }
        busy |= self.make_room(now_ns, net, target);
        let now = Instant::from_nanos(now_ns);
        for i in 0..self.conns.len() {
            busy |= self.poll_conn(i, now, net, target);
        }
        busy |= self.start_waiting(now, target);
        busy
    }

    /// What the replica controllers have for core 0: the errors they logged (for their
    /// controllers' Error Information logs) and the verdicts of core 0's Aborts, into the
    /// outbox (one flag test and one emptiness test when there is nothing). The poll loop
    /// sends the outbox before the pass's frames leave, so core 0 has them before a host
    /// that saw the completion can ask.
    pub fn report_to_holder(&mut self, target: &mut Target) {
        if !self.forwarding {
            return;
        }
        target.take_replica_errors(&mut |e| self.outbox.push(ToHolder::Error(e)));
        target.take_abort_verdicts(&mut |token, aborted| {
            self.outbox.push(ToHolder::AbortVerdict { token, aborted })
        });
    }

    /// Starts waiting work in arrival order across all connections while the pool has
    /// buffers; returns whether any started. O(connections) per start, and only under
    /// overload (nothing waits otherwise).
    fn start_waiting(&mut self, now: Instant, target: &mut Target) -> bool {
        let mut any = false;
        while let Some((i, len)) = self.waiting.oldest().map(|(i, w)| (i, w.len())) {
            let Some(b) = take(&mut self.pool, len) else {
                break;
            };
            let (Some(c), Some(w)) = (self.conns[i].as_mut(), self.waiting.pop(i)) else {
                // A closed connection's work leaves the intake with it (`Intake::close`), so
                // this does not happen; a stale waiter would be dropped here.
                recycle(&mut self.pool, Some(b));
                continue;
            };
            any = true;
            let mut cx = Ctx {
                target: &mut *target,
                pool: &mut self.pool,
                now,
                waiting: &mut self.waiting,
                direct: &mut self.direct,
                outbox: &mut self.outbox,
                commands: &mut self.commands,
            };
            c.begin(&mut cx, w, b);
        }
        any
    }

    /// While the network stack is short of sockets, evicts the oldest connections that have
    /// not sent their ICReq (they hold no controller state and no data), so the next host
    /// always finds a listener. Returns whether any was evicted.
    fn make_room<H: Hw>(
        &mut self,
        now_ns: u64,
        net: &mut NetStack<H>,
        target: &mut Target,
    ) -> bool {
        let mut any = false;
        while net.short_of_sockets() {
            let oldest = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .filter(|(_, c)| c.tcp.state() == TargetState::AwaitIc && !c.closing)
                // Bytes waiting in the socket (an ICReq that arrived in this pass, read just
                // below) mean the peer is not silent: a host is never evicted for being
                // accepted in the same burst as a storm.
                .filter(|(_, c)| net.sockets.get::<tcp::Socket>(c.socket).recv_queue() == 0)
                .min_by_key(|(_, c)| c.opened_ns)
                .map(|(i, _)| i);
            let Some(c) = oldest.and_then(|i| self.conns[i].take()) else {
                break;
            };
            self.waiting.close(c.slot as usize);
            let _ = target.close_queue_after(c.queue, QueueLoss::Abrupt);
            drain_buffers(c.tcp, &mut self.pool);
            net.release(c.socket, false, now_ns);
            self.evicted += 1;
            any = true;
        }
        any
    }

    /// An event of the controller core that belongs to this service (the caller routes the
    /// emulated functions' events elsewhere first).
    pub fn on_event(&mut self, ev: CoreEvent) {
        let Self { conns, pool, .. } = self;
        match ev {
            CoreEvent::Completion(q, resp) => {
                match conns.get_mut(resp.cookie as usize).and_then(Option::as_mut) {
                    // The cookie names the connection; the queue check drops a stale completion
                    // of a connection whose slot was reused.
                    Some(c) if c.queue == q => c.deliver(pool, resp),
                    _ => recycle(pool, resp.buf),
                }
            }
            CoreEvent::QueueTerminated(q) => {
                if let Some(c) = conns.iter_mut().flatten().find(|c| c.queue == q) {
                    c.tcp.close();
                    c.closing = true;
                }
            }
            CoreEvent::BufferReleased { buf: b, .. } => recycle(pool, Some(b)),
        }
    }

    /// A message of the controller core for one of this core's connections (one that has
    /// gone since is ignored).
    pub fn on_holder(&mut self, msg: FromHolder, now_ns: u64, target: &mut Target) {
        let conn = match &msg {
            FromHolder::Done { conn, .. }
            | FromHolder::Terminate { conn }
            | FromHolder::Abort { conn, .. } => *conn,
            FromHolder::Release { .. } => {
                if let FromHolder::Release { buf } = msg {
                    self.pool.put(buf);
                }
                return;
            }
        };
        let Some(c) = self
            .conns
            .get_mut(conn.slot as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.serial == conn.serial)
        else {
            // Its buffer still comes home; an Abort finds nothing to abort.
            match msg {
                FromHolder::Done { buf, .. } => recycle(&mut self.pool, buf),
                FromHolder::Abort { token, .. } => self.outbox.push(ToHolder::AbortVerdict {
                    token,
                    aborted: false,
                }),
                _ => {}
            }
            return;
        };
        match msg {
            FromHolder::Done {
                cqe,
                buf,
                data_len,
                depth,
                adopt,
                ..
            } => c.answered(
                &mut self.pool,
                &mut self.waiting,
                target,
                Instant::from_nanos(now_ns),
                Response {
                    cqe,
                    buf,
                    data_len,
                    cookie: c.slot,
                },
                depth,
                adopt,
            ),
            FromHolder::Release { .. } => {}
            FromHolder::Terminate { .. } => c.terminate = true,
            FromHolder::Abort { cid, token, .. } => {
                let now = Instant::from_nanos(now_ns);
                // Not adopted here (its commands are core 0's): nothing to abort here.
                let verdict = if c.forward {
                    Some(false)
                } else {
                    target.abort_for_holder(now, c.queue, cid, token)
                };
                if let Some(aborted) = verdict {
                    self.outbox.push(ToHolder::AbortVerdict { token, aborted });
                }
            }
        }
    }

    /// Moves every connection's pending PDUs into its socket.
    pub fn flush<H: Hw>(&mut self, net: &mut NetStack<H>) {
        for c in self.conns.iter_mut().flatten() {
            c.flush(net.sockets.get_mut::<tcp::Socket>(c.socket));
        }
    }

    fn update_ports<H: Hw>(&mut self, net: &NetStack<H>, target: &mut Target) {
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
        target.set_ports(alloc::vec![entry]);
    }

    fn poll_conn<H: Hw>(
        &mut self,
        i: usize,
        now: Instant,
        net: &mut NetStack<H>,
        target: &mut Target,
    ) -> bool {
        let Some(c) = self.conns[i].as_mut() else {
            return false;
        };
        let now_ms = now.as_millis();
        let mut busy = false;
        let mut cx = Ctx {
            target,
            pool: &mut self.pool,
            now,
            waiting: &mut self.waiting,
            direct: &mut self.direct,
            outbox: &mut self.outbox,
            commands: &mut self.commands,
        };
        let sock = net.sockets.get_mut::<tcp::Socket>(c.socket);
        // Receive: feed the transport until it stops taking bytes (it stops early when it
        // needs a buffer from us). In-capsule writes whose data is here run from the socket's
        // receive window.
        let (queue, cookie, forward) = (c.queue, c.slot, c.forward);
        while sock.can_recv() && !c.closing {
            let (target, direct, commands) = (&mut *cx.target, &mut *cx.direct, &mut *cx.commands);
            let recent = &mut c.recent;
            let taken = sock.recv(|bytes| {
                let n = c
                    .tcp
                    .recv_direct(now_ms, bytes, &mut |sqe: &Sqe, data: &[u8]| {
                        if forward {
                            return None;
                        }
                        let r = target.submit_now(now, queue, sqe, cookie, NowData::Write(data))?;
                        direct.writes += 1;
                        *commands += 1;
                        *recent += 1;
                        Some(r.cqe)
                    });
                (n, n)
            });
            match taken {
                Ok(0) | Err(_) => break,
                Ok(_) => busy = true,
            }
            busy |= c.handle_events(&mut cx, sock);
        }
        busy |= c.handle_events(&mut cx, sock);
        busy |= c.run_deferred(&mut cx, sock);
        let awaiting = c.tcp.state() == TargetState::AwaitIc;
        c.tcp.poll_timers(now_ms);
        if awaiting && c.tcp.state() != TargetState::AwaitIc {
            self.icreq_timeouts += 1;
        }
        c.flush(sock);
        if c.terminate && !c.tcp.wants_transmit() {
            c.tcp.close();
            c.closing = true;
        }
        if self.forwarding && !c.forward && c.recent > 0 && now_ms >= c.reported_ms + ACTIVITY_MS {
            cx.outbox.push(ToHolder::Activity { cntlid: c.cntlid });
            c.recent = 0;
            c.reported_ms = now_ms;
        }
        // The peer is gone once it reset the connection (or it timed out), or once it closed
        // its side and we have consumed everything (a half-closed host sends no more
        // commands). Both lose the queue only: Linux deletes a controller by closing each I/O
        // queue with a FIN and at once a RST (its sockets linger 0), then shuts the controller
        // down on the admin queue; when both segments arrive in one poll the socket is already
        // Closed here. Linux's own target also treats a reset I/O connection as that queue's
        // loss only (ECONNRESET is not a fatal error in nvmet-tcp). A vanished host's
        // controller still ends at KATO; losing the admin queue always ends it.
        let loss = match sock.state() {
            tcp::State::Closed => Some(QueueLoss::Orderly),
            tcp::State::TimeWait => Some(QueueLoss::Orderly),
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing
                if !sock.can_recv() =>
            {
                Some(QueueLoss::Orderly)
            }
            // The transport ended the connection and its last PDU has left: after a fatal
            // error or ICReq timeout (a C2HTermReq) that is abrupt; after a Disconnect (the
            // transport closes once the response left, often before the host's FIN) it is
            // the queue's orderly end. The controller core must hear it so: on a forwarding
            // core the replica saw the Disconnect, the controller core's queue did not.
            _ if c.tcp.state() == TargetState::Closed && sock.send_queue() == 0 => {
                Some(if cx.target.queue_disconnected(c.queue) {
                    QueueLoss::Orderly
                } else {
                    QueueLoss::Abrupt
                })
            }
            _ => None,
        };
        if let Some(how) = loss {
            let c = self.conns[i].take().expect("checked above");
            cx.waiting.close(i);
            if self.forwarding {
                // The buffers of its commands at the controller core come back with their
                // answers ([`NvmfService::on_holder`]).
                cx.outbox.push(ToHolder::Closed {
                    conn: c.conn_ref(),
                    how,
                });
            }
            let _ = cx.target.close_queue_after(c.queue, how);
            drain_buffers(c.tcp, &mut self.pool);
            net.release(c.socket, true, now.as_nanos());
            busy = true;
        }
        busy
    }
}

/// The data buffers: small ones for commands of up to [`SMALL_BUF`] bytes, large ones (the
/// largest transfer) for the rest and for small commands when no small buffer is free.
#[derive(Debug)]
struct BufPools {
    small: BufPool,
    large: BufPool,
}

impl BufPools {
    /// `large` buffers of [`MAX_TRANSFER`] bytes and `small` of [`SMALL_BUF`], in DMA-able
    /// memory, each zeroed and carved when first needed.
    fn new(large: usize, small: usize) -> Result<Self, keel_storage::PoolError> {
        let lazy = |count: usize, size: usize| {
            let region = crate::hw::dma_region(count * size);
            let dma = region.as_ptr() as u64;
            BufPool::lazy(region, dma, size)
        };
        Ok(Self {
            small: lazy(small, SMALL_BUF)?,
            large: lazy(large, MAX_TRANSFER)?,
        })
    }

    /// A buffer for `len` bytes: a small one if it fits and one is free, else a large one.
    fn get(&mut self, len: usize) -> Option<IoBuf> {
        if len <= SMALL_BUF
            && let Some(b) = self.small.get()
        {
            return Some(b);
        }
        if len > self.large.buf_size() {
            return None;
        }
        self.large.get()
    }

    /// Takes a buffer back to the pool that carved it.
    fn put(&mut self, b: IoBuf) {
        if self.small.owns(&b) {
            let _ = self.small.put(b);
        } else {
            let _ = self.large.put(b);
        }
    }

    fn available(&self) -> usize {
        self.small.available() + self.large.available()
    }

    fn count(&self) -> usize {
        self.small.count() + self.large.count()
    }
}

fn recycle(pool: &mut BufPools, buf: Option<IoBuf>) {
    if let Some(b) = buf {
        pool.put(b);
    }
}

fn drain_buffers(mut tcp: TargetConnection<NetBuf>, pool: &mut BufPools) {
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
fn take(pool: &mut BufPools, len: u32) -> Option<IoBuf> {
    let mut b = pool.get(len as usize)?;
    b.set_len(len as usize);
    Some(b)
}

/// What a connection's command handling needs besides the connection itself.
struct Ctx<'a> {
    target: &'a mut Target,
    pool: &'a mut BufPools,
    now: Instant,
    /// [`NvmfService::waiting`].
    waiting: &'a mut Intake<Waiting>,
    /// [`NvmfService::direct`].
    direct: &'a mut DirectCounts,
    /// [`NvmfService::outbox`].
    outbox: &'a mut Vec<ToHolder>,
    /// [`NvmfService::commands`].
    commands: &'a mut u64,
}

/// Commands whose data moved between a namespace and a socket without a pool buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectCounts {
    /// Reads whose data went straight into a socket's transmit window.
    pub reads: u64,
    /// In-capsule writes run straight from a socket's receive window.
    pub writes: u64,
}

impl Conn {
    /// The queue's depth (SQSIZE, 0's based) and flow-control mode, known once its Connect
    /// succeeded (first time only): every command of the queue can then wait (for a buffer,
    /// for room in the transmit ring) without anything allocating.
    fn set_depth(&mut self, waiting: &mut Intake<Waiting>, sqsize: u16, fc_disabled: bool) {
        if self.depth_set {
            return;
        }
        let depth = sqsize.saturating_add(1);
        self.tcp.set_queue_depth(depth);
        waiting.reserve(self.slot as usize, usize::from(depth));
        self.deferred.reserve_exact(usize::from(depth));
        self.fc_disabled = fc_disabled;
        self.depth_set = true;
    }

    /// A read ran in the transmit ring: counted.
    fn ran_in_window(&mut self, cx: &mut Ctx<'_>) {
        cx.direct.reads += 1;
        *cx.commands += 1;
        self.recent += 1;
    }

    /// Hands a controller response to the transport.
    fn deliver(&mut self, pool: &mut BufPools, resp: Response) {
        let data = match resp.buf {
            Some(b) if resp.data_len > 0 => Some((NetBuf(b), resp.data_len)),
            other => {
                recycle(pool, other);
                None
            }
        };
        if let Err(rejected) = self.tcp.complete(resp.cqe, data, self.fc_disabled) {
            recycle(pool, rejected.buf.map(|b| b.0));
        }
    }

    fn conn_ref(&self) -> ConnRef {
        ConnRef {
            slot: self.slot,
            serial: self.serial,
        }
    }

    /// Sends a command to the controller core (the connection's queue is held there) with
    /// its buffer: no copy, no allocation; the buffer comes back with the answer.
    fn forward(&mut self, cx: &mut Ctx<'_>, sqe: Sqe, buf: Option<IoBuf>, data_len: u32) {
        cx.outbox.push(ToHolder::Capsule {
            conn: self.conn_ref(),
            sqe,
            buf,
            data_len,
            status: None,
        });
    }

    /// The controller core's answer to a forwarded command: the completion goes out with
    /// its data; a successful Connect sets the queue's depth, and an adopted I/O queue is
    /// served by this core's target from now on (if it cannot be, the controller core keeps
    /// serving it through [`ToHolder`]).
    #[allow(clippy::too_many_arguments)]
    fn answered(
        &mut self,
        pool: &mut BufPools,
        waiting: &mut Intake<Waiting>,
        target: &mut Target,
        now: Instant,
        resp: Response,
        depth: Option<(u16, bool)>,
        adopt: Option<Box<Adoption>>,
    ) {
        if let Some((sqsize, fc)) = depth {
            self.set_depth(waiting, sqsize, fc);
        }
        if let Some(a) = adopt
            && target.adopt_io_queue(now, self.queue, &a).is_ok()
        {
            self.forward = false;
            self.cntlid = a.cntlid;
        }
        self.deliver(pool, resp);
    }

    fn submit(&mut self, cx: &mut Ctx<'_>, sqe: Sqe, buf: Option<IoBuf>, data_len: u32) {
        *cx.commands += 1;
        self.recent += 1;
        if self.forward {
            return self.forward(cx, sqe, buf, data_len);
        }
        let req = Request {
            sqe,
            buf,
            data_len,
            cookie: self.slot,
        };
        let resp = cx.target.submit(cx.now, self.queue, req);
        // After a successful Connect the queue's depth and flow-control mode are known; its
        // commands can all wait for buffers without the intake allocating.
        if !self.depth_set
            && let Some(info) = cx.target.queue_info(self.queue)
        {
            self.set_depth(cx.waiting, info.sqsize, info.sq_flow_control_disabled);
        }
        if let Some(resp) = resp {
            self.deliver(cx.pool, resp);
        }
    }

    /// Fails a command the transport rejected, with the status it chose; the controller core
    /// accounts its submission queue slot.
    fn fail(&mut self, cx: &mut Ctx<'_>, sqe: Sqe, status: Status) {
        if self.forward {
            cx.outbox.push(ToHolder::Capsule {
                conn: self.conn_ref(),
                sqe,
                buf: None,
                data_len: 0,
                status: Some(status),
            });
            return;
        }
        let req = Request {
            sqe,
            buf: None,
            data_len: 0,
            cookie: self.slot,
        };
        let resp = cx.target.reject(cx.now, self.queue, req, status);
        self.deliver(cx.pool, resp);
    }

    /// Starts work that needs a buffer, or queues it until the pool has one. Work already
    /// waiting, on any connection, goes first: commands keep their order, and connections
    /// are served in arrival order ([`NvmfService::start_waiting`]).
    fn start(&mut self, cx: &mut Ctx<'_>, w: Waiting) {
        let buf = if cx.waiting.is_empty() {
            take(cx.pool, w.len())
        } else {
            None
        };
        match buf {
            Some(b) => self.begin(cx, w, b),
            None => {
                cx.waiting.push(self.slot as usize, w);
            }
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

    /// Runs a read that returns data (`sqe`, a `Command` event without a buffer, `data_len`
    /// bytes) inside the socket's transmit window, its data read straight into the C2HData
    /// PDU ([`TargetConnection::complete_in_window`] with [`Target::submit_now`]). Unless it
    /// ran, nothing changed; see [`InWindow`] for what the caller does then.
    ///
    /// The window is all the free space of the ring (`send_wrapped`, Keel's smoltcp patch):
    /// where it wraps, the data goes on at the ring's start (`NowData::ReadSplit`, for
    /// backends that read into two pieces). With too little room the read waits for it
    /// ([`InWindow::NoRoom`], [`Conn::run_deferred`]) rather than take a buffer: that would
    /// cost a third copy of the data (namespace → buffer → ring → frame), and while its PDU
    /// went into the ring piece by piece every later read would have taken one too.
    fn read_in_window(
        &mut self,
        cx: &mut Ctx<'_>,
        sock: &mut tcp::Socket,
        sqe: &Sqe,
        data_len: u32,
    ) -> InWindow {
        if self.forward {
            return InWindow::Declined;
        }
        // PDUs already queued go first, so the window is at the end of the stream.
        self.flush(sock);
        let (queue, cookie, fc) = (self.queue, self.slot, self.fc_disabled);
        let tcp = &mut self.tcp;
        let (mut ran, mut called, mut room) = (false, false, (0, 0));
        // All the free space, also where the ring wraps to its start: the PDU's header
        // needs to fit before the end, its data may go on at the start.
        let sent = sock.send_wrapped(|first, second| {
            room = (first.len(), second.len());
            let n = tcp.complete_in_split_window(sqe.cid, (first, second), fc, |a, b| {
                called = true;
                let data = if b.is_empty() {
                    NowData::Read(a)
                } else {
                    NowData::ReadSplit(a, b)
                };
                let r = cx.target.submit_now(cx.now, queue, sqe, cookie, data)?;
                ran = true;
                Some((r.cqe, r.data_len))
            });
            (n, n)
        });
        let need = data_len as usize + PDU_ROOM;
        if ran {
            InWindow::Ran
        } else if sent.is_ok()
            && !called
            && (room.0 + room.1 < need || room.0 < PDU_ROOM || self.tcp.wants_transmit())
            && need <= sock.send_capacity()
        {
            InWindow::NoRoom
        } else {
            InWindow::Declined
        }
    }

    /// Runs the deferred reads, oldest first, while the transmit ring has room for them;
    /// returns whether any ran (or went to take a buffer).
    fn run_deferred(&mut self, cx: &mut Ctx<'_>, sock: &mut tcp::Socket) -> bool {
        let mut any = false;
        while let Some(&(sqe, data_len)) = self.deferred.front() {
            match self.read_in_window(cx, sock, &sqe, data_len) {
                InWindow::NoRoom => break,
                InWindow::Ran => self.ran_in_window(cx),
                InWindow::Declined => self.start(cx, Waiting::Command { sqe, data_len }),
            }
            self.deferred.pop_front();
            any = true;
        }
        any
    }

    /// Acts on the transport's events; returns whether there were any.
    fn handle_events(&mut self, cx: &mut Ctx<'_>, sock: &mut tcp::Socket) -> bool {
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
                } => {
                    // Behind reads already waiting for the ring, in arrival order; runs at once
                    // if none waits and the ring has room.
                    self.deferred.push_back((sqe, data_len));
                    self.run_deferred(cx, sock);
                }
                TcpEvent::CommandFailed { sqe, buf, status } => {
                    recycle(cx.pool, buf.map(|b| b.0));
                    self.fail(cx, sqe, status);
                }
                TcpEvent::BufferReleased { buf, .. } => recycle(cx.pool, Some(buf.0)),
                TcpEvent::Closed { .. } => self.closing = true,
            }
        }
        any
    }

    /// Moves the connection's pending PDUs into its socket's transmit buffer.
    fn flush(&mut self, sock: &mut tcp::Socket) {
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

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn small_commands_take_small_buffers_then_large_ones() {
        let mut p = BufPools::new(2, 3).unwrap();
        assert_eq!((p.available(), p.count()), (5, 5));
        // 4 KiB and less: the small class while it lasts, then the large one.
        let small: Vec<IoBuf> = (0..3).map(|_| p.get(4096).unwrap()).collect();
        assert!(small.iter().all(|b| b.capacity() == SMALL_BUF));
        let spill = p.get(512).unwrap();
        assert_eq!(spill.capacity(), MAX_TRANSFER);
        // Larger than a small buffer: only the large class; larger than the largest
        // transfer: nothing, and nothing is lost.
        let big = p.get(8192).unwrap();
        assert_eq!(big.capacity(), MAX_TRANSFER);
        assert!(p.get(4096).is_none());
        assert_eq!(p.available(), 0);
        for b in small.into_iter().chain([spill, big]) {
            p.put(b);
        }
        assert_eq!(p.available(), 5);
        assert!(p.get(MAX_TRANSFER + 1).is_none());
        assert_eq!(p.available(), 5);
        // Each buffer went back to the class that carved it.
        let b = p.get(MAX_TRANSFER).unwrap();
        let c = p.get(MAX_TRANSFER).unwrap();
        assert!(p.get(MAX_TRANSFER).is_none(), "only two large buffers");
        p.put(b);
        p.put(c);
    }
}
