//! # keel-nvmf-tcp: the NVMe/TCP transport, sans-IO
//!
//! Implements the NVMe/TCP Transport Specification 1.0 (NVM Express TP 8000, as folded into
//! the NVMe-oF family) for both roles:
//!
//! * [`crc32c`]: the header and data digests (§3.6.1.3; CRC32C per RFC 3720 B.4), with the
//!   Armv8 CRC instructions when built with `target_feature = "crc"`.
//! * [`pdu`]: the PDU formats (§3.6: common header figure 12, PDU types figure 13, ICReq/ICResp
//!   §3.6.2.2-3, H2C/C2HTermReq §3.6.2.4-5, CapsuleCmd/Resp §3.6.2.6-7, H2C/C2HData
//!   §3.6.2.8-9, R2T §3.6.2.10), fatal error codes (FES/FEI, figure 23).
//! * [`Connection`]: the connection core both roles share (§3.3 connection establishment,
//!   §3.5 error handling and termination, §3.6.1 framing under any segmentation): receive
//!   phases, transmit cursor, event and transmit queues, TermReq, close. A role plugs in its
//!   PDU handling as a type parameter (static dispatch):
//! * [`TargetConnection`] = `Connection<TargetRole>`: the controller side (§3.4.1 in-capsule
//!   data, §3.4.2 R2T-solicited host-to-controller data, §3.4.3 controller-to-host data with
//!   the SUCCESS optimisation).
//! * [`HostConnection`] = `Connection<HostRole>`: the initiator side, for the host tools and
//!   the remote-volume backend.
//!
//! ## Layering
//! Nothing here touches sockets, timers or hardware: the firmware feeds received TCP bytes in
//! with `recv(now, bytes)` (any segmentation), takes events out with `poll_event()`, answers
//! with `provide_buffer` / `complete` (target) or `submit` (host), and pulls PDU bytes with
//! `transmit(&mut out)` — typically from inside smoltcp's `TcpSocket::send(|buf| ..)`. Data
//! moves between the wire and the application's buffers (`B: AsRef<[u8]> + AsMut<[u8]>`, e.g.
//! DMA buffers) in one copy that also computes the data digest. All per-connection memory is
//! allocated when the connection is created; nothing is allocated per PDU or per command, and a
//! hostile peer's lengths are validated against negotiated limits before anything is buffered.
//!
//! Capsules cross to the application typed: a received command is a [`keel_nvme::Sqe`]
//! (decoded once, here), a completion is handed over as a [`keel_nvme::Cqe`], a command the
//! transport fails carries a [`keel_nvme::Status`]. [`capsule`] holds only what NVMe/TCP makes
//! of SGL1. The NVMe command set lives in the controller core, not here.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod capsule;
mod conn;
pub use keel_crc32c as crc32c;
pub mod host;
pub mod pdu;
mod rx;
pub mod target;

use core::fmt;

pub use conn::{ConnState, Connection};
pub use host::{HostConfig, HostConnection, HostEvent, HostRole};
pub use keel_nvme::{Cqe, DataDirection, Sqe, Status};
pub use pdu::{Digests, FatalError};
pub use target::{Event, TargetConfig, TargetConnection, TargetRole, TargetState};

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// We detected a fatal transport error and sent a TermReq with its FES/FEI.
    Fatal(FatalError),
    /// The peer sent a TermReq.
    PeerTerminated {
        /// The peer's FES.
        fes: u16,
        /// The peer's FEI.
        fei: u32,
    },
    /// The host did not send ICReq in time (target).
    IcReqTimeout,
    /// The application closed the connection.
    Local,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fatal(e) => write!(f, "fatal transport error: {e}"),
            Self::PeerTerminated { fes, fei } => {
                write!(
                    f,
                    "peer terminated the connection (FES {fes:#x}, FEI {fei:#x})"
                )
            }
            Self::IcReqTimeout => f.write_str("no ICReq within the timeout"),
            Self::Local => f.write_str("closed locally"),
        }
    }
}

/// Why an application call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No command with that CID is in the state the call needs.
    UnknownCommand,
    /// No buffer was requested for that CID.
    NotAwaitingBuffer,
    /// The buffer is shorter than the requested length.
    BufferTooSmall,
    /// The data length exceeds the command's transfer length or the buffer.
    InvalidLength,
    /// The connection is closing or closed.
    Closed,
    /// No free command slot (host: queue full).
    QueueFull,
    /// The connection is not ready (host: IC exchange not done).
    NotReady,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownCommand => "unknown command identifier",
            Self::NotAwaitingBuffer => "no buffer requested for this command",
            Self::BufferTooSmall => "buffer too small",
            Self::InvalidLength => "data length out of range",
            Self::Closed => "connection closed",
            Self::QueueFull => "queue full",
            Self::NotReady => "connection not ready",
        })
    }
}

/// A refused call, giving the buffer back.
#[derive(Debug)]
pub struct Rejected<B> {
    /// Why.
    pub reason: RejectReason,
    /// The buffer passed in, returned.
    pub buf: Option<B>,
}

impl<B> Rejected<B> {
    pub(crate) fn new(reason: RejectReason, buf: Option<B>) -> Self {
        Self { reason, buf }
    }
}

impl<B> fmt::Display for Rejected<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reason, f)
    }
}
