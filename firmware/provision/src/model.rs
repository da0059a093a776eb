//! The device description: what a provisioned device serves and how it is reached.
//!
//! These are the canonical, already-parsed types (sizes in bytes, addresses as octets) that
//! travel in a bundle (postcard) and that the firmware applies. The TOML form with sizes such
//! as `"256MiB"` is parsed into them by [`crate::parse_toml`] (feature `std`); [`validate`]
//! checks the rules that no type can express, on the host before building a bundle and on the
//! device after opening one.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// A whole device description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// How the device gets its address.
    pub network: Network,
    /// The NVM subsystems it serves.
    pub subsystems: Vec<Subsystem>,
    /// The namespaces, each in one subsystem.
    pub namespaces: Vec<Namespace>,
    /// The management endpoint, if any.
    pub management: Option<Management>,
    /// Limits and weights. Not part of the body's encoding: a bundle carries it in a trailing
    /// section ([`crate::bundle`]), so bundles made before it existed still open.
    #[serde(skip)]
    pub qos: crate::qos::Qos,
    /// The NGUID of each namespace that has one, by index into `namespaces` (keelctl draws one
    /// for every namespace of a subsystem an emulated function exports: [`assign_nguids`]).
    /// Not part of the body's encoding: a bundle carries them in a trailing tagged section
    /// ([`crate::bundle`]); a namespace without one gets the firmware's derived NGUID.
    #[serde(skip)]
    pub nguids: Vec<(u16, [u8; 16])>,
}

impl Device {
    /// The NGUID the description gives namespace `index`, if any.
    pub fn nguid(&self, index: usize) -> Option<[u8; 16]> {
        self.nguids
            .iter()
            .find(|(i, _)| usize::from(*i) == index)
            .map(|(_, g)| *g)
    }

    /// Whether an emulated function exports subsystem `nqn` (a namespace of it names one).
    pub fn has_function(&self, nqn: &str) -> bool {
        self.namespaces
            .iter()
            .any(|n| n.subsystem == nqn && n.function.is_some())
    }
}

/// Gives every namespace of a subsystem an emulated function exports an NGUID that no other
/// namespace ever had: the one of the same namespace in `previous` (same subsystem, NSID,
/// backend and encryption: the namespace goes on), else 16 bytes from `rng` (a
/// cryptographically secure generator; all-zero, which means "none" in Identify, is drawn
/// again). Random 128-bit identifiers do not repeat (a collision among 2^32 of them has a
/// probability below 2^-64), on this device or any other, with no counter to keep: a
/// function removed and created again, on this boot or after a reboot, gets new ones.
/// Namespaces no function exports keep the firmware's derived NGUID (MAC, subsystem, NSID),
/// as before.
pub fn assign_nguids(d: &mut Device, previous: Option<&Device>, rng: &mut dyn FnMut(&mut [u8])) {
    let mut out = Vec::new();
    for (i, n) in d.namespaces.iter().enumerate() {
        if !d.has_function(&n.subsystem) {
            continue;
        }
        let kept = previous.and_then(|p| {
            p.namespaces
                .iter()
                .position(|o| {
                    o.subsystem == n.subsystem
                        && o.nsid == n.nsid
                        && o.backend == n.backend
                        && o.encryption == n.encryption
                })
                .and_then(|j| p.nguid(j))
        });
        let g = kept.or_else(|| d.nguid(i)).unwrap_or_else(|| {
            loop {
                let mut g = [0u8; 16];
                rng(&mut g);
                if g != [0; 16] {
                    break g;
                }
            }
        });
        out.push((i as u16, g));
    }
    d.nguids = out;
}

/// How the device gets its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// DHCPv4.
    Dhcp,
    /// A static address.
    Static {
        /// The address.
        address: [u8; 4],
        /// The prefix length (1..=32).
        prefix_len: u8,
        /// The default gateway, if any.
        gateway: Option<[u8; 4]>,
    },
}

