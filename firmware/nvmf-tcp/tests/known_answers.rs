//! Known-answer tests for every NVMe/TCP PDU this crate defines.
//!
//! Every expected byte below is written out by hand from NVMe/TCP Transport Specification 1.0
//! §3.6 (the common header figure, the PDU type figure and one figure per PDU) and checked
//! against the field offsets of Linux `include/linux/nvme-tcp.h` (`struct nvme_tcp_hdr`,
//! `nvme_tcp_icreq_pdu`, `nvme_tcp_icresp_pdu`, `nvme_tcp_term_pdu`, `nvme_tcp_cmd_pdu`,
//! `nvme_tcp_rsp_pdu`, `nvme_tcp_data_pdu`, `nvme_tcp_r2t_pdu`); no expected value comes from
//! this crate's encoder. Header and data digests are CRC32C (RFC 3720 B.4) values computed
//! with an independent bitwise implementation (checked against the RFC's vectors: 32 zero
//! bytes -> 8A9136AAh) and written here as literal little-endian bytes.
//!
//! Each PDU is checked both ways: the encoder must produce exactly these bytes, and the
//! decoders must read the hand-written bytes back into the right fields. The last tests run
//! the two connection state machines against hand-written peer PDUs, the way a Linux peer
//! would send them.

mod common;
use common::{App, Buf, target};
use keel_nvme::{Cqe, DataDirection, SglDescriptor, Sqe};
use keel_nvmf_tcp::capsule::{SGL_IN_CAPSULE, SGL_TRANSPORT};
use keel_nvmf_tcp::pdu::{
    self, CMD_HLEN, CommonHeader, DATA_HLEN, DGST_DDGST, DGST_HDGST, DIGEST_LEN, Digests,
    FatalError, Header, IC_HLEN, PduFlags, PduType, RESP_HLEN, Repr, TERM_HLEN, TERM_MAX_PLEN,
    encode_pdu, field,
};
use keel_nvmf_tcp::{HostConfig, HostConnection, HostEvent, Status, TargetConfig, TargetState};

const NONE: Digests = Digests {
    header: false,
    data: false,
};
const HDGST: Digests = Digests {
    header: true,
    data: false,
};
const BOTH: Digests = Digests {
    header: true,
    data: true,
};

/// The whole PDU the crate encodes for `repr`.
fn encoded(repr: &Repr, dg: Digests, pda: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 512 + data.len()];
    let n = encode_pdu(&mut out, repr, dg, pda, data).expect("encode");
    out.truncate(n);
    out
}

/// The crate's view of hand-written PDU bytes: the decoded header and CH fields
/// (FLAGS, HLEN, PDO, PLEN).
fn decoded(bytes: &[u8]) -> (Repr, [u32; 4]) {
    let h = Header::new_checked(bytes).expect("header view");
    let ch = CommonHeader::new_checked(bytes).expect("common header view");
    assert_eq!(h.ch().raw_type(), bytes[0]);
    (
        Repr::parse(&h),
        [
            ch.flags().bits() as u32,
            ch.hlen() as u32,
            ch.pdo() as u32,
            ch.plen(),
        ],
    )
}

/// A 64-byte SQE with `bytes` at `off` (hand-assembled SQEs below).
fn sqe_with(fields: &[(usize, &[u8])]) -> [u8; 64] {
    let mut s = [0u8; 64];
    for (off, b) in fields {
        s[*off..*off + b.len()].copy_from_slice(b);
    }
    s
}

