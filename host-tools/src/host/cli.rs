//! `keelctl host --window FILE ...` (or `--pci BDF` / `--bar PATH` inside a guest): the
//! subcommands. `read`, `write`, `verify` and `bench` are the ones `keelctl nvme` has
//! ([`crate::blockdev::cli`]), on the emulated function's driver.

use super::driver::{HostConfig, HostController, HostTarget};
use super::ivshmem::{Peer, Server as IvshmemServer};
use super::nbd::{NbdConfig, Server};
use super::window::{Emulator, EmulatorConfig, Window};
use crate::blockdev::cli::{self as blockcli, IoCmd};
use crate::nvme::cli::{namespace_reports, print_identify};
use crate::nvme::pattern::parse_size;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Where the function's window is and how long to wait.
#[derive(Debug, Clone, Args)]
pub struct WindowArgs {
    /// The window file shared with the emulated function (`qemu/run --window FILE`).
    #[arg(long, global = true, conflicts_with_all = ["pci", "bar"])]
    pub window: Option<PathBuf>,
    /// Inside a guest: the ivshmem PCI function (BDF, e.g. 0000:00:04.0) whose BAR2 is the
    /// window.
    #[arg(long, global = true, conflicts_with = "bar")]
    pub pci: Option<String>,
    /// Inside a guest: a file mapping the window (e.g. `/sys/bus/pci/devices/BDF/resource2`).
    #[arg(long, global = true)]
    pub bar: Option<PathBuf>,
    /// Bound on every wait (enable, each command), seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub timeout: f64,
    /// Interrupts instead of polling: join the ivshmem server at this socket as a peer
    /// (`keelctl host ivshmem-server`, the firmware's QEMU on the same one with `qemu/run
    /// --window-server SOCK`) and sleep on the eventfds the function's doorbell rings.
    #[arg(long, global = true, value_name = "SOCK")]
    pub doorbell: Option<PathBuf>,
    /// Inside a guest (with --pci): interrupts instead of polling from the guest's own
    /// `ivshmem-doorbell` device (`qemu/hostvm/run --window-server SOCK`), its MSI-X vectors
    /// through VFIO (needs an IOMMU in the guest; the device is bound to vfio-pci; root).
    #[arg(long, global = true, requires = "pci", conflicts_with = "doorbell")]
    pub vfio: bool,
    /// Vectors the ivshmem server gives each peer (its --vectors).
    #[arg(long, global = true, default_value_t = super::ivshmem::DEFAULT_VECTORS)]
    pub doorbell_vectors: u16,
}

impl WindowArgs {
    /// The bound on every wait.
    pub fn timeout(&self) -> Result<Duration> {
        if !(self.timeout > 0.0 && self.timeout < 1e6) {
            bail!("--timeout must be positive");
        }
        Ok(Duration::from_secs_f64(self.timeout))
    }

    /// Maps the window.
    pub fn map(&self) -> Result<Arc<Window>> {
        let w = match (&self.window, &self.pci, &self.bar) {
            (Some(p), _, _) => Window::open(p)?,
            (None, Some(bdf), _) => {
                let bdf = full_bdf(bdf);
                if self.vfio {
                    let d = super::vfio::VfioDevice::get(&bdf)?;
                    return Ok(Arc::new(Window::open_vfio(&d)?));
                }
                let dev = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
                // A function no driver claimed may have memory decoding off.
                let _ = std::fs::write(dev.join("enable"), "1");
                Window::open_bar(&dev.join("resource2"))?
            }
            (None, None, Some(p)) => Window::open_bar(p)?,
            (None, None, None) => bail!("--window FILE (or --pci BDF, --bar PATH) is required"),
        };
        Ok(Arc::new(w))
    }

    /// Joins the ivshmem server of `--doorbell`, if given.
    pub fn peer(&self) -> Result<Option<Arc<Peer>>> {
        if self.vfio
            && let Some(bdf) = &self.pci
        {
            let d = super::vfio::VfioDevice::get(&full_bdf(bdf))?;
            let p = Peer::vfio(d, self.doorbell_vectors)?;
            eprintln!(
                "keelctl host: ivshmem peer {} (MSI-X through VFIO, {} vectors): waiting on the function's doorbell",
                p.id(),
                p.vectors()
            );
            return Ok(Some(Arc::new(p)));
        }
        let Some(sock) = &self.doorbell else {
            return Ok(None);
        };
        let p = Peer::connect(sock, self.doorbell_vectors, self.timeout()?)?;
        eprintln!(
            "keelctl host: ivshmem peer {} of {} ({} vectors): waiting on the function's doorbell",
            p.id(),
            sock.display(),
            p.vectors()
        );
        Ok(Some(Arc::new(p)))
    }

