//! Known-answer tests for every wire structure keel-nvme defines.
//!
//! The expected bytes are written out by hand, field by field, from the figures of NVMe Base
//! 2.0, NVM Command Set 1.0 and NVMe-oF 1.1 and cross-checked against the field offsets of
//! Linux `include/linux/nvme.h` (and, where the kernel header lags the spec, nvme-cli's
//! libnvme `src/nvme/types.h`). Each test names the figure and the Linux struct. No expected
//! value is produced by this crate's encoders: the firmware and keelctl share these encoders,
//! so a round trip through them proves nothing about what a foreign peer reads.
//!
//! Every structure is checked both ways: encode → exactly these bytes (all of them, so a
//! field written at the wrong offset also shows up as a stray byte elsewhere), and decode of
//! the hand-written bytes → the right field values.

use keel_nvme::cqe::{command_specific, generic, media, sct};
use keel_nvme::fabrics::{
    self, CATTR_DISABLE_SQ_FLOW_CONTROL, CNTLID_ANY_STATIC, CNTLID_DYNAMIC, CNTLID_MAX,
    ConnectCommand, ConnectData, PropertyCommand, PropertySize, connect_data_field, connect_field,
};
use keel_nvme::identify::{
    self, Cmic, Ctratt, IDENTIFY_LEN, IdentifyCommand, IdentifyController, IdentifyNamespace,
    IdentifyNsIndependent, LbaFormat, Lpa, NsIdentifiers, Oacs, Ocfs, Oncs, Vwc, cns, cntrltype,
    nidt,
};
use keel_nvme::io::{
    AbortCommand, DsmCommand, DsmRange, FeaturesCommand, RwCommand, number_of_queues,
};
use keel_nvme::log::{self, Effects, ErrorLogEntry, GetLogPageCommand, SmartLog, discovery};
use keel_nvme::opcode::{FABRICS_OPCODE, async_event};
use keel_nvme::regs::{Cap, Cc, Csts, Vs, offset};
use keel_nvme::sqe::{Psdt, sgl_subtype, sgl_type};
use keel_nvme::{
    AdminOpcode, Cqe, FabricsType, FeatureId, IoOpcode, LogPageId, SglDescriptor, Sqe, Status,
};

/// Puts `bytes` at `off` of the expected image (values are written as little-endian byte
/// literals at the offsets the figures give).
fn at(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// An SQE image with the given fields.
fn sqe_image(fields: &[(usize, &[u8])]) -> [u8; 64] {
    let mut b = [0u8; 64];
    for (off, v) in fields {
        at(&mut b, *off, v);
    }
    b
}

// ---------------------------------------------------------------------------------------
// Submission and completion queue entries
// ---------------------------------------------------------------------------------------

#[test]
fn sqe_common_command_format() {
    // NVMe base 2.0 §4.2 Common Command Format figure; Linux struct nvme_common_command:
    // opcode 0, flags 1 (FUSE bits 1:0, PSDT bits 7:6), command_id 3:2, nsid 7:4, cdw2 11:8,
    // cdw3 15:12, metadata 23:16, dptr 39:24 (prp1 31:24, prp2 39:32), cdw10..cdw15 63:40.
    let want = sqe_image(&[
        (0, &[0x02, 0x01, 0xEF, 0xBE]), // Read, FUSE 01b (first of a fused pair), CID BEEFh
        (4, &[0x44, 0x33, 0x22, 0x11]),
        (8, &[0x88, 0x77, 0x66, 0x55]),
        (12, &[0xCC, 0xBB, 0xAA, 0x99]),
        (16, &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]),
        (24, &[0x00, 0x10, 0x32, 0x54, 0x76, 0x98, 0x00, 0x00]),
        (32, &[0x00, 0x20, 0x32, 0x54, 0x76, 0x98, 0x00, 0x00]),
        (40, &[0xA0, 0xA1, 0xA2, 0xA3]),
        (44, &[0xB0, 0xB1, 0xB2, 0xB3]),
        (48, &[0xC0, 0xC1, 0xC2, 0xC3]),
        (52, &[0xD0, 0xD1, 0xD2, 0xD3]),
        (56, &[0xE0, 0xE1, 0xE2, 0xE3]),
        (60, &[0xF0, 0xF1, 0xF2, 0xF3]),
    ]);
    let mut s = Sqe::new(0x02, 0xBEEF)
        .with_nsid(0x1122_3344)
        .with_prps(0x9876_5432_1000, 0x9876_5432_2000)
        .with_cdw(10, 0xA3A2_A1A0)
        .with_cdw(11, 0xB3B2_B1B0)
        .with_cdw(12, 0xC3C2_C1C0)
        .with_cdw(13, 0xD3D2_D1D0)
        .with_cdw(14, 0xE3E2_E1E0)
        .with_cdw(15, 0xF3F2_F1F0);
    s.flags |= 0x01;
    s.cdw2 = 0x5566_7788;
    s.cdw3 = 0x99AA_BBCC;
    s.mptr = 0x0102_0304_0506_0708;
    assert_eq!(s.to_bytes(), want);

    let d = Sqe::from_bytes(&want);
    assert_eq!(d, s);
    assert_eq!((d.opcode, d.cid, d.nsid), (0x02, 0xBEEF, 0x1122_3344));
    assert_eq!((d.fuse(), d.psdt()), (1, Psdt::Prp));
    assert_eq!((d.prp1(), d.prp2()), (0x9876_5432_1000, 0x9876_5432_2000));
    assert_eq!((d.cdw(10), d.cdw(15)), (0xA3A2_A1A0, 0xF3F2_F1F0));

    // PSDT (CDW0 bits 15:14 = byte 1 bits 7:6): 01b SGL with contiguous metadata buffer
    // (Linux NVME_CMD_SGL_METABUF = 40h), 10b SGL metadata segment (NVME_CMD_SGL_METASEG).
    let f = |b1: u8| Sqe::from_bytes(&sqe_image(&[(1, &[b1])]));
    assert_eq!(f(0x40).psdt(), Psdt::SglContiguousMetadata);
    assert_eq!(f(0x80).psdt(), Psdt::SglMetadataSegment);
    assert_eq!(f(0xC2).psdt(), Psdt::Reserved);
    assert_eq!(f(0xC2).fuse(), 2);
    let mut p = f(0x02);
    p.set_psdt(Psdt::SglContiguousMetadata);
    assert_eq!(p.to_bytes()[1], 0x42, "PSDT set, FUSE kept");
}

#[test]
fn sgl_descriptors() {
    // NVMe base 2.0 §4.1.2 SGL descriptor figures; Linux struct nvme_sgl_desc (addr 7:0,
    // length 11:8, rsvd 14:12, type 15) and struct nvme_keyed_sgl_desc (length 10:8, key
    // 14:11). Identifier byte 15: type bits 7:4, subtype bits 3:0.
    // In-capsule data (NVMe-oF): Data Block (0h) / Offset (1h), offset 10h, 400h bytes.
    let b = [
        0x10, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0x01,
    ];
    let d = SglDescriptor::in_capsule(0x10, 0x400);
    assert_eq!(d.to_bytes(), b);
    assert_eq!(SglDescriptor::from_bytes(&b), d);
    // NVMe/TCP: Transport SGL Data Block (5h) / Transport Specific (Ah), 2000h bytes.
    let transport = [
        0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0x5A,
    ];
    let d = SglDescriptor::transport(0x2000);
    assert_eq!(d.to_bytes(), transport);
    assert_eq!(SglDescriptor::from_bytes(&transport), d);
    // Keyed Data Block (4h) / Address (0h): 24-bit length, 32-bit key.
    let b = [
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xEF, 0xCD, 0xAB, 0xEF, 0xBE, 0xAD, 0xDE,
        0x40,
    ];
    let d = SglDescriptor {
        address: 0x1122_3344_5566_7788,
        length: 0x00AB_CDEF,
        key: 0xDEAD_BEEF,
        desc_type: sgl_type::KEYED_DATA_BLOCK,
        subtype: sgl_subtype::ADDRESS,
    };
    assert_eq!(d.to_bytes(), b);
    assert_eq!(SglDescriptor::from_bytes(&b), d);
    // Type and subtype codes: Linux NVME_SGL_FMT_* / NVME_KEY_SGL_FMT_DATA_DESC /
    // NVME_TRANSPORT_SGL_DATA_DESC.
    assert_eq!(
        (
            sgl_type::DATA_BLOCK,
            sgl_type::BIT_BUCKET,
            sgl_type::SEGMENT,
            sgl_type::LAST_SEGMENT,
            sgl_type::KEYED_DATA_BLOCK,
            sgl_type::TRANSPORT_DATA_BLOCK
        ),
        (0, 1, 2, 3, 4, 5)
    );
    assert_eq!(
        (
            sgl_subtype::ADDRESS,
            sgl_subtype::OFFSET,
            sgl_subtype::TRANSPORT_SPECIFIC
        ),
        (0x0, 0x1, 0xA)
    );
    // with_sgl puts SGL1 at bytes 39:24 and sets PSDT 01b.
    let s = Sqe::new(0x01, 1).with_sgl(SglDescriptor::transport(0x2000));
    let img = s.to_bytes();
    assert_eq!(img[1], 0x40);
    assert_eq!(&img[24..40], &transport);
}

