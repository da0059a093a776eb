//! A fault-injecting TCP proxy for the network fault tests: it sits between an initiator and
//! the target on loopback and delays, splits, coalesces, stalls, truncates or resets what it
//! forwards.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the proxy does to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards as it comes.
    Clean,
    /// Holds every chunk read for this long before forwarding it (both directions).
    Delay(Duration),
    /// Forwards every chunk in pieces of 1 to `n` bytes, each sent on its own (both
    /// directions; Nagle off).
    Split(usize),
    /// Gathers what arrives within this window and forwards it as one write (both
    /// directions).
    Coalesce(Duration),
    /// After `after` bytes from the host, forwards nothing either way for `pause`, then
    /// carries on.
    Stall {
        /// Host bytes before the stall.
        after: usize,
        /// How long.
        pause: Duration,
    },
    /// After `after` bytes from the host (cut mid-PDU as it falls), closes both sides
    /// gracefully (FIN).
    Truncate {
        /// Host bytes forwarded.
        after: usize,
    },
    /// After `after` bytes from the host, resets both sides (RST).
    Reset {
        /// Host bytes forwarded.
        after: usize,
    },
}

/// A running proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `target`; `fault`
    /// applies to every connection from the `spare`-th on (0-based), earlier ones are clean
    /// (e.g. 1: a host's admin queue is spared, its I/O queues are not).
    pub fn start(target: SocketAddr, fault: Fault, spare: usize) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, acc) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((host, _)) => {
                        let n = acc.fetch_add(1, Ordering::Relaxed);
                        let f = if n >= spare { fault } else { Fault::Clean };
                        if let Ok(t) = TcpStream::connect(target) {
                            pumps.extend(connection(host, t, f, st.clone()));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        FaultProxy {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Where hosts connect ("127.0.0.1:PORT").
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets SO_LINGER to 0 so that closing the socket sends a reset.
fn linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open (borrowed from `s`), and the option value is a valid
    // `linger` whose size is passed with it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Starts both pumps of one connection.
fn connection(
    host: TcpStream,
    target: TcpStream,
    f: Fault,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    for s in [&host, &target] {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    }
    let dead = Arc::new(AtomicBool::new(false));
    let pump = |from: &TcpStream, to: &TcpStream, upstream: bool| {
        let (from, to) = (
            from.try_clone().expect("clone"),
            to.try_clone().expect("clone"),
        );
        let (other_from, other_to) = (
            to.try_clone().expect("clone"),
            from.try_clone().expect("clone"),
        );
        let (stop, dead) = (stop.clone(), dead.clone());
        std::thread::spawn(move || {
            pump_loop(from, to, f, upstream, &stop, &dead);
            // Whatever ended one direction ends the connection.
            if !dead.swap(true, Ordering::SeqCst) {
                let _ = other_from.shutdown(Shutdown::Both);
                let _ = other_to.shutdown(Shutdown::Both);
            }
        })
    };
    vec![pump(&host, &target, true), pump(&target, &host, false)]
}

fn pump_loop(
    mut from: TcpStream,
    mut to: TcpStream,
    f: Fault,
    upstream: bool,
    stop: &AtomicBool,
    dead: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0usize;
    let mut stalled = false;
    let mut rng = keel_host_tools::nvme::pattern::Rng::new(0x5eed ^ upstream as u64);
    loop {
        if stop.load(Ordering::Relaxed) || dead.load(Ordering::SeqCst) {
            return;
        }
        let mut n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        if let Fault::Coalesce(window) = f {
            let end = Instant::now() + window;
            while n < buf.len() && Instant::now() < end {
                match from.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(m) => n += m,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        }
        let chunk = &buf[..n];
        let ok = match f {
            Fault::Clean | Fault::Coalesce(_) => to.write_all(chunk).is_ok(),
            Fault::Delay(d) => {
                std::thread::sleep(d);
                to.write_all(chunk).is_ok()
            }
            Fault::Split(max) => chunk
                .chunks(1 + rng.below(max as u64) as usize)
                .all(|p| to.write_all(p).is_ok() && to.flush().is_ok()),
            Fault::Stall { after, pause } => {
                if upstream && !stalled && sent + n > after {
                    let k = after - sent;
                    let first = to.write_all(&chunk[..k]).is_ok();
                    stalled = true;
                    std::thread::sleep(pause);
                    first && to.write_all(&chunk[k..]).is_ok()
                } else {
                    to.write_all(chunk).is_ok()
                }
            }
            Fault::Truncate { after } | Fault::Reset { after } if upstream && sent + n > after => {
                let _ = to.write_all(&chunk[..after - sent]);
                dead.store(true, Ordering::SeqCst);
                if matches!(f, Fault::Reset { .. }) {
                    // The last descriptor of each socket to close sends the reset (the other
                    // pump drops its copies as soon as it sees `dead`).
                    linger_zero(&to);
                    linger_zero(&from);
                } else {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                }
                return;
            }
            Fault::Truncate { .. } | Fault::Reset { .. } => to.write_all(chunk).is_ok(),
        };
        if !ok {
            return;
        }
        if upstream {
            sent += n;
        }
    }
}
