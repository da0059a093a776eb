//! Completion Queue Entry (NVMe base 2.0 §4.2.3, Figure 89) and status codes (§4.2.3.2).

use crate::le;
use core::fmt;

/// Status Code Type values (Figure 94).
pub mod sct {
    /// Generic Command Status.
    pub const GENERIC: u8 = 0x0;
    /// Command Specific Status.
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    /// Media and Data Integrity Errors.
    pub const MEDIA: u8 = 0x2;
    /// Path Related Status.
    pub const PATH: u8 = 0x3;
    /// Vendor Specific.
    pub const VENDOR: u8 = 0x7;
}

/// Generic command status codes, SCT 0h (Figure 95 and 96).
pub mod generic {
    /// Successful Completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Command ID Conflict.
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Commands Aborted due to Power Loss Notification.
    pub const POWER_LOSS_ABORT: u8 = 0x05;
    /// Internal Error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: u8 = 0x07;
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// Command Aborted due to Failed Fused Command.
    pub const ABORTED_FAILED_FUSED: u8 = 0x09;
    /// Command Aborted due to Missing Fused Command.
    pub const ABORTED_MISSING_FUSED: u8 = 0x0A;
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0B;
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0C;
    /// Invalid SGL Segment Descriptor.
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: u8 = 0x0D;
    /// Invalid Number of SGL Descriptors.
    pub const INVALID_NUMBER_OF_SGL_DESCRIPTORS: u8 = 0x0E;
    /// Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0F;
    /// Metadata SGL Length Invalid.
    pub const METADATA_SGL_LENGTH_INVALID: u8 = 0x10;
    /// SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    /// Invalid Use of Controller Memory Buffer.
    pub const INVALID_USE_OF_CMB: u8 = 0x12;
    /// PRP Offset Invalid.
    pub const INVALID_PRP_OFFSET: u8 = 0x13;
    /// Atomic Write Unit Exceeded.
    pub const ATOMIC_WRITE_UNIT_EXCEEDED: u8 = 0x14;
    /// Operation Denied.
    pub const OPERATION_DENIED: u8 = 0x15;
    /// SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: u8 = 0x16;
    /// Host Identifier Inconsistent Format.
    pub const HOST_ID_INCONSISTENT_FORMAT: u8 = 0x18;
    /// Keep Alive Timer Expired.
    pub const KEEP_ALIVE_TIMER_EXPIRED: u8 = 0x19;
    /// Keep Alive Timeout Invalid.
    pub const KEEP_ALIVE_TIMEOUT_INVALID: u8 = 0x1A;
    /// Command Aborted due to Preempt and Abort.
    pub const ABORTED_PREEMPT: u8 = 0x1B;
    /// Sanitize Failed.
    pub const SANITIZE_FAILED: u8 = 0x1C;
    /// Sanitize In Progress.
    pub const SANITIZE_IN_PROGRESS: u8 = 0x1D;
    /// SGL Data Block Granularity Invalid.
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: u8 = 0x1E;
    /// Command Not Supported for Queue in CMB.
    pub const NOT_SUPPORTED_FOR_CMB_QUEUE: u8 = 0x1F;
    /// Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: u8 = 0x20;
    /// Command Interrupted.
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    /// Transient Transport Error.
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    /// LBA Out of Range (NVM command set).
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    /// Namespace Not Ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
    /// Reservation Conflict.
    pub const RESERVATION_CONFLICT: u8 = 0x83;
    /// Format In Progress.
    pub const FORMAT_IN_PROGRESS: u8 = 0x84;
}