#[test]
fn codes_and_offsets_match_the_spec() {
    // PDU-TYPE values: NVMe/TCP 1.0 PDU type figure; Linux `enum nvme_tcp_pdu_type`.
    let types = [
        (PduType::IcReq, 0x00),
        (PduType::IcResp, 0x01),
        (PduType::H2CTermReq, 0x02),
        (PduType::C2HTermReq, 0x03),
        (PduType::CapsuleCmd, 0x04),
        (PduType::CapsuleResp, 0x05),
        (PduType::H2CData, 0x06),
        (PduType::C2HData, 0x07),
        (PduType::R2T, 0x09),
    ];
    for (t, v) in types {
        assert_eq!(t as u8, v, "{t:?}");
        assert_eq!(PduType::from_u8(v), Some(t));
    }
    assert_eq!(PduType::from_u8(0x08), None, "08h is reserved");
    // FLAGS bits: Linux `enum nvme_tcp_pdu_flags` (HDGSTF, DDGSTF, DATA_LAST, DATA_SUCCESS).
    assert_eq!(
        (
            PduFlags::HDGSTF.bits(),
            PduFlags::DDGSTF.bits(),
            PduFlags::LAST_PDU.bits(),
            PduFlags::SUCCESS.bits()
        ),
        (0x01, 0x02, 0x04, 0x08)
    );
    // ICReq/ICResp DGST bits: Linux `enum nvme_tcp_digest_option`.
    assert_eq!((DGST_HDGST, DGST_DDGST), (0x01, 0x02));
    // HLEN of each PDU = sizeof the Linux struct: icreq/icresp 128, term 24, cmd 8+64,
    // rsp 8+16, data/r2t 24.
    assert_eq!(
        (IC_HLEN, TERM_HLEN, CMD_HLEN, RESP_HLEN, DATA_HLEN),
        (128, 24, 72, 24, 24)
    );
    assert_eq!(DIGEST_LEN, 4);
    // Largest TermReq: 24-byte header + 128 bytes of the offending header
    // (Linux NVME_TCP_MAX_C2HTERM_PLEN).
    assert_eq!(TERM_MAX_PLEN, 152);
    // Field offsets of `struct nvme_tcp_hdr` and the PDU-specific headers.
    assert_eq!(
        (field::PDU_TYPE, field::FLAGS, field::HLEN, field::PDO),
        (0, 1, 2, 3)
    );
    assert_eq!(field::PLEN, 4..8);
    assert_eq!(
        (field::IC_PFV, field::IC_PDA, field::IC_DGST, field::IC_MAX),
        (8..10, 10, 11, 12..16)
    );
    assert_eq!((field::TERM_FES, field::TERM_FEI), (8..10, 10..14));
    assert_eq!((field::CAPSULE_SQE, field::CAPSULE_CQE), (8..72, 8..24));
    assert_eq!(
        (
            field::DATA_CCCID,
            field::DATA_TTAG,
            field::DATA_OFFSET,
            field::DATA_LENGTH
        ),
        (8..10, 10..12, 12..16, 16..20)
    );
    // FES values: NVMe/TCP 1.0 TermReq FES figure; Linux `enum nvme_tcp_fatal_error_status`.
    let fes = [
        (FatalError::InvalidHeaderField { offset: 3 }, 0x01, 3),
        (FatalError::PduSequence, 0x02, 0),
        (FatalError::HeaderDigest, 0x03, 0),
        (FatalError::DataOutOfRange, 0x04, 0),
        (FatalError::DataLimitExceeded, 0x05, 0),
        (FatalError::UnsupportedParameter { offset: 10 }, 0x06, 10),
    ];
    for (e, v, fei) in fes {
        assert_eq!((e.fes(), e.fei()), (v, fei), "{e:?}");
    }
}

/// ICReq as the Linux host sends it with --hdr-digest --data-digest (struct
/// nvme_tcp_icreq_pdu): CH type 00h, FLAGS 0, HLEN 128, PDO 0, PLEN 128; PFV 0 (bytes 9:8),
/// HPDA 0 (byte 10), DGST 03h (byte 11), MAXR2T 0 (bytes 15:12), bytes 127:16 reserved.
fn linux_icreq() -> Vec<u8> {
    let mut b = vec![0u8; 128];
    b[..12].copy_from_slice(&[
        0x00, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, // CH
        0x00, 0x00, 0x00, 0x03, // PFV, HPDA, DGST
    ]);
    b
}

#[test]
fn icreq() {
    // IC PDUs never carry a digest, whatever the connection negotiates.
    let want = linux_icreq();
    let repr = Repr::IcReq {
        pfv: 0,
        hpda: 0,
        digests: BOTH,
        maxr2t: 0,
    };
    assert_eq!(encoded(&repr, NONE, 0, &[]), want);
    assert_eq!(encoded(&repr, BOTH, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 128, 0, 128]));

    // HPDA 3 (16-byte alignment), header digest only, MAXR2T 0102_0304h.
    let mut want = vec![0u8; 128];
    want[..16].copy_from_slice(&[
        0x00, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, // CH
        0x00, 0x00, 0x03, 0x01, 0x04, 0x03, 0x02, 0x01, // PFV, HPDA, DGST, MAXR2T
    ]);
    let repr = Repr::IcReq {
        pfv: 0,
        hpda: 3,
        digests: HDGST,
        maxr2t: 0x0102_0304,
    };
    assert_eq!(encoded(&repr, NONE, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 128, 0, 128]));
}

