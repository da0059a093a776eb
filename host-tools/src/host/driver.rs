//! The host's NVMe driver over a window: the firmware's poll-mode driver (`keel-nvme-driver`)
//! on two seams that reach the window instead of PCIe hardware:
//!
//! - [`WindowRegs`] ([`Registers`]): the window's register page and doorbells, as 32-bit
//!   atomics (release stores order the queue entries written before a doorbell).
//! - [`WindowDma`] ([`Dma`]): the window's host area, carved front to back by
//!   [`Window::alloc`]; device address = window offset (`keel_nvme_pcie::layout`).
//!
//! The driver brings the controller up (reset, admin queues, Identify, Number of Queues, I/O
//! queue pairs), builds PRPs and PRP lists, splits at MDTS, times commands out (Abort, then
//! reset) and shuts down with CC.SHN, exactly as on the firmware's drives; I/O queues are
//! created with interrupts on (vector = queue id), and [`Interrupts`] watches the window's
//! interrupt counters to know when to look at the completion queues again.
//!
//! [`HostController`] is a controller opened this way; [`HostDevice`] one namespace of it with
//! data buffers in the window, as a [`BlockDevice`].

use super::ivshmem::Peer;
use super::window::{Window, WindowClaim};
use crate::blockdev::{BlockDevice, Completion, IoError, Request, Target};
use crate::nvme::error::describe_status;
use anyhow::{Context, Result, anyhow, bail};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyController, IdentifyNamespace, NsIdentifiers, cns, nsid_list,
};
use keel_nvme::regs::{Cap, offset};
use keel_nvme::{Cqe, Sqe};
use keel_nvme_driver::{Config, ControllerInfo, Dma, DmaRegion, Drive, Registers, State};
use keel_nvme_pcie::layout;
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockRequest, BufPool, Geometry, IoBuf, RejectReason,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

/// The register seam: the window's first two pages (registers, doorbells).
#[derive(Debug, Clone)]
pub struct WindowRegs(Arc<Window>);

impl Registers for WindowRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        self.0.load32(offset)
    }

    fn write32(&mut self, offset: usize, value: u32) {
        // A release store: the queue entries and PRP lists written before are visible to the
        // function before the doorbell that announces them.
        self.0.store32(offset, value);
    }
}

/// The DMA seam: memory of the window's host area.
#[derive(Debug, Clone)]
pub struct WindowDma(Arc<Window>);

// SAFETY: every region comes from `Window::alloc` (zeroed, aligned as asked up to the page size
// in window offsets, and the mapping is page aligned, so in CPU addresses too; handed out once
// while the controller that owns this seam is open: `Window::claim` lets the area be carved
// again only after every controller of the process is dropped, and with it every region) in a
// window pinned for the rest of the process (`Window::pin` in `HostController::open`); the
// function reaches byte i of the region at host address `offset + i` (layout::HOST_BASE = 0).
unsafe impl Dma for WindowDma {
    fn alloc(&mut self, size: usize, align: usize) -> Option<DmaRegion> {
        let off = self.0.alloc(size.max(1), align)?;
        let ptr = self.0.ptr_at(off, size.max(1))?;
        // SAFETY: see the impl's SAFETY comment: valid for the rest of the process, owned by
        // this region alone, reached by the function at this host address.
        Some(unsafe { DmaRegion::new(ptr, layout::HOST_BASE + off as u64, size) })
    }

    fn sync_for_device(&mut self, _cpu_addr: usize, _len: usize) {
        // Shared memory is coherent; the doorbell's release store orders these writes.
        fence(Ordering::Release);
    }

    fn sync_for_cpu(&mut self, _cpu_addr: usize, _len: usize) {
        // Later reads must not pass the read that saw the completion's phase tag.
        fence(Ordering::Acquire);
    }
}

/// The driver as the host runs it.
pub type HostDrive = Drive<WindowRegs, WindowDma>;
/// One namespace of it, as a block backend.
pub type HostBackend = keel_nvme_driver::DriveBackend<WindowRegs, WindowDma>;

