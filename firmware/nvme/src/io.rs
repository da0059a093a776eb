//! I/O and admin command field helpers (NVM Command Set 1.0 §3.2-3.3; NVMe base 2.0 §5.1,
//! §5.27 Set/Get Features).

use crate::le;
use crate::sqe::Sqe;

/// Read / Write / Compare / Write Zeroes / Verify fields (NVM Command Set Figures 38, 63, 67;
/// Verify §3.3.6 has the same SLBA, NLB, PRINFO, FUA and LR fields).
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

/// Copy command fields (NVM Command Set 2.0 §3.3.1, Figures 41-43; Linux
/// `struct nvme_copy_command`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyCommand {
    /// Starting Destination LBA (CDW11:CDW10).
    pub sdlba: u64,
    /// Number of Ranges, 0's based (CDW12 bits 7:0).
    pub nr: u8,
    /// Descriptor Format (CDW12 bits 11:8).
    pub desfmt: u8,
    /// Protection Information Field Read (CDW12 bits 15:12).
    pub prinfor: u8,
    /// Directive Type (CDW12 bits 23:20).
    pub dtype: u8,
    /// Protection Information Field Write (CDW12 bits 29:26).
    pub prinfow: u8,
    /// Force Unit Access (CDW12 bit 30).
    pub fua: bool,
    /// Limited Retry (CDW12 bit 31).
    pub lr: bool,
}

impl CopyCommand {
    /// Reads the fields from an SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            sdlba: s.cdw[0] as u64 | ((s.cdw[1] as u64) << 32),
            nr: s.cdw[2] as u8,
            desfmt: ((s.cdw[2] >> 8) & 0xF) as u8,
            prinfor: ((s.cdw[2] >> 12) & 0xF) as u8,
            dtype: ((s.cdw[2] >> 20) & 0xF) as u8,
            prinfow: ((s.cdw[2] >> 26) & 0xF) as u8,
            fua: s.cdw[2] & (1 << 30) != 0,
            lr: s.cdw[2] & (1 << 31) != 0,
        }
    }

    /// Number of source ranges (1-based).
    pub const fn ranges(&self) -> usize {
        self.nr as usize + 1
    }

    /// Bytes of source range entries that accompany the command (format 0: 32 per range).
    pub const fn data_len(&self) -> usize {
        self.ranges() * CopyRange::SIZE
    }

    /// Builds the SQE (caller sets the data pointer).
    pub fn to_sqe(&self, cid: u16, nsid: u32) -> Sqe {
        let mut s = Sqe::new(crate::IoOpcode::Copy as u8, cid).with_nsid(nsid);
        s.cdw[0] = self.sdlba as u32;
        s.cdw[1] = (self.sdlba >> 32) as u32;
        s.cdw[2] = self.nr as u32
            | (((self.desfmt & 0xF) as u32) << 8)
            | (((self.prinfor & 0xF) as u32) << 12)
            | (((self.dtype & 0xF) as u32) << 20)
            | (((self.prinfow & 0xF) as u32) << 26)
            | ((self.fua as u32) << 30)
            | ((self.lr as u32) << 31);
        s
    }

    /// A plain format 0 Copy of `ranges` (1..=256) source ranges to `sdlba`.
    pub const fn simple(sdlba: u64, ranges: usize) -> Self {
        Self {
            sdlba,
            nr: ranges.saturating_sub(1) as u8,
            desfmt: 0,
            prinfor: 0,
            dtype: 0,
            prinfow: 0,
            fua: false,
            lr: false,
        }
    }
}

/// A Source Range Entry of Copy descriptor format 0h (NVM Command Set 2.0 Figure 44; Linux
/// `struct nvme_copy_range`), 32 bytes. The protection information fields are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyRange {
    /// Starting LBA (bytes 15:8).
    pub slba: u64,
    /// Number of Logical Blocks, 0's based (bytes 17:16).
    pub nlb: u16,
}

impl CopyRange {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Number of blocks (1-based).
    pub const fn blocks(&self) -> u32 {
        self.nlb as u32 + 1
    }

    /// Reads entry `i` of a range list; `None` if it is not entirely in `b`.
    pub fn read(b: &[u8], i: usize) -> Option<Self> {
        let off = i.checked_mul(Self::SIZE)?;
        let r = b.get(off..off.checked_add(Self::SIZE)?)?;
        Some(Self {
            slba: le::u64_at(r, 8),
            nlb: le::u16_at(r, 16),
        })
    }

    /// Encodes into 32 bytes (reserved and protection fields zero).
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        le::put_u64(&mut b, 8, self.slba);
        le::put_u16(&mut b, 16, self.nlb);
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

    #[test]
    fn copy_fields() {
        // CDW12 as libnvme's nvme_copy() builds it: NR bits 7:0, format 11:8, PRINFOR 15:12,
        // DTYPE 23:20, PRINFOW 29:26, FUA 30, LR 31; SDLBA in CDW10-11.
        let c = CopyCommand {
            sdlba: 0x0000_0002_0000_0100,
            nr: 2,
            desfmt: 0,
            prinfor: 0,
            dtype: 0,
            prinfow: 0,
            fua: true,
            lr: false,
        };
        let b = c.to_sqe(9, 1).to_bytes();
        assert_eq!(b[0], 0x19);
        assert_eq!(&b[40..52], &[0, 1, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0x40]);
        assert_eq!(CopyCommand::from_sqe(&c.to_sqe(9, 1)), c);
        assert_eq!((c.ranges(), c.data_len()), (3, 96));
        let mut s = c.to_sqe(9, 1);
        s.cdw[2] = 0x0010_0300 | (5 << 12) | (7 << 26) | (1 << 31);
        let d = CopyCommand::from_sqe(&s);
        assert_eq!((d.desfmt, d.prinfor, d.dtype, d.prinfow), (3, 5, 1, 7));
        assert!(d.lr && !d.fua);
        // Source Range Entry format 0 (Linux struct nvme_copy_range): rsvd0[8], slba at 8,
        // nlb (0's based) at 16, 32 bytes in all.
        let r = CopyRange {
            slba: 0x1122_3344_5566_7788,
            nlb: 0x0f,
        };
        let e = r.to_bytes();
        assert_eq!(&e[..8], &[0; 8]);
        assert_eq!(
            &e[8..18],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x0f, 0]
        );
        assert_eq!(&e[18..], &[0; 14]);
        assert_eq!(CopyRange::read(&e, 0), Some(r));
        assert_eq!(r.blocks(), 16);
        assert_eq!(CopyRange::read(&e, 1), None);
        assert_eq!(CopyRange::read(&e[..31], 0), None);
    }
}
