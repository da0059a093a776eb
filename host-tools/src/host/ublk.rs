//! `keelctl host ublk`: a namespace of the emulated function as a Linux block device,
//! `/dev/ublkbN`, through ublk (Linux 6.0+, module `ublk_drv`; UAPI
//! `include/uapi/linux/ublk_cmd.h`, `Documentation/block/ublk.rst`).
//!
//! One thread runs everything, as the NBD export does: the NVMe driver (`keel-nvme-driver`,
//! single threaded, owning every queue pair) and one io_uring carrying the ublk control
//! commands and every queue's `FETCH_REQ` / `COMMIT_AND_FETCH_REQ`. ublk queue `q` is served
//! by the function's I/O queue pair `q + 1` at the same depth, so the kernel's per-CPU queue
//! mapping reaches the function's queues one to one.
//!
//! Why not the `libublk` crate: it gives every ublk queue its own thread with a thread-local
//! io_uring, and expects each queue's I/O to be handled on that thread; the NVMe driver here
//! is one single-threaded object (SPDK style) that owns all the queue pairs, so every I/O
//! would cross threads twice. With raw io_uring (`io-uring` crate) one thread is the daemon
//! of all queues, which the ublk driver allows (each queue checks only that its commands come
//! from the task that fetched them).
//!
//! Data: ublk_drv copies a write's pages into the tag's buffer (`addr` of its fetch command)
//! before handing the request over, and a read's data out of it when the result is committed
//! (one copy each, in this thread's context, after pinning the buffer's pages). When the
//! window is a mapped file (`--window`), the tag's buffer is the window buffer the NVMe
//! command's PRPs point at, and nothing is copied in user space. When it is a guest's PCI
//! BAR (`--pci`), its pages cannot be pinned (`VM_PFNMAP`), so each tag has a staging buffer
//! in ordinary memory and this thread copies between it and the window buffer: one more
//! copy per request (ublk's `UBLK_F_USER_COPY` reads and writes through the same pinning).
//!
//! Mapping: READ/WRITE (FUA from `UBLK_IO_F_FUA`) → Read/Write; FLUSH → Flush; DISCARD →
//! Dataset Management (deallocate); WRITE_ZEROES → Write Zeroes (deallocate allowed unless
//! `UBLK_IO_F_NOUNMAP`). A volatile write cache and FUA are advertised when the controller
//! has a volatile write cache (VWC), discard and write zeroes when the namespace offers them.

use super::driver::{HostBackend, HostController};
use anyhow::{Context, Result, bail};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use keel_storage::{BlockBackend, BlockCompletion, BlockOp, BlockRequest, BufPool, IoBuf};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::{Duration, Instant};

/// The ublk UAPI (`include/uapi/linux/ublk_cmd.h`), as of Linux 6.12.
pub mod uapi {
    /// `_IOC(dir, 'u', nr, size)` (`include/uapi/asm-generic/ioctl.h`: nr bits 0-7, type
    /// 8-15, size 16-29, direction 30-31; read = 2, write = 1).
    pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
        (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
    }
    /// `_IOR`.
    pub const fn ior(nr: u32, size: usize) -> u32 {
        ioc(2, nr, size)
    }
    /// `_IOWR`.
    pub const fn iowr(nr: u32, size: usize) -> u32 {
        ioc(3, nr, size)
    }

