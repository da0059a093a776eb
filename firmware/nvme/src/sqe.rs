//! Submission Queue Entry (NVMe base 2.0 §4.2, Figure 88) and data pointers (§4.1).

use crate::le;

/// Byte offsets of the common command format (Figure 88).
pub mod field {
    /// Opcode (CDW0 bits 7:0).
    pub const OPCODE: usize = 0;
    /// FUSE (bits 1:0) and PSDT (bits 7:6) (CDW0 bits 15:8).
    pub const FLAGS: usize = 1;
    /// Command Identifier (CDW0 bits 31:16).
    pub const CID: usize = 2;
    /// Namespace Identifier; for fabrics commands byte 4 is FCTYPE.
    pub const NSID: usize = 4;
    /// Command Dword 2.
    pub const CDW2: usize = 8;
    /// Command Dword 3.
    pub const CDW3: usize = 12;
    /// Metadata Pointer.
    pub const MPTR: usize = 16;
    /// Data Pointer (PRP1/PRP2 or SGL1).
    pub const DPTR: usize = 24;
    /// Command Dword 10 (CDW11..15 follow, 4 bytes apart).
    pub const CDW10: usize = 40;
}

/// PRP or SGL Data Transfer (PSDT, CDW0 bits 15:14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Psdt {
    /// PRPs are used.
    Prp,
    /// SGLs are used; MPTR is the address of a contiguous metadata buffer.
    SglContiguousMetadata,
    /// SGLs are used; MPTR is the address of an SGL segment.
    SglMetadataSegment,
    /// Reserved value 11b.
    Reserved,
}

/// Data transfer direction of a command: bits 1:0 of the opcode (Figure 138, Data Transfer
/// column; NVM Command Set 1.0 Figure 18) or, for fabrics commands, of FCTYPE (NVMe-oF 1.1
/// §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    /// 00b: no data.
    None,
    /// 01b: host to controller (write-like).
    HostToController,
    /// 10b: controller to host (read-like).
    ControllerToHost,
    /// 11b: bidirectional.
    Bidirectional,
}

/// SGL descriptor types (Figure 99).
pub mod sgl_type {
    /// SGL Data Block descriptor.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket descriptor.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment descriptor.
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment descriptor.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Keyed SGL Data Block descriptor (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport SGL Data Block descriptor (NVMe/TCP data transferred by R2T/C2HData).
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor sub types (Figure 100).
pub mod sgl_subtype {
    /// The Address field is a memory address.
    pub const ADDRESS: u8 = 0x0;
    /// The Address field is an offset (in-capsule data on fabrics).
    pub const OFFSET: u8 = 0x1;
    /// Transport specific (NVMe/TCP uses Ah with the Transport SGL Data Block).
    pub const TRANSPORT_SPECIFIC: u8 = 0xA;
}

/// A 16-byte SGL descriptor (§4.1.2, Figures 90-98).
///
/// For keyed descriptors (type 4h) `length` is 24 bits (bytes 10:8) and `key` occupies bytes
/// 14:11; for all other types `length` is bytes 11:8 and `key` is ignored (encoded as zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SglDescriptor {
    /// Address (bytes 7:0).
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Key (keyed data block only).
    pub key: u32,
    /// Descriptor type (byte 15 bits 7:4), see [`sgl_type`].
    pub desc_type: u8,
    /// Descriptor sub type (byte 15 bits 3:0), see [`sgl_subtype`].
    pub subtype: u8,
}

impl SglDescriptor {
    /// A data block descriptor with an offset address: in-capsule data on fabrics.
    pub const fn in_capsule(offset: u64, length: u32) -> Self {
        Self {
            address: offset,
            length,
            key: 0,
            desc_type: sgl_type::DATA_BLOCK,
            subtype: sgl_subtype::OFFSET,
        }
    }

    /// A Transport SGL Data Block (NVMe/TCP: data moved by R2T/H2CData or C2HData).
    pub const fn transport(length: u32) -> Self {
        Self {
            address: 0,
            length,
            key: 0,
            desc_type: sgl_type::TRANSPORT_DATA_BLOCK,
            subtype: sgl_subtype::TRANSPORT_SPECIFIC,
        }
    }