    fn target(&self, doorbell: Option<Arc<Peer>>) -> Result<HostTarget> {
        Ok(HostTarget {
            win: self.map()?,
            timeout: self.timeout()?,
            doorbell,
        })
    }

    fn open(&self, queues: u16, depth: u16, doorbell: Option<Arc<Peer>>) -> Result<HostController> {
        HostController::open_with(
            self.map()?,
            &HostConfig {
                queues,
                depth,
                timeout: self.timeout()?,
            },
            doorbell,
        )
        .context("initialising the controller behind the window")
    }
}

/// A PCI address with its domain (`00:04.0` → `0000:00:04.0`).
fn full_bdf(bdf: &str) -> String {
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.to_string()
    }
}

/// `keelctl host` subcommands.
#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Identify the controller and its namespaces.
    Identify {
        /// Only this namespace.
        #[arg(long)]
        nsid: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// read, write, verify, bench.
    #[command(flatten)]
    Io(IoCmd),
    /// Export a namespace over NBD (fixed newstyle, replies out of order, up to --qd requests
    /// in flight per client) until SIGINT or SIGTERM.
    Nbd {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// I/O queue pairs of the function.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Commands in flight per queue pair (and NBD requests per client).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
        qd: u16,
        /// Clients served at once.
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
    /// Expose a namespace as a Linux block device, /dev/ublkbN (ublk; module ublk_drv, Linux
    /// 6.0+, root), until SIGINT or SIGTERM: one ublk queue per I/O queue pair of the
    /// function, at its depth.
    Ublk {
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// I/O queue pairs of the function (and ublk queues).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Commands in flight per queue.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
        qd: u16,
    },
    /// An ivshmem server (QEMU's protocol, `ivshmem-doorbell`) handing out the window file
    /// (--window FILE) as the shared memory, until SIGINT or SIGTERM: the firmware's QEMU
    /// (`qemu/run --window-server SOCK`) and `keelctl host --doorbell SOCK` are its peers.
    IvshmemServer {
        /// The UNIX socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Interrupt vectors per peer (the same as the devices' `vectors=`).
        #[arg(long, default_value_t = super::ivshmem::DEFAULT_VECTORS,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        vectors: u16,
    },
    /// Serve the window from this process (an in-process firmware with RAM namespaces), for
    /// use without QEMU. Creates the file if needed.
    Emulate {
        /// Window size.
        #[arg(long, value_parser = size_arg, default_value = "64M")]
        size: u64,
        /// RAM namespace sizes (NSID 1, 2, ...).
        #[arg(long, value_parser = size_arg, value_delimiter = ',', default_value = "64M")]
        ram: Vec<u64>,
        /// Logical block size.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Subsystem NQN.
        #[arg(long, default_value = "nqn.2026-11.dev.keel:pcie0")]
        nqn: String,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<f64>,
    },
}

/// Runs a subcommand; returns the exit code (0, or 1 for a verify mismatch). An error while
/// the device hot-unplugged the function says so first ([`Window::removal`]), whatever the
/// command was doing when its commands stopped completing.
pub fn run(w: &WindowArgs, cmd: HostCmd, out: &mut dyn Write) -> Result<i32> {
    run_cmd(w, cmd, out).map_err(|e| match w.map().ok().and_then(|win| win.removal()) {
        Some(why) => e.context(why),
        None => e,
    })
}

fn run_cmd(w: &WindowArgs, cmd: HostCmd, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        HostCmd::Identify { nsid, json } => identify(w, nsid, json, out),
        HostCmd::Io(cmd) => {
            let peer = w.peer()?;
            let r = blockcli::run(&w.target(peer.clone())?, cmd, out);
            report_interrupts(peer.as_deref());
            r
        }
        HostCmd::IvshmemServer { socket, vectors } => {
            let path = w.window.as_ref().context("--window FILE is required")?;
            let shm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("opening window {}", path.display()))?;
            let stop = super::signals::stop_on_sigint_sigterm()?;
            let mut server = IvshmemServer::bind(&socket, shm, vectors)?;
            eprintln!(
                "keelctl host ivshmem-server: {} on {} ({vectors} vector(s) per peer)",
                path.display(),
                socket.display()
            );
            server.serve(stop)?;
            Ok(0)
        }
        HostCmd::Nbd {
            listen,
            nsid,
            queues,
            qd,
            clients,
        } => {
            let peer = w.peer()?;
            let c = w.open(queues, qd, peer.clone())?;
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("listening on {listen}"))?;
            let stop = super::signals::stop_on_sigint_sigterm()?;
            let mut server = Server::new(
                c,
                listener,
                NbdConfig {
                    nsid,
                    clients,
                    ..NbdConfig::default()
                },
            )?;
            let e = server.export();
            eprintln!(
                "keelctl host nbd: NSID {nsid} ({} blocks of {} bytes) on nbd://{}/",
                e.size / e.block_size as u64,
                e.block_size,
                server.local_addr()?
            );
            let r = server.serve(stop);
            let s = server.stats();
            eprintln!(
                "keelctl host nbd: served {} request(s) from {} client(s); at most {} NBD \
                 request(s) and {} NVMe command(s) in flight at once",
                s.requests, s.clients, s.peak_requests, s.peak_commands
            );
            let shut = server.shutdown();
            report_interrupts(peer.as_deref());
            r?;
            shut?;
            Ok(0)
        }
        HostCmd::Ublk { nsid, queues, qd } => {
            let peer = w.peer()?;
            let c = w.open(queues, qd, peer.clone())?;
            let stop = super::signals::stop_on_sigint_sigterm()?;
            let s = super::ublk::serve(c, &super::ublk::UblkConfig { nsid }, stop, |d| {
                eprintln!(
                    "keelctl host ublk: {} (NSID {nsid}, {} bytes, {}-byte blocks), {} queue(s) of depth {}",
                    d.path.display(),
                    d.bytes,
                    d.block_size,
                    d.queues,
                    d.depth
                );
            })?;
            eprintln!(
                "keelctl host ublk: served {} request(s); at most {} NVMe command(s) in flight at once",
                s.requests, s.peak_commands
            );
            report_interrupts(peer.as_deref());
            Ok(0)
        }
        HostCmd::Emulate {
            size,
            ram,
            block_size,
            nqn,
            seconds,
        } => {
            let path = w.window.as_ref().context("--window FILE is required")?;
            let win = Arc::new(Window::create(path, size as usize)?);
            let emu = Emulator::start(
                win,
                EmulatorConfig {
                    nqn,
                    namespaces: ram,
                    block_size,
                    buffers: 64,
                },
            )?;
            eprintln!("keelctl host emulate: serving {}", path.display());
            match seconds {
                Some(s) => std::thread::sleep(Duration::from_secs_f64(s.max(0.0))),
                None => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
            }
            emu.stop()?;
            Ok(0)
        }
    }
}