/// One NVM subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subsystem {
    /// Its NQN.
    pub nqn: String,
    /// Serial number reported by Identify Controller (up to 20 ASCII characters); the
    /// firmware makes one up when absent.
    pub serial: Option<String>,
    /// Model number reported by Identify Controller (up to 40 ASCII characters).
    pub model: Option<String>,
    /// Host NQNs allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
}

/// One namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// The NQN of the subsystem that serves it.
    pub subsystem: String,
    /// Its namespace ID in that subsystem (1..=0xFFFF_FFFE).
    pub nsid: u32,
    /// Where its blocks live.
    pub backend: Backend,
    /// Encryption at rest.
    pub encryption: Encryption,
    /// The emulated PCIe function that also exports it, if any.
    pub function: Option<u16>,
}

/// Where a namespace's blocks live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// A RAM disk.
    Ram {
        /// Size in bytes (a multiple of the block size).
        size: u64,
        /// Logical block size: 512 or 4096.
        block_size: u32,
    },
    /// A local NVMe drive's namespace, whole or a slice of it.
    Drive {
        /// The drive's index (in PCI order).
        drive: u16,
        /// The namespace of that drive.
        nsid: u32,
        /// Byte offset of the slice (a multiple of 4 KiB).
        offset: u64,
        /// Length in bytes (a multiple of 4 KiB), or `None`: to the end of the namespace.
        length: Option<u64>,
    },
    /// A namespace of a remote NVMe/TCP subsystem (the firmware is its initiator), whole or a
    /// slice of it.
    Remote {
        /// The remote namespace and how to reach it.
        remote: Remote,
        /// Byte offset of the slice (a multiple of 4 KiB).
        offset: u64,
        /// Length in bytes (a multiple of 4 KiB), or `None`: to the end of the namespace.
        length: Option<u64>,
    },
}

impl Backend {
    /// The slice of a drive or remote backend (offset, length), if it is one.
    pub fn slice(&self) -> Option<(u64, Option<u64>)> {
        match *self {
            Backend::Ram { .. } => None,
            Backend::Drive { offset, length, .. } | Backend::Remote { offset, length, .. } => {
                (offset != 0 || length.is_some()).then_some((offset, length))
            }
        }
    }
}

/// A namespace of a remote NVMe/TCP subsystem and the initiator's settings. Defaults are
/// Linux's (`drivers/nvme/host/fabrics.h`): 4 I/O queues of depth 128, no digests, KATO 5 s,
/// reconnect every 10 s for 600 s, `fast_io_fail_tmo` off, round-robin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// Subsystem NQN on the remote.
    pub nqn: String,
    /// Its addresses (IPv4, TCP port): one per path, 1 to [`MAX_REMOTE_PATHS`].
    pub paths: Vec<([u8; 4], u16)>,
    /// The namespace there.
    pub nsid: u32,
    /// Our host NQN; `None`: derived from the device's MAC
    /// (`nqn.2014-08.org.nvmexpress:uuid:...`).
    pub hostnqn: Option<String>,
    /// I/O queues (TCP connections) per path.
    pub queues: u16,
    /// Commands in flight per I/O queue.
    pub depth: u16,
    /// NVMe/TCP header digest.
    pub header_digest: bool,
    /// NVMe/TCP data digest.
    pub data_digest: bool,
    /// Keep Alive Timeout, milliseconds.
    pub kato_ms: u32,
    /// Delay between association attempts of a path, milliseconds.
    pub reconnect_delay_ms: u64,
    /// How long a path keeps trying after it went down, milliseconds; `None`: forever.
    pub ctrl_loss_tmo_ms: Option<u64>,
    /// Requests waiting this long for a usable path fail; `None`: off.
    pub fast_io_fail_tmo_ms: Option<u64>,
    /// Path selection.
    pub policy: RemotePolicy,
}

