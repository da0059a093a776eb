//! Emulated PCIe functions created and removed live (`keelctl function create|remove`), the
//! way a DPU hot-plugs functions (NVIDIA SNAP's `controller_nvme_create` on an emulation
//! function): the requests, their checks, and the slot table the device reports.
//!
//! The device's PCIe endpoint has a fixed number of function *slots* (on QEMU one
//! `ivshmem` window each, `qemu/run --window`; on a board the physical function and the
//! virtual functions whose BARs the endpoint provisions). A slot is `free` (the host sees no
//! function: the window header carries no magic), `live` (a controller of its own subsystem,
//! with its own namespaces, queues and QoS limits) or `removing` (removed, waiting for the
//! commands it had at backends to come back before the slot can be used again).
//!
//! # Wire form of `CreateFunction` (postcard: integers are LEB128 varints, a string or list
//! is a varint count then its bytes or items, `[u8; 4]` is 4 raw bytes, an enum is its
//! variant's varint index then its fields)
//!
//! | field | bytes |
//! |---|---|
//! | request | `03` (`CreateFunction`, the fourth `Request` variant) |
//! | slot, nqn, serial, model | varint; string; string; string |
//! | namespaces | varint count, then each: NSID varint, backend, encryption |
//! | backend | `00` Ram: bytes, block size · `01` Drive: drive, NSID, offset, length · `02` Remote: NQN string, paths (count, then each 4 address bytes and a varint port), NSID, offset, length |
//! | encryption | `00` none · `01` aes-128-xts · `02` aes-256-xts |
//! | limits | varint count, then each: name string, rate varint, burst varint |
//!
//! Everything here is pure: [`FunctionSpec::validate`] and [`check_create`] /
//! [`check_remove`] decide on a request from the request and the slot table alone, so a
//! refused request changes nothing on the device.

use crate::QosLimit;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Most namespaces one created function has.
pub const MAX_NAMESPACES: usize = 32;
/// Longest NQN (NVMe base 2.0 §7.9: 223 bytes).
pub const NQN_MAX_LEN: usize = 223;
/// The limit names a function's controller can have (README "Quality of service").
pub const LIMIT_NAMES: [&str; 6] = [
    "iops",
    "read_iops",
    "write_iops",
    "bps",
    "read_bps",
    "write_bps",
];

/// Where a created function's namespace keeps its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FunctionBackend {
    /// RAM of the device (zeroed lazily).
    Ram {
        /// Capacity in bytes, a multiple of `block_size`.
        bytes: u64,
        /// 512 or 4096.
        block_size: u32,
    },
    /// A slice of a local NVMe drive's namespace.
    Drive {
        /// Drive index (`qemu/run --disk`, in order).
        drive: u16,
        /// Namespace on the drive.
        nsid: u32,
        /// Start of the slice in bytes (4 KiB aligned).
        offset: u64,
        /// Length in bytes (4 KiB aligned); 0: to the end of the drive's namespace.
        length: u64,
    },
    /// A namespace of a remote NVMe/TCP subsystem (the device is its initiator, with Linux's
    /// default settings: README "Remote volumes"), whole or a slice. Appended: a device from
    /// before it refuses the request as malformed.
    Remote {
        /// Subsystem NQN on the remote.
        nqn: String,
        /// Its addresses (IPv4, TCP port), one per path: 1 to [`MAX_REMOTE_PATHS`].
        paths: Vec<([u8; 4], u16)>,
        /// The namespace there.
        nsid: u32,
        /// Start of the slice in bytes (4 KiB aligned).
        offset: u64,
        /// Length in bytes (4 KiB aligned); 0: to the end of the remote namespace.
        length: u64,
    },
}

/// Paths of one remote namespace at most (as in a device description).
pub const MAX_REMOTE_PATHS: usize = 8;

/// Encryption at rest of a created function's namespace. The device draws the data key from
/// its random generator when it creates the namespace and keeps it in RAM only: it never
/// leaves the device, and removing the function (or a reboot) destroys it, a crypto-erase of
/// what the namespace held. A namespace whose data must outlive the function is described in
/// the device description instead (its key wrapped in the bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FunctionCipher {
    /// Blocks stored as written.
    #[default]
    None,
    /// XTS-AES-128 (IEEE 1619; a 32-byte key).
    Aes128Xts,
    /// XTS-AES-256 (a 64-byte key).
    Aes256Xts,
}

