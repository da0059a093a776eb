//! Configuration and the transport-facing value types.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use keel_nvme::Cqe;
/// The six limits of a namespace, controller or group (keel-qos).
pub use keel_qos::Limits as QosLimits;
pub use keel_qos::Rate;
use keel_storage::{BlockBackend, BufPool, IoBuf};

/// A point in time, in nanoseconds since an arbitrary epoch. Always passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Instant(u64);

impl Instant {
    /// From nanoseconds.
    pub const fn from_nanos(ns: u64) -> Self {
        Instant(ns)
    }
    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms.saturating_mul(1_000_000))
    }
    /// Nanoseconds.
    pub const fn as_nanos(&self) -> u64 {
        self.0
    }
    /// Milliseconds (truncated).
    pub const fn as_millis(&self) -> u64 {
        self.0 / 1_000_000
    }
    /// Milliseconds elapsed since `earlier` (0 if `earlier` is later).
    pub const fn millis_since(&self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0) / 1_000_000
    }
}

/// Opaque handle of one transport queue (one NVMe/TCP connection, or one PCIe SQ/CQ pair).
/// Handles of closed queues are never confused with new ones (generation counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueId {
    pub(crate) index: u16,
    pub(crate) generation: u16,
    pub(crate) owner: u16,
}

impl QueueId {
    /// A stable integer form, for logging or maps in transports.
    pub const fn as_u32(&self) -> u32 {
        ((self.index as u32) << 16) | self.generation as u32
    }

    /// The transport that opened the queue ([`crate::Target::open_queue_for`]; the I/O
    /// queues of a local controller have its admin queue's owner).
    pub const fn owner(&self) -> u16 {
        self.owner
    }
}

/// A command handed to the controller by a transport.
#[derive(Debug)]
pub struct Request {
    /// The submission queue entry.
    pub sqe: keel_nvme::Sqe,
    /// The data buffer: write data already filled in, or room for read data. The transport
    /// sizes it from the SGL/PRPs.
    pub buf: Option<IoBuf>,
    /// Transfer length in bytes the host's data pointer describes (0 = no data).
    pub data_len: u32,
    /// Transport's own tag, echoed in the [`Response`].
    pub cookie: u32,
}

/// The controller's answer to one [`Request`].
#[derive(Debug)]
pub struct Response {
    /// The completion entry (SQID, SQHD and CID filled in; phase 0).
    pub cqe: Cqe,
    /// The request's buffer, always handed back.
    pub buf: Option<IoBuf>,
    /// Bytes at the start of `buf` to send to the host (read data); 0 for none.
    pub data_len: u32,
    /// The request's cookie.
    pub cookie: u32,
}

/// Something that happened inside the controller, reported by [`crate::Target::poll`].
#[derive(Debug)]
pub enum Event {
    /// A pending command finished.
    Completion(QueueId, Response),
    /// The controller ended this queue (keep-alive expiry, Disconnect, controller reset or
    /// fatal error): the transport should close the connection and then call
    /// [`crate::Target::close_queue`].
    QueueTerminated(QueueId),
    /// A buffer of a command whose queue went away came back from a backend: return it to
    /// its pool. `owner` is the owner of the command's queue when it was submitted.
    BufferReleased {
        /// The transport the buffer goes back to.
        owner: u16,
        /// The buffer.
        buf: IoBuf,
    },
}

impl Event {
    /// The transport the event is for: the owner the queue was opened with
    /// ([`crate::Target::open_queue_for`]), recorded with each command when it was submitted.
    pub const fn owner(&self) -> u16 {
        match self {
            Event::Completion(q, _) | Event::QueueTerminated(q) => q.owner,
            Event::BufferReleased { owner, .. } => *owner,
        }
    }
}

/// How a transport queue went away (see [`crate::Target::close_queue_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLoss {
    /// The host closed or reset the connection, or sent Disconnect: an I/O queue's loss
    /// ends only that queue.
    Orderly,
    /// A transport error (the connection ended by the transport): ends the association.
    Abrupt,
}

