//! The development configuration, read from the boot arguments (`/chosen/bootargs`, set with
//! `qemu/run --append "..."`). A provisioned device gets its configuration from a signed
//! bundle instead; this is what a developer's QEMU runs.
//!
//! | argument | meaning | default |
//! |---|---|---|
//! | `keel.nqn=NQN` | the NVMe/TCP subsystem's NQN | `nqn.2026-11.dev.keel:default` |
//! | `keel.ns=SPEC[,SPEC...]` | the NVMe/TCP namespaces (NSID 1, 2, ...): `ram:MiB`, `drive:D[:NSID]` (a whole drive namespace), `drive:D:NSID:OFF+LEN` (a slice, MiB; `OFF+` to the end), `remote:ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFF+LEN]` (a namespace of a remote NVMe/TCP subsystem over one or more paths, whole or a slice) | see below |
//! | `keel.ram=256[,64...]` | one RAM namespace per size in MiB | `256` without drives; without `keel.ns` and `keel.ram`, every drive namespace is served whole |
//! | `keel.bs=512\|4096` | logical block size of RAM namespaces | `512` |
//! | `keel.allow=NQN[,NQN...]` | host NQNs allowed to connect | any host |
//! | `keel.xts=NSID:HEX` | encrypt namespace NSID with AES-XTS; 64 hex digits = XTS-AES-128, 128 = XTS-AES-256 (repeatable) | none |
//! | `keel.fn.ram=MiB` | size of each emulated PCIe function's RAM namespace | `64` |
//! | `keel.fn.xts=FN:HEX` | encrypt emulated function FN's namespace (repeatable) | none |
//! | `keel.fn.boot=N` | only the first N windows get a function at boot; the others are free function slots for `keelctl function create` | every window |
//! | `keel.fn.ns=SPEC[,SPEC...]` | emulated function N's namespace is the Nth SPEC (as in `keel.ns`, e.g. `remote:...`: the SNAP pattern) | RAM of `keel.fn.ram` |
//! | `keel.remote.OPTION=VALUE` | settings of every `remote:` namespace: `queues` (4), `depth` (128), `digests` (`none`, `header`, `data`, `both`), `kato` (5), `reconnect_delay` (10), `ctrl_loss_tmo` (600; `-1` forever), `fast_io_fail_tmo` (off), `policy` (`round-robin`, `queue-depth`), `hostnqn` (derived from the MAC); times in seconds, or with `ms` | Linux's defaults |
//! | `keel.advertise=ADDR:PORT` | the NVMe/TCP address in the discovery log | the interface's |
//! | `keel.ip=A.B.C.D/N`, `keel.gw=A.B.C.D` | static address instead of DHCPv4 | DHCP |
//!
//! Keys given here are development keys: the boot arguments are readable by anything that can
//! read the device tree, and the banner prints them redacted.

use crate::klog;
use alloc::{boxed::Box, format, string::String, vec::Vec};
use keel_provision::{Remote, RemotePolicy};

/// The default NVMe/TCP subsystem NQN.
pub const DEFAULT_NQN: &str = "nqn.2026-11.dev.keel:default";

/// Where a namespace's data lives (`keel.ns=` entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsSpec {
    /// A RAM disk of this many bytes.
    Ram(u64),
    /// A local drive's namespace, whole or a slice (byte offset, byte length or the rest).
    Drive {
        /// Drive index, in PCI order.
        drive: usize,
        /// Namespace on the drive.
        nsid: u32,
        /// A slice of it.
        slice: Option<(u64, Option<u64>)>,
    },
    /// A namespace of a remote NVMe/TCP subsystem, whole or a slice.
    Remote {
        /// The remote namespace and the initiator's settings.
        remote: Box<Remote>,
        /// A slice of it (byte offset, byte length or the rest).
        slice: Option<(u64, Option<u64>)>,
    },
}