#[test]
fn icresp() {
    // ICResp (struct nvme_tcp_icresp_pdu): CH type 01h, HLEN 128, PLEN 128; PFV 0, CPDA 0
    // (byte 10), DGST 02h (byte 11: data digest only), MAXH2CDATA 0040_0000h (bytes 15:12,
    // the 4 MiB the Linux target advertises).
    let mut want = vec![0u8; 128];
    want[..16].copy_from_slice(&[
        0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, // CH
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x40, 0x00, // PFV, CPDA, DGST, MAXH2CDATA
    ]);
    let repr = Repr::IcResp {
        pfv: 0,
        cpda: 0,
        digests: Digests {
            header: false,
            data: true,
        },
        maxh2cdata: 0x0040_0000,
    };
    assert_eq!(encoded(&repr, BOTH, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 128, 0, 128]));
}

#[test]
fn term_reqs() {
    // H2CTermReq / C2HTermReq (struct nvme_tcp_term_pdu, NVMe/TCP 1.0 TermReq figures): HLEN
    // 24, FES bytes 9:8, FEI bytes 13:10 (not dword aligned, as the 2023 Linux fix of
    // nvme_tcp_term_pdu says), bytes 23:14 reserved, then up to 128 bytes of the offending
    // PDU header; PLEN = 24 + that copy. No digests ever. PDO is 0: the copy follows the
    // header directly and receivers (Linux nvme_tcp_handle_c2h_term, SPDK) locate it by
    // HLEN, not PDO.
    let offending = [0x04, 0x00, 0x47, 0x00, 0x48, 0x00, 0x00, 0x00];
    let mut want = vec![
        0x03, 0x00, 0x18, 0x00, 0x20, 0x00, 0x00, 0x00, // CH: C2HTermReq, PLEN 32
        0x01, 0x00, // FES 01h Invalid PDU Header Field
        0x02, 0x00, 0x00, 0x00, // FEI: byte 2 (HLEN) of the offending PDU
    ];
    want.extend_from_slice(&[0; 10]);
    want.extend_from_slice(&offending);
    let repr = Repr::TermReq {
        c2h: true,
        fes: 0x0001,
        fei: 2,
        data_len: 8,
    };
    assert_eq!(encoded(&repr, BOTH, 0, &offending), want);
    assert_eq!(decoded(&want), (repr, [0, 24, 0, 32]));

    // H2CTermReq without data: FES 06h Unsupported Parameter, FEI 0A0B_0C0Dh.
    let mut want = vec![
        0x02, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00, // CH: H2CTermReq, PLEN 24
        0x06, 0x00, 0x0D, 0x0C, 0x0B, 0x0A,
    ];
    want.extend_from_slice(&[0; 10]);
    let repr = Repr::TermReq {
        c2h: false,
        fes: 0x0006,
        fei: 0x0A0B_0C0D,
        data_len: 0,
    };
    assert_eq!(encoded(&repr, NONE, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 24, 0, 24]));
}

/// A Write SQE (NVMe base 2.0 common command format; Linux struct nvme_common_command):
/// opcode 01h, FLAGS 40h (PSDT 01b: SGL), CID 0102h, NSID 1, SGL1 = Data Block / Offset
/// (identifier 01h, bytes 39) of 16 bytes at offset 0, CDW10 = 10h.
fn write_sqe() -> [u8; 64] {
    sqe_with(&[
        (0, &[0x01, 0x40, 0x02, 0x01, 0x01, 0x00, 0x00, 0x00]),
        (32, &[0x10, 0x00, 0x00, 0x00]),
        (39, &[0x01]),
        (40, &[0x10]),
    ])
}

