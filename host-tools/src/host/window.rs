//! The window file mapped into this process: host-side accessors, the function-side
//! [`SharedEndpoint`] (the same seam the firmware implements over its `ivshmem` BAR), and
//! [`Emulator`], an in-process "firmware" serving the window (tests, and `keelctl host
//! emulate` for use without QEMU).
//!
//! Memory shared with another process (or thread) is only touched with 32-bit atomic
//! accesses (registers, doorbells, interrupt counters, completion status dwords) or copies
//! bracketed by fences (queue entries, PRP lists, data): a release fence before every write
//! that publishes something, an acquire fence after every read that observed a doorbell or a
//! phase tag.

use anyhow::{Context, Result, bail};
use keel_controller::{Instant, Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use keel_nvme_pcie::layout::{self, Header, HeaderError};
use keel_nvme_pcie::{DmaError, EndpointFunction, FunctionConfig, PcieFunction};
use keel_storage::{BufPool, RamBackend};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering, fence};
use std::thread::JoinHandle;
use std::time::Duration;

/// A mapped window (`MAP_SHARED` of the file, or anonymous shared memory for tests).
#[derive(Debug)]
pub struct Window {
    ptr: *mut u8,
    len: usize,
    _file: Option<File>,
    /// Next free offset of the host area for [`Window::alloc`].
    next: AtomicUsize,
    /// Controllers of this process open on the window ([`Window::claim`]).
    users: AtomicUsize,
    /// A device BAR (`VM_IO | VM_PFNMAP`): the kernel cannot pin its pages, so it cannot be
    /// the target of I/O the kernel copies with `get_user_pages` (ublk).
    device_memory: bool,
}

// SAFETY: the mapping lives as long as the `Window`; every access goes through the methods
// below, which use atomics for the words both sides poll and fenced copies for the rest, so
// the window may be shared between threads like any shared memory with another process.
unsafe impl Send for Window {}
// SAFETY: see `Send`: no method hands out references into the mapping.
unsafe impl Sync for Window {}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped once here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

impl Window {
    fn map(file: Option<File>, len: usize) -> Result<Self> {
        Self::map_at(file, 0, len)
    }