fn fmt_slice(
    f: &mut core::fmt::Formatter<'_>,
    slice: Option<(u64, Option<u64>)>,
) -> core::fmt::Result {
    if let Some((off, len)) = slice {
        write!(f, " from {} MiB", off >> 20)?;
        match len {
            Some(l) => write!(f, ", {} MiB", l >> 20)?,
            None => f.write_str(" to the end")?,
        }
    }
    Ok(())
}

/// Parses `OFF+LEN` (MiB; LEN empty = to the end).
fn parse_slice(range: &str) -> Option<(u64, Option<u64>)> {
    let (off, len) = range.split_once('+')?;
    let off: u64 = off.parse().ok()?;
    let len = if len.is_empty() {
        None
    } else {
        Some(len.parse::<u64>().ok()?.checked_mul(1 << 20)?)
    };
    Some((off.checked_mul(1 << 20)?, len))
}

impl core::fmt::Display for NsSpec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            NsSpec::Ram(b) => write!(f, "RAM {} MiB", b >> 20),
            NsSpec::Drive { drive, nsid, slice } => {
                write!(f, "drive {drive} namespace {nsid}")?;
                fmt_slice(f, slice)
            }
            NsSpec::Remote { ref remote, slice } => {
                write!(f, "{remote}")?;
                fmt_slice(f, slice)
            }
        }
    }
}

impl NsSpec {
    /// Parses `ram:MiB`, `drive:D`, `drive:D:NSID`, `drive:D:NSID:OFF+LEN` (MiB; LEN empty
    /// = to the end of the namespace) or `remote:ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFF+LEN]`
    /// (the settings of `template`, its NQN, paths and NSID replaced).
    pub fn parse(s: &str, template: &Remote) -> Option<Self> {
        if let Some(rest) = s.strip_prefix("remote:") {
            return Self::parse_remote(rest, template);
        }
        let mut parts = s.split(':');
        match parts.next()? {
            "ram" => {
                let mib: u64 = parts.next()?.parse().ok()?;
                (1..=65536).contains(&mib).then_some(NsSpec::Ram(mib << 20))
            }
            "drive" => {
                let drive = parts.next()?.parse().ok()?;
                let nsid = parts.next().map_or(Some(1), |n| n.parse().ok())?;
                let slice = match parts.next() {
                    None => None,
                    Some(range) => Some(parse_slice(range)?),
                };
                parts
                    .next()
                    .is_none()
                    .then_some(NsSpec::Drive { drive, nsid, slice })
            }
            _ => None,
        }
    }

    /// `ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFF+LEN]` (an NQN starts with `nqn.`).
    fn parse_remote(s: &str, template: &Remote) -> Option<Self> {
        let at = s.find(":nqn.")?;
        let paths = s[..at]
            .split('+')
            .map(|p| {
                let (ip, port) = p.rsplit_once(':')?;
                let ip: smoltcp::wire::Ipv4Address = ip.parse().ok()?;
                let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
                Some((ip.octets(), port))
            })
            .collect::<Option<Vec<_>>>()?;
        let mut rest = &s[at + 1..];
        let mut slice = None;
        if let Some((head, last)) = rest.rsplit_once(':')
            && last.contains('+')
        {
            slice = Some(parse_slice(last)?);
            rest = head;
        }
        let (nqn, nsid) = rest.rsplit_once(':')?;
        let remote = Remote {
            nqn: nqn.into(),
            paths,
            nsid: nsid.parse().ok()?,
            ..template.clone()
        };
        keel_provision::model::check_remote(&remote, &|f| String::from(f)).ok()?;
        Some(NsSpec::Remote {
            remote: Box::new(remote),
            slice,
        })
    }
}

