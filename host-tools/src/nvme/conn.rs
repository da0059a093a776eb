//! One NVMe/TCP connection (one queue): a non-blocking TCP socket driven by `poll(2)` around
//! the sans-IO [`HostConnection`]. Reading and writing are interleaved in one loop, so a large
//! write never deadlocks against a controller that is sending us data at the same time.

use super::error::NvmeError;
use keel_nvme::{Cqe, Sqe};
use keel_nvmf_tcp::{Digests, HostConfig, HostConnection, HostEvent};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Size of the receive and transmit staging buffers.
const STAGE: usize = 256 * 1024;

/// A completed command: its CQE and the buffer given to `submit` (read data in it).
#[derive(Debug)]
pub struct Done {
    /// The completion queue entry.
    pub cqe: Cqe,
    /// The buffer passed to `submit`.
    pub buf: Option<Vec<u8>>,
}

#[derive(Debug)]
enum Finished {
    Done(Done),
    Aborted,
}

/// One NVMe/TCP connection after the ICReq/ICResp exchange.
#[derive(Debug)]
pub struct Connection {
    sock: TcpStream,
    host: HostConnection<Vec<u8>>,
    tx: Vec<u8>,
    tx_start: usize,
    tx_end: usize,
    rx: Vec<u8>,
    /// Completions taken from the transport while waiting for another CID. Events are pulled
    /// from the transport only when the caller asks for a completion: the transport frees a
    /// command slot (and may reuse its CID) as soon as its event is taken.
    stash: VecDeque<(u16, Finished)>,
    closed: Option<String>,
    epoch: Instant,
    peer: SocketAddr,
    maxh2cdata: u32,
    digests: Digests,
}

/// Resolves `addr` ("host:port") to its first socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr, NvmeError> {
    addr.to_socket_addrs()
        .map_err(|e| NvmeError::io(format!("resolving {addr}"), e))?
        .next()
        .ok_or_else(|| NvmeError::InvalidArgument(format!("{addr}: no address")))
}

impl Connection {
    /// Connects TCP and exchanges ICReq/ICResp, all within `timeout`.
    pub fn open(addr: SocketAddr, cfg: HostConfig, timeout: Duration) -> Result<Self, NvmeError> {
        let deadline = Instant::now() + timeout;
        let sock = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| NvmeError::io(format!("connecting to {addr}"), e))?;
        sock.set_nodelay(true)
            .and_then(|_| sock.set_nonblocking(true))
            .map_err(|e| NvmeError::io("configuring the socket", e))?;
        let host = HostConnection::new(cfg)
            .map_err(|e| NvmeError::InvalidArgument(format!("connection parameters: {e}")))?;
        let mut c = Self {
            sock,
            host,
            tx: vec![0; STAGE],
            tx_start: 0,
            tx_end: 0,
            rx: vec![0; STAGE],
            stash: VecDeque::new(),
            closed: None,
            epoch: Instant::now(),
            peer: addr,
            maxh2cdata: 0,
            digests: Digests::default(),
        };
        while c.maxh2cdata == 0 {
            let _ = c.next_event();
            if c.maxh2cdata != 0 {
                break;
            }
            if let Some(r) = &c.closed {
                return Err(NvmeError::Closed {
                    reason: format!("during the ICReq/ICResp exchange with {addr}: {r}"),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NvmeError::Timeout {
                    what: format!("ICResp from {addr}"),
                    after: timeout,
                });
            }
            c.poll_once(deadline - now)?;
        }
        Ok(c)
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The controller's MAXH2CDATA from ICResp.
    pub fn maxh2cdata(&self) -> u32 {
        self.maxh2cdata
    }

    /// The digests in force.
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Sets the largest write sent in-capsule (IOCCSZ×16 − 64).
    pub fn set_in_capsule_limit(&mut self, bytes: u32) {
        self.host.set_in_capsule_limit(bytes);
    }

    /// Why the connection closed, if it has.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Queues a command; returns its CID. `data` is the buffer and the transfer length.
    pub fn submit(&mut self, sqe: Sqe, data: Option<(Vec<u8>, u32)>) -> Result<u16, NvmeError> {
        if let Some(r) = &self.closed {
            return Err(NvmeError::Closed { reason: r.clone() });
        }
        let cid = self
            .host
            .submit(sqe, data)
            .map_err(|r| NvmeError::Rejected(r.reason))?;
        // Start sending at once; the rest goes out while we wait.
        self.flush()?;
        Ok(cid)
    }

    /// Waits for the completion of `cid`. Other completions seen meanwhile are kept for
    /// [`Connection::next_completion`].
    pub fn wait(&mut self, cid: u16, timeout: Duration, what: &str) -> Result<Done, NvmeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = match self.stash.iter().position(|(c, _)| *c == cid) {
                Some(i) => self.stash.remove(i).map(|(_, f)| f),
                None => loop {
                    match self.next_event() {
                        Some((c, f)) if c == cid => break Some(f),
                        Some(other) => self.stash.push_back(other),
                        None => break None,
                    }
                },
            };
            match found {
                Some(Finished::Done(d)) => return Ok(d),
                Some(Finished::Aborted) => return Err(self.closed_error(what)),
                None => {}
            }
            if self.closed.is_some() {
                return Err(self.closed_error(what));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NvmeError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
            self.poll_once(deadline - now)?;
        }
    }

