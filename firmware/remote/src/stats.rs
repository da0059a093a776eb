//! What a remote volume reports: per path state and counters, for `keelctl status` and
//! `/metrics`.

use crate::config::PathAddr;
use alloc::vec::Vec;
use core::fmt;
use keel_nvme::Status;
use keel_nvme::log::ana::AnaState;
use keel_nvmf_tcp::CloseReason;
use keel_storage::Geometry;

/// Where a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// An association attempt is under way (TCP connect, Connect, enable, Identify, I/O
    /// queues).
    Connecting,
    /// The association is up; I/O flows when the ANA state allows it.
    Live,
    /// Down; the next attempt starts after `reconnect_delay`.
    Reconnecting,
    /// Given up: `ctrl_loss_tmo` expired, or the remote refused us for good (a status with
    /// Do Not Retry during setup, or a namespace that does not match). Only
    /// [`crate::RemoteVolume::reconnect`] revives it.
    Failed,
}

impl fmt::Display for PathState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connecting => "connecting",
            Self::Live => "live",
            Self::Reconnecting => "reconnecting",
            Self::Failed => "failed",
        })
    }
}

/// Why an association ended (or an attempt failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The TCP connection could not be established (refused, reset or timed out).
    ConnectFailed,
    /// The TCP connection closed (reset by the peer or by the network).
    ConnectionClosed,
    /// The NVMe/TCP connection ended: a fatal PDU error on either side (TermReq).
    Transport(CloseReason),
    /// The association attempt did not finish within `connect_timeout`.
    SetupTimeout,
    /// A command of the association setup failed; with DNR set the path gives up.
    SetupFailed {
        /// Which step.
        step: &'static str,
        /// The status the remote returned.
        status: Status,
    },
    /// CSTS.CFS was set while enabling.
    ControllerFatal,
    /// CSTS.RDY did not become 1 within CAP.TO.
    ControllerNotReady,
    /// The remote granted no I/O queue.
    NoIoQueues,
    /// The namespace does not exist there, or differs from the one other paths reach (size,
    /// block size, identifiers): the path gives up.
    Namespace(&'static str),
    /// A Keep Alive got no answer within KATO.
    KeepAliveTimeout,
    /// A Keep Alive failed.
    KeepAliveFailed(Status),
    /// An I/O command was outstanding longer than `io_timeout`.
    IoTimeout,
    /// An admin command was outstanding longer than `admin_timeout`.
    AdminTimeout,
    /// The namespace stayed in ANA Change longer than ANATT.
    AnaTransitionTimeout,
    /// Reading the ANA log failed.
    AnaLogFailed(Status),
    /// The remote broke the protocol in a way the transport did not catch.
    Protocol(&'static str),
    /// The volume was shut down ([`crate::RemoteVolume::shutdown`]).
    Shutdown,
    /// A lane's view: the association its I/O queues belonged to ended on the volume that
    /// owns it (see the crate docs, "Lanes").
    Superseded,
}

impl LossReason {
    /// True when the path should not try again.
    pub fn permanent(&self) -> bool {
        match self {
            Self::SetupFailed { status, .. } => status.dnr,
            Self::Namespace(_) | Self::Shutdown => true,
            _ => false,
        }
    }
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailed => f.write_str("TCP connection failed"),
            Self::ConnectionClosed => f.write_str("TCP connection closed"),
            Self::Transport(r) => write!(f, "NVMe/TCP connection ended: {r}"),
            Self::SetupTimeout => f.write_str("association setup timed out"),
            Self::SetupFailed { step, status } => write!(f, "{step} failed: {status}"),
            Self::ControllerFatal => f.write_str("controller fatal status (CSTS.CFS)"),
            Self::ControllerNotReady => f.write_str("controller not ready within CAP.TO"),
            Self::NoIoQueues => f.write_str("no I/O queue granted"),
            Self::Namespace(s) => write!(f, "namespace: {s}"),
            Self::KeepAliveTimeout => f.write_str("keep alive timed out"),
            Self::KeepAliveFailed(s) => write!(f, "keep alive failed: {s}"),
            Self::IoTimeout => f.write_str("I/O command timed out"),
            Self::AdminTimeout => f.write_str("admin command timed out"),
            Self::AnaTransitionTimeout => f.write_str("ANA transition took longer than ANATT"),
            Self::AnaLogFailed(s) => write!(f, "ANA log read failed: {s}"),
            Self::Protocol(s) => write!(f, "protocol error: {s}"),
            Self::Shutdown => f.write_str("shut down"),
            Self::Superseded => f.write_str("the association ended on the controller core"),
        }
    }
}