#[test]
fn cqe_and_status_field() {
    // NVMe base 2.0 §4.2.3 Completion Queue Entry figure; Linux struct nvme_completion:
    // result (DW0 3:0, DW1 7:4), sq_head 9:8, sq_id 11:10, command_id 13:12, status 15:14.
    // Status field figure: P bit 0, SC bits 8:1, SCT bits 11:9, CRD bits 13:12, M bit 14,
    // DNR bit 15.
    // Compare Failure (SCT 2h, SC 85h), DNR, phase 1:
    //   1 | 85h << 1 | 2 << 9 | 1 << 15 = 0001h + 010Ah + 0400h + 8000h = 850Bh.
    let b = [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0B,
        0x85,
    ];
    let c = Cqe {
        dw0: 0x0403_0201,
        dw1: 0x0807_0605,
        sqhd: 0x0A09,
        sqid: 0x0C0B,
        cid: 0x0E0D,
        phase: true,
        status: Status::COMPARE_FAILURE,
    };
    assert_eq!(c.to_bytes(), b);
    assert_eq!(Cqe::from_bytes(&b), c);

    // Connect Invalid Host (SCT 1h, SC 84h), CRD 10b, More, no DNR, phase 0:
    //   84h << 1 | 1 << 9 | 2 << 12 | 1 << 14 = 0108h + 0200h + 2000h + 4000h = 6308h.
    let st = Status {
        sct: sct::COMMAND_SPECIFIC,
        sc: command_specific::CONNECT_INVALID_HOST,
        crd: 2,
        more: true,
        dnr: false,
    };
    assert_eq!(st.to_field(false), 0x6308);
    assert_eq!(Status::from_field(0x6308), st);
    assert_eq!(
        Status::from_field(0x6309),
        st,
        "the phase tag is not status"
    );
    let b = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, 0x00, 0x08, 0x63];
    let d = Cqe::from_bytes(&b);
    assert_eq!((d.cid, d.phase, d.status), (7, false, st));

    // Every named status against Linux's NVME_SC_* codes (SCT << 8 | SC of the status field
    // shifted right by one) and its DNR bit.
    let named: &[(Status, u16, bool)] = &[
        (Status::SUCCESS, 0x000, false),
        (Status::INVALID_OPCODE, 0x001, true),
        (Status::INVALID_FIELD, 0x002, true),
        (Status::COMMAND_ID_CONFLICT, 0x003, true),
        (Status::DATA_TRANSFER_ERROR, 0x004, false),
        (Status::INTERNAL_ERROR, 0x006, false),
        (Status::ABORT_REQUESTED, 0x007, false),
        (Status::ABORTED_SQ_DELETION, 0x008, false),
        (Status::INVALID_NAMESPACE_OR_FORMAT, 0x00B, true),
        (Status::COMMAND_SEQUENCE_ERROR, 0x00C, true),
        (Status::INVALID_SGL_SEGMENT_DESCRIPTOR, 0x00D, true),
        (Status::DATA_SGL_LENGTH_INVALID, 0x00F, true),
        (Status::SGL_DESCRIPTOR_TYPE_INVALID, 0x011, true),
        (Status::INVALID_PRP_OFFSET, 0x013, true),
        (Status::KEEP_ALIVE_TIMEOUT_INVALID, 0x01A, true),
        (Status::COMMAND_INTERRUPTED, 0x021, false),
        (Status::LBA_OUT_OF_RANGE, 0x080, true),
        (Status::CAPACITY_EXCEEDED, 0x081, true),
        (Status::NAMESPACE_NOT_READY, 0x082, false),
        (Status::INVALID_QUEUE_IDENTIFIER, 0x101, true),
        (Status::INVALID_QUEUE_SIZE, 0x102, true),
        (Status::ABORT_COMMAND_LIMIT_EXCEEDED, 0x103, true),
        (Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, 0x105, true),
        (Status::INVALID_LOG_PAGE, 0x109, true),
        (Status::FEATURE_NOT_SAVEABLE, 0x10D, true),
        (Status::FEATURE_NOT_CHANGEABLE, 0x10E, true),
        (Status::CONTROLLER_LIST_INVALID, 0x11C, true),
        (Status::CONNECT_INCOMPATIBLE_FORMAT, 0x180, true),
        (Status::CONNECT_CONTROLLER_BUSY, 0x181, false),
        (Status::CONNECT_INVALID_PARAMETERS, 0x182, true),
        (Status::CONNECT_RESTART_DISCOVERY, 0x183, true),
        (Status::CONNECT_INVALID_HOST, 0x184, true),
        (Status::INVALID_QUEUE_TYPE, 0x185, true), // SPDK NVMF_FABRIC_SC_INVALID_QUEUE_TYPE
        (Status::WRITE_FAULT, 0x280, false),
        (Status::UNRECOVERED_READ_ERROR, 0x281, false),
        (Status::COMPARE_FAILURE, 0x285, true),
    ];
    for &(st, linux, dnr) in named {
        let field = st.to_field(false);
        assert_eq!((field >> 1) & 0x7FF, linux, "{st}");
        assert_eq!(field & 0x8000 != 0, dnr, "{st}");
        assert_eq!(field & 0x7001, 0, "{st}: CRD, M and P clear");
    }
    // The remaining status code constants (Linux NVME_SC_* low byte).
    let codes: &[(u8, u8)] = &[
        (generic::POWER_LOSS_ABORT, 0x05),
        (generic::ABORTED_FAILED_FUSED, 0x09),
        (generic::ABORTED_MISSING_FUSED, 0x0A),
        (generic::INVALID_NUMBER_OF_SGL_DESCRIPTORS, 0x0E),
        (generic::METADATA_SGL_LENGTH_INVALID, 0x10),
        (generic::INVALID_USE_OF_CMB, 0x12),
        (generic::ATOMIC_WRITE_UNIT_EXCEEDED, 0x14),
        (generic::OPERATION_DENIED, 0x15),
        (generic::SGL_OFFSET_INVALID, 0x16),
        (generic::HOST_ID_INCONSISTENT_FORMAT, 0x18),
        (generic::KEEP_ALIVE_TIMER_EXPIRED, 0x19),
        (generic::ABORTED_PREEMPT, 0x1B),
        (generic::SANITIZE_FAILED, 0x1C),
        (generic::SANITIZE_IN_PROGRESS, 0x1D),
        (generic::SGL_DATA_BLOCK_GRANULARITY_INVALID, 0x1E),
        (generic::NOT_SUPPORTED_FOR_CMB_QUEUE, 0x1F),
        (generic::NAMESPACE_WRITE_PROTECTED, 0x20),
        (generic::TRANSIENT_TRANSPORT_ERROR, 0x22),
        (generic::RESERVATION_CONFLICT, 0x83),
        (generic::FORMAT_IN_PROGRESS, 0x84),
        (command_specific::COMPLETION_QUEUE_INVALID, 0x00),
        (command_specific::INVALID_FIRMWARE_SLOT, 0x06),
        (command_specific::INVALID_FIRMWARE_IMAGE, 0x07),
        (command_specific::INVALID_INTERRUPT_VECTOR, 0x08),
        (command_specific::INVALID_FORMAT, 0x0A),
        (command_specific::INVALID_QUEUE_DELETION, 0x0C),
        (command_specific::FEATURE_NOT_NAMESPACE_SPECIFIC, 0x0F),
        (command_specific::NAMESPACE_INSUFFICIENT_CAPACITY, 0x15),
        (command_specific::NAMESPACE_ID_UNAVAILABLE, 0x16),
        (command_specific::NAMESPACE_ALREADY_ATTACHED, 0x18),
        (command_specific::NAMESPACE_IS_PRIVATE, 0x19),
        (command_specific::NAMESPACE_NOT_ATTACHED, 0x1A),
        (command_specific::THIN_PROVISIONING_NOT_SUPPORTED, 0x1B),
        (command_specific::CONFLICTING_ATTRIBUTES, 0x80),
        (command_specific::INVALID_PROTECTION_INFORMATION, 0x81),
        (command_specific::WRITE_TO_READ_ONLY_RANGE, 0x82),
        (command_specific::DISCOVER_RESTART, 0x90),
        (command_specific::AUTHENTICATION_REQUIRED, 0x91),
        (media::GUARD_CHECK_ERROR, 0x82),
        (media::APP_TAG_CHECK_ERROR, 0x83),
        (media::REF_TAG_CHECK_ERROR, 0x84),
        (media::ACCESS_DENIED, 0x86),
        (media::DEALLOCATED_OR_UNWRITTEN, 0x87),
    ];
    for &(ours, spec) in codes {
        assert_eq!(ours, spec);
    }
    assert_eq!(
        (
            sct::GENERIC,
            sct::COMMAND_SPECIFIC,
            sct::MEDIA,
            sct::PATH,
            sct::VENDOR
        ),
        (0, 1, 2, 3, 7)
    );
}

// ---------------------------------------------------------------------------------------
// Opcodes and identifiers
// ---------------------------------------------------------------------------------------