    fn map_at(file: Option<File>, offset: u64, len: usize) -> Result<Self> {
        if len < layout::MIN_WINDOW_SIZE {
            bail!(
                "window of {len} bytes is smaller than the minimum {}",
                layout::MIN_WINDOW_SIZE
            );
        }
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping chosen by the kernel (no address hint); the arguments are
        // checked by the kernel and failure is reported as MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the window");
        }
        Ok(Self::from_raw(p.cast(), len, file))
    }

    fn from_raw(ptr: *mut u8, len: usize, file: Option<File>) -> Self {
        Self {
            ptr,
            len,
            _file: file,
            next: AtomicUsize::new(layout::HOST_AREA_OFFSET),
            users: AtomicUsize::new(0),
            device_memory: false,
        }
    }

    /// Maps an existing window file (read/write, shared).
    pub fn open(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening window {}", path.display()))?;
        let len = usize::try_from(f.metadata()?.len()).context("window size")?;
        Self::map(Some(f), len).with_context(|| format!("mapping {}", path.display()))
    }

    /// Creates (or truncates to) a window file of `size` bytes and maps it.
    pub fn create(path: &Path, size: usize) -> Result<Self> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("creating window {}", path.display()))?;
        f.set_len(size as u64)?;
        Self::map(Some(f), size)
    }

    /// Maps the shared-memory BAR of an `ivshmem` PCI function from inside a guest: `path` is
    /// the device's sysfs resource file (`/sys/bus/pci/devices/BDF/resource2`); the BAR
    /// holds the same layout as the window file on the machine running QEMU.
    pub fn open_bar(path: &Path) -> Result<Self> {
        let mut w = Self::open(path).with_context(|| {
            format!(
                "mapping the ivshmem BAR {} (needs root; is it the device's resource2?)",
                path.display()
            )
        })?;
        w.device_memory = true;
        Ok(w)
    }

    /// Maps BAR2 of an `ivshmem` function opened through VFIO inside a guest (see
    /// [`super::vfio`]): device memory, as [`Window::open_bar`].
    pub fn open_vfio(dev: &super::vfio::VfioDevice) -> Result<Self> {
        let (offset, len) = dev.window_region()?;
        let f = dev.device.try_clone().context("VFIO device descriptor")?;
        let mut w = Self::map_at(Some(f), offset, len).context("mapping BAR2 through VFIO")?;
        w.device_memory = true;
        Ok(w)
    }

    /// True for a PCI BAR mapped from sysfs (see [`Window::open_bar`]): device memory whose
    /// pages the kernel cannot pin for its own copies.
    pub fn is_device_memory(&self) -> bool {
        self.device_memory
    }

    /// Anonymous shared memory of `size` bytes (tests).
    pub fn anonymous(size: usize) -> Result<Self> {
        Self::map(None, size)
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Keeps the mapping for the rest of the process, so that memory handed out by
    /// [`Window::alloc`] may be used as `&'static` (data buffers move by value between the
    /// driver and its callers). Called by the host driver when it opens a window.
    pub fn pin(self: &Arc<Self>) {
        static PINNED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
        let mut pinned = PINNED.lock().unwrap_or_else(|p| p.into_inner());
        if !pinned.contains(&(self.ptr as usize)) {
            pinned.push(self.ptr as usize);
            // One reference that is never dropped: the mapping is never unmapped.
            std::mem::forget(self.clone());
        }
    }

    /// A controller starts using the window's host area: the first one (none open in this
    /// process) starts carving it from the front again, so a process may open and close
    /// controllers on one window any number of times. Every allocation of a controller is
    /// dead once the controller is (its queues, PRP lists and data buffers go with it), and
    /// bringing the next controller up resets the function before it is told about any new
    /// memory. Returns a guard; dropping it ends the use.
    pub fn claim(self: &Arc<Self>) -> WindowClaim {
        if self.users.fetch_add(1, Ordering::AcqRel) == 0 {
            self.next.store(layout::HOST_AREA_OFFSET, Ordering::Relaxed);
        }
        WindowClaim(self.clone())
    }

    /// Takes `size` bytes of the host area aligned to `align` (a power of two, at most the
    /// page size), zeroed; returns their window offset (= host address). `None` when the
    /// host area is exhausted. Allocations are not returned one by one: the area is carved
    /// front to back while a controller uses it (see [`Window::claim`]).
    pub fn alloc(&self, size: usize, align: usize) -> Option<usize> {
        if !align.is_power_of_two() || align > layout::PAGE_SIZE {
            return None;
        }
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = cur.checked_next_multiple_of(align)?;
            let end = start.checked_add(size)?;
            if end > self.len {
                return None;
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.zero(start, size);
                    return Some(start);
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Bytes of the host area [`Window::alloc`] has not handed out yet.
    pub fn unallocated(&self) -> usize {
        self.len.saturating_sub(self.next.load(Ordering::Relaxed))
    }

    /// CPU address of window offset `off` with `len` bytes behind it.
    pub(crate) fn ptr_at(&self, off: usize, len: usize) -> Option<NonNull<u8>> {
        self.range(off, len)?;
        // SAFETY: `off` is inside the mapping (checked just above).
        NonNull::new(unsafe { self.ptr.add(off) })
    }

    /// Always false (a window is at least [`layout::MIN_WINDOW_SIZE`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn word(&self, off: usize) -> Option<&AtomicU32> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds and 4-byte aligned (the mapping is page aligned); the memory is
        // valid for the lifetime of `self` and only ever accessed atomically or by copies.
        Some(unsafe { AtomicU32::from_ptr(self.ptr.add(off).cast()) })
    }

    /// Atomic load (acquire) of the u32 at `off` (0 when out of range or misaligned).
    pub fn load32(&self, off: usize) -> u32 {
        self.word(off)
            .map(|w| u32::from_le(w.load(Ordering::Acquire)))
            .unwrap_or(0)
    }

    /// Atomic store (release) of the u32 at `off` (ignored when out of range or misaligned).
    pub fn store32(&self, off: usize, v: u32) {
        if let Some(w) = self.word(off) {
            w.store(v.to_le(), Ordering::Release);
        }
    }

    /// Two 32-bit loads, low dword first.
    pub fn load64(&self, off: usize) -> u64 {
        self.load32(off) as u64 | ((self.load32(off + 4) as u64) << 32)
    }

    /// Two 32-bit stores, low dword first.
    pub fn store64(&self, off: usize, v: u64) {
        self.store32(off, v as u32);
        self.store32(off + 4, (v >> 32) as u32);
    }

    fn range(&self, off: usize, len: usize) -> Option<Range<usize>> {
        let end = off.checked_add(len)?;
        (end <= self.len).then_some(off..end)
    }

    /// Copies `buf.len()` bytes at window offset `off` (false if out of range).
    pub fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        let Some(r) = self.range(off, buf.len()) else {
            return false;
        };
        fence(Ordering::Acquire);
        // SAFETY: `r` is inside the mapping; `buf` is a distinct local buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(r.start), buf.as_mut_ptr(), buf.len())
        };
        true
    }

    /// Copies `data` to window offset `off` (false if out of range).
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        let Some(r) = self.range(off, data.len()) else {
            return false;
        };
        fence(Ordering::Release);
        // SAFETY: `r` is inside the mapping; `data` is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(r.start), data.len()) };
        fence(Ordering::Release);
        true
    }

    /// Zeroes `[off, off + len)` (false if out of range).
    pub fn zero(&self, off: usize, len: usize) -> bool {
        let Some(r) = self.range(off, len) else {
            return false;
        };
        // SAFETY: `r` is inside the mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(r.start), 0, len) };
        fence(Ordering::Release);
        true
    }

    /// The header, if the function side initialised the window.
    pub fn header(&self) -> Result<Header, HeaderError> {
        let mut b = [0u8; layout::header::SIZE];
        self.read(layout::HEADER_OFFSET, &mut b);
        Header::decode(&b, self.len as u64)
    }

    /// Whether the device removed the function this window was: the firmware's hot unplug
    /// sets CSTS.CFS (NVMe base 2.0 §3.1.4.6, bit 1 of CSTS at offset 0x1C) and clears the
    /// header magic. `None` while a function is there (or the window never had one).
    pub fn removal(&self) -> Option<&'static str> {
        let cfs = self.load32(keel_nvme::regs::offset::CSTS as usize) & 0b10 != 0;
        match (self.header(), cfs) {
            (Err(HeaderError::NoMagic), true) => Some(
                "the function was removed by the device (hot unplug: CSTS.CFS = 1, window header cleared)",
            ),
            _ => None,
        }
    }

    /// Function side: clears registers, doorbells and interrupt counters, then writes the
    /// header (what the firmware does when it brings the function up).
    pub fn init_function_side(&self, function: u16) {
        self.zero(0, layout::HOST_AREA_OFFSET);
        self.write(
            layout::HEADER_OFFSET,
            &Header::new(self.len as u64, function).encode(),
        );
    }
}