/// The settings of `remote:` namespaces from `keel.remote.OPTION=VALUE` (Linux's defaults
/// otherwise); the NQN, paths and NSID come from each namespace's spec.
pub fn remote_template(args: &str) -> Remote {
    let mut r = Remote::new("", Vec::new(), 1);
    // Seconds, or milliseconds with `ms`.
    let ms = |v: &str| -> Option<u64> {
        match v.strip_suffix("ms") {
            Some(m) => m.parse().ok(),
            None => v.parse::<u64>().ok()?.checked_mul(1000),
        }
    };
    for a in args.split_whitespace() {
        let Some((k, v)) = a
            .strip_prefix("keel.remote.")
            .and_then(|o| o.split_once('='))
        else {
            continue;
        };
        let ok = match k {
            "queues" => v.parse().map(|n| r.queues = n).is_ok(),
            "depth" => v.parse().map(|n| r.depth = n).is_ok(),
            "digests" => {
                let d = match v {
                    "none" => Some((false, false)),
                    "header" => Some((true, false)),
                    "data" => Some((false, true)),
                    "both" => Some((true, true)),
                    _ => None,
                };
                d.map(|d| (r.header_digest, r.data_digest) = d).is_some()
            }
            "kato" => ms(v)
                .and_then(|m| u32::try_from(m).ok())
                .map(|m| r.kato_ms = m)
                .is_some(),
            "reconnect_delay" => ms(v).map(|m| r.reconnect_delay_ms = m).is_some(),
            "ctrl_loss_tmo" if v == "-1" => {
                r.ctrl_loss_tmo_ms = None;
                true
            }
            "ctrl_loss_tmo" => ms(v).map(|m| r.ctrl_loss_tmo_ms = Some(m)).is_some(),
            "fast_io_fail_tmo" if v == "-1" || v == "off" => {
                r.fast_io_fail_tmo_ms = None;
                true
            }
            "fast_io_fail_tmo" => ms(v).map(|m| r.fast_io_fail_tmo_ms = Some(m)).is_some(),
            "policy" => RemotePolicy::from_name(v).map(|p| r.policy = p).is_some(),
            "hostnqn" => {
                r.hostnqn = Some(v.into());
                true
            }
            _ => false,
        };
        if !ok {
            klog::warning!("config: keel.remote.{}={} not understood; ignored", k, v);
        }
    }
    r
}

/// A namespace encryption key from the boot arguments (hex digits, parsed later into a
/// zeroizing key; the string itself lives in the device tree anyway).
#[derive(Clone, Debug)]
pub struct KeyArg {
    /// Namespace id.
    pub nsid: u32,
    /// Hex digits.
    pub hex: String,
}

/// The development configuration.
#[derive(Clone, Debug)]
pub struct DevConfig {
    /// NVMe/TCP subsystem NQN.
    pub nqn: String,
    /// Serial number base (`KEEL` + MAC).
    pub serial: String,
    /// Namespaces of the NVMe/TCP subsystem, if set explicitly (`keel.ns=`).
    pub namespaces: Option<Vec<NsSpec>>,
    /// Sizes in bytes of the RAM namespaces, if set explicitly.
    pub ram: Option<Vec<u64>>,
    /// Logical block size of RAM namespaces.
    pub block_size: u32,
    /// Allowed host NQNs; empty means any host.
    pub allowed_hosts: Vec<String>,
    /// Encrypted namespaces of the NVMe/TCP subsystem.
    pub keys: Vec<KeyArg>,
    /// Encrypted namespaces of emulated functions (`nsid` holds the function index).
    pub function_keys: Vec<KeyArg>,
    /// RAM namespace size of each emulated function, in bytes.
    pub function_ram: u64,
    /// Windows that get a function at boot (`keel.fn.boot=`; `None`: all of them).
    pub function_boot: Option<usize>,
    /// The namespaces of emulated functions 0, 1, ... instead of RAM (`keel.fn.ns=`).
    pub function_namespaces: Vec<NsSpec>,
    /// Address and port to advertise in the discovery log.
    pub advertise: Option<(String, String)>,
    /// The NIC's MAC (identifiers unique per device).
    pub mac: [u8; 6],
    /// The management endpoint's TCP port (`qemu/run --mgmt-port` forwards to it).
    pub mgmt_port: u16,
}

