//! The network stack: virtio-net, smoltcp (IPv4, ARP, ICMP echo, TCP, DHCPv4), and a pool of
//! TCP sockets (created as listeners need them, up to [`MAX_SOCKETS`], then reused) with
//! listeners that are re-armed as soon as a connection takes one.
//!
//! Storms of connections (many SYNs at once, peers that never speak) must not turn legitimate
//! hosts away: received packets are processed a few at a time and the listeners re-armed in
//! between, so a burst of SYNs never finds every listener taken while the pool has sockets;
//! closed sockets return to the pool on the next pass; and when the pool runs short
//! ([`NetStack::short_of_sockets`]) sockets still finishing a graceful close are reset, and the
//! services evict connections that have not started their protocol (NVMe/TCP connections still
//! waiting for their ICReq, see `crate::nvmf`).
//! Outgoing connections (the initiator of remote volumes, through [`keel_remote::Net`]) have a
//! pool of their own, up to [`MAX_CLIENT_SOCKETS`]: a flood of incoming connections never
//! starves a remote volume, and a remote volume never takes a listener's socket. Client
//! sockets use ephemeral local ports (49152-65535, RFC 6335), are reset when closed and reused
//! once the reset has been sent.
//!
//! Addressing: DHCPv4 by default (QEMU user networking answers it); `keel.ip=A.B.C.D/N` and
//! `keel.gw=A.B.C.D` in the boot arguments set a static address instead.
//!
//! TCP is tuned for storage: 256 KiB send and receive buffers per connection (window scaling is
//! negotiated from the buffer size), Nagle off and no delayed ACK so responses leave at once,
//! keep-alive probes so half-open connections are found and freed.

use crate::hw::{Hw, Nic};
use crate::klog;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// TCP receive buffer size per connection.
pub const TCP_BUFFER: usize = 256 * 1024;
/// TCP transmit buffer size per connection: room for two whole 128 KiB reads one after the
/// other from the start of the ring (each a C2HData PDU with its response capsule, a few
/// dozen bytes over 128 KiB), so NVMe/TCP can read both straight into the ring
/// (`crate::nvmf`'s read in window) instead of one, without a wrap in between.
pub const TCP_TX_BUFFER: usize = TCP_BUFFER + 4 * 1024;
/// Sockets in the pool: connections plus armed listeners. 96: a host with 64 I/O queues
/// (8 controllers of 8 queues: 72 connections) plus the 12 listeners of the NVMe/TCP,
/// discovery and management ports, a management session and room to spare.
pub const MAX_SOCKETS: usize = 96;
/// How long a closing connection may take to finish its close before it is reset.
pub const CLOSE_GRACE_NS: u64 = 2_000_000_000;
/// Listening sockets kept armed per port, so bursts of connections are not refused.
const LISTENERS_PER_PORT: usize = 4;
/// Sockets kept spare beyond the armed listeners: fewer, and the services make room
/// ([`NetStack::short_of_sockets`]).
const SPARE_SOCKETS: usize = LISTENERS_PER_PORT;
/// Client sockets (outgoing connections) at most, a budget separate from [`MAX_SOCKETS`]:
/// e.g. two remote volumes of two paths with an admin and 4 I/O connections each take 20.
pub const MAX_CLIENT_SOCKETS: usize = 48;
/// The ephemeral port range (RFC 6335 §6).
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u16 = 16384;

/// How the interface gets its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// DHCPv4.
    Dhcp,
    /// A fixed address and optional gateway.
    Static(Ipv4Cidr, Option<Ipv4Address>),
}

impl Addressing {
    /// Reads `keel.ip=`/`keel.gw=` from boot arguments; DHCP when absent.
    pub fn from_bootargs(args: &str) -> Self {
        let get = |key: &str| args.split_whitespace().find_map(|a| a.strip_prefix(key));
        let cidr = get("keel.ip=").and_then(|s| s.parse::<Ipv4Cidr>().ok());
        let gw = get("keel.gw=").and_then(|s| s.parse::<Ipv4Address>().ok());
        match cidr {
            Some(c) => Addressing::Static(c, gw),
            None => Addressing::Dhcp,
        }
    }
}

