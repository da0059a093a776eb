//! Configuration of a remote volume, with Linux's defaults (`drivers/nvme/host/fabrics.h`,
//! `nvme.h`, `core.c`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;
use keel_nvmf_tcp::Digests;

/// Paths (addresses) one volume may have.
pub const MAX_PATHS: usize = 8;
/// Largest I/O queue depth (Linux `NVMF_MAX_QUEUE_SIZE`).
pub const MAX_QUEUE_DEPTH: u16 = 1024;
/// Largest number of I/O queues per path.
pub const MAX_IO_QUEUES: u16 = 64;

/// An IPv4 transport address and TCP port of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathAddr {
    /// IPv4 address.
    pub ip: [u8; 4],
    /// TCP port (4420 is the IANA NVMe/TCP port).
    pub port: u16,
}

impl PathAddr {
    /// `a.b.c.d:port`.
    pub const fn new(ip: [u8; 4], port: u16) -> Self {
        Self { ip, port }
    }
}

impl fmt::Display for PathAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        write!(f, "{a}.{b}.{c}.{d}:{}", self.port)
    }
}

/// A path address that does not parse as `a.b.c.d:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrError;

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected an IPv4 address and port, a.b.c.d:port")
    }
}

impl FromStr for PathAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (ip, port) = s.rsplit_once(':').ok_or(AddrError)?;
        let port: u16 = port.parse().map_err(|_| AddrError)?;
        let mut out = [0u8; 4];
        let mut parts = ip.split('.');
        for o in out.iter_mut() {
            let p = parts.next().ok_or(AddrError)?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return Err(AddrError);
            }
            *o = p.parse().map_err(|_| AddrError)?;
        }
        if parts.next().is_some() || port == 0 {
            return Err(AddrError);
        }
        Ok(Self { ip: out, port })
    }
}

/// How I/O is spread over the usable paths (Linux `iopolicy`; both prefer ANA-optimized
/// paths and use non-optimized ones only when no optimized path is usable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each command to the next usable path in turn (`nvme_round_robin_path`).
    #[default]
    RoundRobin,
    /// Each command to the usable path with the fewest commands in flight
    /// (`nvme_queue_depth_path`).
    QueueDepth,
}

/// A remote volume: one namespace of a remote NVMe/TCP subsystem, over one or more paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// The subsystem's addresses: two ports of one target, or two targets that share the
    /// namespace. At least one, at most [`MAX_PATHS`].
    pub paths: Vec<PathAddr>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Namespace identifier on the remote.
    pub nsid: u32,
    /// Our host NQN.
    pub hostnqn: String,
    /// Our host identifier (Connect data).
    pub hostid: [u8; 16],
    /// Header and data digests to ask for.
    pub digests: Digests,
    /// I/O queues (TCP connections) per path; the remote may grant fewer.
    pub io_queues: u16,
    /// Commands in flight per I/O queue (Linux `queue_size`, default 128); capped by the
    /// remote's CAP.MQES and MAXCMD.
    pub queue_depth: u16,
    /// Keep Alive Timeout asked for in Connect, in milliseconds (Linux `NVME_DEFAULT_KATO`:
    /// 5 s). Keep Alive is sent every KATO/2 (KATO/4 with traffic based keep alive, skipped
    /// when commands completed meanwhile), as Linux's `nvme_keep_alive_work_period`.
    pub kato_ms: u32,
    /// Delay between two association attempts of a path (Linux `reconnect_delay`: 10 s).
    pub reconnect_delay_ms: u64,
    /// How long a path keeps trying after it went down before it gives up (Linux
    /// `ctrl_loss_tmo`: 600 s); `None` tries forever (Linux -1).
    pub ctrl_loss_tmo_ms: Option<u64>,
    /// Requests that waited this long for a usable path fail with a path error while the
    /// paths still try to reconnect (Linux `fast_io_fail_tmo`; default off).
    pub fast_io_fail_tmo_ms: Option<u64>,
    /// Path selection policy.
    pub policy: Policy,
    /// Retries of a command that failed with a retryable (non-DNR, non-path) status (Linux
    /// `nvme_max_retries`: 5).
    pub max_retries: u8,
    /// An I/O command outstanding this long ends the association (Linux `nvme_io_timeout`:
    /// 30 s); its request is retried on the next association or another path.
    pub io_timeout_ms: u64,
    /// An admin command (other than Keep Alive, bounded by KATO) outstanding this long on a
    /// live association ends it (Linux `admin_timeout`: 60 s).
    pub admin_timeout_ms: u64,
    /// One association attempt (TCP connect, ICReq/ICResp, Connect, enable, Identify, every
    /// I/O queue's Connect) must finish within this (Linux waits 10 s for ICResp).
    pub connect_timeout_ms: u64,
    /// Requests the volume holds at once (queued or in flight); 0 = io_queues × queue_depth.
    pub max_requests: u16,
    /// Lanes: other cores that each connect I/O queues of their own to every association
    /// this volume sets up (see the crate docs, "Lanes"); 0 = none (one core).
    pub lanes: u16,
    /// I/O queues per lane and path (asked for in Number of Queues on top of `io_queues`).
    pub lane_queues: u16,
}

