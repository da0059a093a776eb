//! Keel device management: the protocol between `keelctl` and a running device, and the
//! Prometheus text exposition of the device's counters.
//!
//! Portable and sans-IO (`no_std` + `alloc`): the firmware feeds the bytes of one TCP
//! connection to a [`Session`] and sends back what it produces; `keelctl` uses the same
//! types as the client ([`wire`]). The firmware side asks the device for what it needs through
//! [`Device`].
//!
//! # Protocol
//!
//! One TCP port (7000 by default) carries both the signed binary protocol and a read-only
//! HTTP endpoint. The client speaks first; its first four bytes pick the protocol.
//!
//! | step | direction | bytes |
//! |---|---|---|
//! | 1 | client → device | `KMG1` (binary protocol), or an HTTP/1.x request head starting `GET ` |
//! | 2 (HTTP) | device → client | `GET /metrics` → `200` with [`metrics::render`] (`Content-Type: text/plain; version=0.0.4`); another path `404`; another method `405`; a bad request line `400`; a head above 4 KiB `431`; then the device closes. Unauthenticated, read-only. |
//! | 2 | device → client | frame: [`wire::Hello`] `{ protocol: u16 = 1, device: String, challenge: [u8; 32] }` |
//! | 3 | client → device | frame: [`wire::SignedRequest`] `{ request: Request, signature: [u8; 64] }`, `Request` = `Status` \| `Push(bundle bytes)` \| `Reboot` \| `CreateFunction(FunctionSpec)` \| `RemoveFunction(slot)` |
//! | 4 | device → client | frame: [`wire::Response`] `{ challenge: [u8; 32], reply: Reply }`, `Reply` = `Status(Snapshot)` \| `Pushed(PushReport)` \| `PushRefused(message)` \| `Rebooting` \| `Error { code, message, closing }` \| `FunctionCreated(FunctionSlotInfo)` \| `FunctionRemoved(FunctionSlotInfo)` \| `FunctionRefused(message)` |
//! | … | | steps 3 and 4 repeat; each request is signed over the challenge of the previous frame |
//!
//! - **Frames**: `u32` little-endian payload length, then the payload, a postcard message.
//!   A length of 0 or above [`wire::MAX_FRAME`] (2 MiB + 4 KiB, so a 2 MiB bundle fits) is
//!   answered with `Error { TooLarge }` and the connection is closed.
//! - **Signature**: Ed25519 over [`wire::DOMAIN`] (`keel/v1/mgmt-request`) ‖ the current
//!   32-byte challenge ‖ the postcard encoding of `request` exactly as sent, by the key
//!   [`Device::authorized_key`] names, checked with strict verification
//!   (`verify_strict`: no small-order points, canonical `S`).
//! - **Replay**: the challenge comes from [`Device::fresh_challenge`] (never repeated, also
//!   across reboots) and is replaced after every request frame, good or bad; every response
//!   carries the next one. A captured request is signed over a challenge the device no longer
//!   holds, so it fails verification like a forged one. Nothing runs unless the signature
//!   verifies.
//! - **Failures**: a malformed frame or bad signature gets `Error` and nothing is executed;
//!   after [`session::MAX_FAILURES`] failures the device closes the connection.
//! - **Reboot**: the device replies `Rebooting`, closes, and calls [`Device::reboot`] only
//!   once the transport reports the reply sent ([`Session::transport_drained`]).
//! - **Versions**: the snapshot grows by appended fields only (see [`Snapshot`]); clients
//!   decode responses with [`wire::decode_response`], which reads older devices' replies.
//! - **Back-pressure**: the session takes no input while a response is waiting to be sent,
//!   so per-connection memory is bounded by one frame and one response.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod function;
pub mod metrics;
pub mod session;
pub mod wire;