#[test]
fn capsule_cmd() {
    // CapsuleCmd (struct nvme_tcp_cmd_pdu): CH type 04h, HLEN 72, SQE at bytes 71:8.
    // Without data: PDO 0, PLEN 72.
    let sqe = write_sqe();
    let mut want = vec![0x04, 0x00, 0x48, 0x00, 0x48, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe);
    let repr = Repr::CapsuleCmd { sqe, data_len: 0 };
    assert_eq!(encoded(&repr, NONE, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 72, 0, 72]));

    // 16 bytes in-capsule, both digests: FLAGS 03h (HDGSTF|DDGSTF), HDGST at 75:72, PDO 76
    // (header + digest, CPDA 0), data 91:76, DDGST 95:92, PLEN 96.
    let data: Vec<u8> = (0..16).collect();
    let mut want = vec![0x04, 0x03, 0x48, 0x4C, 0x60, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe);
    want.extend_from_slice(&[0x37, 0x60, 0x77, 0x85]); // CRC32C of bytes 71:0
    want.extend_from_slice(&data);
    want.extend_from_slice(&[0xEB, 0x08, 0xC9, 0xD9]); // CRC32C of the data
    let repr = Repr::CapsuleCmd { sqe, data_len: 16 };
    assert_eq!(encoded(&repr, BOTH, 0, &data), want);
    assert_eq!(decoded(&want), (repr, [3, 72, 76, 96]));

    // CPDA 3 (data aligned to 16 bytes), no digests: PDO 80 with 8 bytes of padding.
    let mut want = vec![0x04, 0x00, 0x48, 0x50, 0x60, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe);
    want.extend_from_slice(&[0; 8]);
    want.extend_from_slice(&data);
    assert_eq!(encoded(&repr, NONE, 3, &data), want);
    assert_eq!(decoded(&want), (repr, [0, 72, 80, 96]));
}