impl Remote {
    /// A remote namespace with the default settings.
    pub fn new(nqn: impl Into<String>, paths: Vec<([u8; 4], u16)>, nsid: u32) -> Self {
        Remote {
            nqn: nqn.into(),
            paths,
            nsid,
            hostnqn: None,
            queues: 4,
            depth: 128,
            header_digest: false,
            data_digest: false,
            kato_ms: 5_000,
            reconnect_delay_ms: 10_000,
            ctrl_loss_tmo_ms: Some(600_000),
            fast_io_fail_tmo_ms: None,
            policy: RemotePolicy::RoundRobin,
        }
    }

    /// Whether `other` is the same remote namespace (subsystem, namespace, set of paths):
    /// namespaces that name it share one association per path.
    pub fn same_target(&self, other: &Remote) -> bool {
        self.nqn == other.nqn
            && self.nsid == other.nsid
            && self.paths.len() == other.paths.len()
            && self.paths.iter().all(|p| other.paths.contains(p))
    }

    /// The paths as `a.b.c.d:port,...`.
    pub fn paths_text(&self) -> String {
        let mut s = String::new();
        for (i, ([a, b, c, d], port)) in self.paths.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!("{a}.{b}.{c}.{d}:{port}"));
        }
        s
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "remote {} namespace {} via {}",
            self.nqn,
            self.nsid,
            self.paths_text()
        )
    }
}

/// How a remote volume spreads I/O over its usable paths (Linux `iopolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemotePolicy {
    /// Each command to the next usable path in turn.
    RoundRobin,
    /// Each command to the usable path with the fewest commands in flight.
    QueueDepth,
}

impl RemotePolicy {
    /// The name used in the TOML description and the boot arguments.
    pub fn name(self) -> &'static str {
        match self {
            RemotePolicy::RoundRobin => "round-robin",
            RemotePolicy::QueueDepth => "queue-depth",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        [RemotePolicy::RoundRobin, RemotePolicy::QueueDepth]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// Encryption at rest of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encryption {
    /// Blocks stored as written.
    None,
    /// XTS-AES-128 (a 32-byte key: two AES-128 keys).
    Aes128Xts,
    /// XTS-AES-256 (a 64-byte key: two AES-256 keys).
    Aes256Xts,
}

impl Encryption {
    /// The data key length in bytes (0 for none).
    pub fn key_len(self) -> usize {
        match self {
            Encryption::None => 0,
            Encryption::Aes128Xts => 32,
            Encryption::Aes256Xts => 64,
        }
    }

    /// The name used in the TOML description.
    pub fn name(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Aes128Xts => "aes-128-xts",
            Encryption::Aes256Xts => "aes-256-xts",
        }
    }

    /// Parses a TOML name.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Encryption::None,
            Encryption::Aes128Xts,
            Encryption::Aes256Xts,
        ]
        .into_iter()
        .find(|e| e.name() == s)
    }
}

/// The management endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Management {
    /// Its TCP port.
    pub port: u16,
    /// The Ed25519 public key whose signatures it accepts.
    pub authorized_key: [u8; 32],
}

/// The default management port.
pub const DEFAULT_MGMT_PORT: u16 = 7000;
/// At most this many subsystems in one description.
pub const MAX_SUBSYSTEMS: usize = 64;
/// At most this many namespaces in one description.
pub const MAX_NAMESPACES: usize = 256;
/// At most this many allowed hosts per subsystem.
pub const MAX_ALLOWED_HOSTS: usize = 64;
/// Largest RAM namespace accepted (1 TiB).
pub const MAX_RAM: u64 = 1 << 40;
/// Alignment of drive slices.
pub const SLICE_ALIGN: u64 = 4096;
/// Largest NQN in bytes (NVMe base specification 2.0, 4.5).
pub const MAX_NQN: usize = 223;
/// Paths of one remote namespace at most.
pub const MAX_REMOTE_PATHS: usize = 8;
/// I/O queues per remote path at most.
pub const MAX_REMOTE_QUEUES: u16 = 64;
/// Commands in flight per remote I/O queue at most (Linux `NVMF_MAX_QUEUE_SIZE`).
pub const MAX_REMOTE_DEPTH: u16 = 1024;