    /// `struct ublksrv_ctrl_cmd`: the payload of a control command (32 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct CtrlCmd {
        /// Device id (`u32::MAX`: let ADD_DEV choose).
        pub dev_id: u32,
        /// Queue (GET_QUEUE_AFFINITY only; `u16::MAX` otherwise).
        pub queue_id: u16,
        /// Length of the buffer at `addr`.
        pub len: u16,
        /// Buffer address.
        pub addr: u64,
        /// Inline data (START_DEV: the daemon's pid).
        pub data: u64,
        /// Unprivileged devices only.
        pub dev_path_len: u16,
        /// Padding.
        pub pad: u16,
        /// Reserved.
        pub reserved: u32,
    }

    /// `struct ublksrv_ctrl_dev_info` (64 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct DevInfo {
        /// Hardware queues.
        pub nr_hw_queues: u16,
        /// Tags per queue.
        pub queue_depth: u16,
        /// `UBLK_S_DEV_*`.
        pub state: u16,
        /// Padding.
        pub pad0: u16,
        /// Largest buffer of one request.
        pub max_io_buf_bytes: u32,
        /// Device id.
        pub dev_id: u32,
        /// The daemon.
        pub ublksrv_pid: i32,
        /// Padding.
        pub pad1: u32,
        /// `UBLK_F_*`.
        pub flags: u64,
        /// For the daemon's own use.
        pub ublksrv_flags: u64,
        /// Owner (unprivileged devices).
        pub owner_uid: u32,
        /// Owner group.
        pub owner_gid: u32,
        /// Reserved.
        pub reserved1: u64,
        /// Reserved.
        pub reserved2: u64,
    }

    /// `struct ublk_param_basic` (32 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ParamBasic {
        /// `UBLK_ATTR_*`.
        pub attrs: u32,
        /// log2 of the logical block size.
        pub logical_bs_shift: u8,
        /// log2 of the physical block size.
        pub physical_bs_shift: u8,
        /// log2 of the optimal I/O size.
        pub io_opt_shift: u8,
        /// log2 of the minimum I/O size.
        pub io_min_shift: u8,
        /// Largest request, 512-byte sectors.
        pub max_sectors: u32,
        /// Chunk size, sectors (0: none).
        pub chunk_sectors: u32,
        /// Capacity, 512-byte sectors.
        pub dev_sectors: u64,
        /// Segment boundary mask (0: none).
        pub virt_boundary_mask: u64,
    }

    /// `struct ublk_param_discard` (20 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ParamDiscard {
        /// Offset of the first aligned unit, bytes.
        pub discard_alignment: u32,
        /// Allocation unit, bytes.
        pub discard_granularity: u32,
        /// Largest discard, sectors (0: no discard).
        pub max_discard_sectors: u32,
        /// Largest write zeroes, sectors (0: no write zeroes).
        pub max_write_zeroes_sectors: u32,
        /// Ranges per discard (must be 1).
        pub max_discard_segments: u16,
        /// Reserved.
        pub reserved0: u16,
    }

    /// `struct ublk_params` with the basic and discard parameters (the original layout,
    /// which newer kernels accept: `len` says how much is there).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Params {
        /// Size of this structure.
        pub len: u32,
        /// `UBLK_PARAM_TYPE_*` present.
        pub types: u32,
        /// Basic parameters.
        pub basic: ParamBasic,
        /// Discard and write zeroes.
        pub discard: ParamDiscard,
    }

    /// `struct ublksrv_io_desc`: a request, in the array the daemon maps (24 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct IoDesc {
        /// Operation (bits 0-7) and flags.
        pub op_flags: u32,
        /// Sectors.
        pub nr_sectors: u32,
        /// First sector.
        pub start_sector: u64,
        /// Buffer address (the one given at fetch).
        pub addr: u64,
    }

    /// `struct ublksrv_io_cmd`: FETCH_REQ / COMMIT_AND_FETCH_REQ (16 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct IoCmd {
        /// Queue.
        pub q_id: u16,
        /// Tag.
        pub tag: u16,
        /// Result of the committed request (bytes, or -errno).
        pub result: i32,
        /// The tag's buffer.
        pub addr: u64,
    }

    /// `UBLK_CMD_ADD_DEV`.
    pub const CMD_ADD_DEV: u32 = iowr(0x04, size_of::<CtrlCmd>());
    /// `UBLK_CMD_DEL_DEV`.
    pub const CMD_DEL_DEV: u32 = iowr(0x05, size_of::<CtrlCmd>());
    /// `UBLK_CMD_START_DEV`.
    pub const CMD_START_DEV: u32 = iowr(0x06, size_of::<CtrlCmd>());
    /// `UBLK_CMD_STOP_DEV`.
    pub const CMD_STOP_DEV: u32 = iowr(0x07, size_of::<CtrlCmd>());
    /// `UBLK_CMD_SET_PARAMS`.
    pub const CMD_SET_PARAMS: u32 = iowr(0x08, size_of::<CtrlCmd>());
    /// `UBLK_CMD_GET_DEV_INFO`.
    pub const CMD_GET_DEV_INFO: u32 = ior(0x02, size_of::<CtrlCmd>());
    /// `UBLK_IO_FETCH_REQ`.
    pub const IO_FETCH_REQ: u32 = iowr(0x20, size_of::<IoCmd>());
    /// `UBLK_IO_COMMIT_AND_FETCH_REQ`.
    pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, size_of::<IoCmd>());

    /// `UBLK_F_CMD_IOCTL_ENCODE`: commands use the `_IOWR` numbers above.
    pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
    /// `UBLK_ATTR_VOLATILE_CACHE`: the kernel sends FLUSH.
    pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
    /// `UBLK_ATTR_FUA`: the kernel sends FUA writes.
    pub const ATTR_FUA: u32 = 1 << 3;
    /// `UBLK_PARAM_TYPE_BASIC`.
    pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
    /// `UBLK_PARAM_TYPE_DISCARD`.
    pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

    /// `UBLK_IO_OP_READ`.
    pub const OP_READ: u8 = 0;
    /// `UBLK_IO_OP_WRITE`.
    pub const OP_WRITE: u8 = 1;
    /// `UBLK_IO_OP_FLUSH`.
    pub const OP_FLUSH: u8 = 2;
    /// `UBLK_IO_OP_DISCARD`.
    pub const OP_DISCARD: u8 = 3;
    /// `UBLK_IO_OP_WRITE_ZEROES`.
    pub const OP_WRITE_ZEROES: u8 = 5;
    /// `UBLK_IO_F_FUA` (of `op_flags`).
    pub const IO_F_FUA: u32 = 1 << 13;
    /// `UBLK_IO_F_NOUNMAP`.
    pub const IO_F_NOUNMAP: u32 = 1 << 15;

    /// `UBLK_IO_RES_OK`.
    pub const IO_RES_OK: i32 = 0;
    /// `UBLK_IO_RES_ABORT` (`-ENODEV`): the queue is going away.
    pub const IO_RES_ABORT: i32 = -19;
    /// `UBLK_MAX_QUEUE_DEPTH`.
    pub const MAX_QUEUE_DEPTH: usize = 4096;

    /// Offset of queue `q`'s descriptor array in `/dev/ublkcN` (`UBLKSRV_CMD_BUF_OFFSET` +
    /// `q` × the largest array, page aligned).
    pub const fn desc_offset(q: u16, page: usize) -> usize {
        q as usize * (MAX_QUEUE_DEPTH * size_of::<IoDesc>()).next_multiple_of(page)
    }
}

