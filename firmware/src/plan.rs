//! The one description the services are built from, whatever the configuration's origin:
//! the development boot arguments ([`DevConfig`]) or a provisioned bundle
//! ([`keel_provision::Config`]). Both are turned into a [`Plan`], and the services build the
//! target, namespaces, emulated functions and network from the plan only.
//!
//! # Emulated functions
//!
//! An emulated PCIe function is a *controller* of one subsystem (the host behind the function
//! sees every namespace of that subsystem, as any controller does). Function N is attached to
//! the subsystem of the namespaces whose `function` is N. In the development configuration
//! every window gets its own subsystem `nqn.2026-11.dev.keel:fnN` with one RAM namespace, so a
//! function never reaches another's data; a provisioned description that names one function
//! from namespaces of two subsystems attaches it to the first and logs the conflict. A window
//! that no namespace names is left unexported.

use crate::config::{DevConfig, KeyArg, NsSpec};
use crate::klog;
use crate::net::Addressing;
use alloc::{format, string::String, vec::Vec};
use keel_controller::{HostQos, NamespaceQos, QosGroup, QosLimits, Rate};
use keel_provision::{
    Backend, DataKey, Device, Encryption, Management, Namespace, Network, Qos, Subsystem,
};
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

/// Where the configuration in force came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The boot arguments (unprovisioned).
    BootArgs,
    /// A configuration copy in flash: copy name and sequence number.
    Flash(&'static str, u64),
    /// A live push (not necessarily persisted).
    Push,
}

impl core::fmt::Display for Source {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Source::BootArgs => f.write_str("boot arguments"),
            Source::Flash(c, _) => write!(f, "flash copy {c}"),
            Source::Push => f.write_str("push"),
        }
    }
}

/// A namespace's data key.
#[derive(Clone)]
pub enum NsKey {
    /// Hex digits from the boot arguments (development).
    Hex(String),
    /// Unwrapped from a bundle (zeroed when dropped).
    Bytes(DataKey),
}

impl core::fmt::Debug for NsKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NsKey::Hex(_) => "NsKey::Hex(<redacted>)",
            NsKey::Bytes(_) => "NsKey::Bytes(<redacted>)",
        })
    }
}

/// One subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsystemPlan {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Allowed hosts (empty: any).
    pub allowed_hosts: Vec<String>,
}

/// One namespace.
#[derive(Clone, Debug)]
pub struct NsPlan {
    /// NQN of its subsystem.
    pub subsystem: String,
    /// Its NSID.
    pub nsid: u32,
    /// Its backend.
    pub spec: NsSpec,
    /// Block size of a RAM backend.
    pub block_size: u32,
    /// Its data key, if encrypted.
    pub key: Option<NsKey>,
    /// Cipher name (`none` when not encrypted).
    pub cipher: &'static str,
    /// The emulated function attached to its subsystem because of it.
    pub function: Option<u16>,
    /// Its NGUID, when the description gives one or the device drew one (a created
    /// function's); `None`: derived ([`nguid`]).
    pub nguid: Option<[u8; 16]>,
}

impl SubsystemPlan {
    /// The subsystem as a device description has it.
    pub fn to_model(&self) -> Subsystem {
        Subsystem {
            nqn: self.nqn.clone(),
            serial: Some(self.serial.clone()),
            model: Some(self.model.clone()),
            allowed_hosts: self.allowed_hosts.clone(),
        }
    }
}

impl NsPlan {
    /// The namespace as a device description has it.
    pub fn to_model(&self) -> Namespace {
        let n = self;
        Namespace {
            subsystem: n.subsystem.clone(),
            nsid: n.nsid,
            backend: match &n.spec {
                NsSpec::Ram(size) => Backend::Ram {
                    size: *size,
                    block_size: n.block_size,
                },
                NsSpec::Drive { drive, nsid, slice } => Backend::Drive {
                    drive: *drive as u16,
                    nsid: *nsid,
                    offset: slice.map_or(0, |(o, _)| o),
                    length: slice.and_then(|(_, l)| l),
                },
                NsSpec::Remote { remote, slice } => Backend::Remote {
                    remote: (**remote).clone(),
                    offset: slice.map_or(0, |(o, _)| o),
                    length: slice.and_then(|(_, l)| l),
                },
            },
            encryption: Encryption::from_name(n.cipher).unwrap_or(Encryption::Aes256Xts),
            function: n.function,
        }
    }

