//! Fabrics commands (NVMe-oF 1.1 §3): Connect (§3.3), Property Get/Set (§3.4, §3.5),
//! Disconnect (§3.6).

use crate::le;
use crate::opcode::FabricsType;
use crate::sqe::Sqe;

/// Controller ID a host sends in an admin-queue Connect under the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// Controller ID a host sends in an admin-queue Connect for "any" static controller.
pub const CNTLID_ANY_STATIC: u16 = 0xFFFE;
/// Highest controller ID a controller may be given (NVMe base 2.0: FFF0h..FFFFh reserved).
pub const CNTLID_MAX: u16 = 0xFFEF;

/// Connect Attributes bit: disable SQ flow control (CATTR bit 2).
pub const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

/// Byte offsets of Connect command fields in the SQE (NVMe-oF 1.1 Figure 19), also used as
/// IPO values in a Connect Invalid Parameters response.
pub mod connect_field {
    /// Record Format.
    pub const RECFMT: u16 = 40;
    /// Queue ID.
    pub const QID: u16 = 42;
    /// Submission Queue Size.
    pub const SQSIZE: u16 = 44;
    /// Connect Attributes.
    pub const CATTR: u16 = 46;
    /// Keep Alive Timeout.
    pub const KATO: u16 = 48;
}

/// Byte offsets of Connect data fields (NVMe-oF 1.1 Figure 20).
pub mod connect_data_field {
    /// Host Identifier (16 bytes).
    pub const HOSTID: u16 = 0;
    /// Controller ID (2 bytes).
    pub const CNTLID: u16 = 16;
    /// NVM Subsystem NQN (256 bytes).
    pub const SUBNQN: u16 = 256;
    /// Host NQN (256 bytes).
    pub const HOSTNQN: u16 = 512;
}

/// The fields of a Connect command (NVMe-oF 1.1 Figure 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectCommand {
    /// Record Format (0).
    pub recfmt: u16,
    /// Queue ID: 0 = admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect Attributes.
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only).
    pub kato: u32,
}

impl ConnectCommand {
    /// Reads the fields of a Connect SQE (does not check the opcode).
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            recfmt: s.cdw[0] as u16,
            qid: (s.cdw[0] >> 16) as u16,
            sqsize: s.cdw[1] as u16,
            cattr: (s.cdw[1] >> 16) as u8,
            kato: s.cdw[2],
        }
    }

    /// Builds a Connect SQE (the caller adds the SGL).
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::fabrics(FabricsType::Connect as u8, cid);
        s.cdw[0] = self.recfmt as u32 | ((self.qid as u32) << 16);
        s.cdw[1] = self.sqsize as u32 | ((self.cattr as u32) << 16);
        s.cdw[2] = self.kato;
        s
    }
}

/// The 1024-byte Connect data (NVMe-oF 1.1 Figure 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectData {
    /// Host Identifier.
    pub hostid: [u8; 16],
    /// Controller ID (FFFFh for an admin queue under the dynamic model).
    pub cntlid: u16,
    /// Subsystem NQN field, raw.
    pub subnqn: [u8; 256],
    /// Host NQN field, raw.
    pub hostnqn: [u8; 256],
}

impl ConnectData {
    /// Size on the wire.
    pub const SIZE: usize = 1024;

    /// Builds Connect data from strings (NQNs longer than 255 bytes are truncated).
    pub fn new(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> Self {
        let mut s = [0u8; 256];
        let mut h = [0u8; 256];
        le::put_str(&mut s, 0, 255, subnqn, 0);
        le::put_str(&mut h, 0, 255, hostnqn, 0);
        Self {
            hostid,
            cntlid,
            subnqn: s,
            hostnqn: h,
        }
    }

    /// Decodes the first 1024 bytes of `b`; `None` when `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::SIZE)?;
        Some(Self {
            hostid: le::array_at(b, 0),
            cntlid: le::u16_at(b, 16),
            subnqn: le::array_at(b, 256),
            hostnqn: le::array_at(b, 512),
        })
    }

    /// Encodes into the first 1024 bytes of `out` (nothing when `out` is shorter).
    pub fn write(&self, out: &mut [u8]) {
        if let Some(b) = out.get_mut(..Self::SIZE) {
            b.fill(0);
            le::put_bytes(b, 0, &self.hostid);
            le::put_u16(b, 16, self.cntlid);
            le::put_bytes(b, 256, &self.subnqn);
            le::put_bytes(b, 512, &self.hostnqn);
        }
    }

    /// The subsystem NQN: bytes up to the first NUL; `None` if not UTF-8 or not terminated.
    pub fn subnqn(&self) -> Option<&str> {
        nqn_str(&self.subnqn)
    }

    /// The host NQN: bytes up to the first NUL; `None` if not UTF-8 or not terminated.
    pub fn hostnqn(&self) -> Option<&str> {
        nqn_str(&self.hostnqn)
    }
}