pub use ed25519_dalek;
pub use function::{
    FunctionBackend, FunctionCipher, FunctionNamespace, FunctionSlotInfo, FunctionSpec, SlotState,
};
pub use session::Session;

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Everything `keelctl status` shows and `/metrics` exports, taken at one instant.
///
/// Compatibility: fields are only ever appended at the end, each one whose "nothing" encodes
/// as a single zero byte (an empty `Vec`, `None`, `0`), so that a client reads an older
/// device's snapshot ([`wire::decode_response`]) and an older client reads a newer one's
/// (postcard ignores bytes after a message). [`wire::PROTOCOL_VERSION`] changes only for
/// changes that cannot be made that way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Snapshot {
    /// Firmware version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Build identifier (git revision or build time), may be empty.
    pub build_id: String,
    /// Board profile name (`qemu-virt`).
    pub board: String,
    /// Nanoseconds since boot.
    pub uptime_ns: u64,
    /// Generation of the configuration in force (0: unprovisioned, boot-argument configuration).
    pub generation: u64,
    /// Where the configuration in force came from: `"flash copy A"`, `"flash copy B"`,
    /// `"push"`, `"boot arguments"`.
    pub config_source: String,
    /// Subsystems served.
    pub subsystems: Vec<SubsystemInfo>,
    /// Namespaces with their counters.
    pub namespaces: Vec<NamespaceInfo>,
    /// Live controllers.
    pub controllers: Vec<ControllerInfo>,
    /// Open NVMe/TCP connections (sockets with a connection state machine).
    pub tcp_connections: u32,
    /// Emulated PCIe functions and whether a host has enabled them.
    pub functions: Vec<FunctionInfo>,
    /// Remote volumes: namespaces of remote NVMe/TCP subsystems the device is the initiator
    /// of, with their paths. Appended in this version of the protocol: a device from before
    /// sends none (see [`wire::decode_response`]).
    #[serde(default)]
    pub remotes: Vec<RemoteInfo>,
    /// QoS groups (tenants' pools of namespaces). Appended like `remotes`.
    #[serde(default)]
    pub qos_groups: Vec<GroupInfo>,
    /// QoS of each namespace (its share, group and limits). Appended like `remotes`.
    #[serde(default)]
    pub qos_namespaces: Vec<NamespaceQosInfo>,
    /// QoS of each live controller (its host's or its function's limits). Appended like
    /// `remotes`.
    #[serde(default)]
    pub qos_controllers: Vec<ControllerQosInfo>,
    /// Pools and slots in use: after a workload ends they return to their idle values, which
    /// is how tests (and operators) find leaks.
    pub resources: Resources,
    /// Every running core's poll loop (core 0 first), each read from counters that only its
    /// own core writes. Appended like `remotes`.
    #[serde(default)]
    pub cores: Vec<CoreInfo>,
    /// Heap bytes the TCP sockets created so far hold for their buffers (sockets are reused,
    /// never freed): with [`Resources::heap_free`], what the heap keeps after a workload is
    /// this growth and nothing else. Part of the resources, appended here like `remotes`.
    #[serde(default)]
    pub socket_buffer_bytes: u64,
    /// The emulated function slots of the device's endpoint (free, live, removing), with what
    /// each serves. Appended like `remotes`.
    #[serde(default)]
    pub function_slots: Vec<FunctionSlotInfo>,
    /// QoS scheduling domains (one per backend: a drive namespace or a remote volume whose
    /// slices share it, or a namespace of its own): the cap on commands at the backend, what is
    /// there now and what waits. Appended like `remotes`.
    #[serde(default)]
    pub qos_domains: Vec<QosDomainInfo>,
    /// The network interface's transmit counters, every core's queue pair together.
    /// Appended like `remotes` (two integers: a device from before reads as zeroes).
    #[serde(default)]
    pub nic: NicCounters,
    /// Local NVMe drives, each with the I/O queue pairs of every core that has some (core 0's
    /// own, and one per other core serving the drive's namespaces), each read from counters
    /// only its own core writes. Appended like `remotes`.
    #[serde(default)]
    pub drives: Vec<DriveInfo>,
    /// The I/O queues of every remote volume's associations, per core: core 0's own and each
    /// other core's lane queues, each read from counters only its own core writes. Appended
    /// like `remotes` (rows of their own: [`RemoteInfo`] cannot grow compatibly).
    #[serde(default)]
    pub remote_queues: Vec<RemoteQueueInfo>,
}