    /// Whether `other` describes the same namespace with the same backend, encryption and
    /// data key (which function exports it is not compared).
    pub fn same_backend(&self, other: &NsPlan) -> bool {
        self.subsystem == other.subsystem
            && self.nsid == other.nsid
            && self.spec == other.spec
            && self.block_size == other.block_size
            && self.cipher == other.cipher
            && match (&self.key, &other.key) {
                (None, None) => true,
                (Some(NsKey::Bytes(a)), Some(NsKey::Bytes(b))) => a == b,
                (Some(NsKey::Hex(a)), Some(NsKey::Hex(b))) => a == b,
                _ => false,
            }
    }
}

/// Everything the services are built from.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Generation of the configuration (0: boot arguments).
    pub generation: u64,
    /// Where it came from.
    pub source: Source,
    /// Subsystems.
    pub subsystems: Vec<SubsystemPlan>,
    /// Namespaces.
    pub namespaces: Vec<NsPlan>,
    /// How the NIC gets its address.
    pub addressing: Addressing,
    /// NVMe/TCP address to advertise in the discovery log.
    pub advertise: Option<(String, String)>,
    /// Management TCP port.
    pub mgmt_port: u16,
    /// Key management requests must be signed with.
    pub mgmt_key: [u8; 32],
    /// The NIC's MAC (identifiers).
    pub mac: [u8; 6],
    /// The provisioned description this plan was made from (`None`: boot arguments).
    pub device: Option<Device>,
    /// Limits and weights (none under boot arguments).
    pub qos: Qos,
}

/// The QoS domain key of a remote namespace: bit 31 set (drive keys have it clear), the rest
/// an FNV-1a hash of what `Remote::same_target` compares (subsystem, namespace, the set of
/// paths in any order), so every slice of one remote namespace gets the same key, in every
/// plan. Two remote namespaces whose hashes collide would share a domain: they would only be
/// scheduled against each other by weight when one of them is full, never failed.
fn remote_domain(r: &keel_provision::Remote) -> u32 {
    fn fnv(h: u32, bytes: &[u8]) -> u32 {
        bytes
            .iter()
            .fold(h, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
    }
    const BASIS: u32 = 0x811c_9dc5;
    let mut h = fnv(fnv(BASIS, r.nqn.as_bytes()), &r.nsid.to_le_bytes());
    // Order-independent over the paths.
    let paths = r.paths.iter().fold(0u32, |acc, (ip, port)| {
        acc.wrapping_add(fnv(fnv(BASIS, ip), &port.to_le_bytes()))
    });
    h = fnv(h, &paths.to_le_bytes());
    (1 << 31) | (h & 0x7fff_ffff)
}

/// The controller's form of a description's limits (a rate without a burst: a tenth of a
/// second's worth).
pub fn qos_limits(l: &keel_provision::QosLimits) -> QosLimits {
    let r = |r: Option<keel_provision::QosRate>| {
        r.map(|r| {
            let rate = Rate::new(r.per_sec);
            r.burst.map_or(rate, |b| rate.with_burst(b))
        })
    };
    QosLimits {
        iops: r(l.iops),
        read_iops: r(l.read_iops),
        write_iops: r(l.write_iops),
        bps: r(l.bps),
        read_bps: r(l.read_bps),
        write_bps: r(l.write_bps),
    }
}

/// The derived NGUID of namespace `nsid` of subsystem number `subsystem`: "KEEL", the MAC,
/// the subsystem and the NSID; unique among the namespaces of one configuration and stable
/// across boots of it. Namespaces of emulated functions do not use it: a subsystem's number
/// is its place in the description, which a function removed live frees for another one;
/// they get NGUIDs that never repeat ([`NsPlan::nguid`]: drawn by keelctl into the bundle, or
/// by the device for a function created by a management request).
pub fn nguid(mac: [u8; 6], subsystem: u16, nsid: u32) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(b"KEEL");
    g[4..10].copy_from_slice(&mac);
    g[10..12].copy_from_slice(&subsystem.to_be_bytes());
    g[12..].copy_from_slice(&nsid.to_be_bytes());
    g
}