    /// Decodes a descriptor.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let id = b[15];
        let desc_type = id >> 4;
        let (length, key) = if desc_type == sgl_type::KEYED_DATA_BLOCK {
            (
                u32::from_le_bytes([b[8], b[9], b[10], 0]),
                le::u32_at(b, 11),
            )
        } else {
            (le::u32_at(b, 8), 0)
        };
        Self {
            address: le::u64_at(b, 0),
            length,
            key,
            desc_type,
            subtype: id & 0xF,
        }
    }

    /// Encodes the descriptor.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        le::put_u64(&mut b, 0, self.address);
        if self.desc_type == sgl_type::KEYED_DATA_BLOCK {
            le::put_bytes(&mut b, 8, &self.length.to_le_bytes()[..3]);
            le::put_u32(&mut b, 11, self.key);
        } else {
            le::put_u32(&mut b, 8, self.length);
        }
        b[15] = (self.desc_type << 4) | (self.subtype & 0xF);
        b
    }
}

/// A 64-byte submission queue entry.
///
/// Fields are kept decoded; [`Sqe::from_bytes`] / [`Sqe::to_bytes`] convert to and from the
/// little-endian wire/queue format. Command-specific dwords are `cdw[0]` = CDW10 ...
/// `cdw[5]` = CDW15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sqe {
    /// Opcode (byte 0).
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6) (byte 1).
    pub flags: u8,
    /// Command identifier (bytes 3:2).
    pub cid: u16,
    /// Namespace identifier (bytes 7:4). For fabrics commands its low byte is FCTYPE.
    pub nsid: u32,
    /// Command Dword 2.
    pub cdw2: u32,
    /// Command Dword 3.
    pub cdw3: u32,
    /// Metadata pointer (bytes 23:16).
    pub mptr: u64,
    /// Data pointer, raw (bytes 39:24): PRP1 + PRP2 or SGL1.
    pub dptr: [u8; 16],
    /// CDW10..CDW15.
    pub cdw: [u32; 6],
}

impl Sqe {
    /// Size of an SQE in bytes.
    pub const SIZE: usize = 64;

    /// A zeroed command with `opcode` and `cid`.
    pub const fn new(opcode: u8, cid: u16) -> Self {
        Self {
            opcode,
            flags: 0,
            cid,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: [0; 16],
            cdw: [0; 6],
        }
    }

    /// A fabrics command (opcode 7Fh) of the given command type.
    pub const fn fabrics(fctype: u8, cid: u16) -> Self {
        let mut s = Self::new(crate::opcode::FABRICS_OPCODE, cid);
        s.nsid = fctype as u32;
        s
    }