/// How to open a controller.
#[derive(Debug, Clone, Copy)]
pub struct HostConfig {
    /// I/O queue pairs to create.
    pub queues: u16,
    /// Commands in flight per queue (the queues get one entry more; capped by CAP.MQES).
    pub depth: u16,
    /// Bound on every wait: enable, admin commands, each I/O (then Abort, then reset).
    pub timeout: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: 16,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The interrupt vectors of a controller's I/O queues, as the window shows them: one counter
/// per vector, incremented by the function after it posts completions. With a doorbell peer
/// ([`Peer`], `--doorbell SOCK`) the function also rings this process's eventfd for the
/// vector (`ivshmem-doorbell`), and [`Interrupts::wait`] sleeps on the eventfds instead of
/// polling the counters.
#[derive(Debug)]
pub struct Interrupts {
    win: Arc<Window>,
    vectors: std::ops::RangeInclusive<u16>,
    seen: Vec<u32>,
    first: Vec<u32>,
    peer: Option<Arc<Peer>>,
}

impl Interrupts {
    fn new(win: Arc<Window>, queues: u16, peer: Option<Arc<Peer>>) -> Self {
        let mut i = Self {
            win,
            vectors: 1..=queues.max(1),
            seen: Vec::new(),
            first: Vec::new(),
            peer,
        };
        i.seen = i.read();
        i.first = i.seen.clone();
        i
    }

    fn read(&self) -> Vec<u32> {
        self.vectors
            .clone()
            .map(|v| self.win.load32(layout::interrupt_offset(v)))
            .collect()
    }

    /// Interrupts signalled on vector `v` so far.
    pub fn count(&self, v: u16) -> u32 {
        self.win.load32(layout::interrupt_offset(v))
    }

    /// True if any vector fired since the last call (and remembers the counters).
    pub fn fired(&mut self) -> bool {
        let now = self.read();
        let changed = now != self.seen;
        self.seen = now;
        changed
    }

    /// Waits until a vector fires or `until` passes. With a doorbell peer: sleeps on the
    /// vectors' eventfds (the function rings them after it increments the counters).
    /// Without: spins briefly, then sleeps in growing steps up to 50 µs (a counter is one
    /// load; nothing else is touched meanwhile).
    pub fn wait(&mut self, until: Instant) {
        if let Some(peer) = self.peer.clone() {
            while !self.fired() {
                if Instant::now() >= until {
                    return;
                }
                peer.wait(self.vectors.clone(), until);
            }
            return;
        }
        let mut spins = 0u32;
        while !self.fired() {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
                continue;
            }
            if Instant::now() >= until {
                return;
            }
            let nap = (spins - 4096).min(50);
            std::thread::sleep(Duration::from_micros(nap as u64 + 1));
        }
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        if let Some(peer) = &self.peer {
            // The controller is down (or gone): what the counters and the eventfds say now
            // is final for this controller.
            let counted: u64 = self
                .read()
                .iter()
                .zip(&self.first)
                .map(|(now, first)| u64::from(now.wrapping_sub(*first)))
                .sum();
            peer.stats.counted.fetch_add(counted, Ordering::Relaxed);
            peer.drain(self.vectors.clone());
            // Stop the function ringing a peer that may be gone soon.
            let target = layout::interrupt_target::encode(peer.id());
            if self.win.load32(layout::INTERRUPT_TARGET_OFFSET) == target {
                self.win.store32(layout::INTERRUPT_TARGET_OFFSET, 0);
            }
        }
    }
}

/// A controller reached through a window, driven by `keel-nvme-driver`.
pub struct HostController {
    // Dropped after the driver (field order): the host area is free only then.
    drive: HostDrive,
    win: Arc<Window>,
    _claim: WindowClaim,
    epoch: Instant,
    timeout: Duration,
    irq: Interrupts,
    /// CAP.
    pub cap: Cap,
    /// VS.
    pub vs: u32,
    /// Identify Controller.
    pub id: IdentifyController,
}

impl std::fmt::Debug for HostController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostController")
            .field("info", &self.drive.info())
            .finish_non_exhaustive()
    }
}

fn driver_error(e: keel_nvme_driver::InitError) -> anyhow::Error {
    match e {
        keel_nvme_driver::InitError::AdminFailed(op, s) => {
            anyhow!("admin command {op:#04x} failed: {}", describe_status(s))
        }
        keel_nvme_driver::InitError::NoMemory => {
            anyhow!("the window's host area is too small for the queues asked for")
        }
        e => anyhow!("{e}"),
    }
}

impl HostController {
    /// Waits (up to `cfg.timeout`) for the function to publish the window header and CAP,
    /// then brings the controller up with `cfg.queues` I/O queue pairs of `cfg.depth`
    /// commands, interrupts on, and reads Identify Controller.
    pub fn open(win: Arc<Window>, cfg: &HostConfig) -> Result<Self> {
        Self::open_with(win, cfg, None)
    }

