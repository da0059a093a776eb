//! Interrupts toward the host over `ivshmem-doorbell`: an ivshmem server and an ivshmem peer
//! (QEMU `docs/specs/ivshmem-spec.rst`, "The ivshmem Client-Server Protocol").
//!
//! Debian does not ship QEMU's `ivshmem-server`, and ours hands out the window file itself as
//! the shared memory, so everything else about the window stays as with `ivshmem-plain`.
//! The protocol is one-way, server to client: 8-byte little-endian signed numbers, some with
//! one file descriptor (`SCM_RIGHTS`). On connect the server sends (1) the protocol version 0,
//! (2) the client's ID, (3) -1 with the shared-memory fd, (4) for every other client its ID N
//! times, each with the eventfd interrupting that client on vector 0..N-1, (5) the client's
//! own ID N times with its own eventfds; it tells the others about the newcomer as in (4), and
//! about a client that left with its ID and no fd.
//!
//! - [`greeting`], [`announce`], [`farewell`]: what the server sends, as [`Message`]s (sans-IO).
//! - [`ClientState`]: a client's view of the message stream (sans-IO, refuses garbage).
//! - [`Server`]: `keelctl host ivshmem-server`, a single thread serving the socket.
//! - [`Peer`]: `keelctl host --doorbell SOCK`: this process as a client, with the eventfds the
//!   function's doorbell signals ([`Peer::wait`]).

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Protocol version the server sends first.
pub const PROTOCOL_VERSION: i64 = 0;
/// Vectors per peer by default: 0 (admin) and 1..=8, the function's I/O queues at most.
/// `qemu/run --window-server` configures the firmware's device with the same number.
pub const DEFAULT_VECTORS: u16 = 9;
/// Peer IDs are 16 bits (the Doorbell register's high half).
pub const MAX_PEER_ID: i64 = 0xFFFF;
/// Clients served at once (each costs `vectors` eventfds in every other client).
pub const MAX_CLIENTS: usize = 64;
/// Vectors one [`Peer::wait`] sleeps on at most (I/O queues of one controller with a doorbell).
pub const MAX_WAIT_VECTORS: usize = 16;

/// The file descriptor a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// None.
    None,
    /// The shared memory.
    Shm,
    /// Peer `peer`'s eventfd for `vector`.
    Vector {
        /// Whose.
        peer: u16,
        /// Which vector.
        vector: u16,
    },
}

/// One message of the server: an 8-byte little-endian number and maybe a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// The number.
    pub value: i64,
    /// The descriptor sent with it.
    pub fd: Fd,
}

impl Message {
    /// The 8 bytes on the wire.
    pub fn bytes(&self) -> [u8; 8] {
        self.value.to_le_bytes()
    }
}

fn vectors_of(peer: u16, vectors: u16) -> impl Iterator<Item = Message> {
    (0..vectors).map(move |vector| Message {
        value: i64::from(peer),
        fd: Fd::Vector { peer, vector },
    })
}

/// Everything a new client `id` gets on connect, given the clients already there.
pub fn greeting(id: u16, vectors: u16, others: &[u16]) -> Vec<Message> {
    let mut m = vec![
        Message {
            value: PROTOCOL_VERSION,
            fd: Fd::None,
        },
        Message {
            value: i64::from(id),
            fd: Fd::None,
        },
        Message {
            value: -1,
            fd: Fd::Shm,
        },
    ];
    for &p in others.iter().filter(|&&p| p != id) {
        m.extend(vectors_of(p, vectors));
    }
    m.extend(vectors_of(id, vectors));
    m
}

/// What the clients already there get when client `id` connects.
pub fn announce(id: u16, vectors: u16) -> Vec<Message> {
    vectors_of(id, vectors).collect()
}

/// What the remaining clients get when client `id` leaves.
pub fn farewell(id: u16) -> Message {
    Message {
        value: i64::from(id),
        fd: Fd::None,
    }
}

/// What a message meant to a client.
#[derive(Debug)]
pub enum Event {
    /// The version was acceptable.
    Version,
    /// This client's ID.
    Id(u16),
    /// The shared memory.
    Shm(OwnedFd),
    /// The eventfd for `vector` of this client (interrupts toward it).
    Own {
        /// Vector.
        vector: u16,
        /// The eventfd.
        fd: OwnedFd,
    },
    /// The eventfd interrupting another client on its next vector.
    PeerVector {
        /// The other client.
        peer: u16,
        /// Vector (in arrival order).
        vector: u16,
        /// The eventfd.
        fd: OwnedFd,
    },
    /// Another client left.
    PeerGone(u16),
}

