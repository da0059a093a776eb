//! Errors of the NVMe/TCP initiator.

use keel_nvme::Status;
use keel_nvme::cqe::{command_specific as cs, generic as g, media as m, sct};
use keel_nvme::fabrics::connect_data_field as cdf;
use keel_nvme::fabrics::connect_field as cf;
use std::fmt;
use std::time::Duration;

/// Everything that can go wrong talking NVMe/TCP.
#[derive(Debug)]
pub enum NvmeError {
    /// A socket call failed.
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A wait ran out of time.
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// The connection ended (peer TermReq, our own fatal error, or TCP close).
    Closed {
        /// Why.
        reason: String,
    },
    /// The transport refused a submission.
    Rejected(keel_nvmf_tcp::RejectReason),
    /// A command completed with an error status.
    Status {
        /// The command, e.g. "Read (NSID 1, LBA 0, 8 blocks)".
        command: String,
        /// The status.
        status: Status,
        /// Completion dword 0 (Connect: IATTR/IPO of an invalid parameter).
        dw0: u32,
    },
    /// The controller answered something we cannot use.
    Protocol(String),
    /// A caller's argument is out of range.
    InvalidArgument(String),
}

impl NvmeError {
    /// The NVMe status of a command error.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl std::error::Error for NvmeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { context, source } => write!(f, "{context}: {source}"),
            Self::Timeout { what, after } => {
                write!(
                    f,
                    "timed out after {:.1} s waiting for {what}",
                    after.as_secs_f64()
                )
            }
            Self::Closed { reason } => write!(f, "connection closed: {reason}"),
            Self::Rejected(r) => write!(f, "submission refused by the transport: {r}"),
            Self::Status {
                command,
                status,
                dw0,
            } => {
                write!(f, "{command} failed: {}", describe_status(*status))?;
                if command.starts_with("Connect")
                    && status.sct == sct::COMMAND_SPECIFIC
                    && status.sc == cs::CONNECT_INVALID_PARAMETERS
                {
                    let in_data = dw0 & (1 << 16) != 0;
                    let ipo = *dw0 as u16;
                    let name = connect_field_name(in_data, ipo);
                    write!(
                        f,
                        "; invalid parameter at byte {ipo} of the Connect {}{}",
                        if in_data { "data" } else { "command" },
                        name.map(|n| format!(" ({n})")).unwrap_or_default()
                    )?;
                }
                Ok(())
            }
            Self::Protocol(s) => write!(f, "protocol error: {s}"),
            Self::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

fn connect_field_name(in_data: bool, ipo: u16) -> Option<&'static str> {
    Some(match (in_data, ipo) {
        (true, cdf::HOSTID) => "HOSTID",
        (true, cdf::CNTLID) => "CNTLID",
        (true, cdf::SUBNQN) => "SUBNQN",
        (true, cdf::HOSTNQN) => "HOSTNQN",
        (false, cf::RECFMT) => "RECFMT",
        (false, cf::QID) => "QID",
        (false, cf::SQSIZE) => "SQSIZE",
        (false, cf::CATTR) => "CATTR",
        (false, cf::KATO) => "KATO",
        _ => return None,
    })
}

