//! Receive framing shared by both connection roles: common-header validation before any
//! buffering (NVMe/TCP 1.0 §3.6.1), header accumulation and header digest check, padding skip,
//! data digest accumulation.

use crate::crc32c::{Crc32c, crc32c};
use crate::pdu::{
    DIGEST_LEN, Digests, FatalError, IC_HLEN, MAX_HDR_LEN, PduFlags, PduType, TERM_HLEN,
    TERM_MAX_PLEN, field,
};
use keel_nvme::le;

/// What the receiving side accepts, fixed per connection state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The receiver is the controller.
    pub target: bool,
    /// Negotiated digests (none before the IC exchange).
    pub digests: Digests,
    /// The IC exchange is complete (IC PDUs are now a sequence error, others allowed).
    pub ic_done: bool,
    /// The role's limits on data.
    pub data: DataLimits,
}

/// A role's limits on the data it receives.
#[derive(Debug, Clone, Copy)]
pub struct DataLimits {
    /// Maximum in-capsule data (target).
    pub max_capsule_data: u32,
    /// Maximum data in one H2CData (target) / C2HData (host).
    pub max_data_pdu: u32,
    /// Required PDO alignment in bytes of data PDUs we receive.
    pub align: u32,
}

/// A validated common header.
#[derive(Debug, Clone, Copy)]
pub struct PduInfo {
    /// PDU type.
    pub ty: PduType,
    /// FLAGS.
    pub flags: PduFlags,
    /// HLEN + header digest.
    pub hdr_len: usize,
    /// Offset of the data (valid when `data_len > 0`).
    pub pdo: usize,
    /// Data bytes (without padding and data digest).
    pub data_len: u32,
    /// A data digest follows the data.
    pub ddgst: bool,
    /// A header digest follows the header.
    pub hdgst: bool,
}

/// Validate a common header against the PDU type rules and the connection's limits.
pub fn check_ch(ch: &[u8], lim: &Limits) -> Result<PduInfo, FatalError> {
    let raw = ch.first().copied().unwrap_or(0xFF);
    let ty = match PduType::from_u8(raw) {
        Some(t) if t.host_to_controller() == lim.target => t,
        _ => return Err(FatalError::field(field::PDU_TYPE)),
    };
    let flags = PduFlags::from_bits_retain(ch.get(field::FLAGS).copied().unwrap_or(0));
    let hlen = ch.get(field::HLEN).copied().unwrap_or(0) as usize;
    let pdo = ch.get(field::PDO).copied().unwrap_or(0) as usize;
    let plen = le::u32_at(ch, field::PLEN.start) as usize;
    let is_ic = matches!(ty, PduType::IcReq | PduType::IcResp);
    let is_term = matches!(ty, PduType::H2CTermReq | PduType::C2HTermReq);
    if !is_term && is_ic == lim.ic_done {
        return Err(FatalError::PduSequence);
    }
    if hlen != ty.hlen() {
        return Err(FatalError::field(field::HLEN));
    }
    match ty {
        PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq => {
            if flags.intersects(PduFlags::HDGSTF | PduFlags::DDGSTF) {
                return Err(FatalError::field(field::FLAGS));
            }
            let ok = if hlen == IC_HLEN {
                plen == IC_HLEN
            } else {
                (TERM_HLEN..=TERM_MAX_PLEN).contains(&plen)
            };
            if !ok {
                return Err(FatalError::field(field::PLEN.start));
            }
            return Ok(PduInfo {
                ty,
                flags,
                hdr_len: hlen,
                pdo: hlen,
                data_len: (plen - hlen) as u32,
                ddgst: false,
                hdgst: false,
            });
        }
        _ => {}
    }
    let hdgst = flags.contains(PduFlags::HDGSTF);
    if hdgst != lim.digests.header {
        return Err(FatalError::field(field::FLAGS));
    }
    let hdr_len = hlen + if hdgst { DIGEST_LEN } else { 0 };
    let ddgst = flags.contains(PduFlags::DDGSTF);
    if plen < hdr_len {
        return Err(FatalError::field(field::PLEN.start));
    }
    if plen == hdr_len {
        if ddgst {
            return Err(FatalError::field(field::FLAGS));
        }
        if matches!(ty, PduType::H2CData | PduType::C2HData) {
            // A data PDU without data.
            return Err(FatalError::field(field::PLEN.start));
        }
        return Ok(PduInfo {
            ty,
            flags,
            hdr_len,
            pdo: hdr_len,
            data_len: 0,
            ddgst: false,
            hdgst,
        });
    }
    if !ty.carries_data() {
        return Err(FatalError::field(field::PLEN.start));
    }
    if ddgst != lim.digests.data {
        return Err(FatalError::field(field::FLAGS));
    }
    let dd = if ddgst { DIGEST_LEN } else { 0 };
    if pdo < hdr_len || !(pdo as u32).is_multiple_of(lim.data.align.max(1)) || pdo + dd >= plen {
        return Err(FatalError::field(field::PDO));
    }
    let data_len = (plen - pdo - dd) as u32;
    let max = if ty == PduType::CapsuleCmd {
        lim.data.max_capsule_data
    } else {
        lim.data.max_data_pdu
    };
    if data_len > max {
        return Err(FatalError::DataLimitExceeded);
    }
    Ok(PduInfo {
        ty,
        flags,
        hdr_len,
        pdo,
        data_len,
        ddgst,
        hdgst,
    })
}