#[test]
fn capsule_resp() {
    // CapsuleResp (struct nvme_tcp_rsp_pdu): CH type 05h, HLEN 24, CQE at bytes 23:8
    // (DW0 1, SQHD 5, SQID 1, CID 0102h, status 0). With a header digest: FLAGS 01h,
    // HDGST at 27:24, PLEN 28, PDO 0 (no data).
    let cqe = [
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x01, 0x00, 0x02, 0x01, 0x00,
        0x00,
    ];
    let mut want = vec![0x05, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    want.extend_from_slice(&cqe);
    let repr = Repr::CapsuleResp { cqe };
    assert_eq!(encoded(&repr, NONE, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [0, 24, 0, 24]));

    let mut want = vec![0x05, 0x01, 0x18, 0x00, 0x1C, 0x00, 0x00, 0x00];
    want.extend_from_slice(&cqe);
    want.extend_from_slice(&[0xC9, 0x3A, 0x38, 0xE6]);
    // The data digest never applies to a PDU without data.
    assert_eq!(encoded(&repr, BOTH, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [1, 24, 0, 28]));
}

#[test]
fn h2c_data() {
    // H2CData (struct nvme_tcp_data_pdu): CH type 06h, HLEN 24; CCCID 0102h (9:8), TTAG
    // 0304h (11:10), DATAO 1000h (15:12), DATAL 8 (19:16), 23:20 reserved. Both digests and
    // LAST_PDU: FLAGS 07h, HDGST 27:24, PDO 28, data 35:28, DDGST 39:36, PLEN 40.
    let data = [0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7];
    let want = [
        0x06, 0x07, 0x18, 0x1C, 0x28, 0x00, 0x00, 0x00, // CH
        0x02, 0x01, 0x04, 0x03, 0x00, 0x10, 0x00, 0x00, // CCCID, TTAG, DATAO
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DATAL, reserved
        0xDD, 0x0E, 0xA3, 0x39, // HDGST
        0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, // data
        0x61, 0xFE, 0x0B, 0x5E, // DDGST
    ];
    let h2c = |last| Repr::H2CData {
        cccid: 0x0102,
        ttag: 0x0304,
        offset: 0x1000,
        len: 8,
        last,
    };
    let repr = h2c(true);
    assert_eq!(encoded(&repr, BOTH, 0, &data), want);
    assert_eq!(decoded(&want), (repr, [7, 24, 28, 40]));

    // Not the last PDU of the R2T, no digests: FLAGS 0, PDO 24.
    let want = [
        0x06, 0x00, 0x18, 0x18, 0x20, 0x00, 0x00, 0x00, //
        0x02, 0x01, 0x04, 0x03, 0x00, 0x10, 0x00, 0x00, //
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    ];
    let repr = h2c(false);
    assert_eq!(encoded(&repr, NONE, 0, &data), want);
    assert_eq!(decoded(&want), (repr, [0, 24, 24, 32]));
}

#[test]
fn c2h_data() {
    // C2HData (struct nvme_tcp_data_pdu; TTAG reserved): CCCID 0009h, DATAO 200h, DATAL 4.
    // Both digests, LAST_PDU and SUCCESS: FLAGS 0Fh. The host asked HPDA 3 (16-byte
    // alignment): header 24 + HDGST 4 = 28 is padded to PDO 32; PLEN 32 + 4 + 4 = 40.
    let data = [0xDE, 0xAD, 0xBE, 0xEF];
    let want = [
        0x07, 0x0F, 0x18, 0x20, 0x28, 0x00, 0x00, 0x00, // CH
        0x09, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, // CCCID, reserved, DATAO
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DATAL, reserved
        0xE3, 0xA0, 0x94, 0xE7, // HDGST
        0x00, 0x00, 0x00, 0x00, // padding to PDO
        0xDE, 0xAD, 0xBE, 0xEF, // data
        0x8E, 0x77, 0xDC, 0xF1, // DDGST (over the data only, not the padding)
    ];
    let c2h = |last, success| Repr::C2HData {
        cccid: 9,
        offset: 0x200,
        len: 4,
        last,
        success,
    };
    let repr = c2h(true, true);
    assert_eq!(encoded(&repr, BOTH, 3, &data), want);
    assert_eq!(decoded(&want), (repr, [0x0F, 24, 32, 40]));
    // `Repr::emit` (the connections' transmit path) writes CH + PSH + HDGST only and says
    // where padding, data and DDGST go.
    let mut out = [0xFFu8; 28];
    let lay = repr.emit(&mut out, BOTH, 3).unwrap();
    assert_eq!(out[..], want[..28]);
    assert_eq!(
        (
            lay.header_len,
            lay.pdo,
            lay.pad,
            lay.data_len,
            lay.ddgst_len,
            lay.plen
        ),
        (28, 32, 4, 4, 4, 40)
    );
    assert_eq!(pdu::data_offset(24, 4, 3), 32);
    assert_eq!(pdu::data_offset(72, 0, 0), 72);

    // A middle PDU without digests: FLAGS 0, PDO 24.
    let want = [
        0x07, 0x00, 0x18, 0x18, 0x1C, 0x00, 0x00, 0x00, //
        0x09, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, //
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0xDE, 0xAD, 0xBE, 0xEF,
    ];
    let repr = c2h(false, false);
    assert_eq!(encoded(&repr, NONE, 0, &data), want);
    assert_eq!(decoded(&want), (repr, [0, 24, 24, 28]));
}

#[test]
fn r2t() {
    // R2T (struct nvme_tcp_r2t_pdu): CH type 09h, HLEN 24, PDO 0; CCCID 0102h, TTAG 0304h,
    // R2TO 0 (15:12), R2TL 2_0000h (19:16). With a header digest: FLAGS 01h, PLEN 28.
    let want = [
        0x09, 0x01, 0x18, 0x00, 0x1C, 0x00, 0x00, 0x00, // CH
        0x02, 0x01, 0x04, 0x03, 0x00, 0x00, 0x00, 0x00, // CCCID, TTAG, R2TO
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // R2TL, reserved
        0x8D, 0x17, 0xB6, 0xF2, // HDGST
    ];
    let repr = Repr::R2T {
        cccid: 0x0102,
        ttag: 0x0304,
        offset: 0,
        len: 0x2_0000,
    };
    assert_eq!(encoded(&repr, BOTH, 0, &[]), want);
    assert_eq!(decoded(&want), (repr, [1, 24, 0, 28]));
    assert_eq!(encoded(&repr, NONE, 0, &[]), {
        let mut w = want[..24].to_vec();
        w[1] = 0;
        w[4] = 0x18;
        w
    });
}

#[test]
fn capsule_field_accessors() {
    // The SQE/CQE fields the transport reads itself (NVMe base 2.0 common command format and
    // CQE; Linux struct nvme_common_command / nvme_sgl_desc / nvme_completion), through the
    // keel_nvme types that cross the transport <-> controller seam.
    let s = write_sqe();
    let q = Sqe::from_bytes(&s);
    assert_eq!((q.opcode, q.cid), (0x01, 0x0102));
    assert_eq!(q.sgl(), SglDescriptor::in_capsule(0, 16));
    assert_eq!(q.dptr[15], SGL_IN_CAPSULE);
    assert_eq!(q.data_direction(), DataDirection::HostToController);
    // SGL identifiers: Data Block (0h) / Offset (1h), Transport SGL Data Block (5h) /
    // Transport Specific (Ah) (Linux NVME_SGL_FMT_DATA_DESC << 4 | NVME_SGL_FMT_OFFSET,
    // NVME_TRANSPORT_SGL_DATA_DESC << 4 | NVME_SGL_FMT_TRANSPORT_A).
    assert_eq!((SGL_IN_CAPSULE, SGL_TRANSPORT), (0x01, 0x5A));
    let mut q = q;
    q.cid = 0xBEEF;
    q.set_sgl(SglDescriptor {
        address: 0x0102_0304_0506_0708,
        ..SglDescriptor::transport(0x1122_3344)
    });
    assert_eq!(
        q.to_bytes(),
        sqe_with(&[
            (0, &[0x01, 0x40, 0xEF, 0xBE, 0x01, 0x00, 0x00, 0x00]),
            (24, &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]),
            (32, &[0x44, 0x33, 0x22, 0x11, 0x00, 0x00, 0x00, 0x5A]),
            (40, &[0x10]),
        ])
    );
    // set_sgl selects SGLs: PSDT (CDW0 bits 15:14) = 01b, FUSE kept.
    let mut f = [0u8; 64];
    f[1] = 0x81; // PSDT 10b, FUSE 01b
    let mut q = Sqe::from_bytes(&f);
    q.set_sgl(q.sgl());
    assert_eq!(q.to_bytes()[1], 0x41);
    // Direction from opcode bits 1:0, or FCTYPE bits 1:0 for fabrics commands (byte 4).
    let dir = |b: [u8; 64]| Sqe::from_bytes(&b).data_direction();
    let read = sqe_with(&[(0, &[0x02])]);
    let flush = sqe_with(&[(0, &[0x00])]);
    let connect = sqe_with(&[(0, &[0x7F]), (4, &[0x01])]);
    let prop_get = sqe_with(&[(0, &[0x7F]), (4, &[0x04])]);
    assert_eq!(dir(read), DataDirection::ControllerToHost);
    assert_eq!(dir(flush), DataDirection::None);
    assert_eq!(Sqe::from_bytes(&connect).fctype(), 0x01);
    assert_eq!(dir(connect), DataDirection::HostToController);
    assert_eq!(dir(prop_get), DataDirection::None);
    // CQE: CID bytes 13:12, status 15:14.
    let cqe = Cqe::from_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x34, 0x12, 0x45, 0x00]);
    assert_eq!((cqe.cid, cqe.status.to_field(cqe.phase)), (0x1234, 0x0045));
    // Status field: SC bits 8:1, SCT 11:9, DNR 15 (Linux NVME_SC_* << 1).
    assert_eq!(Status::INVALID_FIELD.to_field(false), 0x8004); // SC 02h, DNR
    assert_eq!(Status::DATA_SGL_LENGTH_INVALID.to_field(false), 0x801E); // SC 0Fh
    assert_eq!(Status::SGL_DESCRIPTOR_TYPE_INVALID.to_field(false), 0x8022); // SC 11h
    assert_eq!(Status::SGL_OFFSET_INVALID.to_field(false), 0x802C); // SC 16h
    assert_eq!(Status::TRANSIENT_TRANSPORT_ERROR.to_field(false), 0x0044); // SC 22h, retryable
}