#[test]
fn opcodes_and_identifiers() {
    // Admin opcodes: NVMe base 2.0 Admin Command Set opcodes figure; Linux enum
    // nvme_admin_opcode.
    let admin = [
        (AdminOpcode::DeleteIoSq, 0x00),
        (AdminOpcode::CreateIoSq, 0x01),
        (AdminOpcode::GetLogPage, 0x02),
        (AdminOpcode::DeleteIoCq, 0x04),
        (AdminOpcode::CreateIoCq, 0x05),
        (AdminOpcode::Identify, 0x06),
        (AdminOpcode::Abort, 0x08),
        (AdminOpcode::SetFeatures, 0x09),
        (AdminOpcode::GetFeatures, 0x0A),
        (AdminOpcode::AsyncEventRequest, 0x0C),
        (AdminOpcode::NamespaceManagement, 0x0D),
        (AdminOpcode::FirmwareCommit, 0x10),
        (AdminOpcode::FirmwareImageDownload, 0x11),
        (AdminOpcode::DeviceSelfTest, 0x14),
        (AdminOpcode::NamespaceAttachment, 0x15),
        (AdminOpcode::KeepAlive, 0x18),
        (AdminOpcode::DirectiveSend, 0x19),
        (AdminOpcode::DirectiveReceive, 0x1A),
        (AdminOpcode::VirtualizationManagement, 0x1C),
        (AdminOpcode::NvmeMiSend, 0x1D),
        (AdminOpcode::NvmeMiReceive, 0x1E),
        (AdminOpcode::DoorbellBufferConfig, 0x7C),
        (AdminOpcode::Fabrics, 0x7F),
        (AdminOpcode::FormatNvm, 0x80),
        (AdminOpcode::SecuritySend, 0x81),
        (AdminOpcode::SecurityReceive, 0x82),
        (AdminOpcode::Sanitize, 0x84),
        (AdminOpcode::GetLbaStatus, 0x86),
    ];
    for (o, v) in admin {
        assert_eq!(o as u8, v, "{o:?}");
        assert_eq!(AdminOpcode::from_u8(v), Some(o));
    }
    // NVM command set I/O opcodes: NVM Command Set 1.0 opcodes figure; Linux enum nvme_opcode
    // (Copy 19h from the NVM Command Set 1.0 figure).
    let io = [
        (IoOpcode::Flush, 0x00),
        (IoOpcode::Write, 0x01),
        (IoOpcode::Read, 0x02),
        (IoOpcode::WriteUncorrectable, 0x04),
        (IoOpcode::Compare, 0x05),
        (IoOpcode::WriteZeroes, 0x08),
        (IoOpcode::DatasetManagement, 0x09),
        (IoOpcode::Verify, 0x0C),
        (IoOpcode::ReservationRegister, 0x0D),
        (IoOpcode::ReservationReport, 0x0E),
        (IoOpcode::ReservationAcquire, 0x11),
        (IoOpcode::ReservationRelease, 0x15),
        (IoOpcode::Copy, 0x19),
        (IoOpcode::Fabrics, 0x7F),
    ];
    for (o, v) in io {
        assert_eq!(o as u8, v, "{o:?}");
        assert_eq!(IoOpcode::from_u8(v), Some(o));
    }
    // Fabrics command types (FCTYPE): NVMe-oF 1.1 Fabrics Command Type figure; Linux enum
    // nvmf_capsule_command (Disconnect 08h from the NVMe-oF figure).
    assert_eq!(FABRICS_OPCODE, 0x7F);
    let fct = [
        (FabricsType::PropertySet, 0x00),
        (FabricsType::Connect, 0x01),
        (FabricsType::PropertyGet, 0x04),
        (FabricsType::AuthenticationSend, 0x05),
        (FabricsType::AuthenticationReceive, 0x06),
        (FabricsType::Disconnect, 0x08),
    ];
    for (o, v) in fct {
        assert_eq!(o as u8, v, "{o:?}");
    }
    // Feature identifiers: NVMe base 2.0 Feature Identifiers figure; Linux NVME_FEAT_*.
    let fid = [
        (FeatureId::Arbitration, 0x01),
        (FeatureId::PowerManagement, 0x02),
        (FeatureId::LbaRangeType, 0x03),
        (FeatureId::TemperatureThreshold, 0x04),
        (FeatureId::ErrorRecovery, 0x05),
        (FeatureId::VolatileWriteCache, 0x06),
        (FeatureId::NumberOfQueues, 0x07),
        (FeatureId::InterruptCoalescing, 0x08),
        (FeatureId::InterruptVectorConfig, 0x09),
        (FeatureId::WriteAtomicity, 0x0A),
        (FeatureId::AsyncEventConfig, 0x0B),
        (FeatureId::AutonomousPowerState, 0x0C),
        (FeatureId::HostMemoryBuffer, 0x0D),
        (FeatureId::Timestamp, 0x0E),
        (FeatureId::KeepAliveTimer, 0x0F),
        (FeatureId::HostThermalManagement, 0x10),
        (FeatureId::HostIdentifier, 0x81),
        (FeatureId::ReservationNotificationMask, 0x82),
        (FeatureId::ReservationPersistence, 0x83),
    ];
    for (o, v) in fid {
        assert_eq!(o as u8, v, "{o:?}");
    }
    // Log page identifiers: NVMe base 2.0 Log Page Identifiers figure; Linux NVME_LOG_*.
    let lid = [
        (LogPageId::SupportedLogPages, 0x00),
        (LogPageId::ErrorInformation, 0x01),
        (LogPageId::SmartHealth, 0x02),
        (LogPageId::FirmwareSlot, 0x03),
        (LogPageId::ChangedNamespaceList, 0x04),
        (LogPageId::CommandsSupportedAndEffects, 0x05),
        (LogPageId::DeviceSelfTest, 0x06),
        (LogPageId::TelemetryHost, 0x07),
        (LogPageId::Discovery, 0x70),
    ];
    for (o, v) in lid {
        assert_eq!(o as u8, v, "{o:?}");
    }
    // CNS values (Linux NVME_ID_CNS_*), controller types (enum nvme_ctrl_type), Namespace
    // Identifier Types (NVME_NIDT_*), ONCS bits (NVME_CTRL_ONCS_*).
    assert_eq!(
        (
            cns::NAMESPACE,
            cns::CONTROLLER,
            cns::ACTIVE_NS_LIST,
            cns::NS_DESCRIPTOR_LIST
        ),
        (0x00, 0x01, 0x02, 0x03)
    );
    assert_eq!(
        (cntrltype::IO, cntrltype::DISCOVERY, cntrltype::ADMIN),
        (1, 2, 3)
    );
    assert_eq!(
        (nidt::EUI64, nidt::NGUID, nidt::UUID, nidt::CSI),
        (1, 2, 3, 4)
    );
    assert_eq!(
        (
            Oncs::COMPARE.bits(),
            Oncs::WRITE_UNCORRECTABLE.bits(),
            Oncs::DSM.bits(),
            Oncs::WRITE_ZEROES.bits(),
            Oncs::SAVE_SELECT.bits()
        ),
        (0x01, 0x02, 0x04, 0x08, 0x10)
    );
    assert_eq!(
        keel_nvme::DISCOVERY_NQN,
        "nqn.2014-08.org.nvmexpress.discovery"
    );
    assert_eq!(
        (keel_nvme::NQN_FIELD_LEN, keel_nvme::NQN_MAX_LEN),
        (256, 223)
    );
}

// ---------------------------------------------------------------------------------------
// Identify
// ---------------------------------------------------------------------------------------

#[test]
fn identify_command() {
    // NVMe base 2.0 Identify command Dword 10/11 figures; Linux struct nvme_identify: cns
    // byte 40, ctrlid 43:42, cnssid 45:44, csi byte 47.
    let want = sqe_image(&[
        (0, &[0x06, 0x00, 0x34, 0x12]),
        (4, &[0x05, 0x00, 0x00, 0x00]),
        (40, &[0x03, 0x00, 0xCD, 0xAB]),
        (44, &[0x00, 0x00, 0x00, 0x02]),
    ]);
    let c = IdentifyCommand {
        cns: cns::NS_DESCRIPTOR_LIST,
        cntid: 0xABCD,
        csi: 0x02,
        nsid: 5,
    };
    assert_eq!(c.to_sqe(0x1234).to_bytes(), want);
    assert_eq!(IdentifyCommand::from_sqe(&Sqe::from_bytes(&want)), c);
}