impl FunctionCipher {
    /// `none`, `aes-128-xts`, `aes-256-xts` (the names of the device description).
    pub fn name(self) -> &'static str {
        match self {
            FunctionCipher::None => "none",
            FunctionCipher::Aes128Xts => "aes-128-xts",
            FunctionCipher::Aes256Xts => "aes-256-xts",
        }
    }

    /// The data key's length in bytes (0: none).
    pub fn key_len(self) -> usize {
        match self {
            FunctionCipher::None => 0,
            FunctionCipher::Aes128Xts => 32,
            FunctionCipher::Aes256Xts => 64,
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            FunctionCipher::None,
            FunctionCipher::Aes128Xts,
            FunctionCipher::Aes256Xts,
        ]
        .into_iter()
        .find(|c| c.name() == s)
    }
}

/// One namespace of a function to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionNamespace {
    /// Its NSID in the function's subsystem.
    pub nsid: u32,
    /// Its backend.
    pub backend: FunctionBackend,
    /// Its encryption at rest.
    pub encryption: FunctionCipher,
}

/// A function to create on a free slot: its subsystem (the host sees one controller of it)
/// with its namespaces, and its controller's QoS limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The slot (0: the physical function, 1.. the virtual functions).
    pub slot: u16,
    /// Subsystem NQN; no other subsystem of the device may have it.
    pub nqn: String,
    /// Serial number (empty: the device makes one); at most 20 ASCII characters.
    pub serial: String,
    /// Model number (empty: "Keel emulated NVMe"); at most 40 ASCII characters.
    pub model: String,
    /// Its namespaces (at least one).
    pub namespaces: Vec<FunctionNamespace>,
    /// Limits of the function's controller (`per_sec` > 0; `burst` 0: a tenth of a second's
    /// worth).
    pub limits: Vec<QosLimit>,
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SlotState {
    /// No function: the host sees nothing there.
    #[default]
    Free,
    /// A function serves its subsystem.
    Live,
    /// Removed; commands it had at backends are still coming back.
    Removing,
}

impl SlotState {
    /// `free`, `live`, `removing`.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Free => "free",
            SlotState::Live => "live",
            SlotState::Removing => "removing",
        }
    }
}

/// One function slot of the device's endpoint, as `keelctl status` and `keelctl function
/// list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FunctionSlotInfo {
    /// Slot number.
    pub slot: u16,
    /// What it does.
    pub state: SlotState,
    /// `pf` for slot 0, `vfN` for slot N.
    pub kind: String,
    /// Subsystem of its function (empty when free).
    pub subsystem: String,
    /// NSIDs of its namespaces.
    pub nsids: Vec<u32>,
    /// The host's side: `disabled` (CC.EN = 0), `ready`, `shutdown` (CC.SHN written), `failed`
    /// (CSTS.CFS), empty when free.
    pub host: String,
    /// `boot` (from the configuration) or `created` (by a management request).
    pub origin: String,
    /// Limits of its controller.
    pub limits: Vec<QosLimit>,
}

/// The kind of slot `slot`: `pf` or `vfN`.
pub fn slot_kind(slot: u16) -> String {
    if slot == 0 {
        String::from("pf")
    } else {
        format!("vf{slot}")
    }
}

fn printable(s: &str, max: usize, what: &str) -> Result<(), String> {
    if s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("{what}: at most {max} printable ASCII characters"));
    }
    Ok(())
}