    /// [`HostController::open`], and with `doorbell` the function also rings this peer's
    /// eventfds: the peer ID goes into the window's interrupt target word before the
    /// controller comes up.
    pub fn open_with(
        win: Arc<Window>,
        cfg: &HostConfig,
        doorbell: Option<Arc<Peer>>,
    ) -> Result<Self> {
        if let Some(p) = &doorbell {
            let queues = cfg.queues.max(1);
            if p.vectors() <= queues {
                bail!(
                    "the ivshmem server gives {} vector(s): {queues} I/O queue(s) need {} (vector 0 and one per queue)",
                    p.vectors(),
                    queues + 1
                );
            }
            if usize::from(queues) > super::ivshmem::MAX_WAIT_VECTORS {
                bail!(
                    "with --doorbell at most {} I/O queues (the vectors one wait sleeps on)",
                    super::ivshmem::MAX_WAIT_VECTORS
                );
            }
        }
        let t0 = Instant::now();
        loop {
            match win.header() {
                Ok(_) if win.load64(offset::CAP as usize) & 0xFFFF != 0 => break,
                Ok(_) if t0.elapsed() > cfg.timeout => bail!("CAP not set by the function"),
                Err(e) if t0.elapsed() > cfg.timeout => {
                    return Err(anyhow!("{e}")).context("waiting for the window header");
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        if let Some(p) = &doorbell {
            win.store32(
                layout::INTERRUPT_TARGET_OFFSET,
                layout::interrupt_target::encode(p.id()),
            );
        }
        win.pin();
        let claim = win.claim();
        let epoch = Instant::now();
        let mut clock = move || epoch.elapsed().as_nanos() as u64;
        let timeout_ns = cfg.timeout.as_nanos().min(u64::MAX as u128) as u64;
        let config = Config {
            io_queues: cfg.queues.max(1),
            queue_depth: cfg.depth.max(1).saturating_add(1),
            admin_depth: 32,
            io_timeout_ns: timeout_ns,
            abort_timeout_ns: 2_000_000_000,
            admin_timeout_ns: timeout_ns,
            health_check_ns: 100_000_000,
            timeout_scan_ns: 10_000_000,
            max_transfer: 1 << 20,
            zero_buffer: 128 << 10,
            interrupts: true,
            core_queues: 0,
        };
        let drive = Drive::init(
            WindowRegs(win.clone()),
            WindowDma(win.clone()),
            config,
            &mut clock,
        )
        .map_err(driver_error)
        .context("bringing the controller up")?;
        let info = drive.info().context("controller without Identify data")?;
        let irq = Interrupts::new(win.clone(), info.io_queues, doorbell);
        let mut c = Self {
            vs: info.version.0,
            cap: info.cap,
            win,
            _claim: claim,
            drive,
            epoch,
            timeout: cfg.timeout,
            irq,
            id: IdentifyController::default(),
        };
        c.id = IdentifyController::decode(&*c.identify(cns::CONTROLLER, 0)?);
        Ok(c)
    }

    /// The window.
    pub fn window(&self) -> &Arc<Window> {
        &self.win
    }

    /// Nanoseconds since the controller was opened (the driver's clock).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The bound on every wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What bring-up found.
    pub fn info(&self) -> ControllerInfo {
        self.drive
            .info()
            .unwrap_or_else(|| unreachable!("open succeeded"))
    }

    /// Largest transfer of one command (MDTS, capped by the driver).
    pub fn max_transfer(&self) -> u32 {
        self.info().max_transfer
    }

    /// The driver.
    pub fn drive(&self) -> &HostDrive {
        &self.drive
    }

    /// The interrupt counters of the I/O queues.
    pub fn interrupts(&mut self) -> &mut Interrupts {
        &mut self.irq
    }

    /// One pass of the driver (doorbells, completions, timeouts, health).
    pub fn poll(&self) -> bool {
        self.drive.poll(self.now())
    }

    /// Runs an admin command (data, if any, must be host memory the caller set the PRPs
    /// to); a non-success status is an error naming it.
    pub fn admin(&mut self, sqe: Sqe) -> Result<Cqe> {
        let epoch = self.epoch;
        let mut clock = move || epoch.elapsed().as_nanos() as u64;
        self.drive
            .with(|c| c.admin_command(sqe, &mut clock))
            .context("controller busy")?
            .map_err(driver_error)
    }

    /// Identify with `cns` for `nsid`.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Box<[u8; IDENTIFY_LEN]>> {
        let epoch = self.epoch;
        let mut clock = move || epoch.elapsed().as_nanos() as u64;
        let page = self
            .drive
            .with(|c| c.identify_page(cns, nsid, &mut clock))
            .context("controller busy")?
            .map_err(driver_error)?;
        Ok(Box::new(page))
    }

    /// Active namespace IDs (Identify CNS 02h).
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>> {
        Ok(nsid_list(&self.identify(cns::ACTIVE_NS_LIST, 0)?[..]).collect())
    }

    /// Identify Namespace.
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<IdentifyNamespace> {
        Ok(IdentifyNamespace::decode(
            &*self.identify(cns::NAMESPACE, nsid)?,
        ))
    }

    /// Namespace Identification Descriptors.
    pub fn namespace_ids(&mut self, nsid: u32) -> Result<NsIdentifiers> {
        Ok(NsIdentifiers::decode(
            &*self.identify(cns::NS_DESCRIPTOR_LIST, nsid)?,
        ))
    }

    /// Block size and block count of a namespace the driver serves.
    pub fn geometry(&self, nsid: u32) -> Result<(u32, u64)> {
        let g = self.namespace(nsid)?.1.geometry;
        Ok((g.block_size, g.blocks))
    }

    fn namespace(&self, nsid: u32) -> Result<(usize, keel_nvme_driver::Namespace)> {
        self.drive
            .namespaces()
            .into_iter()
            .enumerate()
            .find(|(_, n)| n.nsid == nsid)
            .ok_or_else(|| anyhow!("namespace {nsid} is not active on this controller"))
    }

    /// The block backend of namespace `nsid`.
    pub fn backend(&self, nsid: u32) -> Result<HostBackend> {
        let (i, _) = self.namespace(nsid)?;
        self.drive.backend(i).context("controller busy")
    }

    /// `count` data buffers of `size` bytes in the window's host area (page aligned).
    pub fn buffers(&self, count: usize, size: usize) -> Result<BufPool> {
        let size = size.next_multiple_of(layout::PAGE_SIZE);
        let bytes = count.max(1) * size;
        let off = self.win.alloc(bytes, layout::PAGE_SIZE).with_context(|| {
            format!(
                "the window's host area has {} bytes left, {count} buffers of {size} need {bytes}",
                self.win.unallocated()
            )
        })?;
        let ptr = self.win.ptr_at(off, bytes).context("window range")?;
        // SAFETY: `Window::alloc` handed these bytes to this pool alone for as long as this
        // controller is open (the pool's buffers must not be used after the controller is
        // dropped: `Window::claim`), and the window is pinned (`open`), so the memory stays
        // mapped for the rest of the process. The function writes it only while a command
        // that names it is outstanding, as a device DMAs into a driver's buffer.
        let mem: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), bytes) };
        BufPool::new(mem, layout::HOST_BASE + off as u64, size)
            .map_err(|e| anyhow!("buffer pool: {e}"))
    }

    /// Normal shutdown (CC.SHN); commands the controller took still complete and can be
    /// reaped with [`HostController::poll`].
    pub fn shutdown(&mut self) -> Result<()> {
        let epoch = self.epoch;
        let mut clock = move || epoch.elapsed().as_nanos() as u64;
        self.drive
            .with(|c| c.shutdown(&mut clock))
            .context("controller busy")?
            .map_err(driver_error)
            .context("controller shutdown")
    }

    /// Namespace `nsid` as a block device with `buffers` data buffers of the largest
    /// transfer size.
    pub fn into_device(self, nsid: u32, buffers: usize) -> Result<HostDevice> {
        let be = self.backend(nsid)?;
        let mt = self.max_transfer();
        let pool = self.buffers(buffers, mt as usize)?;
        let info = self.info();
        let depth = (info.io_queues as usize * (info.queue_depth as usize - 1)).min(pool.count());
        Ok(HostDevice {
            ctrl: self,
            be,
            pool,
            done: VecDeque::new(),
            in_flight: 0,
            depth,
        })
    }
}