/// How the NIC gets its address under a provisioned description.
pub fn addressing(network: &Network) -> Addressing {
    match *network {
        Network::Dhcp => Addressing::Dhcp,
        Network::Static {
            address,
            prefix_len,
            gateway,
        } => Addressing::Static(
            Ipv4Cidr::new(Ipv4Address::from(address), prefix_len),
            gateway.map(Ipv4Address::from),
        ),
    }
}

fn hex_cipher(k: &KeyArg) -> &'static str {
    match k.hex.len() {
        64 => "aes-128-xts",
        128 => "aes-256-xts",
        _ => "aes-xts",
    }
}

impl Plan {
    /// The development configuration: the NVMe/TCP subsystem with the boot arguments'
    /// namespaces (`drive_namespaces`: the local drives' namespaces, used whole when no
    /// namespace is given), and one subsystem per emulated-function window.
    pub fn from_dev(
        cfg: &DevConfig,
        drive_namespaces: &[(usize, u32)],
        windows: usize,
        addressing: Addressing,
        mgmt_key: [u8; 32],
    ) -> Plan {
        let specs: Vec<NsSpec> = match (&cfg.namespaces, &cfg.ram) {
            (Some(specs), _) => specs.clone(),
            (None, Some(sizes)) => sizes.iter().map(|&b| NsSpec::Ram(b)).collect(),
            (None, None) if !drive_namespaces.is_empty() => drive_namespaces
                .iter()
                .map(|&(drive, nsid)| NsSpec::Drive {
                    drive,
                    nsid,
                    slice: None,
                })
                .collect(),
            (None, None) => alloc::vec![NsSpec::Ram(256 << 20)],
        };
        let mut subsystems = alloc::vec![SubsystemPlan {
            nqn: cfg.nqn.clone(),
            serial: cfg.serial.clone(),
            model: String::from("Keel NVMe/TCP target"),
            allowed_hosts: cfg.allowed_hosts.clone(),
        }];
        let mut namespaces: Vec<NsPlan> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let nsid = i as u32 + 1;
                let key = cfg.key_for(nsid);
                NsPlan {
                    subsystem: cfg.nqn.clone(),
                    nsid,
                    spec,
                    block_size: cfg.block_size,
                    cipher: key.map_or("none", hex_cipher),
                    key: key.map(|k| NsKey::Hex(k.hex.clone())),
                    function: None,
                    nguid: None,
                }
            })
            .collect();
        for i in 0..cfg.function_boot.map_or(windows, |n| n.min(windows)) {
            let nqn = format!("nqn.2026-11.dev.keel:fn{i}");
            let key = cfg.function_keys.iter().find(|k| k.nsid == i as u32);
            subsystems.push(SubsystemPlan {
                nqn: nqn.clone(),
                serial: format!("{}F{i}", cfg.serial),
                model: String::from("Keel emulated NVMe"),
                allowed_hosts: Vec::new(),
            });
            namespaces.push(NsPlan {
                subsystem: nqn,
                nsid: 1,
                spec: cfg
                    .function_namespaces
                    .get(i)
                    .cloned()
                    .unwrap_or(NsSpec::Ram(cfg.function_ram)),
                block_size: 512,
                cipher: key.map_or("none", hex_cipher),
                key: key.map(|k| NsKey::Hex(k.hex.clone())),
                function: Some(i as u16),
                nguid: None,
            });
        }
        Plan {
            generation: 0,
            source: Source::BootArgs,
            subsystems,
            namespaces,
            addressing,
            advertise: cfg.advertise.clone(),
            mgmt_port: cfg.mgmt_port,
            mgmt_key,
            mac: cfg.mac,
            device: None,
            qos: Qos::default(),
        }
    }

    /// A provisioned configuration (an opened, verified bundle). `provisioning_key` is the
    /// management key when the bundle names none.
    pub fn from_bundle(
        config: &keel_provision::Config,
        source: Source,
        mac: [u8; 6],
        provisioning_key: [u8; 32],
    ) -> Plan {
        let d = &config.device;
        let hex: String = mac.iter().map(|b| format!("{b:02X}")).collect();
        let subsystems = d
            .subsystems
            .iter()
            .enumerate()
            .map(|(i, s)| SubsystemPlan {
                nqn: s.nqn.clone(),
                serial: s.serial.clone().unwrap_or_else(|| {
                    if i == 0 {
                        format!("KEEL{hex}")
                    } else {
                        format!("KEEL{hex}S{i}")
                    }
                }),
                model: s
                    .model
                    .clone()
                    .unwrap_or_else(|| String::from("Keel NVMe target")),
                allowed_hosts: s.allowed_hosts.clone(),
            })
            .collect();
        let namespaces = d
            .namespaces
            .iter()
            .zip(config.keys.iter())
            .enumerate()
            .map(|(i, (ns, key))| {
                let (spec, block_size) = match &ns.backend {
                    Backend::Ram { size, block_size } => (NsSpec::Ram(*size), *block_size),
                    Backend::Drive { drive, nsid, .. } => (
                        NsSpec::Drive {
                            drive: usize::from(*drive),
                            nsid: *nsid,
                            slice: ns.backend.slice(),
                        },
                        512,
                    ),
                    Backend::Remote { remote, .. } => (
                        NsSpec::Remote {
                            remote: alloc::boxed::Box::new(remote.clone()),
                            slice: ns.backend.slice(),
                        },
                        512,
                    ),
                };
                NsPlan {
                    subsystem: ns.subsystem.clone(),
                    nsid: ns.nsid,
                    spec,
                    block_size,
                    cipher: match ns.encryption {
                        Encryption::None => "none",
                        e => e.name(),
                    },
                    key: key.clone().map(NsKey::Bytes),
                    function: ns.function,
                    nguid: d.nguid(i),
                }
            })
            .collect();
        let addressing = addressing(&d.network);
        Plan {
            generation: config.generation,
            source,
            subsystems,
            namespaces,
            addressing,
            advertise: None,
            mgmt_port: d
                .management
                .as_ref()
                .map_or(keel_provision::model::DEFAULT_MGMT_PORT, |m| m.port),
            mgmt_key: d
                .management
                .as_ref()
                .map_or(provisioning_key, |m| m.authorized_key),
            mac,
            device: Some(d.clone()),
            qos: d.qos.clone(),
        }
    }

    /// The plan as a device description, to compare a pushed one with
    /// ([`keel_provision::diff`]). Serial and model numbers are the ones in use.
    pub fn to_device(&self) -> Device {
        if let Some(d) = &self.device {
            return d.clone();
        }
        Device {
            network: match self.addressing {
                Addressing::Dhcp => Network::Dhcp,
                Addressing::Static(c, gw) => Network::Static {
                    address: c.address().octets(),
                    prefix_len: c.prefix_len(),
                    gateway: gw.map(|g| g.octets()),
                },
            },
            subsystems: self
                .subsystems
                .iter()
                .map(SubsystemPlan::to_model)
                .collect(),
            namespaces: self.namespaces.iter().map(NsPlan::to_model).collect(),
            management: Some(Management {
                port: self.mgmt_port,
                authorized_key: self.mgmt_key,
            }),
            qos: self.qos.clone(),
            nguids: self
                .namespaces
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((i as u16, n.nguid?)))
                .collect(),
        }
    }

    /// The QoS of namespace `ns`: its limits, weight and group from the description, and the
    /// backend it is cut from as its scheduling domain: a drive's namespace, or a remote
    /// namespace (whichever of its slices).
    pub fn namespace_qos(&self, ns: &NsPlan) -> NamespaceQos {
        let domain = match &ns.spec {
            // Bit 31 clear: drive indexes stay below 128.
            NsSpec::Drive { drive, nsid, .. } => {
                Some(((*drive as u32 & 0x7f) << 24) | (nsid & 0xff_ffff))
            }
            // No cap (the volume bounds its own commands in flight, queues × depth, and
            // refuses more as busy, which saturates the domain): its slices share it by
            // weight when it is full.
            NsSpec::Remote { remote, .. } => Some(remote_domain(remote)),
            // A RAM namespace never saturates.
            NsSpec::Ram(_) => None,
        };
        let q = self.qos.namespace(&ns.subsystem, ns.nsid);
        NamespaceQos {
            limits: q.map_or(QosLimits::NONE, |q| qos_limits(&q.limits)),
            weight: q.map_or(1, |q| q.weight.max(1)),
            group: q.and_then(|q| q.group.clone()),
            domain,
            // Commands the namespaces cut from one drive namespace have at the drive at once
            // (`[qos] drive_max_inflight`): the rest wait in the fair scheduler (weights, FIFO
            // per flow) rather than in the drive's own queue, where a QD1 tenant's command
            // would wait behind a QD128 tenant's.
            max_inflight: match ns.spec {
                NsSpec::Drive { .. } => self
                    .qos
                    .drive_max_inflight
                    .unwrap_or(keel_provision::DRIVE_MAX_INFLIGHT),
                NsSpec::Ram(_) | NsSpec::Remote { .. } => 0,
            },
        }
    }

    /// The QoS groups of the controller.
    pub fn qos_groups(&self) -> Vec<QosGroup> {
        self.qos
            .groups
            .iter()
            .map(|g| QosGroup {
                name: g.name.clone(),
                limits: qos_limits(&g.limits),
                weight: g.weight,
            })
            .collect()
    }

    /// The per-host rules of the controller.
    pub fn host_qos(&self) -> Vec<HostQos> {
        self.qos
            .hosts
            .iter()
            .map(|h| HostQos {
                hostnqn: h.hostnqn.clone(),
                limits: qos_limits(&h.limits),
            })
            .collect()
    }

    /// The limits of emulated function `index`'s controller.
    pub fn function_limits(&self, index: u16) -> QosLimits {
        self.qos
            .functions
            .iter()
            .find(|f| f.function == index)
            .map_or(QosLimits::NONE, |f| qos_limits(&f.limits))
    }

    /// The NGUID namespace `ns` is served with: its own, or the derived one.
    pub fn nguid_of(&self, ns: &NsPlan) -> [u8; 16] {
        ns.nguid.unwrap_or_else(|| {
            let si = self.subsystem_index(&ns.subsystem).unwrap_or(0);
            nguid(self.mac, si as u16, ns.nsid)
        })
    }

    /// Index of subsystem `nqn` (NGUIDs use it).
    pub fn subsystem_index(&self, nqn: &str) -> Option<usize> {
        self.subsystems.iter().position(|s| s.nqn == nqn)
    }

    /// The subsystem emulated function `index` is attached to, if any namespace names it.
    pub fn function_subsystem(&self, index: u16) -> Option<&str> {
        let mut named = self
            .namespaces
            .iter()
            .filter(|n| n.function == Some(index))
            .map(|n| n.subsystem.as_str());
        let first = named.next()?;
        if let Some(other) = named.find(|s| *s != first) {
            klog::error!(
                "pcie-fn{}: named by namespaces of {} and {}: a function is a \
                 controller of one subsystem; attached to {}",
                index,
                first,
                other,
                first
            );
        }
        Some(first)
    }
}