/// A controller's use of a window's host area ([`Window::claim`]).
#[derive(Debug)]
pub struct WindowClaim(Arc<Window>);

impl Drop for WindowClaim {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The function side of a mapped window: [`EndpointFunction`] over shared memory, the test
/// double of the firmware's `ivshmem` implementation.
#[derive(Debug, Clone)]
pub struct SharedEndpoint {
    win: Arc<Window>,
}

impl SharedEndpoint {
    /// Over `win`.
    pub fn new(win: Arc<Window>) -> Self {
        Self { win }
    }
}

impl EndpointFunction for SharedEndpoint {
    fn read_reg(&mut self, offset: u32) -> u32 {
        if offset as usize >= layout::REGS_SIZE {
            return 0;
        }
        self.win.load32(offset as usize & !3)
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        if (offset as usize) < layout::REGS_SIZE {
            self.win.store32(offset as usize & !3, value);
        }
    }

    fn read_doorbell(&mut self, index: u16) -> u32 {
        if index as usize >= layout::DOORBELLS {
            return 0;
        }
        self.win.load32(layout::doorbell_offset(index))
    }

    fn write_doorbell(&mut self, index: u16, value: u32) {
        if (index as usize) < layout::DOORBELLS {
            self.win.store32(layout::doorbell_offset(index), value);
        }
    }

    fn host_area(&self) -> Range<u64> {
        layout::host_area(self.win.len() as u64)
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        match layout::translate(addr, len, self.win.len() as u64) {
            Some(o) if self.win.read(o, buf) => Ok(()),
            _ => Err(DmaError::OutOfRange { addr, len }),
        }
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len();
        let o = layout::translate(addr, len, self.win.len() as u64)
            .ok_or(DmaError::OutOfRange { addr, len })?;
        // A status dword (with the phase tag) is published with one release store.
        if len == 4 && o.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.win.store32(o, v);
            return Ok(());
        }
        if self.win.write(o, data) {
            Ok(())
        } else {
            Err(DmaError::OutOfRange { addr, len })
        }
    }

