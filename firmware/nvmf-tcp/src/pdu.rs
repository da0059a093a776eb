//! PDU wire formats (NVMe/TCP 1.0 §3.6): common header, PDU-specific headers, checked views and
//! encoders.
//!
//! Parsing follows the smoltcp pattern: `View::new_checked(buf)` validates the length once, then
//! accessors cannot panic. Field offsets live in [`field`]. Encoders (`*Repr::emit`) write into a
//! caller-provided buffer and return the number of bytes written, including the header digest
//! when one was negotiated; data, padding and data digest of data PDUs are produced by the
//! connection's transmit path (or by [`encode_pdu`] for tools and tests).

use crate::crc32c::{Crc32c, crc32c};
use core::fmt;
use keel_nvme::le::{put_u16, put_u32, u16_at, u32_at};

/// Byte offsets of every header field (NVMe/TCP 1.0 §3.6.1 figure 12 and §3.6.2 figures).
pub mod field {
    /// A half-open byte range.
    pub type Field = core::ops::Range<usize>;
    // Common header (CH), 8 bytes.
    /// PDU-TYPE.
    pub const PDU_TYPE: usize = 0;
    /// FLAGS.
    pub const FLAGS: usize = 1;
    /// HLEN: header length (CH + PSH, without header digest).
    pub const HLEN: usize = 2;
    /// PDO: PDU data offset from the start of the PDU (0 if no data).
    pub const PDO: usize = 3;
    /// PLEN: total PDU length including digests and padding.
    pub const PLEN: Field = 4..8;
    /// Length of the common header.
    pub const CH_LEN: usize = 8;

    // ICReq / ICResp (figure 20 / 21).
    /// PFV: PDU format version.
    pub const IC_PFV: Field = 8..10;
    /// HPDA (ICReq) / CPDA (ICResp).
    pub const IC_PDA: usize = 10;
    /// DGST: bit 0 header digest enable, bit 1 data digest enable.
    pub const IC_DGST: usize = 11;
    /// MAXR2T (ICReq, 0's based) / MAXH2CDATA (ICResp).
    pub const IC_MAX: Field = 12..16;

    // H2CTermReq / C2HTermReq (figure 22 / 23).
    /// FES: fatal error status.
    pub const TERM_FES: Field = 8..10;
    /// FEI: fatal error information.
    pub const TERM_FEI: Field = 10..14;

    // CapsuleCmd (figure 24) / CapsuleResp (figure 25).
    /// SQE (64 bytes).
    pub const CAPSULE_SQE: Field = 8..72;
    /// CQE (16 bytes).
    pub const CAPSULE_CQE: Field = 8..24;

    // H2CData / C2HData / R2T (figures 26 - 28).
    /// CCCID: command capsule CID.
    pub const DATA_CCCID: Field = 8..10;
    /// TTAG (H2CData, R2T); reserved in C2HData.
    pub const DATA_TTAG: Field = 10..12;
    /// DATAO (H2C/C2HData) / R2TO (R2T).
    pub const DATA_OFFSET: Field = 12..16;
    /// DATAL (H2C/C2HData) / R2TL (R2T).
    pub const DATA_LENGTH: Field = 16..20;
}

/// HLEN of ICReq and ICResp.
pub const IC_HLEN: usize = 128;
/// HLEN of H2CTermReq and C2HTermReq.
pub const TERM_HLEN: usize = 24;
/// Maximum PLEN of a TermReq: the header plus at most 128 bytes of the offending PDU header.
pub const TERM_MAX_PLEN: usize = 152;
/// Maximum length of the offending-header copy in a TermReq.
pub const TERM_MAX_DATA: usize = TERM_MAX_PLEN - TERM_HLEN;
/// HLEN of CapsuleCmd (CH + 64-byte SQE).
pub const CMD_HLEN: usize = 72;
/// HLEN of CapsuleResp (CH + 16-byte CQE).
pub const RESP_HLEN: usize = 24;
/// HLEN of H2CData, C2HData and R2T.
pub const DATA_HLEN: usize = 24;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Largest header we ever buffer: ICReq/ICResp (no digest) or a digest-carrying header.
pub const MAX_HDR_LEN: usize = IC_HLEN + DIGEST_LEN;