/// Command specific status codes, SCT 1h (Figure 97, NVM Command Set Figure 23, NVMe-oF 1.1
/// Figure 21 / §7).
pub mod command_specific {
    /// Completion Queue Invalid.
    pub const COMPLETION_QUEUE_INVALID: u8 = 0x00;
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// Abort Command Limit Exceeded.
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: u8 = 0x03;
    /// Asynchronous Event Request Limit Exceeded.
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: u8 = 0x05;
    /// Invalid Firmware Slot.
    pub const INVALID_FIRMWARE_SLOT: u8 = 0x06;
    /// Invalid Firmware Image.
    pub const INVALID_FIRMWARE_IMAGE: u8 = 0x07;
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: u8 = 0x08;
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    /// Invalid Format.
    pub const INVALID_FORMAT: u8 = 0x0A;
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: u8 = 0x0C;
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0D;
    /// Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0E;
    /// Feature Not Namespace Specific.
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: u8 = 0x0F;
    /// Namespace Insufficient Capacity.
    pub const NAMESPACE_INSUFFICIENT_CAPACITY: u8 = 0x15;
    /// Namespace Identifier Unavailable.
    pub const NAMESPACE_ID_UNAVAILABLE: u8 = 0x16;
    /// Namespace Already Attached.
    pub const NAMESPACE_ALREADY_ATTACHED: u8 = 0x18;
    /// Namespace Is Private.
    pub const NAMESPACE_IS_PRIVATE: u8 = 0x19;
    /// Namespace Not Attached.
    pub const NAMESPACE_NOT_ATTACHED: u8 = 0x1A;
    /// Thin Provisioning Not Supported.
    pub const THIN_PROVISIONING_NOT_SUPPORTED: u8 = 0x1B;
    /// Controller List Invalid.
    pub const CONTROLLER_LIST_INVALID: u8 = 0x1C;
    /// Conflicting Attributes (NVM I/O commands).
    pub const CONFLICTING_ATTRIBUTES: u8 = 0x80;
    /// Invalid Protection Information (NVM I/O commands).
    pub const INVALID_PROTECTION_INFORMATION: u8 = 0x81;
    /// Attempted Write to Read Only Range (NVM I/O commands).
    pub const WRITE_TO_READ_ONLY_RANGE: u8 = 0x82;
    /// Command Size Limit Exceeded (NVM command set: Copy beyond MSRC, MSSRL or MCL).
    pub const COMMAND_SIZE_LIMIT_EXCEEDED: u8 = 0x83;
    /// Connect: Incompatible Format (fabrics).
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    /// Connect: Controller Busy (fabrics).
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    /// Connect: Invalid Parameters (fabrics).
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    /// Connect: Restart Discovery (fabrics).
    pub const CONNECT_RESTART_DISCOVERY: u8 = 0x83;
    /// Connect: Invalid Host (fabrics).
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    /// Invalid Queue Type (fabrics).
    pub const INVALID_QUEUE_TYPE: u8 = 0x85;
    /// Discover Restart (fabrics).
    pub const DISCOVER_RESTART: u8 = 0x90;
    /// Authentication Required (fabrics).
    pub const AUTHENTICATION_REQUIRED: u8 = 0x91;
}

/// Media and data integrity errors, SCT 2h (Figure 98).
pub mod media {
    /// Write Fault.
    pub const WRITE_FAULT: u8 = 0x80;
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    /// End-to-end Guard Check Error.
    pub const GUARD_CHECK_ERROR: u8 = 0x82;
    /// End-to-end Application Tag Check Error.
    pub const APP_TAG_CHECK_ERROR: u8 = 0x83;
    /// End-to-end Reference Tag Check Error.
    pub const REF_TAG_CHECK_ERROR: u8 = 0x84;
    /// Compare Failure.
    pub const COMPARE_FAILURE: u8 = 0x85;
    /// Access Denied.
    pub const ACCESS_DENIED: u8 = 0x86;
    /// Deallocated or Unwritten Logical Block.
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
}

/// Path related status codes, SCT 3h (NVMe base 2.0 Figure 103; Linux `NVME_SC_ANA_*`,
/// `NVME_SC_*_PATH_ERROR`).
pub mod path {
    /// Internal Path Error.
    pub const INTERNAL_PATH_ERROR: u8 = 0x00;
    /// Asymmetric Access Persistent Loss.
    pub const ANA_PERSISTENT_LOSS: u8 = 0x01;
    /// Asymmetric Access Inaccessible.
    pub const ANA_INACCESSIBLE: u8 = 0x02;
    /// Asymmetric Access Transition.
    pub const ANA_TRANSITION: u8 = 0x03;
    /// Controller Pathing Error.
    pub const CONTROLLER_PATHING_ERROR: u8 = 0x60;
    /// Host Pathing Error.
    pub const HOST_PATHING_ERROR: u8 = 0x70;
    /// Command Aborted By Host.
    pub const ABORTED_BY_HOST: u8 = 0x71;
}