/// A namespace of a [`HostController`] with data buffers in the window.
#[derive(Debug)]
pub struct HostDevice {
    ctrl: HostController,
    be: HostBackend,
    pool: BufPool,
    done: VecDeque<BlockCompletion>,
    in_flight: usize,
    depth: usize,
}

impl HostDevice {
    /// The controller.
    pub fn controller(&mut self) -> &mut HostController {
        &mut self.ctrl
    }

    /// Requests submitted and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn reap(&mut self) -> usize {
        self.ctrl.poll();
        let done = &mut self.done;
        self.be.poll(&mut |c| done.push_back(c))
    }

    /// The next completion if one is there (no waiting).
    pub fn try_complete(&mut self) -> Option<Completion<IoBuf>> {
        if self.done.is_empty() {
            self.reap();
        }
        let c = self.done.pop_front()?;
        self.in_flight -= 1;
        Some(self.convert(c))
    }

    fn convert(&self, c: BlockCompletion) -> Completion<IoBuf> {
        let last = self.ctrl.drive.stats().last_error;
        Completion {
            tag: c.tag,
            result: c.result.map_err(|e| match (e, last) {
                (BlockError::Internal, _) if self.ctrl.drive.state() != State::Online => {
                    IoError::Block(e)
                }
                (_, Some(s)) => IoError::Status(s),
                (e, None) => IoError::Block(e),
            }),
            buf: c.buf,
        }
    }

    /// Sends the controller an Abort (admin opcode 08h, NVMe base 2.0 §5.1) of every command
    /// of the request tagged `tag` still outstanding (true when one was sent). The request
    /// then completes as usual: aborted (Command Abort Requested) or with its own result if
    /// the controller did not abort it.
    pub fn abort(&mut self, tag: u64) -> bool {
        self.be.abort(tag)
    }

    /// Shuts the controller down.
    pub fn shutdown(mut self) -> Result<()> {
        self.ctrl.shutdown()
    }
}

