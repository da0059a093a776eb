//! The network stack: virtio-net, smoltcp (IPv4, ARP, ICMP echo, TCP, DHCPv4), and a pool of
//! TCP sockets (created as listeners need them, up to [`MAX_SOCKETS`], then reused) with
//! listeners that are re-armed as soon as a connection takes one.
//!
//! Addressing: DHCPv4 by default (QEMU user networking answers it); `keel.ip=A.B.C.D/N` and
//! `keel.gw=A.B.C.D` in the boot arguments set a static address instead.
//!
//! TCP is tuned for storage: 256 KiB send and receive buffers per connection (window scaling is
//! negotiated from the buffer size), Nagle off and no delayed ACK so responses leave at once,
//! keep-alive probes so half-open connections are found and freed.

use crate::hw::{Hw, Nic};
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// TCP buffer size per direction per connection.
pub const TCP_BUFFER: usize = 256 * 1024;
/// Sockets in the pool: connections plus armed listeners.
pub const MAX_SOCKETS: usize = 72;
/// How long a closing connection may take to finish its close before it is reset.
pub const CLOSE_GRACE_NS: u64 = 2_000_000_000;
/// Listening sockets kept armed per port, so bursts of connections are not refused.
const LISTENERS_PER_PORT: usize = 4;

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
    /// Sockets closing, with the time (ns) after which they are reset.
    draining: Vec<(SocketHandle, u64)>,
    listening: Vec<(SocketHandle, u16)>,
    ports: Vec<u16>,
    /// Ports whose connections only [`NetStack::take_accepted_on`] hands out.
    routed: Vec<u16>,
    accepted: Vec<Accepted>,
    /// Connections refused because the pool was exhausted.
    pub refused: u64,
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
        let storage: Vec<SocketStorage<'static>> =
            (0..MAX_SOCKETS + 1).map(|_| SocketStorage::EMPTY).collect();
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
            draining: Vec::with_capacity(MAX_SOCKETS),
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
        // Room for both buffers and a margin for everything else (an allocation failure
        // would end the firmware).
        if self.created >= MAX_SOCKETS || H::heap_free() < 4 * TCP_BUFFER {
            return None;
        }
        self.created += 1;
        let rx = tcp::SocketBuffer::new(alloc::vec![0u8; TCP_BUFFER]);
        let tx = tcp::SocketBuffer::new(alloc::vec![0u8; TCP_BUFFER]);
        Some(self.sockets.add(tcp::Socket::new(rx, tx)))
    }

    fn arm(&mut self) {
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

    /// Whether every port has an armed listener.
    pub fn listening_on_all(&self) -> bool {
        self.ports
            .iter()
            .all(|p| self.listening.iter().any(|(_, q)| q == p))
    }

    /// Runs the interface: receive, process, send. Returns whether anything changed.
    pub fn poll(&mut self, now_ns: u64) -> bool {
        let now = instant(now_ns);
        let changed = self.iface.poll(now, &mut self.device, &mut self.sockets)
            != smoltcp::iface::PollResult::None;
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
                    log::info!("net: DHCP address {} router {:?}", cfg.address, cfg.router);
                }
                Some(dhcpv4::Event::Deconfigured) if had_address => {
                    self.iface.update_ip_addrs(|a| a.clear());
                    self.iface.routes_mut().remove_default_ipv4_route();
                    log::warn!("net: DHCP lease lost");
                }
                Some(dhcpv4::Event::Deconfigured) | None => {}
            }
        }
        // Listeners that took a connection become accepted connections; re-arm at once.
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
        let sockets = &mut self.sockets;
        let free = &mut self.free;
        self.draining.retain(|&(h, deadline)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            let done = match s.state() {
                tcp::State::Closed => true,
                // Both sides closed: nothing more will be sent; skip TIME-WAIT's hold.
                tcp::State::TimeWait => {
                    s.abort();
                    true
                }
                _ if now_ns >= deadline => {
                    s.abort();
                    true
                }
                _ => false,
            };
            if done {
                free.push(h);
            }
            !done
        });
        if self.free.is_empty() && self.created >= MAX_SOCKETS && !self.listening_on_all() {
            self.refused += 1;
        }
        self.arm();
        changed
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
            .push((h, now_ns.saturating_add(CLOSE_GRACE_NS)));
    }

    /// When smoltcp next needs attention.
    pub fn poll_delay(&mut self, now_ns: u64) -> Option<Duration> {
        self.iface.poll_delay(instant(now_ns), &self.sockets)
    }
}