/// A connection a listener accepted, for a service to claim.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    /// The socket.
    pub handle: SocketHandle,
    /// The local port it was accepted on (routes it to its service).
    pub port: u16,
}

/// The interface, its device and its sockets.
pub struct NetStack<H: Hw> {
    /// The NIC.
    pub device: H::Nic,
    /// smoltcp's interface.
    pub iface: Interface,
    /// Every socket.
    pub sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    free: Vec<SocketHandle>,
    /// Sockets created so far (at most [`MAX_SOCKETS`]).
    created: usize,
    /// Sockets closing, with the time (ns) after which they are reset, and whether they are
    /// client sockets.
    draining: Vec<(SocketHandle, u64, bool)>,
    /// Client sockets free for an outgoing connection.
    client_free: Vec<SocketHandle>,
    /// Client sockets created so far (at most [`MAX_CLIENT_SOCKETS`]).
    clients_created: usize,
    /// Client sockets in use.
    clients: Vec<SocketHandle>,
    /// Next ephemeral port to try (offset into the range).
    next_port: u16,
    /// The ephemeral ports this stack uses: `eph_count` from `eph_first` (the whole range
    /// on one core; a share of it per core when several cores' stacks share one address,
    /// [`NetStack::set_ephemeral_ports`]).
    eph_first: u16,
    eph_count: u16,
    listening: Vec<(SocketHandle, u16)>,
    ports: Vec<u16>,
    /// Ports whose connections only [`NetStack::take_accepted_on`] hands out.
    routed: Vec<u16>,
    accepted: Vec<Accepted>,
    /// Passes that left a port without an armed listener because the pool was exhausted
    /// (connections arriving then are refused with a reset).
    pub refused: u64,
}

/// The socket pool's state, for status reports and leak checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounts {
    /// Sockets created so far.
    pub created: usize,
    /// Most sockets the pool creates.
    pub max: usize,
    /// Closed sockets ready for reuse.
    pub free: usize,
    /// Armed listeners.
    pub listening: usize,
    /// Sockets finishing a close.
    pub draining: usize,
    /// See [`NetStack::refused`].
    pub refused: u64,
    /// Heap bytes the buffers of every socket created so far hold (client sockets included):
    /// sockets are kept for reuse, so this is what the pools keep of the heap.
    pub buffer_bytes: usize,
}

impl<H: Hw> core::fmt::Debug for NetStack<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetStack")
            .field("addr", &self.address())
            .finish_non_exhaustive()
    }
}

/// Milliseconds for smoltcp from nanoseconds since reset.
pub fn instant(now_ns: u64) -> Instant {
    Instant::from_micros((now_ns / 1_000) as i64)
}