impl RemoteConfig {
    /// A configuration with Linux's defaults: no digests, 4 I/O queues of depth 128, KATO
    /// 5 s, reconnect every 10 s for 600 s, round-robin.
    pub fn new(
        paths: Vec<PathAddr>,
        subnqn: impl Into<String>,
        nsid: u32,
        hostnqn: impl Into<String>,
        hostid: [u8; 16],
    ) -> Self {
        Self {
            paths,
            subnqn: subnqn.into(),
            nsid,
            hostnqn: hostnqn.into(),
            hostid,
            digests: Digests::default(),
            io_queues: 4,
            queue_depth: 128,
            kato_ms: 5_000,
            reconnect_delay_ms: 10_000,
            ctrl_loss_tmo_ms: Some(600_000),
            fast_io_fail_tmo_ms: None,
            policy: Policy::RoundRobin,
            max_retries: 5,
            io_timeout_ms: 30_000,
            admin_timeout_ms: 60_000,
            connect_timeout_ms: 10_000,
            max_requests: 0,
            lanes: 0,
            lane_queues: 1,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.paths.is_empty() || self.paths.len() > MAX_PATHS {
            return Err(ConfigError::Paths);
        }
        if self
            .paths
            .iter()
            .enumerate()
            .any(|(i, a)| self.paths[..i].contains(a))
        {
            return Err(ConfigError::DuplicatePath);
        }
        let nqn_ok =
            |n: &str| !n.is_empty() && n.len() <= keel_nvme::NQN_MAX_LEN && !n.contains('\0');
        if !nqn_ok(&self.subnqn) || self.subnqn == keel_nvme::DISCOVERY_NQN {
            return Err(ConfigError::SubNqn);
        }
        if !nqn_ok(&self.hostnqn) {
            return Err(ConfigError::HostNqn);
        }
        if self.nsid == 0 || self.nsid == keel_nvme::NSID_ALL {
            return Err(ConfigError::Nsid);
        }
        if self.io_queues == 0 || self.io_queues > MAX_IO_QUEUES {
            return Err(ConfigError::IoQueues);
        }
        if self.lanes > 0
            && (self.lane_queues == 0
                || u32::from(self.io_queues) + u32::from(self.lanes) * u32::from(self.lane_queues)
                    > u32::from(MAX_IO_QUEUES) * 4)
        {
            return Err(ConfigError::IoQueues);
        }
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return Err(ConfigError::QueueDepth);
        }
        if self.kato_ms == 0 {
            // NVMe/TCP requires keep alive (NVMe-oF 1.1 §3.3: KATO 0 only for discovery).
            return Err(ConfigError::Timing("kato_ms must not be 0"));
        }
        if self.reconnect_delay_ms == 0 {
            return Err(ConfigError::Timing("reconnect_delay_ms must not be 0"));
        }
        if self.io_timeout_ms == 0 || self.admin_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(ConfigError::Timing("timeouts must not be 0"));
        }
        Ok(())
    }

    /// The request table size.
    pub(crate) fn request_slots(&self) -> usize {
        if self.max_requests != 0 {
            self.max_requests as usize
        } else {
            (self.io_queues as usize * self.queue_depth as usize).clamp(1, 0xFFFF)
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// No path, or more than [`MAX_PATHS`].
    Paths,
    /// The same address twice.
    DuplicatePath,
    /// Subsystem NQN empty, too long, with a NUL, or the discovery NQN.
    SubNqn,
    /// Host NQN empty, too long or with a NUL.
    HostNqn,
    /// NSID 0 or FFFFFFFFh.
    Nsid,
    /// I/O queues 0 or above [`MAX_IO_QUEUES`].
    IoQueues,
    /// Queue depth 0 or above [`MAX_QUEUE_DEPTH`].
    QueueDepth,
    /// A timer out of range.
    Timing(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Paths => write!(f, "1 to {MAX_PATHS} paths are needed"),
            Self::DuplicatePath => f.write_str("the same path address is given twice"),
            Self::SubNqn => f.write_str("invalid subsystem NQN"),
            Self::HostNqn => f.write_str("invalid host NQN"),
            Self::Nsid => f.write_str("invalid namespace id"),
            Self::IoQueues => write!(f, "1 to {MAX_IO_QUEUES} I/O queues are needed"),
            Self::QueueDepth => write!(f, "queue depth must be 1 to {MAX_QUEUE_DEPTH}"),
            Self::Timing(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn addresses_parse_and_print() {
        let a: PathAddr = "10.0.2.2:4420".parse().unwrap();
        assert_eq!(a, PathAddr::new([10, 0, 2, 2], 4420));
        assert_eq!(a.to_string(), "10.0.2.2:4420");
        for bad in [
            "10.0.2.2",
            "10.0.2:4420",
            "10.0.2.2.1:4420",
            "10.0.2.256:4420",
            "a.b.c.d:1",
            "10.0.2.2:0",
            "10.0.2.2:65536",
            "10..2.2:4420",
            " 10.0.2.2:4420",
            "1.2.3.4:",
        ] {
            assert_eq!(bad.parse::<PathAddr>(), Err(AddrError), "{bad}");
        }
    }

    #[test]
    fn validation() {
        let ok = RemoteConfig::new(
            vec![PathAddr::new([127, 0, 0, 1], 4420)],
            "nqn.2026-11.dev.keel:default",
            1,
            "nqn.2014-08.org.nvmexpress:uuid:1",
            [1; 16],
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.request_slots(), 512);
        let bad = |f: &dyn Fn(&mut RemoteConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(&|c| c.paths.clear()), ConfigError::Paths);
        assert_eq!(
            bad(&|c| c.paths.push(c.paths[0])),
            ConfigError::DuplicatePath
        );
        assert_eq!(
            bad(&|c| c.subnqn = keel_nvme::DISCOVERY_NQN.into()),
            ConfigError::SubNqn
        );
        assert_eq!(bad(&|c| c.hostnqn.clear()), ConfigError::HostNqn);
        assert_eq!(bad(&|c| c.nsid = 0), ConfigError::Nsid);
        assert_eq!(bad(&|c| c.io_queues = 0), ConfigError::IoQueues);
        assert_eq!(bad(&|c| c.queue_depth = 1025), ConfigError::QueueDepth);
        assert!(matches!(bad(&|c| c.kato_ms = 0), ConfigError::Timing(_)));
        assert!(matches!(
            bad(&|c| c.reconnect_delay_ms = 0),
            ConfigError::Timing(_)
        ));
    }
}