bitflags::bitflags! {
    /// The common header's FLAGS (NVMe/TCP 1.0 common header figure). Bits a PDU type does
    /// not define are kept as received (reserved: ignored).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PduFlags: u8 {
        /// Bit 0: header digest present.
        const HDGSTF = 1 << 0;
        /// Bit 1: data digest present.
        const DDGSTF = 1 << 1;
        /// Bit 2 (H2CData/C2HData): last PDU of the transfer (of the R2T for H2CData).
        const LAST_PDU = 1 << 2;
        /// Bit 3 (C2HData): command completed successfully, no CapsuleResp follows.
        const SUCCESS = 1 << 3;
    }
}

/// ICReq/ICResp DGST bit 0.
pub const DGST_HDGST: u8 = 1 << 0;
/// ICReq/ICResp DGST bit 1.
pub const DGST_DDGST: u8 = 1 << 1;

/// PDU types (NVMe/TCP 1.0 §3.6.1 figure 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request.
    IcReq = 0x00,
    /// Initialize Connection Response.
    IcResp = 0x01,
    /// Host to Controller Terminate Connection Request.
    H2CTermReq = 0x02,
    /// Controller to Host Terminate Connection Request.
    C2HTermReq = 0x03,
    /// Command capsule.
    CapsuleCmd = 0x04,
    /// Response capsule.
    CapsuleResp = 0x05,
    /// Host to controller data.
    H2CData = 0x06,
    /// Controller to host data.
    C2HData = 0x07,
    /// Ready to transfer.
    R2T = 0x09,
}

impl PduType {
    /// Decode a PDU-TYPE byte.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }
    /// The fixed HLEN of this PDU type.
    pub const fn hlen(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => IC_HLEN,
            Self::H2CTermReq | Self::C2HTermReq => TERM_HLEN,
            Self::CapsuleCmd => CMD_HLEN,
            Self::CapsuleResp => RESP_HLEN,
            Self::H2CData | Self::C2HData | Self::R2T => DATA_HLEN,
        }
    }
    /// Whether the header of this type carries a header digest when one was negotiated.
    pub const fn digestible(self) -> bool {
        matches!(
            self,
            Self::CapsuleCmd | Self::CapsuleResp | Self::H2CData | Self::C2HData | Self::R2T
        )
    }
    /// Whether this type may carry data protected by a data digest.
    pub const fn carries_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
    /// Whether the host sends this type (the controller receives it).
    pub const fn host_to_controller(self) -> bool {
        matches!(
            self,
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData
        )
    }
}

/// Fatal transport errors (NVMe/TCP 1.0 §3.6.2.9 figure 23: FES values). Each maps to the
/// FES/FEI pair carried in the TermReq we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalError {
    /// FES 01h Invalid PDU Header Field; `offset` is the byte offset of the bad field (FEI).
    InvalidHeaderField {
        /// Byte offset from the start of the PDU.
        offset: u32,
    },
    /// FES 02h PDU Sequence Error.
    PduSequence,
    /// FES 03h Header Digest Error.
    HeaderDigest,
    /// FES 04h Data Transfer Out of Range.
    DataOutOfRange,
    /// FES 05h Data Transfer Limit Exceeded (R2T Limit Exceeded in 1.0).
    DataLimitExceeded,
    /// FES 06h Unsupported Parameter; `offset` is the byte offset of the parameter (FEI).
    UnsupportedParameter {
        /// Byte offset from the start of the PDU.
        offset: u32,
    },
}