impl crate::blockdev::DataBuf for IoBuf {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl BlockDevice for HostDevice {
    type Buf = IoBuf;

    fn geometry(&self) -> Geometry {
        self.be.geometry()
    }

    fn max_transfer(&self) -> u32 {
        self.ctrl.max_transfer()
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn alloc(&mut self) -> Result<IoBuf> {
        self.pool.get().context("no free data buffer")
    }

    fn free(&mut self, buf: IoBuf) {
        let _ = self.pool.put(buf);
    }

    fn submit(&mut self, req: Request<IoBuf>) -> Result<()> {
        let mut r = BlockRequest {
            tag: req.tag,
            op: req.op,
            lba: req.lba,
            blocks: req.blocks,
            buf: req.buf,
            buf_offset: 0,
        };
        let deadline = Instant::now() + self.ctrl.timeout;
        loop {
            match self.be.submit(r) {
                Ok(()) => {
                    self.in_flight += 1;
                    return Ok(());
                }
                Err(rej) if rej.reason == RejectReason::Busy && Instant::now() < deadline => {
                    r = rej.req;
                    self.reap();
                }
                Err(rej) => {
                    if let Some(b) = rej.req.buf {
                        self.free(b);
                    }
                    return Err(match rej.reason {
                        RejectReason::Invalid(e) => anyhow!("{}", IoError::Block(e)),
                        RejectReason::Busy => anyhow!("the driver stayed busy"),
                    });
                }
            }
        }
    }

    fn complete(&mut self) -> Result<Completion<IoBuf>> {
        if self.in_flight == 0 {
            bail!("no request in flight");
        }
        let deadline = Instant::now() + self.ctrl.timeout;
        loop {
            if let Some(c) = self.try_complete() {
                return Ok(c);
            }
            match self.ctrl.drive.state() {
                State::Dead => bail!("the controller failed and was given up on"),
                State::Online | State::Resetting | State::ShutDown => {}
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "no completion within {:?} ({} request(s) in flight)",
                    self.ctrl.timeout,
                    self.in_flight
                );
            }
            // The function raises the queue's vector after posting completions.
            self.ctrl
                .irq
                .wait(deadline.min(now + Duration::from_millis(1)));
        }
    }
}

/// `keelctl host`'s [`Target`]: a window; every open brings the controller up, every close
/// shuts it down. One bench worker drives all the queues (the driver is single threaded, as
/// SPDK's are).
#[derive(Debug)]
pub struct HostTarget {
    /// The window.
    pub win: Arc<Window>,
    /// Bound on every wait.
    pub timeout: Duration,
    /// The doorbell peer the function rings (`--doorbell SOCK`), if any.
    pub doorbell: Option<Arc<Peer>>,
}

impl Target for HostTarget {
    type Dev = HostDevice;

    fn workers(&self, _queues: u16) -> u16 {
        1
    }

