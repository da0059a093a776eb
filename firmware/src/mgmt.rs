//! The management endpoint: a TCP listener on the management port (`mgmt_port` of the
//! configuration, 7000 by default) whose connections each run a [`keel_mgmt::Session`]: the
//! signed binary protocol of `keelctl status|provision push|reboot`, or `GET /metrics`.
//!
//! Bounded and non-blocking: at most [`MAX_SESSIONS`] connections (a new one resets the least
//! recently active),
//! each session reads nothing while its response waits to be sent, bytes are moved with one
//! `recv`/`send_slice` per socket buffer (no allocation per byte), and a connection that
//! stays silent for [`IDLE_TIMEOUT_NS`], fails too many requests, or speaks neither protocol
//! is closed. A reboot is answered first and happens once the peer has acknowledged the
//! reply (or after [`REBOOT_DRAIN_NS`]).

use crate::hw::Hw;
use crate::klog;
use crate::net::NetStack;
use alloc::vec::Vec;
use keel_mgmt::{Device, Session};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// Concurrent management connections.
pub const MAX_SESSIONS: usize = 4;
/// A connection with no traffic either way for this long is reset.
pub const IDLE_TIMEOUT_NS: u64 = 30_000_000_000;
/// A connection that has not chosen a protocol (or finished its HTTP request) by then is
/// reset.
pub const HANDSHAKE_TIMEOUT_NS: u64 = 10_000_000_000;
/// How long an answered reboot waits for the peer to acknowledge the reply.
pub const REBOOT_DRAIN_NS: u64 = 2_000_000_000;

struct Conn {
    socket: SocketHandle,
    session: Session,
    opened_ns: u64,
    last_ns: u64,
    reboot_since: Option<u64>,
}

/// What to do with a connection after a pass.
enum Fate {
    Keep,
    Close { graceful: bool },
}

/// The management service.
pub struct MgmtService {
    port: u16,
    conns: Vec<Conn>,
    /// Sessions reset to make room for a new connection.
    pub refused: u64,
}

impl core::fmt::Debug for MgmtService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MgmtService")
            .field("port", &self.port)
            .field("sessions", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl MgmtService {
    /// Starts listening on `port`.
    pub fn start<H: Hw>(port: u16, net: &mut NetStack<H>) -> Self {
        net.listen_routed(port);
        klog::info!(
            "mgmt: management endpoint on port {} (signed requests, GET /metrics)",
            port
        );
        MgmtService {
            port,
            conns: Vec::with_capacity(MAX_SESSIONS),
            refused: 0,
        }
    }

    /// Whether the poll loop may sleep: no reboot is waiting for its reply to drain.
    pub fn may_sleep(&self) -> bool {
        !self.conns.iter().any(|c| c.session.reboot_pending())
    }

    /// One pass: adopt new connections, move bytes, close what is done. Returns whether
    /// anything happened.
    pub fn poll<H: Hw, D: Device + ?Sized>(
        &mut self,
        now_ns: u64,
        net: &mut NetStack<H>,
        dev: &mut D,
    ) -> bool {
        let mut busy = false;
        loop {
            let next = net.take_accepted_on(self.port).next();
            let Some(a) = next else { break };
            busy = true;
            if self.conns.len() >= MAX_SESSIONS {
                // Full: the least recently active session makes room, so idle or stalled
                // connections cannot lock the operator out.
                self.refused += 1;
                if let Some(i) = (0..self.conns.len()).min_by_key(|&i| self.conns[i].last_ns) {
                    klog::warning!(
                        "mgmt: {} sessions open: the least active one is reset",
                        MAX_SESSIONS
                    );
                    let old = self.conns.swap_remove(i);
                    net.release(old.socket, false, now_ns);
                }
            }
            self.conns.push(Conn {
                socket: a.handle,
                session: Session::new(),
                opened_ns: now_ns,
                last_ns: now_ns,
                reboot_since: None,
            });
        }
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            let (fate, moved) = pass(c, now_ns, net, dev);
            busy |= moved;
            match fate {
                Fate::Keep => i += 1,
                Fate::Close { graceful } => {
                    let c = self.conns.swap_remove(i);
                    net.release(c.socket, graceful, now_ns);
                    busy = true;
                }
            }
        }
        busy
    }
}

/// Moves one connection's bytes; decides whether it stays.
fn pass<H: Hw, D: Device + ?Sized>(
    c: &mut Conn,
    now_ns: u64,
    net: &mut NetStack<H>,
    dev: &mut D,
) -> (Fate, bool) {
    let mut moved = false;
    let (failures, requests) = (c.session.failures(), c.session.requests());
    let sock = net.sockets.get_mut::<tcp::Socket>(c.socket);
    // Receive while the session takes bytes (it stops while a response is pending).
    while sock.can_recv() && !c.session.wants_close() {
        let taken = sock.recv(|bytes| {
            let n = c.session.feed(bytes, dev);
            (n, n)
        });
        match taken {
            Ok(0) | Err(_) => break,
            Ok(_) => moved = true,
        }
    }
    // Send what the session produced, as far as the socket buffer takes it; then the session
    // may take the next request in the same pass.
    loop {
        let mut sent = false;
        while !c.session.output().is_empty() && sock.can_send() {
            match sock.send_slice(c.session.output()) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    c.session.advance_output(n);
                    sent = true;
                }
            }
        }
        if !sent {
            break;
        }
        moved = true;
        let mut more = false;
        while sock.can_recv() && c.session.output().is_empty() && !c.session.wants_close() {
            match sock.recv(|bytes| {
                let n = c.session.feed(bytes, dev);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(_) => more = true,
            }
        }
        if !more {
            break;
        }
    }
    if moved {
        c.last_ns = now_ns;
    }
    if c.session.failures() > failures {
        klog::warning!(
            "mgmt: request refused (bad signature, replayed or malformed); {} failure(s) on this connection",
            c.session.failures()
        );
    }
    if c.session.requests() > requests {
        klog::info!(
            "mgmt: {} signed request(s) served",
            c.session.requests() - requests
        );
    }
    if c.session.reboot_pending() && c.session.output().is_empty() {
        let since = *c.reboot_since.get_or_insert(now_ns);
        if sock.send_queue() == 0 || !sock.may_send() || now_ns - since > REBOOT_DRAIN_NS {
            klog::info!("mgmt: reboot requested by a signed request; rebooting");
            c.session.transport_drained(dev);
        }
        return (Fate::Keep, moved);
    }
    let fate = if !sock.is_active() {
        Fate::Close { graceful: false }
    } else if c.session.wants_close() {
        Fate::Close { graceful: true }
    } else if sock.state() == tcp::State::CloseWait && c.session.output().is_empty() {
        // The peer closed its side and everything is sent.
        Fate::Close { graceful: true }
    } else if !c.session.is_binary() && now_ns.saturating_sub(c.opened_ns) > HANDSHAKE_TIMEOUT_NS {
        klog::warning!("mgmt: no complete greeting or HTTP request within 10 s: reset");
        Fate::Close { graceful: false }
    } else if now_ns.saturating_sub(c.last_ns) > IDLE_TIMEOUT_NS {
        klog::warning!(
            "mgmt: session idle for {} s: reset",
            IDLE_TIMEOUT_NS / 1_000_000_000
        );
        Fate::Close { graceful: false }
    } else {
        Fate::Keep
    };
    (fate, moved)
}