/// The Status field of a completion (bits 15:1 of CQE DW3 bits 31:16; the phase tag is kept in
/// [`Cqe::phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Status {
    /// Status Code Type (3 bits).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Command Retry Delay (2 bits).
    pub crd: u8,
    /// More: more information in the Error Information log page.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    /// Successful Completion.
    pub const SUCCESS: Status = Status::generic(generic::SUCCESS);
    /// Invalid Command Opcode (DNR).
    pub const INVALID_OPCODE: Status = Status::generic(generic::INVALID_OPCODE).with_dnr();
    /// Invalid Field in Command (DNR).
    pub const INVALID_FIELD: Status = Status::generic(generic::INVALID_FIELD).with_dnr();
    /// Command ID Conflict (DNR).
    pub const COMMAND_ID_CONFLICT: Status =
        Status::generic(generic::COMMAND_ID_CONFLICT).with_dnr();
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(generic::DATA_TRANSFER_ERROR);
    /// Internal Error.
    pub const INTERNAL_ERROR: Status = Status::generic(generic::INTERNAL_ERROR);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::generic(generic::ABORT_REQUESTED);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::generic(generic::ABORTED_SQ_DELETION);
    /// Invalid Namespace or Format (DNR).
    pub const INVALID_NAMESPACE_OR_FORMAT: Status =
        Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT).with_dnr();
    /// Command Sequence Error (DNR).
    pub const COMMAND_SEQUENCE_ERROR: Status =
        Status::generic(generic::COMMAND_SEQUENCE_ERROR).with_dnr();
    /// Invalid SGL Segment Descriptor (DNR).
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: Status =
        Status::generic(generic::INVALID_SGL_SEGMENT_DESCRIPTOR).with_dnr();
    /// Data SGL Length Invalid (DNR).
    pub const DATA_SGL_LENGTH_INVALID: Status =
        Status::generic(generic::DATA_SGL_LENGTH_INVALID).with_dnr();
    /// SGL Descriptor Type Invalid (DNR).
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status =
        Status::generic(generic::SGL_DESCRIPTOR_TYPE_INVALID).with_dnr();
    /// PRP Offset Invalid (DNR).
    pub const INVALID_PRP_OFFSET: Status = Status::generic(generic::INVALID_PRP_OFFSET).with_dnr();
    /// SGL Offset Invalid (DNR).
    pub const SGL_OFFSET_INVALID: Status = Status::generic(generic::SGL_OFFSET_INVALID).with_dnr();
    /// Command Interrupted (retryable).
    pub const COMMAND_INTERRUPTED: Status = Status::generic(generic::COMMAND_INTERRUPTED);
    /// Keep Alive Timeout Invalid (DNR).
    pub const KEEP_ALIVE_TIMEOUT_INVALID: Status =
        Status::generic(generic::KEEP_ALIVE_TIMEOUT_INVALID).with_dnr();
    /// LBA Out of Range (DNR).
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(generic::LBA_OUT_OF_RANGE).with_dnr();
    /// Capacity Exceeded (DNR).
    pub const CAPACITY_EXCEEDED: Status = Status::generic(generic::CAPACITY_EXCEEDED).with_dnr();
    /// Namespace Not Ready (retryable).
    pub const NAMESPACE_NOT_READY: Status = Status::generic(generic::NAMESPACE_NOT_READY);
    /// Invalid Queue Identifier (DNR).
    pub const INVALID_QUEUE_IDENTIFIER: Status =
        Status::command_specific(command_specific::INVALID_QUEUE_IDENTIFIER).with_dnr();
    /// Invalid Queue Size (DNR).
    pub const INVALID_QUEUE_SIZE: Status =
        Status::command_specific(command_specific::INVALID_QUEUE_SIZE).with_dnr();
    /// Abort Command Limit Exceeded (DNR).
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: Status =
        Status::command_specific(command_specific::ABORT_COMMAND_LIMIT_EXCEEDED).with_dnr();
    /// Asynchronous Event Request Limit Exceeded (DNR).
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: Status =
        Status::command_specific(command_specific::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED).with_dnr();
    /// Invalid Log Page (DNR).
    pub const INVALID_LOG_PAGE: Status =
        Status::command_specific(command_specific::INVALID_LOG_PAGE).with_dnr();
    /// Feature Identifier Not Saveable (DNR).
    pub const FEATURE_NOT_SAVEABLE: Status =
        Status::command_specific(command_specific::FEATURE_NOT_SAVEABLE).with_dnr();
    /// Feature Not Changeable (DNR).
    pub const FEATURE_NOT_CHANGEABLE: Status =
        Status::command_specific(command_specific::FEATURE_NOT_CHANGEABLE).with_dnr();
    /// Controller List Invalid (DNR).
    pub const CONTROLLER_LIST_INVALID: Status =
        Status::command_specific(command_specific::CONTROLLER_LIST_INVALID).with_dnr();
    /// Command Size Limit Exceeded (DNR).
    pub const COMMAND_SIZE_LIMIT_EXCEEDED: Status =
        Status::command_specific(command_specific::COMMAND_SIZE_LIMIT_EXCEEDED).with_dnr();
    /// Connect Incompatible Format (DNR).
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status =
        Status::command_specific(command_specific::CONNECT_INCOMPATIBLE_FORMAT).with_dnr();
    /// Connect Controller Busy (retryable).
    pub const CONNECT_CONTROLLER_BUSY: Status =
        Status::command_specific(command_specific::CONNECT_CONTROLLER_BUSY);
    /// Connect Invalid Parameters (DNR).
    pub const CONNECT_INVALID_PARAMETERS: Status =
        Status::command_specific(command_specific::CONNECT_INVALID_PARAMETERS).with_dnr();
    /// Connect Restart Discovery (DNR).
    pub const CONNECT_RESTART_DISCOVERY: Status =
        Status::command_specific(command_specific::CONNECT_RESTART_DISCOVERY).with_dnr();
    /// Connect Invalid Host (DNR).
    pub const CONNECT_INVALID_HOST: Status =
        Status::command_specific(command_specific::CONNECT_INVALID_HOST).with_dnr();
    /// Invalid Queue Type (DNR).
    pub const INVALID_QUEUE_TYPE: Status =
        Status::command_specific(command_specific::INVALID_QUEUE_TYPE).with_dnr();
    /// Write Fault.
    pub const WRITE_FAULT: Status = Status::media(media::WRITE_FAULT);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(media::UNRECOVERED_READ_ERROR);
    /// Compare Failure (DNR).
    pub const COMPARE_FAILURE: Status = Status::media(media::COMPARE_FAILURE).with_dnr();
    /// Transient Transport Error (retryable).
    pub const TRANSIENT_TRANSPORT_ERROR: Status =
        Status::generic(generic::TRANSIENT_TRANSPORT_ERROR);
    /// Asymmetric Access Persistent Loss.
    pub const ANA_PERSISTENT_LOSS: Status = Status::new(sct::PATH, path::ANA_PERSISTENT_LOSS);
    /// Asymmetric Access Inaccessible.
    pub const ANA_INACCESSIBLE: Status = Status::new(sct::PATH, path::ANA_INACCESSIBLE);
    /// Asymmetric Access Transition.
    pub const ANA_TRANSITION: Status = Status::new(sct::PATH, path::ANA_TRANSITION);
    /// Controller Pathing Error with DNR: the controller lost its path to the data for good
    /// (a remote volume past its controller loss timeout).
    pub const CONTROLLER_PATHING_ERROR: Status =
        Status::new(sct::PATH, path::CONTROLLER_PATHING_ERROR).with_dnr();

    /// A status with the given type and code, DNR clear.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Self {
            sct: sct & 0x7,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// A generic command status.
    pub const fn generic(sc: u8) -> Self {
        Self::new(sct::GENERIC, sc)
    }

    /// A command specific status.
    pub const fn command_specific(sc: u8) -> Self {
        Self::new(sct::COMMAND_SPECIFIC, sc)
    }

    /// A media and data integrity status.
    pub const fn media(sc: u8) -> Self {
        Self::new(sct::MEDIA, sc)
    }

    /// The same status with Do Not Retry set.
    pub const fn with_dnr(mut self) -> Self {
        self.dnr = true;
        self
    }

    /// True for Successful Completion.
    pub const fn is_success(&self) -> bool {
        self.sct == sct::GENERIC && self.sc == generic::SUCCESS
    }

    /// True for a path related status (SCT 3h; Linux `nvme_is_path_error`).
    pub const fn is_path_error(&self) -> bool {
        self.sct == sct::PATH
    }

    /// True for the three ANA path statuses (persistent loss, inaccessible, transition;
    /// Linux `nvme_is_ana_error`).
    pub const fn is_ana_error(&self) -> bool {
        self.sct == sct::PATH
            && matches!(
                self.sc,
                path::ANA_PERSISTENT_LOSS | path::ANA_INACCESSIBLE | path::ANA_TRANSITION
            )
    }

    /// The 16-bit Status field including the phase tag in bit 0.
    pub const fn to_field(&self, phase: bool) -> u16 {
        (phase as u16)
            | ((self.sc as u16) << 1)
            | (((self.sct & 0x7) as u16) << 9)
            | (((self.crd & 0x3) as u16) << 12)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    /// Decodes the 16-bit Status field (the phase tag, bit 0, is ignored).
    pub const fn from_field(f: u16) -> Self {
        Self {
            sc: (f >> 1) as u8,
            sct: ((f >> 9) & 0x7) as u8,
            crd: ((f >> 12) & 0x3) as u8,
            more: f & (1 << 14) != 0,
            dnr: f & (1 << 15) != 0,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SCT {:#x} SC {:#04x}", self.sct, self.sc)?;
        if self.dnr {
            f.write_str(" DNR")?;
        }
        if self.more {
            f.write_str(" M")?;
        }
        Ok(())
    }
}

/// A 16-byte completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    /// Command specific DW0.
    pub dw0: u32,
    /// Command specific DW1.
    pub dw1: u32,
    /// SQ Head Pointer.
    pub sqhd: u16,
    /// SQ Identifier.
    pub sqid: u16,
    /// Command Identifier.
    pub cid: u16,
    /// Phase tag (memory-based transports; zero on fabrics).
    pub phase: bool,
    /// Status.
    pub status: Status,
}

impl Cqe {
    /// Size of a CQE in bytes.
    pub const SIZE: usize = 16;

    /// A completion for `cid` with `status` and zero DW0/DW1.
    pub const fn new(cid: u16, status: Status) -> Self {
        Self {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 0,
            cid,
            phase: false,
            status,
        }
    }

    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let sf = le::u16_at(b, 14);
        Self {
            dw0: le::u32_at(b, 0),
            dw1: le::u32_at(b, 4),
            sqhd: le::u16_at(b, 8),
            sqid: le::u16_at(b, 10),
            cid: le::u16_at(b, 12),
            phase: sf & 1 != 0,
            status: Status::from_field(sf),
        }
    }

    /// Encodes to 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        le::put_u32(&mut b, 0, self.dw0);
        le::put_u32(&mut b, 4, self.dw1);
        le::put_u16(&mut b, 8, self.sqhd);
        le::put_u16(&mut b, 10, self.sqid);
        le::put_u16(&mut b, 12, self.cid);
        le::put_u16(&mut b, 14, self.status.to_field(self.phase));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn status_field_bits() {
        // LBA Out of Range with DNR: SC 80h at bits 8:1, SCT 0, DNR bit 15.
        assert_eq!(Status::LBA_OUT_OF_RANGE.to_field(false), 0x8100);
        // Connect Invalid Host: SCT 1 (bit 9), SC 84h, DNR.
        assert_eq!(Status::CONNECT_INVALID_HOST.to_field(true), 0x8309);
        // Compare Failure: SCT 2, SC 85h.
        assert_eq!(Status::COMPARE_FAILURE.to_field(false), 0x850a);
        // Command Size Limit Exceeded: SCT 1, SC 83h, DNR (Linux NVME_SC_CMD_SIZE_LIMIT_EXCEEDED
        // 0x183 with NVME_SC_DNR 0x4000, shifted left by the phase bit).
        assert_eq!(
            Status::COMMAND_SIZE_LIMIT_EXCEEDED.to_field(false),
            ((0x183u16 | 0x4000) << 1)
        );
        assert_eq!(Status::SUCCESS.to_field(true), 1);
        // Path statuses as Linux spells them with the status shifted out of the phase bit:
        // NVME_SC_ANA_INACCESSIBLE 0x302, NVME_SC_CTRL_PATH_ERROR 0x360 (+ DNR 0x4000).
        assert_eq!(Status::ANA_INACCESSIBLE.to_field(false) >> 1, 0x302);
        assert_eq!(Status::ANA_TRANSITION.to_field(false) >> 1, 0x303);
        assert_eq!(
            Status::CONTROLLER_PATHING_ERROR.to_field(false) >> 1,
            0x4360
        );
        assert!(Status::ANA_PERSISTENT_LOSS.is_ana_error());
        assert!(Status::CONTROLLER_PATHING_ERROR.is_path_error());
        assert!(!Status::CONTROLLER_PATHING_ERROR.is_ana_error());
        assert!(!Status::INTERNAL_ERROR.is_path_error());
        assert!(Status::SUCCESS.is_success());
        assert!(!Status::INVALID_FIELD.is_success());
    }

    #[test]
    fn cqe_bytes() {
        let c = Cqe {
            dw0: 0x0001,
            dw1: 0,
            sqhd: 3,
            sqid: 0,
            cid: 0x1234,
            phase: false,
            status: Status::SUCCESS,
        };
        assert_eq!(
            c.to_bytes(),
            [1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0x34, 0x12, 0, 0]
        );
        let d = Cqe {
            status: Status::INVALID_OPCODE,
            phase: true,
            ..c
        };
        let b = d.to_bytes();
        assert_eq!(&b[14..], &[0x03, 0x80]);
        assert_eq!(Cqe::from_bytes(&b), d);
    }

    #[test]
    fn display() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(Status::INVALID_FIELD.to_string(), "SCT 0x0 SC 0x02 DNR");
    }

    proptest! {
        #[test]
        fn cqe_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes);
            prop_assert_eq!(Cqe::from_bytes(&a).to_bytes(), a);
        }
    }
}