/// The Identify Controller image every field of [`IdentifyController`] is checked against.
fn identify_controller_image() -> [u8; IDENTIFY_LEN] {
    // NVMe base 2.0 Identify Controller Data Structure figure; Linux struct nvme_id_ctrl
    // (field: byte offset).
    let mut b = [0u8; IDENTIFY_LEN];
    at(&mut b, 0, &[0x36, 0x1B]); // vid: 0
    at(&mut b, 2, &[0xF4, 0x1A]); // ssvid: 2
    at(&mut b, 4, b"KEEL525400123456    "); // sn[20]: 4, ASCII, space padded
    at(&mut b, 24, b"Keel NVMe/TCP target                    "); // mn[40]: 24
    at(&mut b, 64, b"0.1.0   "); // fr[8]: 64
    at(&mut b, 72, &[0x06]); // rab: 72
    at(&mut b, 73, &[0xA1, 0xA2, 0xA3]); // ieee[3]: 73
    at(&mut b, 76, &[0x03]); // cmic: 76
    at(&mut b, 77, &[0x05]); // mdts: 77
    at(&mut b, 78, &[0x02, 0x01]); // cntlid: 78
    at(&mut b, 80, &[0x00, 0x04, 0x01, 0x00]); // ver: 80 (1.4.0)
    at(&mut b, 92, &[0x00, 0x01, 0x00, 0x80]); // oaes: 92 (bits 8 and 31)
    at(&mut b, 96, &[0x41, 0x00, 0x00, 0x00]); // ctratt: 96 (bits 0 and 6)
    at(&mut b, 111, &[0x01]); // cntrltype: 111
    at(&mut b, 256, &[0x04, 0x03]); // oacs: 256
    at(&mut b, 258, &[0x03]); // acl: 258
    at(&mut b, 259, &[0x07]); // aerl: 259
    at(&mut b, 260, &[0x03]); // frmw: 260
    at(&mut b, 261, &[0x06]); // lpa: 261
    at(&mut b, 262, &[0x3F]); // elpe: 262
    at(&mut b, 263, &[0x02]); // npss: 263
    at(&mut b, 320, &[0x23, 0x01]); // kas: 320
    at(&mut b, 512, &[0x66]); // sqes: 512
    at(&mut b, 513, &[0x44]); // cqes: 513
    at(&mut b, 514, &[0x80, 0x01]); // maxcmd: 514
    at(&mut b, 516, &[0x04, 0x03, 0x02, 0x01]); // nn: 516
    at(&mut b, 520, &[0x0D, 0x01]); // oncs: 520
    at(&mut b, 522, &[0x01, 0x02]); // fuses: 522
    at(&mut b, 524, &[0x04]); // fna: 524
    at(&mut b, 525, &[0x05]); // vwc: 525
    at(&mut b, 526, &[0x0B, 0x0A]); // awun: 526
    at(&mut b, 528, &[0x0D, 0x0C]); // awupf: 528
    at(&mut b, 534, &[0x01, 0x00]); // ocfs: 534 (Copy source range format 0h)
    at(&mut b, 536, &[0x05, 0x00, 0x10, 0x00]); // sgls: 536
    at(&mut b, 768, b"nqn.2026-11.dev.keel:default"); // subnqn[256]: 768, NUL padded
    at(&mut b, 1792, &[0x04, 0x01, 0x00, 0x00]); // ioccsz: 1792
    at(&mut b, 1796, &[0x01, 0x00, 0x00, 0x00]); // iorcsz: 1796
    at(&mut b, 1800, &[0x08, 0x07]); // icdoff: 1800
    at(&mut b, 1802, &[0x01]); // ctrattr (spec: FCATT): 1802
    at(&mut b, 1803, &[0x09]); // msdbd: 1803
    b
}

fn identify_controller_value() -> IdentifyController {
    IdentifyController {
        vid: 0x1B36,
        ssvid: 0x1AF4,
        sn: identify::ascii_field("KEEL525400123456"),
        mn: identify::ascii_field("Keel NVMe/TCP target"),
        fr: identify::ascii_field("0.1.0"),
        rab: 6,
        ieee: [0xA1, 0xA2, 0xA3],
        cmic: Cmic::from_bits_retain(0x03),
        mdts: 5,
        cntlid: 0x0102,
        ver: 0x0001_0400,
        oaes: 0x8000_0100,
        ctratt: Ctratt::from_bits_retain(0x41),
        cntrltype: cntrltype::IO,
        oacs: Oacs::from_bits_retain(0x0304),
        acl: 3,
        aerl: 7,
        frmw: 0x03,
        lpa: Lpa::from_bits_retain(0x06),
        elpe: 0x3F,
        npss: 2,
        kas: 0x0123,
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: 0x0180,
        nn: 0x0102_0304,
        oncs: Oncs::from_bits_retain(0x010D),
        fuses: 0x0201,
        fna: 0x04,
        vwc: Vwc::from_bits_retain(0x05),
        awun: 0x0A0B,
        awupf: 0x0C0D,
        ocfs: Ocfs::from_bits_retain(1),
        sgls: 0x0010_0005,
        subnqn: identify::nqn_field("nqn.2026-11.dev.keel:default"),
        ioccsz: 0x104,
        iorcsz: 1,
        icdoff: 0x0708,
        fcatt: 1,
        msdbd: 9,
        // ANA fields (keel-remote): zero here, as in the image.
        anatt: 0,
        anacap: 0,
        anagrpmax: 0,
        nanagrpid: 0,
    }
}

#[test]
fn identify_controller() {
    let want = identify_controller_image();
    let v = identify_controller_value();
    let mut got = [0xEEu8; IDENTIFY_LEN];
    v.encode(&mut got);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "Identify Controller byte {i}");
    }
    assert_eq!(IdentifyController::decode(&want), v);
    // The string helpers: SN/MN/FR space padded, NQN NUL padded and always terminated.
    assert_eq!(&identify::ascii_field::<8>("0.1.0"), b"0.1.0   ");
    assert_eq!(&identify::ascii_field::<4>("toolong"), b"tool");
    let long = "n".repeat(300);
    let f = identify::nqn_field(&long);
    assert_eq!((f[254], f[255]), (b'n', 0));
}

#[test]
fn identify_namespace() {
    // NVM Command Set 1.0 Identify Namespace Data Structure figure; Linux struct nvme_id_ns:
    // nsze 0, ncap 8, nuse 16, nsfeat 24, nlbaf 25, flbas 26, nmic 30, dlfeat 33, mssrl
    // 75:74, mcl 79:76, msrc 80 (NVM Command Set 2.0 Copy limits), nguid 104, eui64 120,
    // lbaf[] 128 (struct nvme_lbaf: ms 1:0, ds 2, rp 3 bits 1:0).
    let mut want = [0u8; IDENTIFY_LEN];
    at(
        &mut want,
        0,
        &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01],
    );
    at(
        &mut want,
        8,
        &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11],
    );
    at(
        &mut want,
        16,
        &[0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21],
    );
    at(&mut want, 24, &[0x01, 0x01, 0x01]); // NSFEAT, NLBAF (0's based: 2 formats), FLBAS
    at(&mut want, 30, &[0x01]); // NMIC: may be shared
    at(&mut want, 33, &[0x09]); // DLFEAT: reads zeroes, Write Zeroes may deallocate
    at(&mut want, 74, &[0xFF, 0x7F]); // MSSRL: 32767 blocks per source range
    at(&mut want, 76, &[0x00, 0x00, 0x01, 0x00]); // MCL: 65536 blocks per Copy
    at(&mut want, 80, &[0x7F]); // MSRC: 128 ranges (0's based)
    at(
        &mut want,
        104,
        &[
            0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D,
            0x3E, 0x3F,
        ],
    );
    at(
        &mut want,
        120,
        &[0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47],
    );
    at(&mut want, 128, &[0x00, 0x00, 0x09, 0x02]); // LBAF0: MS 0, 512 bytes, RP 10b
    at(&mut want, 132, &[0x08, 0x00, 0x0C, 0x01]); // LBAF1: MS 8, 4096 bytes, RP 01b
    let mut lbaf = [LbaFormat::default(); 16];
    lbaf[0] = LbaFormat {
        ms: 0,
        lbads: 9,
        rp: 2,
    };
    lbaf[1] = LbaFormat {
        ms: 8,
        lbads: 12,
        rp: 1,
    };
    let n = IdentifyNamespace {
        nsze: 0x0102_0304_0506_0708,
        ncap: 0x1112_1314_1516_1718,
        nuse: 0x2122_2324_2526_2728,
        nsfeat: 1,
        nlbaf: 1,
        flbas: 1,
        nmic: 1,
        dlfeat: 0x09,
        mssrl: 0x7FFF,
        mcl: 0x1_0000,
        msrc: 0x7F,
        anagrpid: 0,
        nguid: [
            0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D,
            0x3E, 0x3F,
        ],
        eui64: [0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47],
        lbaf,
    };
    let mut got = [0xEEu8; IDENTIFY_LEN];
    n.encode(&mut got);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "Identify Namespace byte {i}");
    }
    let d = IdentifyNamespace::decode(&want);
    assert_eq!(d, n);
    assert_eq!(d.block_size(), 4096, "FLBAS 1 selects LBAF1 (LBADS 12)");
    assert_eq!(LbaFormat::from_u32(0x0209_0000), lbaf[0]);
}