/// A message the client refuses (it then closes the connection, as the spec says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// A version other than 0.
    Version(i64),
    /// An ID outside 0..=65535 (or -1 where an ID belongs).
    BadId(i64),
    /// A descriptor where none belongs, or none where one does.
    UnexpectedFd(i64),
    /// The shared memory did not come third.
    NoShm(i64),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version(v) => write!(f, "ivshmem server speaks protocol version {v}, not 0"),
            Self::BadId(v) => write!(f, "ivshmem server sent an invalid peer ID {v}"),
            Self::UnexpectedFd(v) => {
                write!(f, "ivshmem server sent message {v} with a wrong descriptor")
            }
            Self::NoShm(v) => write!(f, "ivshmem server sent {v} instead of the shared memory"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// A client's view of the server's messages.
#[derive(Debug, Default)]
pub struct ClientState {
    stage: u8,
    id: u16,
    own: u16,
    peers: BTreeMap<u16, u16>,
}

impl ClientState {
    /// A client that has just connected.
    pub fn new() -> Self {
        Self::default()
    }

    /// This client's ID, once known.
    pub fn id(&self) -> Option<u16> {
        (self.stage >= 2).then_some(self.id)
    }

    /// Own vectors received so far.
    pub fn own_vectors(&self) -> u16 {
        self.own
    }

    /// Takes the next message. An error leaves the state unusable (close the connection);
    /// the descriptor of a refused message is closed.
    pub fn feed(&mut self, value: i64, fd: Option<OwnedFd>) -> Result<Event, ProtoError> {
        match self.stage {
            0 => {
                if fd.is_some() {
                    return Err(ProtoError::UnexpectedFd(value));
                }
                if value != PROTOCOL_VERSION {
                    return Err(ProtoError::Version(value));
                }
                self.stage = 1;
                Ok(Event::Version)
            }
            1 => {
                if fd.is_some() {
                    return Err(ProtoError::UnexpectedFd(value));
                }
                let id = u16::try_from(value).map_err(|_| ProtoError::BadId(value))?;
                self.id = id;
                self.stage = 2;
                Ok(Event::Id(id))
            }
            2 => match (value, fd) {
                (-1, Some(fd)) => {
                    self.stage = 3;
                    Ok(Event::Shm(fd))
                }
                (-1, None) => Err(ProtoError::UnexpectedFd(value)),
                (v, _) => Err(ProtoError::NoShm(v)),
            },
            _ => {
                let peer = u16::try_from(value).map_err(|_| ProtoError::BadId(value))?;
                match fd {
                    None if peer == self.id => Err(ProtoError::UnexpectedFd(value)),
                    None => {
                        self.peers.remove(&peer);
                        Ok(Event::PeerGone(peer))
                    }
                    Some(fd) if peer == self.id => {
                        let vector = self.own;
                        self.own = self.own.saturating_add(1);
                        Ok(Event::Own { vector, fd })
                    }
                    Some(fd) => {
                        let n = self.peers.entry(peer).or_insert(0);
                        let vector = *n;
                        *n = n.saturating_add(1);
                        Ok(Event::PeerVector { peer, vector, fd })
                    }
                }
            }
        }
    }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; a negative result is an error.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd");
    }
    // SAFETY: a fresh descriptor this process owns and nothing else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one message (8 bytes, and `fd` as `SCM_RIGHTS` when given) on a stream socket.
fn send_msg(sock: &UnixStream, value: i64, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = value.to_le_bytes();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, large enough for one cmsghdr carrying one
        // descriptor (checked above), so CMSG_FIRSTHDR is non-null and CMSG_DATA lies
        // inside it; the writes stay inside `control`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (8 valid bytes) and, if set, `control`, all alive for
    // the call; the socket descriptor is valid while `sock` is.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match n {
        8 => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "short send of an ivshmem message",
        )),
    }
}