/// A rule of [`validate`] that a description breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Which field, as a path: `namespace[2].backend.offset`, `subsystem[0].nqn`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn err<T>(path: String, message: String) -> Result<T, ValidationError> {
    Err(ValidationError { path, message })
}

/// Checks an NQN: `nqn.YYYY-MM.reverse.domain[:anything]` (or the `nqn.2014-08.org.nvmexpress:uuid:`
/// form, which has the same prefix), at most 223 bytes, printable ASCII.
pub fn check_nqn(nqn: &str) -> Result<(), String> {
    if nqn.len() > MAX_NQN {
        return Err(format!("NQN is {} bytes, at most {MAX_NQN}", nqn.len()));
    }
    if !nqn.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("NQN must be printable ASCII without spaces".into());
    }
    let b = nqn.as_bytes();
    let digits =
        |r: core::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let ok = nqn.starts_with("nqn.")
        && digits(4..8)
        && b.get(8) == Some(&b'-')
        && digits(9..11)
        && b.get(11) == Some(&b'.')
        && matches!(b.get(9..11), Some([m1, m2]) if (1..=12).contains(&((m1 - b'0') * 10 + (m2 - b'0'))));
    if !ok {
        return Err(format!(
            "`{nqn}` is not an NQN (nqn.YYYY-MM.reverse.domain:name, e.g. nqn.2026-11.dev.keel:vol0)"
        ));
    }
    let domain = nqn[12..].split(':').next().unwrap_or("");
    if domain.is_empty()
        || domain
            .split('.')
            .any(|l| l.is_empty() || !l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
    {
        return Err(format!(
            "`{nqn}`: the part after the date must be a reverse domain name (e.g. dev.keel)"
        ));
    }
    Ok(())
}

fn check_ascii_field(s: &str, max: usize, what: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!(
            "{what} must be 1 to {max} characters, not {}",
            s.len()
        ));
    }
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("{what} must be printable ASCII"));
    }
    Ok(())
}