/// The name of a status code, when we know it.
pub fn status_name(s: Status) -> Option<&'static str> {
    Some(match (s.sct, s.sc) {
        (sct::GENERIC, g::SUCCESS) => "Successful Completion",
        (sct::GENERIC, g::INVALID_OPCODE) => "Invalid Command Opcode",
        (sct::GENERIC, g::INVALID_FIELD) => "Invalid Field in Command",
        (sct::GENERIC, g::COMMAND_ID_CONFLICT) => "Command ID Conflict",
        (sct::GENERIC, g::DATA_TRANSFER_ERROR) => "Data Transfer Error",
        (sct::GENERIC, g::INTERNAL_ERROR) => "Internal Error",
        (sct::GENERIC, g::ABORT_REQUESTED) => "Command Abort Requested",
        (sct::GENERIC, g::ABORTED_SQ_DELETION) => "Command Aborted due to SQ Deletion",
        (sct::GENERIC, g::INVALID_NAMESPACE_OR_FORMAT) => "Invalid Namespace or Format",
        (sct::GENERIC, g::COMMAND_SEQUENCE_ERROR) => "Command Sequence Error",
        (sct::GENERIC, g::DATA_SGL_LENGTH_INVALID) => "Data SGL Length Invalid",
        (sct::GENERIC, g::SGL_DESCRIPTOR_TYPE_INVALID) => "SGL Descriptor Type Invalid",
        (sct::GENERIC, g::SGL_OFFSET_INVALID) => "SGL Offset Invalid",
        (sct::GENERIC, g::KEEP_ALIVE_TIMER_EXPIRED) => "Keep Alive Timer Expired",
        (sct::GENERIC, g::KEEP_ALIVE_TIMEOUT_INVALID) => "Keep Alive Timeout Invalid",
        (sct::GENERIC, g::NAMESPACE_WRITE_PROTECTED) => "Namespace is Write Protected",
        (sct::GENERIC, g::TRANSIENT_TRANSPORT_ERROR) => "Transient Transport Error",
        (sct::GENERIC, g::LBA_OUT_OF_RANGE) => "LBA Out of Range",
        (sct::GENERIC, g::CAPACITY_EXCEEDED) => "Capacity Exceeded",
        (sct::GENERIC, g::NAMESPACE_NOT_READY) => "Namespace Not Ready",
        (sct::COMMAND_SPECIFIC, cs::INVALID_LOG_PAGE) => "Invalid Log Page",
        (sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_IDENTIFIER) => "Invalid Queue Identifier",
        (sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_SIZE) => "Invalid Queue Size",
        (sct::COMMAND_SPECIFIC, cs::CONNECT_INCOMPATIBLE_FORMAT) => "Connect Incompatible Format",
        (sct::COMMAND_SPECIFIC, cs::CONNECT_CONTROLLER_BUSY) => "Connect Controller Busy",
        (sct::COMMAND_SPECIFIC, cs::CONNECT_INVALID_PARAMETERS) => "Connect Invalid Parameters",
        (sct::COMMAND_SPECIFIC, cs::CONNECT_RESTART_DISCOVERY) => "Connect Restart Discovery",
        (sct::COMMAND_SPECIFIC, cs::CONNECT_INVALID_HOST) => "Connect Invalid Host",
        (sct::COMMAND_SPECIFIC, cs::INVALID_QUEUE_TYPE) => "Invalid Queue Type",
        (sct::MEDIA, m::WRITE_FAULT) => "Write Fault",
        (sct::MEDIA, m::UNRECOVERED_READ_ERROR) => "Unrecovered Read Error",
        (sct::MEDIA, m::COMPARE_FAILURE) => "Compare Failure",
        (sct::MEDIA, m::ACCESS_DENIED) => "Access Denied",
        _ => return None,
    })
}

/// "LBA Out of Range (SCT 0h, SC 80h, DNR)".
pub fn describe_status(s: Status) -> String {
    let mut out = format!(
        "{} (SCT {:X}h, SC {:02X}h",
        status_name(s).unwrap_or("unknown status"),
        s.sct,
        s.sc
    );
    if s.dnr {
        out.push_str(", DNR");
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display() {
        let e = NvmeError::Status {
            command: "Read (NSID 1, LBA 524288, 1 block)".into(),
            status: Status::generic(0x80).with_dnr(),
            dw0: 0,
        };
        assert_eq!(
            e.to_string(),
            "Read (NSID 1, LBA 524288, 1 block) failed: LBA Out of Range (SCT 0h, SC 80h, DNR)"
        );
        let e = NvmeError::Status {
            command: "Connect (admin queue)".into(),
            status: Status::command_specific(0x82),
            dw0: (1 << 16) | 256,
        };
        assert!(
            e.to_string()
                .ends_with("invalid parameter at byte 256 of the Connect data (SUBNQN)"),
            "{e}"
        );
    }
}
