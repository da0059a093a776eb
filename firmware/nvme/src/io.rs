//! I/O and admin command field helpers (NVM Command Set 1.0 §3.2-3.3; NVMe base 2.0 §5.1,
//! §5.27 Set/Get Features).

use crate::le;
use crate::sqe::Sqe;

/// Read / Write / Compare / Write Zeroes fields (NVM Command Set Figures 38, 63, 67).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwCommand {
    /// Starting LBA (CDW11:CDW10).
    pub slba: u64,
    /// Number of Logical Blocks, 0's based (CDW12 bits 15:0).
    pub nlb: u16,
    /// Deallocate (Write Zeroes, CDW12 bit 25).
    pub deac: bool,
    /// Force Unit Access (CDW12 bit 30).
    pub fua: bool,
    /// Limited Retry (CDW12 bit 31).
    pub lr: bool,
    /// Protection Information field (CDW12 bits 29:26).
    pub prinfo: u8,
}

impl RwCommand {
    /// Reads the fields from an SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            slba: s.cdw[0] as u64 | ((s.cdw[1] as u64) << 32),
            nlb: s.cdw[2] as u16,
            deac: s.cdw[2] & (1 << 25) != 0,
            fua: s.cdw[2] & (1 << 30) != 0,
            lr: s.cdw[2] & (1 << 31) != 0,
            prinfo: ((s.cdw[2] >> 26) & 0xF) as u8,
        }
    }

    /// Number of blocks (1-based).
    pub const fn blocks(&self) -> u32 {
        self.nlb as u32 + 1
    }

    /// Builds an I/O SQE with these fields (caller sets the data pointer).
    pub fn to_sqe(&self, opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut s = Sqe::new(opcode, cid).with_nsid(nsid);
        s.cdw[0] = self.slba as u32;
        s.cdw[1] = (self.slba >> 32) as u32;
        s.cdw[2] = self.nlb as u32
            | ((self.deac as u32) << 25)
            | (((self.prinfo & 0xF) as u32) << 26)
            | ((self.fua as u32) << 30)
            | ((self.lr as u32) << 31);
        s
    }

    /// A plain command: `blocks` (1..=65536) blocks at `slba`.
    pub const fn simple(slba: u64, blocks: u32) -> Self {
        Self {
            slba,
            nlb: blocks.saturating_sub(1) as u16,
            deac: false,
            fua: false,
            lr: false,
            prinfo: 0,
        }
    }
}

/// Dataset Management command fields (NVM Command Set Figure 44).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmCommand {
    /// Number of Ranges, 0's based (CDW10 bits 7:0).
    pub nr: u8,
    /// Integral Dataset for Read.
    pub idr: bool,
    /// Integral Dataset for Write.
    pub idw: bool,
    /// Attribute Deallocate.
    pub ad: bool,
}

impl DsmCommand {
    /// Reads the fields from an SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            nr: s.cdw[0] as u8,
            idr: s.cdw[1] & 1 != 0,
            idw: s.cdw[1] & 2 != 0,
            ad: s.cdw[1] & 4 != 0,
        }
    }
    /// Number of ranges (1-based).
    pub const fn ranges(&self) -> usize {
        self.nr as usize + 1
    }
    /// Bytes of range data that accompany the command.
    pub const fn data_len(&self) -> usize {
        self.ranges() * DsmRange::SIZE
    }
    /// Builds the SQE.
    pub fn to_sqe(&self, cid: u16, nsid: u32) -> Sqe {
        let mut s = Sqe::new(crate::IoOpcode::DatasetManagement as u8, cid).with_nsid(nsid);
        s.cdw[0] = self.nr as u32;
        s.cdw[1] = self.idr as u32 | ((self.idw as u32) << 1) | ((self.ad as u32) << 2);
        s
    }
}

/// A Dataset Management range (NVM Command Set Figure 45), 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DsmRange {
    /// Context Attributes.
    pub cattr: u32,
    /// Length in logical blocks.
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

impl DsmRange {
    /// Encoded size.
    pub const SIZE: usize = 16;
    /// Reads range `i` from a range list; `None` if it is not entirely in `b`.
    pub fn read(b: &[u8], i: usize) -> Option<Self> {
        let off = i.checked_mul(Self::SIZE)?;
        let r = b.get(off..off.checked_add(Self::SIZE)?)?;
        Some(Self {
            cattr: le::u32_at(r, 0),
            nlb: le::u32_at(r, 4),
            slba: le::u64_at(r, 8),
        })
    }
    /// Encodes into 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        le::put_u32(&mut b, 0, self.cattr);
        le::put_u32(&mut b, 4, self.nlb);
        le::put_u64(&mut b, 8, self.slba);
        b
    }
}