/// A request of the block layer decoded from its descriptor: what to send the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The operation.
    pub op: BlockOp,
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u32,
}

/// Decodes a descriptor for a namespace of `1 << bs_shift`-byte blocks; `Err(-errno)` for
/// what cannot be served.
pub fn decode(d: &uapi::IoDesc, bs_shift: u32) -> Result<Decoded, i32> {
    let op = (d.op_flags & 0xff) as u8;
    let flags = d.op_flags;
    let shift = bs_shift - 9;
    let mask = (1u64 << shift) - 1;
    let op = match op {
        uapi::OP_READ => BlockOp::Read,
        uapi::OP_WRITE => BlockOp::Write {
            fua: flags & uapi::IO_F_FUA != 0,
        },
        uapi::OP_FLUSH => {
            return Ok(Decoded {
                op: BlockOp::Flush,
                lba: 0,
                blocks: 0,
            });
        }
        uapi::OP_DISCARD => BlockOp::Deallocate,
        uapi::OP_WRITE_ZEROES => BlockOp::WriteZeroes {
            deallocate: flags & uapi::IO_F_NOUNMAP == 0,
            fua: flags & uapi::IO_F_FUA != 0,
        },
        _ => return Err(-libc::EOPNOTSUPP),
    };
    if d.start_sector & mask != 0 || d.nr_sectors as u64 & mask != 0 || d.nr_sectors == 0 {
        return Err(-libc::EINVAL);
    }
    Ok(Decoded {
        op,
        lba: d.start_sector >> shift,
        blocks: d.nr_sectors >> shift,
    })
}

/// How a ublk device is set up.
#[derive(Debug, Clone)]
pub struct UblkConfig {
    /// Namespace.
    pub nsid: u32,
}

/// What a ublk session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkStats {
    /// Requests served.
    pub requests: u64,
    /// Most NVMe commands outstanding at once.
    pub peak_commands: usize,
}

/// The block device, once started.
#[derive(Debug, Clone)]
pub struct UblkDevice {
    /// `/dev/ublkbN`.
    pub path: PathBuf,
    /// Device id N.
    pub id: u32,
    /// Queues.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Capacity in bytes.
    pub bytes: u64,
    /// Logical block size.
    pub block_size: u32,
}

/// `user_data` of control commands (I/O commands use `q << 16 | tag`).
const CTRL: u64 = 1 << 63;

fn ctrl_cmd(dev_id: u32, addr: u64, len: usize) -> uapi::CtrlCmd {
    uapi::CtrlCmd {
        dev_id,
        queue_id: u16::MAX,
        len: len as u16,
        addr,
        ..Default::default()
    }
}