/// A local NVMe drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DriveInfo {
    /// PCI address (`00:02.0`).
    pub bdf: String,
    /// Identify Controller model number.
    pub model: String,
    /// `online`, `resetting`, `dead` (given up on), `shut down`.
    pub state: String,
    /// Controller resets started since it came up (core 0 runs them, for every core).
    pub resets: u64,
    /// Abort commands sent (core 0's queues only: other cores' commands are not aborted).
    pub aborts: u64,
    /// Its I/O queue pairs, one row per core (core 0 first).
    pub queues: Vec<DriveQueueInfo>,
}

/// One core's I/O queue pairs on a drive, counted by the driver on that core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DriveQueueInfo {
    /// The core that owns and polls them.
    pub core: u16,
    /// QID of its first I/O queue pair.
    pub first_qid: u16,
    /// Its I/O queue pairs (core 0: the drive's own; another core: one).
    pub queues: u16,
    /// `up`, `down` (being reset or not created yet), `dead`.
    pub state: String,
    /// Commands submitted.
    pub commands: u64,
    /// Requests completed (successfully or not).
    pub completed: u64,
    /// Commands that completed with an error status.
    pub errors: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Resets these queues went through (core 0: controller resets started).
    pub resets: u64,
    /// Requests failed back because the controller reset or was given up on.
    pub failed_by_reset: u64,
    /// SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes.
    pub cq_doorbells: u64,
    /// Requests refused as busy because the queues had no room.
    pub queue_full: u64,
}

/// One I/O queue of a remote volume's association, on the core that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RemoteQueueInfo {
    /// The remote subsystem's NQN (the volume, with `nsid`).
    pub subnqn: String,
    /// The namespace there.
    pub nsid: u32,
    /// The path (`a.b.c.d:port`).
    pub path: String,
    /// The core whose network stack carries the queue's connection.
    pub core: u16,
    /// Its QID on the remote controller.
    pub qid: u16,
    /// `live` (connected), `connecting`, `down` (no association, or not connected yet).
    pub state: String,
    /// I/O commands sent on it since boot (every association of the path).
    pub commands: u64,
    /// I/O commands in flight on it now.
    pub in_flight: u32,
}

/// Transmit counters of the network interface (virtio-net), summed over its queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NicCounters {
    /// Frames handed to the device for TCP segmentation offload (VIRTIO_NET_F_HOST_TSO4):
    /// each one up to 64 KiB, cut into segments by the device.
    pub tx_tso_frames: u64,
    /// Frames built by the network stack that the driver could not send (lost, as on a
    /// wire).
    pub tx_dropped: u64,
}

/// One QoS scheduling domain: the namespaces that share one backend's command slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QosDomainInfo {
    /// Its namespaces, as `subsystem NQN/NSID`.
    pub namespaces: Vec<String>,
    /// The cap on its commands at the backend at once (`[qos] drive_max_inflight` for a
    /// drive); 0: no cap.
    pub max_inflight: u32,
    /// Its commands at the backend now.
    pub inflight: u32,
    /// Its commands waiting in the scheduler now (for the cap, a limit or their turn).
    pub queued: u32,
}

/// One core's poll loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CoreInfo {
    /// Index: 0 is the boot core (admin, management, configuration), 1.. the others.
    pub index: u16,
    /// MPIDR_EL1 affinity.
    pub mpidr: u64,
    /// What the core's loop serves (`network, NVMe/TCP, drives, functions, management`).
    pub role: String,
    /// Passes of its loop.
    pub passes: u64,
    /// Passes that found work.
    pub busy_passes: u64,
    /// Times it slept in WFI for lack of work.
    pub sleeps: u64,
    /// Messages it took from other cores' rings.
    pub messages: u64,
    /// Allocator calls it made (allocations, frees, reallocations) since boot.
    pub allocator_calls: u64,
    /// NVMe/TCP connections the core accepted since boot (each TCP connection lives where
    /// the NIC steered it).
    #[serde(default)]
    pub nvmf_connections: u64,
    /// NVMe/TCP commands the core took from its connections since boot (forwarded ones
    /// included).
    #[serde(default)]
    pub nvmf_commands: u64,
    /// Doorbells the core rang to wake core 0 after giving it messages (core 0: none).
    #[serde(default)]
    pub doorbells_to_core0: u64,
    /// Core 0: sleeps its bounded timer ended with messages from other cores waiting that
    /// rang no doorbell (a lost wake-up rescued; expected 0).
    #[serde(default)]
    pub wakeup_rescues: u64,
    /// Commands of emulated functions' queues the core fetched since boot (core 0: admin
    /// queues and the I/O queues it serves; another core: the I/O queue pairs handed to it).
    #[serde(default)]
    pub function_commands: u64,
}