/// Receives one message: exactly 8 bytes (reading on after a short read) and the first
/// descriptor sent with them (any further ones are closed). `Ok(None)` at end of stream.
fn recv_msg(sock: &UnixStream) -> std::io::Result<Option<(i64, Option<OwnedFd>)>> {
    let mut bytes = [0u8; 8];
    let mut got = 0usize;
    let mut fd: Option<OwnedFd> = None;
    while got < 8 {
        let mut iov = libc::iovec {
            iov_base: bytes[got..].as_mut_ptr().cast(),
            iov_len: 8 - got,
        };
        let mut control = [0u64; 16];
        // SAFETY: plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at `iov` (the unfilled rest of `bytes`) and `control`, both
        // alive for the call; the kernel writes at most their lengths.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Descriptors that came with these bytes: keep the first, close the others.
        // SAFETY: the kernel filled `control` up to msg_controllen with well-formed cmsghdrs;
        // CMSG_FIRSTHDR/NXTHDR walk only inside it and return null at its end; a
        // SCM_RIGHTS payload is an array of descriptors now owned by this process.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(data.add(i));
                        let owned = OwnedFd::from_raw_fd(raw);
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "ivshmem message cut short",
                ))
            };
        }
        got += n as usize;
    }
    Ok(Some((i64::from_le_bytes(bytes), fd)))
}

struct Client {
    id: u16,
    sock: UnixStream,
    eventfds: Vec<OwnedFd>,
}