#[test]
fn nsid_lists() {
    // Active Namespace ID list (CNS 02h, NVMe base 2.0 §5.17.2.2) and Changed Namespace List
    // log (04h): 1024 little-endian NSIDs, ascending, zero terminated.
    let mut want = [0u8; IDENTIFY_LEN];
    at(
        &mut want,
        0,
        &[0x03, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00],
    );
    let mut got = [0xEEu8; IDENTIFY_LEN];
    identify::encode_active_ns_list(1, &[7, 1, 3], &mut got);
    assert_eq!(got, want, "NSIDs above 1, ascending");
    assert_eq!(identify::nsid_list(&want).collect::<Vec<_>>(), [3, 7]);
    let mut full = [0u8; IDENTIFY_LEN];
    for (i, c) in full.chunks_exact_mut(4).enumerate() {
        c[0] = (i + 1) as u8;
        c[1] = ((i + 1) >> 8) as u8;
    }
    assert_eq!(identify::nsid_list(&full).count(), 1024);
    assert_eq!(identify::nsid_list(&full).last(), Some(1024));
    assert_eq!(
        identify::nsid_list(&[1, 0, 0, 0, 2, 0]).count(),
        1,
        "partial entry"
    );

    let mut got = [0xEEu8; 4096];
    log::encode_changed_ns_list(&[0x0102_0304, 5], false, &mut got);
    let mut want = [0u8; 4096];
    at(
        &mut want,
        0,
        &[0x04, 0x03, 0x02, 0x01, 0x05, 0x00, 0x00, 0x00],
    );
    assert_eq!(got, want);
    // More than 1024 changed: first entry FFFFFFFFh, the rest zero (NVMe base 2.0 Changed
    // Namespace List log figure).
    log::encode_changed_ns_list(&[1, 2], true, &mut got);
    let mut want = [0u8; 4096];
    at(&mut want, 0, &[0xFF, 0xFF, 0xFF, 0xFF]);
    assert_eq!(got, want);
    let many: Vec<u32> = (1..=1025).collect();
    log::encode_changed_ns_list(&many, false, &mut got);
    assert_eq!(got, want);
}

#[test]
fn ns_identification_descriptors() {
    // NVMe base 2.0 Namespace Identification Descriptor figure; Linux struct nvme_ns_id_desc:
    // NIDT byte 0, NIDL byte 1, reserved 3:2, NID from byte 4; EUI-64 (1h, 8 bytes), NGUID
    // (2h, 16), UUID (3h, 16), CSI (4h, 1).
    let eui = [0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7];
    let nguid = [
        0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE,
        0xAF,
    ];
    let uuid = [
        0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE,
        0xCF,
    ];
    let mut want = [0u8; IDENTIFY_LEN];
    at(&mut want, 0, &[0x01, 0x08, 0x00, 0x00]);
    at(&mut want, 4, &eui);
    at(&mut want, 12, &[0x02, 0x10, 0x00, 0x00]);
    at(&mut want, 16, &nguid);
    at(&mut want, 32, &[0x03, 0x10, 0x00, 0x00]);
    at(&mut want, 36, &uuid);
    at(&mut want, 52, &[0x04, 0x01, 0x00, 0x00, 0x02]);
    let ids = NsIdentifiers {
        eui64: eui,
        nguid,
        uuid,
        csi: 0x02,
    };
    let mut got = [0xEEu8; IDENTIFY_LEN];
    ids.encode(&mut got);
    assert_eq!(got, want);
    assert_eq!(NsIdentifiers::decode(&want), ids);

    // All-zero identifiers are left out; the CSI descriptor is always there.
    let mut want = [0u8; IDENTIFY_LEN];
    at(&mut want, 0, &[0x03, 0x10, 0x00, 0x00]);
    at(&mut want, 4, &uuid);
    at(&mut want, 20, &[0x04, 0x01, 0x00, 0x00, 0x00]);
    let only_uuid = NsIdentifiers {
        uuid,
        ..Default::default()
    };
    only_uuid.encode(&mut got);
    assert_eq!(got, want);

    // The decoder skips a descriptor type it does not know (NIDT 7Fh, 3 bytes).
    let mut foreign = [0u8; IDENTIFY_LEN];
    at(&mut foreign, 0, &[0x7F, 0x03, 0x00, 0x00, 0xFF, 0xFF, 0xFF]);
    at(&mut foreign, 7, &[0x03, 0x10, 0x00, 0x00]);
    at(&mut foreign, 11, &uuid);
    assert_eq!(NsIdentifiers::decode(&foreign), only_uuid);
}

// ---------------------------------------------------------------------------------------
// Log pages
// ---------------------------------------------------------------------------------------

#[test]
fn get_log_page_command() {
    // NVMe base 2.0 Get Log Page CDW10-13 figures; Linux struct nvme_get_log_page_command:
    // lid 40, lsp 41 (bits 6:0 LSP, bit 7 = CDW10 bit 15 RAE), numdl 43:42, numdu 45:44, lsi
    // 47:46, lpol 51:48, lpou 55:52.
    // 4_0004h bytes = 10001h dwords: NUMD (0's based) = 1_0000h -> NUMDL 0, NUMDU 1.
    let want = sqe_image(&[
        (0, &[0x02, 0x00, 0x07, 0x00]),
        (4, &[0xFF, 0xFF, 0xFF, 0xFF]),
        (40, &[0x02, 0x80, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]),
        (48, &[0x00, 0x02, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]),
    ]);
    let s = GetLogPageCommand::to_sqe(7, 0xFFFF_FFFF, 0x02, true, 0x1_0000_0200, 0x4_0004);
    assert_eq!(s.to_bytes(), want);
    let c = GetLogPageCommand::from_sqe(&Sqe::from_bytes(&want));
    assert_eq!(
        (c.lid, c.lsp, c.rae, c.numd, c.lsi, c.offset),
        (0x02, 0, true, 0x1_0000, 0, 0x1_0000_0200)
    );
    assert_eq!(c.len_bytes(), 0x4_0004);
    // LSP 05h, no RAE, NUMD 0FFh, LSI 0A0Bh, decoded from hand-written dwords.
    let b = sqe_image(&[
        (0, &[0x02]),
        (40, &[0x70, 0x05, 0xFF, 0x00, 0x00, 0x00, 0x0B, 0x0A]),
    ]);
    let c = GetLogPageCommand::from_sqe(&Sqe::from_bytes(&b));
    assert_eq!(
        (c.lid, c.lsp, c.rae, c.numd, c.lsi, c.offset),
        (0x70, 0x05, false, 0xFF, 0x0A0B, 0)
    );
    assert_eq!(c.len_bytes(), 1024);
}

#[test]
fn error_information_log_entry() {
    // NVMe base 2.0 Error Information Log Entry figure; libnvme struct nvme_error_log_page:
    // error_count 7:0, sqid 9:8, cmdid 11:10, status_field 13:12 (bit 0 phase tag), parameter
    // error location 15:14, lba 23:16, nsid 27:24, vs 28, trtype 29. (Linux's kernel struct
    // nvme_error_slot still has 3 reserved bytes at 31:29; it predates TRTYPE. We follow the
    // spec.)
    let mut want = [0u8; 64];
    at(
        &mut want,
        0,
        &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01],
    );
    at(&mut want, 8, &[0x02, 0x00]); // SQID 2
    at(&mut want, 10, &[0x34, 0x12]); // CID 1234h
    at(&mut want, 12, &[0x00, 0x81]); // LBA Out of Range, DNR (8100h)
    at(&mut want, 14, &[0x30, 0x00]); // parameter at byte 30h (CDW12)
    at(
        &mut want,
        16,
        &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11],
    );
    at(&mut want, 24, &[0x01, 0x00, 0x00, 0x00]); // NSID 1
    at(&mut want, 29, &[0x03]); // TRTYPE: TCP
    let e = ErrorLogEntry {
        error_count: 0x0102_0304_0506_0708,
        sqid: 2,
        cid: 0x1234,
        status: 0x8100,
        param_error_location: 0x30,
        lba: 0x1112_1314_1516_1718,
        nsid: 1,
        trtype: discovery::TRTYPE_TCP,
    };
    let mut got = [0xEEu8; 64];
    e.encode(&mut got);
    assert_eq!(got, want);
    assert_eq!(ErrorLogEntry::SIZE, 64);
    assert_eq!(Status::LBA_OUT_OF_RANGE.to_field(false), e.status);
}

#[test]
fn smart_health_log() {
    // NVMe base 2.0 SMART / Health Information Log figure; Linux struct nvme_smart_log:
    // critical_warning 0, temperature 2:1, avail_spare 3, spare_thresh 4, percent_used 5, then
    // 16-byte counters at 32 (data units read), 48 (written), 64 (host reads), 80 (host
    // writes), 96 (busy time), 112 (power cycles), 128 (power-on hours), 144 (unsafe
    // shutdowns), 160 (media errors), 176 (error log entries).
    let mut want = [0u8; 512];
    at(&mut want, 0, &[0x04, 0x2A, 0x01, 0x64, 0x0A, 0x03]);
    let counters: [(usize, u8); 10] = [
        (32, 0x10),
        (48, 0x20),
        (64, 0x30),
        (80, 0x40),
        (96, 0x50),
        (112, 0x60),
        (128, 0x70),
        (144, 0x80),
        (160, 0x90),
        (176, 0xA0),
    ];
    for (off, base) in counters {
        // Byte k of the counter is base + k: all 16 bytes are significant.
        for k in 0..16u8 {
            want[off + k as usize] = base + k;
        }
    }
    let s = SmartLog {
        critical_warning: 0x04,
        composite_temperature: 0x012A, // 298 K
        available_spare: 100,
        available_spare_threshold: 10,
        percentage_used: 3,
        data_units_read: 0x1F1E_1D1C_1B1A_1918_1716_1514_1312_1110,
        data_units_written: 0x2F2E_2D2C_2B2A_2928_2726_2524_2322_2120,
        host_read_commands: 0x3F3E_3D3C_3B3A_3938_3736_3534_3332_3130,
        host_write_commands: 0x4F4E_4D4C_4B4A_4948_4746_4544_4342_4140,
        controller_busy_time: 0x5F5E_5D5C_5B5A_5958_5756_5554_5352_5150,
        power_cycles: 0x6F6E_6D6C_6B6A_6968_6766_6564_6362_6160,
        power_on_hours: 0x7F7E_7D7C_7B7A_7978_7776_7574_7372_7170,
        unsafe_shutdowns: 0x8F8E_8D8C_8B8A_8988_8786_8584_8382_8180,
        media_errors: 0x9F9E_9D9C_9B9A_9998_9796_9594_9392_9190,
        num_error_log_entries: 0xAFAE_ADAC_ABAA_A9A8_A7A6_A5A4_A3A2_A1A0,
    };
    let mut got = [0xEEu8; 512];
    s.encode(&mut got);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "SMART log byte {i}");
    }
    assert_eq!(SmartLog::decode(&want), s);
    // Data Units: thousands of 512-byte units, rounded up (the figure's examples: 1 means
    // 1..=1000 units, 3 means 2001..=3000).
    assert_eq!(SmartLog::data_units(0), 0);
    assert_eq!(SmartLog::data_units(512), 1);
    assert_eq!(SmartLog::data_units(512 * 1000), 1);
    assert_eq!(SmartLog::data_units(512 * 1001), 2);
    assert_eq!(SmartLog::data_units(512 * 2001), 3);
    assert_eq!(SmartLog::data_units(512 * 3000), 3);
}