/// What QoS does for one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NamespaceQosInfo {
    /// NQN of its subsystem.
    pub subsystem: String,
    /// Its NSID.
    pub nsid: u32,
    /// Its share of a saturated drive.
    pub weight: u32,
    /// The QoS group it is in, if any.
    pub group: Option<String>,
    /// What its own limits do.
    pub qos: QosInfo,
}

/// What QoS does for one controller.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControllerQosInfo {
    /// Its controller ID.
    pub cntlid: u16,
    /// The host's NQN (empty for an emulated function's controller).
    pub hostnqn: String,
    /// `tcp` or `pcie`.
    pub transport: String,
    /// What its limits (its host's rule, or its emulated function's) do.
    pub qos: QosInfo,
}

/// The device's pools and slots, taken at one instant. A device at rest has every buffer free,
/// no NVMe/TCP connection, no controller and no queue, no socket draining, and a listener
/// armed on every port; the heap only shrinks while the socket pool grows to its maximum, by
/// what [`Snapshot::socket_buffer_bytes`] grows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// Bytes free on the heap.
    pub heap_free: u64,
    /// NVMe/TCP data buffers free (never-carved ones of the lazy pool included).
    pub nvmf_buffers_free: u32,
    /// NVMe/TCP data buffers in all.
    pub nvmf_buffers_total: u32,
    /// Data buffers of the emulated functions free, all functions together.
    pub function_buffers_free: u32,
    /// Data buffers of the emulated functions in all.
    pub function_buffers_total: u32,
    /// TCP sockets created so far (they are reused, never freed).
    pub sockets_created: u32,
    /// Most sockets the pool creates.
    pub sockets_max: u32,
    /// Sockets closed and ready for reuse.
    pub sockets_free: u32,
    /// Sockets armed as listeners.
    pub sockets_listening: u32,
    /// Sockets finishing a close (FIN exchange, at most a short grace period).
    pub sockets_draining: u32,
    /// NVMe/TCP connections still waiting for their ICReq.
    pub awaiting_icreq: u32,
    /// Controllers in use (NVMe/TCP, emulated functions and discovery).
    pub controllers: u32,
    /// Most controllers at once.
    pub controllers_max: u32,
    /// Controller-core queue slots in use (one per NVMe/TCP connection and per emulated
    /// function queue).
    pub queues: u32,
    /// Most queue slots at once.
    pub queues_max: u32,
    /// Connections refused since boot: no socket, or no queue slot, for them.
    pub refused: u64,
    /// Connections that never sent an ICReq, closed to make room for a new one.
    pub evicted: u64,
    /// Connections closed because their ICReq did not come in time.
    pub icreq_timeouts: u64,
}

impl Snapshot {
    /// What differs from `idle` in the counts that must come back once a workload has ended
    /// (NVMe/TCP connections, buffers, controllers, queues, draining sockets, listeners);
    /// empty when the device is back at rest. The heap and cumulative counters are not
    /// compared.
    pub fn differences_from(&self, idle: &Snapshot) -> Vec<String> {
        let (a, b) = (&self.resources, &idle.resources);
        [
            (
                "NVMe/TCP connections",
                self.tcp_connections,
                idle.tcp_connections,
            ),
            (
                "NVMe/TCP buffers free",
                a.nvmf_buffers_free,
                b.nvmf_buffers_free,
            ),
            (
                "NVMe/TCP buffers",
                a.nvmf_buffers_total,
                b.nvmf_buffers_total,
            ),
            (
                "function buffers free",
                a.function_buffers_free,
                b.function_buffers_free,
            ),
            (
                "sockets listening",
                a.sockets_listening,
                b.sockets_listening,
            ),
            ("sockets draining", a.sockets_draining, b.sockets_draining),
            (
                "connections awaiting ICReq",
                a.awaiting_icreq,
                b.awaiting_icreq,
            ),
            ("controllers", a.controllers, b.controllers),
            ("queues", a.queues, b.queues),
        ]
        .iter()
        .filter(|(_, now, then)| now != then)
        .map(|(what, now, then)| alloc::format!("{what}: {now} (idle: {then})"))
        .collect()
    }
}