impl FatalError {
    /// The FES value.
    pub const fn fes(self) -> u16 {
        match self {
            Self::InvalidHeaderField { .. } => 0x01,
            Self::PduSequence => 0x02,
            Self::HeaderDigest => 0x03,
            Self::DataOutOfRange => 0x04,
            Self::DataLimitExceeded => 0x05,
            Self::UnsupportedParameter { .. } => 0x06,
        }
    }
    /// The FEI value (the field offset for FES 01h/06h, otherwise 0).
    pub const fn fei(self) -> u32 {
        match self {
            Self::InvalidHeaderField { offset } | Self::UnsupportedParameter { offset } => offset,
            _ => 0,
        }
    }
    pub(crate) const fn field(offset: usize) -> Self {
        Self::InvalidHeaderField {
            offset: offset as u32,
        }
    }
}

impl fmt::Display for FatalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidHeaderField { offset } => {
                write!(f, "invalid PDU header field at byte {offset}")
            }
            Self::PduSequence => f.write_str("PDU sequence error"),
            Self::HeaderDigest => f.write_str("header digest error"),
            Self::DataOutOfRange => f.write_str("data transfer out of range"),
            Self::DataLimitExceeded => f.write_str("data transfer limit exceeded"),
            Self::UnsupportedParameter { offset } => {
                write!(f, "unsupported parameter at byte {offset}")
            }
        }
    }
}

/// Errors of the checked views and encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the header it should hold.
    Truncated,
    /// The PDU-TYPE byte is not the type this view decodes, or not a known type.
    WrongType,
    /// The encode buffer is too small.
    BufferTooSmall,
    /// A value does not fit its field or violates the format (e.g. TermReq data > 128 bytes).
    InvalidValue,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Truncated => "buffer shorter than the PDU header",
            Self::WrongType => "unexpected PDU type",
            Self::BufferTooSmall => "output buffer too small",
            Self::InvalidValue => "value out of range for the PDU format",
        })
    }
}

/// A checked view of the 8-byte common header.
#[derive(Debug, Clone, Copy)]
pub struct CommonHeader<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> CommonHeader<T> {
    /// Check that `buf` holds at least the common header.
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        if buf.as_ref().len() < field::CH_LEN {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }
    /// Raw PDU-TYPE byte.
    pub fn raw_type(&self) -> u8 {
        self.buf.as_ref()[field::PDU_TYPE]
    }
    /// Decoded PDU-TYPE, if known.
    pub fn pdu_type(&self) -> Option<PduType> {
        PduType::from_u8(self.raw_type())
    }
    /// FLAGS.
    pub fn flags(&self) -> PduFlags {
        PduFlags::from_bits_retain(self.buf.as_ref()[field::FLAGS])
    }
    /// HLEN.
    pub fn hlen(&self) -> u8 {
        self.buf.as_ref()[field::HLEN]
    }
    /// PDO.
    pub fn pdo(&self) -> u8 {
        self.buf.as_ref()[field::PDO]
    }
    /// PLEN.
    pub fn plen(&self) -> u32 {
        u32_at(self.buf.as_ref(), field::PLEN.start)
    }
}

/// Write a common header into `b[..8]` (the caller guarantees the length).
pub(crate) fn put_ch(
    b: &mut [u8],
    ty: PduType,
    flags: PduFlags,
    hlen: usize,
    pdo: usize,
    plen: u32,
) {
    b[field::PDU_TYPE] = ty as u8;
    b[field::FLAGS] = flags.bits();
    b[field::HLEN] = hlen as u8;
    b[field::PDO] = pdo as u8;
    put_u32(b, field::PLEN.start, plen);
}