/// Checks the rules of a description that its types cannot express: at least one subsystem,
/// NQN syntax, no duplicate NQNs or host NQNs, every namespace in a known subsystem, unique
/// NSIDs per subsystem, sizes in range and aligned, no overlapping slices of one drive
/// namespace, a usable management key.
pub fn validate(d: &Device) -> Result<(), ValidationError> {
    if let Network::Static {
        address,
        prefix_len,
        gateway,
    } = &d.network
    {
        if !(1..=32).contains(prefix_len) {
            return err(
                "network.address".into(),
                format!("prefix length /{prefix_len} is not 1..=32"),
            );
        }
        if address == &[0; 4] || address[0] >= 224 {
            return err("network.address".into(), "not a unicast address".into());
        }
        if let Some(gw) = gateway {
            let mask = u32::MAX << (32 - u32::from(*prefix_len));
            if u32::from_be_bytes(*gw) & mask != u32::from_be_bytes(*address) & mask {
                return err(
                    "network.gateway".into(),
                    "the gateway is outside the address's subnet".into(),
                );
            }
        }
    }
    if d.subsystems.is_empty() {
        return err(
            "subsystem".into(),
            "at least one [[subsystem]] is needed".into(),
        );
    }
    if d.subsystems.len() > MAX_SUBSYSTEMS {
        return err(
            "subsystem".into(),
            format!("at most {MAX_SUBSYSTEMS} subsystems"),
        );
    }
    if d.namespaces.len() > MAX_NAMESPACES {
        return err(
            "namespace".into(),
            format!("at most {MAX_NAMESPACES} namespaces"),
        );
    }
    for (i, s) in d.subsystems.iter().enumerate() {
        check_nqn(&s.nqn).or_else(|m| err(format!("subsystem[{i}].nqn"), m))?;
        if s.nqn == "nqn.2014-08.org.nvmexpress.discovery" {
            return err(
                format!("subsystem[{i}].nqn"),
                "the discovery NQN cannot be served as a subsystem".into(),
            );
        }
        if let Some(j) = d.subsystems[..i].iter().position(|o| o.nqn == s.nqn) {
            return err(
                format!("subsystem[{i}].nqn"),
                format!("duplicate NQN `{}` (also subsystem[{j}])", s.nqn),
            );
        }
        if let Some(serial) = &s.serial {
            check_ascii_field(serial, 20, "serial")
                .or_else(|m| err(format!("subsystem[{i}].serial"), m))?;
        }
        if let Some(model) = &s.model {
            check_ascii_field(model, 40, "model")
                .or_else(|m| err(format!("subsystem[{i}].model"), m))?;
        }
        if s.allowed_hosts.len() > MAX_ALLOWED_HOSTS {
            return err(
                format!("subsystem[{i}].allowed_hosts"),
                format!("at most {MAX_ALLOWED_HOSTS} hosts"),
            );
        }
        for (h, host) in s.allowed_hosts.iter().enumerate() {
            let path = format!("subsystem[{i}].allowed_hosts[{h}]");
            check_nqn(host).or_else(|m| err(path.clone(), m))?;
            if s.allowed_hosts[..h].contains(host) {
                return err(path, format!("duplicate host NQN `{host}`"));
            }
        }
    }
    for (i, ns) in d.namespaces.iter().enumerate() {
        let p = |f: &str| format!("namespace[{i}].{f}");
        if !d.subsystems.iter().any(|s| s.nqn == ns.subsystem) {
            return err(
                p("subsystem"),
                format!("no [[subsystem]] has the NQN `{}`", ns.subsystem),
            );
        }
        if ns.nsid == 0 || ns.nsid == u32::MAX {
            return err(
                p("nsid"),
                format!("NSID {} is reserved (1..=4294967294)", ns.nsid),
            );
        }
        if let Some(j) = d.namespaces[..i]
            .iter()
            .position(|o| o.subsystem == ns.subsystem && o.nsid == ns.nsid)
        {
            return err(
                p("nsid"),
                format!(
                    "duplicate NSID {} in `{}` (also namespace[{j}])",
                    ns.nsid, ns.subsystem
                ),
            );
        }
        if let Some(f) = ns.function
            && f > 31
        {
            return err(
                p("function"),
                format!("emulated function {f} is not 0..=31"),
            );
        }
        match ns.backend {
            Backend::Ram { size, block_size } => {
                if block_size != 512 && block_size != 4096 {
                    return err(
                        p("block_size"),
                        format!("block size {block_size} is not 512 or 4096"),
                    );
                }
                if size == 0 || size > MAX_RAM || !size.is_multiple_of(u64::from(block_size)) {
                    return err(
                        p("backend.ram"),
                        format!(
                            "RAM size {size} must be 1 block to 1 TiB, a multiple of {block_size} bytes"
                        ),
                    );
                }
            }
            Backend::Drive {
                drive,
                nsid,
                offset,
                length,
            } => {
                if nsid == 0 || nsid == u32::MAX {
                    return err(p("backend.nsid"), format!("drive NSID {nsid} is reserved"));
                }
                check_slice(offset, length, &p)?;
                for (j, o) in d.namespaces[..i].iter().enumerate() {
                    if let Backend::Drive {
                        drive: od,
                        nsid: on,
                        offset: oo,
                        length: ol,
                    } = o.backend
                        && od == drive
                        && on == nsid
                        && overlaps(offset, length, oo, ol)
                    {
                        return err(
                            p("backend"),
                            format!("overlaps namespace[{j}] on drive {drive} namespace {nsid}"),
                        );
                    }
                }
            }
            Backend::Remote {
                ref remote,
                offset,
                length,
            } => {
                check_remote(remote, &|f| p(&format!("backend.remote.{f}")))?;
                check_slice(offset, length, &p)?;
                for (j, o) in d.namespaces[..i].iter().enumerate() {
                    let Backend::Remote {
                        remote: ref or,
                        offset: oo,
                        length: ol,
                    } = o.backend
                    else {
                        continue;
                    };
                    if or.same_target(remote) {
                        if or != remote {
                            return err(
                                p("backend.remote"),
                                format!(
                                    "namespace[{j}] uses the same remote namespace with other \
                                     settings (they share its associations: give both the same)"
                                ),
                            );
                        }
                        if overlaps(offset, length, oo, ol) {
                            return err(
                                p("backend"),
                                format!("overlaps namespace[{j}] on {remote}"),
                            );
                        }
                    } else if or.paths.iter().any(|a| remote.paths.contains(a))
                        && or.nqn == remote.nqn
                        && or.nsid == remote.nsid
                    {
                        return err(
                            p("backend.remote.paths"),
                            format!(
                                "namespace[{j}] reaches the same remote namespace over other \
                                 paths: give both the same list"
                            ),
                        );
                    }
                }
            }
        }
    }
    if let Some(m) = &d.management {
        if m.port == 0 {
            return err("management.port".into(), "port 0 is not a port".into());
        }
        if m.port == 4420 || m.port == 8009 {
            return err(
                "management.port".into(),
                format!("port {} is taken by NVMe/TCP", m.port),
            );
        }
        if ed25519_dalek::VerifyingKey::from_bytes(&m.authorized_key).is_err()
            || m.authorized_key == [0; 32]
        {
            return err(
                "management.authorized_key".into(),
                "not an Ed25519 public key".into(),
            );
        }
    }
    for (k, (i, g)) in d.nguids.iter().enumerate() {
        let p = format!("namespace[{i}].nguid");
        if usize::from(*i) >= d.namespaces.len() {
            return err(p, "names no namespace".into());
        }
        if *g == [0; 16] {
            return err(p, "all zero (Identify's \"no NGUID\")".into());
        }
        if let Some((j, _)) = d.nguids[..k].iter().find(|(j, h)| j == i || h == g) {
            return err(
                p,
                if j == i {
                    String::from("given twice")
                } else {
                    format!("namespace[{j}] has the same NGUID")
                },
            );
        }
    }
    crate::qos::validate_qos(d)
}