/// One remote volume: a namespace of a remote NVMe/TCP subsystem, reached over one or more
/// paths, that namespaces of this device are served from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RemoteInfo {
    /// The remote subsystem's NQN.
    pub subnqn: String,
    /// The namespace there.
    pub nsid: u32,
    /// The host NQN the device connects as.
    pub hostnqn: String,
    /// `connecting`, `online`, `degraded` (some path unusable), `no path` (requests wait),
    /// `failed` (every path gave up: requests fail).
    pub state: String,
    /// Capacity in bytes (0 until a path identified the namespace).
    pub size_bytes: u64,
    /// Logical block size (0 until identified).
    pub block_size: u32,
    /// Path selection policy (`round-robin`, `queue-depth`).
    pub policy: String,
    /// Namespaces served from it: (subsystem NQN, NSID).
    pub exports: Vec<(String, u32)>,
    /// Requests waiting for a path or a queue slot.
    pub queued: u32,
    /// Requests with a command in flight.
    pub in_flight: u32,
    /// Requests accepted.
    pub submitted: u64,
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error.
    pub failed: u64,
    /// Of those, with a path error (no usable path within the loss timeouts).
    pub path_errors: u64,
    /// Commands sent again after a retryable status.
    pub retries: u64,
    /// Commands sent again after their path failed (association lost, path or ANA status).
    pub failovers: u64,
    /// Per path.
    pub paths: Vec<RemotePathInfo>,
}

/// One path of a remote volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RemotePathInfo {
    /// `a.b.c.d:port`.
    pub addr: String,
    /// `connecting`, `live`, `reconnecting`, `failed`.
    pub state: String,
    /// ANA state of the namespace through this path (`optimized`, `non-optimized`,
    /// `inaccessible`, `persistent-loss`, `change`), empty when the remote does not report
    /// ANA.
    pub ana: String,
    /// Controller ID of the current association (0: none).
    pub cntlid: u16,
    /// I/O queues of the current association.
    pub io_queues: u16,
    /// Their depth.
    pub queue_depth: u16,
    /// I/O commands in flight.
    pub in_flight: u32,
    /// Why the last association ended (empty: never).
    pub last_loss: String,
    /// Association attempts started.
    pub attempts: u64,
    /// Associations that came up.
    pub connects: u64,
    /// Associations (or attempts) that ended.
    pub losses: u64,
    /// I/O commands sent.
    pub commands: u64,
    /// I/O commands that completed with an error status.
    pub errors: u64,
    /// I/O commands outstanding when their association ended (retried).
    pub aborted: u64,
    /// Keep Alive commands sent.
    pub keep_alives: u64,
}

/// One limit in force: its name (`iops`, `read_iops`, `write_iops`, `bps`, `read_bps`,
/// `write_bps`), rate per second and burst.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosLimit {
    /// Which limit.
    pub name: String,
    /// Operations or bytes per second.
    pub per_sec: u64,
    /// Burst allowance.
    pub burst: u64,
}

/// What QoS does for a namespace, a controller (its host) or a group.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QosInfo {
    /// The limits in force (empty: none).
    pub limits: Vec<QosLimit>,
    /// Commands started since boot (counted when they pass their limits).
    pub admitted_ops: u64,
    /// Bytes of those commands.
    pub admitted_bytes: u64,
    /// Commands started per second, over the last whole second the device measured.
    pub ops_per_sec: u64,
    /// Bytes started per second, over the same second.
    pub bytes_per_sec: u64,
    /// Nanoseconds commands were held back by these limits, since boot.
    pub throttled_ns: u64,
    /// Commands waiting now.
    pub queued: u32,
}

/// One QoS group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Its name.
    pub name: String,
    /// Its weight (0: its namespaces' own).
    pub weight: u32,
    /// What its limits do.
    pub qos: QosInfo,
}