/// A listen port advertised in the discovery log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    /// Transport type (TCP = 3).
    pub trtype: u8,
    /// Address family (IPv4 = 1).
    pub adrfam: u8,
    /// Transport address, e.g. "10.0.2.15".
    pub traddr: String,
    /// Transport service id, e.g. "4420".
    pub trsvcid: String,
    /// Port id.
    pub portid: u16,
    /// Transport requirements (TREQ).
    pub treq: u8,
}

impl PortEntry {
    /// A TCP/IPv4 port.
    pub fn tcp_ipv4(traddr: &str, trsvcid: &str, portid: u16) -> Self {
        Self {
            trtype: keel_nvme::log::discovery::TRTYPE_TCP,
            adrfam: keel_nvme::log::discovery::ADRFAM_IPV4,
            traddr: traddr.into(),
            trsvcid: trsvcid.into(),
            portid,
            treq: keel_nvme::log::discovery::TREQ_NOT_SPECIFIED,
        }
    }
}

/// One namespace of a subsystem.
pub struct NamespaceConfig {
    /// Namespace id (1..=`Limits::max_nsid`).
    pub nsid: u32,
    /// The storage.
    pub backend: Box<dyn BlockBackend>,
    /// NGUID (all zero: not reported).
    pub nguid: [u8; 16],
    /// UUID (all zero: not reported).
    pub uuid: [u8; 16],
    /// EUI-64 (all zero: not reported).
    pub eui64: [u8; 8],
    /// Limits, weight and sharing.
    pub qos: NamespaceQos,
}

/// Quality of service of a namespace (see [`crate::Target`]'s QoS section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceQos {
    /// The namespace's own limits (every host together).
    pub limits: QosLimits,
    /// Its share of a saturated backend against the other namespaces of its domain (1..=1000;
    /// a group's weight, when the namespace is in a group that has one, wins).
    pub weight: u32,
    /// The group (a tenant's pool of namespaces) whose limits it shares.
    pub group: Option<String>,
    /// Namespaces with the same domain key share one backend (slices of one drive) and are
    /// scheduled against each other; `None`: a domain of its own.
    pub domain: Option<u32>,
    /// Commands of the domain at the backend at once (0: as many as the backend takes), so
    /// that the waiting happens in the fair scheduler rather than in the device's own FIFO.
    pub max_inflight: u32,
}

impl Default for NamespaceQos {
    fn default() -> Self {
        Self {
            limits: QosLimits::NONE,
            weight: 1,
            group: None,
            domain: None,
            max_inflight: 0,
        }
    }
}

/// A tenant's pool: namespaces sharing limits, with a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QosGroup {
    /// Its name (namespaces name it in [`NamespaceQos::group`]).
    pub name: String,
    /// Limits of all its namespaces together.
    pub limits: QosLimits,
    /// Weight of its namespaces (0: each namespace's own).
    pub weight: u32,
}

/// Limits of every controller of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostQos {
    /// The host NQN, or `*` for every host without a rule of its own.
    pub hostnqn: String,
    /// Limits of each controller of that host (all its queues, all namespaces).
    pub limits: QosLimits,
}

impl fmt::Debug for NamespaceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceConfig")
            .field("nsid", &self.nsid)
            .field("geometry", &self.backend.geometry())
            .finish()
    }
}

/// An NVM subsystem.
#[derive(Debug)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number (Identify Controller SN, up to 20 ASCII characters).
    pub serial: String,
    /// Model number (up to 40 ASCII characters).
    pub model: String,
    /// Host NQNs allowed to connect; empty = any host.
    pub allowed_hosts: Vec<String>,
    /// Namespaces.
    pub namespaces: Vec<NamespaceConfig>,
}