/// Checks a slice's offset and length (4 KiB multiples, no overflow).
fn check_slice(
    offset: u64,
    length: Option<u64>,
    p: &dyn Fn(&str) -> String,
) -> Result<(), ValidationError> {
    if !offset.is_multiple_of(SLICE_ALIGN) {
        return err(
            p("backend.offset"),
            format!("offset {offset} is not a multiple of 4 KiB"),
        );
    }
    if let Some(len) = length {
        if len == 0 || !len.is_multiple_of(SLICE_ALIGN) {
            return err(
                p("backend.length"),
                format!("length {len} must be a nonzero multiple of 4 KiB"),
            );
        }
        if offset.checked_add(len).is_none() {
            return err(p("backend.length"), "offset + length overflows".into());
        }
    }
    Ok(())
}

/// Checks a remote backend's own fields; `p` names a field of it.
pub fn check_remote(r: &Remote, p: &dyn Fn(&str) -> String) -> Result<(), ValidationError> {
    check_nqn(&r.nqn).or_else(|m| err(p("nqn"), m))?;
    if r.nqn == "nqn.2014-08.org.nvmexpress.discovery" {
        return err(
            p("nqn"),
            "the discovery NQN has no namespaces to use".into(),
        );
    }
    if r.paths.is_empty() || r.paths.len() > MAX_REMOTE_PATHS {
        return err(
            p("paths"),
            format!("1 to {MAX_REMOTE_PATHS} paths (\"a.b.c.d:port\") are needed"),
        );
    }
    for (k, (ip, port)) in r.paths.iter().enumerate() {
        if *port == 0 || *ip == [0; 4] || ip[0] >= 224 {
            return err(
                p(&format!("paths[{k}]")),
                "not a unicast IPv4 address with a nonzero port".into(),
            );
        }
        if r.paths[..k].contains(&(*ip, *port)) {
            return err(
                p(&format!("paths[{k}]")),
                "the same path is given twice".into(),
            );
        }
    }
    if r.nsid == 0 || r.nsid == u32::MAX {
        return err(p("nsid"), format!("NSID {} is reserved", r.nsid));
    }
    if let Some(h) = &r.hostnqn {
        check_nqn(h).or_else(|m| err(p("hostnqn"), m))?;
    }
    if r.queues == 0 || r.queues > MAX_REMOTE_QUEUES {
        return err(
            p("queues"),
            format!("{} I/O queues: 1 to {MAX_REMOTE_QUEUES}", r.queues),
        );
    }
    if r.depth < 2 || r.depth > MAX_REMOTE_DEPTH {
        return err(
            p("depth"),
            format!("queue depth {}: 2 to {MAX_REMOTE_DEPTH}", r.depth),
        );
    }
    if r.kato_ms == 0 {
        return err(
            p("kato"),
            "keep alive is mandatory on NVMe/TCP (NVMe-oF 1.1 §3.3): kato must not be 0".into(),
        );
    }
    if r.reconnect_delay_ms == 0 {
        return err(p("reconnect_delay"), "must not be 0".into());
    }
    Ok(())
}