#[test]
fn target_answers_a_linux_style_host() {
    // A host that asks for both digests (ICReq DGST 03h, HPDA 0, MAXR2T 0)...
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    app.feed(&mut t, 0, &linux_icreq());
    assert_eq!(t.state(), TargetState::Ready);
    // ...gets ICResp PFV 0, CPDA 0, DGST 03h, MAXH2CDATA 2_0000h (128 KiB, the default).
    let mut icresp = vec![0u8; 128];
    icresp[..16].copy_from_slice(&[
        0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x02,
        0x00,
    ]);
    assert_eq!(app.tx, icresp);
    app.tx.clear();

    // Read of 8 bytes (opcode 02h, CID 7, NSID 1, Transport SGL Data Block 5Ah of 8 bytes,
    // CDW10 0 = offset 0 of the test application's disk), header digest on the capsule.
    app.disk[..8].copy_from_slice(&[0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7]);
    let mut cmd = vec![0x04, 0x01, 0x48, 0x00, 0x4C, 0x00, 0x00, 0x00];
    cmd.extend_from_slice(&sqe_with(&[
        (0, &[0x02, 0x40, 0x07, 0x00, 0x01, 0x00, 0x00, 0x00]),
        (32, &[0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x5A]),
    ]));
    cmd.extend_from_slice(&[0x65, 0x49, 0x75, 0x0F]);
    app.feed(&mut t, 1, &cmd);
    let mut want = vec![
        // C2HData: FLAGS 07h (HDGSTF, DDGSTF, LAST_PDU; no SUCCESS: SQ flow control is on),
        // PDO 28, PLEN 40; CCCID 7, DATAO 0, DATAL 8.
        0x07, 0x07, 0x18, 0x1C, 0x28, 0x00, 0x00, 0x00, //
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x68, 0x46, 0x7D, 0x89, // HDGST
        0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, //
        0x57, 0xC0, 0x16, 0x12, // DDGST
        // CapsuleResp: FLAGS 01h, PLEN 28; the application's CQE (CID 7, success).
        0x05, 0x01, 0x18, 0x00, 0x1C, 0x00, 0x00, 0x00,
    ];
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, 0x00, 0x00, 0x00]);
    want.extend_from_slice(&[0x51, 0xAA, 0x03, 0x90]);
    assert_eq!(app.tx, want);
    assert_eq!(t.state(), TargetState::Ready);
}