    /// Waits for any completion, in the order they arrived.
    pub fn next_completion(
        &mut self,
        timeout: Duration,
        what: &str,
    ) -> Result<(u16, Done), NvmeError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.stash.pop_front().or_else(|| self.next_event()) {
                Some((cid, Finished::Done(d))) => return Ok((cid, d)),
                Some((_, Finished::Aborted)) => return Err(self.closed_error(what)),
                None => {}
            }
            if self.closed.is_some() {
                return Err(self.closed_error(what));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NvmeError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
            self.poll_once(deadline - now)?;
        }
    }

    fn closed_error(&self, what: &str) -> NvmeError {
        NvmeError::Closed {
            reason: format!(
                "{} (while waiting for {what})",
                self.closed.as_deref().unwrap_or("command aborted")
            ),
        }
    }

    /// Writes what the transport has to send, as far as the socket takes it.
    fn flush(&mut self) -> Result<(), NvmeError> {
        loop {
            if self.tx_start == self.tx_end {
                self.tx_start = 0;
                self.tx_end = self.host.transmit(&mut self.tx);
                if self.tx_end == 0 {
                    return Ok(());
                }
            }
            match self.sock.write(&self.tx[self.tx_start..self.tx_end]) {
                Ok(0) => {
                    self.mark_closed("the socket accepts no more data".into());
                    return Ok(());
                }
                Ok(n) => self.tx_start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.mark_closed(format!("send failed: {e}"));
                    return Err(NvmeError::io(format!("sending to {}", self.peer), e));
                }
            }
        }
    }

    fn wants_write(&self) -> bool {
        self.tx_start != self.tx_end || self.host.wants_transmit()
    }

    /// One round: send, wait up to `timeout` for the socket, receive, collect events.
    pub fn poll_once(&mut self, timeout: Duration) -> Result<(), NvmeError> {
        self.flush()?;
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN | if self.wants_write() { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(0, 1000) as libc::c_int;
        // Round sub-millisecond waits up so we do not spin.
        let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
        // SAFETY: `pfd` is one valid, initialised pollfd that lives across the call, and we
        // pass a count of 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(NvmeError::io("poll", e));
        }
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.receive()?;
        }
        self.flush()?;
        Ok(())
    }

    fn receive(&mut self) -> Result<(), NvmeError> {
        // Bounded so that sending gets its turn.
        for _ in 0..16 {
            match self.sock.read(&mut self.rx) {
                Ok(0) => {
                    self.mark_closed(format!("{} closed the TCP connection", self.peer));
                    self.host.close();
                    return Ok(());
                }
                Ok(n) => {
                    let now = self.epoch.elapsed().as_millis() as u64;
                    self.host.recv(now, &self.rx[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.mark_closed(format!("receive failed: {e}"));
                    self.host.close();
                    return Err(NvmeError::io(format!("receiving from {}", self.peer), e));
                }
            }
        }
        Ok(())
    }

    fn mark_closed(&mut self, reason: String) {
        self.closed.get_or_insert(reason);
    }

    /// The next command event from the transport; connection events are absorbed.
    fn next_event(&mut self) -> Option<(u16, Finished)> {
        while let Some(ev) = self.host.poll_event() {
            match ev {
                HostEvent::Connected {
                    maxh2cdata,
                    digests,
                } => {
                    self.maxh2cdata = maxh2cdata;
                    self.digests = digests;
                }
                HostEvent::Completion { cid, cqe, buf } => {
                    return Some((cid, Finished::Done(Done { cqe, buf })));
                }
                HostEvent::Aborted { cid, .. } => return Some((cid, Finished::Aborted)),
                HostEvent::Closed { reason } => self.mark_closed(reason.to_string()),
            }
        }
        None
    }

    /// Sends what is queued (best effort, bounded by `timeout`) and shuts the socket down.
    pub fn shutdown(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.wants_write() && self.closed.is_none() && Instant::now() < deadline {
            if self.poll_once(Duration::from_millis(10)).is_err() {
                break;
            }
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.mark_closed("closed locally".into());
        self.host.close();
    }
}