impl<H: Hw> NetStack<H> {
    /// Builds the stack on a NIC.
    pub fn new(mut device: H::Nic, addressing: Addressing, now_ns: u64, seed: u64) -> Self {
        let mac = EthernetAddress(device.mac());
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut device, instant(now_ns));
        // No empty slots: smoltcp walks every slot of the set, empty or not, for each segment
        // it sends and each packet it receives (`SocketSet::items_mut`), so the set grows as
        // sockets are created (`SocketSet::add` pushes onto an owned Vec) instead of starting
        // with a slot for each socket the pool may ever create. The capacity is reserved once:
        // no reallocation while serving.
        let storage: Vec<SocketStorage<'static>> =
            Vec::with_capacity(MAX_SOCKETS + MAX_CLIENT_SOCKETS + 1);
        let mut sockets = SocketSet::new(storage);
        let dhcp = match addressing {
            Addressing::Dhcp => Some(sockets.add(dhcpv4::Socket::new())),
            Addressing::Static(cidr, gw) => {
                iface.update_ip_addrs(|a| {
                    let _ = a.push(IpCidr::Ipv4(cidr));
                });
                if let Some(gw) = gw {
                    let _ = iface.routes_mut().add_default_ipv4_route(gw);
                }
                None
            }
        };
        Self {
            device,
            iface,
            sockets,
            dhcp,
            free: Vec::with_capacity(MAX_SOCKETS),
            created: 0,
            draining: Vec::with_capacity(MAX_SOCKETS + MAX_CLIENT_SOCKETS),
            client_free: Vec::new(),
            clients_created: 0,
            clients: Vec::new(),
            next_port: (seed % u64::from(EPHEMERAL_COUNT)) as u16,
            eph_first: EPHEMERAL_FIRST,
            eph_count: EPHEMERAL_COUNT,
            listening: Vec::new(),
            ports: Vec::new(),
            routed: Vec::new(),
            accepted: Vec::with_capacity(MAX_SOCKETS),
            refused: 0,
        }
    }

    /// The interface's IPv4 address, once it has one.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        self.iface
            .ip_addrs()
            .iter()
            .map(|IpCidr::Ipv4(c)| *c)
            .next()
    }

    /// Starts listening on `port`.
    pub fn listen(&mut self, port: u16) {
        if !self.ports.contains(&port) {
            self.ports.push(port);
        }
        self.arm();
    }

    /// Starts listening on `port` for a service of its own: its connections are handed out
    /// only by [`NetStack::take_accepted_on`], never by [`NetStack::take_accepted`].
    pub fn listen_routed(&mut self, port: u16) {
        if !self.routed.contains(&port) {
            self.routed.push(port);
        }
        self.listen(port);
    }

    /// A closed socket: a recycled one, else a new one while the pool is below
    /// [`MAX_SOCKETS`] and the heap has room for its buffers. Sockets are created when a
    /// listener is armed (at boot, and when a connection takes one), never per I/O, and are
    /// reused from then on; boot only pays for the listeners' buffers, and smoltcp walks only
    /// the sockets that exist.
    fn take_socket(&mut self) -> Option<SocketHandle> {
        if let Some(h) = self.free.pop() {
            return Some(h);
        }
        if self.created >= MAX_SOCKETS {
            return None;
        }
        let h = self.new_socket()?;
        self.created += 1;
        Some(h)
    }

    /// A new socket with its buffers, when the heap has room for both buffers and a margin
    /// for everything else (an allocation failure would end the firmware).
    fn new_socket(&mut self) -> Option<SocketHandle> {
        if H::heap_free() < 4 * TCP_BUFFER {
            return None;
        }
        let rx = tcp::SocketBuffer::new(alloc::vec![0u8; TCP_BUFFER]);
        let tx = tcp::SocketBuffer::new(alloc::vec![0u8; TCP_TX_BUFFER]);
        Some(self.sockets.add(tcp::Socket::new(rx, tx)))
    }

    /// A closed client socket: a recycled one, else a new one within
    /// [`MAX_CLIENT_SOCKETS`].
    fn take_client_socket(&mut self) -> Option<SocketHandle> {
        if let Some(h) = self.client_free.pop() {
            return Some(h);
        }
        if self.clients_created >= MAX_CLIENT_SOCKETS {
            return None;
        }
        let h = self.new_socket()?;
        self.clients_created += 1;
        Some(h)
    }

    /// Outgoing connections take their local ports from `count` ports at `first` only:
    /// stacks of several cores share one address, and a reply must reach the core whose
    /// connection it is by its destination port alone (`crate::percore`). Ports outside
    /// the ephemeral range are refused (the range is kept).
    pub fn set_ephemeral_ports(&mut self, first: u16, count: u16) {
        let end = u32::from(first) + u32::from(count);
        if first < EPHEMERAL_FIRST
            || count == 0
            || end > u32::from(EPHEMERAL_FIRST) + u32::from(EPHEMERAL_COUNT)
        {
            return;
        }
        self.eph_first = first;
        self.eph_count = count;
        self.next_port %= count;
    }

    /// An ephemeral port no client socket in use has.
    fn ephemeral_port(&mut self) -> u16 {
        for _ in 0..self.eph_count {
            let port = self.eph_first + self.next_port;
            self.next_port = (self.next_port + 1) % self.eph_count;
            let sockets = &self.sockets;
            let taken = self.clients.iter().any(|&h| {
                sockets
                    .get::<tcp::Socket>(h)
                    .local_endpoint()
                    .is_some_and(|e| e.port == port)
            });
            if !taken {
                return port;
            }
        }
        self.eph_first // unreachable while a core has more ports than client sockets
    }

    /// Client sockets in use (outgoing connections).
    #[cfg(test)]
    pub fn client_sockets(&self) -> usize {
        self.clients.len()
    }

    fn arm(&mut self) {
        // Cheap check first: every pass calls this, and nearly always every port is armed.
        if self.fully_armed() {
            return;
        }
        for i in 0..self.ports.len() {
            let port = self.ports[i];
            let armed = self.listening.iter().filter(|(_, p)| *p == port).count();
            for _ in armed..LISTENERS_PER_PORT {
                let Some(h) = self.take_socket() else { return };
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                s.set_nagle_enabled(false);
                s.set_ack_delay(None);
                s.set_keep_alive(Some(Duration::from_secs(10)));
                s.set_timeout(Some(Duration::from_secs(60)));
                if s.listen(port).is_ok() {
                    self.listening.push((h, port));
                } else {
                    self.free.push(h);
                }
            }
        }
    }

    /// Whether every port has all its listeners ([`NetStack::arm`] never arms more).
    fn fully_armed(&self) -> bool {
        self.listening.len() >= self.ports.len() * LISTENERS_PER_PORT
    }

    /// Whether every port has an armed listener.
    pub fn listening_on_all(&self) -> bool {
        self.fully_armed()
            || self
                .ports
                .iter()
                .all(|p| self.listening.iter().any(|(_, q)| q == p))
    }

    /// Runs the interface: receive, process, send. Returns whether anything changed.
    pub fn poll(&mut self, now_ns: u64) -> bool {
        let received = self.poll_ingress(now_ns);
        self.poll_egress(now_ns) | received
    }

    /// The receiving half of [`NetStack::poll`]: received packets into the sockets, new
    /// connections accepted. The poll loop runs the services next and then
    /// [`NetStack::poll_egress`], so what they answer leaves in the same segments as the ACKs
    /// of what came in (one pass, as few frames as the sockets allow).
    pub fn poll_ingress(&mut self, now_ns: u64) -> bool {
        use smoltcp::iface::PollIngressSingleResult;
        let now = instant(now_ns);
        let mut changed = false;
        self.iface.poll_maintenance(now);
        // Received packets a few at a time (no more than a port has listeners), re-arming the
        // listeners in between: a burst of SYNs larger than the armed listeners would
        // otherwise be answered with resets while the pool still has sockets.
        loop {
            let mut got = 0;
            while got < LISTENERS_PER_PORT {
                match self
                    .iface
                    .poll_ingress_single(now, &mut self.device, &mut self.sockets)
                {
                    PollIngressSingleResult::None => break,
                    PollIngressSingleResult::PacketProcessed => got += 1,
                    PollIngressSingleResult::SocketStateChanged => {
                        got += 1;
                        changed = true;
                    }
                }
            }
            if got == 0 {
                break;
            }
            self.collect_accepted();
            self.arm();
            if got < LISTENERS_PER_PORT {
                break;
            }
        }
        changed
    }

    /// The sending half of [`NetStack::poll`]: everything the sockets have to send, one
    /// virtqueue notification; DHCP, released sockets, listeners re-armed.
    pub fn poll_egress(&mut self, now_ns: u64) -> bool {
        use smoltcp::iface::PollResult;
        let now = instant(now_ns);
        let mut changed = false;
        while self
            .iface
            .poll_egress(now, &mut self.device, &mut self.sockets)
            != PollResult::None
        {
            changed = true;
        }
        self.device.flush_tx(); // one virtqueue notification for the frames of this pass
        if let Some(h) = self.dhcp {
            let had_address = self.address().is_some();
            match self.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
                Some(dhcpv4::Event::Configured(cfg)) => {
                    self.iface.update_ip_addrs(|a| {
                        a.clear();
                        let _ = a.push(IpCidr::Ipv4(cfg.address));
                    });
                    if let Some(r) = cfg.router {
                        let _ = self.iface.routes_mut().add_default_ipv4_route(r);
                    }
                    klog::info!(
                        "net: DHCP address {} router {}",
                        klog::D(&cfg.address),
                        klog::Dbg(&cfg.router)
                    );
                }
                Some(dhcpv4::Event::Deconfigured) if had_address => {
                    self.iface.update_ip_addrs(|a| a.clear());
                    self.iface.routes_mut().remove_default_ipv4_route();
                    klog::warning!("net: DHCP lease lost");
                }
                Some(dhcpv4::Event::Deconfigured) | None => {}
            }
        }
        // Listeners leave the Listen state only on a received SYN: `poll_ingress` collected
        // them.
        self.recycle(now_ns);
        self.arm();
        if !self.listening_on_all() {
            self.refused += 1;
        }
        changed
    }

    /// Listeners that took a connection become accepted connections (re-armed by the caller).
    fn collect_accepted(&mut self) {
        let mut i = 0;
        while i < self.listening.len() {
            let (h, port) = self.listening[i];
            if self.sockets.get::<tcp::Socket>(h).state() != tcp::State::Listen {
                self.listening.swap_remove(i);
                self.accepted.push(Accepted { handle: h, port });
            } else {
                i += 1;
            }
        }
    }

    /// Returns released sockets to the pool as soon as they are done: closed (and their reset,
    /// if any, sent), or both sides closed (TIME-WAIT's hold is skipped: nothing more will be
    /// sent), or past their grace period (then reset).
    fn recycle(&mut self, now_ns: u64) {
        let sockets = &mut self.sockets;
        let free = &mut self.free;
        let client_free = &mut self.client_free;
        self.draining.retain(|&(h, deadline, client)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            let done = match s.state() {
                // An aborted socket keeps its peer until its reset has left.
                tcp::State::Closed => s.remote_endpoint().is_none(),
                tcp::State::TimeWait => true,
                _ => {
                    if now_ns >= deadline {
                        s.abort();
                    }
                    false
                }
            };
            if done {
                if client {
                    client_free.push(h);
                } else {
                    free.push(h);
                }
            }
            !done
        });
    }

    /// Sockets that can become listeners without taking one from a connection: free ones,
    /// ones still to be created (heap permitting), and aborted ones whose reset leaves on the
    /// next pass.
    fn spare(&self) -> usize {
        let creatable = if H::heap_free() >= 4 * TCP_BUFFER {
            MAX_SOCKETS - self.created
        } else {
            0
        };
        let aborted = self
            .draining
            .iter()
            .filter(|(h, _, client)| {
                !client && self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Closed
            })
            .count();
        self.free.len() + creatable + aborted
    }

    /// Whether the pool runs short: fewer sockets are spare than the missing listeners plus
    /// a port's worth. Sockets still finishing a graceful close are then reset at once (their
    /// connections are over); services should close connections that have not started their
    /// protocol, oldest first, until this is false, so a new connection always finds a
    /// listener.
    pub fn short_of_sockets(&mut self) -> bool {
        let missing: usize = self
            .ports
            .iter()
            .map(|p| {
                let armed = self.listening.iter().filter(|(_, q)| q == p).count();
                LISTENERS_PER_PORT.saturating_sub(armed)
            })
            .sum();
        let need = missing + SPARE_SOCKETS;
        if self.spare() >= need {
            return false;
        }
        // Graceful closes are the cheapest room: their connections are over.
        for &(h, _, client) in &self.draining {
            if client {
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() != tcp::State::Closed {
                s.abort();
            }
        }
        self.spare() < need
    }

    /// The pool's state.
    pub fn counts(&self) -> SocketCounts {
        SocketCounts {
            created: self.created,
            max: MAX_SOCKETS,
            free: self.free.len(),
            listening: self.listening.len(),
            draining: self.draining.len(),
            refused: self.refused,
            buffer_bytes: (self.created + self.clients_created) * (TCP_BUFFER + TCP_TX_BUFFER),
        }
    }

    /// Hands out connections accepted since the last call, except those on routed ports
    /// ([`NetStack::listen_routed`]).
    pub fn take_accepted(&mut self) -> impl Iterator<Item = Accepted> + '_ {
        let routed = &self.routed;
        self.accepted
            .extract_if(.., move |a| !routed.contains(&a.port))
    }

    /// Hands out connections accepted on `port` since the last call.
    pub fn take_accepted_on(&mut self, port: u16) -> impl Iterator<Item = Accepted> + '_ {
        self.accepted.extract_if(.., move |a| a.port == port)
    }

    /// Returns a finished connection's socket to the pool. `graceful`: what was queued is
    /// sent and the connection closed with a FIN (a peer that does not finish the close within
    /// [`CLOSE_GRACE_NS`] is reset); otherwise it is reset at once. The socket is reused once
    /// closed.
    pub fn release(&mut self, h: SocketHandle, graceful: bool, now_ns: u64) {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if graceful {
            s.close();
        } else if s.state() != tcp::State::Closed {
            s.abort();
        }
        self.draining
            .push((h, now_ns.saturating_add(CLOSE_GRACE_NS), false));
    }

    /// When smoltcp next needs attention.
    pub fn poll_delay(&mut self, now_ns: u64) -> Option<Duration> {
        self.iface.poll_delay(instant(now_ns), &self.sockets)
    }
}