#[test]
fn host_speaks_like_a_linux_host() {
    let mut h: HostConnection<Buf> = HostConnection::new(HostConfig {
        digests: BOTH,
        ..HostConfig::default()
    })
    .unwrap();
    let mut out = [0u8; 512];
    let n = h.transmit(&mut out);
    assert_eq!(&out[..n], &linux_icreq()[..]);

    // ICResp from a Linux target: CPDA 0, DGST 03h, MAXH2CDATA 4 MiB.
    let mut icresp = vec![0u8; 128];
    icresp[..16].copy_from_slice(&[
        0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x40,
        0x00,
    ]);
    assert_eq!(h.recv(0, &icresp), 128);
    match h.poll_event() {
        Some(HostEvent::Connected {
            maxh2cdata,
            digests,
        }) => assert_eq!((maxh2cdata, digests), (0x40_0000, BOTH)),
        e => panic!("expected Connected, got {e:?}"),
    }

    // A 16-byte write goes in the capsule: the host fills CID (its slot, 0), PSDT and the
    // Data Block / Offset SGL; FLAGS 03h, PDO 76, PLEN 96.
    let sqe = sqe_with(&[(0, &[0x01, 0x00, 0xFF, 0xFF, 0x01]), (40, &[0x10])]);
    let data: Vec<u8> = (0..16).collect();
    let cid = h
        .submit(Sqe::from_bytes(&sqe), Some((data.clone(), 16)))
        .unwrap();
    assert_eq!(cid, 0);
    let n = h.transmit(&mut out);
    let mut want = vec![0x04, 0x03, 0x48, 0x4C, 0x60, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe_with(&[
        (0, &[0x01, 0x40, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]),
        (32, &[0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]),
        (40, &[0x10]),
    ]));
    want.extend_from_slice(&[0x37, 0xBD, 0x4E, 0x54]);
    want.extend_from_slice(&data);
    want.extend_from_slice(&[0xEB, 0x08, 0xC9, 0xD9]);
    assert_eq!(&out[..n], &want[..]);
}

/// A host connection past ICReq/ICResp (no digests, CPDA 0, MAXH2CDATA 4096), hand-written
/// ICResp; `fc_disabled`: its Connect disabled SQ flow control.
fn host_after_icresp(fc_disabled: bool) -> HostConnection<Buf> {
    let mut h: HostConnection<Buf> = HostConnection::new(HostConfig {
        sq_flow_control_disabled: fc_disabled,
        ..HostConfig::default()
    })
    .unwrap();
    let mut out = [0u8; 256];
    assert_eq!(h.transmit(&mut out), 128);
    let mut icresp = vec![0u8; 128];
    icresp[..16].copy_from_slice(&[
        0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00,
        0x00,
    ]);
    assert_eq!(h.recv(0, &icresp), 128);
    assert!(matches!(h.poll_event(), Some(HostEvent::Connected { .. })));
    h
}