/// Set / Get Features fields (Figures 316, 319).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeaturesCommand {
    /// Feature Identifier (CDW10 bits 7:0).
    pub fid: u8,
    /// Save (Set Features, CDW10 bit 31).
    pub save: bool,
    /// Select (Get Features, CDW10 bits 10:8).
    pub sel: u8,
    /// Feature specific value (CDW11).
    pub cdw11: u32,
}

impl FeaturesCommand {
    /// Select: current value.
    pub const SEL_CURRENT: u8 = 0;
    /// Select: default value.
    pub const SEL_DEFAULT: u8 = 1;
    /// Select: saved value.
    pub const SEL_SAVED: u8 = 2;
    /// Select: supported capabilities.
    pub const SEL_CAPABILITIES: u8 = 3;

    /// Reads the fields from an SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            fid: s.cdw[0] as u8,
            save: s.cdw[0] & (1 << 31) != 0,
            sel: ((s.cdw[0] >> 8) & 0x7) as u8,
            cdw11: s.cdw[1],
        }
    }
    /// Builds a Set Features SQE.
    pub fn set_sqe(cid: u16, fid: u8, cdw11: u32) -> Sqe {
        Sqe::new(crate::AdminOpcode::SetFeatures as u8, cid)
            .with_cdw(10, fid as u32)
            .with_cdw(11, cdw11)
    }
    /// Builds a Get Features SQE.
    pub fn get_sqe(cid: u16, fid: u8, sel: u8) -> Sqe {
        Sqe::new(crate::AdminOpcode::GetFeatures as u8, cid)
            .with_cdw(10, fid as u32 | (((sel & 7) as u32) << 8))
    }
}

/// Number of Queues value (Figure 326): 0's based NSQR (bits 15:0) and NCQR (bits 31:16).
pub const fn number_of_queues(nsq: u16, ncq: u16) -> u32 {
    nsq as u32 | ((ncq as u32) << 16)
}

/// Abort command fields (Figure 143) and completion DW0 bit 0 (1 = not aborted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortCommand {
    /// Submission Queue Identifier.
    pub sqid: u16,
    /// Command Identifier to abort.
    pub cid: u16,
}

impl AbortCommand {
    /// Completion DW0 when the command was not aborted.
    pub const NOT_ABORTED: u32 = 1;
    /// Reads the fields from an SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            sqid: s.cdw[0] as u16,
            cid: (s.cdw[0] >> 16) as u16,
        }
    }
    /// Builds the SQE.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        Sqe::new(crate::AdminOpcode::Abort as u8, cid)
            .with_cdw(10, self.sqid as u32 | ((self.cid as u32) << 16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_fields() {
        let c = RwCommand {
            slba: 0x0000_0001_0000_0010,
            nlb: 0xffff,
            deac: false,
            fua: true,
            lr: false,
            prinfo: 0,
        };
        let s = c.to_sqe(0x01, 3, 1);
        let b = s.to_bytes();
        assert_eq!(
            &b[40..52],
            &[0x10, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0, 0x40]
        );
        assert_eq!(RwCommand::from_sqe(&s), c);
        assert_eq!(c.blocks(), 65536);
    }

    #[test]
    fn dsm_and_features() {
        let r = DsmRange {
            cattr: 0,
            nlb: 8,
            slba: 0x20,
        };
        let b = r.to_bytes();
        assert_eq!(b, [0, 0, 0, 0, 8, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(DsmRange::read(&b, 0), Some(r));
        assert_eq!(DsmRange::read(&b, 1), None);
        assert_eq!(DsmRange::read(&b, usize::MAX), None);
        let d = DsmCommand {
            nr: 1,
            idr: false,
            idw: false,
            ad: true,
        };
        assert_eq!(DsmCommand::from_sqe(&d.to_sqe(1, 1)), d);
        assert_eq!(d.data_len(), 32);
        let f = FeaturesCommand::from_sqe(&FeaturesCommand::get_sqe(1, 7, 3));
        assert_eq!((f.fid, f.sel, f.save), (7, 3, false));
        assert_eq!(number_of_queues(7, 3), 0x0003_0007);
        let a = AbortCommand { sqid: 2, cid: 77 };
        assert_eq!(AbortCommand::from_sqe(&a.to_sqe(1)), a);
    }
}