/// Outgoing connections for remote volumes, over the client pool. A socket closed here is
/// reset (RST) at the next pass of the interface and reused after that.
impl<H: Hw> keel_remote::Net for NetStack<H> {
    type Sock = SocketHandle;

    fn connect(&mut self, addr: keel_remote::PathAddr, _now_ns: u64) -> Option<SocketHandle> {
        self.address()?;
        let h = self.take_client_socket()?;
        let port = self.ephemeral_port();
        let cx = self.iface.context();
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        // No TCP keep-alive probes: the volume's NVMe Keep Alive (every KATO/2) finds a dead
        // peer first. A user timeout bounds a connection whose data is never acknowledged.
        s.set_keep_alive(None);
        s.set_timeout(Some(Duration::from_secs(60)));
        let remote = (
            smoltcp::wire::IpAddress::Ipv4(Ipv4Address::from(addr.ip)),
            addr.port,
        );
        match s.connect(cx, remote, port) {
            Ok(()) => {
                self.clients.push(h);
                Some(h)
            }
            Err(e) => {
                klog::warning!(
                    "remote: connect to {} from port {}: {}",
                    klog::D(&addr),
                    port,
                    klog::D(&e)
                );
                self.client_free.push(h);
                None
            }
        }
    }

    fn state(&mut self, sock: SocketHandle) -> keel_remote::SockState {
        use keel_remote::SockState;
        match self.sockets.get::<tcp::Socket>(sock).state() {
            tcp::State::SynSent | tcp::State::SynReceived => SockState::Connecting,
            tcp::State::Established => SockState::Established,
            _ => SockState::Closed,
        }
    }

    fn recv(&mut self, sock: SocketHandle, f: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        let s = self.sockets.get_mut::<tcp::Socket>(sock);
        let mut total = 0;
        // The ring may hand out its bytes in two pieces.
        while s.can_recv() {
            match s.recv(|b| {
                let n = f(b);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    }

    fn send(&mut self, sock: SocketHandle, f: &mut dyn FnMut(&mut [u8]) -> usize) -> usize {
        let s = self.sockets.get_mut::<tcp::Socket>(sock);
        let mut total = 0;
        while s.can_send() {
            match s.send(|b| {
                let n = f(b);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    }

    fn close(&mut self, sock: SocketHandle, now_ns: u64) {
        let Some(i) = self.clients.iter().position(|&h| h == sock) else {
            return;
        };
        self.clients.swap_remove(i);
        let s = self.sockets.get_mut::<tcp::Socket>(sock);
        if s.state() != tcp::State::Closed {
            s.abort();
        }
        self.draining
            .push((sock, now_ns.saturating_add(CLOSE_GRACE_NS), true));
    }
}