fn control_entry(control: &File, op: u32, cmd: &uapi::CtrlCmd) -> squeue::Entry128 {
    let mut raw = [0u8; 80];
    // SAFETY: `CtrlCmd` is `repr(C)` plain data of 32 bytes, copied into the first 32 bytes
    // of the command area.
    let bytes: [u8; 32] = unsafe { std::mem::transmute(*cmd) };
    raw[..32].copy_from_slice(&bytes);
    opcode::UringCmd80::new(types::Fd(control.as_raw_fd()), op)
        .cmd(raw)
        .build()
        .user_data(CTRL | op as u64)
}

/// Runs one control command on a ring of its own and waits for its result (ADD_DEV and
/// SET_PARAMS before any I/O; DEL_DEV after the device's char device and ring are gone,
/// which DEL_DEV waits for).
fn control_once(control: &File, op: u32, cmd: &uapi::CtrlCmd) -> Result<i32> {
    let mut ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(4)
        .context("creating an io_uring with 128-byte entries")?;
    let e = control_entry(control, op, cmd);
    // SAFETY: the buffer `cmd.addr` names (if any) is the caller's and outlives this call,
    // which waits for the command's completion.
    unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("ring full"))?;
    ring.submit_and_wait(1).context("io_uring wait")?;
    let c = ring.completion().next().context("no completion")?;
    Ok(c.result())
}

/// A memory mapping this module made (descriptor arrays, staging buffers).
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly a mapping made by `mmap` in this module, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Staging buffers in ordinary memory, one per tag, for a window that is a guest's PCI BAR:
/// ublk_drv pins the daemon's buffer pages (`get_user_pages`) to copy a request's data, and
/// the pages of a BAR mapping (`VM_PFNMAP`) cannot be pinned. The data then moves once more,
/// between the staging buffer and the window buffer the NVMe command uses.
struct Staging {
    map: Mapping,
    per_tag: usize,
}

impl Staging {
    fn new(tags: usize, per_tag: usize) -> Result<Self> {
        let len = (tags * per_tag).max(1);
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("staging buffers");
        }
        Ok(Self {
            map: Mapping { ptr: p.cast(), len },
            per_tag,
        })
    }

    fn addr(&self, slot: usize) -> u64 {
        self.map.ptr as u64 + (slot * self.per_tag) as u64
    }

    /// Copies `n` bytes of tag `slot`'s staging buffer into `to`.
    fn read(&self, slot: usize, to: &mut [u8]) {
        let n = to.len().min(self.per_tag);
        fence(Ordering::Acquire);
        // SAFETY: `slot * per_tag + n` lies inside the mapping; the kernel wrote the buffer
        // before posting the request this follows, and writes it again only for the tag's
        // next request, which comes after the commit of this one.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.ptr.add(slot * self.per_tag), to.as_mut_ptr(), n)
        };
    }

    /// Copies `from` into tag `slot`'s staging buffer.
    fn write(&self, slot: usize, from: &[u8]) {
        let n = from.len().min(self.per_tag);
        // SAFETY: as in `read`; the kernel reads the buffer only after the commit that
        // follows this copy.
        unsafe {
            std::ptr::copy_nonoverlapping(from.as_ptr(), self.map.ptr.add(slot * self.per_tag), n)
        };
        fence(Ordering::Release);
    }
}

struct Session<'a> {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    control: &'a File,
    cdev: Option<File>,
    dev_id: u32,
    queues: u16,
    depth: u16,
    descs: Vec<Mapping>,
    /// Staging buffers, when the window cannot be the kernel's copy target.
    staging: Option<Staging>,
    /// Buffer of each tag (`q * depth + tag`) while it is not with the controller.
    bufs: Vec<Option<IoBuf>>,
    /// CPU address of each tag's buffer (fixed: what the fetch commands name).
    addrs: Vec<u64>,
    /// Tags whose fetch is armed.
    armed: usize,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