/// Whether two byte ranges `[o, o + l)` (`None`: to the end) overlap.
fn overlaps(a: u64, al: Option<u64>, b: u64, bl: Option<u64>) -> bool {
    let a_end = al.map_or(u64::MAX, |l| a.saturating_add(l));
    let b_end = bl.map_or(u64::MAX, |l| b.saturating_add(l));
    a < b_end && b < a_end
}

/// Parses a size: a byte count (`"4096"`) or a number with a binary unit (`"256MiB"`,
/// `"4 KiB"`, `"1GiB"`; `K`, `M`, `G`, `T` mean the same). Decimal units (`MB`) are refused to
/// avoid guessing.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("`{s}` is not a size (e.g. \"256MiB\", \"4096\")"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("`{s}` is too large"))?;
    let shift = match t[digits..].trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        u @ ("KB" | "MB" | "GB" | "TB" | "k" | "kB") => {
            return Err(format!(
                "`{s}`: unit {u} is ambiguous; use KiB, MiB, GiB or TiB"
            ));
        }
        u => return Err(format!("`{s}`: unknown unit `{u}` (B, KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqns() {
        assert!(check_nqn("nqn.2026-11.dev.keel:vol0").is_ok());
        assert!(
            check_nqn("nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
                .is_ok()
        );
        for bad in [
            "",
            "nqn.26-11.dev.keel:x",
            "nqn.2026-13.dev.keel:x",
            "iqn.2026-11.dev:x",
            "nqn.2026-11.:x",
            "nqn.2026-11.dev keel:x",
        ] {
            assert!(check_nqn(bad).is_err(), "{bad}");
        }
        let long = format!("nqn.2026-11.dev.keel:{}", "x".repeat(210));
        assert!(check_nqn(&long).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4 KiB"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn overlap() {
        assert!(overlaps(0, None, 4096, Some(4096)));
        assert!(!overlaps(0, Some(4096), 4096, None));
        assert!(overlaps(4096, Some(8192), 8191, Some(4096)));
    }
}