impl FunctionSpec {
    /// Checks the request on its own: the NQN, serial and model, the namespaces (1 to
    /// [`MAX_NAMESPACES`], NSIDs unique and valid, sizes and alignment) and the limits.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.nqn;
        if n.is_empty() || n.len() > NQN_MAX_LEN || !n.starts_with("nqn.") {
            return Err(format!(
                "subsystem NQN {n:?}: must start with \"nqn.\" and have at most {NQN_MAX_LEN} bytes"
            ));
        }
        if n.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!("subsystem NQN {n:?}: control characters"));
        }
        if n == "nqn.2014-08.org.nvmexpress.discovery" {
            return Err(String::from("subsystem NQN: the discovery NQN"));
        }
        printable(&self.serial, 20, "serial")?;
        printable(&self.model, 40, "model")?;
        if self.namespaces.is_empty() || self.namespaces.len() > MAX_NAMESPACES {
            return Err(format!(
                "{} namespaces: a function has 1 to {MAX_NAMESPACES}",
                self.namespaces.len()
            ));
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if ns.nsid == 0 || ns.nsid == u32::MAX {
                return Err(format!("namespace {}: NSID {} is invalid", i + 1, ns.nsid));
            }
            if self.namespaces[..i].iter().any(|o| o.nsid == ns.nsid) {
                return Err(format!("NSID {} given twice", ns.nsid));
            }
            match ns.backend {
                FunctionBackend::Ram { bytes, block_size } => {
                    if block_size != 512 && block_size != 4096 {
                        return Err(format!(
                            "namespace {}: block size {block_size}: 512 or 4096",
                            ns.nsid
                        ));
                    }
                    if bytes == 0 || !bytes.is_multiple_of(u64::from(block_size)) {
                        return Err(format!(
                            "namespace {}: size {bytes}: a non-zero multiple of {block_size}",
                            ns.nsid
                        ));
                    }
                }
                FunctionBackend::Drive {
                    nsid,
                    offset,
                    length,
                    ..
                } => {
                    if nsid == 0 || nsid == u32::MAX {
                        return Err(format!(
                            "namespace {}: drive namespace {nsid} is invalid",
                            ns.nsid
                        ));
                    }
                    if !offset.is_multiple_of(4096) || !length.is_multiple_of(4096) {
                        return Err(format!(
                            "namespace {}: a drive slice's offset and length are 4 KiB aligned",
                            ns.nsid
                        ));
                    }
                }
                FunctionBackend::Remote {
                    ref nqn,
                    ref paths,
                    nsid,
                    offset,
                    length,
                } => {
                    let id = ns.nsid;
                    if !nqn.starts_with("nqn.")
                        || nqn.len() > NQN_MAX_LEN
                        || !nqn.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(format!("namespace {id}: remote NQN {nqn:?} is not an NQN"));
                    }
                    if paths.is_empty() || paths.len() > MAX_REMOTE_PATHS {
                        return Err(format!(
                            "namespace {id}: a remote namespace has 1 to {MAX_REMOTE_PATHS} paths"
                        ));
                    }
                    for (k, (ip, port)) in paths.iter().enumerate() {
                        if *port == 0 || *ip == [0; 4] || ip[0] >= 224 {
                            return Err(format!(
                                "namespace {id}: remote path {}: not a unicast address and port",
                                k + 1
                            ));
                        }
                        if paths[..k].contains(&(*ip, *port)) {
                            return Err(format!(
                                "namespace {id}: remote path {} given twice",
                                k + 1
                            ));
                        }
                    }
                    if nsid == 0 || nsid == u32::MAX {
                        return Err(format!(
                            "namespace {id}: remote namespace {nsid} is invalid"
                        ));
                    }
                    if !offset.is_multiple_of(4096) || !length.is_multiple_of(4096) {
                        return Err(format!(
                            "namespace {id}: a remote slice's offset and length are 4 KiB aligned"
                        ));
                    }
                }
            }
        }
        for (i, l) in self.limits.iter().enumerate() {
            if !LIMIT_NAMES.contains(&l.name.as_str()) {
                return Err(format!(
                    "limit {:?}: one of {}",
                    l.name,
                    LIMIT_NAMES.join(", ")
                ));
            }
            if l.per_sec == 0 {
                return Err(format!("limit {}: a rate of 0", l.name));
            }
            if self.limits[..i].iter().any(|o| o.name == l.name) {
                return Err(format!("limit {} given twice", l.name));
            }
        }
        Ok(())
    }
}

/// Decides a create request against the slot table `slots` and the NQNs of the subsystems
/// the device serves (`nqn_in_use`): the slot must exist and be free, the NQN unused.
pub fn check_create(
    spec: &FunctionSpec,
    slots: &[FunctionSlotInfo],
    nqn_in_use: impl Fn(&str) -> bool,
) -> Result<(), String> {
    spec.validate()?;
    let Some(s) = slots.iter().find(|s| s.slot == spec.slot) else {
        return Err(format!(
            "slot {}: the device has {} function slot(s) (0..{})",
            spec.slot,
            slots.len(),
            slots.len()
        ));
    };
    match s.state {
        SlotState::Free => {}
        SlotState::Live => {
            return Err(format!(
                "slot {} is busy: function {} serves {} (remove it first)",
                spec.slot, s.kind, s.subsystem
            ));
        }
        SlotState::Removing => {
            return Err(format!(
                "slot {}: its removed function still has commands at backends; try again",
                spec.slot
            ));
        }
    }
    if nqn_in_use(&spec.nqn) {
        return Err(format!(
            "subsystem {} exists already on this device",
            spec.nqn
        ));
    }
    Ok(())
}

/// Decides a remove request against the slot table: the slot must hold a live function.
pub fn check_remove(slot: u16, slots: &[FunctionSlotInfo]) -> Result<(), String> {
    match slots.iter().find(|s| s.slot == slot) {
        None => Err(format!(
            "slot {slot}: the device has {} function slot(s)",
            slots.len()
        )),
        Some(s) if s.state == SlotState::Live => Ok(()),
        Some(s) => Err(format!(
            "slot {slot} has no function to remove (it is {})",
            s.state.name()
        )),
    }
}