impl Session<'_> {
    fn push(&mut self, e: squeue::Entry128) -> Result<()> {
        loop {
            // SAFETY: every buffer an entry points at (control payloads, device info and
            // parameters, tag buffers) outlives its command: control commands are waited for
            // before their payload goes out of scope, tag buffers live in the window for the
            // rest of the process.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().context("io_uring submit")?;
        }
    }

    /// Starts a control command whose result arrives among the I/O completions (START_DEV
    /// and STOP_DEV, which wait for I/O this thread serves).
    fn control_start(&mut self, op: u32, cmd: &uapi::CtrlCmd) -> Result<()> {
        let e = control_entry(self.control, op, cmd);
        self.push(e)?;
        self.ring.submit().context("io_uring submit")?;
        Ok(())
    }

    fn ctrl_cmd(&self, addr: u64, len: usize) -> uapi::CtrlCmd {
        ctrl_cmd(self.dev_id, addr, len)
    }

    fn map_descs(&mut self) -> Result<()> {
        let cdev = self.cdev.as_ref().context("no char device")?;
        let page = page_size();
        let len = (self.depth as usize * size_of::<uapi::IoDesc>()).next_multiple_of(page);
        for q in 0..self.queues {
            // SAFETY: a fresh read-only shared mapping of the ublk char device at the offset
            // and length the driver defines for queue `q`; failure is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    cdev.as_raw_fd(),
                    uapi::desc_offset(q, page) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("mapping queue {q}'s descriptors"));
            }
            self.descs.push(Mapping { ptr: p.cast(), len });
        }
        Ok(())
    }

    fn desc(&self, q: u16, tag: u16) -> uapi::IoDesc {
        let m = &self.descs[q as usize];
        // SAFETY: `tag < depth`, so the descriptor lies inside the mapping; the kernel wrote
        // it before posting the completion this follows (acquire fence below), and it is
        // read with a volatile copy because the kernel owns that memory.
        let d = unsafe {
            m.ptr
                .add(tag as usize * size_of::<uapi::IoDesc>())
                .cast::<uapi::IoDesc>()
                .read_volatile()
        };
        fence(Ordering::Acquire);
        d
    }

    fn io_cmd(&mut self, op: u32, q: u16, tag: u16, result: i32) -> Result<()> {
        let cmd = uapi::IoCmd {
            q_id: q,
            tag,
            result,
            addr: self.addrs[q as usize * self.depth as usize + tag as usize],
        };
        let mut raw = [0u8; 80];
        // SAFETY: `IoCmd` is `repr(C)` plain data of 16 bytes.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(cmd) };
        raw[..16].copy_from_slice(&bytes);
        let fd = self.cdev.as_ref().context("no char device")?.as_raw_fd();
        let e = opcode::UringCmd80::new(types::Fd(fd), op)
            .cmd(raw)
            .build()
            .user_data((q as u64) << 16 | tag as u64);
        self.push(e)
    }
}