    fn raise_interrupt(&mut self, vector: u16) {
        if vector < layout::MAX_VECTORS
            && let Some(w) = self.win.word(layout::interrupt_offset(vector))
        {
            w.fetch_add(1, Ordering::Release);
        }
    }

    fn vectors(&self) -> u16 {
        layout::MAX_VECTORS
    }
}

/// What an [`Emulator`] serves.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// One RAM namespace per entry, size in bytes (NSID 1, 2, ...).
    pub namespaces: Vec<u64>,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Data buffers of 128 KiB.
    pub buffers: usize,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            nqn: "nqn.2026-11.dev.keel:pcie0".into(),
            namespaces: vec![64 << 20],
            block_size: 512,
            buffers: 64,
        }
    }
}

/// An in-process firmware: a thread polling a [`PcieFunction`] over a window with a
/// [`Target`] of RAM namespaces, as the firmware does over its `ivshmem` BAR.
#[derive(Debug)]
pub struct Emulator {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Emulator {
    /// Initialises the function side of `win` and starts serving it.
    pub fn start(win: Arc<Window>, cfg: EmulatorConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let paused = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        let idle = Arc::new(AtomicBool::new(false));
        let i = idle.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("keel-pcie-emulator".into())
            .spawn(move || {
                let setup = || -> Result<(Target, PcieFunction)> {
                    let mut namespaces = Vec::new();
                    for (i, &bytes) in cfg.namespaces.iter().enumerate() {
                        let ram =
                            RamBackend::new(cfg.block_size, bytes / cfg.block_size as u64, 1024)
                                .map_err(|e| anyhow::anyhow!("namespace {}: {e}", i + 1))?;
                        namespaces.push(NamespaceConfig {
                            nsid: i as u32 + 1,
                            backend: Box::new(ram),
                            nguid: [0; 16],
                            uuid: [0; 16],
                            eui64: [0; 8],
                            qos: Default::default(),
                        });
                    }
                    let target = Target::new(TargetConfig {
                        subsystems: vec![SubsystemConfig {
                            nqn: cfg.nqn.clone(),
                            serial: "KEELPCIE0".into(),
                            model: "Keel emulated NVMe (in-process)".into(),
                            allowed_hosts: vec![],
                            namespaces,
                        }],
                        limits: Limits {
                            max_queue_depth: 1024,
                            max_io_queues: 8,
                            ..Limits::default()
                        },
                        ..TargetConfig::default()
                    })
                    .map_err(|e| anyhow::anyhow!("target: {e}"))?;
                    let pool = BufPool::from_heap(cfg.buffers.max(1), 128 << 10, 0)
                        .map_err(|e| anyhow::anyhow!("buffer pool: {e}"))?;
                    let f = PcieFunction::new(FunctionConfig::new(&cfg.nqn), pool)
                        .map_err(|e| anyhow::anyhow!("function: {e}"))?;
                    Ok((target, f))
                };
                let (mut target, mut f) = match setup() {
                    Ok(x) => {
                        let _ = tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                win.init_function_side(0);
                let mut ep = SharedEndpoint::new(win);
                let t0 = std::time::Instant::now();
                let mut idle = 0u32;
                while !s.load(Ordering::Relaxed) {
                    if p.load(Ordering::Acquire) {
                        i.store(true, Ordering::Release);
                        std::thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                    i.store(false, Ordering::Release);
                    let now = Instant::from_nanos(t0.elapsed().as_nanos() as u64);
                    if f.poll_with_target(now, &mut target, &mut ep) {
                        idle = 0;
                    } else {
                        idle += 1;
                        if idle > 2000 {
                            std::thread::sleep(Duration::from_micros(50));
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
                Ok(())
            })
            .context("starting the emulator thread")?;
        match rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                paused,
                idle,
                handle: Some(handle),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("emulator thread died during setup"),
        }
    }

    /// Stops (true) or resumes (false) serving: while paused, doorbells are not looked at,
    /// so commands the host submits stay in their queues (tests use this to see how many a
    /// host has in flight at once).
    /// Pausing returns once the thread stopped looking (bounded by 10 s).
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Release);
        let t0 = std::time::Instant::now();
        while on && !self.idle.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("emulator thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
