//! Inside a guest: the function's `ivshmem-doorbell` device through VFIO (Linux
//! `include/uapi/linux/vfio.h`, the container/group interface), so that a process gets its
//! MSI-X vectors as eventfds (`VFIO_DEVICE_SET_IRQS`) and its window (BAR2) as a mapping of the
//! VFIO region. The guest needs an IOMMU (QEMU `-device intel-iommu`, `intel_iommu=on`; the
//! kernel of `qemu/hostvm` has no VFIO no-IOMMU mode) and the modules vfio, vfio_iommu_type1,
//! vfio-pci. One device per process: a group opens once.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

// _IO(';', 100 + n): no direction, no size.
const VFIO_GET_API_VERSION: u64 = 0x3B64;
const VFIO_CHECK_EXTENSION: u64 = 0x3B65;
const VFIO_SET_IOMMU: u64 = 0x3B66;
const VFIO_GROUP_GET_STATUS: u64 = 0x3B67;
const VFIO_GROUP_SET_CONTAINER: u64 = 0x3B68;
const VFIO_GROUP_GET_DEVICE_FD: u64 = 0x3B6A;
const VFIO_DEVICE_GET_REGION_INFO: u64 = 0x3B6C;
const VFIO_DEVICE_SET_IRQS: u64 = 0x3B6E;
const VFIO_TYPE1_IOMMU: u64 = 1;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const GROUP_VIABLE: u32 = 1;
const REGION_MMAP: u32 = 1 << 2;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const PCI_MSIX_IRQ_INDEX: u32 = 2;
const PCI_CONFIG_REGION_INDEX: u32 = 7;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// An opened VFIO device.
#[derive(Debug)]
pub struct VfioDevice {
    /// The device descriptor (regions are read, written and mapped through it).
    pub device: File,
    _group: File,
    _container: File,
    bdf: String,
}