/// A checked view of a complete PDU header (CH + PSH, `buf.len() >= HLEN` of its type).
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buf: T,
    ty: PduType,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Check the type byte and that the buffer holds the whole fixed-size header of that type.
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        let b = buf.as_ref();
        if b.len() < field::CH_LEN {
            return Err(Error::Truncated);
        }
        let ty = PduType::from_u8(b[0]).ok_or(Error::WrongType)?;
        if b.len() < ty.hlen() {
            return Err(Error::Truncated);
        }
        Ok(Self { buf, ty })
    }
    /// The PDU type.
    pub fn pdu_type(&self) -> PduType {
        self.ty
    }
    /// The common header.
    pub fn ch(&self) -> CommonHeader<&[u8]> {
        CommonHeader {
            buf: self.buf.as_ref(),
        }
    }
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// PFV (ICReq/ICResp).
    pub fn pfv(&self) -> u16 {
        u16_at(self.b(), field::IC_PFV.start)
    }
    /// HPDA (ICReq) or CPDA (ICResp).
    pub fn pda(&self) -> u8 {
        self.b()[field::IC_PDA]
    }
    /// DGST byte (ICReq/ICResp).
    pub fn dgst(&self) -> u8 {
        self.b()[field::IC_DGST]
    }
    /// The digests the DGST byte asks for (ICReq) or enables (ICResp).
    pub fn ic_digests(&self) -> Digests {
        Digests {
            header: self.dgst() & DGST_HDGST != 0,
            data: self.dgst() & DGST_DDGST != 0,
        }
    }
    /// MAXR2T (ICReq) / MAXH2CDATA (ICResp).
    pub fn ic_max(&self) -> u32 {
        u32_at(self.b(), field::IC_MAX.start)
    }
    /// FES (TermReq).
    pub fn fes(&self) -> u16 {
        u16_at(self.b(), field::TERM_FES.start)
    }
    /// FEI (TermReq).
    pub fn fei(&self) -> u32 {
        u32_at(self.b(), field::TERM_FEI.start)
    }
    /// The SQE of a CapsuleCmd.
    pub fn sqe(&self) -> [u8; 64] {
        let mut s = [0u8; 64];
        if let Some(src) = self.b().get(field::CAPSULE_SQE) {
            s.copy_from_slice(src);
        }
        s
    }
    /// The CQE of a CapsuleResp.
    pub fn cqe(&self) -> [u8; 16] {
        let mut s = [0u8; 16];
        if let Some(src) = self.b().get(field::CAPSULE_CQE) {
            s.copy_from_slice(src);
        }
        s
    }
    /// CCCID (H2CData/C2HData/R2T).
    pub fn cccid(&self) -> u16 {
        u16_at(self.b(), field::DATA_CCCID.start)
    }
    /// TTAG (H2CData/R2T).
    pub fn ttag(&self) -> u16 {
        u16_at(self.b(), field::DATA_TTAG.start)
    }
    /// DATAO / R2TO.
    pub fn data_offset(&self) -> u32 {
        u32_at(self.b(), field::DATA_OFFSET.start)
    }
    /// DATAL / R2TL.
    pub fn data_length(&self) -> u32 {
        u32_at(self.b(), field::DATA_LENGTH.start)
    }
}

/// Header layout decisions shared by all encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    /// Header digest negotiated.
    pub header: bool,
    /// Data digest negotiated.
    pub data: bool,
}