/// Serves namespace `cfg.nsid` of `ctrl` as `/dev/ublkbN` until `stop` is set; `ready` is
/// called once the block device exists. Returns what was served; the controller is shut
/// down before returning.
pub fn serve(
    mut ctrl: HostController,
    cfg: &UblkConfig,
    stop: &AtomicBool,
    ready: impl FnOnce(&UblkDevice),
) -> Result<UblkStats> {
    let be = ctrl.backend(cfg.nsid)?;
    let info = ctrl.info();
    let (queues, depth) = (info.io_queues, info.queue_depth - 1);
    let bs_shift = be.geometry().block_size.trailing_zeros();
    let max_io = ctrl.max_transfer().min(1 << 20);
    let pool: BufPool = ctrl.buffers(queues as usize * depth as usize, max_io as usize)?;
    let r = run(
        &mut ctrl, be, pool, stop, ready, queues, depth, max_io, bs_shift,
    );
    let shut = ctrl.shutdown();
    let stats = r?;
    shut?;
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn run(
    ctrl: &mut HostController,
    mut be: HostBackend,
    mut pool: BufPool,
    stop: &AtomicBool,
    ready: impl FnOnce(&UblkDevice),
    queues: u16,
    depth: u16,
    max_io: u32,
    bs_shift: u32,
) -> Result<UblkStats> {
    let g = be.geometry();
    let caps = be.capabilities();
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ublk-control")
        .context("opening /dev/ublk-control (is ublk_drv loaded? modprobe ublk_drv)")?;
    let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build((queues as u32 * depth as u32 + 16).next_power_of_two())
        .context("creating an io_uring with 128-byte entries")?;
    let tags = queues as usize * depth as usize;
    let staging = if ctrl.window().is_device_memory() {
        Some(Staging::new(tags, max_io as usize)?)
    } else {
        None
    };
    let mut bufs = Vec::new();
    let mut addrs = Vec::new();
    for slot in 0..tags {
        let mut b = pool.get().context("data buffers")?;
        addrs.push(match &staging {
            Some(st) => st.addr(slot),
            None => b.capacity_mut().as_mut_ptr() as u64,
        });
        bufs.push(Some(b));
    }
    let mut s = Session {
        ring,
        control: &control,
        cdev: None,
        dev_id: u32::MAX,
        queues,
        depth,
        descs: Vec::new(),
        staging,
        bufs,
        addrs,
        armed: 0,
    };

    // ADD_DEV: the kernel picks the id and makes /dev/ublkcN.
    let mut dev = uapi::DevInfo {
        nr_hw_queues: queues,
        queue_depth: depth,
        max_io_buf_bytes: max_io,
        dev_id: u32::MAX,
        // SAFETY: getpid has no preconditions.
        ublksrv_pid: unsafe { libc::getpid() },
        flags: uapi::F_CMD_IOCTL_ENCODE,
        ..Default::default()
    };
    let cmd = ctrl_cmd(u32::MAX, &raw mut dev as u64, size_of::<uapi::DevInfo>());
    let r = control_once(&control, uapi::CMD_ADD_DEV, &cmd)?;
    if r < 0 {
        bail!("ublk ADD_DEV: {}", std::io::Error::from_raw_os_error(-r));
    }
    // SAFETY: `dev` is a live local the kernel wrote through the address it was given.
    let dev = unsafe { std::ptr::read_volatile(&raw const dev) };
    s.dev_id = dev.dev_id;
    // The kernel caps the queues at the CPU count (and may lower the depth): serve what it
    // made.
    s.queues = dev.nr_hw_queues.clamp(1, queues);
    s.depth = dev.queue_depth.clamp(1, depth);
    let dev_id = s.dev_id;
    let result = started(
        &mut s, ctrl, &mut be, stop, ready, g, caps, bs_shift, max_io,
    );
    // DEL_DEV whatever happened, once the ring (any command still outstanding is cancelled
    // with it), the descriptor mappings and the char device are closed: DEL_DEV waits for
    // the device's last user.
    drop(s);
    let del = control_once(&control, uapi::CMD_DEL_DEV, &ctrl_cmd(dev_id, 0, 0));
    let stats = result?;
    match del {
        Ok(r) if r < 0 => bail!("ublk DEL_DEV: {}", std::io::Error::from_raw_os_error(-r)),
        Ok(_) => Ok(stats),
        Err(e) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn started(
    s: &mut Session,
    ctrl: &mut HostController,
    be: &mut HostBackend,
    stop: &AtomicBool,
    ready: impl FnOnce(&UblkDevice),
    g: keel_storage::Geometry,
    caps: keel_storage::Capabilities,
    bs_shift: u32,
    max_io: u32,
) -> Result<UblkStats> {
    // Parameters: geometry, cache, discard / write zeroes.
    let per_cmd_sectors = ((65536u64 << bs_shift) >> 9).min(u32::MAX as u64) as u32;
    let mut p = uapi::Params {
        len: size_of::<uapi::Params>() as u32,
        types: uapi::PARAM_TYPE_BASIC,
        basic: uapi::ParamBasic {
            attrs: if caps.volatile_write_cache {
                uapi::ATTR_VOLATILE_CACHE | uapi::ATTR_FUA
            } else {
                0
            },
            logical_bs_shift: bs_shift as u8,
            physical_bs_shift: bs_shift as u8,
            io_opt_shift: max_io.trailing_zeros() as u8,
            io_min_shift: bs_shift as u8,
            max_sectors: max_io >> 9,
            chunk_sectors: 0,
            dev_sectors: (g.blocks << bs_shift) >> 9,
            virt_boundary_mask: 0,
        },
        discard: uapi::ParamDiscard::default(),
    };
    if caps.deallocate || caps.write_zeroes {
        p.types |= uapi::PARAM_TYPE_DISCARD;
        p.discard = uapi::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: g.block_size,
            max_discard_sectors: if caps.deallocate { per_cmd_sectors } else { 0 },
            max_write_zeroes_sectors: if caps.write_zeroes {
                per_cmd_sectors
            } else {
                0
            },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    let cmd = s.ctrl_cmd(&raw mut p as u64, size_of::<uapi::Params>());
    let r = control_once(s.control, uapi::CMD_SET_PARAMS, &cmd)?;
    if r < 0 {
        bail!("ublk SET_PARAMS: {}", std::io::Error::from_raw_os_error(-r));
    }

    // The char device (devtmpfs makes it; bounded wait).
    let cpath = PathBuf::from(format!("/dev/ublkc{}", s.dev_id));
    let t0 = Instant::now();
    let cdev = loop {
        match OpenOptions::new().read(true).write(true).open(&cpath) {
            Ok(f) => break f,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(e).with_context(|| format!("opening {}", cpath.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    s.cdev = Some(cdev);
    s.map_descs()?;

    // Arm every tag, then START_DEV; the kernel scans the new disk's partitions while
    // START_DEV runs, so I/O is served from here on.
    for q in 0..s.queues {
        for tag in 0..s.depth {
            s.io_cmd(uapi::IO_FETCH_REQ, q, tag, 0)?;
            s.armed += 1;
        }
    }
    s.ring.submit().context("io_uring submit")?;
    let mut start = s.ctrl_cmd(0, 0);
    // SAFETY: getpid has no preconditions.
    start.data = unsafe { libc::getpid() } as u64;
    s.control_start(uapi::CMD_START_DEV, &start)?;

    let mut ready = Some(ready);
    let mut stats = UblkStats::default();
    let mut commands = 0usize;
    let mut stopping = false;
    let mut stopped = false;
    let mut done: Vec<BlockCompletion> = Vec::new();
    let bs_shift_dev = bs_shift;
    let device = UblkDevice {
        path: PathBuf::from(format!("/dev/ublkb{}", s.dev_id)),
        id: s.dev_id,
        queues: s.queues,
        depth: s.depth,
        bytes: g.blocks << bs_shift,
        block_size: g.block_size,
    };
    loop {
        if stop.load(Ordering::Relaxed) && !stopping && ready.is_none() {
            stopping = true;
            let cmd = s.ctrl_cmd(0, 0);
            s.control_start(uapi::CMD_STOP_DEV, &cmd)?;
        }
        if stopped && s.armed == 0 && commands == 0 {
            return Ok(stats);
        }
        let mut moved = false;
        // 1. Requests from the kernel (and control results).
        let cqes: Vec<cqueue::Entry> = s.ring.completion().collect();
        for c in cqes {
            moved = true;
            let ud = c.user_data();
            if ud & CTRL != 0 {
                let op = (ud & 0xFFFF_FFFF) as u32;
                if c.result() < 0 {
                    bail!(
                        "ublk control command {op:#x}: {}",
                        std::io::Error::from_raw_os_error(-c.result())
                    );
                }
                if op == uapi::CMD_START_DEV {
                    if let Some(f) = ready.take() {
                        f(&device);
                    }
                } else if op == uapi::CMD_STOP_DEV {
                    stopped = true;
                }
                continue;
            }
            let (q, tag) = ((ud >> 16) as u16, ud as u16);
            let slot = q as usize * s.depth as usize + tag as usize;
            if c.result() != uapi::IO_RES_OK {
                // Aborted (the device is going away) or failed: this tag is done.
                s.armed -= 1;
                continue;
            }
            let d = s.desc(q, tag);
            let res = match decode(&d, bs_shift_dev) {
                Ok(x) => {
                    let mut buf = if x.op.has_data() {
                        s.bufs[slot].take()
                    } else {
                        None
                    };
                    if let (Some(st), Some(b), BlockOp::Write { .. }) = (&s.staging, &mut buf, x.op)
                    {
                        let n = (x.blocks as usize) << bs_shift_dev;
                        st.read(slot, &mut b.as_mut_slice()[..n]);
                    }
                    let req = BlockRequest {
                        tag: ud,
                        op: x.op,
                        lba: x.lba,
                        blocks: x.blocks,
                        buf,
                        buf_offset: 0,
                    };
                    match be.submit_on(q as usize, req) {
                        Ok(()) => {
                            commands += 1;
                            stats.peak_commands = stats.peak_commands.max(commands);
                            None
                        }
                        Err(rej) => {
                            if let Some(b) = rej.req.buf {
                                s.bufs[slot] = Some(b);
                            }
                            Some(-libc::EIO)
                        }
                    }
                }
                Err(e) => Some(e),
            };
            if let Some(res) = res {
                stats.requests += 1;
                s.io_cmd(uapi::IO_COMMIT_AND_FETCH_REQ, q, tag, res)?;
            }
        }
        // 2. Completions from the controller.
        ctrl.poll();
        be.poll(&mut |c| done.push(c));
        for c in done.drain(..) {
            moved = true;
            commands -= 1;
            stats.requests += 1;
            let (q, tag) = ((c.tag >> 16) as u16, c.tag as u16);
            let slot = q as usize * s.depth as usize + tag as usize;
            let d = s.desc(q, tag);
            if let Some(b) = c.buf {
                if let (Some(st), true, Ok(())) = (
                    &s.staging,
                    d.op_flags & 0xff == uapi::OP_READ as u32,
                    c.result,
                ) {
                    let n = (d.nr_sectors as usize) << 9;
                    st.write(slot, &b.as_slice()[..n.min(b.len())]);
                }
                s.bufs[slot] = Some(b);
            }
            let res = match c.result {
                Ok(()) => ((d.nr_sectors as i64) << 9).min(i32::MAX as i64) as i32,
                Err(_) => -libc::EIO,
            };
            s.io_cmd(uapi::IO_COMMIT_AND_FETCH_REQ, q, tag, res)?;
        }
        // 3. Hand the kernel what was queued; wait when nothing moved.
        if moved {
            s.ring.submit().context("io_uring submit")?;
            continue;
        }
        if commands > 0 {
            s.ring.submit().context("io_uring submit")?;
            let until = Instant::now() + Duration::from_micros(200);
            ctrl.interrupts().wait(until);
        } else {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match s.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e).context("io_uring wait"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_layout_and_numbers() {
        // include/uapi/linux/ublk_cmd.h: structure sizes and the _IOWR('u', nr, struct)
        // command numbers (UBLK_U_CMD_ADD_DEV = _IOWR('u', 0x04, struct ublksrv_ctrl_cmd)).
        assert_eq!(size_of::<uapi::CtrlCmd>(), 32);
        assert_eq!(size_of::<uapi::DevInfo>(), 64);
        assert_eq!(size_of::<uapi::ParamBasic>(), 32);
        assert_eq!(size_of::<uapi::ParamDiscard>(), 20);
        assert_eq!(size_of::<uapi::Params>(), 64);
        assert_eq!(std::mem::offset_of!(uapi::Params, discard), 40);
        assert_eq!(size_of::<uapi::IoDesc>(), 24);
        assert_eq!(size_of::<uapi::IoCmd>(), 16);
        assert_eq!(uapi::CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(uapi::CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(uapi::CMD_START_DEV, 0xc020_7506);
        assert_eq!(uapi::CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(uapi::CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(uapi::CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(uapi::IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(uapi::IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        // Queue q's descriptors: q × round_up(4096 × 24, page).
        assert_eq!(uapi::desc_offset(0, 4096), 0);
        assert_eq!(uapi::desc_offset(3, 4096), 3 * 98304);
    }

    #[test]
    fn descriptors_map_onto_nvme_commands() {
        let d = |op: u8, flags: u32, start: u64, n: u32| uapi::IoDesc {
            op_flags: op as u32 | flags,
            nr_sectors: n,
            start_sector: start,
            addr: 0,
        };
        // 512-byte blocks: sectors are blocks.
        assert_eq!(
            decode(&d(uapi::OP_READ, 0, 8, 16), 9),
            Ok(Decoded {
                op: BlockOp::Read,
                lba: 8,
                blocks: 16
            })
        );
        // 4 KiB blocks: 8 sectors a block.
        assert_eq!(
            decode(&d(uapi::OP_WRITE, uapi::IO_F_FUA, 16, 24), 12),
            Ok(Decoded {
                op: BlockOp::Write { fua: true },
                lba: 2,
                blocks: 3
            })
        );
        assert_eq!(
            decode(&d(uapi::OP_FLUSH, 0, 0, 0), 9).unwrap().op,
            BlockOp::Flush
        );
        assert_eq!(
            decode(&d(uapi::OP_DISCARD, 0, 0, 8), 9).unwrap().op,
            BlockOp::Deallocate
        );
        assert_eq!(
            decode(&d(uapi::OP_WRITE_ZEROES, uapi::IO_F_NOUNMAP, 0, 8), 9)
                .unwrap()
                .op,
            BlockOp::WriteZeroes {
                deallocate: false,
                fua: false
            }
        );
        assert_eq!(
            decode(&d(uapi::OP_WRITE_ZEROES, 0, 0, 8), 9).unwrap().op,
            BlockOp::WriteZeroes {
                deallocate: true,
                fua: false
            }
        );
        assert_eq!(
            decode(&d(4, 0, 0, 8), 9),
            Err(-libc::EOPNOTSUPP),
            "WRITE_SAME"
        );
        assert_eq!(decode(&d(uapi::OP_READ, 0, 1, 8), 12), Err(-libc::EINVAL));
        assert_eq!(decode(&d(uapi::OP_READ, 0, 0, 0), 9), Err(-libc::EINVAL));
    }
}