fn ioctl_ptr<T>(fd: &File, req: u64, arg: *mut T) -> std::io::Result<i32> {
    // SAFETY: `req` is a VFIO request whose argument is the structure `arg` points at (alive
    // and large enough, its argsz set by the caller) or a NUL-terminated string; the kernel
    // reads or writes at most argsz bytes there.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ioctl_val(fd: &File, req: u64, arg: u64) -> std::io::Result<i32> {
    // SAFETY: `req` is a VFIO request taking an integer argument (or none): no memory is
    // passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl VfioDevice {
    /// Opens the device at `bdf` (binding it to vfio-pci first), once per process.
    pub fn get(bdf: &str) -> Result<Arc<VfioDevice>> {
        static OPEN: Mutex<Option<Arc<VfioDevice>>> = Mutex::new(None);
        let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g.as_ref() {
            if d.bdf == bdf {
                return Ok(d.clone());
            }
            bail!("VFIO: one device per process ({} already open)", d.bdf);
        }
        let d = Arc::new(Self::open(bdf)?);
        *g = Some(d.clone());
        Ok(d)
    }

    fn open(bdf: &str) -> Result<Self> {
        let dev = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
        let driver = std::fs::read_link(dev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            std::fs::write(dev.join("driver_override"), "vfio-pci")
                .with_context(|| format!("driver_override of {bdf} (root?)"))?;
            if driver.is_some() {
                std::fs::write(dev.join("driver/unbind"), bdf).ok();
            }
            std::fs::write("/sys/bus/pci/drivers_probe", bdf)
                .context("binding to vfio-pci (modules vfio-pci, vfio_iommu_type1 loaded?)")?;
        }
        let group = std::fs::read_link(dev.join("iommu_group"))
            .context("the device has no IOMMU group: the guest needs an IOMMU (intel_iommu=on)")?;
        let group = group
            .file_name()
            .context("IOMMU group")?
            .to_string_lossy()
            .into_owned();
        let rw = |p: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .with_context(|| format!("opening {p}"))
        };
        let container = rw("/dev/vfio/vfio")?;
        if ioctl_val(&container, VFIO_GET_API_VERSION, 0)? != 0 {
            bail!("VFIO API version is not 0");
        }
        let iommu = if ioctl_val(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU)? > 0 {
            VFIO_TYPE1V2_IOMMU
        } else if ioctl_val(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)? > 0 {
            VFIO_TYPE1_IOMMU
        } else {
            bail!("VFIO: no type 1 IOMMU");
        };
        let group_f = rw(&format!("/dev/vfio/{group}"))?;
        let mut st = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl_ptr(&group_f, VFIO_GROUP_GET_STATUS, &mut st)?;
        if st.flags & GROUP_VIABLE == 0 {
            bail!("VFIO group {group} is not viable (another device of it has a driver)");
        }
        let mut cfd = container.as_raw_fd();
        ioctl_ptr(&group_f, VFIO_GROUP_SET_CONTAINER, &mut cfd)
            .context("VFIO_GROUP_SET_CONTAINER")?;
        ioctl_val(&container, VFIO_SET_IOMMU, iommu).context("VFIO_SET_IOMMU")?;
        let mut name = bdf.as_bytes().to_vec();
        name.push(0);
        let fd = ioctl_ptr(&group_f, VFIO_GROUP_GET_DEVICE_FD, name.as_mut_ptr())
            .context("VFIO_GROUP_GET_DEVICE_FD")?;
        // SAFETY: a fresh descriptor the kernel returned to this process.
        let device = unsafe { File::from_raw_fd(fd) };
        let d = Self {
            device,
            _group: group_f,
            _container: container,
            bdf: bdf.to_string(),
        };
        d.bus_master()?;
        Ok(d)
    }

    /// Sets Bus Master Enable in the Command register: an MSI-X message is a memory write by
    /// the device, which QEMU drops without it (vfio-pci leaves it to the user, as a driver).
    fn bus_master(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let cfg = self.region(PCI_CONFIG_REGION_INDEX)?;
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, cfg.offset + 4)
            .context("reading the Command register")?;
        let cmd = u16::from_le_bytes(b) | PCI_COMMAND_MASTER;
        self.device
            .write_all_at(&cmd.to_le_bytes(), cfg.offset + 4)
            .context("writing the Command register")?;
        Ok(())
    }

    fn region(&self, index: u32) -> Result<RegionInfo> {
        let mut r = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            index,
            ..RegionInfo::default()
        };
        ioctl_ptr(&self.device, VFIO_DEVICE_GET_REGION_INFO, &mut r)
            .with_context(|| format!("VFIO region {index}"))?;
        Ok(r)
    }

    /// BAR2 (the window): its offset in the device descriptor and its size; mappable.
    pub fn window_region(&self) -> Result<(u64, usize)> {
        let r = self.region(2)?;
        if r.flags & REGION_MMAP == 0 {
            bail!("VFIO: BAR2 cannot be mapped");
        }
        Ok((r.offset, usize::try_from(r.size).context("BAR2 size")?))
    }

    /// IVPosition (BAR0 offset 8): this device's peer ID.
    pub fn iv_position(&self) -> Result<u32> {
        use std::os::unix::fs::FileExt;
        let r = self.region(0)?;
        let mut b = [0u8; 4];
        self.device
            .read_exact_at(&mut b, r.offset + 8)
            .context("reading IVPosition")?;
        Ok(u32::from_le_bytes(b))
    }

    /// Routes MSI-X vectors 0..fds.len() to these eventfds.
    pub fn set_msix(&self, fds: &[OwnedFd]) -> Result<()> {
        let mut buf: Vec<u32> = vec![0; 5 + fds.len()];
        buf[0] = (20 + 4 * fds.len()) as u32;
        buf[1] = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        buf[2] = PCI_MSIX_IRQ_INDEX;
        buf[3] = 0;
        buf[4] = fds.len() as u32;
        for (i, f) in fds.iter().enumerate() {
            buf[5 + i] = f.as_raw_fd() as u32;
        }
        ioctl_ptr(&self.device, VFIO_DEVICE_SET_IRQS, buf.as_mut_ptr())
            .context("VFIO_DEVICE_SET_IRQS (MSI-X)")?;
        Ok(())
    }
}