    /// Decodes 64 bytes.
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut cdw = [0u32; 6];
        for (i, d) in cdw.iter_mut().enumerate() {
            *d = le::u32_at(b, field::CDW10 + 4 * i);
        }
        Self {
            opcode: b[field::OPCODE],
            flags: b[field::FLAGS],
            cid: le::u16_at(b, field::CID),
            nsid: le::u32_at(b, field::NSID),
            cdw2: le::u32_at(b, field::CDW2),
            cdw3: le::u32_at(b, field::CDW3),
            mptr: le::u64_at(b, field::MPTR),
            dptr: le::array_at(b, field::DPTR),
            cdw,
        }
    }

    /// Encodes to 64 bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[field::OPCODE] = self.opcode;
        b[field::FLAGS] = self.flags;
        le::put_u16(&mut b, field::CID, self.cid);
        le::put_u32(&mut b, field::NSID, self.nsid);
        le::put_u32(&mut b, field::CDW2, self.cdw2);
        le::put_u32(&mut b, field::CDW3, self.cdw3);
        le::put_u64(&mut b, field::MPTR, self.mptr);
        le::put_bytes(&mut b, field::DPTR, &self.dptr);
        for (i, d) in self.cdw.iter().enumerate() {
            le::put_u32(&mut b, field::CDW10 + 4 * i, *d);
        }
        b
    }

    /// Fused operation bits (0 = normal).
    pub const fn fuse(&self) -> u8 {
        self.flags & 0x3
    }

    /// PRP or SGL selection.
    pub const fn psdt(&self) -> Psdt {
        match self.flags >> 6 {
            0 => Psdt::Prp,
            1 => Psdt::SglContiguousMetadata,
            2 => Psdt::SglMetadataSegment,
            _ => Psdt::Reserved,
        }
    }

    /// Sets PSDT.
    pub fn set_psdt(&mut self, p: Psdt) {
        let v = match p {
            Psdt::Prp => 0,
            Psdt::SglContiguousMetadata => 1,
            Psdt::SglMetadataSegment => 2,
            Psdt::Reserved => 3,
        };
        self.flags = (self.flags & 0x3F) | (v << 6);
    }

    /// Fabrics command type (byte 4), meaningful when `opcode` is 7Fh.
    pub const fn fctype(&self) -> u8 {
        self.nsid as u8
    }

    /// Data transfer direction: opcode bits 1:0, or FCTYPE bits 1:0 for fabrics commands.
    pub const fn data_direction(&self) -> DataDirection {
        let code = if self.opcode == crate::opcode::FABRICS_OPCODE {
            self.fctype()
        } else {
            self.opcode
        };
        match code & 3 {
            0 => DataDirection::None,
            1 => DataDirection::HostToController,
            2 => DataDirection::ControllerToHost,
            _ => DataDirection::Bidirectional,
        }
    }

    /// CDW `n` for `n` in 10..=15; 0 for any other `n`.
    pub fn cdw(&self, n: usize) -> u32 {
        n.checked_sub(10)
            .and_then(|i| self.cdw.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// PRP Entry 1.
    pub fn prp1(&self) -> u64 {
        le::u64_at(&self.dptr, 0)
    }

    /// PRP Entry 2.
    pub fn prp2(&self) -> u64 {
        le::u64_at(&self.dptr, 8)
    }

    /// Sets PRP1/PRP2 and selects PRPs in PSDT.
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) {
        le::put_u64(&mut self.dptr, 0, prp1);
        le::put_u64(&mut self.dptr, 8, prp2);
        self.set_psdt(Psdt::Prp);
    }

    /// SGL1 decoded from the data pointer.
    pub fn sgl(&self) -> SglDescriptor {
        SglDescriptor::from_bytes(&self.dptr)
    }

    /// Sets SGL1 and selects SGLs (contiguous metadata) in PSDT.
    pub fn set_sgl(&mut self, d: SglDescriptor) {
        self.dptr = d.to_bytes();
        self.set_psdt(Psdt::SglContiguousMetadata);
    }

    /// Builder: namespace identifier.
    pub const fn with_nsid(mut self, nsid: u32) -> Self {
        self.nsid = nsid;
        self
    }

    /// Builder: CDW `n` (10..=15); other `n` leave the command unchanged.
    pub fn with_cdw(mut self, n: usize, v: u32) -> Self {
        if let Some(d) = n.checked_sub(10).and_then(|i| self.cdw.get_mut(i)) {
            *d = v;
        }
        self
    }

    /// Builder: SGL1.
    pub fn with_sgl(mut self, d: SglDescriptor) -> Self {
        self.set_sgl(d);
        self
    }

    /// Builder: PRP1/PRP2.
    pub fn with_prps(mut self, prp1: u64, prp2: u64) -> Self {
        self.set_prps(prp1, prp2);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn linux_tcp_connect_sqe_bytes() {
        // Admin-queue Connect as Linux nvme-tcp sends it: opcode 7Fh, PSDT=01b (flags 40h),
        // FCTYPE 01h, in-capsule SGL (type 0h subtype 1h, offset 0, 1024 bytes),
        // RECFMT 0, QID 0, SQSIZE 31, CATTR 0, KATO 5000 ms.
        let mut expect = [0u8; 64];
        expect[0] = 0x7f;
        expect[1] = 0x40;
        expect[2] = 0x05; // CID 5
        expect[4] = 0x01;
        expect[32] = 0x00;
        expect[33] = 0x04; // 1024
        expect[39] = 0x01;
        expect[44] = 31;
        expect[48] = 0x88;
        expect[49] = 0x13;
        let sqe = crate::fabrics::ConnectCommand {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 5000,
        }
        .to_sqe(5)
        .with_sgl(SglDescriptor::in_capsule(0, 1024));
        assert_eq!(sqe.to_bytes(), expect);
        let back = Sqe::from_bytes(&expect);
        assert_eq!(back, sqe);
        assert_eq!(back.fctype(), 1);
        assert_eq!(back.psdt(), Psdt::SglContiguousMetadata);
        assert_eq!(back.sgl(), SglDescriptor::in_capsule(0, 1024));
    }

    #[test]
    fn read_sqe_bytes() {
        // Read NSID 1, SLBA 0x1_0000_0002, NLB 7 (8 blocks), PRP1 0x1000.
        let sqe = Sqe::new(0x02, 0xabcd)
            .with_nsid(1)
            .with_cdw(10, 2)
            .with_cdw(11, 1)
            .with_cdw(12, 7)
            .with_prps(0x1000, 0);
        let b = sqe.to_bytes();
        assert_eq!(&b[0..8], &[0x02, 0, 0xcd, 0xab, 1, 0, 0, 0]);
        assert_eq!(&b[24..32], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[40..52], &[2, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(sqe.prp1(), 0x1000);
        assert_eq!(sqe.psdt(), Psdt::Prp);
        assert_eq!(sqe.cdw(12), 7);
        assert_eq!(sqe.cdw(9), 0);
        assert_eq!(sqe.cdw(16), 0);
    }

    #[test]
    fn data_direction_bits() {
        use DataDirection::*;
        // Opcode bits 1:0: Flush 00h, Write 01h, Read 02h, 03h (11b), Compare 05h; fabrics
        // commands by FCTYPE bits 1:0, not by their opcode 7Fh (11b): Property Set 00h,
        // Connect 01h, Property Get 04h.
        let cases = [
            (Sqe::new(0x00, 0), None),
            (Sqe::new(0x01, 0), HostToController),
            (Sqe::new(0x02, 0), ControllerToHost),
            (Sqe::new(0x03, 0), Bidirectional),
            (Sqe::new(0x05, 0), HostToController),
            (Sqe::fabrics(0x00, 0), None),
            (Sqe::fabrics(0x01, 0), HostToController),
            (Sqe::fabrics(0x04, 0), None),
        ];
        for (sqe, want) in cases {
            assert_eq!(sqe.data_direction(), want, "opcode {:#x}", sqe.opcode);
        }
    }

    #[test]
    fn keyed_sgl_layout() {
        let d = SglDescriptor {
            address: 0x1122_3344_5566_7788,
            length: 0x00ab_cdef,
            key: 0xdead_beef,
            desc_type: sgl_type::KEYED_DATA_BLOCK,
            subtype: 0,
        };
        let b = d.to_bytes();
        assert_eq!(
            b,
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xef, 0xcd, 0xab, 0xef, 0xbe, 0xad,
                0xde, 0x40
            ]
        );
        assert_eq!(SglDescriptor::from_bytes(&b), d);
        let t = SglDescriptor::transport(8192).to_bytes();
        assert_eq!(t[15], 0x5A);
        assert_eq!(&t[8..12], &[0, 0x20, 0, 0]);
    }

    proptest! {
        #[test]
        fn sqe_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let mut a = [0u8; 64];
            a.copy_from_slice(&bytes);
            prop_assert_eq!(Sqe::from_bytes(&a).to_bytes(), a);
        }

        #[test]
        fn sgl_roundtrip_non_keyed(bytes in proptest::collection::vec(any::<u8>(), 16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes);
            let d = SglDescriptor::from_bytes(&a);
            if d.desc_type != sgl_type::KEYED_DATA_BLOCK {
                // Reserved bytes 14:12 are dropped; everything else survives.
                let b = d.to_bytes();
                prop_assert_eq!(&b[..12], &a[..12]);
                prop_assert_eq!(b[15], a[15]);
            } else {
                prop_assert_eq!(d.to_bytes(), a);
            }
        }
    }
}
