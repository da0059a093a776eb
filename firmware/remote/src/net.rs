//! The network seam: what the volume needs from a TCP stack. The firmware implements it over
//! smoltcp client sockets; the tests over an in-memory network.

use crate::config::PathAddr;
use core::fmt;

/// State of a client socket as the volume needs to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockState {
    /// SYN sent, not established yet (smoltcp `SynSent`/`SynReceived`).
    Connecting,
    /// Data may flow (smoltcp `Established`).
    Established,
    /// The connection is gone or was refused (reset, timed out, closed by the peer). Bytes
    /// the peer sent before closing may still be offered by [`Net::recv`].
    Closed,
}

/// TCP client sockets, driven without blocking.
///
/// Every call returns at once. The volume calls `recv` and `send` only on sockets it got from
/// `connect` and has not closed; it closes every socket it opened exactly once.
///
/// Firmware mapping (smoltcp 0.14): `connect` takes a socket from the pool and calls
/// `tcp::Socket::connect(iface.context(), (ip, port), local_port)` with a fresh ephemeral
/// port (it returns `None` when no socket or port is free); `state` maps `SynSent` /
/// `SynReceived` to `Connecting`, `Established` to `Established`, and everything else
/// (`Closed`, `CloseWait`, `TimeWait`, ...) to `Closed`; `recv` is `Socket::recv(|b| (f(b),
/// ..))` and `send` is `Socket::send(|b| (f(b), ..))`; `close` aborts (RST) and returns the
/// socket to the pool. Keep-alive probes and a user timeout on the socket are useful but not
/// required: the volume detects dead peers with NVMe Keep Alive and command timeouts.
pub trait Net {
    /// The socket handle.
    type Sock: Copy + Eq + fmt::Debug;

    /// Starts a connection to `addr`; `None` when no socket is available now (the volume
    /// tries again on a later poll, within its connect timeout).
    fn connect(&mut self, addr: PathAddr, now_ns: u64) -> Option<Self::Sock>;

    /// Where the connection is.
    fn state(&mut self, sock: Self::Sock) -> SockState;

    /// Offers received bytes to `f`, which returns how many it consumed (the volume always
    /// consumes all it is offered). Returns the count consumed; 0 when nothing is waiting.
    fn recv(&mut self, sock: Self::Sock, f: &mut dyn FnMut(&[u8]) -> usize) -> usize;

    /// Offers transmit buffer space to `f`, which fills a prefix and returns its length.
    /// Returns the count queued; 0 when there is no room (or the socket cannot send).
    fn send(&mut self, sock: Self::Sock, f: &mut dyn FnMut(&mut [u8]) -> usize) -> usize;

    /// Drops the connection (abort) and releases the socket.
    fn close(&mut self, sock: Self::Sock, now_ns: u64);
}