/// Limits of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live controllers at most (discovery controllers included; 1..=65519).
    pub max_controllers: usize,
    /// I/O queues per controller (>= 1).
    pub max_io_queues: u16,
    /// Entries per queue (CAP.MQES + 1, >= 2).
    pub max_queue_depth: u16,
    /// Admin queue entries advertised in the discovery log (ASQSZ).
    pub admin_queue_depth: u16,
    /// Maximum Data Transfer Size as a power of two of 4 KiB pages (0 = no limit, at most 20).
    pub mdts: u8,
    /// Asynchronous Event Request Limit, 0's based (AERL).
    pub aerl: u8,
    /// Slack added to KATO before a controller is torn down, in milliseconds.
    pub kato_grace_ms: u32,
    /// KATO used for a discovery controller whose Connect asked for 0.
    pub discovery_kato_ms: u32,
    /// Transport queues open at once at most.
    pub max_queues: usize,
    /// Largest namespace id (Identify Controller NN).
    pub max_nsid: u32,
    /// Entries of each controller's Error Information log (1..=256; ELPE + 1), a ring
    /// allocated when the controller is created.
    pub error_log_entries: u16,
    /// Source ranges a Copy may carry at most (1..=256; MSRC + 1).
    pub copy_max_ranges: u16,
    /// Bytes a Copy may move at most (MCL = this / block size, MSSRL = min(MCL, 65535)).
    pub copy_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_controllers: 16,
            max_io_queues: 8,
            max_queue_depth: 128,
            admin_queue_depth: 32,
            mdts: 5,
            aerl: 3,
            kato_grace_ms: 1_000,
            discovery_kato_ms: 120_000,
            max_queues: 16 * 9 + 16,
            max_nsid: 1024,
            error_log_entries: 64,
            copy_max_ranges: 128,
            copy_max_bytes: 128 << 20,
        }
    }
}

/// Transport-dependent Identify Controller fields (NVMe-oF 1.1 §4.1 / Figure 275 bytes
/// 1792-2047, SGLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportParams {
    /// In-capsule data bytes accepted on I/O queues (IOCCSZ = (64 + this) / 16).
    pub in_capsule_data: u32,
    /// SGL Support (SGLS).
    pub sgls: u32,
    /// Maximum SGL Data Block Descriptors (MSDBD).
    pub msdbd: u8,
    /// Transport type (the Discovery log TRTYPE values) recorded in Error Information log
    /// entries of errors the transport reported ([`crate::Target::reject`]); 0 for
    /// controllers made by [`crate::Target::create_local_controller`].
    pub trtype: u8,
}

impl Default for TransportParams {
    /// NVMe/TCP: 8 KiB in-capsule data, SGLs supported with offset addressing, one descriptor.
    fn default() -> Self {
        Self {
            in_capsule_data: 8192,
            sgls: 1 | (1 << 20),
            msdbd: 1,
            trtype: keel_nvme::log::discovery::TRTYPE_TCP,
        }
    }
}

/// Product identity reported by Identify Controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// PCI vendor id.
    pub vid: u16,
    /// PCI subsystem vendor id.
    pub ssvid: u16,
    /// IEEE OUI.
    pub ieee: [u8; 3],
    /// Firmware revision (up to 8 ASCII characters).
    pub firmware: String,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            vid: 0,
            ssvid: 0,
            ieee: [0; 3],
            firmware: "0.1.0".into(),
        }
    }
}

/// What the device knows of its own life, for the SMART / Health log (NVMe base 2.0
/// §5.16.1.3): kept by the firmware across power cycles (in flash), handed to
/// [`crate::Target::set_health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceHealth {
    /// Power cycles, this one included.
    pub power_cycles: u64,
    /// Power cycles that ended without a clean shutdown.
    pub unsafe_shutdowns: u64,
    /// Powered-on time of earlier power cycles (and of this one before `since`), nanoseconds.
    pub power_on_ns: u64,
    /// When this power cycle's powered-on time starts counting (the clock the target's
    /// callers pass in).
    pub since: Instant,
}