#[test]
fn firmware_slot_log() {
    // NVMe base 2.0 Firmware Slot Information Log figure; Linux struct nvme_fw_slot_info_log:
    // afi 0 (bits 2:0 active slot), frs[7] at 8 + 8 × (slot − 1).
    let mut want = [0u8; 512];
    at(&mut want, 0, &[0x01]);
    at(&mut want, 8, b"0.1.0   ");
    at(&mut want, 16, b"0.2.0-rc");
    let mut got = [0xEEu8; 512];
    log::encode_firmware_slot(1, &[*b"0.1.0   ", *b"0.2.0-rc"], &mut got);
    assert_eq!(got, want);
    // AFI bits 6:4 (next slot) are never set by a bad active slot value.
    log::encode_firmware_slot(0x19, &[], &mut got);
    assert_eq!(&got[..8], &[0x01, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn commands_supported_and_effects_log() {
    // NVMe base 2.0 Commands Supported and Effects Log figures; Linux struct
    // nvme_effects_log: acs[256] at 0 (4 bytes per admin opcode), iocs[256] at 1024; entry
    // bits CSUPP 0, LBCC 1, NCC 2, NIC 3, CCC 4 (Linux NVME_CMD_EFFECTS_*).
    assert_eq!(
        (
            Effects::CSUPP.bits(),
            Effects::LBCC.bits(),
            Effects::NCC.bits(),
            Effects::NIC.bits(),
            Effects::CCC.bits()
        ),
        (0x01, 0x02, 0x04, 0x08, 0x10)
    );
    let mut want = [0u8; 4096];
    at(&mut want, 24, &[0x01, 0x00, 0x00, 0x00]); // ACS6: Identify
    at(&mut want, 768, &[0x11, 0x00, 0x00, 0x00]); // ACS192: a vendor admin opcode (C0h)
    at(&mut want, 1028, &[0x03, 0x00, 0x00, 0x00]); // IOCS1: Write
    at(&mut want, 1060, &[0x03, 0x00, 0x00, 0x00]); // IOCS9: Dataset Management
    at(&mut want, 2044, &[0x1F, 0x00, 0x00, 0x00]); // IOCS255: the last I/O entry
    let mut got = [0xEEu8; 4096];
    log::encode_effects(
        &[
            (0x06, Effects::CSUPP),
            (0xC0, Effects::CSUPP | Effects::CCC),
        ],
        &[
            (0x01, Effects::CSUPP | Effects::LBCC),
            (0x09, Effects::CSUPP | Effects::LBCC),
            (0xFF, Effects::from_bits_retain(0x1F)),
        ],
        &mut got,
    );
    assert_eq!(got, want);
}

#[test]
fn discovery_log_page() {
    // NVMe-oF 1.1 §5.3 Discovery Log Page header figure; Linux struct nvmf_disc_rsp_page_hdr:
    // genctr 7:0, numrec 15:8, recfmt 17:16, bytes 1023:18 reserved.
    let mut want = [0u8; 1024];
    at(
        &mut want,
        0,
        &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01],
    );
    at(
        &mut want,
        8,
        &[0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
    );
    at(&mut want, 16, &[0x00, 0x00]);
    let h = discovery::Header {
        genctr: 0x0102_0304_0506_0708,
        numrec: 2,
        recfmt: 0,
    };
    let mut got = [0xEEu8; 1024];
    h.encode(&mut got);
    assert_eq!(got, want);
    let mut with_fmt = want;
    at(&mut with_fmt, 16, &[0x34, 0x12]);
    assert_eq!(
        discovery::Header::decode(&with_fmt),
        discovery::Header {
            recfmt: 0x1234,
            ..h
        }
    );

    // NVMe-oF 1.1 §5.3 Discovery Log Page Entry figure; Linux struct
    // nvmf_disc_rsp_page_entry: trtype 0, adrfam 1, subtype 2, treq 3, portid 5:4, cntlid
    // 7:6, asqsz 9:8, eflags 11:10 (not used here), trsvcid 63:32, subnqn 511:256, traddr
    // 767:512, tsas 1023:768 (TCP: byte 768 SECTYPE). SUBNQN comes before TRADDR: issue #12
    // was Keel writing them the other way round, so `nvme discover` showed them swapped.
    let mut want = [0u8; 1024];
    at(&mut want, 0, &[0x03, 0x01, 0x02, 0x06]); // TCP, IPv4, NVM subsystem, TREQ
    at(&mut want, 4, &[0x01, 0x02]); // PORTID 0201h
    at(&mut want, 6, &[0xFF, 0xFF]); // CNTLID FFFFh: dynamic controller model
    at(&mut want, 8, &[0x20, 0x00]); // ASQSZ 32
    at(&mut want, 32, b"4420");
    at(&mut want, 256, b"nqn.2026-11.dev.keel:default");
    at(&mut want, 512, b"127.0.0.1");
    at(&mut want, 768, &[0x01]); // SECTYPE 1 (TLS 1.2), only as a marker of byte 768
    let mut trsvcid = [0u8; 32];
    trsvcid[..4].copy_from_slice(b"4420");
    let mut traddr = [0u8; 256];
    traddr[..9].copy_from_slice(b"127.0.0.1");
    let mut tsas = [0u8; 256];
    tsas[0] = 1;
    let e = discovery::Entry {
        trtype: discovery::TRTYPE_TCP,
        adrfam: discovery::ADRFAM_IPV4,
        subtype: discovery::SUBTYPE_NVM,
        treq: discovery::TREQ_NOT_REQUIRED | discovery::TREQ_DISABLE_SQFLOW,
        portid: 0x0201,
        cntlid: CNTLID_DYNAMIC,
        asqsz: 32,
        trsvcid,
        traddr,
        subnqn: identify::nqn_field("nqn.2026-11.dev.keel:default"),
        tsas,
    };
    let mut got = [0xEEu8; 1024];
    e.encode(&mut got);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "discovery entry byte {i}");
    }
    let d = discovery::Entry::decode(&want);
    assert_eq!(d, e);
    assert_eq!(d.subnqn_str(), Some("nqn.2026-11.dev.keel:default"));
    assert_eq!(d.traddr_str(), Some("127.0.0.1"));
    assert_eq!(d.trsvcid_str(), Some("4420"));
    // Code points: Linux NVMF_TRTYPE_*, NVMF_ADDR_FAMILY_*, enum nvme_subsys_type,
    // NVMF_TREQ_*.
    assert_eq!(
        (
            discovery::TRTYPE_RDMA,
            discovery::TRTYPE_FC,
            discovery::TRTYPE_TCP,
            discovery::TRTYPE_LOOP
        ),
        (1, 2, 3, 254)
    );
    assert_eq!((discovery::ADRFAM_IPV4, discovery::ADRFAM_IPV6), (1, 2));
    assert_eq!(
        (
            discovery::SUBTYPE_DISCOVERY_REFERRAL,
            discovery::SUBTYPE_NVM,
            discovery::SUBTYPE_CURRENT_DISCOVERY
        ),
        (1, 2, 3)
    );
    assert_eq!(
        (
            discovery::TREQ_NOT_SPECIFIED,
            discovery::TREQ_REQUIRED,
            discovery::TREQ_NOT_REQUIRED,
            discovery::TREQ_DISABLE_SQFLOW
        ),
        (0, 1, 2, 4)
    );
    assert_eq!(discovery::RECORD_LEN, 1024);
}

#[test]
fn log_windows() {
    // A Get Log Page at an offset returns the log's bytes from that offset (LPOL/LPOU).
    let src = [1u8, 2, 3, 4];
    let mut out = [0u8; 6];
    log::copy_window(&mut out, 1026, &src, 1024);
    assert_eq!(out, [3, 4, 0, 0, 0, 0]);
}

// ---------------------------------------------------------------------------------------
// Fabrics commands
// ---------------------------------------------------------------------------------------

#[test]
fn connect_command_and_data() {
    // NVMe-oF 1.1 §3.3 Connect Command SQE figure; Linux struct nvmf_connect_command: opcode
    // 7Fh, fctype 4 (01h), dptr 39:24, recfmt 41:40, qid 43:42, sqsize 45:44, cattr 46, kato
    // 51:48. An I/O queue Connect: QID 3, SQSIZE 127, SQ flow control disabled (CATTR bit 2,
    // Linux NVME_CONNECT_DISABLE_SQFLOW), KATO 5000 ms, 1 KiB of in-capsule data.
    let want = sqe_image(&[
        (0, &[0x7F, 0x40, 0xAB, 0x00, 0x01]),
        (32, &[0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]),
        (40, &[0x00, 0x00, 0x03, 0x00, 0x7F, 0x00, 0x04, 0x00]),
        (48, &[0x88, 0x13, 0x00, 0x00]),
    ]);
    let c = ConnectCommand {
        recfmt: 0,
        qid: 3,
        sqsize: 127,
        cattr: CATTR_DISABLE_SQ_FLOW_CONTROL,
        kato: 5000,
    };
    let s = c.to_sqe(0xAB).with_sgl(SglDescriptor::in_capsule(0, 1024));
    assert_eq!(s.to_bytes(), want);
    let d = Sqe::from_bytes(&want);
    assert_eq!(ConnectCommand::from_sqe(&d), c);
    assert_eq!(d.fctype(), FabricsType::Connect as u8);
    // Offsets reported as IPO in Connect Invalid Parameters (offsetof in the Linux structs).
    assert_eq!(
        (
            connect_field::RECFMT,
            connect_field::QID,
            connect_field::SQSIZE,
            connect_field::CATTR,
            connect_field::KATO
        ),
        (40, 42, 44, 46, 48)
    );

    // NVMe-oF 1.1 §3.3 Connect Data figure; Linux struct nvmf_connect_data: hostid 15:0,
    // cntlid 17:16, subsysnqn 511:256, hostnqn 767:512, 1023:768 reserved.
    let hostid = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE,
        0xFF,
    ];
    let mut want = [0u8; 1024];
    at(&mut want, 0, &hostid);
    at(&mut want, 16, &[0xFF, 0xFF]);
    at(&mut want, 256, b"nqn.2026-11.dev.keel:default");
    at(
        &mut want,
        512,
        b"nqn.2014-08.org.nvmexpress:uuid:00112233-4455-6677-8899-aabbccddeeff",
    );
    let cd = ConnectData::new(
        hostid,
        CNTLID_DYNAMIC,
        "nqn.2026-11.dev.keel:default",
        "nqn.2014-08.org.nvmexpress:uuid:00112233-4455-6677-8899-aabbccddeeff",
    );
    let mut got = [0xEEu8; 1024];
    cd.write(&mut got);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "Connect data byte {i}");
    }
    let p = ConnectData::parse(&want).unwrap();
    assert_eq!(p, cd);
    assert_eq!(p.subnqn(), Some("nqn.2026-11.dev.keel:default"));
    assert_eq!(
        p.hostnqn(),
        Some("nqn.2014-08.org.nvmexpress:uuid:00112233-4455-6677-8899-aabbccddeeff")
    );
    assert_eq!(
        (
            connect_data_field::HOSTID,
            connect_data_field::CNTLID,
            connect_data_field::SUBNQN,
            connect_data_field::HOSTNQN
        ),
        (0, 16, 256, 512)
    );
    // Connect response DW0 for Invalid Parameters: IPO bits 15:0, IATTR bit 0 in byte 2
    // (NVMe-oF 1.1 Connect Response figure; Linux IPO_IATTR_CONNECT_DATA(hostnqn) =
    // 1 << 16 | 512).
    assert_eq!(
        fabrics::invalid_param_dw0(true, connect_data_field::HOSTNQN),
        0x0001_0200
    );
    assert_eq!(
        fabrics::invalid_param_dw0(false, connect_field::SQSIZE),
        0x0000_002C
    );
    // Controller ID values (NVMe-oF 1.1; Linux NVME_CNTLID_MAX / NVME_CNTLID_DYNAMIC).
    assert_eq!(
        (CNTLID_DYNAMIC, CNTLID_ANY_STATIC, CNTLID_MAX),
        (0xFFFF, 0xFFFE, 0xFFEF)
    );
}