/// Counters of one path (monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathCounters {
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
    /// I/O commands outstanding when their association ended (their requests were retried).
    pub aborted: u64,
    /// Keep Alive commands sent.
    pub keep_alives: u64,
    /// ANA log pages read.
    pub ana_reads: u64,
    /// Asynchronous events received.
    pub async_events: u64,
}

/// One path's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSnapshot {
    /// Address.
    pub addr: PathAddr,
    /// Connection state.
    pub state: PathState,
    /// ANA state of the namespace through this path (`None` when the remote does not report
    /// ANA, or before the first association; such a path counts as optimized).
    pub ana: Option<AnaState>,
    /// Controller ID of the current association (0 when none).
    pub cntlid: u16,
    /// I/O queues of the current association.
    pub io_queues: u16,
    /// Commands in flight per I/O queue at most.
    pub queue_depth: u16,
    /// I/O commands in flight.
    pub in_flight: u32,
    /// Why the last association ended.
    pub last_loss: Option<LossReason>,
    /// Counters.
    pub counters: PathCounters,
}

/// Where one I/O queue of a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Connected (its Connect succeeded): commands may be sent on it.
    Live,
    /// Its connection or Connect is under way.
    Connecting,
    /// Not there: the path has no association, or this volume's queue of it is gone.
    Down,
}

impl QueueState {
    /// `live`, `connecting`, `down`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Connecting => "connecting",
            Self::Down => "down",
        }
    }
}

/// One I/O queue of one path, as the volume (owner or lane) that owns it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    /// Index of the path in the configuration.
    pub path: u8,
    /// Its QID on the remote controller.
    pub qid: u16,
    /// Where it is.
    pub state: QueueState,
    /// I/O commands sent on it, over every association (monotonic).
    pub commands: u64,
    /// I/O commands in flight on it now.
    pub in_flight: u16,
}

/// Counters of the volume (monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeCounters {
    /// Requests accepted.
    pub submitted: u64,
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error.
    pub failed: u64,
    /// Of those, failed with a path error (no usable path within the timeouts).
    pub path_errors: u64,
    /// Commands sent again after a retryable error status.
    pub retries: u64,
    /// Commands sent again after their path failed (association lost, path or ANA status).
    pub failovers: u64,
    /// Requests larger than one command (split at MDTS).
    pub split: u64,
}

/// The requests of a volume (or of a lane of it) now and since it was made: what
/// [`Snapshot`] says of them, without allocating (a core publishes it every pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeLoad {
    /// Requests waiting for a path or a queue slot.
    pub queued: u32,
    /// Requests with a command in flight.
    pub in_flight: u32,
    /// Volume counters.
    pub counters: VolumeCounters,
}

impl core::ops::AddAssign for VolumeLoad {
    /// Two lanes' (or the owner's and its lanes') requests together.
    fn add_assign(&mut self, o: Self) {
        self.queued += o.queued;
        self.in_flight += o.in_flight;
        let (a, b) = (&mut self.counters, o.counters);
        a.submitted += b.submitted;
        a.completed += b.completed;
        a.failed += b.failed;
        a.path_errors += b.path_errors;
        a.retries += b.retries;
        a.failovers += b.failovers;
        a.split += b.split;
    }
}

/// Where the volume as a whole is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// No path has been usable yet.
    Connecting,
    /// Every path is live and accessible.
    Online,
    /// Some path is usable, some is not.
    Degraded,
    /// No path is usable now; requests wait (up to the loss timeouts).
    NoPath,
    /// Every path gave up: requests fail with a path error.
    Failed,
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connecting => "connecting",
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::NoPath => "no path",
            Self::Failed => "failed",
        })
    }
}

/// A consistent view of the volume (allocates: management path only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Overall state.
    pub state: VolumeState,
    /// Size, once a path identified the namespace.
    pub geometry: Option<Geometry>,
    /// Requests waiting for a path or a queue slot.
    pub queued: u32,
    /// Requests with a command in flight.
    pub in_flight: u32,
    /// Volume counters.
    pub counters: VolumeCounters,
    /// Per path.
    pub paths: Vec<PathSnapshot>,
}