/// `keelctl host ivshmem-server`: serves one shared-memory file (the window) to any number of
/// clients (QEMU `ivshmem-doorbell` devices, `keelctl host --doorbell`).
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    shm: File,
    vectors: u16,
    clients: Vec<Client>,
    next_id: u16,
    /// Clients accepted so far.
    pub accepted: u64,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("vectors", &self.vectors)
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Server {
    /// Listens on `socket` (a stale socket file there is replaced) and serves `shm`.
    pub fn bind(socket: &Path, shm: File, vectors: u16) -> Result<Self> {
        if vectors == 0 {
            bail!("--vectors must be at least 1");
        }
        if let Ok(m) = std::fs::symlink_metadata(socket) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                bail!("{} exists and is not a socket", socket.display());
            }
            std::fs::remove_file(socket).ok();
        }
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        Ok(Self {
            listener,
            path: socket.to_path_buf(),
            shm,
            vectors,
            clients: Vec::new(),
            next_id: 0,
            accepted: 0,
        })
    }

    /// IDs of the clients connected now.
    pub fn peers(&self) -> Vec<u16> {
        self.clients.iter().map(|c| c.id).collect()
    }

    fn free_id(&mut self) -> Option<u16> {
        for _ in 0..=MAX_PEER_ID {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.clients.iter().any(|c| c.id == id) {
                return Some(id);
            }
        }
        None
    }

    fn fd_of(&self, new: &Client, fd: Fd) -> Option<RawFd> {
        match fd {
            Fd::None => None,
            Fd::Shm => Some(self.shm.as_raw_fd()),
            Fd::Vector { peer, vector } => {
                let c = if peer == new.id {
                    Some(new)
                } else {
                    self.clients.iter().find(|c| c.id == peer)
                };
                c.and_then(|c| c.eventfds.get(usize::from(vector)))
                    .map(|f| f.as_raw_fd())
            }
        }
    }

    fn send_all(&self, to: &UnixStream, new: &Client, msgs: &[Message]) -> std::io::Result<()> {
        for m in msgs {
            send_msg(to, m.value, self.fd_of(new, m.fd))?;
        }
        Ok(())
    }

    fn accept(&mut self) -> Result<()> {
        let (sock, _) = self.listener.accept().context("accept")?;
        self.accepted += 1;
        if self.clients.len() >= MAX_CLIENTS {
            eprintln!("keelctl host ivshmem-server: {MAX_CLIENTS} clients already, refusing one");
            return Ok(());
        }
        // A client that stops reading cannot stall the others for long.
        sock.set_write_timeout(Some(Duration::from_secs(2))).ok();
        let Some(id) = self.free_id() else {
            return Ok(());
        };
        let eventfds = (0..self.vectors)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>>>()?;
        let new = Client { id, sock, eventfds };
        let others = self.peers();
        let all = greeting(id, self.vectors, &others);
        // Steps 1-3 to the newcomer, then the others hear of it, then steps 4-5.
        if let Err(e) = self.send_all(&new.sock, &new, &all[..3]) {
            eprintln!("keelctl host ivshmem-server: peer {id}: {e}");
            return Ok(());
        }
        let hello = announce(id, self.vectors);
        let mut gone = Vec::new();
        for c in &self.clients {
            if self.send_all(&c.sock, &new, &hello).is_err() {
                gone.push(c.id);
            }
        }
        if let Err(e) = self.send_all(&new.sock, &new, &all[3..]) {
            eprintln!("keelctl host ivshmem-server: peer {id}: {e}");
            gone.push(id);
        }
        eprintln!(
            "keelctl host ivshmem-server: peer {id} connected ({} vector(s))",
            self.vectors
        );
        self.clients.push(new);
        for g in gone {
            self.drop_client(g);
        }
        Ok(())
    }

    fn drop_client(&mut self, id: u16) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        self.clients.remove(i);
        eprintln!("keelctl host ivshmem-server: peer {id} left");
        let bye = farewell(id);
        let mut gone = Vec::new();
        for c in &self.clients {
            if send_msg(&c.sock, bye.value, None).is_err() {
                gone.push(c.id);
            }
        }
        for g in gone {
            self.drop_client(g);
        }
    }

    /// Serves until `stop` turns true (checked every 100 ms). Clients never send anything:
    /// whatever one sends is read and dropped; end of stream or an error is a departure.
    pub fn serve(&mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
            let mut fds = vec![libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            fds.extend(self.clients.iter().map(|c| libc::pollfd {
                fd: c.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll");
            }
            let mut left = Vec::new();
            for (pfd, c) in fds[1..].iter().zip(&self.clients) {
                if pfd.revents == 0 {
                    continue;
                }
                let mut junk = [0u8; 256];
                match (&c.sock).read(&mut junk) {
                    Ok(0) => left.push(c.id),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => left.push(c.id),
                }
            }
            for id in left {
                self.drop_client(id);
            }
            if fds[0].revents & libc::POLLIN != 0
                && let Err(e) = self.accept()
            {
                eprintln!("keelctl host ivshmem-server: {e:#}");
            }
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

/// Interrupt counts of a [`Peer`] (shared by the controllers opened with it).
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Wake-ups: reads of an eventfd that returned signals.
    pub wakeups: AtomicU64,
    /// Signals (doorbell writes) read from the eventfds, summed.
    pub signals: AtomicU64,
    /// Interrupts the window's counters showed for the same vectors meanwhile.
    pub counted: AtomicU64,
}

/// This process as a client of an ivshmem server: its ID and the eventfds interrupting it.
#[derive(Debug)]
pub struct Peer {
    id: u16,
    eventfds: Vec<OwnedFd>,
    _sock: Option<UnixStream>,
    _vfio: Option<std::sync::Arc<super::vfio::VfioDevice>>,
    /// Counts.
    pub stats: PeerStats,
}

impl Peer {
    /// Connects to the server at `socket` and reads messages until it has its ID and its own
    /// `vectors` eventfds (or `timeout` passes). Other peers' descriptors and the shared
    /// memory are closed: this process maps the window itself.
    pub fn connect(socket: &Path, vectors: u16, timeout: Duration) -> Result<Self> {
        let sock = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the ivshmem server {}", socket.display()))?;
        sock.set_read_timeout(Some(timeout)).ok();
        let mut st = ClientState::new();
        let mut own: Vec<OwnedFd> = Vec::new();
        let t0 = Instant::now();
        while own.len() < usize::from(vectors) {
            if t0.elapsed() > timeout {
                bail!(
                    "the ivshmem server sent {} of {vectors} vector(s)",
                    own.len()
                );
            }
            let Some((value, fd)) = recv_msg(&sock).context("reading from the ivshmem server")?
            else {
                bail!("the ivshmem server closed the connection");
            };
            if let Event::Own { vector, fd } = st.feed(value, fd)?
                && usize::from(vector) == own.len()
            {
                own.push(fd);
            }
        }
        let id = st.id().context("no peer ID from the ivshmem server")?;
        Ok(Self {
            id,
            eventfds: own,
            _sock: Some(sock),
            _vfio: None,
            stats: PeerStats::default(),
        })
    }

    /// Inside a guest: the guest's own `ivshmem-doorbell` device opened through VFIO; its
    /// `vectors` MSI-X vectors go to fresh eventfds, its peer ID is its IVPosition.
    pub fn vfio(dev: std::sync::Arc<super::vfio::VfioDevice>, vectors: u16) -> Result<Self> {
        let pos = dev.iv_position()?;
        let id = u16::try_from(pos).with_context(|| {
            format!("IVPosition {pos:#x}: not an ivshmem-doorbell device on a server")
        })?;
        let fds = (0..vectors)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>>>()?;
        dev.set_msix(&fds)?;
        Ok(Self {
            id,
            eventfds: fds,
            _sock: None,
            _vfio: Some(dev),
            stats: PeerStats::default(),
        })
    }

    /// This peer's ID (what the function's doorbell names).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.eventfds.len() as u16
    }

    /// Reads (and clears) every signalled eventfd among `vectors`; returns the signals read.
    pub fn drain(&self, vectors: std::ops::RangeInclusive<u16>) -> u64 {
        let mut total = 0;
        for v in vectors {
            if let Some(fd) = self.eventfds.get(usize::from(v)) {
                let mut b = [0u8; 8];
                // SAFETY: reads 8 bytes into `b` from a valid nonblocking eventfd.
                let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                if n == 8 {
                    let s = u64::from_ne_bytes(b);
                    total += s;
                    self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                    self.stats.signals.fetch_add(s, Ordering::Relaxed);
                }
            }
        }
        total
    }

    /// Sleeps until one of `vectors` is signalled or `until` passes; returns the signals
    /// read.
    pub fn wait(&self, vectors: std::ops::RangeInclusive<u16>, until: Instant) -> u64 {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }; MAX_WAIT_VECTORS];
        let mut n = 0;
        for v in vectors.clone() {
            if let Some(fd) = self.eventfds.get(usize::from(v))
                && n < fds.len()
            {
                fds[n].fd = fd.as_raw_fd();
                n += 1;
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: left.as_secs().min(i32::MAX as u64) as _,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds[..n]` are valid pollfd structures and `ts` a valid timespec, both
        // alive for the call; no signal mask is changed (null).
        let r = unsafe { libc::ppoll(fds.as_mut_ptr(), n as libc::nfds_t, &ts, std::ptr::null()) };
        if r > 0 { self.drain(vectors) } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        eventfd().unwrap()
    }

    #[test]
    fn greeting_follows_the_spec() {
        // ivshmem-spec.rst, "On connect, the server sends the following messages in order":
        // version 0, the client's ID, -1 with the shared memory, N messages per existing
        // client, then the client's own ID N times.
        let m = greeting(2, 2, &[0, 1]);
        let wire: Vec<[u8; 8]> = m.iter().map(Message::bytes).collect();
        assert_eq!(wire[0], [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(wire[1], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(wire[2], [0xff; 8]);
        assert_eq!(
            m.iter().map(|m| (m.value, m.fd)).collect::<Vec<_>>(),
            vec![
                (0, Fd::None),
                (2, Fd::None),
                (-1, Fd::Shm),
                (0, Fd::Vector { peer: 0, vector: 0 }),
                (0, Fd::Vector { peer: 0, vector: 1 }),
                (1, Fd::Vector { peer: 1, vector: 0 }),
                (1, Fd::Vector { peer: 1, vector: 1 }),
                (2, Fd::Vector { peer: 2, vector: 0 }),
                (2, Fd::Vector { peer: 2, vector: 1 }),
            ]
        );
        // The first client: no others.
        assert_eq!(greeting(0, 1, &[]).len(), 4);
        // "This is a peer ID ... repeated N times", and a departure is the ID with no fd.
        assert_eq!(announce(7, 3).len(), 3);
        assert_eq!(farewell(0x1234).bytes(), [0x34, 0x12, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn client_reads_a_greeting() {
        let mut c = ClientState::new();
        assert!(matches!(c.feed(0, None), Ok(Event::Version)));
        assert!(matches!(c.feed(3, None), Ok(Event::Id(3))));
        assert!(matches!(c.feed(-1, Some(fd())), Ok(Event::Shm(_))));
        assert!(matches!(
            c.feed(1, Some(fd())),
            Ok(Event::PeerVector {
                peer: 1,
                vector: 0,
                ..
            })
        ));
        assert!(matches!(
            c.feed(1, Some(fd())),
            Ok(Event::PeerVector {
                peer: 1,
                vector: 1,
                ..
            })
        ));
        assert!(matches!(
            c.feed(3, Some(fd())),
            Ok(Event::Own { vector: 0, .. })
        ));
        assert!(matches!(
            c.feed(3, Some(fd())),
            Ok(Event::Own { vector: 1, .. })
        ));
        assert_eq!(c.own_vectors(), 2);
        assert_eq!(c.id(), Some(3));
        assert!(matches!(c.feed(1, None), Ok(Event::PeerGone(1))));
    }

    #[test]
    fn client_refuses_garbage() {
        assert!(matches!(
            ClientState::new().feed(1, None),
            Err(ProtoError::Version(1))
        ));
        assert!(matches!(
            ClientState::new().feed(0, Some(fd())),
            Err(ProtoError::UnexpectedFd(0))
        ));
        let mut c = ClientState::new();
        c.feed(0, None).unwrap();
        assert!(matches!(c.feed(65536, None), Err(ProtoError::BadId(65536))));
        assert!(matches!(c.feed(-1, None), Err(ProtoError::BadId(-1))));
        let mut c = ClientState::new();
        c.feed(0, None).unwrap();
        c.feed(0, None).unwrap();
        assert!(matches!(c.feed(5, None), Err(ProtoError::NoShm(5))));
        assert!(matches!(
            c.feed(-1, None),
            Err(ProtoError::UnexpectedFd(-1))
        ));
        c.feed(-1, Some(fd())).unwrap();
        assert!(matches!(
            c.feed(i64::MIN, None),
            Err(ProtoError::BadId(i64::MIN))
        ));
        assert!(matches!(c.feed(0, None), Err(ProtoError::UnexpectedFd(0))));
    }

    #[test]
    fn server_and_peers_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("keel-ivshmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let shm = tempfile_in(&dir);
        let mut server = Server::bind(&sock, shm, 3).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            server.serve(&s2).unwrap();
            server.accepted
        });
        // A client that sends garbage and leaves, then two real peers.
        {
            let mut g = UnixStream::connect(&sock).unwrap();
            use std::io::Write;
            g.write_all(b"garbage from a peer that should not speak")
                .unwrap();
        }
        let a = Peer::connect(&sock, 3, Duration::from_secs(5)).unwrap();
        let b = Peer::connect(&sock, 3, Duration::from_secs(5)).unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.vectors(), 3);
        // A signal on b's vector 2 wakes a waiter on 1..=2, and is counted once.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one` to a valid eventfd.
        let n = unsafe { libc::write(b.eventfds[2].as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(b.wait(1..=2, Instant::now() + Duration::from_secs(5)), 1);
        assert_eq!(b.wait(1..=2, Instant::now() + Duration::from_millis(20)), 0);
        assert_eq!(b.stats.signals.load(Ordering::Relaxed), 1);
        drop(a);
        drop(b);
        stop.store(true, Ordering::SeqCst);
        assert_eq!(t.join().unwrap(), 3);
        assert!(!sock.exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_server_sends_the_spec_s_bytes() {
        // ivshmem-spec.rst: "Each message consists of a single 8 byte little-endian signed
        // number"; on connect: 0, the client's ID, -1, other clients' IDs N times each, its
        // own ID N times; then a newcomer's ID N times, a departed client's ID once.
        let dir = std::env::temp_dir().join(format!("keel-ivshmem-b{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let mut server = Server::bind(&sock, tempfile_in(&dir), 2).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || server.serve(&s2).unwrap());
        let le = |v: i64| v.to_le_bytes().to_vec();
        let read = |c: &mut UnixStream, n: usize| {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = vec![0u8; n];
            c.read_exact(&mut b).unwrap();
            b
        };
        let mut a = UnixStream::connect(&sock).unwrap();
        let want_a: Vec<u8> = [0, 0, -1, 0, 0].iter().flat_map(|&v| le(v)).collect();
        assert_eq!(read(&mut a, 40), want_a);
        let mut b = UnixStream::connect(&sock).unwrap();
        let want_b: Vec<u8> = [0, 1, -1, 0, 0, 1, 1].iter().flat_map(|&v| le(v)).collect();
        assert_eq!(read(&mut b, 56), want_b);
        assert_eq!(read(&mut a, 16), [le(1), le(1)].concat());
        drop(b);
        assert_eq!(read(&mut a, 8), le(1));
        // The next client gets the next ID (2), not the one just freed.
        let mut c = UnixStream::connect(&sock).unwrap();
        assert_eq!(read(&mut c, 16), [le(0), le(2)].concat());
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempfile_in(dir: &Path) -> File {
        let p = dir.join("shm");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        f
    }
}