#[test]
fn property_get_set_and_disconnect() {
    // NVMe-oF 1.1 Property Set SQE figure; Linux struct nvmf_property_set_command: fctype 4
    // (00h), attrib 40 (bits 2:0 size: 0 = 4 bytes, 1 = 8 bytes), offset 47:44, value 55:48.
    // CC := 0046_0001h (EN, IOSQES 6, IOCQES 4).
    let want = sqe_image(&[
        (0, &[0x7F, 0x00, 0x09, 0x00, 0x00]),
        (40, &[0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00]),
        (48, &[0x01, 0x00, 0x46, 0x00, 0x00, 0x00, 0x00, 0x00]),
    ]);
    let s = PropertyCommand::set_sqe(9, offset::CC, PropertySize::Four, 0x0046_0001);
    assert_eq!(s.to_bytes(), want);
    let p = PropertyCommand::from_sqe(&Sqe::from_bytes(&want));
    assert_eq!(
        (p.size(), p.offset, p.value),
        (Some(PropertySize::Four), 0x14, 0x0046_0001)
    );

    // Property Get SQE figure; Linux struct nvmf_property_get_command: fctype 04h, attrib 40,
    // offset 47:44. CAP, 8 bytes.
    let want = sqe_image(&[(0, &[0x7F, 0x00, 0x0A, 0x00, 0x04]), (40, &[0x01])]);
    let g = PropertyCommand::get_sqe(10, offset::CAP, PropertySize::Eight);
    assert_eq!(g.to_bytes(), want);
    let p = PropertyCommand::from_sqe(&Sqe::from_bytes(&want));
    assert_eq!((p.size(), p.offset), (Some(PropertySize::Eight), 0));
    let reserved = sqe_image(&[(0, &[0x7F]), (4, &[0x04]), (40, &[0x02])]);
    assert_eq!(
        PropertyCommand::from_sqe(&Sqe::from_bytes(&reserved)).size(),
        None
    );
    // Property Get response: the value in CQE bytes 7:0 (Linux nvme_completion result.u64).
    let resp = Cqe {
        dw0: 0x1E03_03FF,
        dw1: 0x0053_0832,
        cid: 10,
        ..Cqe::new(10, Status::SUCCESS)
    };
    assert_eq!(
        &resp.to_bytes()[..8],
        &[0xFF, 0x03, 0x03, 0x1E, 0x32, 0x08, 0x53, 0x00]
    );

    // Disconnect (NVMe-oF Disconnect command, FCTYPE 08h, RECFMT 0 at 41:40).
    let want = sqe_image(&[(0, &[0x7F, 0x00, 0x0B, 0x00, 0x08])]);
    assert_eq!(fabrics::disconnect_sqe(11).to_bytes(), want);
}

#[test]
fn controller_properties() {
    // NVMe base 2.0 §3.1.3 property map; Linux NVME_REG_*.
    assert_eq!(
        (
            offset::CAP,
            offset::VS,
            offset::INTMS,
            offset::INTMC,
            offset::CC,
            offset::CSTS,
            offset::NSSR,
            offset::AQA,
            offset::ASQ,
            offset::ACQ
        ),
        (0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30)
    );
    // CAP figure: MQES 15:0, CQR 16, AMS 18:17, TO 31:24, DSTRD 35:32, NSSRS 36, CSS 44:37,
    // MPSMIN 51:48, MPSMAX 55:52 (Linux NVME_CAP_* macros). MQES 3FFh, CQR, AMS 01b,
    // TO 1Eh, DSTRD 2, NSSRS, CSS 41h, MPSMIN 3, MPSMAX 5 = 0053_0832_1E03_03FFh.
    let cap = Cap::new(0x03FF, true, 1, 0x1E, 2, true, 0x41, 3, 5);
    assert_eq!(cap.0, 0x0053_0832_1E03_03FF);
    let c = Cap(0x0053_0832_1E03_03FF);
    assert_eq!(
        (
            c.mqes(),
            c.cqr(),
            c.ams(),
            c.to(),
            c.dstrd(),
            c.nssrs(),
            c.css(),
            c.mpsmin(),
            c.mpsmax()
        ),
        (0x03FF, true, 1, 0x1E, 2, true, 0x41, 3, 5)
    );
    // CC figure: EN 0, CSS 6:4, MPS 10:7, AMS 13:11, SHN 15:14, IOSQES 19:16, IOCQES 23:20
    // (Linux NVME_CC_*_SHIFT). EN, MPS 2, AMS 1, SHN normal, IOSQES 6, IOCQES 4 = 0046_4901h.
    let cc = Cc::new(true, 0, 2, 1, Cc::SHN_NORMAL, 6, 4);
    assert_eq!(cc.0, 0x0046_4901);
    let d = Cc(0x0046_4901);
    assert_eq!(
        (
            d.en(),
            d.css(),
            d.mps(),
            d.ams(),
            d.shn(),
            d.iosqes(),
            d.iocqes()
        ),
        (true, 0, 2, 1, 1, 6, 4)
    );
    assert_eq!((Cc::SHN_NONE, Cc::SHN_NORMAL, Cc::SHN_ABRUPT), (0, 1, 2));
    // CSTS figure: RDY 0, CFS 1, SHST 3:2 (Linux NVME_CSTS_*).
    let mut s = Csts(0);
    s.set_rdy(true);
    s.set_shst(Csts::SHST_COMPLETE);
    assert_eq!(s.0, 0x9);
    s.set_cfs(true);
    assert_eq!(s.0, 0xB);
    let d = Csts(0x6);
    assert_eq!((d.rdy(), d.cfs(), d.shst()), (false, true, 1));
    // VS figure: MJR 31:16, MNR 15:8, TER 7:0 (Linux NVME_VS()).
    assert_eq!(Vs::V1_4.0, 0x0001_0400);
    assert_eq!(Vs::V2_0.0, 0x0002_0000);
    assert_eq!((Vs(0x0001_0403).major(), Vs(0x0001_0403).minor()), (1, 4));
}