    fn open(&self, nsid: u32, queues: u16, qd: u16, _index: u16) -> Result<HostDevice> {
        let c = HostController::open_with(
            self.win.clone(),
            &HostConfig {
                queues,
                depth: qd,
                timeout: self.timeout,
            },
            self.doorbell.clone(),
        )?;
        let bufs = queues.max(1) as usize * qd.max(1) as usize;
        c.into_device(nsid, bufs)
    }

    fn close(&self, dev: HostDevice) -> Result<()> {
        dev.shutdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev;
    use crate::host::window::{Emulator, EmulatorConfig};
    use keel_nvme::{AdminOpcode, Status};

    #[test]
    fn driver_against_in_process_function() {
        let win = Arc::new(Window::anonymous(32 << 20).unwrap());
        let emu = Emulator::start(win.clone(), EmulatorConfig::default()).unwrap();
        let cfg = HostConfig {
            queues: 8,
            depth: 16,
            timeout: Duration::from_secs(10),
        };
        let mut c = HostController::open(win.clone(), &cfg).unwrap();
        assert_eq!(c.id.sgls, 0);
        assert_eq!(c.info().io_queues, 8);
        assert_eq!(c.active_namespaces().unwrap(), vec![1]);
        assert_eq!(c.geometry(1).unwrap(), (512, (64 << 20) / 512));
        // A hostile queue id gets the spec's status and the controller keeps going.
        let e = c
            .admin(
                Sqe::new(AdminOpcode::CreateIoCq as u8, 0)
                    .with_cdw(10, (15 << 16) | 9)
                    .with_cdw(11, 1),
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&describe_status(Status::INVALID_QUEUE_IDENTIFIER)),
            "{e}"
        );
        let before: Vec<u32> = (1..=8).map(|v| c.interrupts().count(v)).collect();
        let mut d = c.into_device(1, 32).unwrap();
        let mut model = vec![0u8; 4 << 20];
        let mut rng = crate::nvme::pattern::Rng::new(7);
        for i in 0..64u64 {
            let blocks = 1 + rng.below(256);
            let lba = rng.below((model.len() as u64 / 512) - blocks);
            let len = (blocks * 512) as usize;
            let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ i) as u8).collect();
            blockdev::write(&mut d, lba, &data).unwrap();
            model[lba as usize * 512..][..len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            blockdev::read(&mut d, lba, &mut back).unwrap();
            assert_eq!(back, data);
        }
        let mut all = vec![0u8; model.len()];
        blockdev::read(&mut d, 0, &mut all).unwrap();
        assert_eq!(all, model);
        // Requests went round robin over the 8 queues: every vector fired.
        let after: Vec<u32> = (1..=8)
            .map(|v| d.controller().interrupts().count(v))
            .collect();
        for v in 0..8 {
            assert!(after[v] > before[v], "vector {} never fired", v + 1);
        }
        d.shutdown().unwrap();
        assert_eq!(
            (win.load32(offset::CSTS as usize) >> 2) & 3,
            2,
            "CSTS.SHST complete"
        );
        // Controllers opened one after the other reuse the host area: eight of 8 MiB of
        // buffers each through a 32 MiB window, the data intact across them.
        for round in 0..8u8 {
            let c = HostController::open(win.clone(), &cfg).unwrap();
            let mut d = c.into_device(1, 64).unwrap();
            let mut back = vec![0u8; 4096];
            blockdev::read(&mut d, 0, &mut back).unwrap();
            assert_eq!(back[..], model[..4096], "round {round}");
            d.shutdown().unwrap();
        }
        emu.stop().unwrap();
    }

    /// A hot unplug as the firmware does it (CSTS.CFS set, then the header's magic cleared)
    /// is told apart from a live function and from a window that never had one.
    #[test]
    fn removal_is_recognised_from_cfs_and_the_cleared_header() {
        let win = Window::anonymous(1 << 20).unwrap();
        assert_eq!(win.removal(), None, "a blank window was never a function");
        win.init_function_side(1);
        assert_eq!(win.removal(), None, "a live function");
        // CSTS (NVMe base 2.0 Figure 36: offset 0x1C, bit 1 CFS).
        win.store32(0x1C, 0b10);
        assert_eq!(
            win.removal(),
            None,
            "CFS alone: a failed controller, not a removal"
        );
        win.zero(layout::HEADER_OFFSET, 8);
        let why = win.removal().expect("removed");
        assert!(
            why.contains("removed by the device") && why.contains("CSTS.CFS"),
            "{why}"
        );
        win.store32(0x1C, 0);
        assert_eq!(win.removal(), None, "no CFS: a slot that is just free");
    }
}