/// With `--doorbell`: how many interrupts arrived on the eventfds, against the counters.
fn report_interrupts(peer: Option<&Peer>) {
    if let Some(p) = peer {
        eprintln!(
            "keelctl host: doorbell: {} interrupt(s) received on the eventfds in {} wake-up(s); \
             the window's counters show {} for the same vectors",
            p.stats.signals.load(Ordering::Relaxed),
            p.stats.wakeups.load(Ordering::Relaxed),
            p.stats.counted.load(Ordering::Relaxed)
        );
    }
}

fn identify(w: &WindowArgs, only: Option<u32>, json: bool, out: &mut dyn Write) -> Result<i32> {
    let mut c = w.open(1, 1, w.peer()?)?;
    let nss = {
        let c = std::cell::RefCell::new(&mut c);
        namespace_reports(
            only,
            || c.borrow_mut().active_namespaces(),
            |nsid| {
                let mut c = c.borrow_mut();
                Ok((c.identify_namespace(nsid)?, c.namespace_ids(nsid).ok()))
            },
        )
    };
    let (id, vs, mt) = (c.id, c.vs, c.max_transfer());
    if let Err(e) = c.shutdown() {
        eprintln!("keelctl: warning: {e:#}");
    }
    print_identify(out, json, &id, mt, vs, &nss?)
}