impl DeviceHealth {
    /// Powered-on nanoseconds at `now`.
    pub const fn power_on_ns_at(&self, now: Instant) -> u64 {
        self.power_on_ns
            .saturating_add(now.as_nanos().saturating_sub(self.since.as_nanos()))
    }
}

/// Everything [`crate::Target::new`] needs.
#[derive(Debug, Default)]
pub struct TargetConfig {
    /// NVM subsystems.
    pub subsystems: Vec<SubsystemConfig>,
    /// Listen ports advertised by the discovery subsystem (may be set later).
    pub ports: Vec<PortEntry>,
    /// Limits.
    pub limits: Limits,
    /// Transport parameters.
    pub transport: TransportParams,
    /// Product identity.
    pub identity: Identity,
    /// Scratch buffers the controller uses for work with no host buffer: Copy (each chunk
    /// is read into one, then written out) and Write Zeroes on namespaces whose backend has
    /// none (zero-filled writes, e.g. encrypted namespaces). Buffers must be DMA-capable for
    /// drive backends and hold at least one logical block. Without a pool, Copy is not
    /// offered and such namespaces refuse Write Zeroes. A command that finds the pool empty
    /// waits in its slot, like a command a busy backend refused.
    pub scratch: Option<BufPool>,
    /// QoS groups (tenants' pools).
    pub qos_groups: Vec<QosGroup>,
    /// Per-host controller limits.
    pub host_qos: Vec<HostQos>,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// An NQN is empty, longer than 223 bytes, or the discovery NQN.
    BadNqn,
    /// Two subsystems have the same NQN.
    DuplicateSubsystem,
    /// A namespace id is 0, above `max_nsid`, or used twice in a subsystem.
    BadNsid(u32),
    /// A backend's block size is not a power of two in 512..=65536 or it is empty.
    BadGeometry(u32),
    /// A limit is out of range (or a QoS group is named twice).
    BadLimits,
    /// A namespace names a QoS group that does not exist.
    UnknownGroup(u32),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadNqn => f.write_str("invalid subsystem NQN"),
            ConfigError::DuplicateSubsystem => f.write_str("duplicate subsystem NQN"),
            ConfigError::BadNsid(n) => write!(f, "invalid or duplicate namespace id {n}"),
            ConfigError::BadGeometry(n) => write!(f, "namespace {n}: unusable block geometry"),
            ConfigError::BadLimits => f.write_str("limits out of range"),
            ConfigError::UnknownGroup(n) => write!(f, "namespace {n}: no such QoS group"),
        }
    }
}

/// Errors of the management API of [`crate::Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// The queue handle is not open.
    UnknownQueue,
    /// `Limits::max_queues` reached.
    TooManyQueues,
    /// `Limits::max_controllers` reached.
    TooManyControllers,
    /// No subsystem with that NQN.
    UnknownSubsystem,
    /// No such namespace.
    UnknownNamespace,
    /// The queue is not the admin queue of a local controller.
    NotLocalAdminQueue,
    /// Configuration problem.
    Config(ConfigError),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::UnknownQueue => f.write_str("unknown queue"),
            TargetError::TooManyQueues => f.write_str("too many queues"),
            TargetError::TooManyControllers => f.write_str("too many controllers"),
            TargetError::UnknownSubsystem => f.write_str("unknown subsystem"),
            TargetError::UnknownNamespace => f.write_str("unknown namespace"),
            TargetError::NotLocalAdminQueue => {
                f.write_str("not the admin queue of a local controller")
            }
            TargetError::Config(e) => write!(f, "configuration: {e}"),
        }
    }
}

impl From<ConfigError> for TargetError {
    fn from(e: ConfigError) -> Self {
        TargetError::Config(e)
    }
}

/// What a transport may want to know about a connected queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// Queue id inside the controller (0 = admin).
    pub qid: u16,
    /// Controller id.
    pub cntlid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// The host disabled SQ flow control in Connect (CATTR bit 2).
    pub sq_flow_control_disabled: bool,
    /// True for the discovery controller's admin queue.
    pub discovery: bool,
}