/// The management port of the development configuration (the guest port `qemu/run
/// --mgmt-port` forwards to; the same default as a provisioned description's).
pub const DEFAULT_MGMT_PORT: u16 = keel_provision::model::DEFAULT_MGMT_PORT;

fn mib_list(s: &str) -> Vec<u64> {
    s.split(',')
        .filter_map(|s| {
            s.trim_end_matches("MiB")
                .trim_end_matches('M')
                .parse::<u64>()
                .ok()
        })
        .filter(|m| (1..=65536).contains(m))
        .map(|m| m << 20)
        .take(16)
        .collect()
}

impl DevConfig {
    /// Reads the boot arguments; anything malformed falls back to the default.
    pub fn from_bootargs(args: &str, mac: [u8; 6]) -> Self {
        let get = |key: &str| args.split_whitespace().find_map(|a| a.strip_prefix(key));
        let hex: String = mac.iter().map(|b| format!("{b:02X}")).collect();
        let keys_for = |prefix: &str| -> Vec<KeyArg> {
            args.split_whitespace()
                .filter_map(|a| a.strip_prefix(prefix))
                .filter_map(|a| {
                    let (nsid, hex) = a.split_once(':')?;
                    Some(KeyArg {
                        nsid: nsid.parse().ok()?,
                        hex: hex.into(),
                    })
                })
                .collect()
        };
        let keys = keys_for("keel.xts=");
        let template = remote_template(args);
        let specs = |l: &str| -> Vec<NsSpec> {
            l.split(',')
                .filter_map(|s| {
                    let spec = NsSpec::parse(s, &template);
                    if spec.is_none() {
                        klog::warning!("config: namespace spec `{}` not understood; skipped", s);
                    }
                    spec
                })
                .take(16)
                .collect()
        };
        let function_keys = keys_for("keel.fn.xts=");
        Self {
            nqn: get("keel.nqn=")
                .filter(|n| n.starts_with("nqn.") && n.len() <= 223)
                .unwrap_or(DEFAULT_NQN)
                .into(),
            serial: format!("KEEL{hex}"),
            namespaces: get("keel.ns=").map(specs).filter(|l| !l.is_empty()),
            ram: get("keel.ram=").map(mib_list).filter(|l| !l.is_empty()),
            block_size: match get("keel.bs=") {
                Some("4096") => 4096,
                _ => 512,
            },
            allowed_hosts: get("keel.allow=")
                .map(|l| {
                    l.split(',')
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            keys,
            function_keys,
            function_ram: get("keel.fn.ram=")
                .map(mib_list)
                .and_then(|l| l.first().copied())
                .unwrap_or(64 << 20),
            function_boot: get("keel.fn.boot=").and_then(|n| n.parse().ok()),
            function_namespaces: get("keel.fn.ns=").map(specs).unwrap_or_default(),
            advertise: get("keel.advertise=").and_then(|a| {
                let (addr, port) = a.rsplit_once(':')?;
                (addr.parse::<smoltcp::wire::Ipv4Address>().is_ok() && port.parse::<u16>().is_ok())
                    .then(|| (String::from(addr), String::from(port)))
            }),
            mac,
            mgmt_port: DEFAULT_MGMT_PORT,
        }
    }

    /// The key for namespace `nsid`, if it is encrypted.
    pub fn key_for(&self, nsid: u32) -> Option<&KeyArg> {
        self.keys.iter().find(|k| k.nsid == nsid)
    }
}

/// The boot arguments with key material replaced by `<redacted>`, for printing.
pub fn redacted(args: &str) -> String {
    let mut out = String::new();
    for (i, a) in args.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let key = ["keel.xts=", "keel.fn.xts="].iter().find_map(|p| {
            a.strip_prefix(p)
                .and_then(|v| v.split_once(':'))
                .map(|(n, _)| (p, n))
        });
        match key {
            Some((prefix, nsid)) => {
                out.push_str(prefix);
                out.push_str(nsid);
                out.push_str(":<redacted>");
            }
            None => out.push_str(a),
        }
    }
    out
}