/// C2HData for CCCID `cid`, DATAO 0, 4 data bytes, no digests: type 07h, HLEN 24, PDO 24,
/// PLEN 28, FLAGS as given (NVMe/TCP 1.0 C2HData figure; FLAGS bit 2 LAST_PDU, bit 3 SUCCESS,
/// Linux NVME_TCP_F_DATA_LAST / NVME_TCP_F_DATA_SUCCESS).
fn c2h_bytes(cid: u16, flags: u8) -> Vec<u8> {
    let [c0, c1] = cid.to_le_bytes();
    vec![
        0x07, flags, 0x18, 0x18, 0x1C, 0x00, 0x00, 0x00, // CH
        c0, c1, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // CCCID, reserved, DATAO 0
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DATAL 4, reserved
        0xDE, 0xAD, 0xBE, 0xEF,
    ]
}

#[test]
fn host_completes_a_read_on_c2h_data_with_success() {
    // SQ flow control disabled at Connect: LAST_PDU | SUCCESS (FLAGS 0Ch) ends the command
    // with a success completion and no CapsuleResp (NVMe/TCP 1.0 §3.6.2.8).
    let mut h = host_after_icresp(true);
    let cid = h.submit(Sqe::new(0x02, 0), Some((vec![0; 4], 4))).unwrap();
    let mut out = [0u8; 256];
    assert_eq!(h.transmit(&mut out), 72);
    assert_eq!(h.recv(0, &c2h_bytes(cid, 0x0C)), 28);
    match h.poll_event() {
        Some(HostEvent::Completion { cid: c, cqe, buf }) => {
            assert_eq!((c, cqe.cid, cqe.status), (cid, cid, Status::SUCCESS));
            assert_eq!(buf.unwrap(), vec![0xDE, 0xAD, 0xBE, 0xEF]);
        }
        e => panic!("expected the completion, got {e:?}"),
    }
    assert_eq!(h.state(), keel_nvmf_tcp::host::HostState::Ready);
    // The CID is free again: a CapsuleResp for it now is a fatal error (CQE CID, byte 20).
    let mut resp = vec![0x05, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    resp.extend_from_slice(&[0; 12]);
    resp.extend_from_slice(&[cid as u8, 0, 0, 0]);
    h.recv(0, &resp);
    let n = h.transmit(&mut out);
    assert_eq!(&out[..n], &host_term(1, 20, &resp)[..]);
}

/// H2CTermReq (type 02h) for FES `fes`, FEI `fei`, carrying the offending header.
fn host_term(fes: u16, fei: u32, hdr: &[u8]) -> Vec<u8> {
    let mut t = common::term_req(fes, fei, hdr);
    t[0] = 0x02;
    t
}

/// A host (`fc_disabled`: SQ flow control disabled at Connect) with a read of `len` bytes
/// outstanding receives a C2HData with FLAGS `flags` that it must refuse: H2CTermReq with
/// Invalid PDU Header Field (FES 01h) at FLAGS (FEI 1), and the read is aborted, not completed.
fn host_refuses_c2h_flags(fc_disabled: bool, len: u32, flags: u8) {
    let mut h = host_after_icresp(fc_disabled);
    let cid = h
        .submit(Sqe::new(0x02, 0), Some((vec![0; len as usize], len)))
        .unwrap();
    let mut out = [0u8; 256];
    h.transmit(&mut out);
    let bad = c2h_bytes(cid, flags);
    h.recv(0, &bad);
    let n = h.transmit(&mut out);
    assert_eq!(&out[..n], &host_term(1, 1, &bad[..24])[..]);
    assert!(matches!(
        h.poll_event(),
        Some(HostEvent::Aborted { cid: c, .. }) if c == cid
    ));
}

#[test]
fn host_refuses_success_flag_while_sq_flow_control_is_on() {
    // Without disabling SQ flow control the host needs every CQE's SQHD.
    host_refuses_c2h_flags(false, 4, 0x0C);
}

#[test]
fn host_refuses_success_without_last_pdu() {
    // SUCCESS (08h) without LAST_PDU is invalid even with SQ flow control disabled.
    host_refuses_c2h_flags(true, 8, 0x08);
}
