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
//! | 3 | client → device | frame: [`wire::SignedRequest`] `{ request: Request, signature: [u8; 64] }`, `Request` = `Status` \| `Push(bundle bytes)` \| `Reboot` |
//! | 4 | device → client | frame: [`wire::Response`] `{ challenge: [u8; 32], reply: Reply }`, `Reply` = `Status(Snapshot)` \| `Pushed(PushReport)` \| `PushRefused(message)` \| `Rebooting` \| `Error { code, message, closing }` |
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
//! - **Back-pressure**: the session takes no input while a response is waiting to be sent,
//!   so per-connection memory is bounded by one frame and one response.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod metrics;
pub mod session;
pub mod wire;

pub use ed25519_dalek;
pub use session::Session;

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Everything `keelctl status` shows and `/metrics` exports, taken at one instant.
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
    /// Every running core's poll loop (core 0 first), each read from counters that only its
    /// own core writes.
    pub cores: Vec<CoreInfo>,
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