// ---------------------------------------------------------------------------------------
// Command-specific fields
// ---------------------------------------------------------------------------------------

#[test]
fn io_command_fields() {
    // NVM Command Set 1.0 Read/Write/Write Zeroes CDW10-12 figures; Linux struct
    // nvme_rw_command: slba 47:40, length 49:48 (NLB, 0's based), control 51:50 (bit 9 DEAC,
    // bits 13:10 PRINFO, bit 14 FUA, bit 15 LR: Linux NVME_WZ_DEAC, NVME_RW_PRINFO_*,
    // NVME_RW_FUA, NVME_RW_LR).
    let want = sqe_image(&[
        (0, &[0x08, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00]),
        (40, &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]),
        // NLB 00FFh; control C600h = DEAC (bit 9) | PRINFO 0001b (bits 13:10) | FUA | LR.
        (48, &[0xFF, 0x00, 0x00, 0xC6]),
    ]);
    let c = RwCommand {
        slba: 0x0102_0304_0506_0708,
        nlb: 0xFF,
        deac: true,
        fua: true,
        lr: true,
        prinfo: 0x1,
    };
    assert_eq!(c.to_sqe(IoOpcode::WriteZeroes as u8, 5, 1).to_bytes(), want);
    assert_eq!(RwCommand::from_sqe(&Sqe::from_bytes(&want)), c);
    assert_eq!(c.blocks(), 256);

    // Dataset Management (NVM Command Set DSM figures; Linux struct nvme_dsm_cmd: nr 43:40
    // bits 7:0 0's based, attributes 47:44 with IDR 0, IDW 1, AD 2) and its range
    // (struct nvme_dsm_range: cattr 3:0, nlb 7:4, slba 15:8).
    let want = sqe_image(&[
        (0, &[0x09, 0x00, 0x06, 0x00, 0x01, 0x00, 0x00, 0x00]),
        (40, &[0x02, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00]),
    ]);
    let d = DsmCommand {
        nr: 2,
        idr: false,
        idw: false,
        ad: true,
    };
    assert_eq!(d.to_sqe(6, 1).to_bytes(), want);
    assert_eq!(DsmCommand::from_sqe(&Sqe::from_bytes(&want)), d);
    assert_eq!((d.ranges(), d.data_len()), (3, 48));
    let ranges = [
        0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, // range 0: CATTR 1, 8 blocks at LBA 10h
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02,
        0x01, // range 1: 10000h blocks at LBA 0102_0304_0506_0708h
    ];
    let r0 = DsmRange {
        cattr: 1,
        nlb: 8,
        slba: 0x10,
    };
    let r1 = DsmRange {
        cattr: 0,
        nlb: 0x1_0000,
        slba: 0x0102_0304_0506_0708,
    };
    assert_eq!(DsmRange::read(&ranges, 0), Some(r0));
    assert_eq!(DsmRange::read(&ranges, 1), Some(r1));
    assert_eq!(DsmRange::read(&ranges, 2), None);
    assert_eq!(r1.to_bytes()[..], ranges[16..]);

    // Set/Get Features CDW10 figures; Linux struct nvme_features: fid 40 (bits 7:0), SV bit
    // 31 (Set), SEL bits 10:8 (Get), dword11 47:44. Number of Queues value: NSQR 15:0, NCQR
    // 31:16 (0's based).
    let want = sqe_image(&[
        (0, &[0x09, 0x00, 0x01, 0x00]),
        (40, &[0x07, 0x00, 0x00, 0x00, 0x07, 0x00, 0x03, 0x00]),
    ]);
    let s = FeaturesCommand::set_sqe(1, FeatureId::NumberOfQueues as u8, number_of_queues(7, 3));
    assert_eq!(s.to_bytes(), want);
    let want = sqe_image(&[(0, &[0x0A, 0x00, 0x02, 0x00]), (40, &[0x0F, 0x03])]);
    let g = FeaturesCommand::get_sqe(
        2,
        FeatureId::KeepAliveTimer as u8,
        FeaturesCommand::SEL_CAPABILITIES,
    );
    assert_eq!(g.to_bytes(), want);
    let saved = sqe_image(&[(0, &[0x09]), (40, &[0x06, 0x00, 0x00, 0x80, 0x01])]);
    let f = FeaturesCommand::from_sqe(&Sqe::from_bytes(&saved));
    assert_eq!((f.fid, f.save, f.sel, f.cdw11), (0x06, true, 0, 1));
    assert_eq!(
        (
            FeaturesCommand::SEL_CURRENT,
            FeaturesCommand::SEL_DEFAULT,
            FeaturesCommand::SEL_SAVED,
            FeaturesCommand::SEL_CAPABILITIES
        ),
        (0, 1, 2, 3)
    );

    // Abort CDW10 figure; Linux struct nvme_abort_cmd: sqid 41:40, cid 43:42. Completion
    // DW0 bit 0 = 1: command not aborted.
    let want = sqe_image(&[
        (0, &[0x08, 0x00, 0x0C, 0x00]),
        (40, &[0x02, 0x00, 0x4D, 0x00]),
    ]);
    let a = AbortCommand { sqid: 2, cid: 0x4D };
    assert_eq!(a.to_sqe(12).to_bytes(), want);
    assert_eq!(AbortCommand::from_sqe(&Sqe::from_bytes(&want)), a);
    assert_eq!(AbortCommand::NOT_ABORTED, 1);

    // Asynchronous Event Request completion DW0: type 2:0, information 15:8, log page 23:16
    // (NVMe base 2.0 AER completion figure; Linux NVME_AER_NOTICE = 2,
    // NVME_AER_NOTICE_DISC_CHANGED = F0h, NVME_AEN_CFG_NS_ATTR / _DISC_CHANGE).
    assert_eq!(
        async_event::dw0(
            async_event::TYPE_NOTICE,
            async_event::NOTICE_DISCOVERY_LOG_CHANGE,
            0x70
        ),
        0x0070_F002
    );
    assert_eq!(
        async_event::dw0(
            async_event::TYPE_NOTICE,
            async_event::NOTICE_NS_ATTRIBUTE_CHANGED,
            0x04
        ),
        0x0004_0002
    );
    assert_eq!(
        (
            async_event::AEC_NS_ATTRIBUTE,
            async_event::AEC_DISCOVERY_LOG_CHANGE
        ),
        (0x0000_0100, 0x8000_0000)
    );
}

/// I/O Command Set Independent Identify Namespace (NVMe base 2.0 §5.17.2.9; Linux
/// `struct nvme_id_ns_cs_indep`: nsfeat 0, nmic 1, rescap 2, fpi 3, anagrpid 4..8, nsattr 8,
/// nvmsetid 10..12, endgid 12..14, nstat 14) and the CNS values 05h-08h (Linux
/// `NVME_ID_CNS_CS_NS`, `_CS_CTRL`, `_NS_CS_INDEP`).
#[test]
fn identify_ns_independent() {
    let mut want = [0u8; IDENTIFY_LEN];
    at(&mut want, 0, &[0x04]);
    at(&mut want, 1, &[0x01]);
    at(&mut want, 2, &[0x02]);
    at(&mut want, 3, &[0x80]);
    at(&mut want, 4, &[0x07, 0x00, 0x00, 0x00]);
    at(&mut want, 8, &[0x01]);
    at(&mut want, 10, &[0x03, 0x00]);
    at(&mut want, 12, &[0x05, 0x00]);
    at(&mut want, 14, &[0x01]);
    let v = IdentifyNsIndependent {
        nsfeat: 0x04,
        nmic: 0x01,
        rescap: 0x02,
        fpi: 0x80,
        anagrpid: 7,
        nsattr: 1,
        nvmsetid: 3,
        endgid: 5,
        nstat: 1,
    };
    let mut b = [0xEEu8; IDENTIFY_LEN];
    v.encode(&mut b);
    assert_eq!(b, want);
    assert_eq!(IdentifyNsIndependent::decode(&want), v);
    assert_eq!(
        (
            cns::CS_NAMESPACE,
            cns::CS_CONTROLLER,
            cns::CS_ACTIVE_NS_LIST,
            cns::INDEPENDENT_NAMESPACE
        ),
        (0x05, 0x06, 0x07, 0x08)
    );
}