fn nqn_str(f: &[u8; 256]) -> Option<&str> {
    let end = f.iter().position(|&c| c == 0)?;
    core::str::from_utf8(f.get(..end)?).ok()
}

/// DW0 of a Connect Invalid Parameters completion: IPO (bits 15:0) and IATTR bit 0 (bit 16:
/// 1 = the parameter is in the Connect data, 0 = in the SQE) (NVMe-oF 1.1 Figure 21).
pub const fn invalid_param_dw0(in_data: bool, offset: u16) -> u32 {
    ((in_data as u32) << 16) | offset as u32
}

/// Property size encoded in ATTRIB bits 2:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertySize {
    /// 4 bytes.
    Four,
    /// 8 bytes.
    Eight,
}

/// Property Get / Set fields (NVMe-oF 1.1 Figures 23 and 26).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyCommand {
    /// Raw ATTRIB byte.
    pub attrib: u8,
    /// Property offset (OFST).
    pub offset: u32,
    /// Value (Property Set only).
    pub value: u64,
}

impl PropertyCommand {
    /// Reads the fields of a Property Get/Set SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            attrib: s.cdw[0] as u8,
            offset: s.cdw[1],
            value: s.cdw[2] as u64 | ((s.cdw[3] as u64) << 32),
        }
    }

    /// The property size, `None` for reserved ATTRIB values.
    pub const fn size(&self) -> Option<PropertySize> {
        match self.attrib & 0x7 {
            0 => Some(PropertySize::Four),
            1 => Some(PropertySize::Eight),
            _ => None,
        }
    }

    /// Builds a Property Get SQE.
    pub fn get_sqe(cid: u16, offset: u32, size: PropertySize) -> Sqe {
        let mut s = Sqe::fabrics(FabricsType::PropertyGet as u8, cid);
        s.cdw[0] = matches!(size, PropertySize::Eight) as u32;
        s.cdw[1] = offset;
        s
    }

    /// Builds a Property Set SQE.
    pub fn set_sqe(cid: u16, offset: u32, size: PropertySize, value: u64) -> Sqe {
        let mut s = Self::get_sqe(cid, offset, size);
        s.nsid = FabricsType::PropertySet as u32;
        s.cdw[2] = value as u32;
        s.cdw[3] = (value >> 32) as u32;
        s
    }
}

/// Builds a Disconnect SQE (RECFMT 0).
pub fn disconnect_sqe(cid: u16) -> Sqe {
    Sqe::fabrics(FabricsType::Disconnect as u8, cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_data_offsets() {
        let d = ConnectData::new([0xAA; 16], 0xFFFF, "nqn.sub", "nqn.host");
        let mut b = [0u8; 1024];
        d.write(&mut b);
        assert_eq!(&b[0..16], &[0xAA; 16]);
        assert_eq!(&b[16..18], &[0xFF, 0xFF]);
        assert_eq!(&b[256..264], b"nqn.sub\0");
        assert_eq!(&b[512..521], b"nqn.host\0");
        let p = ConnectData::parse(&b).unwrap();
        assert_eq!(p, d);
        assert_eq!(p.subnqn(), Some("nqn.sub"));
        assert_eq!(p.hostnqn(), Some("nqn.host"));
        assert!(ConnectData::parse(&b[..1023]).is_none());
        // An unterminated NQN is refused.
        let mut raw = b;
        raw[256..512].fill(b'x');
        assert_eq!(ConnectData::parse(&raw).unwrap().subnqn(), None);
    }

    #[test]
    fn connect_io_queue_fields() {
        let c = ConnectCommand {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: CATTR_DISABLE_SQ_FLOW_CONTROL,
            kato: 0,
        };
        let b = c.to_sqe(9).to_bytes();
        assert_eq!(&b[40..48], &[0, 0, 3, 0, 127, 0, 4, 0]);
        assert_eq!(ConnectCommand::from_sqe(&Sqe::from_bytes(&b)), c);
        assert_eq!(invalid_param_dw0(true, 256), 0x0001_0100);
    }

    #[test]
    fn property_bytes() {
        let s = PropertyCommand::set_sqe(1, 0x14, PropertySize::Four, 0x0046_0001);
        let b = s.to_bytes();
        assert_eq!(b[0], 0x7f);
        assert_eq!(b[4], 0x00);
        assert_eq!(b[40], 0);
        assert_eq!(&b[44..48], &[0x14, 0, 0, 0]);
        assert_eq!(&b[48..56], &[1, 0, 0x46, 0, 0, 0, 0, 0]);
        let g = PropertyCommand::get_sqe(2, 0, PropertySize::Eight).to_bytes();
        assert_eq!((g[4], g[40]), (0x04, 1));
        let p = PropertyCommand::from_sqe(&Sqe::from_bytes(&g));
        assert_eq!(p.size(), Some(PropertySize::Eight));
        assert_eq!(disconnect_sqe(3).to_bytes()[4], 0x08);
    }
}