/// Receive phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accumulating the common header (`info` is None) or the rest of the header.
    Header,
    /// Header complete and verified, waiting for the connection to accept it (it may stall).
    HeaderDone,
    /// Skipping padding.
    Pad { left: u32 },
    /// Delivering data.
    Data { left: u32 },
    /// Accumulating the data digest.
    Ddgst,
}

/// Per-connection receive framing state (fixed size: at most one header is ever buffered).
#[derive(Debug)]
pub struct RxCore {
    hdr: [u8; MAX_HDR_LEN],
    have: usize,
    pub info: Option<PduInfo>,
    pub phase: Phase,
    pub crc: Crc32c,
    dd: [u8; DIGEST_LEN],
    dd_have: usize,
}

impl RxCore {
    pub const fn new() -> Self {
        Self {
            hdr: [0; MAX_HDR_LEN],
            have: 0,
            info: None,
            phase: Phase::Header,
            crc: Crc32c::new(),
            dd: [0; DIGEST_LEN],
            dd_have: 0,
        }
    }

    /// Reset for the next PDU.
    pub fn reset(&mut self) {
        self.have = 0;
        self.info = None;
        self.phase = Phase::Header;
        self.crc = Crc32c::new();
        self.dd_have = 0;
    }

    /// Accumulate header bytes. Returns `Ok(true)` when the whole header (with digest) is in
    /// and its digest verified; `Ok(false)` when more input is needed.
    pub fn take_header(&mut self, input: &mut &[u8], lim: &Limits) -> Result<bool, FatalError> {
        loop {
            let need = match self.info {
                None => field::CH_LEN,
                Some(i) => i.hdr_len,
            };
            let n = (need - self.have).min(input.len());
            self.hdr[self.have..self.have + n].copy_from_slice(&input[..n]);
            self.have += n;
            *input = &input[n..];
            if self.have < need {
                return Ok(false);
            }
            match self.info {
                None => {
                    let info = check_ch(&self.hdr[..field::CH_LEN], lim)?;
                    self.info = Some(info);
                    if info.hdr_len == field::CH_LEN {
                        return Ok(true);
                    }
                }
                Some(i) => {
                    if i.hdgst {
                        let hl = i.ty.hlen();
                        let got = le::u32_at(&self.hdr, hl);
                        if crc32c(&self.hdr[..hl]) != got {
                            return Err(FatalError::HeaderDigest);
                        }
                    }
                    return Ok(true);
                }
            }
        }
    }

    /// After the header is accepted: move on to padding/data/end. Returns true if the PDU has
    /// no data (complete now).
    pub fn start_payload(&mut self) -> bool {
        let Some(i) = self.info else { return true };
        if i.data_len == 0 {
            return true;
        }
        let pad = (i.pdo - i.hdr_len) as u32;
        self.phase = if pad > 0 {
            Phase::Pad { left: pad }
        } else {
            Phase::Data { left: i.data_len }
        };
        false
    }

    /// Skip padding; returns true when done (phase moves to Data).
    pub fn skip_pad(&mut self, input: &mut &[u8]) -> bool {
        if let Phase::Pad { left } = self.phase {
            let n = (left as usize).min(input.len());
            *input = &input[n..];
            let left = left - n as u32;
            if left == 0 {
                let dl = self.info.map(|i| i.data_len).unwrap_or(0);
                self.phase = Phase::Data { left: dl };
                return true;
            }
            self.phase = Phase::Pad { left };
            return false;
        }
        true
    }

    /// Account for `n` data bytes delivered; returns true when the data is complete (phase moves
    /// to Ddgst, or the PDU is complete if no digest: check with `data_done_no_digest`).
    pub fn data_advanced(&mut self, n: u32) -> bool {
        if let Phase::Data { left } = self.phase {
            let left = left.saturating_sub(n);
            self.phase = Phase::Data { left };
            if left == 0 {
                self.phase = Phase::Ddgst;
                return true;
            }
        }
        false
    }

    /// Accumulate the data digest. Returns Some(ok) once complete (immediately Some(true) if no
    /// data digest is in use).
    pub fn take_ddgst(&mut self, input: &mut &[u8]) -> Option<bool> {
        let Some(i) = self.info else {
            return Some(true);
        };
        if !i.ddgst {
            return Some(true);
        }
        let n = (DIGEST_LEN - self.dd_have).min(input.len());
        self.dd[self.dd_have..self.dd_have + n].copy_from_slice(&input[..n]);
        self.dd_have += n;
        *input = &input[n..];
        if self.dd_have < DIGEST_LEN {
            return None;
        }
        Some(u32::from_le_bytes(self.dd) == self.crc.finish())
    }

    /// The buffered header (CH + PSH + digest) of the current PDU.
    pub fn header(&self) -> &[u8] {
        &self.hdr[..self.have]
    }
}