impl Digests {
    /// Header digest length for a type.
    pub const fn hdgst_len(self, ty: PduType) -> usize {
        if self.header && ty.digestible() {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// Compute the PDO of a data PDU: header + header digest rounded up to the receiver's
/// alignment `(pda + 1) * 4` (NVMe/TCP 1.0 §3.6.1: HPDA/CPDA).
pub const fn data_offset(hlen: usize, hdgst_len: usize, pda: u8) -> usize {
    let align = (pda as usize % 32 + 1) * 4;
    let h = hlen + hdgst_len;
    h.div_ceil(align) * align
}

/// Encodable PDU headers (the PDU-specific part plus the fields that decide CH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    /// ICReq: PFV, HPDA, DGST flags, MAXR2T.
    IcReq {
        /// PDU format version (0).
        pfv: u16,
        /// Host PDU data alignment (0's based dwords).
        hpda: u8,
        /// Digests requested.
        digests: Digests,
        /// Maximum outstanding R2Ts per command (0's based).
        maxr2t: u32,
    },
    /// ICResp: PFV, CPDA, DGST flags, MAXH2CDATA.
    IcResp {
        /// PDU format version (0).
        pfv: u16,
        /// Controller PDU data alignment.
        cpda: u8,
        /// Digests enabled.
        digests: Digests,
        /// Maximum H2CData payload.
        maxh2cdata: u32,
    },
    /// H2CTermReq / C2HTermReq header; `data_len` bytes of offending header follow.
    TermReq {
        /// true for C2HTermReq.
        c2h: bool,
        /// FES.
        fes: u16,
        /// FEI.
        fei: u32,
        /// Length of the header copy that follows (≤ 128).
        data_len: u8,
    },
    /// CapsuleCmd with `data_len` bytes of in-capsule data following.
    CapsuleCmd {
        /// The submission queue entry.
        sqe: [u8; 64],
        /// In-capsule data length.
        data_len: u32,
    },
    /// CapsuleResp.
    CapsuleResp {
        /// The completion queue entry.
        cqe: [u8; 16],
    },
    /// H2CData header.
    H2CData {
        /// CCCID.
        cccid: u16,
        /// TTAG from the R2T.
        ttag: u16,
        /// DATAO.
        offset: u32,
        /// DATAL.
        len: u32,
        /// LAST_PDU flag.
        last: bool,
    },
    /// C2HData header.
    C2HData {
        /// CCCID.
        cccid: u16,
        /// DATAO.
        offset: u32,
        /// DATAL.
        len: u32,
        /// LAST_PDU flag.
        last: bool,
        /// SUCCESS flag.
        success: bool,
    },
    /// R2T.
    R2T {
        /// CCCID.
        cccid: u16,
        /// TTAG.
        ttag: u16,
        /// R2TO.
        offset: u32,
        /// R2TL.
        len: u32,
    },
}

/// Where the pieces of an encoded PDU go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of header including header digest.
    pub header_len: usize,
    /// PDO (0 when there is no data).
    pub pdo: usize,
    /// Padding bytes between header digest and data.
    pub pad: usize,
    /// Data bytes.
    pub data_len: usize,
    /// Data digest bytes (0 or 4).
    pub ddgst_len: usize,
    /// PLEN.
    pub plen: usize,
}

impl Repr {
    /// The PDU type.
    pub const fn pdu_type(&self) -> PduType {
        match self {
            Self::IcReq { .. } => PduType::IcReq,
            Self::IcResp { .. } => PduType::IcResp,
            Self::TermReq { c2h: true, .. } => PduType::C2HTermReq,
            Self::TermReq { c2h: false, .. } => PduType::H2CTermReq,
            Self::CapsuleCmd { .. } => PduType::CapsuleCmd,
            Self::CapsuleResp { .. } => PduType::CapsuleResp,
            Self::H2CData { .. } => PduType::H2CData,
            Self::C2HData { .. } => PduType::C2HData,
            Self::R2T { .. } => PduType::R2T,
        }
    }

    fn data_len(&self) -> usize {
        match *self {
            Self::TermReq { data_len, .. } => data_len as usize,
            Self::CapsuleCmd { data_len, .. } => data_len as usize,
            Self::H2CData { len, .. } | Self::C2HData { len, .. } => len as usize,
            _ => 0,
        }
    }