/// One subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemInfo {
    /// Its NQN.
    pub nqn: String,
    /// Host NQNs allowed (empty: any).
    pub allowed_hosts: Vec<String>,
}

/// One namespace and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// NQN of its subsystem.
    pub subsystem: String,
    /// Its NSID.
    pub nsid: u32,
    /// Backend description (`ram 256 MiB`, `drive 0 ns 1 [0+1 GiB]`).
    pub backend: String,
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Cipher name (`none`, `aes-256-xts`).
    pub encryption: String,
    /// Transports that export it (`tcp`, `pcie-fn0`).
    pub exports: Vec<String>,
    /// Counters.
    pub stats: NsCounters,
}

/// A namespace's counters; latencies in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NsCounters {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completed other commands (flush, write zeroes, ...).
    pub others: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Failed commands.
    pub errors: u64,
    /// Read latency quantiles.
    pub read_latency: Latency,
    /// Write latency quantiles.
    pub write_latency: Latency,
}

/// Latency quantiles in nanoseconds (upper bounds of power-of-two buckets) and their count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Sum of samples in nanoseconds (for Prometheus `_sum`); may saturate.
    pub sum_ns: u64,
    /// 50th percentile.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
}

/// One live controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// Its controller ID.
    pub cntlid: u16,
    /// NQN of its subsystem.
    pub subsystem: String,
    /// The host's NQN.
    pub hostnqn: String,
    /// `tcp` or `pcie`.
    pub transport: String,
    /// I/O queues connected.
    pub io_queues: u16,
}

/// One emulated PCIe function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// Its index.
    pub index: u16,
    /// Subsystem it is a controller of.
    pub subsystem: String,
    /// Whether the host has enabled it (CC.EN = 1).
    pub enabled: bool,
}

/// The outcome of a configuration push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// Generation now in force.
    pub generation: u64,
    /// Namespaces added live, as (subsystem NQN, NSID).
    pub added: Vec<(String, u32)>,
    /// Namespaces removed live.
    pub removed: Vec<(String, u32)>,
    /// Changes stored in flash that take effect at the next boot (network, subsystems,
    /// management, backends of existing namespaces), described for the operator.
    pub needs_reboot: Vec<String>,
    /// Whether the bundle was written to the flash configuration area (false on a device
    /// without writable flash: the push then lasts until the next boot).
    pub persisted: bool,
}

/// What the management session needs from the device. The firmware's services implement it;
/// host tests implement it with a fake.
pub trait Device {
    /// The counters and state right now.
    fn snapshot(&self) -> Snapshot;
    /// Verifies, applies and persists a configuration bundle. On error nothing changes: the
    /// message says why (it is shown to the operator and logged on the console).
    fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String>;
    /// Schedules a reboot once the reply has been sent.
    fn reboot(&mut self);
    /// Creates an emulated function on a free slot ([`function::check_create`] decides
    /// first). On error nothing changes.
    fn create_function(&mut self, spec: &FunctionSpec) -> Result<FunctionSlotInfo, String> {
        Err(alloc::format!(
            "slot {}: this device cannot create functions",
            spec.slot
        ))
    }
    /// Removes the emulated function of a slot ([`function::check_remove`] decides first).
    /// On error nothing changes.
    fn remove_function(&mut self, slot: u16) -> Result<FunctionSlotInfo, String> {
        Err(alloc::format!(
            "slot {slot}: this device cannot remove functions"
        ))
    }
    /// The Ed25519 public key whose signatures management requests must carry.
    fn authorized_key(&self) -> [u8; 32];
    /// 32 bytes never produced before on this device (across reboots too): the session's
    /// challenges. From a hardware RNG where there is one, mixed with the counter and a
    /// per-boot secret otherwise.
    fn fresh_challenge(&mut self) -> [u8; 32];
    /// Who the device is, for the Hello frame (`Keel 0.1.0 (git ...) on qemu-virt`).
    fn identity(&self) -> String {
        let s = self.snapshot();
        if s.build_id.is_empty() {
            alloc::format!("Keel {} on {}", s.version, s.board)
        } else {
            alloc::format!("Keel {} ({}) on {}", s.version, s.build_id, s.board)
        }
    }
}

#[cfg(test)]
mod tests;