    /// Compute the layout for the given digests and receiver alignment (`pda`, 0's based
    /// dwords: the peer's HPDA for C2H data, its CPDA for H2C data).
    pub fn layout(&self, dg: Digests, pda: u8) -> Layout {
        let ty = self.pdu_type();
        let hl = ty.hlen();
        let hd = dg.hdgst_len(ty);
        let data_len = self.data_len();
        if data_len == 0 {
            return Layout {
                header_len: hl + hd,
                pdo: 0,
                pad: 0,
                data_len: 0,
                ddgst_len: 0,
                plen: hl + hd,
            };
        }
        let (pdo, ddgst_len) = if ty.carries_data() {
            (
                data_offset(hl, hd, pda),
                if dg.data { DIGEST_LEN } else { 0 },
            )
        } else {
            // TermReq: the error data follows the header directly; PDO is 0 (as SPDK sends).
            (hl + hd, 0)
        };
        Layout {
            header_len: hl + hd,
            pdo: if ty.carries_data() { pdo } else { 0 },
            pad: pdo - hl - hd,
            data_len,
            ddgst_len,
            plen: pdo + data_len + ddgst_len,
        }
    }

    /// Write the header (CH + PSH + header digest) into `out`; returns the layout. Padding,
    /// data and data digest are not written.
    pub fn emit(&self, out: &mut [u8], dg: Digests, pda: u8) -> Result<Layout, Error> {
        let lay = self.layout(dg, pda);
        let ty = self.pdu_type();
        let hl = ty.hlen();
        if out.len() < lay.header_len {
            return Err(Error::BufferTooSmall);
        }
        if lay.plen > u32::MAX as usize || lay.pdo > 255 {
            return Err(Error::InvalidValue);
        }
        let h = &mut out[..lay.header_len];
        h.fill(0);
        let mut flags = PduFlags::empty();
        flags.set(PduFlags::HDGSTF, lay.header_len > hl);
        flags.set(PduFlags::DDGSTF, lay.ddgst_len > 0);
        match *self {
            Self::IcReq {
                pfv,
                hpda,
                digests,
                maxr2t,
            } => {
                put_u16(h, field::IC_PFV.start, pfv);
                h[field::IC_PDA] = hpda;
                h[field::IC_DGST] = dgst_byte(digests);
                put_u32(h, field::IC_MAX.start, maxr2t);
            }
            Self::IcResp {
                pfv,
                cpda,
                digests,
                maxh2cdata,
            } => {
                put_u16(h, field::IC_PFV.start, pfv);
                h[field::IC_PDA] = cpda;
                h[field::IC_DGST] = dgst_byte(digests);
                put_u32(h, field::IC_MAX.start, maxh2cdata);
            }
            Self::TermReq {
                fes, fei, data_len, ..
            } => {
                if data_len as usize > TERM_MAX_DATA {
                    return Err(Error::InvalidValue);
                }
                put_u16(h, field::TERM_FES.start, fes);
                put_u32(h, field::TERM_FEI.start, fei);
            }
            Self::CapsuleCmd { sqe, .. } => h[field::CAPSULE_SQE].copy_from_slice(&sqe),
            Self::CapsuleResp { cqe } => h[field::CAPSULE_CQE].copy_from_slice(&cqe),
            Self::H2CData {
                cccid,
                ttag,
                offset,
                len,
                last,
            } => {
                put_u16(h, field::DATA_CCCID.start, cccid);
                put_u16(h, field::DATA_TTAG.start, ttag);
                put_u32(h, field::DATA_OFFSET.start, offset);
                put_u32(h, field::DATA_LENGTH.start, len);
                flags.set(PduFlags::LAST_PDU, last);
            }
            Self::C2HData {
                cccid,
                offset,
                len,
                last,
                success,
            } => {
                put_u16(h, field::DATA_CCCID.start, cccid);
                put_u32(h, field::DATA_OFFSET.start, offset);
                put_u32(h, field::DATA_LENGTH.start, len);
                flags.set(PduFlags::LAST_PDU, last);
                flags.set(PduFlags::SUCCESS, success);
            }
            Self::R2T {
                cccid,
                ttag,
                offset,
                len,
            } => {
                put_u16(h, field::DATA_CCCID.start, cccid);
                put_u16(h, field::DATA_TTAG.start, ttag);
                put_u32(h, field::DATA_OFFSET.start, offset);
                put_u32(h, field::DATA_LENGTH.start, len);
            }
        }
        put_ch(h, ty, flags, hl, lay.pdo, lay.plen as u32);
        if lay.header_len > hl {
            let d = crc32c(&h[..hl]);
            h[hl..hl + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
        }
        Ok(lay)
    }

    /// Decode a header that a connection has already validated structurally.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Self {
        let ch = h.ch();
        let flags = ch.flags();
        let dg = h.ic_digests();
        let hd = if flags.contains(PduFlags::HDGSTF) {
            4
        } else {
            0
        };
        let dd = if flags.contains(PduFlags::DDGSTF) {
            4
        } else {
            0
        };
        let plen = ch.plen() as usize;
        let pdo = ch.pdo() as usize;
        match h.pdu_type() {
            PduType::IcReq => Self::IcReq {
                pfv: h.pfv(),
                hpda: h.pda(),
                digests: dg,
                maxr2t: h.ic_max(),
            },
            PduType::IcResp => Self::IcResp {
                pfv: h.pfv(),
                cpda: h.pda(),
                digests: dg,
                maxh2cdata: h.ic_max(),
            },
            t @ (PduType::H2CTermReq | PduType::C2HTermReq) => Self::TermReq {
                c2h: t == PduType::C2HTermReq,
                fes: h.fes(),
                fei: h.fei(),
                data_len: plen.saturating_sub(TERM_HLEN).min(TERM_MAX_DATA) as u8,
            },
            PduType::CapsuleCmd => Self::CapsuleCmd {
                sqe: h.sqe(),
                data_len: if plen > CMD_HLEN + hd {
                    plen.saturating_sub(pdo + dd) as u32
                } else {
                    0
                },
            },
            PduType::CapsuleResp => Self::CapsuleResp { cqe: h.cqe() },
            PduType::H2CData => Self::H2CData {
                cccid: h.cccid(),
                ttag: h.ttag(),
                offset: h.data_offset(),
                len: h.data_length(),
                last: flags.contains(PduFlags::LAST_PDU),
            },
            PduType::C2HData => Self::C2HData {
                cccid: h.cccid(),
                offset: h.data_offset(),
                len: h.data_length(),
                last: flags.contains(PduFlags::LAST_PDU),
                success: flags.contains(PduFlags::SUCCESS),
            },
            PduType::R2T => Self::R2T {
                cccid: h.cccid(),
                ttag: h.ttag(),
                offset: h.data_offset(),
                len: h.data_length(),
            },
        }
    }
}

const fn dgst_byte(d: Digests) -> u8 {
    (if d.header { DGST_HDGST } else { 0 }) | (if d.data { DGST_DDGST } else { 0 })
}

/// Encode a whole PDU (header, padding, `data`, data digest) into `out`; returns its length.
/// `data.len()` must equal the data length in `repr`. Intended for tools and tests; the
/// connections stream data straight from the application's buffers instead.
pub fn encode_pdu(
    out: &mut [u8],
    repr: &Repr,
    dg: Digests,
    pda: u8,
    data: &[u8],
) -> Result<usize, Error> {
    let lay = repr.layout(dg, pda);
    if data.len() != lay.data_len {
        return Err(Error::InvalidValue);
    }
    if out.len() < lay.plen {
        return Err(Error::BufferTooSmall);
    }
    repr.emit(out, dg, pda)?;
    let start = lay.header_len + lay.pad;
    out[lay.header_len..start].fill(0);
    let mut st = Crc32c::new();
    crate::crc32c::copy_and_crc(&mut out[start..start + data.len()], data, &mut st);
    if lay.ddgst_len > 0 {
        let e = start + data.len();
        out[e..e + 4].copy_from_slice(&st.finish().to_le_bytes());
    }
    Ok(lay.plen)
}
